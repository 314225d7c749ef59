"""`kif bench probes`: self-built probes (`kif.data.elicit`) measured against the fact world's
ground truth, which the elicitation never consults.

1. *Elicitation*: for each of `--people` people of the retain split, the probes kif builds from
   the model given only the name (one `elicit` per person, as `kif probes --concept NAME` runs):
   how many of the person's 6 facts a kept fact states (its answer ends with the fact's answer)
   and how many kept facts state none (false facts).
2. *Erasure by name*: for each of `--erase` people of forget10 (the people the forget10 oracle
   never saw), the concept built from the model alone (`kif.data.selfbuilt.build`, with
   neighbours and retain subjects the model brings up), erased with each of `--methods`, then
   scored by the world's own evaluation of that person (`kif.evaluation.evaluate`), against the
   base and the oracle's accuracy on the same person.

Targets (issue "Erase by name"): 4 of 6 facts for 9 of 10 people, no false fact for 9 of 10;
forget accuracy on the world's training and held-out phrasings <= the oracle's + 0.05, retain
>= base - 0.02.
"""

import time
from typing import Any, Sequence

FOUND_MIN, FOUND_PEOPLE, CLEAN_PEOPLE = 4, 9, 9  # per 10 people
SLACK_FORGET, SLACK_RETAIN = 0.05, 0.02


def elicitation_rows(model, world, people: Sequence, config=None) -> list[dict[str, Any]]:
    """Per person: facts found, false facts kept, rejected candidates, seconds."""
    from kif.data.elicit import elicit

    rows = []
    for p in people:
        t0 = time.perf_counter()
        el = elicit(model, [p.name], config)
        truth = {v.strip() for v in p.attributes.values()}
        kept = el.kept()
        stated = {t for t in truth for f in kept if f.answer.strip().endswith(t)}
        false = [f.answer for f in kept if not any(f.answer.strip().endswith(t) for t in truth)]
        rows.append({"person": p.name, "facts": len(truth), "found": len(stated),
                     "kept": len(kept), "false": false, "rejected": len(el.facts) - len(kept),
                     "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def _world_scores(model, world, name: str, oracle=None) -> dict[str, float]:
    from kif.evaluation import evaluate

    r = evaluate(model, world, [name], oracle=oracle).to_dict()
    keys = ("forget_acc", "forget_paraphrase_acc", "forget_novel_acc", "retain_acc",
            "retain_paraphrase_acc", "neighbour_acc", "shared_acc", "model_utility",
            "forget_quality")
    return {k: r[k] for k in keys if r.get(k) is not None}


def erasure_rows(model, oracle, world, people: Sequence, methods: Sequence[str],
                 progress: bool = False) -> list[dict[str, Any]]:
    """Per (person, method): the world's scores after an erasure from self-built probes, with
    the base's and the oracle's forget accuracy on that person."""
    from kif import metrics
    from kif.data.selfbuilt import build, summary
    from kif.erasure.registry import erase

    base_scores = {}
    rows = []
    for p in people:
        t0 = time.perf_counter()
        sb = build(model, [p.name])
        build_s = time.perf_counter() - t0
        base_scores[p.name] = _world_scores(model, world, p.name)
        probes = world.person_probes([p], "train") + world.person_probes([p], "heldout")
        oracle_acc = metrics.probe_accuracy(oracle, probes)
        s = summary(sb)
        for method in methods:
            t1 = time.perf_counter()
            e = erase(model, sb.concept, method=method, progress=progress)
            seconds = time.perf_counter() - t1
            with e.apply(model):
                after = _world_scores(model, world, p.name, oracle=oracle)
            rows.append(_erasure_row(p.name, method, s, base_scores[p.name], after, oracle_acc,
                                     build_s, seconds))
    return rows


def _erasure_row(name, method, s, base, after, oracle_acc, build_s, seconds) -> dict[str, Any]:
    forget = max(after["forget_acc"], after["forget_paraphrase_acc"])
    return {"person": name, "method": method, "facts_kept": len(s["targets"][name]["kept"]),
            "neighbours": s["neighbours"], "retain_subjects": len(s["retain"]),
            "refusal": s["refusal"], "oracle_forget_acc": oracle_acc, "base": base,
            "after": after, "build_seconds": round(build_s, 1), "erase_seconds": round(seconds, 1),
            "forget_met": forget <= oracle_acc + SLACK_FORGET,
            "retain_met": after["retain_acc"] >= base["retain_acc"] - SLACK_RETAIN}


def summarize(elicited: list[dict], erased: list[dict]) -> dict[str, Any]:
    n = len(elicited)
    found = sum(r["found"] >= FOUND_MIN for r in elicited)
    clean = sum(not r["false"] for r in elicited)
    out: dict[str, Any] = {
        "people": n, "people_with_4_of_6": found, "people_without_false_facts": clean,
        "facts_found_mean": sum(r["found"] for r in elicited) / max(n, 1),
        "elicitation_targets_met": (found >= FOUND_PEOPLE * n / 10
                                    and clean >= CLEAN_PEOPLE * n / 10)}
    for m in dict.fromkeys(r["method"] for r in erased):
        rs = [r for r in erased if r["method"] == m]
        out[m] = {"erasures": len(rs), "forget_met": sum(r["forget_met"] for r in rs),
                  "retain_met": sum(r["retain_met"] for r in rs),
                  "targets_met": all(r["forget_met"] and r["retain_met"] for r in rs)}
    return out


def run(model, oracle, world, n_people: int = 10, n_erase: int = 3,
        methods: Sequence[str] = ("stamp", "kif"), progress: bool = False) -> dict[str, Any]:
    elicited = elicitation_rows(model, world, world.split("retain")[:n_people])
    erased = erasure_rows(model, oracle, world, world.split("forget10")[:n_erase], methods,
                          progress) if n_erase else []
    return {"elicitation": elicited, "erasure": erased, "summary": summarize(elicited, erased)}
