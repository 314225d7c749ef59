"""The meter's results: one `ProbeResult` per probe, a `ConceptVerdict` per concept and the
`TraceReport` that holds them, with the verdict logic (frozen dataclasses, JSON out).

Verdicts (`intact` / `suppressed` / `deleted`):

* per concept: ``intact`` if the surface probe's score is above `INTACT_SURFACE` (0.5: the
  facts are still answered more like the base than like a model that never knew them);
  otherwise ``suppressed`` if latent probes of at least `MIN_FAMILIES` (2) different families
  (`FAMILIES`: lens, linear probe, prompt attack, weight attack, restoration, depth) score the
  concept at least `SUPPRESSED_LATENT` (0.2) *and* above their chance band
  (`kif.meter.calibrate`: what people the erased model never saw reach by chance,
  Bonferroni-corrected over every (concept, latent probe) pair); otherwise ``deleted``. Why two
  families: a concept has 6 facts, and on the fact world the oracle (which never saw the forget10
  people) still had one concept over its band on one probe in each of two readers (a retrained
  linear probe 0.78 for one person, the tuned lens 0.32 for another: its favourite guesses
  happened to be their answers), never two families at once; a real suppression is read by
  every family that can see it (the output-only suppression: lens and linear probes, 7 probes).
  A probe without reference people's rows has no band and counts through its pooled score only.
* overall: the weakest concept decides (an erasure is as good as its worst concept):
  ``intact`` if any concept is intact or the pooled surface score is above 0.5, else
  ``suppressed`` if any concept is suppressed or the pooled `latent_trace_score` is at least
  0.2, else ``deleted``. The counts are reported.

Probe groups: ``surface`` (the answers the model gives), ``latent`` (probes that *recover* the
answer from inside the model or by an attack: lenses, linear probes, restoration, quantization,
relearning, in-context re-introduction, UDS, paraphrases), ``trace`` (diagnostics that show a
remnant without recovering the answer: signature persistence, parametric traces, membership
inference). Only ``latent`` probes count toward `suppressed` and `latent_trace_score`.

`latent_trace_score` is the *largest* pooled latent score: the recovery achieved by the strongest
latent probe on all concepts' facts together. The maximum, not a mean, because one probe that
recovers the facts is enough to show they were not deleted, and each attack is blind to some
erasures (quantization and relearning cannot undo a hook on the output; a lens cannot see through
an edit of every layer), so a mean would dilute a real recovery by the probes that happen not to
apply. Pooled over all facts (120 on forget10), it is stable: the forget10 oracle, calibrated
against the base on unseen people, scores at most 0.048 on every latent probe; the output-only
suppression scores 1.0 and a gradient-ascent model 0.96 (`python -m kif.meter.bench`).
"""

import dataclasses
import json
import math
from typing import Any

from kif.meter.calibrate import Scored, chance_band

INTACT_SURFACE = 0.5
SUPPRESSED_LATENT = 0.2
MIN_FAMILIES = 2
FAMILIES = {
    "logit-lens": "lens", "tuned-lens": "lens", "answer-rank": "lens",
    "head-projection": "lens", "probability-delta": "lens",
    "linear-probe": "linear probe", "linear-probe-retrained": "linear probe",
    "rephrasing": "prompt attack", "in-context": "prompt attack", "steering": "prompt attack",
    "quantization": "weight attack", "relearning": "weight attack",
    "restoration": "restoration", "uds": "depth",
}
"""Latent probe -> family: probes of one family read the same channel (the lens-based ones all
read the residual stream through the unembedding), so their chance excursions coincide."""
VERDICTS = ("intact", "suppressed", "deleted")
GROUPS = ("surface", "latent", "trace")


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become None, tuples lists, numpy scalars floats."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, TypeError):
            return str(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One probe's result.

    `score` in [0, 1] (0 = as a model that never knew, 1 = as the base; None: not applicable or
    no signal), `values` the raw measurements behind it (x for the erased model, the base and
    ref0, plus probe-specific numbers), `per_concept` the same score on each concept's facts,
    `curves` per-layer values where the probe has them, `chance` the mean and standard deviation
    of unseen people's unclipped scores and `band` the chance band derived from it (set by
    `TraceReport.build`), `reference` where ref0 came from, `skipped` why the probe did not run.
    """

    name: str
    group: str
    score: float | None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_concept: dict[str, float | None] = dataclasses.field(default_factory=dict)
    curves: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    chance: tuple[float, float] | None = None
    band: float | None = None
    reference: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None

    @staticmethod
    def from_scored(name: str, group: str, s: Scored, reference: str, *,
                    values: dict[str, Any] | None = None, curves: dict | None = None,
                    info: dict[str, Any] | None = None) -> "ProbeResult":
        v = s.values()
        if s.layers is not None:
            v["layers"] = list(s.layers)
        v.update(values or {})
        c = dict(s.curves or {})
        if s.layer_scores is not None:
            c["score"] = [float("nan") if x is None else x for x in s.layer_scores]
        c.update(curves or {})
        return ProbeResult(name=name, group=group, score=s.score, values=v,
                           per_concept=dict(s.per_concept), curves=c, chance=s.chance,
                           reference=reference, info=dict(info or {}))

    @staticmethod
    def skip(name: str, group: str, reason: str) -> "ProbeResult":
        return ProbeResult(name=name, group=group, score=None, skipped=reason)

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ProbeResult":
        """A result from `dataclasses.asdict` sent through JSON (its tuple `chance` a list)."""
        chance = d.get("chance")
        return ProbeResult(**{**d, "chance": tuple(chance) if chance is not None else None})


@dataclasses.dataclass(frozen=True)
class ConceptVerdict:
    concept: str
    verdict: str
    surface: float | None
    latent: float | None  # the largest latent score that counts (clears its band)
    recovered_by: tuple[str, ...]  # latent probes above their band and >= SUPPRESSED_LATENT
    scores: dict[str, float | None]

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))


def concept_verdict(concept: str, probes: dict[str, ProbeResult]) -> ConceptVerdict:
    scores = {n: p.per_concept.get(concept) for n, p in probes.items() if p.skipped is None}
    surface = probes["surface"].per_concept.get(concept) if "surface" in probes else None
    counted = {}
    for n, p in probes.items():
        s = scores.get(n)
        if p.group != "latent" or s is None or p.band is None:
            continue
        if s <= p.band:
            continue  # within what people who never were in training reach by chance
        counted[n] = s
    latent = max(counted.values()) if counted else None
    recovered = tuple(n for n, s in counted.items() if s >= SUPPRESSED_LATENT)
    families = {FAMILIES.get(n, n) for n in recovered}
    if surface is not None and surface > INTACT_SURFACE:
        verdict = "intact"
    elif len(families) >= MIN_FAMILIES:
        verdict = "suppressed"
    else:
        verdict = "deleted"
    return ConceptVerdict(concept=concept, verdict=verdict, surface=surface, latent=latent,
                          recovered_by=recovered, scores=scores)


def latent_trace_score(probes: dict[str, ProbeResult]) -> float | None:
    """The largest pooled score of the latent probes (module docstring)."""
    s = [p.score for p in probes.values() if p.group == "latent" and p.score is not None]
    return max(s) if s else None


def overall_verdict(concepts: dict[str, ConceptVerdict], latent: float | None,
                    surface: float | None) -> str:
    vs = [c.verdict for c in concepts.values()]
    if "intact" in vs or (surface is not None and surface > INTACT_SURFACE):
        return "intact"
    if "suppressed" in vs or (latent is not None and latent >= SUPPRESSED_LATENT):
        return "suppressed"
    return "deleted"


@dataclasses.dataclass(frozen=True)
class TraceReport:
    """The latent-trace meter's report (see the module docstring for the verdict logic)."""

    verdict: str
    latent_trace_score: float | None
    probes: dict[str, ProbeResult]
    concepts: dict[str, ConceptVerdict]
    calibration: str  # "oracle" or "unseen" (the base model on people it never saw)
    models: dict[str, str | None]
    hashes: dict[str, str | None]
    seconds: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def scores(self) -> dict[str, float | None]:
        """Probe name -> pooled score (None: skipped or no signal)."""
        return {n: p.score for n, p in self.probes.items()}

    @property
    def counts(self) -> dict[str, int]:
        return {v: sum(c.verdict == v for c in self.concepts.values()) for v in VERDICTS}

    def to_dict(self) -> dict:
        return _clean({
            "verdict": self.verdict, "latent_trace_score": self.latent_trace_score,
            "probes": self.scores, "counts": self.counts, "calibration": self.calibration,
            "models": self.models, "hashes": self.hashes, "seconds": self.seconds,
            "settings": self.settings, "timings": self.timings,
            "concepts": {k: c.to_dict() for k, c in self.concepts.items()},
            "probe_results": {k: p.to_dict() for k, p in self.probes.items()},
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def build(probes: dict[str, ProbeResult], concept_names: list[str], **fields
              ) -> "TraceReport":
        n_latent = sum(p.group == "latent" and p.chance is not None for p in probes.values())
        n_tests = max(1, n_latent * len(concept_names))
        probes = {n: dataclasses.replace(p, band=chance_band(p.chance, n_tests))
                  for n, p in probes.items()}
        concepts = {c: concept_verdict(c, probes) for c in concept_names}
        lts = latent_trace_score(probes)
        surface = probes["surface"].score if "surface" in probes else None
        return TraceReport(verdict=overall_verdict(concepts, lts, surface),
                           latent_trace_score=lts, probes=probes, concepts=concepts, **fields)
