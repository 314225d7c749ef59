"""Surface metrics and membership-inference scores (METHODS.md, "Surface metrics", "Membership
inference").

Two layers:

* **Model scorers** (batched, ``torch.inference_mode``): :func:`score_answers`,
  :func:`greedy_generate`, :func:`token_logprobs`, :func:`token_logprob_stats`. Every prompt is
  tokenized as ``[BOS] + tokens(prompt)`` (BOS only when ``model.cfg.default_prepend_bos``, as
  TransformerLens' ``to_tokens`` does) and an answer as ``tokens(answer)``, tokenized separately and
  concatenated so that the answer boundary is exact. A scoring batch is one forward over
  right-padded rows: with causal attention and absolute or rotary positions counted from the
  left, positions before the padding see exactly what they would see unpadded, so no attention
  mask is needed (``padding_side="right"`` is passed so that TransformerLens never builds a
  pad-id mask from a left-padding tokenizer). Generation without hooks is the exception: it
  left-pads with an attention mask and decodes with the key-value cache (:func:`_decode_cached`).
  Optional ``fwd_hooks`` go to ``model.run_with_hooks``, so hook-based erasures are scored by the
  same code.
* **Pure metrics** (numpy / torch in, floats / arrays out): TOFU's truth ratio, Forget Quality and
  Model Utility (Maini et al. 2024), ROUGE-L recall, MUSE's extraction strength and PrivLeak
  (Shi et al. 2024), and the membership-inference scores Loss, zlib (Carlini et al. 2021), Min-K%
  (Shi et al. 2024) and Min-K%++ (Zhang et al. 2024), with a Mann–Whitney AUC.

Sign convention for every membership-inference score: **higher means more likely a member**
(i.e. more likely seen in training).
"""

import dataclasses
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats
import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap as _softcap

FwdHook = tuple[str | Callable[[str], bool], Callable[..., Any]]
"""A TransformerLens forward hook: (hook name or name filter, hook function)."""

_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnswerScores:
    """Teacher-forced scores of one answer per prompt; every field has one entry per pair.

    Attributes:
        logprob: sum over answer tokens of log p(a_i | prompt, a_<i).
        n_tokens: number of answer tokens |a|.
        mean_nll: -logprob / |a|.
        prob: exp(-mean_nll), TOFU's length-normalized answer probability (Maini et al. 2024).
        correct: the argmax at every answer position equals the answer token (teacher-forced).
            By induction this equals "greedy decoding of |a| tokens reproduces the answer".
        first_rank: number of vocabulary entries with a strictly higher probability than the
            first answer token (0 = top-1).
        first_prob: p(a_0 | prompt).
        extraction: MUSE extraction strength 1 - k/|a| (Shi et al. 2024), see
            :func:`extraction_strength`.
    """

    logprob: Float[np.ndarray, "n"]
    n_tokens: Int[np.ndarray, "n"]
    mean_nll: Float[np.ndarray, "n"]
    prob: Float[np.ndarray, "n"]
    correct: Bool[np.ndarray, "n"]
    first_rank: Int[np.ndarray, "n"]
    first_prob: Float[np.ndarray, "n"]
    extraction: Float[np.ndarray, "n"]

    def __len__(self) -> int:
        return int(self.logprob.shape[0])

    def select(self, index: Int[np.ndarray, "m"] | Bool[np.ndarray, "n"]) -> "AnswerScores":
        """The scores of a subset of the pairs (integer indices or a boolean mask)."""
        fields = dataclasses.fields(self)
        return AnswerScores(**{f.name: getattr(self, f.name)[index] for f in fields})


@dataclasses.dataclass(frozen=True)
class TokenLogProbs:
    """Per-token statistics of one text, for membership inference (Zhang et al. 2024).

    Entry t is about the t-th scored token x_t (every token after the first one of
    ``[BOS] + tokens(text)``, i.e. every text token when a BOS is prepended).

    Attributes:
        logprob: l_t = log p(x_t | x_<t).
        mu: mean of log p under the model's own next-token distribution, sum_v p_v log p_v.
        sigma: its standard deviation, sqrt(sum_v p_v (log p_v - mu)^2).
    """

    logprob: Float[Tensor, "pos"]
    mu: Float[Tensor, "pos"]
    sigma: Float[Tensor, "pos"]


# --------------------------------------------------------------------------------------------
# Tokenization and batched forwards
# --------------------------------------------------------------------------------------------


def _bos_prefix(model: HookedTransformer) -> list[int]:
    if not model.cfg.default_prepend_bos:
        return []
    bos = model.tokenizer.bos_token_id
    if bos is None:
        raise ValueError("model.cfg.default_prepend_bos is set but the tokenizer has no BOS token")
    return [int(bos)]


def bos_offset(model: HookedTransformer) -> int:
    """Where a text's own tokens start in an :func:`encode_prompts` row: 1 after a BOS, 0 for a
    model that takes none (``model.cfg.default_prepend_bos`` off: GPT-NeoX / Pythia, Qwen2, any
    tokenizer without a BOS token). Code that skips the BOS position (the attention sink) skips
    exactly these positions, never a text token."""
    return len(_bos_prefix(model))


def _pad_id(model: HookedTransformer) -> int:
    tok = model.tokenizer
    for pid in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if pid is not None:
            return int(pid)
    return 0


def _tokenize(model: HookedTransformer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without any special token (one batched tokenizer call)."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer")
    if len(texts) == 0:
        return []
    ids = model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(map(int, x)) for x in ids]


def encode_prompts(model: HookedTransformer, prompts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + tokens(prompt)`` for every prompt (BOS per ``model.cfg.default_prepend_bos``)."""
    bos = _bos_prefix(model)
    return [bos + ids for ids in _tokenize(model, prompts)]


def encode_answers(model: HookedTransformer, answers: Sequence[str]) -> list[list[int]]:
    """``tokens(answer)`` for every answer, no special tokens (answers start with a space)."""
    return _tokenize(model, answers)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) to limit padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _check_ctx(model: HookedTransformer, length: int) -> None:
    if length > model.cfg.n_ctx:
        raise ValueError(f"sequence of {length} tokens exceeds the model's n_ctx={model.cfg.n_ctx}")


def _logits(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[FwdHook]
) -> Float[Tensor, "batch pos d_vocab_out"]:
    # padding_side="right": with a left-padding tokenizer TransformerLens would derive an
    # attention mask and positions from pad ids (slower, and pad ids can coincide with real
    # tokens, GPT-2: pad = eos = bos). Our rows are right-padded, so the plain causal forward is
    # the exact one.
    if fwd_hooks:
        return model.run_with_hooks(
            tokens, fwd_hooks=list(fwd_hooks), return_type="logits", padding_side="right"
        )
    return model(tokens, return_type="logits", padding_side="right")


def _head(
    model: HookedTransformer, resid: Float[Tensor, "*rows d_model"]
) -> Float[Tensor, "*rows d_vocab_out"]:
    """What TransformerLens's forward applies after the last block (final LayerNorm,
    unembedding, logit soft-cap), on the residual rows whose logits are needed only: the
    unembedding of every position costs d_vocab x d_model per token, a seventh of the fact-world
    model's forward and a third of GPT-2 small's."""
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    # not `model.unembed(...)`: TransformerLens's Unembed copies W_U.T into a contiguous
    # d_vocab x d_model matrix on every call (for HF's bf16 accumulation order), 150 MB on GPT-2
    # small, which cost more than the matmul itself in a loop of small heads; its hook points
    # still see the input and the logits
    u = model.unembed
    logits = u.hook_out(torch.addmm(u.b_U, u.hook_in(resid).reshape(-1, resid.shape[-1]), u.W_U))
    return _softcap(logits.reshape(*resid.shape[:-1], -1), model.cfg.output_logits_soft_cap)


def _logits_at(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    starts: Sequence[int],
    width: int,
    fwd_hooks: Sequence[FwdHook],
) -> Float[Tensor, "batch width d_vocab_out"]:
    """Logits at positions ``starts[b] .. starts[b] + width - 1`` of each right-padded row
    (positions past the row's end are clamped to its last; callers mask them). Without hooks only
    those positions are unembedded; with hooks the whole forward runs, so that a hook on the final
    LayerNorm or the unembedding sees every position as in ``model.run_with_hooks``."""
    pos = torch.tensor(starts, dtype=torch.long, device=tokens.device)[:, None] + torch.arange(
        width, device=tokens.device
    )
    pos = pos.clamp_max(tokens.shape[1] - 1)
    if fwd_hooks:
        logits = _logits(model, tokens, fwd_hooks)
        return logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
    resid = model(tokens, padding_side="right", stop_at_layer=model.cfg.n_layers)
    return _head(model, resid.gather(1, pos[:, :, None].expand(-1, -1, resid.shape[-1])))


def _padded(
    model: HookedTransformer, seqs: Sequence[Sequence[int]]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch"]]:
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    _check_ctx(model, width)
    tokens = torch.full((len(seqs), width), _pad_id(model), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens.to(model.cfg.device), torch.tensor(lengths, dtype=torch.long)


def _left_padded(
    model: HookedTransformer, seqs: Sequence[Sequence[int]]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token ids left-padded to the longest, and the attention mask that hides the padding (for
    TransformerLens's key-value cache, which counts each row's positions from its first token)."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[r, width - len(s):] = 1
    return tokens.to(model.cfg.device), mask.to(model.cfg.device)


# --------------------------------------------------------------------------------------------
# Model scorers
# --------------------------------------------------------------------------------------------


def _empty_scores(a_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Per-row score buffers that the batches fill in (`_answer_stats`'s keys and n_tokens)."""
    n = len(a_ids)
    return {
        "logprob": np.zeros(n, dtype=np.float64),
        "n_tokens": np.array([len(a) for a in a_ids], dtype=np.int64),
        "correct": np.zeros(n, dtype=bool),
        "first_rank": np.zeros(n, dtype=np.int64),
        "first_prob": np.zeros(n, dtype=np.float64),
        "extraction": np.zeros(n, dtype=np.float64),
    }


def _scores(out: dict[str, np.ndarray]) -> AnswerScores:
    mean_nll = -out["logprob"] / out["n_tokens"]
    return AnswerScores(logprob=out["logprob"], n_tokens=out["n_tokens"], mean_nll=mean_nll,
                        prob=np.exp(-mean_nll), correct=out["correct"],
                        first_rank=out["first_rank"], first_prob=out["first_prob"],
                        extraction=out["extraction"])


def score_answers(
    model: HookedTransformer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 256,
    fwd_hooks: Sequence[FwdHook] = (),
) -> AnswerScores:
    """Teacher-forced scores of ``answers[i]`` after ``prompts[i]`` (see :class:`AnswerScores`).

    One forward per batch of right-padded ``[BOS] + prompt + answer`` rows, each distinct
    (prompt, answer) pair once. The log-softmax is
    taken in float32 on the answer positions only, sums are accumulated in float64.
    TOFU's probability P = exp(-mean NLL) follows Maini et al. 2024, the extraction strength
    Shi et al. 2024 (MUSE).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    p_ids = encode_prompts(model, prompts)
    a_ids = encode_answers(model, answers)
    for i, a in enumerate(a_ids):
        if not a:
            raise ValueError(f"answer {i} ({answers[i]!r}) has no tokens")
        if not p_ids[i]:
            raise ValueError(f"prompt {i} has no tokens and no BOS to condition on")
    # each distinct pair runs once (callers' grids repeat rows); the others copy its scores
    first = _first_rows(zip(prompts, answers))
    todo = [i for i, f in enumerate(first) if f == i]
    out = _empty_scores(a_ids)
    seqs = [p + a for p, a in zip(p_ids, a_ids)]
    with torch.inference_mode():
        for part in _batches([len(seqs[i]) for i in todo], batch_size):
            idx = [todo[j] for j in part]
            tokens, _ = _padded(model, [seqs[i] for i in idx])
            answers = [a_ids[i] for i in idx]
            # the logits that predict the answer tokens: from the prompt's last position on
            logits = _logits_at(model, tokens, [len(p_ids[i]) - 1 for i in idx],
                                max(len(a) for a in answers), fwd_hooks)
            res = _answer_stats(logits, [1] * len(idx), answers)
            for key, val in res.items():
                out[key][idx] = val
    return _scores(out).select(np.asarray(first, dtype=np.int64))


def _first_rows(keys: Iterable) -> list[int]:
    """For each row, the index of the first row with the same key."""
    seen: dict = {}
    return [seen.setdefault(k, i) for i, k in enumerate(keys)]


def _kv_cache_class():
    """TransformerLens's key-value cache class (its module moved between versions), or None."""
    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        return TransformerLensKeyValueCache
    except ImportError:
        try:
            from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache
            return HookedTransformerKeyValueCache
        except ImportError:
            return None


def score_candidates(
    model: HookedTransformer,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    fwd_hooks: Sequence[FwdHook] = (),
) -> AnswerScores:
    """:func:`score_answers` of every candidate answer of every prompt, rows in order (prompt 0's
    candidates, then prompt 1's, ...), with each prompt run once.

    A truth ratio scores six answers after one question: run as six full rows, the question's
    tokens (most of each row) are recomputed six times. Here prompts of one token length are run
    together without padding, their keys and values (TransformerLens's KV cache) are repeated
    once per candidate of more than one token, and only the answer tokens are run on top (a
    one-token answer needs the prompt's last logits alone); answers are right-padded,
    which the causal mask makes exact. Same numbers as score_answers up to float rounding.
    Forward hooks see the prompt and the answer in two calls (a hook that indexes positions,
    e.g. skipping BOS, would misread the second), so with `fwd_hooks`, or without a KV cache
    in this TransformerLens, the expanded rows go through score_answers.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    flat_p = [p for p, c in zip(prompts, candidates) for _ in c]
    flat_a = [a for c in candidates for a in c]
    # a hook sees the prompt and the answer in two calls: one that indexes positions (the
    # capsule's gate leaves position 0 alone) would misread the answer's, so hooked models, by
    # argument or applied to the model (`Erasure.apply`), take the full forward
    if (fwd_hooks or _has_hooks(model) or not isinstance(model, HookedTransformer)
            or kv_cache_unsupported(model) is not None):
        return score_answers(model, flat_p, flat_a, batch_size=batch_size, fwd_hooks=fwd_hooks)
    cache_cls = _kv_cache_class()
    p_ids = encode_prompts(model, prompts)
    a_ids = encode_answers(model, flat_a)
    for i, a in enumerate(a_ids):
        if not a:
            raise ValueError(f"answer {i} ({flat_a[i]!r}) has no tokens")
    if any(not p for p in p_ids):
        raise ValueError("a prompt has no tokens and no BOS to condition on")
    first = np.cumsum([0] + [len(c) for c in candidates])  # first flat row of each prompt
    out = _empty_scores(a_ids)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(p_ids):
        if len(candidates[i]):
            by_length.setdefault(len(ids), []).append(i)
    device = model.cfg.device
    with torch.inference_mode():
        for length, members in by_length.items():
            # bound the candidate rows of one batch (the repeated cache is rows x length)
            per = max(1, batch_size // max(len(candidates[i]) for i in members))
            for s in range(0, len(members), per):
                chunk = members[s:s + per]
                _check_ctx(model, length + max(len(a_ids[r]) for i in chunk
                                                for r in range(first[i], first[i + 1])))
                tokens = torch.tensor([p_ids[i] for i in chunk], dtype=torch.long, device=device)
                cache = cache_cls.init_cache(model.cfg, device, len(chunk))
                resid = model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=cache,
                              stop_at_layer=model.cfg.n_layers)
                last = _head(model, resid[:, -1:])  # [prompts, 1, d_vocab]
                rows = [r for i in chunk for r in range(first[i], first[i + 1])]
                rep = [j for j, i in enumerate(chunk) for _ in range(first[i], first[i + 1])]
                # a one-token answer is scored by the prompt's last logits alone; only the longer
                # ones run on the cache (in the fact world two thirds of the candidates are one
                # token)
                short = [k for k, r in enumerate(rows) if len(a_ids[r]) == 1]
                long = [k for k, r in enumerate(rows) if len(a_ids[r]) > 1]
                if short:
                    res = _answer_stats(last[torch.tensor([rep[k] for k in short], device=device)],
                                        [1] * len(short), [a_ids[rows[k]] for k in short])
                    for key, val in res.items():
                        out[key][[rows[k] for k in short]] = val
                if long:
                    sel = torch.tensor([rep[k] for k in long], device=device)
                    for entry in cache.entries:
                        entry.past_keys = entry.past_keys[sel]
                        entry.past_values = entry.past_values[sel]
                    cache.previous_attention_mask = cache.previous_attention_mask[sel]
                    answers = [a_ids[rows[k]] for k in long]
                    inp, _ = _padded(model, [a[:-1] for a in answers])  # right-padded
                    rest = model(inp, attention_mask=torch.ones_like(inp), past_kv_cache=cache)
                    res = _answer_stats(torch.cat([last[sel], rest], dim=1), [1] * len(long),
                                        answers)
                    for key, val in res.items():
                        out[key][[rows[k] for k in long]] = val
    return _scores(out)


def _answer_stats(
    logits: Float[Tensor, "batch pos d_vocab_out"],
    prompt_lens: Sequence[int],
    answers: Sequence[Sequence[int]],
) -> dict[str, np.ndarray]:
    device = logits.device
    n_ans = torch.tensor([len(a) for a in answers], dtype=torch.long, device=device)
    width = int(n_ans.max())
    offsets = torch.arange(width, device=device)
    valid = offsets[None, :] < n_ans[:, None]  # [batch, width]
    # Logits at position P-1+j predict answer token j.
    start = torch.tensor(prompt_lens, dtype=torch.long, device=device) - 1
    pos = torch.where(valid, start[:, None] + offsets[None, :], 0)
    targets = torch.zeros(len(answers), width, dtype=torch.long)
    for i, a in enumerate(answers):
        targets[i, : len(a)] = torch.tensor(a, dtype=torch.long)
    targets = targets.to(device)
    d_vocab = logits.shape[-1]
    sel = logits.gather(1, pos[:, :, None].expand(-1, -1, d_vocab)).float()  # [batch, width, V]
    logp = torch.log_softmax(sel, dim=-1)
    tok_lp = logp.gather(-1, targets[:, :, None]).squeeze(-1)  # [batch, width]
    logprob = torch.where(valid, tok_lp.double(), 0.0).sum(-1)
    # argmax of the raw logits, as greedy decoding takes it.
    match = (sel.argmax(-1) == targets) | ~valid
    correct = match.all(-1)
    # Extraction strength: k = first index from which every later argmax matches, so
    # 1 - k/|a| = (number of trailing matches) / |a|; padding slots count as matches, remove them.
    trailing = match.flip(-1).long().cumprod(-1).sum(-1) - (width - n_ans)
    extraction = trailing.double() / n_ans.double()
    first_rank = (logp[:, 0, :] > tok_lp[:, 0, None]).sum(-1)
    first_prob = tok_lp[:, 0].double().exp()
    return {
        "logprob": logprob.cpu().numpy(),
        "correct": correct.cpu().numpy(),
        "first_rank": first_rank.cpu().numpy().astype(np.int64),
        "first_prob": first_prob.cpu().numpy(),
        "extraction": extraction.cpu().numpy(),
    }


def greedy_generate_ids(
    model: HookedTransformer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 256,
    fwd_hooks: Sequence[FwdHook] = (),
    stop_at_eos: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation token ids of ``[BOS] + tokens(prompt)``, ``max_new_tokens`` each
    (with ``temperature`` > 0: sampled from the softmax of logits / temperature instead, from a
    generator seeded with ``seed``, so that a sample is reproducible).

    Without hooks (``fwd_hooks`` empty and no permanent hook on the model), rows are left-padded
    and decoded with TransformerLens's key-value cache: the prompts run once, then one token per
    row per step (:func:`_decode_cached`). With hooks, rows are right-padded and each step reruns
    the whole sequence, so that a hook sees the full sequence exactly as in
    :func:`score_answers` (see the comment in the body). Both are exact for absolute and rotary
    positions; they agree up to float rounding (tested). ``use_cache=False`` forces the rerun.
    With ``stop_at_eos`` a continuation is cut before its first EOS token.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    p_ids = encode_prompts(model, prompts)
    out: list[list[int]] = [[] for _ in p_ids]
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    if max_new_tokens == 0:
        return out
    for i, p in enumerate(p_ids):
        if not p:
            raise ValueError(f"prompt {i} has no tokens and no BOS to condition on")
    # Without the cache (below), one forward per step for a whole batch of right-padded rows:
    # row r's next token is read at its own last position and written just after it. With
    # causal attention and positions counted from the left, the padding after a row's end is
    # invisible to it, so this equals
    # unpadded decoding (prompts of equal length would need no padding, but bucketing by length
    # gives many small forwards, which on a CPU cost far more than the padding).
    # the cached path is tested on absolute and rotary positions; what else takes the rerun:
    # `kv_cache_unsupported`
    cached = (use_cache and not fwd_hooks and not _has_hooks(model)
              and kv_cache_unsupported(model) is None)
    with torch.inference_mode():
        for idx in _batches([len(p) for p in p_ids], batch_size):
            if cached:
                rows = _decode_cached(model, [p_ids[i] for i in idx], max_new_tokens,
                                      temperature, gen)
                for r, i in enumerate(idx):
                    out[i] = rows[r]
                continue
            lengths = torch.tensor([len(p_ids[i]) for i in idx], dtype=torch.long)
            width = int(lengths.max()) + max_new_tokens
            _check_ctx(model, width - 1)
            tokens = torch.full((len(idx), width), _pad_id(model), dtype=torch.long)
            for r, i in enumerate(idx):
                tokens[r, : len(p_ids[i])] = torch.tensor(p_ids[i], dtype=torch.long)
            tokens = tokens.to(model.cfg.device)
            rows = torch.arange(len(idx), device=tokens.device)
            cur = lengths.to(tokens.device)
            for _ in range(max_new_tokens):
                # only each row's last position is unembedded (as score_answers does): the full
                # d_vocab unembedding of every position cost more than the blocks on small models
                last = _logits_at(model, tokens[:, : int(cur.max())], (cur - 1).tolist(), 1,
                                  fwd_hooks)[:, 0]
                nxt = _next_token(last.float(), temperature, gen)
                tokens[rows, cur] = nxt
                cur = cur + 1
            for r, i in enumerate(idx):
                out[i] = tokens[r, int(lengths[r]) : int(lengths[r]) + max_new_tokens].cpu().tolist()
    eos = model.tokenizer.eos_token_id
    if stop_at_eos and eos is not None:
        out = [row[: row.index(eos)] if eos in row else row for row in out]
    return out


def _has_hooks(model: torch.nn.Module) -> bool:
    """Whether any module of the model carries a forward hook: TransformerLens's hook points
    (a hook-based erasure applied) and hooks registered on modules directly (`HookedLoRA`)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def kv_cache_unsupported(model) -> str | None:
    """Why TransformerLens's key-value cache would not reproduce the full forward for `model`
    (None: it does). One rule for every shortcut through the cache (cached generation, candidate
    scoring, knowledge-neuron attribution, STAMP's residual targets): a TransformerLens with the
    cache, the blocks on one device (the cache is made on the model's device, `_one_device`),
    absolute or rotary positions (the ones kif's cached paths are tested on). Hooks are the
    caller's concern: a hook that indexes positions misreads a forward split in two, and only the
    caller knows which hooks run."""
    c = model.cfg
    if _kv_cache_class() is None:
        return "this TransformerLens has no key-value cache"
    if not _one_device(model):
        return "the model's blocks are on several devices"
    if c.positional_embedding_type not in ("standard", "rotary"):
        return f"{c.positional_embedding_type!r} positions"
    return None


def _one_device(model: HookedTransformer) -> bool:
    """Whether the blocks run on one accelerator (or none): the key-value cache is made on the
    model's device, so a model split over several GPUs (`device_map`) takes the rerun."""
    return len({p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")}) <= 1


def _decode_cached(
    model: HookedTransformer,
    p_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    gen: torch.Generator | None,
) -> list[list[int]]:
    """`max_new_tokens` tokens after each row of `p_ids`, with TransformerLens's key-value cache:
    the left-padded prompts run once (the attention mask hides the padding and gives every row
    positions counted from its own first token, absolute or rotary), then each step feeds one
    token per row. Only the last position is unembedded."""
    _check_ctx(model, max(len(p) for p in p_ids) + max_new_tokens - 1)
    device = model.cfg.device
    tokens, mask = _left_padded(model, p_ids)
    cache = _kv_cache_class().init_cache(model.cfg, device, len(p_ids))
    step_mask = torch.ones((len(p_ids), 1), dtype=torch.long, device=device)
    out = []
    for t in range(max_new_tokens):
        resid = model(tokens, attention_mask=mask, past_kv_cache=cache,
                      stop_at_layer=model.cfg.n_layers)
        nxt = _next_token(_head(model, resid[:, -1]).float(), temperature, gen)
        out.append(nxt)
        tokens, mask = nxt[:, None], step_mask
    return torch.stack(out, 1).cpu().tolist()


def _next_token(logits: Float[Tensor, "batch d_vocab_out"], temperature: float,
                gen: torch.Generator | None) -> Int[Tensor, "batch"]:
    if temperature == 0:
        return logits.argmax(-1)
    # sampled on the CPU from one generator: the same draws whatever the model's device
    probs = torch.softmax(logits / temperature, -1).cpu()
    return torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)


def token_matches(
    model: HookedTransformer,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[int]],
    *,
    batch_size: int = 256,
) -> list[Bool[np.ndarray, "k"]]:
    """For each prompt, whether the model's argmax after ``[BOS] + prompt + c_<j`` is ``c_j``, at
    every token j of its continuation ids (teacher-forced: one forward per batch, as
    :func:`score_answers`); an empty continuation gives an empty row."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    # each distinct pair runs once, as in score_answers; a repeat gets its own copy
    first = _first_rows((p, tuple(c)) for p, c in zip(prompts, continuations))
    p_ids = encode_prompts(model, prompts)
    out = [np.zeros(len(c), dtype=bool) for c in continuations]
    todo = [i for i, c in enumerate(continuations) if c and first[i] == i]
    seqs = {i: p_ids[i] + list(continuations[i]) for i in todo}
    with torch.inference_mode():
        for part in _batches([len(seqs[i]) for i in todo], batch_size):
            idx = [todo[j] for j in part]
            tokens, _ = _padded(model, [seqs[i] for i in idx])
            width = max(len(continuations[i]) for i in idx)
            logits = _logits_at(model, tokens, [len(p_ids[i]) - 1 for i in idx], width, ())
            best = logits.argmax(-1).cpu().numpy()
            for r, i in enumerate(idx):
                k = len(continuations[i])
                out[i] = best[r, :k] == np.asarray(continuations[i])
    return [out[i] if f == i else out[f].copy() for i, f in enumerate(first)]


def greedy_generate(
    model: HookedTransformer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 256,
    fwd_hooks: Sequence[FwdHook] = (),
    stop_at_eos: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
    use_cache: bool = True,
) -> list[str]:
    """Decoded greedy (or sampled) continuations (see :func:`greedy_generate_ids`)."""
    ids = greedy_generate_ids(
        model,
        prompts,
        max_new_tokens,
        batch_size=batch_size,
        fwd_hooks=fwd_hooks,
        stop_at_eos=stop_at_eos,
        temperature=temperature,
        seed=seed,
        use_cache=use_cache,
    )
    return [model.tokenizer.decode(row) for row in ids]


def logprob_moments(
    logp: Float[Tensor, "*batch d_vocab"],
) -> tuple[Float[Tensor, "*batch"], Float[Tensor, "*batch"]]:
    """Mean and std of log p under p itself: mu = sum_v p_v log p_v,
    sigma = sqrt(sum_v p_v (log p_v - mu)^2) (Min-K%++, Zhang et al. 2024, Eq. 4).

    ``logp`` is a log-softmax over the last axis. The centred form of the variance equals
    sum_v p_v (log p_v)^2 - mu^2 but does not cancel catastrophically in float32. Entries with
    p_v = 0 (log p_v = -inf) contribute 0.
    """
    p = logp.exp()
    finite = torch.isfinite(logp)
    safe = torch.where(finite, logp, 0.0)
    mu = (p * safe).sum(-1)
    var = (p * torch.where(finite, safe - mu[..., None], 0.0).square()).sum(-1)
    return mu, var.clamp_min(0.0).sqrt()


def _token_stats(
    model: HookedTransformer,
    texts: Sequence[str],
    batch_size: int,
    fwd_hooks: Sequence[FwdHook],
    moments: bool,
) -> list[TokenLogProbs]:
    seqs = encode_prompts(model, texts)
    out: list[TokenLogProbs | None] = [None] * len(seqs)
    empty = torch.zeros(0, dtype=torch.float64)
    for i, s in enumerate(seqs):
        if len(s) < 2:
            out[i] = TokenLogProbs(logprob=empty, mu=empty, sigma=empty)
    todo = [i for i, s in enumerate(seqs) if len(s) >= 2]
    with torch.inference_mode():
        for batch in _batches([len(seqs[i]) for i in todo], batch_size):
            idx = [todo[j] for j in batch]
            tokens, lengths = _padded(model, [seqs[i] for i in idx])
            logp = torch.log_softmax(_logits(model, tokens, fwd_hooks)[:, :-1].float(), dim=-1)
            lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
            if moments:
                mu, sigma = logprob_moments(logp)
            else:  # token_logprobs only reads l_t
                mu = sigma = torch.full_like(lp, float("nan"))
            lp, mu, sigma = (x.double().cpu() for x in (lp, mu, sigma))
            for row, i in enumerate(idx):
                n = int(lengths[row]) - 1
                out[i] = TokenLogProbs(
                    logprob=lp[row, :n].clone(),
                    mu=mu[row, :n].clone(),
                    sigma=sigma[row, :n].clone(),
                )
    return [o for o in out if o is not None]


def token_logprobs(
    model: HookedTransformer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    fwd_hooks: Sequence[FwdHook] = (),
) -> list[Float[Tensor, "pos"]]:
    """l_t = log p(x_t | x_<t) for every token of each text after ``[BOS]`` (float64, on CPU).

    The inputs of the membership-inference scores (Loss, zlib, Min-K%; Shi et al. 2024).
    A text of n tokens gives n entries when a BOS is prepended (n - 1 otherwise).
    """
    return [s.logprob for s in _token_stats(model, texts, batch_size, fwd_hooks, moments=False)]


def token_logprob_stats(
    model: HookedTransformer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    fwd_hooks: Sequence[FwdHook] = (),
) -> list[TokenLogProbs]:
    """l_t together with mu_t and sigma_t of log p under the model's own next-token distribution
    (for Min-K%++, Zhang et al. 2024), per text, float64 on CPU. See :class:`TokenLogProbs`."""
    return _token_stats(model, texts, batch_size, fwd_hooks, moments=True)


def accuracy(scores: AnswerScores) -> float:
    """Fraction of pairs whose greedy answer equals the fact (``scores.correct``)."""
    if len(scores) == 0:
        raise ValueError("accuracy of an empty set of scores")
    return float(np.mean(scores.correct))


def probe_accuracy(model: HookedTransformer, probes: Sequence[Any], *,
                   fwd_hooks: Sequence[FwdHook] = ()) -> float:
    """:func:`accuracy` of `probes` (anything with ``.prompt`` and ``.answer``) under `model`."""
    return accuracy(score_answers(model, [p.prompt for p in probes], [p.answer for p in probes],
                                  fwd_hooks=fwd_hooks))


# --------------------------------------------------------------------------------------------
# Pure metrics: TOFU
# --------------------------------------------------------------------------------------------

_Vec = Float[np.ndarray, "n"] | Float[Tensor, "n"] | Sequence[float]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def truth_ratio(
    true_prob: Float[np.ndarray, "n"] | Float[Tensor, "n"],
    perturbed_probs: Float[np.ndarray, "n k"] | Float[Tensor, "n k"],
) -> Float[np.ndarray, "n"]:
    """TOFU truth ratio R = P̄(perturbed) / P(true) per question (Maini et al. 2024, Eq. 2).

    P̄ is the geometric mean over the k perturbed (wrong) answers; ``true_prob`` is the
    probability of the (paraphrased) correct answer. Probabilities are length-normalized,
    P = exp(-mean NLL) (:attr:`AnswerScores.prob`). Computed in log space; R is large when the
    model prefers wrong answers. P(true) = 0 gives R = inf.
    """
    t = _np(true_prob)
    p = _np(perturbed_probs)
    if np.any(t < 0) or np.any(p < 0):
        raise ValueError("probabilities must be non-negative")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = np.log(p).mean(axis=1) - np.log(t)
        r = np.exp(log_r)
    return np.where(np.isnan(r), np.inf, r)


def truth_score(r: _Vec) -> float:
    """TOFU's truth-ratio component of Model Utility: mean over questions of max(0, 1 - R)
    (Maini et al. 2024; TOFU's code computes max(0, 1 - 1/x) with x = 1/R on retain sets).

    1 when the model always prefers the correct answer by far, 0 when wrong answers are at least
    as likely. Returns the mean (the per-question values are ``np.maximum(0, 1 - R)``).
    """
    a = _np(r)
    if a.size == 0:
        raise ValueError("truth_score of an empty array")
    return float(np.mean(np.maximum(0.0, 1.0 - a)))


def forget_quality(
    r_unlearned: _Vec,
    r_oracle: Float[np.ndarray, "m"] | Float[Tensor, "m"] | Sequence[float],
) -> float:
    """Forget Quality: p-value of the two-sided two-sample Kolmogorov–Smirnov test between the
    unlearned model's and the oracle's truth ratios on the forget set (Maini et al. 2024).

    TOFU feeds 1/R to the test; KS statistics only depend on ranks and x -> 1/x is monotone on
    R > 0, so the p-value is the same. Identical samples give exactly 1.0.
    """
    res = _ks(r_unlearned, r_oracle)
    if res.statistic == 0:
        return 1.0
    return float(min(1.0, max(0.0, res.pvalue)))


def ks_distance(
    r_unlearned: _Vec,
    r_oracle: Float[np.ndarray, "m"] | Float[Tensor, "m"] | Sequence[float],
) -> float:
    """The two-sample Kolmogorov–Smirnov statistic behind `forget_quality`: the largest gap
    between the two empirical CDFs of truth ratios (0: the same distribution). Unlike the p-value
    it does not shrink with the sample size, so it compares sets of different sizes and resolves
    differences that the 0-1 p-value saturates on."""
    return float(_ks(r_unlearned, r_oracle).statistic)


def _ks(a, b):
    a, b = _np(a), _np(b)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs two non-empty samples")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("truth ratios contain NaN")
    return scipy.stats.ks_2samp(a, b, alternative="two-sided")


def harmonic_mean(values: Real[np.ndarray, "n"] | Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 if any value is 0 (TOFU Model Utility)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("harmonic_mean of no values")
    if np.isnan(a).any() or (a < 0).any():
        raise ValueError(f"harmonic_mean needs non-negative values, got {a}")
    if (a == 0).any():
        return 0.0
    return float(a.size / np.sum(1.0 / a))


def model_utility(components: Mapping[str, float]) -> float:
    """TOFU Model Utility (Maini et al. 2024): harmonic mean of its components, e.g.
    ``{"retain/prob": ..., "retain/rouge": ..., "retain/truth": ..., "shared/prob": ...}``
    (probability, ROUGE-L recall and :func:`truth_score` on the retain set and the shared facts,
    METHODS.md)."""
    return harmonic_mean([float(v) for v in components.values()])


# --------------------------------------------------------------------------------------------
# Pure metrics: ROUGE-L and extraction strength
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")


def _words(text: str, keep_punct: bool) -> list[str]:
    text = text.lower()
    return text.split() if keep_punct else _WORD.findall(text)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_recall(prediction: str, reference: str, *, keep_punct: bool = False) -> float:
    """ROUGE-L recall LCS(pred, ref) / |ref| over lower-cased word tokens (Lin 2004; TOFU).

    Tokens are the lower-cased alphanumeric runs of the text, like ``rouge_score``'s default
    tokenizer (punctuation separates words and is dropped, so "Maresk." matches "Maresk"), without
    stemming. ``keep_punct=True`` splits on whitespace only. An empty reference gives 0.
    """
    ref = _words(reference, keep_punct)
    if not ref:
        return 0.0
    return _lcs(_words(prediction, keep_punct), ref) / len(ref)


def rouge_l_recall_many(
    predictions: Sequence[str], references: Sequence[str], *, keep_punct: bool = False
) -> Float[np.ndarray, "n"]:
    """:func:`rouge_l_recall` for each (prediction, reference) pair."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return np.array(
        [rouge_l_recall(p, r, keep_punct=keep_punct) for p, r in zip(predictions, references)],
        dtype=np.float64,
    )


def extraction_strength(
    pred_tokens: Int[Tensor, "n"] | Int[np.ndarray, "n"] | Sequence[int],
    answer_tokens: Int[Tensor, "n"] | Int[np.ndarray, "n"] | Sequence[int],
) -> float:
    """MUSE extraction strength ES = 1 - k/|a| (Shi et al. 2024, MUSE; Carlini et al. 2021).

    k is the smallest prefix length from which greedy decoding given ``a_<k`` reproduces
    ``a_>=k``. ``pred_tokens`` are the teacher-forced argmax tokens at the answer positions;
    greedy decoding from a_<k reproduces the rest iff pred_j = a_j for all j >= k (by induction
    the greedy context then equals the true prefix), so k = |a| - (number of trailing matches).
    ES = 1 when the whole answer is greedily reproduced, 0 when not even its last token is.
    """
    pred = [int(x) for x in pred_tokens]
    ans = [int(x) for x in answer_tokens]
    if len(pred) != len(ans) or not ans:
        raise ValueError("pred_tokens and answer_tokens must have the same non-zero length")
    k = len(ans)
    while k > 0 and pred[k - 1] == ans[k - 1]:
        k -= 1
    return 1.0 - k / len(ans)


# --------------------------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------------------------

_Tok = Float[Tensor, "pos"] | Float[np.ndarray, "pos"] | Sequence[float]


def _nonempty(x: Any) -> np.ndarray:
    a = _np(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError("need a non-empty 1-D array of per-token values")
    return a


def _lowest_k_mean(a: np.ndarray, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    # Shi et al.'s code keeps int(n * k) values; at least one so short texts still get a score.
    m = max(1, int(a.size * k))
    return float(np.mean(np.sort(a)[:m]))


def mia_loss(logprobs: _Tok) -> float:
    """Loss attack (Yeom et al. 2018; MUSE, Shi et al. 2024): mean l_t = -mean NLL.
    Higher = more likely a member."""
    return float(np.mean(_nonempty(logprobs)))


def zlib_length(text: str) -> int:
    """Length in bytes of ``zlib.compress`` of the text's UTF-8 bytes (Carlini et al. 2021)."""
    return len(zlib.compress(text.encode("utf-8")))


def mia_zlib(logprobs: _Tok, text: str) -> float:
    """zlib attack (Carlini et al. 2021; as in Shi et al. 2024's code): mean l_t / zlib length.

    mean l_t is a (negative) log-likelihood, so the score is -NLL / zlib bytes: higher = more
    likely a member, and text that compresses well (low zlib length) needs a higher likelihood to
    look like a member.
    """
    return mia_loss(logprobs) / zlib_length(text)


def mia_min_k(logprobs: _Tok, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest k fraction of l_t (at least one token).
    Higher = more likely a member."""
    return _lowest_k_mean(_nonempty(logprobs), k)


def mia_min_k_plus_plus(
    logprobs: Float[Tensor, "pos"] | Float[np.ndarray, "pos"] | Sequence[float],
    mu: Float[Tensor, "pos"] | Float[np.ndarray, "pos"] | Sequence[float],
    sigma: Float[Tensor, "pos"] | Float[np.ndarray, "pos"] | Sequence[float],
    k: float = 0.2,
) -> float:
    """Min-K%++ (Zhang et al. 2024, Eq. 4): s_t = (l_t - mu_t) / sigma_t, score = mean of the
    lowest k fraction of s_t. Higher = more likely a member. sigma_t is floored at 1e-12 (a
    one-hot next-token distribution)."""
    lp, m, s = _nonempty(logprobs), _nonempty(mu), _nonempty(sigma)
    if not lp.shape == m.shape == s.shape:
        raise ValueError("logprobs, mu and sigma must have the same length")
    return _lowest_k_mean((lp - m) / np.maximum(s, _EPS), k)


def mia_scores(
    stats: Sequence[TokenLogProbs], texts: Sequence[str], *, k: float = 0.2
) -> dict[str, Float[np.ndarray, "n"]]:
    """All four membership scores per text: ``{"loss", "zlib", "min_k", "min_k_pp"}``
    (higher = more likely a member), from :func:`token_logprob_stats` of the same texts."""
    if len(stats) != len(texts):
        raise ValueError(f"{len(stats)} stats but {len(texts)} texts")
    rows = [
        (
            mia_loss(s.logprob),
            mia_zlib(s.logprob, t),
            mia_min_k(s.logprob, k),
            mia_min_k_plus_plus(s.logprob, s.mu, s.sigma, k),
        )
        for s, t in zip(stats, texts)
    ]
    arr = np.array(rows, dtype=np.float64).reshape(len(rows), 4)
    return {name: arr[:, j].copy() for j, name in enumerate(("loss", "zlib", "min_k", "min_k_pp"))}


def auc(
    member_scores: Real[np.ndarray, "n"] | Real[Tensor, "n"] | Sequence[float],
    nonmember_scores: Real[np.ndarray, "m"] | Real[Tensor, "m"] | Sequence[float],
) -> float:
    """ROC AUC of "member" vs "non-member" = P(s_member > s_nonmember) + P(=)/2, the
    Mann–Whitney U statistic over n*m (exact, O((n+m) log m))."""
    a, b = _np(member_scores), _np(nonmember_scores)
    if a.size == 0 or b.size == 0:
        raise ValueError("auc needs both classes")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("scores contain NaN")
    b = np.sort(b)
    below = np.searchsorted(b, a, side="left")
    at_or_below = np.searchsorted(b, a, side="right")
    u = below.sum() + 0.5 * (at_or_below - below).sum()
    return float(u / (a.size * b.size))


def privleak(auc_unlearned: float, auc_oracle: float) -> float:
    """MUSE PrivLeak (Shi et al. 2024): (AUC_unlearned - AUC_oracle) / AUC_oracle, with AUCs of a
    membership attack on forget (members) vs holdout (non-members) text. 0 = like the oracle;
    positive = the forget set still looks trained on (under-unlearning), negative =
    over-unlearning."""
    if auc_oracle <= 0:
        raise ValueError(f"auc_oracle must be positive, got {auc_oracle}")
    return float((auc_unlearned - auc_oracle) / auc_oracle)


__all__ = [
    "AnswerScores",
    "FwdHook",
    "TokenLogProbs",
    "accuracy",
    "auc",
    "bos_offset",
    "encode_answers",
    "encode_prompts",
    "extraction_strength",
    "forget_quality",
    "greedy_generate",
    "ks_distance",
    "greedy_generate_ids",
    "harmonic_mean",
    "logprob_moments",
    "mia_loss",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_scores",
    "mia_zlib",
    "model_utility",
    "privleak",
    "probe_accuracy",
    "rouge_l_recall",
    "rouge_l_recall_many",
    "score_answers",
    "score_candidates",
    "token_logprob_stats",
    "token_logprobs",
    "truth_ratio",
    "truth_score",
    "zlib_length",
]
