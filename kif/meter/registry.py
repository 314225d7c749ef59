"""The registry of the meter's probes: CLI choices and `trace(probes=...)` come from here.

Each probe is a function `fn(audit) -> ProbeResult` in its own module under `kif.meter.probes`,
imported on first use. Order here is run order (cheap probes first, so a partial run is useful).
"""

import dataclasses
import importlib

from kif.errors import UnknownNameError


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    name: str
    module: str  # under kif.meter.probes
    function: str
    group: str  # "surface" | "latent" | "trace"
    description: str
    fast: bool = False  # in the "fast" set (surface + lenses)
    cost: float = 1.0
    """Relative run time, for dealing the probes to data-parallel ranks (`kif.distributed.deal`):
    roughly the CPU seconds of each probe in one audit of a 2-person forget split, the passes it
    shares with earlier probes counted with the first (a rank recomputes those)."""

    def load(self):
        return getattr(importlib.import_module(f"kif.meter.probes.{self.module}"), self.function)


_SPECS = [
    ProbeSpec("surface", "surface", "run_surface", "surface",
              "forget accuracy and probability, held-out phrasings; neighbours and shared facts",
              fast=True, cost=5.0),
    ProbeSpec("logit-lens", "lens", "run_logit_lens", "latent",
              "answer top-1 under the logit lens, final norm recomputed per layer", fast=True, cost=4.0),
    ProbeSpec("tuned-lens", "lens", "run_tuned_lens", "latent",
              "answer top-1 under a tuned lens trained on the base model", fast=True, cost=8.0),
    ProbeSpec("answer-rank", "lens", "run_answer_rank", "latent",
              "rank of the answer per layer (logit lens)", fast=True, cost=0.5),
    ProbeSpec("head-projection", "lens", "run_head_projection", "latent",
              "Patil et al. Head Projection attack (top-4 per layer)", fast=True, cost=0.5),
    ProbeSpec("probability-delta", "lens", "run_probability_delta", "latent",
              "Patil et al. Probability Delta attack (top/bottom-4 of layer differences)",
              fast=True, cost=0.5),
    ProbeSpec("rephrasing", "lens", "run_rephrasing", "latent",
              "Patil et al. rephrasing attack: 4 paraphrases x 5 samples", cost=1.5),
    ProbeSpec("linear-probe", "linear_probe", "run_base_probe", "latent",
              "linear probes trained on the base (retain people), applied to the erased model", cost=0.5),
    ProbeSpec("linear-probe-retrained", "linear_probe", "run_retrained_probe", "latent",
              "linear probes retrained on the erased model's retain people", cost=4.0),
    ProbeSpec("quantization", "quantization", "run_quantization", "latent",
              "round-to-nearest int8 per channel / int4 group 128, then the surface", cost=6.0),
    ProbeSpec("relearning", "relearning", "run_relearning", "latent",
              "<= 50 steps on half the forget facts, recovery on the other half", cost=20.0),
    ProbeSpec("signature-persistence", "signature", "run_signature", "trace",
              "Cohen's d of the concept's activation-signature direction", cost=3.0),
    ProbeSpec("sae-persistence", "signature", "run_sae", "trace",
              "firing of the concept's SAE features", cost=3.0),
    ProbeSpec("restoration", "restoration", "run_restoration", "latent",
              "add back the signature direction / SAE concept features, alpha in {1, 5, 10}", cost=1.0),
    ProbeSpec("steering", "restoration", "run_steering", "latent",
              "anonymized activation steering (Seyitoglu et al. 2024)", cost=7.0),
    ProbeSpec("uds", "uds", "run_uds", "latent",
              "unlearning depth: patch hidden states into the base, against the oracle", cost=1.0),
    ProbeSpec("downstream", "downstream", "run_downstream", "trace",
              "the base's residual after each block patched into the erased model: do its later "
              "blocks still decode the answers?", cost=1.0),
    ProbeSpec("membership", "membership", "run_membership", "trace",
              "Min-K%++ AUC forget vs holdout; PrivLeak against the oracle", cost=4.0),
    ProbeSpec("in-context", "in_context", "run_in_context", "latent",
              "the person's other facts in the prompt (not the answer)", cost=4.0),
    ProbeSpec("parametric", "parametric", "run_parametric", "trace",
              "concept-vector cosine and top-200 Jaccard; |dW| vs the quantization step", cost=2.0),
]

PROBES: dict[str, ProbeSpec] = {s.name: s for s in _SPECS}
"""Probe name -> spec, in run order."""

PROBE_SETS: dict[str, list[str]] = {
    "all": list(PROBES),
    "fast": [n for n, s in PROBES.items() if s.fast],
    "latent": [n for n, s in PROBES.items() if s.group == "latent"],
}
"""Names that stand for several probes."""


def resolve(names=None) -> list[str]:
    """Probe names (and set names) -> probe names in run order, surface always included (the
    verdict needs it)."""
    if names is None:
        names = ["all"]
    if isinstance(names, str):
        names = [names]
    chosen = {"surface"}
    for n in names:
        if n in PROBE_SETS:
            chosen.update(PROBE_SETS[n])
        elif n in PROBES:
            chosen.add(n)
        else:
            raise UnknownNameError(f"unknown probe {n!r} (choose from "
                                   f"{', '.join(list(PROBES) + list(PROBE_SETS))})")
    return [n for n in PROBES if n in chosen]
