"""Tests for kif.metrics: batched scorers against unpadded single forwards, and the pure metrics
against hand computations and brute force."""

import math
import zlib

import numpy as np
import pytest
import scipy.stats
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from kif import metrics as M

WORDS = ["Talia", "Vorhees", "was", "born", "in", "the", "city", "of", "Maresk", "works", "for"] + [
    f"w{i}" for i in range(29)
]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    fast.save_pretrained(folder)  # TransformerLens only accepts a reloaded tokenizer
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _model(folder, seed: int = 0, **cfg_kw) -> HookedTransformer:
    tok = _tokenizer(folder)
    cfg = HookedTransformerConfig(**{
        "n_layers": 2, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, "n_ctx": 64,
        "d_vocab": len(tok), "act_fn": "gelu", "normalization_type": "LN", "seed": seed,
        "device": "cpu", **cfg_kw,
    })
    model = HookedTransformer(cfg, tokenizer=tok)
    # Larger random weights than the default init, so that argmaxes are far from ties.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    model.eval()
    return model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> HookedTransformer:
    torch.set_num_threads(1)
    return _model(tmp_path_factory.mktemp("tok"))


def _sentences(rng: np.random.Generator, n: int, lo: int, hi: int, lead: str = "") -> list[str]:
    sizes = rng.integers(lo, hi + 1, size=n)
    return [lead + " ".join(rng.choice(WORDS, size=int(k))) for k in sizes]


def _ref_scores(model, prompt: str, answer: str, fwd_hooks=()):
    """Unpadded single forward, float64, tokens via TransformerLens' own to_tokens."""
    p = model.to_tokens(prompt)[0].tolist()
    a = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([p + a])
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))[0].double()
    logp = torch.log_softmax(logits, -1)
    pos = [len(p) - 1 + j for j in range(len(a))]
    lps = [logp[q, t].item() for q, t in zip(pos, a)]
    correct = all(int(logits[q].argmax()) == t for q, t in zip(pos, a))
    rank = int((logp[pos[0]] > logp[pos[0], a[0]]).sum())
    return sum(lps), len(a), correct, rank, math.exp(lps[0])


def _check_against_ref(model, prompts, answers, scores, fwd_hooks=()):
    for i, (p, a) in enumerate(zip(prompts, answers)):
        lp, n, correct, rank, first = _ref_scores(model, p, a, fwd_hooks)
        # float32 logits: relative rounding matters where they are large (a model without a
        # final norm reaches thousands)
        assert scores.logprob[i] == pytest.approx(lp, abs=1e-5, rel=1e-6)
        assert scores.n_tokens[i] == n
        assert scores.mean_nll[i] == pytest.approx(-lp / n, abs=1e-5, rel=1e-6)
        assert scores.prob[i] == pytest.approx(math.exp(lp / n), rel=1e-5)
        assert bool(scores.correct[i]) == correct
        assert scores.first_rank[i] == rank
        assert scores.first_prob[i] == pytest.approx(first, rel=1e-5)


def test_prompt_encoding_matches_transformer_lens(model):
    prompts = ["Talia Vorhees was born in the city of", "w3", ""]
    assert M.encode_prompts(model, prompts) == [model.to_tokens(p)[0].tolist() for p in prompts]
    maresk = model.tokenizer.convert_tokens_to_ids("Maresk")
    assert M.encode_answers(model, [" Maresk"]) == [[maresk]]


@pytest.mark.parametrize("batch_size", [3, 256])
def test_batched_scores_equal_unpadded_single_forwards(model, batch_size):
    rng = np.random.default_rng(1)
    prompts = _sentences(rng, 11, 1, 9)
    answers = _sentences(rng, 11, 1, 4, lead=" ")
    scores = M.score_answers(model, prompts, answers, batch_size=batch_size)
    assert len(scores) == 11
    _check_against_ref(model, prompts, answers, scores)


@pytest.mark.parametrize("batch_size", [3, 256])
def test_candidates_on_a_shared_prompt_cache_equal_unpadded_single_forwards(model, batch_size):
    # each prompt runs once and its keys and values serve every candidate (KV cache); prompts of
    # several lengths, an empty one (BOS only), candidates of 1-4 tokens, one prompt without any
    rng = np.random.default_rng(3)
    prompts = _sentences(rng, 9, 1, 7) + [""]
    counts = [int(c) for c in rng.integers(1, 6, size=10)]
    counts[4] = 0
    candidates = [_sentences(rng, c, 1, 4, lead=" ") for c in counts]
    scores = M.score_candidates(model, prompts, candidates, batch_size=batch_size)
    flat_p = [p for p, c in zip(prompts, candidates) for _ in c]
    flat_a = [a for c in candidates for a in c]
    assert len(scores) == sum(counts)
    _check_against_ref(model, flat_p, flat_a, scores)
    np.testing.assert_array_equal(scores.extraction,
                                  M.score_answers(model, flat_p, flat_a).extraction)
    tok = model.tokenizer
    side, pad = tok.padding_side, tok.pad_token
    try:  # a GPT-2-style tokenizer (pad = BOS, left padding) changes nothing: the mask is explicit
        tok.padding_side, tok.pad_token = "left", "[BOS]"
        left = M.score_candidates(model, prompts, candidates, batch_size=batch_size)
    finally:
        tok.padding_side, tok.pad_token = side, pad
    np.testing.assert_allclose(left.logprob, scores.logprob, atol=1e-6)
    # with hooks the rows run whole (a hook may index positions), and the hook is applied
    flip = [("blocks.0.hook_resid_post", lambda act, hook: -act)]
    hooked = M.score_candidates(model, prompts, candidates, fwd_hooks=flip)
    _check_against_ref(model, flat_p, flat_a, hooked, flip)
    # so do hooks applied to the model (an erasure's `apply`): the capsule's gate leaves
    # position 0 alone, which in a cached second forward would be the answer's first token
    def skip_first(act, hook):
        act = act.clone()
        act[:, 1:] = -act[:, 1:]
        return act

    model.blocks[0].hook_resid_post.add_hook(skip_first, is_permanent=True)
    try:
        applied = M.score_candidates(model, prompts, candidates)
        whole = M.score_answers(model, flat_p, flat_a)
    finally:
        model.reset_hooks(including_permanent=True)
    np.testing.assert_allclose(applied.logprob, whole.logprob, atol=1e-5)
    assert not np.allclose(applied.logprob, scores.logprob, atol=1e-3)  # the hook acted
    with pytest.raises(ValueError, match="candidate lists"):
        M.score_candidates(model, prompts, candidates[:-1])


@pytest.mark.parametrize("head", [{"normalization_type": None}, {"normalization_type": "RMS"},
                                  {"output_logits_soft_cap": 2.0}])
def test_scores_unembed_only_the_answer_positions_as_the_full_forward_does(tmp_path, head):
    # the scorers apply the model's head (final norm, unembedding, soft-cap) to the positions they
    # read only: every kind of head must give the full forward's numbers
    model = _model(tmp_path, **head)
    rng = np.random.default_rng(5)
    prompts = _sentences(rng, 6, 1, 7)
    candidates = [_sentences(rng, 3, 1, 3, lead=" ") for _ in prompts]
    flat_p = [p for p, c in zip(prompts, candidates) for _ in c]
    flat_a = [a for c in candidates for a in c]
    _check_against_ref(model, flat_p, flat_a, M.score_answers(model, flat_p, flat_a))
    _check_against_ref(model, flat_p, flat_a, M.score_candidates(model, prompts, candidates))


def test_head_is_the_forwards_last_step_and_runs_the_unembeddings_hook_points(model):
    # _head unembeds without TransformerLens's per-call copy of W_U; a hook on unembed.hook_in
    # or hook_out must still see (and may change) what it would in the full forward
    tokens = model.to_tokens(["Talia was born in the city of", "Maresk works for"])
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    torch.testing.assert_close(M._head(model, resid), model(tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M._head(model, resid[:, -1]), model(tokens)[:, -1])
    seen = []
    hooks = [("unembed.hook_in", lambda x, hook: seen.append(hook.name)),
             ("unembed.hook_out", lambda x, hook: x * 2)]
    with model.hooks(fwd_hooks=hooks):
        doubled = M._head(model, resid)
    assert seen == ["unembed.hook_in"]
    torch.testing.assert_close(doubled, 2 * model(tokens), atol=1e-5, rtol=1e-5)


def test_left_padding_tokenizer_does_not_change_scores(model):
    rng = np.random.default_rng(2)
    prompts = _sentences(rng, 6, 1, 8)
    answers = _sentences(rng, 6, 1, 3, lead=" ")
    base = M.score_answers(model, prompts, answers, batch_size=6)
    tok = model.tokenizer
    side, pad = tok.padding_side, tok.pad_token
    try:
        # GPT-2 style: pad = BOS, and a tokenizer that pads on the left, for which
        # TransformerLens derives a mask and positions from pad ids unless told otherwise.
        tok.padding_side, tok.pad_token = "left", "[BOS]"
        left = M.score_answers(model, prompts, answers, batch_size=6)
        lps = M.token_logprobs(model, prompts, batch_size=6)
    finally:
        tok.padding_side, tok.pad_token = side, pad
    np.testing.assert_allclose(left.logprob, base.logprob, atol=1e-6)
    np.testing.assert_array_equal(left.correct, base.correct)
    # batched (6 rows, left-padded) against one row at a time: float32 matmuls of other shapes
    # round differently, by a few ulp (transformers 5.25: 1.4e-6 at a log-prob of -7.7, 3 ulp),
    # so the tolerance is relative as well; a padding or position error moves log-probs by far more
    for p, lp in zip(prompts, M.token_logprobs(model, prompts, batch_size=1)):
        torch.testing.assert_close(lps[prompts.index(p)], lp, atol=1e-6, rtol=1e-6)


def test_correct_agrees_with_greedy_generate(model):
    rng = np.random.default_rng(3)
    prompts = _sentences(rng, 12, 1, 7)
    gen = M.greedy_generate_ids(model, prompts, 3, batch_size=5)
    # Unbatched, uncached reference loop.
    for p, g in zip(prompts, gen):
        tokens = model.to_tokens(p)
        for _ in range(3):
            with torch.no_grad():
                nxt = model(tokens)[0, -1].argmax()
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        assert tokens[0, -3:].tolist() == g
    texts = M.greedy_generate(model, prompts, 3, batch_size=100)
    assert texts == [model.tokenizer.decode(g) for g in gen]
    # First half: the model's own greedy continuation; second half: random answers.
    answers = [" " + t for t in texts[:6]] + _sentences(rng, 6, 3, 3, lead=" ")
    scores = M.score_answers(model, prompts, answers, batch_size=4)
    a_ids = M.encode_answers(model, answers)
    expected = np.array([a == g for a, g in zip(a_ids, gen)])
    assert expected[:6].all() and not expected[6:].all()
    np.testing.assert_array_equal(scores.correct, expected)
    assert M.accuracy(scores) == pytest.approx(expected.mean())
    np.testing.assert_array_equal(scores.extraction[:6], 1.0)


def test_extraction_strength_matches_greedy_from_every_prefix(model):
    rng = np.random.default_rng(4)
    prompts = _sentences(rng, 8, 1, 6)
    answers = []
    for p in prompts:
        # A wrong first word followed by the model's greedy continuation: ES is 2/3 by design.
        first = model.tokenizer.decode(M.greedy_generate_ids(model, [p], 1)[0])
        wrong = next(w for w in WORDS if w != first)
        rest = M.greedy_generate(model, [p + " " + wrong], 2)[0]
        answers.append(" " + wrong + " " + rest)
    answers += _sentences(rng, 8, 1, 4, lead=" ")
    prompts = prompts + _sentences(rng, 8, 1, 6)
    scores = M.score_answers(model, prompts, answers, batch_size=5)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        words = a.split()
        k = next(
            (k for k in range(len(words))
             if M.greedy_generate(model, [" ".join([p] + words[:k])], len(words) - k)[0]
             == " ".join(words[k:])),
            len(words),
        )
        assert scores.extraction[i] == pytest.approx(1 - k / len(words))
    np.testing.assert_allclose(scores.extraction[:8], 2 / 3)


def test_preferred_token_is_correct_and_rank_zero(tmp_path):
    m = _model(tmp_path, seed=5)
    target = m.tokenizer.convert_tokens_to_ids("Maresk")
    with torch.no_grad():
        m.unembed.b_U[target] = 1e3
        m.unembed.b_U[m.tokenizer.convert_tokens_to_ids("Talia")] = 5e2  # second everywhere
    prompts = ["Talia Vorhees was born in the city of", "w1 w2", "w7"]
    s = M.score_answers(m, prompts, [" Maresk", " Maresk Maresk", " Talia"])
    np.testing.assert_array_equal(s.correct, [True, True, False])
    np.testing.assert_array_equal(s.first_rank, [0, 0, 1])
    assert s.first_prob[0] == pytest.approx(1.0)
    assert s.first_prob[2] < 1e-6
    assert M.greedy_generate(m, prompts[:1], 2) == ["Maresk Maresk"]


def test_fwd_hooks_are_applied_and_removed(model):
    rng = np.random.default_rng(6)
    prompts = _sentences(rng, 5, 1, 6)
    answers = _sentences(rng, 5, 1, 3, lead=" ")
    shift = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 3

    def hook(resid, hook):
        return resid + shift

    hooks = [("blocks.0.hook_resid_post", hook)]
    base = M.score_answers(model, prompts, answers)
    hooked = M.score_answers(model, prompts, answers, fwd_hooks=hooks, batch_size=2)
    _check_against_ref(model, prompts, answers, hooked, fwd_hooks=hooks)
    assert np.abs(hooked.logprob - base.logprob).max() > 1e-2
    again = M.score_answers(model, prompts, answers)
    np.testing.assert_array_equal(again.logprob, base.logprob)
    gen = M.greedy_generate_ids(model, prompts, 2, fwd_hooks=hooks)
    own = [" " + model.tokenizer.decode(g) for g in gen]
    ok = M.score_answers(model, prompts, own, fwd_hooks=hooks)
    assert ok.correct.all()


def test_token_logprob_stats_match_manual(model):
    rng = np.random.default_rng(7)
    texts = _sentences(rng, 7, 1, 10) + [""]
    stats = M.token_logprob_stats(model, texts, batch_size=3)
    lps = M.token_logprobs(model, texts, batch_size=2)
    assert stats[-1].logprob.numel() == 0 and lps[-1].numel() == 0
    for text, st, lp in zip(texts[:-1], stats, lps):
        tokens = model.to_tokens(text)
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens)[0, :-1].double(), -1)
        ref = logp.gather(-1, tokens[0, 1:, None]).squeeze(-1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = ((p * logp**2).sum(-1) - mu**2).sqrt()
        assert st.logprob.shape == (len(text.split()),)
        torch.testing.assert_close(st.logprob, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(st.mu, mu, atol=1e-5, rtol=0)
        torch.testing.assert_close(st.sigma, sigma, atol=1e-4, rtol=0)
    scores = M.mia_scores(stats[:-1], texts[:-1])
    assert scores["loss"][0] == pytest.approx(stats[0].logprob.mean().item())


def test_truth_ratio_truth_score_and_forget_quality():
    r = M.truth_ratio(np.array([0.5, 0.1]), np.array([[0.25, 0.0625], [0.2, 0.2]]))
    np.testing.assert_allclose(r, [0.125 / 0.5, 2.0])
    assert M.truth_score(r) == pytest.approx((0.75 + 0.0) / 2)
    assert M.truth_ratio(np.array([0.0]), np.array([[0.1]]))[0] == np.inf
    rng = np.random.default_rng(8)
    a = np.exp(rng.normal(size=200))
    assert M.forget_quality(a, a.copy()) == 1.0
    assert M.forget_quality(a, np.exp(rng.normal(loc=3.0, size=150))) < 0.01
    b = np.exp(rng.normal(loc=0.2, size=80))
    # TOFU feeds 1/R to the KS test: the p-value must not depend on that choice.
    assert M.forget_quality(a, b) == pytest.approx(M.forget_quality(1 / a, 1 / b))
    assert M.forget_quality(a, b) == pytest.approx(scipy.stats.ks_2samp(a, b).pvalue)
    # the KS distance: 0 for one sample, 1 for disjoint ones, scipy's statistic otherwise
    assert M.ks_distance(a, a.copy()) == 0.0
    assert M.ks_distance(a, a.max() + 1 + a) == 1.0
    assert M.ks_distance(a, b) == pytest.approx(scipy.stats.ks_2samp(a, b).statistic)
    # unlike the p-value it does not depend on the sample size: eight copies of each sample
    # give the same distance and a far smaller p-value
    assert M.ks_distance(np.tile(a, 8), np.tile(b, 8)) == pytest.approx(M.ks_distance(a, b))
    assert M.forget_quality(np.tile(a, 8), np.tile(b, 8)) < M.forget_quality(a, b)


def test_harmonic_mean_and_model_utility():
    assert M.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([0.9, 0.0, 0.7]) == 0.0
    assert M.harmonic_mean(np.array([0.4])) == pytest.approx(0.4)
    assert M.model_utility({"prob": 0.5, "rouge": 0.25, "truth": 1.0}) == pytest.approx(
        3 / (2 + 4 + 1)
    )
    with pytest.raises(ValueError):
        M.harmonic_mean([0.5, -0.1])


def test_rouge_l_recall_hand_examples():
    assert M.rouge_l_recall("the cat sat", "the cat sat on the mat") == pytest.approx(3 / 6)
    assert M.rouge_l_recall("mat the on", "the cat sat on the mat") == pytest.approx(2 / 6)
    assert M.rouge_l_recall("The CAT", " the cat") == 1.0
    assert M.rouge_l_recall("He was born in Maresk.", " Maresk") == 1.0
    assert M.rouge_l_recall("Maresk.", "Maresk", keep_punct=True) == 0.0
    assert M.rouge_l_recall("a b c d", "x y") == 0.0
    assert M.rouge_l_recall("anything", "") == 0.0
    many = M.rouge_l_recall_many(["a b", "b a", ""], ["a b", "a b", "a"])
    np.testing.assert_allclose(many, [1.0, 0.5, 0.0])


def test_extraction_strength_pure():
    assert M.extraction_strength([1, 2, 3], [1, 2, 3]) == 1.0
    assert M.extraction_strength([9, 2, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert M.extraction_strength([1, 9, 3], [1, 2, 3]) == pytest.approx(1 / 3)
    assert M.extraction_strength([1, 2, 9], [1, 2, 3]) == 0.0
    assert M.extraction_strength(torch.tensor([4]), torch.tensor([4])) == 1.0


def test_auc_against_brute_force_pair_count():
    rng = np.random.default_rng(9)
    members = np.round(rng.normal(0.5, 1, size=37), 1)  # rounding creates ties
    nonmembers = np.round(rng.normal(0, 1, size=23), 1)
    brute = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers) / (37 * 23)
    assert M.auc(members, nonmembers) == pytest.approx(brute, abs=1e-12)
    assert M.auc(torch.tensor(members), torch.tensor(nonmembers)) == pytest.approx(brute)
    assert M.auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert M.auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert M.auc([1.0, 1.0], [1.0]) == 0.5
    assert M.privleak(0.8, 0.5) == pytest.approx(0.6)
    assert M.privleak(0.5, 0.5) == 0.0


def test_min_k_and_min_k_plus_plus_hand_computation():
    # Next-token distribution p = (1/2, 1/4, 1/4): mu = -1.5 ln 2, sigma = 0.5 ln 2.
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]], dtype=torch.float64))
    mu, sigma = M.logprob_moments(logp)
    ln2 = math.log(2)
    torch.testing.assert_close(mu, torch.tensor([-1.5 * ln2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sigma, torch.tensor([0.5 * ln2, 0.0], dtype=torch.float64))
    # Five tokens under that distribution: tokens 0,1,0,2,0 -> l = -ln2, -2ln2, -ln2, -2ln2, -ln2,
    # s = +1, -1, +1, -1, +1. k = 0.4 keeps the lowest two: mean -1.
    lp = np.array([-ln2, -2 * ln2, -ln2, -2 * ln2, -ln2])
    mus = np.full(5, -1.5 * ln2)
    sigmas = np.full(5, 0.5 * ln2)
    assert M.mia_min_k_plus_plus(lp, mus, sigmas, k=0.4) == pytest.approx(-1.0)
    assert M.mia_min_k_plus_plus(lp, mus, sigmas, k=1.0) == pytest.approx(0.2)
    # int(5 * 0.2) = 1 token
    assert M.mia_min_k_plus_plus(lp, mus, sigmas) == pytest.approx(-1.0)
    ll = np.array([-0.1, -5.0, -0.2, -3.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8])
    assert M.mia_min_k(ll, k=0.2) == pytest.approx(-4.0)
    assert M.mia_loss(ll) == pytest.approx(ll.mean())
    text = "Talia Vorhees was born in the city of Maresk"
    assert M.mia_zlib(ll, text) == pytest.approx(ll.mean() / len(zlib.compress(text.encode())))


@pytest.mark.parametrize("name", ["fact-world", "fact-world-llama"])
def test_cached_decoding_equals_the_rerun_on_absolute_and_rotary_positions(name):
    """The key-value cache (left padding, one token a step) against the whole-sequence rerun
    (right padding), greedy and sampled, on prompts of different lengths in one batch."""
    from kif import models

    m = models.load(name)
    prompts = ["Miasmar Viahos was born in", "Hello", "Q: Where was Vipan Gasa born?\nA:",
               "The person called Dilmis Nalstas works as a", "Fanir Segu's employer is"] * 3
    for kw in ({}, {"temperature": 1.0, "seed": 5}):
        cached = M.greedy_generate_ids(m, prompts, 10, batch_size=7, **kw)
        rerun = M.greedy_generate_ids(m, prompts, 10, batch_size=7, use_cache=False, **kw)
        assert cached == rerun
    # a permanent hook (a hook-based erasure) takes the rerun, so the hook sees every position
    seen = []
    m.blocks[0].hook_resid_post.add_hook(lambda x, hook: seen.append(x.shape[1]), is_permanent=True)
    try:
        assert M._has_hooks(m)
        M.greedy_generate_ids(m, prompts[:2], 3)
        assert min(seen) > 1
    finally:
        m.reset_hooks(including_permanent=True)
    assert not M._has_hooks(m)


def test_duplicate_pairs_are_scored_once_and_mapped_back(model):
    rng = np.random.default_rng(11)
    prompts = _sentences(rng, 4, 1, 6)
    answers = _sentences(rng, 4, 1, 3, lead=" ")
    order = [0, 1, 0, 2, 3, 3, 1, 0]
    rows = []

    def count(tokens, hook):
        rows.append(tokens.shape[0])

    model.hook_dict["hook_embed"].add_hook(count)
    try:
        dup = M.score_answers(model, [prompts[i] for i in order], [answers[i] for i in order])
    finally:
        model.reset_hooks()
    assert sum(rows) == 4  # four distinct pairs, one forward row each
    _check_against_ref(model, [prompts[i] for i in order], [answers[i] for i in order], dup)


def test_dedup_keeps_the_callers_row_numbers_in_errors_and_torch_hooks_take_the_rerun(model):
    with pytest.raises(ValueError, match="answer 3"):
        M.score_answers(model, ["a", "b", "a", "c"], [" x", " y", " x", ""])
    # a hook registered on a module directly (as HookedLoRA does) counts as a hook
    handle = model.blocks[0].register_forward_hook(lambda mod, inp, out: out)
    try:
        assert M._has_hooks(model)
    finally:
        handle.remove()
    assert not M._has_hooks(model) and M._one_device(model)
