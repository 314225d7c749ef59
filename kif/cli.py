"""The `kif` command line: a thin layer that parses, calls the Python API and prints.

Every subcommand is one call into the library; `main(argv) -> int` so tests call it directly.
Errors kif expects (bad names, bad files) print one line `kif: error: ...` and return 2.
"""

import argparse
import json
import logging
import sys
import time
from typing import Sequence

from rich.console import Console
from rich.table import Table

from kif.errors import KifError

_EXPECTED_ERRORS: tuple[type[BaseException], ...] = (KifError,)


def _out() -> Console:
    return Console(soft_wrap=True)


def _err(msg: str) -> int:
    Console(stderr=True, soft_wrap=True, highlight=False).print(f"kif: error: {msg}", markup=False)
    return 2


# ---- kif eval ----------------------------------------------------------------------------------

def _cmd_eval(args: argparse.Namespace) -> int:
    from kif import models
    from kif.evaluation import evaluate
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    world.split(args.forget_split)  # refuse an unknown split before loading anything
    model = models.load(args.model)
    oracle = models.load(args.oracle) if args.oracle else None
    report = evaluate(model, world, args.forget_split, oracle=oracle)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    table = Table(title=f"kif eval: {report.model} on {report.forget_split}", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("forget_acc", "forget_paraphrase_acc", "retain_acc", "retain_paraphrase_acc",
                "neighbour_acc", "shared_acc", "shared_paraphrase_acc", "unknown_acc",
                "model_utility", "forget_truth_ratio_median"):
        table.add_row(key, f"{getattr(report, key):.3f}")
    if report.forget_quality is not None:
        table.add_row(f"forget_quality (vs {report.oracle})", f"{report.forget_quality:.3g}")
    table.add_row("seconds", f"{report.seconds:.1f}")
    _out().print(table)
    return 0


# ---- kif zoo -----------------------------------------------------------------------------------

def _cmd_zoo_list(args: argparse.Namespace) -> int:
    from kif import zoo

    rows = []
    for name, entry in zoo.ENTRIES.items():
        size = sum(f.stat().st_size for f in entry.path.glob("*")) if entry.path.is_dir() else 0
        card = zoo.card(name)
        rows.append({"name": name, "description": entry.description, "built": zoo.is_built(name),
                     "forget_split": entry.forget_split, "path": str(entry.path),
                     "megabytes": round(size / 2**20, 2),
                     "train_seconds": card.get("train_seconds")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="kif zoo")
    for col in ("name", "built", "MB", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "yes" if r["built"] else "no", f"{r['megabytes']:.1f}",
                      r["description"])
    _out().print(table)
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    import dataclasses
    import pathlib

    from kif import zoo
    from kif.zoo.build import TrainConfig, build

    names = args.only or list(zoo.ENTRIES)
    for n in names:
        if n not in zoo.ENTRIES:
            raise KifError(f"unknown zoo model {n!r} (choose from {', '.join(zoo.ENTRIES)})")
    cfg = TrainConfig()
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    out_root = pathlib.Path(args.out) if args.out else None
    t0 = time.perf_counter()
    timings = build(names, out_root, cfg, show_progress=not args.json)
    total = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"seconds": round(total, 1),
                          "models": {k: round(v, 1) for k, v in timings.items()}}, indent=2))
    else:
        for k, v in timings.items():
            _out().print(f"built {k} in {v:.0f} s")
        _out().print(f"zoo built in {total / 60:.1f} min ({total:.0f} s)")
    return 0


# ---- kif signatures / kif bench signatures ------------------------------------------------------

def _cmd_signatures(args: argparse.Namespace) -> int:
    import pathlib

    from kif import models
    from kif.concepts import Concept
    from kif.signatures import extract
    from kif.signatures.plots import plot_signature
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    concept = Concept.from_world(world, args.concept)  # refuses unknown people before any work
    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise KifError(f"{out} exists and is not empty (use --overwrite)")
    model = models.load(args.model)
    t0 = time.perf_counter()
    sig = extract(model, concept, kind=args.kind)
    seconds = time.perf_counter() - t0
    sig.save(out)
    plots = plot_signature(sig, out)
    summary = {"concept": sig.concept, "kind": sig.kind, "model": sig.model_name,
               "components": len(sig), "hooks": list(sig.hooks), "seconds": round(seconds, 2),
               "top": [{"hook": sig.component_hooks[i], "score": float(sig.scores[i]),
                        **({"index": int(sig.indices[i, 1])} if sig.indices is not None else {})}
                       for i in range(min(10, len(sig)))],
               "info": sig.info, "out": str(out), "plots": [str(p) for p in plots]}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    table = Table(title=f"{sig.kind} signature of {sig.concept} ({seconds:.1f} s)")
    for col in ("#", "hook", "index", "score"):
        table.add_column(col)
    for i, row in enumerate(summary["top"]):
        table.add_row(str(i), row["hook"], str(row.get("index", "")), f"{row['score']:.4g}")
    _out().print(table)
    _out().print(f"wrote {out}/signature.json, signature.safetensors and {len(plots)} plots")
    return 0


def _cmd_bench_signatures(args: argparse.Namespace) -> int:
    from kif import models
    from kif.signatures import KIND_MODULES
    from kif.signatures.bench import bench_people, causality, default_k, sae_loader
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    model = models.load(args.model)
    people = bench_people(world, args.concepts)
    results = {}
    for kind in args.kinds or list(KIND_MODULES):
        k = args.k if args.k is not None else default_k(kind)
        r = causality(model, world, kind, people, k=k, sae_loader=sae_loader)
        results[kind] = {key: (round(v, 4) if isinstance(v, float) else v)
                         for key, v in r.to_dict().items() if key != "per_person"}
        if args.verbose_people:
            results[kind]["per_person"] = r.per_person
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title=f"signature causality on {len(people)} people of {args.model}")
    for col in ("kind", "k", "concept_drop", "random_drop", "collateral_drop", "s/person"):
        table.add_column(col, justify="right")
    for kind, r in results.items():
        table.add_row(kind, str(r["k"]), f"{r['concept_drop']:.3f}", f"{r['random_drop']:.3f}",
                      f"{r['collateral_drop']:.3f}", f"{r['seconds']:.1f}")
    _out().print(table)
    return 0


# ---- kif erase ---------------------------------------------------------------------------------

def _cmd_erase(args: argparse.Namespace) -> int:
    from kif.world import FactWorld

    world = FactWorld.generate(args.seed)
    for c in args.concept or []:
        world.person(c)  # an unknown person is refused with a clear message
    if args.forget_split:
        world.split(args.forget_split)
    return _err("erasure is not implemented yet: the operators land with the erasure issue")


# ---- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from kif import zoo
    from kif.world import SPLITS

    forget_splits = [s for s in SPLITS if s.startswith("forget")]
    p = argparse.ArgumentParser(prog="kif", description="Representation-level concept erasure: "
                                "find where a concept lives, remove it, prove it is gone.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what kif does")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="surface metrics of a model on the fact world")
    e.add_argument("--model", default=zoo.BASE, help="zoo name, local HF folder or hub name "
                   f"(default {zoo.BASE})")
    e.add_argument("--forget-split", default="forget10", choices=forget_splits)
    e.add_argument("--oracle", help="model to measure Forget Quality against, e.g. "
                   f"{zoo.oracle_name('forget10')}")
    e.add_argument("--seed", type=int, default=0, help="fact-world seed (default 0, the zoo's)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_cmd_eval)

    z = sub.add_parser("zoo", help="the embedded fact-world models")
    zs = z.add_subparsers(dest="zoo_command", required=True)
    zl = zs.add_parser("list", help="list the zoo's models")
    zl.add_argument("--json", action="store_true")
    zl.set_defaults(func=_cmd_zoo_list)
    zb = zs.add_parser("build", help="retrain the zoo from the world's seed")
    zb.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    zb.add_argument("--steps", type=int, help="training steps per model (default: the shipped recipe)")
    zb.add_argument("--out", help="folder to write into (default: the installed zoo)")
    zb.add_argument("--json", action="store_true")
    zb.set_defaults(func=_cmd_zoo_build)

    from kif.signatures import KIND_MODULES

    s = sub.add_parser("signatures", help="where a concept lives in a model")
    s.add_argument("--model", default=zoo.BASE)
    s.add_argument("--concept", required=True, metavar="PERSON")
    s.add_argument("--kind", required=True, choices=list(KIND_MODULES))
    s.add_argument("--out", required=True, help="folder for the signature and its plots")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_signatures)

    b = sub.add_parser("bench", help="benchmarks")
    bs = b.add_subparsers(dest="bench_command", required=True)
    bsig = bs.add_parser("signatures", help="is each signature kind causal?")
    bsig.add_argument("--model", default=zoo.BASE)
    bsig.add_argument("--concepts", type=int, default=10, help="people to test (default 10)")
    bsig.add_argument("--kinds", nargs="+", choices=list(KIND_MODULES))
    bsig.add_argument("--k", type=int, help="components ablated (default: per kind)")
    bsig.add_argument("--per-person", dest="verbose_people", action="store_true")
    bsig.add_argument("--seed", type=int, default=0)
    bsig.add_argument("--json", action="store_true")
    bsig.set_defaults(func=_cmd_bench_signatures)

    r = sub.add_parser("erase", help="erase a concept from a model")
    r.add_argument("--model", default=zoo.BASE)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--concept", action="append", metavar="PERSON", help="a person to erase")
    g.add_argument("--forget-split", choices=forget_splits)
    r.add_argument("--method", default="stamp")
    r.add_argument("--out", help="output folder")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_cmd_erase)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _EXPECTED_ERRORS as exc:
        return _err(str(exc))
    except KeyboardInterrupt:
        return _err("interrupted")


if __name__ == "__main__":
    sys.exit(main())
