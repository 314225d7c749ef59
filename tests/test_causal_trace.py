"""Tests for kif.signatures.causal_trace (ROME causal tracing, Meng et al. 2022).

Two tiny models built here:
* a random 2-layer LN model: the batched (growing-batch) trace must equal one hooked forward per
  restoration site, for single-layer and model-wide windows;
* a hand-wired 2-layer model where the fact is planted: layer 0's MLP maps the subject token
  ("Alice") to an answer feature, layer 1's attention copies it to the last token, the unembedding
  reads it. The trace must find exactly that (IE at (resid, layer 0, last subject token) is the
  largest subject-token effect, restoring layer 1 at the last token restores everything, sites
  the answer cannot flow through have IE 0), and the signature's top components must be causal:
  ablating them kills Alice's fact and no one else's.
"""

import dataclasses
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from kif import metrics
from kif.concepts import Concept
from kif.signatures.registry import extract
from kif.signatures import causal_trace as CT
from kif.signatures.ablate import ablation_hooks, random_like
from kif.signatures.base import Signature, subject_positions
from kif.data.probe import Probe

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PEOPLE = ["Alice", "Bob", "Carol", "Dave"]
CITIES = ["Paris", "Rome", "Oslo", "Lima"]  # person i lives in city i
WORDS = PEOPLE + CITIES + ["Dr", "Today", "Now", "Well", "lives", "in", "and", "the"]


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)  # TransformerLens only accepts a reloaded tokenizer
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _random_model(tok) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=32,
                                  d_vocab=len(tok), act_fn="gelu", normalization_type="LN",
                                  seed=0, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return model.eval()


# Residual-stream layout of the planted model (d_model = 16).
ID, SUBJ_MARK, QUERY_MARK, ANS = 0, 4, 5, 6  # identity dims 0-3, answer features 6-9
OTHER = {"Dr": 10, "Today": 11, "Now": 11, "Well": 11, "lives": 12, "[BOS]": 13, "and": 14, "the": 14}


def _planted_model(tok) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=1, d_head=4, d_mlp=8, n_ctx=16,
                                  d_vocab=len(tok), act_fn="relu", normalization_type=None,
                                  positional_embedding_type="standard", seed=0, device="cpu")
    model = HookedTransformer(cfg, tokenizer=tok)
    ids = tok.convert_tokens_to_ids
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        e = model.embed.W_E
        for i, person in enumerate(PEOPLE):
            e[ids(person), ID + i] = 1.0
            e[ids(person), SUBJ_MARK] = 1.0
        e[ids("in"), QUERY_MARK] = 1.0
        for word, dim in OTHER.items():
            e[ids(word), dim] = 1.0
        # Layer 0: no attention; MLP neuron i fires on person i and writes city i's feature.
        mlp0 = model.blocks[0].mlp
        for i in range(len(PEOPLE)):
            mlp0.W_in[ID + i, i] = 1.0
            mlp0.b_in[i] = -0.5
            mlp0.W_out[i, ANS + i] = 4.0  # clean output 2 * f_city
        # Layer 1: the query token "in" attends to the subject marker and copies answer features.
        attn1 = model.blocks[1].attn
        attn1.W_Q[0, QUERY_MARK, 0] = 20.0
        attn1.W_K[0, SUBJ_MARK, 0] = 1.0
        for j in range(4):
            attn1.W_V[0, ANS + j, j] = 1.0
            attn1.W_O[0, j, ANS + j] = 1.0
        for j, city in enumerate(CITIES):
            model.unembed.W_U[ANS + j, ids(city)] = 5.0
    return model.eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    torch.set_num_threads(1)
    return _tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def planted(tok):
    return _planted_model(tok)


TEMPLATES = ["Today Dr {n} lives in", "Now Dr {n} lives in", "Well Dr {n} and the Dr {n} lives in"]


def _probes(person: str, templates=range(len(TEMPLATES))) -> list[Probe]:
    city = " " + CITIES[PEOPLE.index(person)]
    return [Probe(prompt=TEMPLATES[t].format(n=person), answer=city, subject=f"Dr {person}",
                  relation="home", phrasing="train", template=t, kind="person") for t in templates]


def _concept(person: str) -> Concept:
    others = [q for p in PEOPLE if p != person for q in _probes(p, [0])]
    return Concept(name=f"Dr {person}", forget=tuple(_probes(person)), paraphrase=(),
                   neighbour=(), shared=(), retain=tuple(others))


# ---- helpers --------------------------------------------------------------------------------


def test_subject_spans_and_roles(tok, planted):
    prompt = "Well Dr Alice and the Dr Alice lives in"
    spans = CT.subject_spans(planted, prompt, "Dr Alice")
    assert spans == [[2, 3], [6, 7]]  # [BOS] Well Dr Alice and the Dr Alice lives in
    assert spans[0] == subject_positions(planted, prompt, "Dr Alice")
    roles = CT.token_roles(10, spans[-1]).tolist()
    names = [CT.ROLES[r] if r >= 0 else None for r in roles]
    assert names == [None] * 6 + ["first subject token", "last subject token",
                                  "first subsequent token", "last token"]
    # one-token subject: it is the last subject token; a long tail has "further tokens"
    assert CT.token_roles(6, [1]).tolist() == [-1, 2, 3, 4, 4, 5]
    assert CT.token_roles(6, [1, 2, 3]).tolist() == [-1, 0, 1, 2, 3, 5]


# ---- the batched trace equals one hooked forward per site -----------------------------------


def _naive_trace(model, prompt, subject, answer, noise_scale, n_noise, window, seed):
    """ROME's trace_with_patch, one site at a time: the reference for the batched trace."""
    ids = torch.tensor(metrics.encode_prompts(model, [prompt]))
    ans = metrics.encode_answers(model, [answer])[0][0]
    subj = torch.tensor(sorted({p for s in CT.subject_spans(model, prompt, subject) for p in s}))
    gen = torch.Generator().manual_seed(seed)
    noise = noise_scale * torch.randn(n_noise, len(subj), model.cfg.d_model, generator=gen)
    _, cache = model.run_with_cache(ids)

    def corrupt(act, hook):
        act = act.clone()
        act[:, subj] += noise
        return act

    def p(extra=()):
        logits = model.run_with_hooks(ids.expand(n_noise, -1),
                                      fwd_hooks=[("hook_embed", corrupt), *extra])
        return torch.softmax(logits[:, -1].double(), -1)[:, ans].mean().item()

    p_star = p()
    n_layers, n_pos = model.cfg.n_layers, ids.shape[1]
    grids = {k: torch.zeros(n_layers, n_pos, dtype=torch.float64) for k in CT.KINDS}
    for kind in CT.KINDS:
        for layer in range(n_layers):
            layers = [layer] if kind == "resid" else range(max(0, layer - window // 2),
                                                          min(n_layers, layer - (-window // 2)))
            for pos in range(n_pos):
                hooks = []
                for lay in layers:
                    name = CT.HOOKS[kind].format(l=lay)

                    def restore(act, hook, name=name, pos=pos):
                        act = act.clone()
                        act[:, pos] = cache[name][0, pos]
                        return act

                    hooks.append((name, restore))
                grids[kind][layer, pos] = p(hooks) - p_star
    return p_star, grids


@pytest.mark.parametrize("window", [1, 10])
def test_batched_trace_equals_one_forward_per_site(tok, window):
    model = _random_model(tok)
    prompt, subject, answer = "Well Dr Bob and the Dr Bob lives in", "Dr Bob", " Rome"
    res = CT.trace(model, prompt, subject, answer, n_noise=3, noise_scale=1.5, window=window,
                   seed=7)
    p_star, grids = _naive_trace(model, prompt, subject, answer, 1.5, 3, window, 7)
    assert res.p_corrupt == pytest.approx(p_star, abs=1e-6)
    for kind in CT.KINDS:
        torch.testing.assert_close(res.grid(kind).double(), grids[kind], atol=2e-6, rtol=0)
    # restoring every layer's sublayer output at a token, or the last layer's state at the
    # last token, is the clean run there: IE = TE
    assert res.resid[-1, -1].item() == pytest.approx(res.te, abs=1e-5)
    assert res.p_clean == pytest.approx(
        torch.softmax(model(prompt)[0, -1].double(), -1)[res.answer_token].item(), abs=1e-6)


# ---- the planted fact ----------------------------------------------------------------------


def test_trace_finds_the_planted_site(planted):
    res = CT.trace(planted, "Today Dr Alice lives in", "Dr Alice", " Paris", noise_scale=3.0)
    # [BOS] Today Dr Alice lives in: subject at 2-3, last subject token 3, last token 5
    assert res.subject_spans == ((2, 3),) and res.tokens[3] == "Alice"
    assert res.clean_correct and res.p_clean > 0.99
    assert res.te > 0.5
    # before the subject nothing changes; the final layer's state at a subject token and layer 0
    # at the query token never reach the answer (no layer-0 attention)
    for g in (res.resid, res.mlp, res.attn):
        assert torch.all(g[:, :2] == 0)
    assert abs(res.resid[1, 3].item()) < 1e-6 and abs(res.resid[0, 5].item()) < 1e-6
    # restoring layer 1 at the last token (its state, or its attention output) restores the fact
    assert res.resid[1, 5].item() == pytest.approx(res.te, abs=1e-5)
    assert res.attn[1, 5].item() == pytest.approx(res.te, abs=1e-5)
    # the early site: layer 0 at the last subject token ("Alice") carries the fact, the title
    # token "Dr" does not
    early = res.resid[:, 2:5]
    assert early.argmax().item() == 1  # (layer 0, token 3)
    assert res.resid[0, 3].item() > 0.5 * res.te
    assert res.resid[0, 2].item() < 0.2 * res.resid[0, 3].item()


def _p_answer(model, person: str, hooks=()) -> float:
    """Mean probability of the person's city over their prompts."""
    ps = _probes(person)
    s = metrics.score_answers(model, [q.prompt for q in ps], [q.answer for q in ps],
                              fwd_hooks=list(hooks))
    return float(s.first_prob.mean())


def _city_feature() -> torch.Tensor:
    """Alice's city feature against the mean of the others' (the planted contrast)."""
    f = torch.zeros(16)
    f[ANS:ANS + 4] = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3])
    return f / f.norm()


def test_signature_ranks_the_late_site_and_is_causal(planted, tmp_path):
    concept = _concept("Alice")
    sig = extract(planted, concept, "causal-trace", k=4, window=1, noise_scale=3.0)
    assert sig.kind == "causal-trace" and sig.component == "direction" and len(sig) == 4
    assert torch.all(sig.scores[:-1] >= sig.scores[1:])
    sites = list(zip(sig.component_hooks, sig.info["component_roles"]))
    # restoring layer 1 at the last token (state or attention output) restores everything: the
    # late site ranks first; the early site (layer 0 at "Alice": state, then MLP output) follows
    assert set(sites[:2]) == {("blocks.1.hook_resid_post", "last token"),
                              ("blocks.1.hook_attn_out", "last token")}
    assert sites[2:] == [("blocks.0.hook_resid_post", "last subject token"),
                         ("blocks.0.hook_mlp_out", "last subject token")]
    assert sig.scores[0].item() == pytest.approx(sig.info["te"], abs=1e-4)
    assert sig.info["best_site"]["layer"] == 1 and sig.info["best_site"]["role"] == "last token"
    assert sig.info["n_traced"] == 3 and sig.info["roles"] == list(CT.ROLES)
    # a one-token name has no middle subject tokens: that role is NaN, the others are not
    assert sig.maps["resid_ie"].shape == (2, len(CT.ROLES))
    assert torch.isnan(sig.maps["resid_ie"][:, 1]).all()
    assert not torch.isnan(sig.maps["resid_ie"][:, [0, 2, 3, 5]]).any()
    assert set(sig.settings) >= {"k", "n_noise", "noise_scale", "window", "seed", "kinds", "roles"}
    # the late-site directions are Alice's city against the others'
    for d in sig.directions[:2]:
        assert torch.dot(d, _city_feature()).item() == pytest.approx(1.0, abs=1e-5)

    # causal: ablating the top two components takes Alice's city down to a 4-way tie, and
    # nobody else's; random directions at the same hooks do nothing
    assert all(_p_answer(planted, p) > 0.99 for p in PEOPLE)
    top = sig.top(2)
    assert _p_answer(planted, "Alice", ablation_hooks(top)) < 0.3
    assert all(_p_answer(planted, p, ablation_hooks(top)) > 0.95 for p in PEOPLE[1:])
    rand = random_like(top, torch.Generator().manual_seed(0))
    assert _p_answer(planted, "Alice", ablation_hooks(rand)) > 0.95

    out = sig.save(tmp_path / "sig")
    back = Signature.load(out, model=planted)
    assert back.component_hooks == sig.component_hooks and back.info == sig.info
    assert back.settings == sig.settings
    torch.testing.assert_close(back.directions, sig.directions)
    torch.testing.assert_close(back.scores, sig.scores)
    for name, m in sig.maps.items():
        torch.testing.assert_close(back.maps[name], m, equal_nan=True)
    CT.plot_trace(back, tmp_path / "avg.png")
    assert (tmp_path / "avg.png").read_bytes()[:4] == b"\x89PNG"


def test_early_site_signature_is_the_planted_mlp(planted):
    sig = extract(planted, _concept("Alice"), "causal-trace", k=2, window=1, noise_scale=3.0,
                  roles=("last subject token",))
    assert sig.component_hooks == ("blocks.0.hook_resid_post", "blocks.0.hook_mlp_out")
    # the MLP direction is exactly the planted city feature (the MLP writes only that)
    assert torch.dot(sig.directions[1], _city_feature()).item() == pytest.approx(1.0, abs=1e-5)
    assert _p_answer(planted, "Alice", ablation_hooks(sig)) < 0.1
    assert all(_p_answer(planted, p, ablation_hooks(sig)) > 0.95 for p in PEOPLE[1:])


def test_trace_concept_skips_wrong_prompts_and_plots(planted, tmp_path):
    concept = _concept("Bob")
    wrong = dataclasses.replace(concept.forget[0], answer=" Oslo")
    concept = dataclasses.replace(concept, forget=(wrong, *concept.forget[1:]))
    traces = CT.trace_concept(planted, concept, noise_scale=3.0, n_noise=4)
    assert [t.prompt for t in traces] == [p.prompt for p in concept.forget[1:]]
    assert all(t.n_noise == 4 and t.clean_correct for t in traces)
    avg = CT.average_by_role(traces)
    assert avg.n_prompts == 2 and math.isclose(avg.te, sum(t.te for t in traces) / 2)
    # the last token's role average equals the mean of the prompts' last-token IEs
    expect = torch.stack([t.resid[:, -1] for t in traces]).mean(0)
    torch.testing.assert_close(avg.resid[:, CT.ROLES.index("last token")], expect)
    CT.plot_trace(traces[-1], tmp_path / "one.png", title="Dr Bob")
    CT.plot_trace(avg, tmp_path / "avg.png")
    assert (tmp_path / "one.png").stat().st_size > 1000 and (tmp_path / "avg.png").stat().st_size > 1000


def test_trace_rejects_bad_input(planted):
    with pytest.raises(Exception, match="does not occur"):
        CT.trace(planted, "Today Dr Alice lives in", "Dr Bob", " Rome")
    with pytest.raises(ValueError):
        CT.trace(planted, "Today Dr Alice lives in", "Dr Alice", " Paris", n_noise=0)
    with pytest.raises(ValueError):
        CT.trace(planted, "Today Dr Alice lives in", "Dr Alice", " Paris", kinds=("heads",))
