"""Tests for the baseline erasure operators (kif.erasure.baselines) on the zoo model `fact-world`:
each one, erasing one person with a small budget, must make that person's facts fail while other
people's facts survive, return an erasure that re-applies to the same bits and removes bit-exactly,
and be a registered method. Plus the answer-token log-probabilities the training baselines
optimise, checked against `kif.metrics.score_answers`."""

import numpy as np
import pytest
import torch

import kif.models
from kif import metrics
from kif.erasure import methods
from kif.erasure.baselines import _answer_logprobs, _encode_qa, _qa_batch
from kif.erasure.registry import erase
from kif.models import weight_hash
from kif.world import FactWorld, world_concept

PERSON = "Miasmar Viahos"  # the first person of forget01
BASELINES = ("ga", "gradiff", "npo", "rmu", "sae-clamp", "neuron-ablate")


@pytest.fixture(scope="module")
def zoo():
    torch.set_num_threads(1)
    model = kif.models.load("fact-world")
    world = FactWorld.generate()
    concept = world_concept(world, PERSON)
    others = [p for p in world.split("retain") if p.name != PERSON][:12]
    probes = world.person_probes(others, "train", [0])
    return model, world, concept, probes, weight_hash(model)


def _acc(model, probes) -> float:
    s = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes])
    return float(np.mean(s.correct))


def _check(zoo, erasure, max_forget: float = 0.2):
    model, _, concept, others, base = zoo
    assert weight_hash(model) == base, "erase must leave its input model unchanged"
    assert _acc(model, concept.forget) == 1.0 and _acc(model, others) >= 0.95
    handle = erasure.apply(model)
    forget, kept = _acc(model, concept.forget), _acc(model, others)
    erased = weight_hash(model)
    handle.remove()
    assert forget <= max_forget, f"{erasure.method}: forget accuracy {forget}"
    assert kept >= 0.9, f"{erasure.method}: other people's accuracy {kept}"
    assert weight_hash(model) == base, "removing the erasure must restore the weights bit for bit"
    with erasure.apply(model):
        assert weight_hash(model) == erased, "re-applying must give the same bits"
    assert weight_hash(model) == base
    return forget, kept


def test_registered():
    ms = methods()
    for name in BASELINES:
        assert name in ms and ms[name].fn.__module__ == "kif.erasure.baselines"
    assert {ms[n].kind for n in BASELINES} == {"weights", "hooks"}


def test_answer_logprobs_match_metrics(zoo):
    """The training loss reads exactly the answer tokens that score_answers scores."""
    model, _, concept, others, _ = zoo
    probes = list(concept.forget[:3]) + list(others[:5])
    qa = _encode_qa(model, probes)
    tokens, mask = _qa_batch(model, qa, range(len(probes)))
    with torch.no_grad():
        seq_lp, tok_lp, correct = _answer_logprobs(model, tokens, mask)
    ref = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes])
    np.testing.assert_allclose(seq_lp.numpy(), ref.logprob, rtol=1e-4, atol=1e-4)
    assert mask.sum(1).tolist() == ref.n_tokens.tolist()
    assert tok_lp.shape[0] == int(ref.n_tokens.sum())
    assert correct.tolist() == ref.correct.tolist()


# small budgets and a larger learning rate than the defaults (tuned for forget10): one person
# goes in a few steps
@pytest.mark.parametrize("method,config", [
    ("ga", {"steps": 10, "check_every": 2, "lr": 1e-4}),
    ("gradiff", {"steps": 10, "check_every": 2, "lr": 1e-4, "batch_retain": 16}),
    ("npo", {"steps": 10, "check_every": 2, "lr": 1e-4, "batch_retain": 16}),
])
def test_likelihood_baselines(zoo, method, config):
    model, world, concept, _, _ = zoo
    e = erase(model, PERSON, method=method, config=config, world=world)
    assert e.method == method and e.kind == "weights" and not e.hooks
    info = e.info
    assert info["converged"] and info["steps"] <= config["steps"]
    assert info["step_budget"] == config["steps"] and info["lr"] > 0
    assert info["history"][-1]["forget_acc"] <= 0.05 and info["seconds"]["train"] > 0
    # full fine-tuning: every parameter that received a gradient moved; dense float32 deltas
    assert len(e.deltas) > 0.9 * len(dict(model.named_parameters()))
    assert all(d.dense is not None and d.dense.dtype == torch.float32 for d in e.deltas.values())
    # weights GPT-2's HF checkpoint has no place for stay untouched, so `kif erase --out` exports
    assert "unembed.b_U" not in e.deltas
    _check(zoo, e)


def test_rmu(zoo):
    model, world, _, _, _ = zoo
    e = erase(model, PERSON, method="rmu", config={"steps": 40, "check_every": 5, "batch_retain": 16},
              world=world)
    layer = e.settings["layer"]
    want = {f"blocks.{l}.mlp.{w}" for l in range(max(0, layer - 2), layer + 1)
            for w in ("W_out", "b_out")}
    assert set(e.deltas) <= want and any(n.endswith("W_out") for n in e.deltas)
    assert e.info["c"] > 0
    _check(zoo, e)


def test_neuron_ablate(zoo):
    model, world, _, _, _ = zoo
    e = erase(model, PERSON, method="neuron-ablate", config={"steps": 10}, world=world)
    n = 0
    for name, d in e.deltas.items():
        layer = int(name.split(".")[1])
        w = model.blocks[layer].mlp.W_out.detach()
        rows = d.dense.abs().sum(1) > 0
        n += int(rows.sum())
        assert name.endswith("mlp.W_out")
        assert torch.equal(d.dense[rows], -w[rows])  # exactly the neurons' output rows removed
    assert 0 < n == sum(e.info["n_neurons"].values())
    _check(zoo, e)


def test_sae_clamp(zoo):
    model, world, _, _, _ = zoo
    from kif.signatures.sae_features import SAELoadError, default_sae, shipped_hooks

    hooks = shipped_hooks("fact-world")
    try:
        for hook in hooks:
            default_sae(model, hook)
    except SAELoadError as err:
        pytest.skip(f"the shipped SAE does not load: {err}")
    # the extractor picks the shipped SAE whose features separate this person best (layer 2)
    e = erase(model, PERSON, method="sae-clamp", config={"top_n": 5}, world=world)
    assert e.kind == "hooks" and not e.deltas
    (op,) = e.hooks
    assert op.hook in hooks and op.op == "sae_clamp" and op.params["clamp"] > 0
    k = len(op.params["features"])
    assert op.tensors["W_enc"].shape == (model.cfg.d_model, k) and op.tensors["W_dec"].shape == (
        k, model.cfg.d_model)
    # a weak baseline, as in Farrell et al. 2024: 6 of the person's 30 facts survive its clamp
    _check(zoo, e, max_forget=0.3)
