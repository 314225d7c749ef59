"""Concept vectors: where a concept lives as MLP value vectors or activation directions
(METHODS.md, "Signatures", "Concept vectors").

Two methods behind one registered kind, ``"concept-vectors"``:

* ``method="parametric"`` (default): **ConceptVectors** (Hong et al. 2024, "Intrinsic
  Evaluation of Unlearning Using Parametric Knowledge Traces", §3). A candidate concept vector is
  an MLP value vector ``v_{l,i} = W_out^{(l)}[i]`` (TransformerLens ``model.blocks[l].mlp.W_out[i]``):
  the MLP output is ``sum_i a_{l,i} v_{l,i}`` (Geva et al. 2021, Eq. 2), so neuron i writes
  ``a_{l,i} v_{l,i}``. Each neuron's contribution c on a prompt is (:func:`neuron_contributions`)

      "logit" (default): c = a_{l,i}(t_last) * LNf(v_{l,i}) . (W_U[:, y] - mean_vocab W_U) / scale

  its direct contribution to the logit of the prompt's answer token y at the last position
  (LNf: the final LayerNorm's centring and weight, ``scale`` its divisor there: direct logit
  attribution, Elhage et al. 2021), or ``"norm"``: ``c = a_{l,i} ||v_{l,i}||`` averaged over the
  last token and/or the subject's tokens. The score is the contrast with other people's prompts,

      score_{l,i} = mean_{x in forget} c(x) - mean_{x in retain} c(x),

  and the signature is the top-k neurons (ablated by zeroing a_{l,i} at every position). Each
  selected value vector is also read in vocabulary space, ``v W_U`` (Geva et al. 2022; Hong et
  al. 2024 §3): ``info`` reports the top tokens and whether the top-200 contain one of the
  concept's answer tokens. :func:`value_vector_cosine` and :func:`top_token_jaccard` are Hong et
  al.'s parametric traces (cosine, and Jaccard of the top-200 projected tokens, between a value
  vector before and after an erasure).

* ``method="activation"``: the **KIF activation signature** (KIF/ERUF, arXiv 2601.10566). At every
  hook ``blocks.{l}.hook_mlp_out`` (optionally also ``blocks.{l}.hook_resid_post``) each prompt's
  activation is mean-pooled over its tokens, ``s(x) = 1/|T| sum_{t in T} h_t(x)`` (T: the prompt's
  tokens after BOS, whose state is the same for every prompt; padding masked out). Each dimension
  is z-scored over positives ∪ negatives, ``z = (s - mu) / sigma``, and

      d_z = normalize(mean_{S+} z - mean_{S-} z)

  points toward the positives (the concept's forget prompts; negatives: other people's prompts
  ``concept.retain`` and the shared/control prompts ``concept.shared``). The effect size is
  Cohen's d of the projections p = z . d_z,

      d = (mean p+ - mean p-) / s_pooled,  s_pooled^2 = ((n+ - 1) var p+ + (n- - 1) var p-) / (n+ + n- - 2),

  with a percentile bootstrap (100 resamples of both groups, 95 % interval); a hook is accepted at
  d >= 2 and the best layer is the one with the largest d.

  *Back to the raw activation space.* ``z . d_z = s . (d_z / sigma) - mu . (d_z / sigma)``, so
  ``r = normalize(d_z / sigma)`` reads the signature off the raw activation up to a positive scale
  and a constant offset: Cohen's d of ``s . r`` equals the z-space d exactly (:func:`cohens_d`
  relies on this and needs no stored mu / sigma). The stored direction is ``r``; projecting it out,
  ``h <- h - (h . r) r`` (`kif.signatures.ablate`), is the smallest change of h after which the
  signature's score is the same for every prompt.

  Further directions (``n_directions > 1``): the top principal directions of the per-prompt
  differences between each positive and the mean of the negatives of the same relation (the
  probes' ``relation``; all negatives when none match), after removing d_z, mapped to raw space
  the same way, oriented toward the positives and scored by their Cohen's d. All components of all
  hooks are sorted by d.

Measured on the fact-world model (10 `bench_people`, `kif.signatures.bench.causality`): zeroing the
top 300 parametric neurons removes 71 % of a person's facts (random 300 neurons: 0 %) with 0.55 %
collateral loss on everyone else. The activation signature detects the person strongly (d = 4.5-7,
accepted at every layer) but is not where the facts are *held*: projecting out its directions
(4 to 64 of them) removes at most 10 % of the facts. The default method is therefore the
parametric one; the activation signature is the detector that the meter re-measures
(:func:`cohens_d`).
"""

import logging
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kif import metrics
from kif.errors import KifError
from kif.signatures.base import Signature, new_signature, register, unit

logger = logging.getLogger(__name__)

HOOKS = {"mlp_out": "blocks.{l}.hook_mlp_out", "resid_post": "blocks.{l}.hook_resid_post"}
"""Activation-signature sites: the canonical TransformerLens hook per site name."""

POSITIONS = ("last", "subject", "last+subject")
"""Token positions at which the parametric ``"norm"`` score averages a neuron's contribution."""

N_NEURONS = 300
"""Default number of parametric neurons: on the fact-world model, zeroing the top 300 removes 71 %
of a person's facts (every one of 10 bench people loses >= 50 %) at 0.55 % collateral; 200
removes 46 %, 400 removes 83 % but one person's collateral reaches 2.4 %."""

BENCH_K = N_NEURONS
"""Components ablated by `kif bench signatures` (`kif.signatures.bench.default_k`)."""

ACCEPT_D = 2.0
"""KIF/ERUF's acceptance threshold on Cohen's d."""

Prompts = Sequence[Any]  # strings or objects with a `.prompt` (kif.world.Probe)


# --------------------------------------------------------------------------------------------
# Batched activations
# --------------------------------------------------------------------------------------------


def _texts(prompts: Prompts) -> list[str]:
    return [p if isinstance(p, str) else p.prompt for p in prompts]


def _tokens(model, prompts: Sequence[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Right-padded ``[BOS] + tokens(prompt)`` rows (as `kif.metrics` encodes prompts) and lengths.
    Padding sits after every real token, so causal attention leaves the real positions exact."""
    ids = metrics.encode_prompts(model, prompts)
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.long)
    if int(lengths.min()) < 1:
        raise KifError("a prompt has no tokens")
    if int(lengths.max()) > model.cfg.n_ctx:
        raise KifError(f"a prompt of {int(lengths.max())} tokens exceeds n_ctx={model.cfg.n_ctx}")
    tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(ids):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens.to(model.cfg.device), lengths.to(model.cfg.device)


def _token_mask(model, lengths: Int[Tensor, " batch"], width: int) -> Float[Tensor, "batch pos"]:
    """1 on a prompt's tokens after BOS (its own tokens; all of them when no BOS is prepended)."""
    pos = torch.arange(width, device=lengths.device)
    first = 1 if model.cfg.default_prepend_bos else 0
    first = torch.where(lengths > first, first, 0)  # a BOS-only prompt pools its BOS state
    return ((pos[None] >= first[:, None]) & (pos[None] < lengths[:, None])).float()


def pooled_activations(model, prompts: Prompts, hooks: Sequence[str], batch_size: int = 512
                       ) -> Float[Tensor, "hook batch d"]:
    """Mean over each prompt's tokens (after BOS, padding excluded) of the activation at every hook,
    in float64: one `run_with_cache` (per `batch_size` prompts) with a names filter for all hooks."""
    texts = _texts(prompts)
    names = set(hooks)
    out = []
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            tokens, lengths = _tokens(model, texts[lo: lo + batch_size])
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                            padding_side="right")
            mask = _token_mask(model, lengths, tokens.shape[1]).double()
            acts = torch.stack([cache[h] for h in hooks]).double()  # [hook, batch, pos, d]
            out.append(torch.einsum("hbpd,bp->hbd", acts, mask) / mask.sum(1)[None, :, None])
    return torch.cat(out, dim=1)


# --------------------------------------------------------------------------------------------
# Effect size
# --------------------------------------------------------------------------------------------


def _cohens_d(pos: Float[Tensor, "... n_pos"], neg: Float[Tensor, "... n_neg"]) -> Float[Tensor, "..."]:
    """Cohen's d with the pooled standard deviation, batched over leading dimensions."""
    n1, n0 = pos.shape[-1], neg.shape[-1]
    var = ((n1 - 1) * pos.var(-1) + (n0 - 1) * neg.var(-1)) / max(n1 + n0 - 2, 1)
    return (pos.mean(-1) - neg.mean(-1)) / var.clamp_min(1e-24).sqrt()


def _bootstrap_ci(pos: Float[Tensor, "... n_pos"], neg: Float[Tensor, "... n_neg"], n_boot: int,
                  generator: torch.Generator, level: float = 0.95
                  ) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """Percentile bootstrap interval of Cohen's d: both groups resampled with replacement,
    `n_boot` times, all resamples (and all leading dimensions) in one tensor op."""
    i1 = torch.randint(pos.shape[-1], (n_boot, pos.shape[-1]), generator=generator)
    i0 = torch.randint(neg.shape[-1], (n_boot, neg.shape[-1]), generator=generator)
    d = _cohens_d(pos[..., i1.to(pos.device)], neg[..., i0.to(neg.device)])  # [..., n_boot]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=d.dtype, device=d.device)
    lo, hi = torch.quantile(d, q, dim=-1)
    return lo, hi


def cohens_d(model, direction: Float[Tensor, " d"], hook: str, positives: Prompts,
             negatives: Prompts, *, n_boot: int = 100, seed: int = 0,
             batch_size: int = 512) -> tuple[float, float, float]:
    """Cohen's d of the projections ``s(x) . direction`` of the mean-pooled activation at `hook`
    (KIF/ERUF activation signature, see the module docstring) for `positives` against
    `negatives` (prompt strings or probes), with a 95 % percentile bootstrap interval over
    `n_boot` resamples: ``(d, ci_low, ci_high)``.

    For a direction of this module's activation signature, measured on its own extraction
    prompts, this reproduces the signature's z-space effect size; the meter reuses it to check
    whether a signature persists after an erasure (d falls toward 0 when it is gone).
    """
    if len(positives) < 2 or len(negatives) < 2:
        raise KifError("Cohen's d needs at least two positive and two negative prompts")
    s = pooled_activations(model, list(positives) + list(negatives), [hook], batch_size)[0]
    proj = s @ direction.to(s.device, torch.float64)
    pos, neg = proj[: len(positives)], proj[len(positives):]
    lo, hi = _bootstrap_ci(pos, neg, n_boot, torch.Generator().manual_seed(seed))
    return float(_cohens_d(pos, neg)), float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# (b) The KIF activation signature
# --------------------------------------------------------------------------------------------


def _group_means(x: Float[Tensor, "hook n d"], labels: Int[Tensor, " n"], n_groups: int
                 ) -> tuple[Float[Tensor, "hook g d"], Float[Tensor, " g"]]:
    """Mean of the rows of each label (one index_add), and each group's size."""
    counts = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(
        0, labels, torch.ones_like(labels, dtype=x.dtype))
    sums = torch.zeros(x.shape[0], n_groups, x.shape[2], dtype=x.dtype, device=x.device)
    sums.index_add_(1, labels, x)
    return sums / counts.clamp_min(1)[None, :, None], counts


def activation_signature(model, positives: Prompts, negatives: Prompts, hooks: Sequence[str], *,
                         n_directions: int = 1, n_boot: int = 100, seed: int = 0,
                         batch_size: int = 512) -> dict[str, Tensor]:
    """The KIF/ERUF activation signature at every hook at once (module docstring,
    ``method="activation"``).

    Returns float64 tensors: ``directions`` [hook, r, d] raw-space unit read directions (row 0 the
    mean-difference direction d_z mapped back, rows 1.. the next principal directions of the
    positive-minus-negative differences), ``d`` / ``ci_low`` / ``ci_high`` [hook, r] Cohen's d of
    each direction with its bootstrap interval, and ``mean_diff_z_norm`` [hook] (||mean z+ -
    mean z-||, before normalising). Probes' ``relation`` fields, when present, pair every positive
    with the negatives of the same relation for the further directions (so that they describe the
    concept, not a difference of phrasing); the mean-difference direction uses all negatives.
    """
    if len(positives) < 2 or len(negatives) < 2:
        raise KifError("the activation signature needs at least two positive and two negative "
                       "prompts")
    n_pos = len(positives)
    s = pooled_activations(model, list(positives) + list(negatives), hooks, batch_size)
    mu = s.mean(1, keepdim=True)
    sigma = s.std(1, keepdim=True)
    # A dimension that never varies carries no signal: leave it out instead of dividing by ~0.
    live = sigma > 1e-6 * sigma.amax(-1, keepdim=True).clamp_min(1e-30)
    inv = torch.where(live, 1.0 / sigma.clamp_min(1e-30), torch.zeros_like(sigma))
    z = (s - mu) * inv                                                      # [hook, n, d]
    zp, zn = z[:, :n_pos], z[:, n_pos:]
    diff = zp.mean(1) - zn.mean(1)                                          # [hook, d]
    d_z = unit(diff)
    dirs_z = [d_z[:, None]]
    if n_directions > 1:
        # Per-positive differences to the negatives of the same relation (all negatives when a
        # relation has none), with the mean direction removed; their top right singular vectors.
        rel_names = sorted({getattr(p, "relation", None) for p in list(positives) + list(negatives)},
                           key=str)
        rel_of = {r: i for i, r in enumerate(rel_names)}
        lab_p = torch.tensor([rel_of[getattr(p, "relation", None)] for p in positives])
        lab_n = torch.tensor([rel_of[getattr(p, "relation", None)] for p in negatives])
        g_mean, g_count = _group_means(zn, lab_n.to(z.device), len(rel_names))
        ref = torch.where((g_count > 0)[None, :, None], g_mean, zn.mean(1, keepdim=True))
        dev = zp - ref[:, lab_p.to(z.device)]                               # [hook, n_pos, d]
        dev = dev - (dev @ d_z[..., None]) * d_z[:, None]
        _, _, vh = torch.linalg.svd(dev, full_matrices=False)
        dirs_z.append(vh[:, : n_directions - 1])
    dz = torch.cat(dirs_z, dim=1)                                           # [hook, r, d]
    # z . v = s . (v / sigma) - mu . (v / sigma): the raw read direction is v / sigma.
    raw = unit(dz * inv)
    proj = torch.einsum("hnd,hrd->hrn", s, raw)
    sign = torch.where(proj[..., :n_pos].mean(-1) >= proj[..., n_pos:].mean(-1), 1.0, -1.0)
    raw, proj = raw * sign[..., None], proj * sign[..., None]
    pos, neg = proj[..., :n_pos], proj[..., n_pos:]
    d = _cohens_d(pos, neg)
    lo, hi = _bootstrap_ci(pos, neg, n_boot, torch.Generator().manual_seed(seed))
    return {"directions": raw, "d": d, "ci_low": lo, "ci_high": hi,
            "mean_diff_z_norm": diff.norm(dim=-1)}


def _extract_activation(model, concept, *, k: int | None, sites: Sequence[str],
                        layers: Sequence[int] | None, n_directions: int, negatives: Sequence[str],
                        n_boot: int, accept_d: float, seed: int, batch_size: int) -> Signature:
    for site in sites:
        if site not in HOOKS:
            raise KifError(f"unknown activation site {site!r} (choose from {', '.join(HOOKS)})")
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    hooks = [HOOKS[site].format(l=l) for site in sites for l in layers]
    neg = [p for name in negatives for p in getattr(concept, name)]
    res = activation_signature(model, concept.forget, neg, hooks, n_directions=n_directions,
                               n_boot=n_boot, seed=seed, batch_size=batch_size)
    n_hooks, r = res["d"].shape
    flat_d = res["d"].reshape(-1)
    flat_dirs = res["directions"].reshape(n_hooks * r, -1)
    order = torch.argsort(flat_d, descending=True, stable=True)
    # A hook whose activation never varies (or a rank-deficient difference) yields a zero vector:
    # not a direction, so not a component.
    order = order[flat_dirs[order].norm(dim=-1) > 0.5]
    if k is not None:
        order = order[:k]
    hook_of = [hooks[int(i) // r] for i in order]
    per_hook = {h: {"d": float(res["d"][j, 0]), "ci_low": float(res["ci_low"][j, 0]),
                    "ci_high": float(res["ci_high"][j, 0]),
                    "accepted": bool(res["d"][j, 0] >= accept_d)} for j, h in enumerate(hooks)}
    best = max(hooks, key=lambda h: per_hook[h]["d"])
    info = {
        "per_hook": per_hook,
        "per_layer_d": {site: [per_hook[HOOKS[site].format(l=l)]["d"] for l in layers]
                        for site in sites},
        "best_hook": best, "best_layer": int(best.split(".")[1]),
        "best_d": per_hook[best]["d"], "best_ci": [per_hook[best]["ci_low"], per_hook[best]["ci_high"]],
        "accepted": per_hook[best]["d"] >= accept_d,
        "n_positives": len(concept.forget), "n_negatives": len(neg),
        "component_rank": [int(i) % r for i in order],  # 0 = mean-difference direction
    }
    logger.info("concept-vectors/activation %s: best %s d=%.2f [%.2f, %.2f]", concept.name, best,
                info["best_d"], *info["best_ci"])
    settings = {"method": "activation", "k": k, "sites": list(sites), "layers": layers,
                "n_directions": n_directions, "negatives": list(negatives), "pool": "mean over "
                "prompt tokens after BOS", "n_boot": n_boot, "ci": 0.95, "accept_d": accept_d,
                "seed": seed, "batch_size": batch_size}
    return new_signature(model, concept, "concept-vectors", component="direction",
                         component_hooks=tuple(hook_of),
                         scores=flat_d[order].float(), directions=flat_dirs[order].float(),
                         maps={"cohens_d": res["d"].float(), "ci_low": res["ci_low"].float(),
                               "ci_high": res["ci_high"].float()},
                         settings=settings, info=info)


# --------------------------------------------------------------------------------------------
# (a) Parametric concept vectors (Hong et al. 2024)
# --------------------------------------------------------------------------------------------


def vocab_logits(model, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Vocabulary projection of value vectors, ``v @ W_U`` (Geva et al. 2022, "Transformer
    Feed-Forward Layers Build Predictions by Promoting Concepts in the Vocabulary Space", §3;
    Hong et al. 2024 §3 read concept vectors the same way)."""
    w_u = model.W_U.detach()
    return v.to(w_u.device, torch.float32) @ w_u.float()


def value_vector_cosine(v_pre: Float[Tensor, "... d_model"], v_post: Float[Tensor, "... d_model"]
                        ) -> Float[Tensor, "..."]:
    """Cosine between a value vector before and after an erasure (Hong et al. 2024, §4, the
    parametric trace ``cos(v_pre, v_post)``), batched over leading dimensions, in float64.
    1 = untouched direction; a zero vector has cosine 0 with anything."""
    a, b = v_pre.double(), v_post.to(v_pre.device).double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def top_token_jaccard(v_pre: Float[Tensor, "... d_model"], v_post: Float[Tensor, "... d_model"],
                      model, k: int = 200) -> Float[Tensor, "..."]:
    """Jaccard overlap of the top-`k` tokens of the vocabulary projections (:func:`vocab_logits`)
    of a value vector before and after an erasure (Hong et al. 2024, §4, top-200 tokens),
    ``|A ∩ B| / |A ∪ B|``, batched over leading dimensions."""
    lp, lq = vocab_logits(model, v_pre), vocab_logits(model, v_post)
    k = min(k, lp.shape[-1])
    a = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, lp.topk(k, dim=-1).indices, True)
    b = torch.zeros_like(lq, dtype=torch.bool).scatter_(-1, lq.topk(k, dim=-1).indices, True)
    inter = (a & b).sum(-1).double()
    return inter / (2 * k - inter)


def _subject_mask(model, probes: Sequence[Any], width: int) -> Float[Tensor, "batch pos"]:
    """1 on the tokens of each probe's subject (first occurrence), positions as in
    `base.subject_positions` (``[BOS] + tokens(prompt)``), from one batched tokenizer call."""
    texts = _texts(probes)
    enc = model.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    n_tok = max(len(o) for o in enc["offset_mapping"])
    offs = torch.full((len(texts), n_tok, 2), -1, dtype=torch.long)
    for i, o in enumerate(enc["offset_mapping"]):  # ragged lists -> one padded tensor
        if o:
            offs[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    starts = torch.tensor([t.find(p.subject) for t, p in zip(texts, probes)], dtype=torch.long)
    if bool((starts < 0).any()):
        bad = int((starts < 0).nonzero()[0])
        raise KifError(f"subject {probes[bad].subject!r} does not occur in {texts[bad]!r}")
    ends = starts + torch.tensor([len(p.subject) for p in probes], dtype=torch.long)
    inside = (offs[..., 0] < ends[:, None]) & (offs[..., 1] > starts[:, None]) & (offs[..., 1] >= 0)
    first = 1 if model.cfg.default_prepend_bos else 0
    mask = torch.zeros(len(texts), width, dtype=torch.float64)
    mask[:, first: first + n_tok] = inside[:, : width - first].double()
    return mask


def _final_ln(model) -> tuple[Tensor, bool]:
    """The final normalisation's weight (ones if none) and whether it centres its input."""
    ln = getattr(model, "ln_final", None)
    w = getattr(ln, "w", None)
    w = torch.ones(model.cfg.d_model) if w is None else w.detach()
    return w, model.cfg.normalization_type in ("LN", "LNPre")


def neuron_contributions(model, probes: Sequence[Any], *, score: str = "logit",
                         positions: str = "last",
                         batch_size: int = 512) -> Float[Tensor, "layer batch d_mlp"]:
    """Per prompt, each MLP neuron's contribution through its value vector v = W_out[i]:

    * ``"logit"``: its direct contribution to the prompt's answer logit at the last position,
      ``a_i * (LN_f-linear(v) . (W_U[:, y] - mean_vocab W_U)) / scale``, where y is the answer's
      first token, LN_f-linear centres (LayerNorm) and multiplies by the final norm's weight, and
      ``scale`` is the final norm's divisor at that position (direct logit attribution, Elhage et
      al. 2021; Geva et al. 2021 Eq. 2 for the value-vector view);
    * ``"norm"``: ``a_i * ||v||`` averaged over `positions` (Hong et al. 2024's activation
      contribution).

    One `run_with_cache` per `batch_size` prompts for every layer's ``mlp.hook_post``; float64.
    """
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.mlp.hook_post" for l in range(n_layers)]
    w_out = torch.stack([model.blocks[l].mlp.W_out.detach() for l in range(n_layers)]).double()
    if score == "logit":
        ln_w, centre = _final_ln(model)
        v = w_out - w_out.mean(-1, keepdim=True) if centre else w_out
        v = v * ln_w.to(v)
        w_u = model.W_U.detach().double()
        answers = [p.answer for p in probes]
        first = torch.tensor([a[0] for a in metrics.encode_answers(model, answers)])
        uniq, inv = torch.unique(first, return_inverse=True)
        u = w_u[:, uniq.to(w_u.device)] - w_u.mean(-1, keepdim=True)       # [d_model, n_tok]
        vu = torch.einsum("lim,mt->lit", v, u)                            # [layer, d_mlp, n_tok]
        has_scale = "ln_final.hook_scale" in model.hook_dict
        names = names + (["ln_final.hook_scale"] if has_scale else [])
    elif score == "norm":
        if positions not in POSITIONS:
            raise KifError(f"unknown positions {positions!r} (choose from {', '.join(POSITIONS)})")
        v_norm = w_out.norm(dim=-1)                                          # [layer, d_mlp]
    else:
        raise KifError(f"unknown neuron score {score!r} (choose 'logit' or 'norm')")
    texts = _texts(probes)
    out = []
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            batch = list(probes[lo: lo + batch_size])
            tokens, lengths = _tokens(model, texts[lo: lo + batch_size])
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                            padding_side="right")
            acts = torch.stack([cache[n] for n in names[:n_layers]]).double()  # [l, b, pos, m]
            rows = torch.arange(len(batch), device=tokens.device)
            if score == "logit":
                a = acts[:, rows, lengths - 1]                                  # [l, b, m]
                if has_scale:
                    a = a / cache["ln_final.hook_scale"][rows, lengths - 1, 0].double()[None, :, None]
                tok = inv[lo: lo + len(batch)].to(a.device)
                out.append(a * vu[:, :, tok].permute(0, 2, 1))
                continue
            mask = torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device)
            if "subject" in positions:
                mask = mask + _subject_mask(model, batch, tokens.shape[1]).to(mask.device)
            if "last" in positions:
                mask[rows, lengths - 1] = 1.0
            mask = mask.clamp_max(1.0)
            pooled = torch.einsum("lbpm,bp->lbm", acts, mask) / mask.sum(1)[None, :, None]
            out.append(pooled * v_norm[:, None, :])
    return torch.cat(out, dim=1)


def _extract_parametric(model, concept, *, k: int | None, score: str, positions: str,
                        n_report: int, top_tokens: int, batch_size: int) -> Signature:
    n_f = len(concept.forget)
    if not concept.retain:
        raise KifError("parametric concept vectors need retain prompts to compare against")
    c = neuron_contributions(model, list(concept.forget) + list(concept.retain), score=score,
                             positions=positions, batch_size=batch_size)
    s = c[:, :n_f].mean(1) - c[:, n_f:].mean(1)                           # [layer, d_mlp]
    d_mlp = s.shape[1]
    flat = s.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    if k is not None:
        order = order[:k]
    idx = torch.stack([order // d_mlp, order % d_mlp], dim=1)
    # Vocabulary projection of the selected value vectors (Hong et al. 2024 §3).
    w_out = torch.stack([model.blocks[l].mlp.W_out.detach() for l in range(model.cfg.n_layers)])
    vecs = w_out[idx[:, 0].to(w_out.device), idx[:, 1].to(w_out.device)]
    answer_ids = sorted({a[0] for a in metrics.encode_answers(model, [p.answer for p in concept.forget])})
    ans = torch.tensor(answer_ids, dtype=torch.long)
    n_top = min(top_tokens, int(model.cfg.d_vocab_out))
    hit = torch.zeros(len(order), dtype=torch.bool)
    rep_tokens: list[list[int]] = []
    for lo in range(0, len(order), 256):  # bounded memory on large vocabularies
        top = vocab_logits(model, vecs[lo: lo + 256]).topk(n_top, dim=-1).indices.cpu()
        hit[lo: lo + 256] = (top[..., None] == ans).any(-1).any(-1)
        rep_tokens += top[:, :10].tolist()
    # The same rate over a seeded random sample of all neurons: the chance level of that flag
    # (short, frequent answer tokens sit in many value vectors' top tokens).
    n_all = w_out.shape[0] * w_out.shape[1]
    sample = torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:1024]
    rand_top = vocab_logits(model, w_out.reshape(n_all, -1)[sample.to(w_out.device)]).topk(
        n_top, dim=-1).indices.cpu()
    chance = float((rand_top[..., None] == ans).any(-1).any(-1).double().mean())
    tok = model.tokenizer
    report = [{"neuron": [int(l), int(i)], "score": float(sc),
               "top_tokens": [tok.decode([t]) for t in toks],
               "answer_in_top": bool(h)}
              for (l, i), sc, toks, h in zip(idx.tolist()[:n_report], flat[order][:n_report],
                                             rep_tokens[:n_report], hit[:n_report].tolist())]
    layers = torch.bincount(idx[:, 0], minlength=model.cfg.n_layers).tolist()
    info = {"per_layer_count": layers, "top_neurons": report,
            "answer_tokens": [tok.decode([t]) for t in answer_ids],
            "n_answer_in_top_tokens": int(hit.sum()),
            "answer_in_top_rate": float(hit.double().mean()) if len(hit) else 0.0,
            "answer_in_top_rate_random_neurons": chance,
            "score_positive": int((flat[order] > 0).sum()),
            "n_forget": n_f, "n_retain": len(concept.retain)}
    logger.info("concept-vectors/parametric %s: %d neurons per layer %s, %d with an answer token "
                "in their top-%d vocabulary projection", concept.name, len(order), layers,
                int(hit.sum()), n_top)
    settings = {"method": "parametric", "k": k, "score": score,
                "positions": "last" if score == "logit" else positions,
                "contrast": "mean over concept.forget minus mean over concept.retain",
                "n_report": n_report, "top_tokens": n_top, "batch_size": batch_size}
    return new_signature(model, concept, "concept-vectors", component="neuron",
                         component_hooks=tuple(f"blocks.{int(l)}.mlp.hook_post" for l in idx[:, 0]),
                         scores=flat[order].float(), indices=idx.long(),
                         maps={"neuron_scores": s.float()}, settings=settings, info=info)


# --------------------------------------------------------------------------------------------
# The registered kind
# --------------------------------------------------------------------------------------------


@register("concept-vectors")
def extract_concept_vectors(model, concept, *, method: str = "parametric",
                            k: int | None = None, sites: Sequence[str] = ("mlp_out",),
                            layers: Sequence[int] | None = None, n_directions: int = 1,
                            negatives: Sequence[str] = ("retain", "shared"), n_boot: int = 100,
                            accept_d: float = ACCEPT_D, seed: int = 0,
                            score: str = "logit", positions: str = "last",
                            n_report: int = 10, top_tokens: int = 200,
                            batch_size: int = 512) -> Signature:
    """Concept vectors of `concept` (a `kif.concepts.Concept`) in `model` (module docstring).

    ``method="parametric"`` (Hong et al. 2024): ``component="neuron"``, MLP neurons (layer, i)
    ranked by the contribution of their value vector W_out[i] on the forget prompts minus on
    ``concept.retain`` (`score`, `positions`: see :func:`neuron_contributions`); `k` neurons
    (default `N_NEURONS` = 300, see there). ``info``: neurons per layer, the top
    `n_report` neurons' vocabulary projections and whether their top-`top_tokens` tokens contain
    the concept's answer tokens (``n_answer_in_top_tokens`` counts that over all k).

    ``method="activation"`` (KIF/ERUF): ``component="direction"``, `n_directions` raw-space read
    directions per hook (``sites`` x ``layers``), ranked by Cohen's d over all hooks (all of them
    when `k` is None); negatives are the concept's probe sets named in `negatives`. ``info``:
    Cohen's d with its bootstrap interval per hook, the best hook and layer, accepted (d >=
    `accept_d`); ``maps["cohens_d"]`` is the [hook, direction] grid (hook order: sites x layers).
    """
    if method == "parametric":
        return _extract_parametric(model, concept, k=N_NEURONS if k is None else k, score=score,
                                   positions=positions, n_report=n_report,
                                   top_tokens=top_tokens, batch_size=batch_size)
    if method == "activation":
        return _extract_activation(model, concept, k=k, sites=sites, layers=layers,
                                   n_directions=n_directions, negatives=negatives, n_boot=n_boot,
                                   accept_d=accept_d, seed=seed, batch_size=batch_size)
    raise KifError(f"unknown concept-vectors method {method!r} (choose 'parametric' or "
                   "'activation')")
