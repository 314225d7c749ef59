"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME §2.1).

For a prompt whose clean greedy answer is o, the subject's token embeddings are corrupted,
x_t <- x_t + nu * eps_t with eps_t ~ N(0, I) and nu = 3 sigma (sigma: std of the token-embedding
outputs over the subjects; ROME §2.1 and its `collect_embedding_std`), in `n_noise` runs with fixed
seeded noise. With p(o) the probability of the first answer token at the last position:

* total effect          TE = p_clean(o) - p*(o),   p* = mean over corrupted runs;
* indirect effect of a state h_i^(l) (token i, layer l):
                        IE = p_restored(o) - p*(o),
  where the corrupted runs are repeated with h_i^(l) set to its clean value (ROME Eq. 1-2, the
  "restoration" experiment). `resid` restores the block output `blocks.{l}.hook_resid_post`;
  `mlp` / `attn` restore the sublayer output (`hook_mlp_out` / `hook_attn_out`) at token i in every
  layer of the window [l - w/2, l + w/2) clipped to the model (ROME §2.1, Fig. 1e-f, w = 10).

All (kind, layer, token) restorations of one prompt are batched (:func:`_restorations`): one
forward of the clean row and the `n_noise` corrupted rows keeps every layer's states and attention
keys/values; then, since restoring token i changes nothing before token i (causal attention), each
token's restorations run together on positions i.. only, reusing the corrupted rows' keys/values of
the earlier positions as a frozen KV cache, and each restoration's rows join the batch at the layer
where they first differ from the corrupted rows. This is exactly ROME's `trace_with_patch` (the
restored value is copied from the clean run) at a fraction of the cost. Restorations at tokens
before the first corrupted token change nothing, so they are not run and their IE is exactly 0;
MLP/attention windows that clip to the same layer set are run once.

The registered extractor (`kind="causal-trace"`) averages the grids over a concept's forget
prompts (prompts whose clean greedy answer is wrong are skipped, as ROME does), aligned by token
role as in ROME's Fig. 2 (first / middle / last subject token, first subsequent token, further
tokens, last token), ranks the sites (hook kind, layer, role) at ROME's two sites, the last
subject token and the last token, by their average IE, and turns the top ones into ablatable
components: one unit direction per site, the concept's mean activation there minus the mean over
other people's prompts (`concept.retain`) at the same role's token (a difference of means, the
contrast of METHODS.md's activation signature). See `extract_causal_trace` for why the last token
is ranked too.
"""

import dataclasses
import logging
import math
import os
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from kif import metrics
from kif.errors import KifError
from kif.signatures.base import Signature, new_signature, register, unit

logger = logging.getLogger(__name__)

KINDS = ("resid", "mlp", "attn")
"""Trace kinds: the state restored at (layer, token)."""

HOOKS = {"resid": "blocks.{l}.hook_resid_post", "mlp": "blocks.{l}.hook_mlp_out",
         "attn": "blocks.{l}.hook_attn_out"}
"""The canonical TransformerLens hook restored (and ablated) for each kind."""

ROLES = ("first subject token", "middle subject tokens", "last subject token",
         "first subsequent token", "further tokens", "last token")
"""Token roles of ROME's averaged causal-trace figure (Meng et al. 2022, Fig. 2). Roles are taken
relative to the LAST occurrence of the subject; tokens before it have no role."""

LAST_SUBJECT = ROLES.index("last subject token")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """Causal trace of one prompt (Meng et al. 2022, §2.1).

    Attributes:
        prompt, subject, answer: the traced fact; `answer_token` is the first token of `answer`.
        tokens: token strings of `[BOS] + tokens(prompt)` (as `kif.metrics` encodes prompts).
        subject_spans: token positions of every occurrence of the subject (all are corrupted).
        p_clean: clean p(answer_token) at the last position; `clean_top` the clean argmax token.
        p_corrupt: p* = mean p(answer_token) over the corrupted runs.
        resid, mlp, attn: indirect effects IE = p_restored - p* per (layer, token).
        noise_scale, n_noise, window, seed: the settings the trace ran with.
    """

    prompt: str
    subject: str
    answer: str
    answer_token: int
    tokens: tuple[str, ...]
    subject_spans: tuple[tuple[int, ...], ...]
    p_clean: float
    p_corrupt: float
    clean_top: int
    resid: Float[Tensor, "n_layers pos"]
    mlp: Float[Tensor, "n_layers pos"]
    attn: Float[Tensor, "n_layers pos"]
    noise_scale: float
    n_noise: int
    window: int
    seed: int

    @property
    def te(self) -> float:
        """Total effect TE = p_clean - p*."""
        return self.p_clean - self.p_corrupt

    @property
    def clean_correct(self) -> bool:
        """Whether the clean argmax at the last position is the answer's first token."""
        return self.clean_top == self.answer_token

    @property
    def subject_positions(self) -> tuple[int, ...]:
        """Every corrupted position (all occurrences of the subject)."""
        return tuple(p for span in self.subject_spans for p in span)

    def grid(self, kind: str) -> Float[Tensor, "n_layers pos"]:
        return {"resid": self.resid, "mlp": self.mlp, "attn": self.attn}[kind]

    def roles(self) -> Int[Tensor, " pos"]:
        """Role index (into `ROLES`) of each token, -1 for tokens before the last subject."""
        return token_roles(len(self.tokens), self.subject_spans[-1])


@dataclasses.dataclass(frozen=True)
class RoleAverage:
    """Causal traces averaged over prompts by token role (ROME Fig. 2): grids [n_layers, role].

    A role missing from a prompt (e.g. "middle subject tokens" for a two-token subject) does not
    count for that role; a role no prompt has is NaN.
    """

    resid: Float[Tensor, "n_layers n_roles"]
    mlp: Float[Tensor, "n_layers n_roles"]
    attn: Float[Tensor, "n_layers n_roles"]
    roles: tuple[str, ...]
    n_prompts: int
    te: float
    p_clean: float
    p_corrupt: float

    def grid(self, kind: str) -> Float[Tensor, "n_layers n_roles"]:
        return {"resid": self.resid, "mlp": self.mlp, "attn": self.attn}[kind]


# --------------------------------------------------------------------------------------------
# Tokens, subjects and noise
# --------------------------------------------------------------------------------------------


def subject_spans(model, prompt: str, subject: str) -> list[list[int]]:
    """Token positions (in `[BOS] + tokens(prompt)`) of every occurrence of `subject`.

    The first span equals `kif.signatures.base.subject_positions`. ROME corrupts the subject's
    (single) occurrence; fact-world questions name the subject twice ("Question: Where was N
    born? Answer: N was born in the city of"), and corrupting only the first mention leaves the
    second one to answer from, so every occurrence is corrupted here.
    """
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offset = 1 if model.cfg.default_prepend_bos else 0
    spans: list[list[int]] = []
    start = prompt.find(subject)
    if start < 0 or not subject:
        raise KifError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    while start >= 0:
        end = start + len(subject)
        pos = [i + offset for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
        if not pos:
            raise KifError(f"no token of {prompt!r} covers {subject!r}")
        spans.append(pos)
        start = prompt.find(subject, end)
    return spans


def token_roles(n_pos: int, last_span: Sequence[int]) -> Int[Tensor, " pos"]:
    """ROME's token roles for a prompt of `n_pos` tokens whose (last) subject occupies
    `last_span`: -1 before the subject; a one-token subject is its "last subject token"; the
    prompt's last token is "last token" even when it is also the first subsequent one."""
    roles = torch.full((n_pos,), -1, dtype=torch.long)
    first, last = int(last_span[0]), int(last_span[-1])
    roles[first:last] = ROLES.index("middle subject tokens")
    roles[first] = ROLES.index("first subject token")
    roles[last] = LAST_SUBJECT
    roles[last + 1:] = ROLES.index("further tokens")
    if last + 1 < n_pos:
        roles[last + 1] = ROLES.index("first subsequent token")
    if n_pos - 1 > last:
        roles[n_pos - 1] = ROLES.index("last token")
    return roles


def embedding_std(model, subjects: Sequence[str] | None = None) -> float:
    """sigma of ROME §2.1 (`collect_embedding_std`): the standard deviation of the token-embedding
    outputs over every token of the given subjects (tokenized as they occur mid-sentence, with a
    leading space), or over the whole vocabulary when `subjects` is None or empty."""
    w_e = model.W_E.detach()
    if subjects:
        ids = sorted({i for ids in metrics._tokenize(model, [" " + s for s in subjects]) for i in ids})
        w_e = w_e[torch.tensor(ids, device=w_e.device)]
    return float(w_e.double().std())


# --------------------------------------------------------------------------------------------
# The batched trace
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Site:
    kind: str
    pos: int
    patch_layers: tuple[int, ...]  # layers whose sublayer output is restored (resid: the layer)


def _window(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    # ROME's trace_important_window: layers [l - w//2, l - (-w//2)) clipped to the model.
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _noise_hook(noise: Tensor, subj_pos: Tensor):
    def hook(act: Float[Tensor, "rows pos d_model"], hook) -> Float[Tensor, "rows pos d_model"]:
        act = act.clone()
        act[1:, subj_pos.to(act.device)] += noise.to(act.device, act.dtype)
        return act
    return hook


def _last_position(act: Float[Tensor, "rows pos d_model"], hook) -> Float[Tensor, "rows 1 d_model"]:
    return act[:, -1:]


def _p_answer(model, resid: Float[Tensor, "rows pos d_model"], answer_token: int) -> tuple[Tensor, Tensor]:
    """p(answer_token) and the argmax at the last position, from the final residual stream."""
    final = resid[:, -1:, :]
    if model.cfg.normalization_type is not None:
        final = model.ln_final(final)
    logits = model.unembed(final)[:, 0, :]
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:  # as HookedTransformer.forward does (Gemma 2)
        logits = cap * torch.tanh(logits / cap)
    logits = logits.float()
    return torch.softmax(logits, dim=-1)[:, answer_token].double(), logits.argmax(-1)


def _restorations(model, tokens: Int[Tensor, "one pos"], noise: Float[Tensor, "n_noise n_subj d_model"],
                  subj_pos: Int[Tensor, " n_subj"], sites: Sequence[_Site],
                  answer_token: int) -> tuple[float, Float[Tensor, " n_noise"], Float[Tensor, " n_sites"], int]:
    """(p_clean, p per corrupted run, mean restored p per site, clean argmax).

    1. One forward of the clean row and the `n_noise` corrupted rows keeps every layer's
       resid_post / mlp_out / attn_out and attention keys and values.
    2. Restoring token i changes nothing before token i (causal attention), so the sites of
       token i run only on positions i.. with the corrupted rows' keys/values of positions < i
       as a frozen KV cache: one forward per token, all its (kind, layer) sites in one batch.
       Within it a site's rows join as copies of the corrupted rows where they first differ:
       after layer l for a restored block output (positions > i of layer l only read layer l's
       input, unchanged); after the window's first layer for an MLP window (its output at token
       i is swapped: resid_post += clean mlp_out - corrupted mlp_out, exact for sequential and
       parallel blocks); before the window's first layer for an attention window. Later window
       layers are patched by hooks.
    """
    from transformer_lens import utils as tl_utils
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    cfg = model.cfg
    n_layers, n_noise, n_pos = cfg.n_layers, noise.shape[0], tokens.shape[1]
    device = tokens.device
    acts: dict[str, list[Tensor]] = {k: [None] * n_layers for k in KINDS}  # type: ignore[list-item]

    def keep(kind: str, layer: int):
        def hook(act: Float[Tensor, "rows pos d_model"], hook) -> None:
            acts[kind][layer] = act
        return hook

    # ---- 1. clean + corrupted rows, every position ---------------------------------------
    kv = [TransformerLensKeyValueCacheEntry.init_cache_entry(cfg, device, 1 + n_noise)
          for _ in range(n_layers)]
    capture = [(HOOKS[k].format(l=layer), keep(k, layer)) for k in KINDS for layer in range(n_layers)
               if HOOKS[k].format(l=layer) in model.hook_dict]  # attention-only: no MLP hooks
    with tl_utils.LocallyOverridenDefaults(model, padding_side="right"):
        with model.hooks(fwd_hooks=[("hook_embed", _noise_hook(noise, subj_pos))] + capture):
            embed, _, shortformer, mask = model.input_to_embed(tokens.expand(1 + n_noise, -1))
            if mask is not None:
                raise KifError("causal tracing runs unpadded prompts; the model asked for an "
                               "attention mask")
            resid = embed
            for j, block in enumerate(model.blocks):
                resid = block(resid, past_kv_cache_entry=kv[j], shortformer_pos_embed=shortformer)
        base_p, top = _p_answer(model, resid, answer_token)

        # ---- 2. one forward per restored token ------------------------------------------
        patch: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}  # (kind, layer) -> rows, value

        def patch_hook(kind: str, layer: int):
            def hook(act: Float[Tensor, "rows pos d_model"], hook) -> Float[Tensor, "rows pos d_model"]:
                if (kind, layer) in patch:
                    rows, value = patch[(kind, layer)]
                    act[rows, 0] = value.to(act.dtype)  # local position 0 is the restored token
                return act
            return hook

        pre = [embed] + acts["resid"][:-1]  # input of block j
        site_p = torch.zeros(len(sites), dtype=torch.float64)
        by_pos: dict[int, list[int]] = {}
        for s, site in enumerate(sites):
            by_pos.setdefault(site.pos, []).append(s)
        samples = torch.arange(1, 1 + n_noise, device=device)
        fwd = [(HOOKS[k].format(l=layer), patch_hook(k, layer)) for k in ("mlp", "attn")
               for layer in range(n_layers) if HOOKS[k].format(l=layer) in model.hook_dict]
        # Only the last position of the last block reaches the logits: its MLP runs on that one
        # position (sequential blocks; the sliced hook is the block's own resid_mid).
        slice_last = not (cfg.parallel_attn_mlp or cfg.attn_only)
        if slice_last:
            fwd.append((f"blocks.{n_layers - 1}.hook_resid_mid", _last_position))
        with model.hooks(fwd_hooks=fwd):
            for i, group in by_pos.items():
                before: dict[int, list[int]] = {}
                after: dict[int, list[int]] = {}
                for s in group:
                    site = sites[s]
                    first = site.patch_layers[0]
                    (before if site.kind == "attn" else after).setdefault(first, []).append(s)
                rows_site: list[Tensor] = []
                resid = None
                later: dict[tuple[str, int], list[Tensor]] = {}  # hook patches beyond the join

                def join(resid, new_sites: list[int], base: Tensor, layer: int, when: str):
                    k = len(new_sites)
                    sample = samples.repeat(k)
                    new = base[sample, i:].clone()
                    offset = 0 if resid is None else resid.shape[0]
                    for r, s in enumerate(new_sites):
                        site = sites[s]
                        rows = slice(r * n_noise, (r + 1) * n_noise)
                        if site.kind == "resid":
                            new[rows, 0] = acts["resid"][layer][0, i]
                        elif site.kind == "mlp" and when == "after":
                            new[rows, 0] += acts["mlp"][layer][0, i] - acts["mlp"][layer][samples, i]
                        rest = site.patch_layers[1:] if when == "after" else site.patch_layers
                        if site.kind != "resid":
                            idx = torch.arange(offset + r * n_noise, offset + (r + 1) * n_noise, device=device)
                            for lay in rest:
                                later.setdefault((site.kind, lay), []).append(idx)
                    rows_site.append(torch.tensor(new_sites).repeat_interleave(n_noise))
                    if resid is None:
                        return new
                    # after the (sliced) last block only the last position remains
                    return torch.cat([resid, new[:, new.shape[1] - resid.shape[1]:]])

                for j, block in enumerate(model.blocks):
                    if j in before:
                        resid = join(resid, before[j], pre[j], j, "before")
                    if resid is not None:
                        patch.clear()
                        for kind in ("mlp", "attn"):
                            if kind == "mlp" and j == n_layers - 1 and slice_last and i < n_pos - 1:
                                continue  # token i's last MLP output is sliced away: no effect
                            if (kind, j) in later:
                                patch[(kind, j)] = (torch.cat(later[(kind, j)]), acts[kind][j][0, i])
                        sample = samples.repeat(resid.shape[0] // n_noise)
                        cache = TransformerLensKeyValueCacheEntry(
                            past_keys=kv[j].past_keys[sample, :i], past_values=kv[j].past_values[sample, :i],
                            frozen=True)
                        sf = None if shortformer is None else shortformer[:1, i:].expand(resid.shape[0], -1, -1)
                        resid = block(resid, past_kv_cache_entry=cache, shortformer_pos_embed=sf)
                    if j in after:
                        resid = join(resid, after[j], acts["resid"][j], j, "after")
                patch.clear()
                p, _ = _p_answer(model, resid, answer_token)
                site_p.index_add_(0, torch.cat(rows_site), p.cpu())
    return (float(base_p[0]), base_p[1:].cpu(), site_p / n_noise, int(top[0]))


def trace(model, prompt: str, subject: str, answer: str, *, n_noise: int = 10,
          noise_scale: float | None = None, window: int = 10, seed: int = 0,
          kinds: Sequence[str] = KINDS) -> TraceResult:
    """Causal trace of one fact (Meng et al. 2022, §2.1; IE = p_restored - p*, TE = p_clean - p*).

    Args:
        model: a TransformerLens HookedTransformer.
        prompt, subject, answer: the fact; p is taken for the answer's first token.
        n_noise: corrupted runs (ROME: 10), with noise N(0, noise_scale^2 I) drawn once from
            `seed` and shared by every restoration (a paired comparison).
        noise_scale: nu; default 3 x `embedding_std(model)` (ROME's nu = 3 sigma; sigma over the
            whole vocabulary here since one prompt does not know "all subjects": the extractor
            passes sigma over the subjects it sees).
        window: the MLP / attention restoration window (ROME: 10 layers, clipped to the model).
        kinds: which grids to compute; the others are left at zero.

    The restorations are batched: one forward of the clean and corrupted runs, then one forward
    per restored token covering all its (kind, layer) sites (see `_restorations`).
    """
    if n_noise < 1:
        raise ValueError(f"n_noise must be >= 1, got {n_noise}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown trace kinds {sorted(bad)} (choose from {', '.join(KINDS)})")
    if model.cfg.attn_only and "mlp" in kinds:
        raise ValueError("an attention-only model has no MLP to trace: pass kinds=('resid', 'attn')")
    ids = metrics.encode_prompts(model, [prompt])[0]
    ans = metrics.encode_answers(model, [answer])[0]
    if not ans:
        raise ValueError(f"answer {answer!r} has no tokens")
    spans = subject_spans(model, prompt, subject)
    n_layers, n_pos, d_model = model.cfg.n_layers, len(ids), model.cfg.d_model
    metrics._check_ctx(model, n_pos)
    if noise_scale is None:
        noise_scale = 3.0 * embedding_std(model)
    subj = torch.tensor(sorted({p for s in spans for p in s}), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    noise = noise_scale * torch.randn(n_noise, len(subj), d_model, generator=gen)
    noise = noise.to(model.W_E.dtype)

    # Sites: restorations at tokens before the first corrupted one are exact no-ops (IE = 0).
    first = int(subj[0])
    sites: list[_Site] = []
    grid_site: dict[tuple[str, int, int], int] = {}  # (kind, layer, pos) -> site index
    unique: dict[_Site, int] = {}
    for kind in kinds:
        for layer in range(n_layers):
            layers = (layer,) if kind == "resid" else _window(layer, window, n_layers)
            for pos in range(first, n_pos):
                site = _Site(kind, pos, layers)
                if site not in unique:
                    unique[site] = len(sites)
                    sites.append(site)
                grid_site[(kind, layer, pos)] = unique[site]

    tokens = torch.tensor([ids], dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        p_clean, p_runs, site_p, top = _restorations(model, tokens, noise, subj, sites, ans[0])
    p_star = float(p_runs.mean())
    ie = site_p - p_star
    grids = {k: torch.zeros(n_layers, n_pos, dtype=torch.float32) for k in KINDS}
    if grid_site:
        keys = list(grid_site)
        idx = torch.tensor([grid_site[key] for key in keys])
        for kind in kinds:
            sel = [i for i, key in enumerate(keys) if key[0] == kind]
            lay = torch.tensor([keys[i][1] for i in sel])
            pos = torch.tensor([keys[i][2] for i in sel])
            grids[kind][lay, pos] = ie[idx[sel]].float()
    return TraceResult(
        prompt=prompt, subject=subject, answer=answer, answer_token=int(ans[0]),
        tokens=tuple(model.tokenizer.batch_decode([[t] for t in ids])),
        subject_spans=tuple(tuple(s) for s in spans), p_clean=p_clean, p_corrupt=p_star,
        clean_top=top, resid=grids["resid"], mlp=grids["mlp"], attn=grids["attn"],
        noise_scale=float(noise_scale), n_noise=n_noise, window=window, seed=seed)


# --------------------------------------------------------------------------------------------
# Concepts
# --------------------------------------------------------------------------------------------


def concept_noise_scale(model, concept) -> float:
    """nu = 3 sigma with sigma over every subject the concept's probes name (its own, its
    neighbours', the retain people's and the shared places'), ROME §2.1."""
    subjects = sorted({p.subject for probes in (concept.forget, concept.paraphrase, concept.neighbour,
                                                concept.shared, concept.retain) for p in probes})
    return 3.0 * embedding_std(model, subjects)


def correct_probes(model, probes) -> list:
    """The probes whose clean greedy answer is right (one batched scoring pass)."""
    if not probes:
        return []
    s = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes])
    return [p for p, ok in zip(probes, s.correct) if ok]


def trace_concept(model, concept, *, n_noise: int = 10, noise_scale: float | None = None,
                  window: int = 10, seed: int = 0, kinds: Sequence[str] = KINDS,
                  skip_wrong: bool = True, max_prompts: int | None = None) -> list[TraceResult]:
    """Causal traces of a concept's forget prompts (Meng et al. 2022, §2.1), skipping prompts whose
    clean greedy answer is wrong (ROME traces only facts the model knows). `noise_scale` defaults
    to `concept_noise_scale`. `max_prompts` keeps the first N prompts (after skipping)."""
    probes = correct_probes(model, concept.forget) if skip_wrong else list(concept.forget)
    if max_prompts is not None:
        probes = probes[:max_prompts]
    if noise_scale is None:
        noise_scale = concept_noise_scale(model, concept)
    return [trace(model, p.prompt, p.subject, p.answer, n_noise=n_noise, noise_scale=noise_scale,
                  window=window, seed=seed, kinds=kinds) for p in probes]


def average_by_role(traces: Sequence[TraceResult]) -> RoleAverage:
    """Average IE grids over prompts by token role (ROME Fig. 2): within a prompt the tokens of a
    role are averaged, then roles are averaged over the prompts that have them."""
    if not traces:
        raise KifError("no traces to average (every prompt was skipped?)")
    n_roles = len(ROLES)
    sums = {k: torch.zeros(traces[0].resid.shape[0], n_roles, dtype=torch.float64) for k in KINDS}
    count = torch.zeros(n_roles, dtype=torch.float64)
    for t in traces:
        roles = t.roles()
        onehot = torch.nn.functional.one_hot(roles.clamp_min(0), n_roles).double()
        onehot[roles < 0] = 0.0
        per_role = onehot.sum(0)
        weights = onehot / per_role.clamp_min(1.0)  # [pos, role]: mean over the role's tokens
        for k in KINDS:
            sums[k] += t.grid(k).double() @ weights
        count += (per_role > 0).double()
    avg = {k: (v / count).float() for k, v in sums.items()}  # 0/0 = NaN for absent roles
    return RoleAverage(resid=avg["resid"], mlp=avg["mlp"], attn=avg["attn"], roles=ROLES,
                       n_prompts=len(traces), te=float(np.mean([t.te for t in traces])),
                       p_clean=float(np.mean([t.p_clean for t in traces])),
                       p_corrupt=float(np.mean([t.p_corrupt for t in traces])))


def role_weights(model, probes, role: str) -> list[Tensor]:
    """Per probe, the weights [pos] that average its tokens of `role` (ROLES; relative to the
    last occurrence of the subject); all zero where the prompt has no token of that role."""
    r = ROLES.index(role)
    ids = metrics.encode_prompts(model, [p.prompt for p in probes])
    out = []
    for p, x in zip(probes, ids):
        mask = (token_roles(len(x), subject_spans(model, p.prompt, p.subject)[-1]) == r).float()
        out.append(mask / mask.sum().clamp_min(1.0))
    return out


def role_states(model, probes, hooks: Sequence[str], role: str,
                batch_size: int = 256) -> dict[str, Float[Tensor, "n d"]]:
    """Each probe's activation at each hook averaged over its tokens of `role` (e.g. the last
    subject token, the last token), float32, from batched right-padded forwards. Probes without
    a token of that role are dropped."""
    weights = role_weights(model, probes, role)
    keep = [i for i, wt in enumerate(weights) if wt.sum() > 0]
    ids = metrics.encode_prompts(model, [probes[i].prompt for i in keep])
    weights = [weights[i] for i in keep]
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    names = set(hooks)
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = range(start, min(start + batch_size, len(ids)))
            tokens, _ = metrics._padded(model, [ids[i] for i in chunk])
            wt = torch.zeros(tokens.shape, dtype=torch.float32)
            for r, i in enumerate(chunk):
                wt[r, : len(weights[i])] = weights[i]
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                            padding_side="right", return_type=None)
            for h in hooks:
                act = cache[h].float()
                out[h].append(torch.einsum("bpd,bp->bd", act, wt.to(act.device)).cpu())
    return {h: torch.cat(v) if v else torch.zeros(0, model.cfg.d_model) for h, v in out.items()}


def _finite_or_none(x: Tensor) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


@register("causal-trace")
def extract_causal_trace(model, concept, *, k: int = 6, n_noise: int = 10,
                         noise_scale: float | None = None, window: int = 10, seed: int = 0,
                         kinds: Sequence[str] = KINDS,
                         roles: Sequence[str] = ("last subject token", "last token"),
                         max_prompts: int | None = None) -> Signature:
    """Causal-tracing signature of `concept` (Meng et al. 2022, §2.1 and Fig. 2; METHODS.md
    "Causal tracing").

    1. Trace every forget prompt the model answers correctly (`trace`, IE = p_restored - p*) and
       average the IE grids by token role (`average_by_role`): `maps["resid_ie" | "mlp_ie" |
       "attn_ie"]` [n_layers, n_roles], role names in `info["roles"]`.
    2. Rank the sites (kind, layer, role), role in `roles`, by average IE. The default roles are
       ROME's two sites: the last subject token (the "early site", where GPT-2 XL's mid-layer
       MLPs recall the fact) and the last token (the "late site", where attention reads it out).
       Keep the top `k`.
    3. Each site's component is the unit direction d = normalize(mean_forget h - mean_retain h)
       of the site's activation at its role's token(s), over the concept's traced forget prompts
       vs other people's prompts (`concept.retain`): hook `blocks.{l}.hook_resid_post` /
       `hook_mlp_out` / `hook_attn_out`, the role in `info["component_roles"]`.

    Why both roles: on kif's 4-layer fact-world model every single subject token has IE ~ 0
    (names are 2-6 tokens and the last one alone does not carry the person; restoring it cannot
    undo the corruption of the others), while restorations at the last token carry the whole
    effect; directions at the last subject token are not causal there (ablating all 12 drops
    ~0 % of the facts), directions at the last token are. With ROME's roles ranked together the
    trace itself chooses the site.
    """
    bad = set(kinds) - set(KINDS)
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    bad_roles = set(roles) - set(ROLES)
    if bad_roles or not roles:
        raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {list(roles)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not concept.retain:
        raise KifError(f"concept {concept.name!r} has no retain prompts to contrast with")
    if noise_scale is None:
        noise_scale = concept_noise_scale(model, concept)
    probes = correct_probes(model, concept.forget)
    if not probes:
        raise KifError(f"the model answers none of {concept.name!r}'s forget prompts: "
                       "nothing to trace")
    n_skipped = len(concept.forget) - len(probes)
    if max_prompts is not None:
        probes = probes[:max_prompts]
    traces = [trace(model, p.prompt, p.subject, p.answer, n_noise=n_noise,
                    noise_scale=noise_scale, window=window, seed=seed, kinds=kinds)
              for p in probes]
    avg = average_by_role(traces)

    n_layers = model.cfg.n_layers
    cand = [(kd, layer, role) for role in roles for kd in kinds for layer in range(n_layers)]
    ie = torch.tensor([float(avg.grid(kd)[layer, ROLES.index(role)]) for kd, layer, role in cand])
    order = torch.argsort(torch.nan_to_num(ie, nan=-math.inf), descending=True, stable=True)[:k]
    chosen = [cand[i] for i in order.tolist()]
    hooks = [HOOKS[kd].format(l=layer) for kd, layer, _ in chosen]

    dirs = torch.zeros(len(chosen), model.cfg.d_model)
    for role in dict.fromkeys(r for _, _, r in chosen):
        rows = [i for i, site in enumerate(chosen) if site[2] == role]
        at = list(dict.fromkeys(hooks[i] for i in rows))
        pos, neg = role_states(model, probes, at, role), role_states(model, concept.retain, at, role)
        for i in rows:
            dirs[i] = unit(pos[hooks[i]].double().mean(0) - neg[hooks[i]].double().mean(0)).float()

    def name(site: tuple[str, int, str]) -> str:
        return f"{site[0]}.{site[1]}@{site[2]}"

    best = chosen[0]
    info = {
        "roles": list(ROLES),
        "component_roles": [r for _, _, r in chosen],
        "n_traced": len(traces), "n_skipped_wrong": n_skipped,
        "te": avg.te, "p_clean": avg.p_clean, "p_corrupt": avg.p_corrupt,
        "noise_scale": float(noise_scale),
        "best_site": {"kind": best[0], "layer": best[1], "role": best[2], "ie": float(ie[order[0]])},
        "best_layer": {role: {kd: int(torch.nan_to_num(avg.grid(kd)[:, ROLES.index(role)],
                                                        nan=-math.inf).argmax()) for kd in kinds}
                       for role in roles},
        "max_ie": {role: _finite_or_none(torch.stack(
            [avg.grid(kd)[:, ROLES.index(role)] for kd in kinds]).nan_to_num(nan=-math.inf).max())
            for role in ROLES},
        "site_ie": {name(s): float(v) for s, v in zip(cand, ie)},
    }
    settings = {"k": k, "n_noise": n_noise, "noise_scale": float(noise_scale), "window": window,
                "seed": seed, "kinds": list(kinds), "roles": list(roles),
                "max_prompts": max_prompts, "skip_wrong": True,
                "direction": "normalize(mean forget - mean retain) at the site's role tokens"}
    return new_signature(
        model, concept, "causal-trace", component="direction", component_hooks=tuple(hooks),
        scores=ie[order].float(), directions=dirs,
        maps={"resid_ie": avg.resid, "mlp_ie": avg.mlp, "attn_ie": avg.attn},
        settings=settings, info=info)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def plot_trace(result: "TraceResult | RoleAverage | Signature", path: str | os.PathLike,
               title: str | None = None) -> None:
    """Write ROME-style causal-trace heatmaps (one panel per kind: token/role x layer, colour =
    IE) to a PNG. Accepts one prompt's `TraceResult` (token strings on the axis, subject tokens
    starred), a `RoleAverage`, or a causal-trace `Signature` (its role-averaged maps)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(result, Signature):
        grids = {k: result.maps[f"{k}_ie"] for k in KINDS if f"{k}_ie" in result.maps}
        labels = list(result.info.get("roles", ROLES))
        default_title = f"{result.concept}: causal trace averaged over prompts"
    elif isinstance(result, RoleAverage):
        grids = {k: result.grid(k) for k in KINDS}
        labels = list(result.roles)
        default_title = f"causal trace averaged over {result.n_prompts} prompts (TE {result.te:.2f})"
    else:
        grids = {k: result.grid(k) for k in KINDS}
        subj = set(result.subject_positions)
        labels = [f"{t}*" if i in subj else t for i, t in enumerate(result.tokens)]
        default_title = (f"{result.prompt!r} -> {result.answer!r}: p={result.p_clean:.2f}, "
                         f"p*={result.p_corrupt:.2f}")
    names = {"resid": "hidden state (resid_post)", "mlp": "MLP output", "attn": "attention output"}
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids) + 1.5, 0.32 * len(labels) + 2),
                             squeeze=False)
    for ax, (kind, g) in zip(axes[0], grids.items()):
        data = g.detach().float().cpu().numpy().T  # [token, layer]
        im = ax.imshow(data, cmap={"resid": "Purples", "mlp": "Greens", "attn": "Reds"}[kind],
                       aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xticks(range(data.shape[1]))
        ax.set_xlabel("layer" if kind == "resid" else "layer (window centre)")
        ax.set_title(names[kind], fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05, label="IE")
    fig.suptitle(title or default_title, fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


__all__ = ["HOOKS", "KINDS", "ROLES", "RoleAverage", "TraceResult", "average_by_role",
           "concept_noise_scale", "correct_probes", "embedding_std", "extract_causal_trace",
           "role_states", "role_weights", "plot_trace", "subject_spans", "token_roles", "trace",
           "trace_concept"]
