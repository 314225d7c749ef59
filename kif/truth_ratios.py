"""TOFU's truth ratio (Maini et al. 2024): how much a model prefers a question's true answer to
wrong answers of the same kind. The wrong answers come from the data: a probe's own distractors,
else its relation's answers in the concept (or the fact world) the probes belong to.
"""

import random
from typing import Sequence

import numpy as np
from transformer_lens import HookedTransformer

from kif import metrics
from kif.data.probe import Probe
from kif.errors import KifError

N_PERTURBED = 5


def truth_ratio_candidates(source, probes: Sequence[Probe], seed: int) -> list[list[str]]:
    """For each probe: its true answer, then N_PERTURBED wrong answers: the probe's own
    distractors (TOFU's perturbed answers) where it has them, else drawn from the answers
    `source.answer_choices(relation)` gives (a `Concept`, or the fact world)."""
    rng = random.Random(seed)
    out: list[list[str]] = []
    for pr in probes:
        wrong = [a for a in (pr.distractors or source.answer_choices(pr.relation)) if a != pr.answer]
        if len(wrong) < N_PERTURBED:
            raise KifError(f"truth ratios need {N_PERTURBED} wrong answers per question; "
                           f"{pr.prompt[:60]!r} has {len(wrong)} (give 'distractors')")
        out.append([pr.answer, *(wrong[:N_PERTURBED] if pr.distractors
                                 else rng.sample(wrong, N_PERTURBED))])
    return out


def truth_ratios(model: HookedTransformer, source, probes: Sequence[Probe],
                 fwd_hooks=(), seed: int = 0) -> np.ndarray:
    """TOFU truth ratio per probe: geometric mean P(perturbed) / P(true), P length-normalised."""
    return truth_ratios_and_correct(model, source, probes, fwd_hooks, seed)[0]


def truth_ratios_and_correct(model: HookedTransformer, source, probes: Sequence[Probe],
                             fwd_hooks=(), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`truth_ratios` and, from the same batched pass, whether each probe's own answer is the
    model's greedy one (its accuracy, as `metrics.score_answers(...).correct`)."""
    # each question once, its six answers on top of its cached keys and values
    s = metrics.score_candidates(model, [p.prompt for p in probes],
                                 truth_ratio_candidates(source, probes, seed), fwd_hooks=fwd_hooks)
    prob = np.asarray(s.prob, dtype=np.float64).reshape(len(probes), 1 + N_PERTURBED)
    correct = np.asarray(s.correct, dtype=bool).reshape(len(probes), 1 + N_PERTURBED)[:, 0]
    return np.asarray(metrics.truth_ratio(prob[:, 0], prob[:, 1:]), dtype=np.float64), correct


__all__ = ["N_PERTURBED", "truth_ratio_candidates", "truth_ratios", "truth_ratios_and_correct"]
