"""`report.md`: the meter's report for a person, with a plain-language summary at the top.

The JSON report is for scripts; this is what an auditor reads first: the verdict in one
sentence, what it rests on, the concepts of each verdict, which probes applied and which did not
(and why), and then the numbers.
"""

from __future__ import annotations

from kif.meter.report import (FAMILIES, INTACT_SURFACE, MIN_FAMILIES, SUPPRESSED_LATENT,
                              TraceReport)

_MEANING = {
    "intact": "the model still gives the concept's erased answers (surface score above "
              f"{INTACT_SURFACE})",
    "suppressed": "the answers no longer come out, but latent probes of at least "
                  f"{MIN_FAMILIES} different families recover them from inside the model or by "
                  f"an attack (score at least {SUPPRESSED_LATENT} and above chance)",
    "deleted": "the answers no longer come out and no latent probe recovers them beyond what "
               "it reaches on people the model never saw",
}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _headline(r: TraceReport) -> list[str]:
    counts = {k: v for k, v in r.counts.items() if v}
    n = sum(counts.values())
    parts = ", ".join(f"{v} {k}" for k, v in counts.items())
    reference = ("the oracle (a model trained without these concepts)" if r.calibration == "oracle"
                 else "people the base model never saw")
    lines = [f"**Verdict: {r.verdict}.** Of {n} concept{'s' if n != 1 else ''}: {parts}. "
             f"The overall verdict is the weakest concept's: an erasure is as good as its worst "
             f"concept.", "",
             *[f"- *{v}*: {_MEANING[v]}." for v in counts],
             f"- `latent_trace_score` {_fmt(r.latent_trace_score)}: the strongest latent probe "
             "recovers this share of the erased answers, pooled over every fact (0: as a model "
             "that never knew them, 1: as the base).",
             f"- Scores are calibrated against {reference}."]
    return lines


def _strongest(r: TraceReport, k: int = 3) -> list[str]:
    ran = [p for p in r.probes.values() if p.group == "latent" and p.score is not None]
    latent = sorted(((p.score, p.name) for p in ran if p.score > 0), reverse=True)[:k]
    if not latent:
        return [f"- No latent probe recovers anything ({len(ran)} ran, every score 0)."
                ] if ran else []
    items = ", ".join(f"{n} {s:.2f} ({FAMILIES.get(n, n)})" for s, n in latent)
    return [f"- The strongest recoveries: {items}."]


def _applicability(r: TraceReport) -> list[str]:
    ran = [n for n, p in r.probes.items() if not p.skipped]
    lines = ["## Probes that applied and those that did not", "",
             f"Applied ({len(ran)}): {', '.join(ran) or 'none'}.", ""]
    skipped = {n: p.skipped for n, p in r.probes.items() if p.skipped}
    if skipped:
        lines += ["Not applied:", ""] + [f"- `{n}`: {why}" for n, why in skipped.items()]
    else:
        lines.append("Every requested probe applied.")
    return lines + [""]


def _concepts(r: TraceReport) -> list[str]:
    lines = ["## Concepts", "", "| concept | verdict | surface | latent | recovered by |",
             "| --- | --- | --- | --- | --- |"]
    order = {"intact": 0, "suppressed": 1, "deleted": 2}
    for name, c in sorted(r.concepts.items(), key=lambda kv: (order[kv[1].verdict], kv[0])):
        lines.append(f"| {name} | {c.verdict} | {_fmt(c.surface)} | {_fmt(c.latent)} | "
                     f"{', '.join(c.recovered_by) or '—'} |")
    return lines + [""]


def _probes(r: TraceReport) -> list[str]:
    lines = ["## Probes", "", "| probe | group | score | chance band | erased | base | ref0 | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in r.probes.items():
        v = p.values
        lines.append(f"| {name} | {p.group} | {'skipped' if p.skipped else _fmt(p.score)} | "
                     f"{_fmt(p.band)} | {_fmt(v.get('erased'))} | {_fmt(v.get('base'))} | "
                     f"{_fmt(v.get('ref0'))} | {p.seconds:.1f} |")
    return lines + [""]


def _constants(r: TraceReport) -> list[str]:
    c = r.settings.get("constants")
    if not c:
        return []
    k = c["fact_world_constants"]
    rl, v = k["relearning"], k["verdict"]
    where = ("this model, the fact world's 4-layer GPT-2" if c["tuned_on_this_model"] else
             "the fact world's 4-layer GPT-2 and carried over to this model as they are: a "
             "per-concept `suppressed` near the thresholds can be a false alarm here (`kif bench "
             "meter` measures the meter on a model that has oracles)")
    if "lr" in rl:
        attack = f"The relearning attack (lr {rl['lr']:g}, {rl['steps']} steps of {rl['batch']} rows)"
        chosen = ""
    else:  # the profile leaves the rate to the base (`kif.meter.config`)
        probe = r.probes.get("relearning")
        attack = f"The relearning attack's {rl['steps']} steps of {rl['batch']} rows"
        if probe is None:
            chosen = " The attack's rate is chosen on the base model; the attack did not run."
        elif probe.skipped:
            chosen = f" The relearning attack did not run: {probe.skipped}."
        elif probe.values.get("lr_chosen_on_the_model"):
            chosen = (" The attack's rate was chosen on this base model: the strongest that "
                      f"keeps its facts (lr {probe.values['lr']:g}).")
        else:
            chosen = f" The attack ran at lr {probe.values.get('lr'):g}."
    return ["## The meter's settings", "",
            f"{attack} and the verdict's thresholds (surface above {v['intact_surface']} is intact; "
            f"latent at least {v['suppressed_latent']} in {v['min_families']} families, above "
            f"a chance band at family-wise rate {v['family_alpha']}) were tuned on {where}.{chosen}",
            ""]


def markdown(r: TraceReport) -> str:
    """The report as markdown: the summary first, then applicability, concepts and probes."""
    title = f"# kif meter: {r.models.get('erased')} against {r.models.get('base')}"
    body = [title, "", *_headline(r), *_strongest(r), "", *_applicability(r), *_concepts(r),
            *_probes(r), *_constants(r), f"Audit time {r.seconds:.0f} s. The numbers behind every row are in "
            "report.json."]
    return "\n".join(body) + "\n"


__all__ = ["markdown"]
