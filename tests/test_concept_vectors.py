"""Tests for kif.signatures.concept_vectors on a tiny model with a planted concept.

The model (2 layers, hand-set weights) knows one fact: after the name "Talia" it says "Maresk".
The fact lives in ONE neuron, (layer 1, neuron 7): its input weight reads Talia's embedding (it
fires only on the Talia token) and its value vector W_out[7] points at the unembedding of
"Maresk". Attention writes nothing and layer 0's MLP writes a constant, so layer 1's MLP output is
the only place where the concept's prompts differ from other names' prompts. The tests check that
both methods find that place, that removing what they find removes the fact, that the batched
computations equal unbatched references, and that signatures survive a save/load round trip.
"""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from kif import metrics
from kif.concepts import Concept
from kif.errors import KifError
from kif.signatures.base import Signature
from kif.signatures.registry import extract
from kif.signatures import concept_vectors as cv
from kif.signatures.ablate import ablation_hooks, random_like
from kif.signatures.base import subject_positions
from kif.data.probe import Probe

NAMES = ["Talia", "Bram", "Corin", "Dena", "Eliot", "Fenna", "Goran", "Hild"]
ANSWERS = ["Maresk", "Oslen", "Pirna", "Quell"]
FILLER = [f"w{i}" for i in range(12)]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PLANT = (1, 7)


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + NAMES + ANSWERS + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)  # TransformerLens only accepts a reloaded tokenizer
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _model(folder) -> HookedTransformer:
    tok = _tokenizer(folder)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64,
                                  n_ctx=32, d_vocab=len(tok), act_fn="gelu",
                                  normalization_type="LN", seed=0, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tok)
    gen = torch.Generator().manual_seed(0)
    talia = tok.convert_tokens_to_ids("Talia")
    maresk = tok.convert_tokens_to_ids("Maresk")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [model.ln_final] + [m for b in model.blocks for m in (b.ln1, b.ln2)]:
            ln.w.fill_(1.0)
        model.embed.W_E.copy_(torch.randn(cfg.d_vocab, 32, generator=gen))
        model.embed.W_E[talia] *= 3.0  # after LayerNorm, Talia's state is mostly its embedding
        model.pos_embed.W_pos.copy_(0.1 * torch.randn(32, 32, generator=gen))
        model.unembed.W_U.copy_(torch.randn(32, cfg.d_vocab, generator=gen))
        # Layer 0's MLP writes a constant (its output never distinguishes prompts).
        model.blocks[0].mlp.b_out.copy_(torch.randn(32, generator=gen))
        # Layer 1's MLP: 63 noisy neurons reading random directions, plus the planted one.
        mlp = model.blocks[1].mlp
        mlp.W_in.copy_(torch.randn(32, 64, generator=gen) / 32 ** 0.5)
        mlp.W_out.copy_(0.3 * torch.randn(64, 32, generator=gen))
        e = model.embed.W_E[talia] - model.embed.W_E[talia].mean()
        mlp.W_in[:, PLANT[1]] = 2.0 * e / e.norm()
        mlp.b_in[PLANT[1]] = -6.0
        u = model.unembed.W_U[:, maresk] - model.unembed.W_U.mean(1)
        mlp.W_out[PLANT[1]] = 12.0 * u / u.norm()
        model.unembed.b_U[maresk] = -12.0  # without the planted neuron, Maresk is never the argmax
    model.eval()
    return model


def _probes(names: list[str], answers: list[str], n: int, rng: np.random.Generator,
            relation: str = "r") -> list[Probe]:
    out = []
    for i in range(n):
        name = names[i % len(names)]
        fill = " ".join(rng.choice(FILLER, size=int(rng.integers(1, 6))))
        out.append(Probe(prompt=f"{fill} {name}", answer=" " + answers[i % len(answers)],
                         subject=name, relation=relation, phrasing="train", template=0,
                         kind="person"))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    model = _model(tmp_path_factory.mktemp("tok"))
    rng = np.random.default_rng(0)
    concept = Concept(
        name="Talia",
        forget=tuple(_probes(["Talia"], ["Maresk"], 12, rng)),
        paraphrase=(), neighbour=(),
        shared=tuple(_probes(FILLER, ANSWERS[1:], 8, rng, relation="s")),
        retain=tuple(_probes(NAMES[1:], ANSWERS[1:], 70, rng)),
    )
    return model, concept


def _acc(model, probes, hooks=()) -> float:
    s = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes],
                              fwd_hooks=list(hooks))
    return float(np.mean(s.correct))


def test_planted_fact_is_known(world):
    model, concept = world
    assert _acc(model, concept.forget) == 1.0


@pytest.mark.parametrize("score,positions", [("logit", "last"), ("norm", "last+subject"),
                                             ("norm", "subject")])
def test_parametric_ranks_the_planted_neuron_first_and_it_is_causal(world, score, positions):
    model, concept = world
    sig = extract(model, concept, "concept-vectors", method="parametric", k=10, score=score,
                  positions=positions)
    assert sig.kind == "concept-vectors" and sig.component == "neuron" and len(sig) == 10
    assert tuple(sig.indices[0].tolist()) == PLANT
    assert sig.component_hooks[0] == f"blocks.{PLANT[0]}.mlp.hook_post"
    assert bool((sig.scores[:-1] >= sig.scores[1:]).all())
    assert float(sig.scores[0]) > 5 * float(sig.scores[1].clamp_min(1e-9))
    # The planted value vector's vocabulary projection names the answer (Hong et al. 2024).
    top = sig.info["top_neurons"][0]
    assert top["top_tokens"][0] == " Maresk" or top["top_tokens"][0].strip() == "Maresk"
    assert top["answer_in_top"]
    assert 0.0 <= sig.info["answer_in_top_rate_random_neurons"] <= 1.0
    assert sig.settings["score"] == score and sig.settings["k"] == 10
    # Causal: zeroing the top neuron removes the fact; 1 random neuron of that layer does not.
    assert _acc(model, concept.forget, ablation_hooks(sig.top(1))) == 0.0
    rand = random_like(sig.top(1), torch.Generator().manual_seed(0))
    assert _acc(model, concept.forget, ablation_hooks(rand)) == 1.0


def _reference_contributions(model, probes, score, positions):
    """Unbatched float64 reference: one unpadded forward per prompt, formulas written out."""
    out = []
    for p in probes:
        tokens = model.to_tokens(p.prompt)
        _, cache = model.run_with_cache(tokens)
        rows = []
        for layer in range(model.cfg.n_layers):
            a = cache[f"blocks.{layer}.mlp.hook_post"][0].double()       # [pos, d_mlp]
            w_out = model.blocks[layer].mlp.W_out.detach().double()       # [d_mlp, d_model]
            if score == "logit":
                y = model.tokenizer(p.answer, add_special_tokens=False)["input_ids"][0]
                v = (w_out - w_out.mean(1, keepdim=True)) * model.ln_final.w.detach().double()
                w_u = model.W_U.detach().double()
                u = w_u[:, y] - w_u.mean(1)
                scale = cache["ln_final.hook_scale"][0, -1, 0].double()
                rows.append(a[-1] * (v @ u) / scale)
            else:
                pos = set()
                if "subject" in positions:
                    pos |= set(subject_positions(model, p.prompt, p.subject))
                if "last" in positions:
                    pos.add(tokens.shape[1] - 1)
                rows.append(a[sorted(pos)].mean(0) * w_out.norm(dim=1))
        out.append(torch.stack(rows))
    return torch.stack(out, dim=1)                                          # [layer, n, d_mlp]


@pytest.mark.parametrize("score,positions", [("logit", "last"), ("norm", "last+subject")])
def test_neuron_contributions_equal_unbatched_reference(world, score, positions):
    model, concept = world
    probes = list(concept.forget[:4]) + list(concept.retain[:5])
    got = cv.neuron_contributions(model, probes, score=score, positions=positions, batch_size=4)
    ref = _reference_contributions(model, probes, score, positions)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def _reference_activation(model, pos, neg, hook):
    """Unbatched numpy reference of the KIF activation signature at one hook."""
    pooled = []
    for p in list(pos) + list(neg):
        _, cache = model.run_with_cache(model.to_tokens(p.prompt))
        pooled.append(cache[hook][0, 1:].double().mean(0).numpy())
    s = np.stack(pooled)
    z = (s - s.mean(0)) / s.std(0, ddof=1)
    dz = z[: len(pos)].mean(0) - z[len(pos):].mean(0)
    dz /= np.linalg.norm(dz)
    raw = dz / s.std(0, ddof=1)
    raw /= np.linalg.norm(raw)
    pp, pn = z[: len(pos)] @ dz, z[len(pos):] @ dz
    sp = np.sqrt(((len(pp) - 1) * pp.var(ddof=1) + (len(pn) - 1) * pn.var(ddof=1))
                 / (len(pp) + len(pn) - 2))
    return raw, (pp.mean() - pn.mean()) / sp


def test_activation_signature_finds_the_planted_layer(world):
    model, concept = world
    sig = extract(model, concept, "concept-vectors", method="activation",
                  sites=("mlp_out", "resid_post"))
    hook = "blocks.1.hook_mlp_out"
    info = sig.info
    # Layer 0's MLP output is the same for every prompt: no signature there, and no component.
    assert info["per_hook"]["blocks.0.hook_mlp_out"]["d"] == 0.0
    assert not info["per_hook"]["blocks.0.hook_mlp_out"]["accepted"]
    assert "blocks.0.hook_mlp_out" not in sig.component_hooks
    assert info["per_hook"][hook]["accepted"] and info["per_hook"][hook]["d"] >= 2.0
    assert info["best_layer"] == 1 and info["accepted"]
    assert info["best_ci"][0] <= info["best_d"] <= info["best_ci"][1]
    assert bool((sig.scores[:-1] >= sig.scores[1:]).all())
    # Batched result == unbatched reference (z-scoring, direction mapped back, Cohen's d).
    neg = list(concept.retain) + list(concept.shared)
    raw, d = _reference_activation(model, concept.forget, neg, hook)
    row = sig.component_hooks.index(hook)
    np.testing.assert_allclose(sig.directions[row].double().numpy(), raw, atol=1e-4)
    assert info["per_hook"][hook]["d"] == pytest.approx(d, rel=1e-5)
    # The raw read direction reproduces the z-space effect size (what the meter relies on).
    d2, lo, hi = cv.cohens_d(model, sig.directions[row], hook, concept.forget, neg)
    assert d2 == pytest.approx(d, rel=1e-4) and lo <= d2 <= hi
    # Removing the signature's directions hurts the fact more than random ones do.
    probes = concept.forget
    ans = [p.answer for p in probes]
    base = metrics.score_answers(model, [p.prompt for p in probes], ans).logprob.mean()
    cut = metrics.score_answers(model, [p.prompt for p in probes], ans,
                                fwd_hooks=ablation_hooks(sig.top(2))).logprob.mean()
    rnd = metrics.score_answers(
        model, [p.prompt for p in probes], ans,
        fwd_hooks=ablation_hooks(random_like(sig.top(2), torch.Generator().manual_seed(1)))
    ).logprob.mean()
    assert base - cut > 5 * abs(base - rnd) and base - cut > 1.0


def test_activation_further_directions_are_oriented_and_scored(world):
    model, concept = world
    sig = extract(model, concept, "concept-vectors", method="activation", n_directions=3,
                  layers=[1], k=3)
    assert len(sig) == 3 and set(sig.component_hooks) == {"blocks.1.hook_mlp_out"}
    assert sig.info["component_rank"][0] == 0  # the mean-difference direction ranks first
    torch.testing.assert_close(sig.directions.norm(dim=1), torch.ones(3))
    for row in range(3):
        d, _, _ = cv.cohens_d(model, sig.directions[row], "blocks.1.hook_mlp_out",
                              concept.forget, list(concept.retain) + list(concept.shared))
        assert d == pytest.approx(float(sig.scores[row]), rel=1e-4, abs=1e-6) and d >= -1e-6


def test_traces_cosine_and_jaccard(world):
    model, _ = world
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(5, 32, generator=gen)
    w = torch.randn(5, 32, generator=gen)
    torch.testing.assert_close(cv.value_vector_cosine(v, 3 * v), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(cv.value_vector_cosine(v, -v), -torch.ones(5, dtype=torch.float64))
    ref = torch.nn.functional.cosine_similarity(v.double(), w.double(), dim=-1)
    torch.testing.assert_close(cv.value_vector_cosine(v, w), ref)
    assert float(cv.value_vector_cosine(v[0], torch.zeros(32))) == 0.0
    k = 6
    jac = cv.top_token_jaccard(v, w, model, k=k)
    assert jac.shape == (5,)
    for i in range(5):  # set-based reference
        a = set((v[i] @ model.W_U).topk(k).indices.tolist())
        b = set((w[i] @ model.W_U).topk(k).indices.tolist())
        assert float(jac[i]) == pytest.approx(len(a & b) / len(a | b))
    torch.testing.assert_close(cv.top_token_jaccard(v, v, model, k=k), torch.ones(5, dtype=torch.float64))
    assert float(cv.top_token_jaccard(v[0], -v[0], model, k=k)) == 0.0  # 2k < vocab: disjoint


@pytest.mark.parametrize("method", ["parametric", "activation"])
def test_signature_save_load_round_trip(world, tmp_path, method):
    model, concept = world
    sig = extract(model, concept, "concept-vectors", method=method, k=5)
    out = sig.save(tmp_path / "sig")
    back = Signature.load(out, model=model)
    for f in ("concept", "kind", "model_name", "model_hash", "dims", "component",
              "component_hooks", "settings", "info"):
        assert getattr(back, f) == getattr(sig, f), f
    torch.testing.assert_close(back.scores, sig.scores)
    for f in ("directions", "indices"):
        a, b = getattr(sig, f), getattr(back, f)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a.to(b.dtype))
    assert set(back.maps) == set(sig.maps)
    with pytest.raises(KifError):
        extract(model, concept, "concept-vectors", method="nope")
