"""The meter's own meta-evaluation: is `latent_trace_score` *faithful* (does it separate models
that know a concept from models that never knew it?) and *robust* (does it hold when the audited
model is quantized to int4 or relearns?). The protocol of the unlearning-depth-score paper and of
OpenUnlearning's metric meta-evaluation, run on the zoo, where "knows" and "never knew" are facts
of training rather than guesses.

    kif bench meter [--model fact-world] [--forget-split forget10] [--probes latent]
        [--lrs 2e-6 5e-6 2e-5] [--strengths 10 3] [--methods stamp npo] [--no-robustness]
        [--json] [--record results/FILE.json]

The population, every member audited against the base *without* an oracle (an auditor's
setting: calibrated on people no model saw):

* knows (the model was trained on the concepts' facts): the base; each smaller split's oracle on
  the split's people it *was* trained on (independent trainings that know them); and the base's
  suppressed variants, as the issue lists them: output-only suppression at two strengths,
  gradient ascent at several learning rates (each stopped at the oracle's forget accuracy),
  `stamp` and `npo`. Their label is the training history, so a method that truly deleted a fact
  would count against the meter; kif's own `kif` method is left out of the default pools for that
  reason (it is the method under test, not the meter; `--methods kif` adds it).
* never knew (never trained on the concepts' facts): the split's oracle; each smaller split's
  oracle on that split's people; and the *same treatments* applied to the split's oracle
  (output-only suppression, gradient ascent for as many steps as its base twin took, `stamp`,
  `npo`). A model that never knew a fact still never knew it after any of these, so the two
  pools differ in what the model knew, not in what was done to it.

Faithfulness: the ROC AUC of the pooled `latent_trace_score` (knows vs never knew), per member;
and per (member, concept), of each concept's banded latent score (the per-concept reading behind
the verdict, 0 when no latent probe clears its chance band).

Robustness (`robustness_q`, `robustness_r`; the unlearning-depth-score paper's symmetric forms):

* int4: every linear weight round-to-nearest int4, groups of 128 (the meter's quantization
  probe's scheme); Q = 1 - |after - before| / (|before| + |after|);
* relearning: the model fine-tuned on the forget facts of the first half of its concepts (the
  meter's relearning recipe: 30 steps of 16 rows at the meter's rate for the base, 1e-4 on the
  zoo's GPT-2 and `relearning.choose_lr` elsewhere) and audited on the other half, before and
  after; R = 1 - |d_model - d_oracle| / (|d_model| + |d_oracle|) with d = after - before and
  d_oracle the split's oracle's change under the same attack.

A change within `NOISE` (0.05, the meter's false-alarm level for a model that never knew the
concepts, `python -m kif.meter.bench`) counts as none, so two deltas that are both noise give
R = 1 rather than a ratio of noise. The AUCs of the attacked populations are reported beside
them: whether the separation survives the attack.

Every attack works on the member's own copy: the base member is a copy of the base, since the
attacks change a model in place and the audits read the base as their reference.
"""

import copy
import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from kif import metrics

NOISE = 0.05
"""Score changes at most this large count as none in Q and R: the meter's false-alarm level (the
bound its own bench sets for an oracle calibrated on unseen people)."""
STRENGTHS = (10.0, 3.0)
"""Output-only suppression strengths (logit units) in the knows pool."""
LRS = (2e-6, 5e-6, 2e-5)
"""Gradient-ascent learning rates in the knows pool."""
METHODS = ("stamp", "npo")
"""kif erasure methods whose base erasures join the knows pool (their oracle twins: never knew)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One audited model of the population: `label` is "knows" or "never-knew", `concepts` the
    people it is audited on, `treatment` what was done to `source` (a zoo model)."""

    name: str
    label: str
    source: str
    treatment: str
    concepts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MetaResult:
    """Rows (one per member) and the summary figures (`to_dict` for --json and results files)."""

    split: str
    probes: list[str]
    rows: list[dict]
    auc_model: float
    auc_concept: float
    robustness: dict
    seconds: float

    def to_dict(self) -> dict:
        """Every field (JSON-safe: NaN is None), plus `summary`: the headline figures as a
        one-row list (README tables)."""
        from kif.meter.report import _clean

        d = dataclasses.asdict(self)
        d["summary"] = [{"auc_model": self.auc_model, "auc_concept": self.auc_concept,
                         "knows": sum(r["label"] == "knows" for r in self.rows),
                         "never_knew": sum(r["label"] == "never-knew" for r in self.rows),
                         "robustness": self.robustness}]
        return _clean(d)


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """ROC AUC of scores `pos` (should be high) against `neg`: the probability that a random
    positive outscores a random negative, ties counting one half (Mann-Whitney)."""
    p = np.asarray(pos, dtype=float)[:, None]
    n = np.asarray(neg, dtype=float)[None, :]
    if p.size == 0 or n.size == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    return float((p > n).mean() + 0.5 * (p == n).mean())


def _change(before: float, after: float) -> float:
    d = after - before
    return 0.0 if abs(d) <= NOISE else d


def robustness_q(before: float, after: float) -> float:
    """1 - |after - before| / (|before| + |after|); 1 when the change is within `NOISE`."""
    d = _change(before, after)
    return 1.0 if d == 0.0 else 1.0 - abs(d) / (abs(before) + abs(after))


def robustness_r(d_model: float, d_oracle: float) -> float:
    """1 - |d_model - d_oracle| / (|d_model| + |d_oracle|) of two score changes (already
    floored by `NOISE`); 1 when both are none."""
    den = abs(d_model) + abs(d_oracle)
    return 1.0 if den == 0.0 else 1.0 - abs(d_model - d_oracle) / den


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


# --------------------------------------------------------------------------------------------
# The population
# --------------------------------------------------------------------------------------------


def _split_people(world, split: str) -> list[str]:
    return [p.name for p in world.split(split)]


def smaller_splits(world, split: str) -> list[str]:
    """The standard forget splits whose people are a proper subset of `split`'s."""
    from kif.world import SPLITS

    mine = set(_split_people(world, split))
    out = []
    for s in SPLITS:
        if s.startswith("forget") and s != split:
            theirs = set(_split_people(world, s))
            if theirs < mine:
                out.append(s)
    return out


def forget_probes(world, people: Sequence[str]):
    return world.person_probes([world.person(n) for n in people], "train")


def _erased_copy(src, split: str, method: str, world, profile: str):
    from kif import erasure

    e = erasure.erase(src, split, method=method, world=world, profile=profile)
    m = copy.deepcopy(src)
    e.apply(m)
    return m


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every treatment is given besides its source model and twin: the forget accuracy that
    gradient ascent on the base stops at (the oracle's) and the profile kif's methods run under."""

    target_acc: float
    profile: str


Treatment = Callable[[Any, "dict | None", Setting], tuple[Any, dict]]


def treatments(world, split: str, lrs: Sequence[float], methods: Sequence[str],
               strengths: Sequence[float]) -> list[tuple[str, Treatment]]:
    """(name, fn(source model, twin_info, setting) -> (model, info)) for every treatment;
    `twin_info` is the base twin's info when the source is the oracle (gradient ascent then runs
    as many steps as its base twin took), else None."""
    from kif.meter.bench import gradient_ascent, output_suppression

    people = _split_people(world, split)
    probes = forget_probes(world, people)
    answers = [p.answer for p in probes]
    out: list[tuple[str, Treatment]] = []

    def suppression(strength: float) -> Treatment:
        return lambda src, twin, setting: (output_suppression(copy.deepcopy(src), answers,
                                                              strength=strength), {})

    def ga(lr: float) -> Treatment:
        def run(src, twin, setting):
            if twin is None:  # the base: ascend until the forget accuracy is the oracle's
                m = gradient_ascent(src, probes, target_acc=setting.target_acc, lr=lr)
            else:             # the oracle twin: the same number of steps, whatever its accuracy
                steps = max(1, twin["steps"])
                m = gradient_ascent(src, probes, target_acc=-1.0, lr=lr, max_steps=steps,
                                    check_every=steps)
            return m, {"steps": m.kif_ga["steps"], "lr": lr}
        return run

    def method(name: str) -> Treatment:
        return lambda src, twin, setting: (_erased_copy(src, split, name, world,
                                                        setting.profile), {})

    out += [(f"output-suppression({s:g})", suppression(s)) for s in strengths]
    out += [(f"gradient-ascent({lr:g})", ga(lr)) for lr in lrs]
    out += [(m, method(m)) for m in methods]
    return out


# --------------------------------------------------------------------------------------------
# Audits
# --------------------------------------------------------------------------------------------


def _audit(base, model, concepts, probes, world) -> dict:
    from kif.meter import trace

    r = trace(base, model, list(concepts), probes=probes, world=world, progress=False)
    per = {c: (v.latent or 0.0) for c, v in r.concepts.items()}
    return {"verdict": r.verdict, "latent_trace_score": r.latent_trace_score or 0.0,
            "counts": r.counts, "per_concept": per, "scores": r.scores}


def _halves(concepts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(shown, measured): the first half of the concepts relearned, the rest audited; a single
    concept is both (then relearning measures its own facts coming back)."""
    k = max(1, len(concepts) // 2)
    shown, measured = list(concepts[:k]), list(concepts[k:])
    return shown, (measured or shown)


def _attacked(base, model, concepts, probes, world, lr: float) -> dict:
    """The int4 and relearning audits of one member (the model is restored after each)."""
    from kif.meter.probes.quantization import quantized
    from kif.meter.probes.relearning import relearned

    with quantized(model, "int4") as q:
        int4 = _audit(base, q, concepts, probes, world)
    shown, measured = _halves(concepts)
    before = _audit(base, model, measured, probes, world)
    with relearned(model, forget_probes(world, shown), lr=lr) as m:
        after = _audit(base, m, measured, probes, world)
    return {"int4": int4, "relearn_before": before, "relearn_after": after,
            "relearn_shown": shown, "relearn_measured": measured, "relearn_lr": lr}


def _relearning_lr(base, world, people, profile: str) -> float:
    """The rate of the robustness attack: the meter's own for `base` under `profile` (the fact
    world's, or `relearning.choose_lr` on the same sets as the meter's relearning probe on the
    split's people)."""
    from kif import profiles
    from kif.meter.audit import build_audit
    from kif.meter.config import MeterConfig
    from kif.meter.probes.relearning import attack_lr

    cfg = profiles.configure("meter", MeterConfig, profiles.get(profile), None)
    return attack_lr(build_audit(base, base, list(people), world=world, config=cfg))[0]


def run(base_name: str, split: str = "forget10", *, probes: Sequence[str] = ("latent",),
        lrs: Sequence[float] = LRS, methods: Sequence[str] = METHODS,
        strengths: Sequence[float] = STRENGTHS, robustness: bool = True, world=None,
        progress: bool = True) -> MetaResult:
    """Build the population on the zoo model `base_name` and its oracles, audit every member
    (and, with `robustness`, its int4 and relearned versions) and score the meter."""
    from kif import models, profiles, zoo
    from kif.errors import KifError
    from kif.world import FactWorld

    t0 = time.perf_counter()
    world = world or FactWorld.generate(0)
    people = tuple(_split_people(world, split))  # an unknown split fails before any load
    oracle_name = zoo.oracle_for(split, base_name)
    if oracle_name is None:
        raise KifError(f"the zoo has no oracle of {base_name!r} for {split!r}: the meta-evaluation "
                       f"needs a model that never knew the split's people")
    base = models.load(base_name)
    oracle = models.load(oracle_name)
    setting = Setting(target_acc=metrics.probe_accuracy(oracle, forget_probes(world, people)),
                      profile=profiles.default_for(base))
    lr = _relearning_lr(base, world, people, setting.profile) if robustness else None

    plan: list[tuple[Member, Callable]] = [
        # a copy: the attacks change the member in place, and every audit reads `base`
        (Member(base_name, "knows", base_name, "as trained", people),
         lambda: (copy.deepcopy(base), {})),
        (Member(oracle_name, "never-knew", oracle_name, "as trained", people),
         lambda: (oracle, {}))]
    for s in smaller_splits(world, split):
        o_name = zoo.oracle_for(s, base_name)
        if o_name is None:
            continue
        theirs = set(_split_people(world, s))
        o = models.load(o_name)
        plan.append((Member(f"{o_name} on {s}", "never-knew", o_name, "as trained",
                            tuple(p for p in people if p in theirs)), lambda o=o: (o, {})))
        plan.append((Member(f"{o_name} on the rest of {split}", "knows", o_name, "as trained",
                            tuple(p for p in people if p not in theirs)), lambda o=o: (o, {})))
    twins: dict[str, dict] = {}  # treatment -> its base member's info (read by the oracle's)
    for tname, fn in treatments(world, split, lrs, methods, strengths):
        def on_base(fn=fn, tname=tname):
            m, info = fn(base, None, setting)
            twins[tname] = info
            return m, info

        def on_oracle(fn=fn, tname=tname):
            return fn(oracle, twins.get(tname), setting)

        plan.append((Member(f"{base_name}+{tname}", "knows", base_name, tname, people), on_base))
        plan.append((Member(f"{oracle_name}+{tname}", "never-knew", oracle_name, tname, people),
                     on_oracle))

    rows, kept = [], []  # kept: every member stays alive (the meter's memo keys hold hook ids)
    bar = _progress(progress, len(plan))
    try:
        for member, build in plan:
            t = time.perf_counter()
            model, info = build()
            kept.append(model)
            row = {"member": member.name, "label": member.label, "source": member.source,
                   "treatment": member.treatment, "concepts": len(member.concepts),
                   "info": info, "forget_acc": metrics.probe_accuracy(model, forget_probes(
                       world, member.concepts)),
                   **_audit(base, model, member.concepts, probes, world)}
            if robustness:
                row["attacks"] = _attacked(base, model, member.concepts, probes, world, lr)
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=member.name[:40])
    finally:
        if bar is not None:
            bar[0].stop()
    return summarize(split, list(probes), rows, time.perf_counter() - t0)


def _progress(on: bool, total: int):
    if not on:
        return None
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    p = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                 TimeElapsedColumn(), console=Console(stderr=True))
    p.start()
    return p, p.add_task("meta-evaluation", total=total)


def _pools(rows, key: Callable[[dict], float]) -> tuple[list[float], list[float]]:
    pos = [key(r) for r in rows if r["label"] == "knows"]
    neg = [key(r) for r in rows if r["label"] == "never-knew"]
    return pos, neg


def summarize(split: str, probes: list[str], rows: list[dict], seconds: float) -> MetaResult:
    """The AUCs and the robustness figures of audited rows (`run`)."""
    auc_model = auc(*_pools(rows, lambda r: r["latent_trace_score"]))
    pos = [v for r in rows if r["label"] == "knows" for v in r["per_concept"].values()]
    neg = [v for r in rows if r["label"] == "never-knew" for v in r["per_concept"].values()]
    auc_concept = auc(pos, neg)
    rob: dict = {}
    if rows and "attacks" in rows[0]:
        rob = _robustness(rows)
    return MetaResult(split=split, probes=probes, rows=rows, auc_model=auc_model,
                      auc_concept=auc_concept, robustness=rob, seconds=round(seconds, 1))


def _robustness(rows: list[dict]) -> dict:
    oracle = next(r for r in rows if r["label"] == "never-knew" and r["treatment"] == "as trained")
    oa = oracle["attacks"]
    d_oracle = _change(oa["relearn_before"]["latent_trace_score"],
                       oa["relearn_after"]["latent_trace_score"])
    for r in rows:
        a = r["attacks"]
        before = r["latent_trace_score"]
        r["q"] = robustness_q(before, a["int4"]["latent_trace_score"])
        d = _change(a["relearn_before"]["latent_trace_score"],
                    a["relearn_after"]["latent_trace_score"])
        r["relearn_change"] = round(a["relearn_after"]["latent_trace_score"]
                                    - a["relearn_before"]["latent_trace_score"], 4)
        r["int4_change"] = round(a["int4"]["latent_trace_score"] - before, 4)
        r["r"] = robustness_r(d, d_oracle)
    # as in the paper: robustness over the unlearned models (the base's treated variants)
    unl = [r for r in rows if r["label"] == "knows" and r["treatment"] != "as trained"]
    q = float(np.mean([r["q"] for r in unl])) if unl else float("nan")
    rr = float(np.mean([r["r"] for r in unl])) if unl else float("nan")
    return {
        "oracle_relearn_change": round(oa["relearn_after"]["latent_trace_score"]
                                       - oa["relearn_before"]["latent_trace_score"], 4),
        "q_mean": q, "r_mean": rr, "hm": harmonic(q, rr),
        "max_abs_int4_change": max(abs(r["int4_change"]) for r in rows),
        "max_abs_relearn_change": max(abs(r["relearn_change"]) for r in rows),
        "auc_int4": auc(*_pools(rows, lambda r: r["attacks"]["int4"]["latent_trace_score"])),
        "auc_relearned": auc(*_pools(
            rows, lambda r: r["attacks"]["relearn_after"]["latent_trace_score"])),
        "unlearned_members": len(unl),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(r: MetaResult):
    """A rich table: one row per member."""
    from rich.table import Table

    t = Table(title=f"kif meter meta-evaluation on {r.split}: latent_trace_score by member")
    for col in ("member", "label", "concepts", "forget acc", "verdict", "score"):
        t.add_column(col, justify="left" if col in ("member", "label", "verdict") else "right")
    rob = bool(r.robustness)
    if rob:
        for col in ("int4 change", "relearn change", "Q", "R"):
            t.add_column(col, justify="right")
    for row in r.rows:
        cells = [row["member"], row["label"], str(row["concepts"]), _f(row["forget_acc"]),
                 row["verdict"], _f(row["latent_trace_score"])]
        if rob:
            cells += [f"{row['int4_change']:+.3f}", f"{row['relearn_change']:+.3f}",
                      _f(row["q"]), _f(row["r"])]
        t.add_row(*cells)
    return t


def headline(r: MetaResult) -> str:
    """One paragraph: the AUCs against the target and the robustness figures."""
    knows = sum(x["label"] == "knows" for x in r.rows)
    out = (f"faithfulness: AUC {r.auc_model:.3f} over {knows} models that know and "
           f"{len(r.rows) - knows} that never knew ({'meets' if r.auc_model >= 0.95 else 'misses'}"
           f" the 0.95 target); per (model, concept) AUC {r.auc_concept:.3f}")
    b = r.robustness
    if b:
        out += (f"\nrobustness over {b['unlearned_members']} unlearned models: Q (int4) "
                f"{b['q_mean']:.3f}, R (relearning) {b['r_mean']:.3f}, harmonic mean "
                f"{b['hm']:.3f}; largest score change under int4 {b['max_abs_int4_change']:.3f}, "
                f"under relearning {b['max_abs_relearn_change']:.3f} (the oracle's "
                f"{b['oracle_relearn_change']:+.3f}); AUC after int4 {b['auc_int4']:.3f}, after "
                f"relearning {b['auc_relearned']:.3f}")
    return out
