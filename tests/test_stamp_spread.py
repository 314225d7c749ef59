"""STAMP spread over several layers toward optimized residual targets (`kif.erasure.spread`).

The one-layer edit toward the mean refusal value leaves the Llama twin's answers to be rebuilt
by the layers it does not touch; the spread edit erases there while the twin's other people keep
their facts, the model comes back bit for bit (also when a solve fails half-way), and on GPT-2
the one-layer default is untouched by the refactor (its deltas are checked against the solver
directly)."""

import pytest
import torch

from kif import metrics, models, zoo
from kif.erasure import erase
from kif.erasure.core import ErasureError
from kif.erasure import spread
from kif.erasure.stamp import FORGET_WEIGHTS, StampConfig, stamp_delta
from kif.inplace import inplace_training
from kif.world import FactWorld


@pytest.fixture(scope="module")
def world():
    return FactWorld.generate(0)


@pytest.fixture(scope="module")
def twin():
    return models.load(zoo.LLAMA_BASE)


def _acc(model, probes) -> float:
    return float(metrics.score_answers(model, [p.prompt for p in probes],
                                       [p.answer for p in probes]).correct.mean())


def test_spread_edit_erases_on_the_twin_and_keeps_the_others(twin, world):
    person = world.split("forget01")[0]
    own = world.person_probes([person], "train")
    others = world.person_probes([p for p in world.known() if p.name != person.name][::12],
                                 "train", [0])
    assert _acc(twin, own) >= 0.9 and _acc(twin, others) >= 0.95
    before = models.weight_hash(twin)
    # the twin's default profile is `auto`: the optimized target over the attribution layer and
    # every layer after it, the forget weight calibrated on the twin
    e = erase(twin, person.name, method="stamp", world=world)
    assert models.weight_hash(twin) == before
    info = e.info
    assert e.settings["target"] == "optimized" and len(info["layers"]) > 1
    first = info["layers"][0]
    assert info["layers"] == list(range(first, min(first + e.settings["spread"], twin.cfg.n_layers)))
    assert set(e.deltas) == {f"blocks.{l}.mlp.W_out" for l in info["layers"]}
    # the calibration stops at the first weight of the grid that clears the bar
    tried = info["forget_weight_calibration"]
    assert [t["forget_weight"] for t in tried] == list(FORGET_WEIGHTS[:len(tried)])
    assert all(t["forget_acc"] > e.settings["max_forget_acc"] for t in tried[:-1])
    assert info["forget_weight"] == tried[-1]["forget_weight"]
    assert "forget_weight" in info["profile"]["chosen_on_the_model"]
    with e.apply(twin):
        assert _acc(twin, own) <= 0.1
        assert _acc(twin, others) >= 0.95
    assert models.weight_hash(twin) == before


def test_spread_edit_puts_the_model_back_when_a_solve_fails(twin, world):
    person = world.split("forget01")[0]
    prompts = [p.prompt for p in world.person_probes([person], "train")][:4]
    before = models.weight_hash(twin)
    grams = {l: torch.eye(twin.cfg.d_mlp, dtype=torch.float64) for l in range(2)}
    calls = []

    def solve(k_f, gap, gram):
        calls.append(gap.shape)
        if len(calls) == 2:  # the first layer is already edited in place by now
            raise RuntimeError("solver failed")
        return torch.ones(k_f.shape[1], gap.shape[1], dtype=torch.float64)

    with pytest.raises(RuntimeError, match="solver failed"):
        spread.spread_edit(twin, prompts, [0, 1], torch.zeros(len(prompts), twin.cfg.d_model),
                           grams, solve)
    assert len(calls) == 2 and models.weight_hash(twin) == before


def test_with_deltas_evaluates_on_the_edited_weights_and_restores(twin):
    w = twin.blocks[0].mlp.W_out
    before = models.weight_hash(twin)
    seen = spread.with_deltas(twin, {"blocks.0.mlp.W_out": torch.ones_like(w)},
                              lambda: float(w.detach().sum()))
    assert seen == pytest.approx(float(w.detach().sum()) + w.numel(), rel=1e-4)
    assert models.weight_hash(twin) == before


@pytest.mark.parametrize("config, message", [
    ({"target": "unknown", "layers": (1, 2)}, "needs target=optimized"),
    ({"target": "optimized", "layers": (1, 9)}, "outside the model's 4 layers"),
    ({"target": "sideways"}, "unknown STAMP target"),
    ({"target": "optimized", "spread": 0}, "spread must be at least 1"),
])
def test_bad_spread_settings_are_one_clear_error(twin, world, config, message):
    person = world.split("forget01")[0]
    with pytest.raises(ErasureError, match=message):
        erase(twin, person.name, method="stamp", world=world, config=config)


@pytest.mark.parametrize("name", ["fact-world", zoo.LLAMA_BASE])
def test_last_token_tail_is_the_full_forward(name, world):
    """The optimisation's one-token path (cached keys and values of the left-padded prompts)
    gives, row by row, the logits of the unpadded full-sequence forward with the change added at
    the last token, on learned positions (GPT-2) and on rotary ones with grouped-query attention
    (the twin), for prompts of different lengths in one batch."""
    model = models.load(name)
    probes = world.person_probes(world.known()[:40], "train")
    ids = metrics.encode_prompts(model, [p.prompt for p in probes])
    by_length = {len(i): i for i in ids}
    rows = [by_length[n] for n in sorted(by_length)][:6]
    assert len({len(r) for r in rows}) >= 3
    layer = 1
    h, tail = spread.last_token_tail(model, rows, layer)
    delta = torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = tail(h + delta)
    for j, row in enumerate(rows):
        def add(resid, hook):
            resid[:, -1] += delta[j]
            return resid
        tok = torch.tensor([row])
        with torch.no_grad():
            ref = model.run_with_hooks(tok, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", add)])
            full_h = model(tok, stop_at_layer=layer + 1)[0, -1]
        torch.testing.assert_close(h[j], full_h, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[j], ref[0, -1], atol=1e-3, rtol=1e-4)


def test_residual_targets_keep_row_order_across_lengths(world):
    """Prompts of different lengths share one padded batch; each row's delta is its own (rows
    are independent) and comes back in the caller's order."""
    model = models.load("fact-world")
    probes = world.person_probes(world.known()[:6], "train")
    ids = metrics.encode_prompts(model, [p.prompt for p in probes])
    assert len(set(map(len, ids))) > 1
    target = metrics.encode_answers(model, [" unknown"])[0][0]
    together = spread.residual_targets(model, ids, 2, target, steps=5, lr=0.5, decay=0.01).delta
    alone = torch.cat([spread.residual_targets(model, [i], 2, target, steps=5, lr=0.5,
                                               decay=0.01).delta for i in ids[::7]])
    torch.testing.assert_close(together[::7], alone, atol=1e-4, rtol=1e-4)


def test_residual_targets_stop_each_row_at_the_stopping_probability(world):
    """With `stop_prob`, a row stops at its first step where p(target) reaches it: its change is
    the one the row reaches alone in that many steps, and the rows that did not stop took every
    step and stay below the probability."""
    model = models.load("fact-world")
    probes = world.person_probes(world.known()[:3], "train", [0])
    ids = metrics.encode_prompts(model, [p.prompt for p in probes])
    target = metrics.encode_answers(model, [" unknown"])[0][0]
    got = spread.residual_targets(model, ids, 2, target, steps=12, lr=0.5, decay=0.01,
                                  stop_prob=0.5)
    stopped = got.prob >= 0.5
    assert 0 < int(stopped.sum()) and len(set(got.steps.tolist())) > 1  # rows stop at different steps
    assert (got.steps[~stopped] == 12).all()
    rows = stopped.nonzero()[:, 0].tolist()
    for i in rows[:4] + (~stopped).nonzero()[:, 0].tolist()[:2]:
        k = int(got.steps[i])
        alone = spread.residual_targets(model, [ids[i]], 2, target, steps=k, lr=0.5, decay=0.01)
        torch.testing.assert_close(got.delta[i], alone.delta[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.prob[i], alone.prob[0], atol=1e-4, rtol=1e-3)
        if stopped[i] and k:  # stopped at its first step past the probability, not later
            before = spread.residual_targets(model, [ids[i]], 2, target, steps=k - 1, lr=0.5,
                                             decay=0.01)
            assert float(before.prob[0]) < 0.5 <= float(got.prob[i])
    summary = got.summary(0.5)
    assert summary["rows_short"] == int((~stopped).sum()) and summary["steps_max"] <= 12


def test_spread_edit_equals_a_full_forward_for_every_layer(twin, world):
    """The loop's forwards start at the layer edited before (from the residual kept there): the
    edit equals the one from full forwards to every layer's keys and to the top residual."""
    from kif.erasure.keys import last_token_states
    from kif.erasure.stamp import _hook

    prompts = [p.prompt for p in world.person_probes(world.split("forget01")[:1], "train")]
    layers = [1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(len(prompts), twin.cfg.d_model, generator=gen, dtype=torch.float64)
    grams = {l: torch.eye(twin.cfg.d_mlp, dtype=torch.float64) for l in layers}
    config = StampConfig(forget_weight=4.0)

    def solve(k, t, g):
        return stamp_delta(k, t, g, config)
    got, _ = spread.spread_edit(twin, prompts, layers, deltas, grams, solve)

    tokens, lengths = metrics._padded(twin, metrics.encode_prompts(twin, prompts))
    rows = torch.arange(len(prompts))

    def top() -> torch.Tensor:
        with torch.no_grad():
            h = twin(tokens, stop_at_layer=layers[-1] + 1, padding_side="right")
        return h[rows, lengths - 1].double()
    z = top() + deltas
    ref = {}
    with inplace_training(twin, [f"blocks.{l}.mlp.W_out" for l in layers]), torch.no_grad():
        for j, l in enumerate(layers):
            k = last_token_states(twin, prompts, [_hook(l)[0]])[_hook(l)[0]]
            dw = solve(k, (z - top()) / (len(layers) - j), grams[l])
            twin.blocks[l].mlp.W_out.add_(dw.float())
            ref[f"blocks.{l}.mlp.W_out"] = dw
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-4)


def test_spread_settings_and_models_it_cannot_serve_are_refused(twin, world):
    """A stopping probability outside (0, 1), negative steps, opt_stop without the optimized
    target, and a hook where the loop resumes inside the model are one-line refusals."""
    from kif.erasure.stamp import StampConfig

    for bad in ({"opt_stop": 0.0}, {"opt_stop": 1.5}, {"opt_steps": -1}):
        with pytest.raises(ErasureError):
            StampConfig(**bad)
    person = world.split("forget01")[0].name
    with pytest.raises(ErasureError, match="needs target=optimized"):
        erase(twin, person, method="stamp", world=world, config={"opt_stop": 0.9},
              profile="fact-world")
    handle = twin.blocks[2].hook_resid_pre.register_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(ErasureError, match="hook on blocks.2.hook_resid_pre"):
            erase(twin, person, method="stamp", world=world,
                  config={"target": "optimized", "layers": (1, 2, 3), "forget_weight": 2.0})
    finally:
        handle.remove()
    # one rule (`metrics.kv_cache_unsupported`) for every shortcut through the key-value cache:
    # the spread edit refuses, before any forward, what cached generation and candidate scoring
    # route to the full forward
    from kif import metrics

    assert metrics.kv_cache_unsupported(twin) is None
    old = twin.cfg.positional_embedding_type
    twin.cfg.positional_embedding_type = "shortformer"
    try:
        assert "'shortformer'" in metrics.kv_cache_unsupported(twin)
        with pytest.raises(ErasureError, match="does not serve this model: 'shortformer'"):
            erase(twin, person, method="stamp", world=world,
                  config={"target": "optimized", "layers": (1, 2, 3), "forget_weight": 2.0})
    finally:
        twin.cfg.positional_embedding_type = old


def test_spilled_grams_give_the_same_edit_and_leave_no_file(twin, world, monkeypatch):
    # Grams over SPILL_BYTES wait on disk between solves (GPT-2 small's five are 360 MiB); the
    # edit is bit-identical to the one solved with them in memory, and the folder is removed
    from kif.erasure import stamp as st

    person = world.split("forget01")[0].name
    config = {"layers": (1, 2, 3), "target": "optimized", "forget_weight": 2.0}
    held = erase(twin, person, method="stamp", world=world, config=config)
    monkeypatch.setattr(st, "SPILL_BYTES", 0)
    spilled = erase(twin, person, method="stamp", world=world, config=config)
    assert spilled.info["grams_spilled"] and not held.info["grams_spilled"]
    assert set(spilled.deltas) == set(held.deltas)
    for name, d in held.deltas.items():
        s = spilled.deltas[name]
        for part in ("a", "b", "dense"):
            x, y = getattr(d, part), getattr(s, part)
            assert (x is None and y is None) or torch.equal(x, y)
    assert not list(st.cache_dir().glob(".grams.kif-*"))
    # a disk that refuses the write costs the memory, not the erasure: the same edit again
    def refuse(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", refuse)
    full = erase(twin, person, method="stamp", world=world, config=config)
    assert not full.info["grams_spilled"]
    for name, d in held.deltas.items():
        assert torch.equal(d.a, full.deltas[name].a) and torch.equal(d.b, full.deltas[name].b)
    assert not list(st.cache_dir().glob(".grams.kif-*"))
