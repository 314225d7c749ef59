"""Where does relearning reopen an erasure? The meter's relearning attack (fine-tune on half of
each person's facts, measure the other half), restricted to one part of the model at a time.

    python -m kif.meter.localize (--forget-split forget10 | --forget FILE) \
        --erased kif=runs/kif stamp=runs/stamp [--model fact-world] [--oracle] [--json] \
        [--record results/FILE.json]

A model that still stores the hidden facts behind a block that only stops them reaching the
answer recovers them when the attack may train that block: the scope that recovers as much as
the whole model is where the erasure sits; scopes that recover nothing hold nothing the attack
can reopen alone. A model that never knew the facts recovers nothing under any scope.
Scopes: every weight, the embeddings, each block, the final norm and unembedding.
"""

import argparse
import json
import re
import sys

from kif import metrics
from kif.errors import KifError


def scopes(model) -> dict[str, str]:
    """Scope name -> regular expression on parameter names."""
    out = {"all": ".", "embeddings": r"^(embed|pos_embed)\."}
    out.update({f"block {l}": rf"^blocks\.{l}\." for l in range(model.cfg.n_layers)})
    out["unembedding"] = r"^(ln_final|unembed)\."
    return out


def localize(model, shown, measured, *, seed: int = 0, lr: float | None = None
             ) -> dict[str, float]:
    """Accuracy on `measured` before any attack ("no attack") and after the relearning attack on
    `shown`, trained on each scope of `scopes` alone (a scope the model has no parameter of is
    left out: e.g. rotary models have no position embedding). `lr`: the attack's learning rate
    (default the meter's)."""
    from kif.meter.probes.relearning import LR, relearned

    def acc(m) -> float:
        return float(metrics.score_answers(m, [p.prompt for p in measured],
                                           [p.answer for p in measured]).correct.mean())

    out = {"no attack": acc(model)}
    params = [n for n, _ in model.named_parameters()]
    for name, pattern in scopes(model).items():
        if not any(re.search(pattern, n) for n in params):
            continue
        with relearned(model, shown, seed=seed, lr=lr or LR, only=pattern) as m:
            out[name] = acc(m)
    return out


def main(argv=None) -> int:
    from kif.erasure.io import open_model
    from kif.meter.probes.relearning import split_facts

    ap = argparse.ArgumentParser(prog="python -m kif.meter.localize")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--forget-split", default="forget10", help="a fact-world split (default)")
    src.add_argument("--forget", metavar="FILE",
                     help="forget probes instead (kif JSONL or TOFU QA): the facts erased")
    ap.add_argument("--model", default="fact-world", help="a zoo base model")
    ap.add_argument("--erased", nargs="+", default=[], metavar="NAME=PATH")
    ap.add_argument("--oracle", action="store_true", help="also the split's zoo oracle")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", metavar="FILE.json")
    args = ap.parse_args(argv)
    if args.forget:
        from kif.data.formats import read_probes

        forget = read_probes(args.forget, "forget")[0]["forget"]
        if not forget:
            raise KifError(f"{args.forget} has no forget probes")
    else:  # the fact world is a data source like any other: imported only when used
        from kif.world import FactWorld, world_concept

        world = FactWorld.generate(0)
        forget = world_concept(world, [p.name for p in world.split(args.forget_split)]).forget
    shown, measured = split_facts(list(forget))
    bad = [e for e in args.erased if "=" not in e]
    if bad:
        ap.error(f"--erased takes NAME=PATH, got {bad[0]!r}")
    models = [tuple(e.split("=", 1)) for e in args.erased]
    if args.oracle:
        if args.forget:
            ap.error("--oracle names the split's zoo oracle: pass it as --erased oracle=PATH")
        models.append(("oracle", f"{args.model}-oracle-{args.forget_split}"))
    rows = []
    for name, spec in models:
        rows.append({"model": name, **localize(open_model(spec), shown, measured)})
        if not args.json:
            print(name, " ".join(f"{k}={v:.3f}" for k, v in rows[-1].items() if k != "model"),
                  flush=True)
    if args.record:
        from kif import results

        results.write(args.record, None, model=args.model,
                      **({"forget": args.forget} if args.forget else
                         {"forget_split": args.forget_split}),
                      n_shown=len(shown), n_measured=len(measured), rows=rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KifError as err:  # an unknown split or model: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
