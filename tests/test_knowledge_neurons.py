"""Tests for kif.signatures.knowledge_neurons (Dai et al. 2022): the batched integrated gradients
against an unbatched per-step loop, IG completeness, and a hand-built model with planted
knowledge neurons that the extractor must find, rank first and make causal."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from kif import metrics
from kif.concepts import Concept
from kif.signatures.registry import extract
from kif.signatures.ablate import ablation_hooks, random_like
from kif.signatures.base import Signature
from kif.signatures import knowledge_neurons as kn
from kif.signatures.knowledge_neurons import attributions, fact_neurons, relative
from kif.data.probe import Probe

SUBJECTS = ["Talia", "Orrin", "Bex", "Cato"]
CUES = ["of", "by"]  # two relations: the prompt's last word says which one is asked
ANSWERS = [f"a{i}" for i in range(len(SUBJECTS) * len(CUES))]  # answer of (s, r): a{2s+r}
FILLER = [f"w{i}" for i in range(16)]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
VOCAB = SPECIAL + SUBJECTS + CUES + ANSWERS + FILLER
TEMPLATES = [  # five phrasings per fact; the subject sits at different depths
    "{s} w1 {c}",
    "w2 w3 {s} w4 {c}",
    "w5 {s} w6 w7 w8 {c}",
    "w9 w10 w11 {s} {c}",
    "w12 {s} w13 w14 {c}",
]
D_MODEL, D_MLP = 32, 64
GEN_NEURON = 63  # a neuron that fires on every prompt and helps every answer


def _planted(s: int, r: int) -> int:
    return 5 + 2 * s + r  # the knowledge neuron of fact (s, r), layer 0


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)  # TransformerLens only accepts a reloaded tokenizer
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _random_model(folder, seed: int = 0, **cfg_kwargs) -> HookedTransformer:
    """2 layers with LayerNorm and GELU, large random weights (for the IG checks)."""
    tok = _tokenizer(folder)
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=16, d_mlp=D_MLP,
                                  n_ctx=32, d_vocab=len(tok), act_fn="gelu",
                                  normalization_type="LN", seed=seed, device="cpu", **cfg_kwargs)
    model = HookedTransformer(cfg, tokenizer=tok)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return model.eval()


def _fact_model(folder) -> HookedTransformer:
    """A 2-layer model whose facts are stored by hand in layer-0 neurons.

    Residual dims: 0 = constant (every token), 1 = "is a subject", 2-5 = subject identity,
    6-7 = relation cue, 8-15 = answer read-out, 16-31 = filler noise. Layer-0 head 0 attends from
    every position to the subject token and copies its identity (dims 2-5); neuron `_planted(s, r)`
    fires only when subject s and cue r meet at the last token and writes answer a{2s+r}.
    `GEN_NEURON` always fires and raises every answer a little. Everything else is small random
    noise, so that every neuron gets some attribution.
    """
    tok = _tokenizer(folder)
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=16, d_mlp=D_MLP,
                                  n_ctx=32, d_vocab=len(tok), act_fn="relu",
                                  normalization_type=None, seed=0, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tok)
    gen = torch.Generator().manual_seed(1)
    e = torch.eye(D_MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.W_pos.zero_()
        W_E = torch.zeros(len(tok), D_MODEL)
        W_E[:, 16:] = torch.randn(len(tok), 16, generator=gen) * 0.3
        W_E[:, 0] = 1.0
        for s, name in enumerate(SUBJECTS):
            W_E[VOCAB.index(name), 1] = 1.0
            W_E[VOCAB.index(name), 2 + s] = 1.0
        for r, cue in enumerate(CUES):
            W_E[VOCAB.index(cue), 6 + r] = 1.0
        model.embed.W_E.copy_(W_E)
        b0 = model.blocks[0]
        b0.attn.W_Q.zero_(), b0.attn.W_K.zero_(), b0.attn.W_V.zero_(), b0.attn.W_O.zero_()
        b0.attn.W_Q[0, 0, 0] = 6.0  # query: the constant dim
        b0.attn.W_K[0, 1, 0] = 6.0  # key: "is a subject" -> score 36 / 4 at the subject
        for s in range(len(SUBJECTS)):
            b0.attn.W_V[0, 2 + s, s] = 1.0
            b0.attn.W_O[0, s, 2 + s] = 1.0
        b0.attn.b_O.zero_()
        W_U = torch.zeros(D_MODEL, len(tok))
        W_U[16:] = torch.randn(16, len(tok), generator=gen) * 0.1
        for i, a in enumerate(ANSWERS):
            W_U[:, VOCAB.index(a)] = e[8 + i]
        model.unembed.W_U.copy_(W_U)
        model.unembed.b_U.zero_()
        mlp = b0.mlp
        for s in range(len(SUBJECTS)):
            for r in range(len(CUES)):
                j = _planted(s, r)
                mlp.W_in[:, j] = 4.0 * (e[2 + s] + e[6 + r])
                mlp.b_in[j] = -6.0  # fires (at 2) only when both are present
                mlp.W_out[j] = 6.0 * e[8 + 2 * s + r]
        mlp.W_in[:, GEN_NEURON] = 0.0
        mlp.b_in[GEN_NEURON] = 1.0
        mlp.W_out[GEN_NEURON] = 2.0 * e[8:16].sum(0)
    return model.eval()


def _probes(s: int) -> list[Probe]:
    return [Probe(prompt=t.format(s=SUBJECTS[s], c=CUES[r]), answer=" " + ANSWERS[2 * s + r],
                  subject=SUBJECTS[s], relation=CUES[r], phrasing="train", template=i,
                  kind="person")
            for r in range(len(CUES)) for i, t in enumerate(TEMPLATES)]


def _concept(s: int) -> Concept:
    others = [p for o in range(len(SUBJECTS)) if o != s for p in _probes(o)]
    return Concept(name=SUBJECTS[s], forget=tuple(_probes(s)), paraphrase=(), neighbour=(),
                   shared=(), retain=tuple(others))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> HookedTransformer:
    torch.set_num_threads(1)
    return _random_model(tmp_path_factory.mktemp("tok_r"))


@pytest.fixture(scope="module")
def fact_model(tmp_path_factory) -> HookedTransformer:
    torch.set_num_threads(1)
    return _fact_model(tmp_path_factory.mktemp("tok_f"))


def _p_answer(model, tokens, target, layer, replace) -> torch.Tensor:
    def hook(act, hook):
        return replace(act)

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", hook)])
    return torch.softmax(logits[0, -1].double(), -1)[target]


def _reference_ig(model, prompt: str, answer: str, layer: int, steps: int, all_pos: bool):
    """Unbatched Dai et al. Eq. 3-4: one forward + backward per step, on the full model."""
    tokens = model.to_tokens(prompt)
    target = model.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    _, cache = model.run_with_cache(tokens)
    act = cache[f"blocks.{layer}.mlp.hook_post"][0].detach()
    wbar = act if all_pos else act[-1]
    total = torch.zeros_like(wbar)
    for k in range(1, steps + 1):
        x = (k / steps * wbar).clone().requires_grad_(True)

        def replace(a, x=x):
            if all_pos:
                return x[None]
            a = a.clone()
            a[0, -1] = x
            return a

        p = _p_answer(model, tokens, target, layer, replace)
        total += torch.autograd.grad(p, x)[0]
    attr = wbar * total / steps
    return attr.sum(0) if all_pos else attr


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_batched_attributions_equal_unbatched_integrated_gradients(random_model, positions):
    prompts = ["Talia w1 of", "w2 w3 w4 Orrin w5 w6 by", "w7 Bex of"]
    answers = [" a0", " a3 a1", " w9"]
    steps = 8
    got = attributions(random_model, prompts, answers, steps=steps, positions=positions,
                       max_rows=2 * steps)  # two batches, padded rows in each
    assert got.shape == (3, 2, D_MLP) and got.dtype == torch.float32
    for i, (p, a) in enumerate(zip(prompts, answers)):
        for layer in range(2):
            ref = _reference_ig(random_model, p, a, layer, steps, positions == "all")
            torch.testing.assert_close(got[i, layer], ref.float(), atol=2e-6, rtol=1e-4)
    one = attributions(random_model, prompts[1:2], answers[1:2], steps=steps, layers=[-1],
                       positions=positions)
    torch.testing.assert_close(one[0, 0], got[1, 1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rotary", [False, True])
def test_answer_position_shortcut_equals_full_sequences(tmp_path, monkeypatch, rotary):
    """The key/value-cache shortcut (answer position only, from layer l up) gives the attributions
    of full-sequence forwards, for absolute and for rotary positions (whose angles it takes from
    the padding mask) and for prompts of different lengths in one batch."""
    extra = {"positional_embedding_type": "rotary", "rotary_dim": 8} if rotary else {}
    model = _random_model(tmp_path, seed=3, **extra)
    prompts = ["Talia w1 of", "w2 w3 w4 Orrin w5 w6 w7 w8 by", "w7 Bex w9 of", "Cato"]
    answers = [" a0", " a3", " w9 w1", " a7"]
    assert kn._hooked_kv_unsupported(model) is None  # `fast` takes the shortcut
    fast = attributions(model, prompts, answers, steps=5)
    monkeypatch.setattr(kn, "_hooked_kv_unsupported", lambda model: "the full path")
    slow = attributions(model, prompts, answers, steps=5)
    assert fast.abs().max() > 1e-3
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-4)


def test_a_shortcut_that_does_not_reproduce_the_model_falls_back(random_model, monkeypatch,
                                                                   caplog):
    prompts, answers = ["Talia w1 of", "w2 Orrin w5 by"], [" a0", " a3"]
    ref = attributions(random_model, prompts, answers, steps=4)
    real = kn._prob_cached
    monkeypatch.setattr(kn, "_prob_cached", lambda *a: 0.5 * real(*a))  # a broken shortcut
    got = attributions(random_model, prompts, answers, steps=4)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    assert "running whole sequences" in caplog.text


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_attributions_are_complete(random_model, positions):
    """IG completeness (Sundararajan et al. 2017, Prop. 1): the attributions of a layer sum to
    P(y* | w̄) - P(y* | 0), up to the Riemann error of m steps."""
    prompt, answer, layer = "w3 Cato w4 w5 of", " a5", 0
    got = attributions(random_model, [prompt], [answer], steps=200, positions=positions)
    tokens = random_model.to_tokens(prompt)
    target = random_model.tokenizer(answer, add_special_tokens=False)["input_ids"][0]

    def zero(a):
        if positions == "all":
            return torch.zeros_like(a)
        a = a.clone()
        a[0, -1] = 0.0
        return a

    with torch.no_grad():
        p_full = _p_answer(random_model, tokens, target, layer, lambda a: a)
        p_zero = _p_answer(random_model, tokens, target, layer, zero)
    assert abs(float(p_full - p_zero)) > 0.01  # the check is not vacuous
    assert float(got[0, layer].sum()) == pytest.approx(float(p_full - p_zero), abs=2e-3)


def test_fact_model_knows_its_facts(fact_model):
    probes = [p for s in range(len(SUBJECTS)) for p in _probes(s)]
    s = metrics.score_answers(fact_model, [p.prompt for p in probes], [p.answer for p in probes])
    assert s.correct.all() and s.first_prob.min() > 0.9


def test_planted_knowledge_neurons_are_found_ranked_first_and_causal(fact_model):
    concept = _concept(1)  # Orrin
    sig = extract(fact_model, concept, "knowledge-neurons")
    planted = {(0, _planted(1, 0)), (0, _planted(1, 1))}
    assert {tuple(map(int, x)) for x in sig.indices[:2]} == planted
    assert sig.component == "neuron" and sig.kind == "knowledge-neurons"
    assert list(sig.component_hooks[:2]) == ["blocks.0.mlp.hook_post"] * 2
    assert torch.all(sig.scores[:-1] >= sig.scores[1:])
    assert sig.info["n_facts"] == 2 and all(f["n_neurons"] >= 1 for f in sig.info["facts"])
    assert sig.maps["attribution"].shape == (2, D_MLP)
    assert sig.settings["steps"] == 20 and sig.settings["positions"] == "answer"
    # Paper thresholds on one fact: its planted neuron is among the fact's neurons.
    attr = attributions(fact_model, [p.prompt for p in _probes(1)[:5]],
                        [p.answer for p in _probes(1)[:5]])
    assert fact_neurons(relative(attr), 0.2, 0.7, 3)[0, _planted(1, 0)]

    own, others = list(concept.forget), list(concept.retain)

    def acc(probes, hooks=()):
        s = metrics.score_answers(fact_model, [p.prompt for p in probes],
                                  [p.answer for p in probes], fwd_hooks=hooks)
        return float(np.mean(s.correct))

    top = sig.top(2)
    rand = random_like(top, torch.Generator().manual_seed(0))
    assert acc(own, ablation_hooks(top)) == 0.0  # the concept is gone
    assert acc(others, ablation_hooks(top)) == 1.0  # the other people keep their facts
    assert acc(own, ablation_hooks(rand)) == 1.0  # random neurons of layer 0 do nothing


def test_refining_removes_neurons_shared_with_other_facts(fact_model):
    plain = extract(fact_model, _concept(2), "knowledge-neurons", threshold=0.05)
    refined = extract(fact_model, _concept(2), "knowledge-neurons", threshold=0.05,
                      refine_share=0.5)
    as_set = lambda sig: {tuple(map(int, x)) for x in sig.indices}  # noqa: E731
    assert (0, GEN_NEURON) in as_set(plain)
    assert (0, GEN_NEURON) not in as_set(refined)
    assert {(0, _planted(2, 0)), (0, _planted(2, 1))} <= as_set(refined)
    assert refined.info["n_refined_out"] >= 1 and refined.settings["refine_share"] == 0.5


def test_signature_save_load_round_trip(fact_model, tmp_path):
    sig = extract(fact_model, _concept(0), "knowledge-neurons", steps=10)
    back = Signature.load(sig.save(tmp_path / "kn"), model=fact_model)
    assert back.kind == sig.kind and back.concept == "Talia" and back.component == "neuron"
    assert back.component_hooks == sig.component_hooks
    torch.testing.assert_close(back.scores, sig.scores)
    assert torch.equal(back.indices, sig.indices)
    assert back.maps.keys() == sig.maps.keys()
    for k in sig.maps:
        torch.testing.assert_close(back.maps[k], sig.maps[k].float())
    assert back.settings == sig.settings and back.info == sig.info
    assert {tuple(map(int, x)) for x in back.top(2).indices} == {(0, _planted(0, 0)),
                                                              (0, _planted(0, 1))}
