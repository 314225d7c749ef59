"""kif.evaluation on the shipped base model: the ROUGE shortcut is exact, hooks are honoured."""

import numpy as np
import pytest
import torch

from kif import metrics, models
from kif.evaluation import _utility_part, truth_ratios
from kif.world import FactWorld


@pytest.fixture(scope="module")
def world():
    return FactWorld.generate(0)


@pytest.fixture(scope="module")
def base():
    return models.load("fact-world")


def _shift_hook(scale: float, d_model: int = 256):
    """A deterministic corruption (the same fixed vector added at every position), so that
    scoring and generation see the same model."""
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(0))

    def hook(resid, hook):
        return resid + scale * v

    return [("blocks.1.hook_resid_post", hook)]


SCALE = 2.0


def test_rouge_shortcut_equals_generating_every_row(world, base):
    probes = world.person_probes(world.split("retain")[:12], "heldout", [0])
    hooks = _shift_hook(SCALE)  # breaks some answers but not all
    part = _utility_part(base, world, probes, hooks)
    s = metrics.score_answers(base, [p.prompt for p in probes], [p.answer for p in probes],
                              fwd_hooks=hooks)
    assert 0 < s.correct.sum() < len(probes), "the noise must break some answers, not all"
    n_ans = max(len(base.tokenizer(p.answer)["input_ids"]) for p in probes)
    gens = metrics.greedy_generate(base, [p.prompt for p in probes], n_ans + 1, fwd_hooks=hooks)
    brute = metrics.rouge_l_recall_many([g.split(".")[0] for g in gens], [p.answer for p in probes])
    assert np.all(brute[s.correct] == 1.0)
    assert part["rouge_l"] == pytest.approx(float(np.mean(brute)), abs=1e-12)


def test_truth_ratio_small_for_the_base_and_hooks_change_it(world, base):
    probes = world.person_probes(world.split("forget10")[:5], "heldout", [0])
    r = truth_ratios(base, world, probes)
    assert np.median(r) < 0.05  # the base prefers the truth over every perturbed answer
    r_hooked = truth_ratios(base, world, probes, fwd_hooks=_shift_hook(50.0))
    assert np.median(r_hooked) > np.median(r)
