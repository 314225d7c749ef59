"""Proof that a signature is causal (`kif bench signatures`).

For each person: extract the signature, ablate its top-k components and measure the drop of that
person's fact accuracy; ablate k random components of the same kind (same hooks) for the control;
and measure the accuracy change on every other known person (collateral). A signature is causal
when concept_drop >= 5 x random_drop and >= 0.5, with collateral_drop <= 0.02.
"""

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from kif import metrics
from kif.signatures.ablate import ablation_hooks, random_like
from kif.world import FactWorld, Person, world_concept


@dataclasses.dataclass(frozen=True)
class CausalityResult:
    kind: str
    k: int
    people: tuple[str, ...]
    concept_drop: float
    random_drop: float
    collateral_drop: float
    seconds: float  # mean extraction time per person
    per_person: tuple[dict, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _acc(model, probes, hooks=()) -> float:
    s = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes],
                              fwd_hooks=list(hooks))
    return float(np.mean(s.correct))


def bench_people(world: FactWorld, n: int, seed: int = 1234) -> list[Person]:
    """N people for the benchmark, drawn from the retain split with a seed different from the
    one development used (people of forget10 are the ones the notebooks look at)."""
    rng = np.random.default_rng(seed)
    pool = world.split("retain")
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def unit_speeds(model, world: FactWorld, people: Sequence[Person]) -> dict[str, float]:
    """The issue's per-unit speed figures, as medians over the people's facts (seconds):
    causal tracing of one prompt over every layer x token x the 3 kinds (resid, MLP, attention),
    and knowledge-neuron attribution of one fact (its training phrasings, 20 integrated-gradient
    steps). The first call of each is a warm-up and is not counted."""
    from kif.signatures.causal_trace import embedding_std, trace
    from kif.signatures.knowledge_neurons import attributions

    nu = 3 * embedding_std(model, [p.name for p in people])
    probes = world.person_probes(people, "train", [0])
    trace(model, probes[0].prompt, probes[0].subject, probes[0].answer, noise_scale=nu)
    t_trace = []
    for pr in probes:
        t0 = time.perf_counter()
        trace(model, pr.prompt, pr.subject, pr.answer, noise_scale=nu)
        t_trace.append(time.perf_counter() - t0)
    facts = {}
    for pr in world.person_probes(people, "train"):
        facts.setdefault((pr.subject, pr.relation), []).append(pr)
    t_kn = []
    for i, fact in enumerate(facts.values()):
        t0 = time.perf_counter()
        attributions(model, [p.prompt for p in fact], [p.answer for p in fact])
        if i:
            t_kn.append(time.perf_counter() - t0)
    return {"causal_trace_prompt_seconds": float(np.median(t_trace)),
            "causal_trace_prompts": len(t_trace),
            "knowledge_neurons_fact_seconds": float(np.median(t_kn)),
            "knowledge_neurons_facts": len(t_kn)}


def causality(model, world: FactWorld, kind: str, people: Sequence[Person], k: int,
              seed: int = 0, sae_loader=None, **settings) -> CausalityResult:
    from kif.signatures.registry import extract

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for person in people:
        concept = world_concept(world, person.name)
        t0 = time.perf_counter()
        sig = extract(model, concept, kind=kind, **settings).top(k)
        seconds = time.perf_counter() - t0
        sae = sae_loader(sig) if (sig.component == "feature" and sae_loader) else None
        own = world.person_probes([person], "train")
        others = world.person_probes([p for p in world.known() if p.name != person.name],
                                     "train", templates=[0])
        base_own, base_others = _acc(model, own), _acc(model, others)
        # SAE features are clamped to the value the extractor validated its selection with
        clamp = float(sig.settings.get("clamp", 50.0))
        hooks = ablation_hooks(sig, sae=sae, clamp=clamp)
        rand_hooks = ablation_hooks(random_like(sig, gen, sae=sae), sae=sae, clamp=clamp)
        rows.append({
            "person": person.name, "k": len(sig), "hooks": list(sig.hooks), "seconds": seconds,
            "concept_drop": base_own - _acc(model, own, hooks),
            "random_drop": base_own - _acc(model, own, rand_hooks),
            "collateral_drop": base_others - _acc(model, others, hooks),
        })
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    # `top(k)` keeps fewer than k components when a signature has fewer: report what was ablated
    k_used = min(r["k"] for r in rows) if rows else 0
    return CausalityResult(kind=kind, k=k_used, people=tuple(p.name for p in people),
                           concept_drop=mean("concept_drop"), random_drop=mean("random_drop"),
                           collateral_drop=mean("collateral_drop"), seconds=mean("seconds"),
                           per_person=tuple(rows))


def summary_row(rounded: dict, r: CausalityResult, top: int = 3) -> dict:
    """One kind's row of a results file: the rounded means, the range of components ablated
    (a signature may hold fewer than k) and where the components sit: the hooks most often
    chosen, with the number of people whose signature used each."""
    counts: dict[str, int] = {}
    for row in r.per_person:
        for hook in set(row["hooks"]):
            counts[hook] = counts.get(hook, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ks = [row["k"] for row in r.per_person]
    return {"kind": r.kind, **{k: v for k, v in rounded.items() if k not in ("kind", "people")},
            "k_range": f"{min(ks)}–{max(ks)}" if ks and min(ks) != max(ks) else str(r.k),
            "people": len(r.people), "hooks_used": len(counts),
            "top_hooks": ", ".join(f"{h} ({n})" for h, n in ranked[:top])}


def default_k(kind: str) -> int:
    """Components ablated by the benchmark: the kind module's `BENCH_K`, else 10."""
    import importlib

    from kif.signatures.registry import KIND_MODULES

    return int(getattr(importlib.import_module(KIND_MODULES[kind]), "BENCH_K", 10))


def sae_loader(sig):
    """The SAE a feature signature refers to."""
    from kif.signatures.sae_features import load_sae

    return load_sae(sig.sae)
