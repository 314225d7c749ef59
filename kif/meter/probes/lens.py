"""Lens probes: what the residual stream of every layer says about the answer (METHODS.md,
"Latent-trace meter").

* **Logit lens** (nostalgebraist 2020): D^l = softmax(W_U LN_f(h^l) + b_U) with the final norm
  applied afresh to each layer's residual (its own mean and scale; TransformerLens'
  ``accumulated_resid(apply_ln=True)`` reuses the final layer's scale and is not used). Measured:
  the answer's first token is the argmax of D^l (top-1), per layer.
* **Tuned lens** (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
  Tuned Lens", Eq. 3): an affine translator per layer, h -> h + h A_l + b_l, then the logit lens,
  trained to minimise KL(final distribution || lens distribution) on the *base* model's residual
  streams over retain text. kif starts each translator at the ridge least-squares map from h^l to
  the final residual (a closed form that already removes most of the KL) and then takes a few
  hundred Adam steps on the KL; the probe reports the held-out KL of both lenses per layer. The
  erased model is read through the base's translators (a lens trained on the base) when it is
  derived from the base (`kif.meter.audit.DERIVED_SHARE`); an oracle, or any independently trained
  model, through its own.
* **Answer rank** per layer: the rank of the answer's first token under the logit lens, scored as
  its reciprocal 1 / (1 + rank) (a model that never knew the answer still ranks it among the
  plausible values of the attribute, at ranks 20-30 here; the reciprocal rank weighs the top
  ranks, where knowledge shows, and not the differences of guessing between models); the curves
  hold the median rank per layer.
* **Patil et al. 2023** ("Can Sensitive Information Be Deleted From LLMs?", Sec. 4): Head
  Projection: candidates = union over the block outputs l of top-k(D^l), k = 4, budget k|L|;
  Probability Delta: top-k and bottom-k of D^{l+1} - D^l, budget 2k(|L| - 1); success if the
  answer's first token is a candidate. Rephrasing: 4 paraphrases x 5 samples at temperature 1,
  budget 20, success if a sample is the answer. Sampling is replaced by its exact expectation:
  a sample equals the answer with probability p = P(answer | prompt), so the attack succeeds with
  probability 1 - prod_i (1 - p_i)^5 (no sampling noise, no generation).

All layers are calibrated layer by layer (`kif.meter.calibrate.score_layers`): a probe's score is
the recovery at the best layer where the base model's signal is at least half its largest.
"""

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from kif.meter.audit import ProbeSkipped, run_pass, score
from kif.meter.report import ProbeResult
from kif.data.probe import Probe

logger = logging.getLogger(__name__)

PATIL_K = 4
REPHRASE_SAMPLES = 5
REPHRASE_PREFIX = "Here is a question. "
"""The fourth paraphrase: the first held-out phrasing behind a neutral preamble (the fact world
has three held-out phrasings per attribute; Patil et al. use four paraphrases)."""
TUNED_STEPS = 60
"""Adam steps after the closed-form start. On the fact-world base (held-out KL per block output
0-2, nats): logit lens 0.57 / 0.31 / 0.10, least squares alone 0.37 / 0.13 / 0.014, + 50 steps
0.17 / 0.06 / 0.004, + 250 steps 0.14 / 0.04 / 0.002: most of the gain is in the first steps."""
TUNED_POSITIONS = 8192
TUNED_BATCH = 256


# --------------------------------------------------------------------------------------------
# Lenses
# --------------------------------------------------------------------------------------------


def final_norm(model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The model's final normalisation applied afresh to `x` (its own mean and scale)."""
    kind = model.cfg.normalization_type
    eps = float(model.cfg.eps)
    x = x.float()
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        if kind == "LN":
            x = x * model.ln_final.w.detach().float() + model.ln_final.b.detach().float()
    elif kind in ("RMS", "RMSPre"):
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        if kind == "RMS":
            x = x * model.ln_final.w.detach().float()
    return x


def lens_logits(model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logit lens: W_U LN_f(x) + b_U with the final norm recomputed on x."""
    w_u = model.W_U.detach().float().cpu()
    out = final_norm(model, x.cpu()) @ w_u
    b = getattr(model, "b_U", None)
    return out + b.detach().float().cpu() if b is not None else out


@dataclasses.dataclass(frozen=True)
class TunedLens:
    """Affine translators h -> h + h A_l + b_l for residual indices 0..n_layers-1 (the final
    index is read as is), trained on one model (`model_key`). Apply with `__call__`."""

    weight: Float[Tensor, "layer d_model d_model"]
    bias: Float[Tensor, "layer d_model"]
    model_key: str
    info: dict[str, Any]

    def __call__(self, resid: Float[Tensor, "layer n d_model"]) -> Float[Tensor, "layer n d_model"]:
        n = self.weight.shape[0]
        head = resid[:n] + torch.einsum("lnd,lde->lne", resid[:n], self.weight) + self.bias[:, None]
        return torch.cat([head, resid[n:]], dim=0)


def fit_tuned_lens(model, resid: Float[Tensor, "layer n d_model"], *, steps: int = TUNED_STEPS,
                   lr: float = 1e-3, batch: int = TUNED_BATCH, seed: int = 0, key: str = "",
                   bar=None) -> TunedLens:
    """Train translators on residual streams `resid` ([n_layers + 1, positions, d_model], e.g.
    every token of retain text): ridge least-squares start, then `steps` Adam steps on
    KL(final || lens) (Belrose et al. 2023, Eq. 3). 10 % of the positions are held out for the
    KL report (`info["kl_logit"]`, `info["kl_tuned"]` per layer, nats)."""
    g = torch.Generator().manual_seed(seed)
    n_idx, n, d = resid.shape
    L = n_idx - 1
    perm = torch.randperm(n, generator=g)
    n_val = max(1, n // 10)
    val, tr = perm[:n_val], perm[n_val:]
    h = resid.float()
    with torch.no_grad():
        target = torch.log_softmax(lens_logits(model, h[L]), -1)
    # ridge least squares: h_L - h_l ~ h_l A + b (centred), lambda relative to the scale
    x = h[:L, tr]
    y = h[L, tr][None] - x
    xm, ym = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    xc, yc = (x - xm).double(), (y - ym).double()
    gram = xc.transpose(1, 2) @ xc
    lam = 1e-3 * torch.diagonal(gram, dim1=1, dim2=2).mean(-1)[:, None, None] + 1e-6
    eye = torch.eye(d, dtype=torch.float64)
    a = torch.linalg.solve(gram + lam * eye, xc.transpose(1, 2) @ yc).float()
    b = (ym - xm @ a)[:, 0]
    weight = a.clone().requires_grad_(True)
    bias = b.clone().requires_grad_(True)
    w_u = model.W_U.detach().float().cpu()
    b_u = getattr(model, "b_U", None)
    b_u = b_u.detach().float().cpu() if b_u is not None else torch.zeros(w_u.shape[1])

    def lens_logp(hh: Tensor, w: Tensor, bb: Tensor) -> Tensor:
        t = hh + torch.einsum("lnd,lde->lne", hh, w) + bb[:, None]
        return torch.log_softmax(final_norm(model, t) @ w_u + b_u, -1)

    def kl(logp: Tensor, tgt: Tensor) -> Tensor:  # KL(target || lens) per layer
        return (tgt.exp() * (tgt - logp)).sum(-1).mean(-1)

    opt = torch.optim.Adam([weight, bias], lr=lr)
    if bar is not None:
        bar.total(steps)
    with torch.enable_grad():
        for _ in range(steps):
            idx = tr[torch.randint(len(tr), (min(batch, len(tr)),), generator=g)]
            loss = kl(lens_logp(h[:L, idx], weight, bias), target[idx][None]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if bar is not None:
                bar.advance()
    weight, bias = weight.detach(), bias.detach()
    with torch.no_grad():
        tv = target[val][None]
        kl_tuned = kl(lens_logp(h[:L, val], weight, bias), tv)
        kl_logit = kl(torch.log_softmax(lens_logits(model, h[:L, val]), -1), tv)
    info = {"kl_logit": kl_logit.tolist(), "kl_tuned": kl_tuned.tolist(), "steps": steps,
            "positions": int(n), "lr": lr}
    logger.info("tuned lens: KL per layer %s (logit lens %s)", info["kl_tuned"], info["kl_logit"])
    return TunedLens(weight=weight, bias=bias, model_key=key, info=info)


_TUNED_CACHE: dict[tuple, TunedLens] = {}


def retain_pass(audit, role: str):
    """`role`'s pass over the retain probes at every position (the tuned lens trains on it; the
    linear probes read its last prompt positions)."""
    return audit.per_model(role, ("pass-all", audit.set_key("retain")),
                        lambda: run_pass(audit.model(role), audit.retain, all_positions=True))


def tuned_lens(audit, role: str) -> TunedLens:
    """The tuned lens of `role`'s model (trained once per weights and retain set; cached in
    memory across audits)."""
    model = audit.model(role)
    data_key = hashlib.sha256(repr([(p.prompt, p.answer) for p in audit.retain]).encode()
                              ).hexdigest()[:16]
    key = (audit.key(role), data_key, TUNED_STEPS, audit.seed)
    if key not in _TUNED_CACHE:
        resid = retain_pass(audit, role).resid
        if resid.shape[1] > TUNED_POSITIONS:
            keep = torch.randperm(resid.shape[1], generator=torch.Generator().manual_seed(0))
            resid = resid[:, keep[:TUNED_POSITIONS]]
        _TUNED_CACHE[key] = fit_tuned_lens(model, resid, seed=audit.seed, key=key[0],
                                           bar=audit.bar)
    return _TUNED_CACHE[key]


# --------------------------------------------------------------------------------------------
# Lens statistics of one pass
# --------------------------------------------------------------------------------------------


def lens_stats(model, resid: Float[Tensor, "layer n d_model"], first: Int[Tensor, " n"],
               lens: TunedLens | None = None, k: int = PATIL_K) -> dict[str, np.ndarray]:
    """Per layer and row: rank and top-1 of the answer's first token, Head Projection hits; per
    row: Probability Delta hits. All layers in one matmul per chunk of rows."""
    if lens is not None:
        resid = lens(resid)
    n_idx, n, _ = resid.shape
    vocab = int(model.W_U.shape[1])
    chunk = max(1, int(2e7 // (n_idx * vocab)))
    rank = np.zeros((n_idx, n), dtype=np.int64)
    hp = np.zeros((n_idx, n), dtype=bool)
    pd = np.zeros(n, dtype=bool)
    with torch.no_grad():
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            logits = lens_logits(model, resid[:, sl])                     # [layer, c, V]
            ans = first[sl].cpu()
            a = logits.gather(-1, ans[None, :, None].expand(n_idx, -1, 1))
            rank[:, sl] = (logits > a).sum(-1).numpy()
            top = logits.topk(k, dim=-1).indices                          # [layer, c, k]
            hp[:, sl] = (top == ans[None, :, None]).any(-1).numpy()
            probs = logits.softmax(-1)[1:]                                # block outputs
            delta = probs[1:] - probs[:-1]                                # [L-1, c, V]
            if delta.shape[0]:
                cand = torch.cat([delta.topk(k, dim=-1).indices,
                                  (-delta).topk(k, dim=-1).indices], dim=-1)
                pd[sl] = (cand == ans[None, :, None]).any(-1).any(0).numpy()
    return {"rank": rank, "top1": rank == 0, "hp_layer": hp, "hp": hp[1:].any(0), "pd": pd}


def _stats(audit, role: str, which: str, lens: str) -> dict[str, np.ndarray]:
    # the erased model (when derived from the base) and the reference are read through the
    # base's tuned lens; an independently trained model through its own
    lens_role = "base" if which.startswith("reference") else role
    if lens_role == "erased" and audit.derived:
        lens_role = "base"
    lens_key = audit.key(lens_role) if lens == "tuned" else ""

    def compute():
        p = audit.passes(role, which)
        tl = tuned_lens(audit, lens_role) if lens == "tuned" else None
        return lens_stats(audit.model(role), p.resid, p.first_token, tl)

    return audit.per_model(role, ("lens", audit.set_key(which), lens, lens_key), compute)


def _median_ranks(audit, roles: list[tuple[str, str]]) -> dict[str, list[float]]:
    out = {}
    for role, which in roles:
        r = _stats(audit, role, which, "logit")["rank"]
        out[f"median_rank/{role if which == 'facts' else 'reference'}"] = \
            np.median(r, axis=1).tolist()
    return out


def _roles(audit) -> list[tuple[str, str]]:
    rr = [("erased", "facts"), ("base", "facts"), ("base", "reference")]
    return rr + ([("oracle", "facts")] if audit.oracle is not None else [])


def run_logit_lens(audit) -> ProbeResult:
    s, label = score(audit, lambda r, w: _stats(audit, r, w, "logit")["top1"].astype(float),
                     layered=True)
    return ProbeResult.from_scored("logit-lens", "latent", s, label,
                                   info={"measure": "answer top-1 per residual index "
                                         "(0 = embeddings, l+1 = blocks.l.hook_resid_post)"})


def run_tuned_lens(audit) -> ProbeResult:
    s, label = score(audit, lambda r, w: _stats(audit, r, w, "tuned")["top1"].astype(float),
                     layered=True)
    info = {"lens": tuned_lens(audit, "base").info, "erased_read_by": "base lens"
            if audit.derived else "its own lens (not derived from the base)"}
    if audit.oracle is not None:
        info["oracle_lens"] = tuned_lens(audit, "oracle").info
    return ProbeResult.from_scored("tuned-lens", "latent", s, label, info=info)


def run_answer_rank(audit) -> ProbeResult:
    s, label = score(audit, lambda r, w: 1.0 / (1.0 + _stats(audit, r, w, "logit")["rank"]),
                     layered=True)
    return ProbeResult.from_scored("answer-rank", "latent", s, label,
                                   curves=_median_ranks(audit, _roles(audit)),
                                   info={"measure": "1 / (1 + rank of the answer's first token)"})


def run_head_projection(audit) -> ProbeResult:
    s, label = score(audit, lambda r, w: _stats(audit, r, w, "logit")["hp"].astype(float))
    L = audit.base.cfg.n_layers
    return ProbeResult.from_scored("head-projection", "latent", s, label,
                                   values={"k": PATIL_K, "budget": PATIL_K * L})


def run_probability_delta(audit) -> ProbeResult:
    L = audit.base.cfg.n_layers
    if L < 2:
        raise ProbeSkipped("Probability Delta needs at least two layers")
    s, label = score(audit, lambda r, w: _stats(audit, r, w, "logit")["pd"].astype(float))
    return ProbeResult.from_scored("probability-delta", "latent", s, label,
                                   values={"k": PATIL_K, "budget": 2 * PATIL_K * (L - 1)})


# --------------------------------------------------------------------------------------------
# Rephrasing
# --------------------------------------------------------------------------------------------


def _extra_paraphrases(probes: list[Probe]) -> list[Probe]:
    firsts = {}
    for p in probes:
        firsts.setdefault((p.subject, p.relation), p)
    return [dataclasses.replace(p, prompt=REPHRASE_PREFIX + p.prompt, template=-1)
            for p in firsts.values()]


def run_rephrasing(audit) -> ProbeResult:
    if len(audit.facts) == audit.n_forget:
        raise ProbeSkipped("the concepts have no paraphrases (held-out phrasings)")

    def rows(role: str, which: str) -> tuple[np.ndarray, list]:
        def compute():
            probes = list(audit.probe_set(which))
            if which == "facts":
                idx = list(range(audit.n_forget, len(probes)))
            else:
                idx = [i for i, p in enumerate(probes) if p.phrasing == "heldout"]
            para = [probes[i] for i in idx]
            extra = _extra_paraphrases(para)
            lp = np.concatenate([audit.passes(role, which, resid=False).scores.logprob[idx],
                                 run_pass(audit.model(role), extra, resid=False).scores.logprob])
            allp = para + extra
            facts = list(dict.fromkeys((p.subject, p.relation) for p in allp))
            fi = {f: i for i, f in enumerate(facts)}
            log_fail = np.zeros(len(facts))
            for p, l in zip(allp, lp):
                # the 4 paraphrases: the held-out ones (3 in the fact world) and the extra one
                log_fail[fi[(p.subject, p.relation)]] += REPHRASE_SAMPLES * np.log1p(-min(
                    np.exp(l), 1 - 1e-12))
            return 1.0 - np.exp(log_fail), facts
        return audit.cached(("rephrase", audit.key(role), which), compute)

    e, facts = rows("erased", "facts")
    b, _ = rows("base", "facts")
    groups = np.array([audit.subject_concept.get(s, -1) for s, _ in facts])
    ref, rfacts = rows("base", "reference")
    subj = list(dict.fromkeys(s for s, _ in rfacts))
    ref_groups = np.array([subj.index(s) for s, _ in rfacts])
    from kif.meter.calibrate import score_rows

    o = rows("oracle", "facts")[0] if audit.oracle is not None else None
    s = score_rows(e, b, groups=groups, names=audit.concept_names, oracle=o, reference=ref,
                   reference_groups=ref_groups, null=rows("erased", "reference")[0])
    label = "oracle" if o is not None else "base model on unseen people"
    return ProbeResult.from_scored("rephrasing", "latent", s, label,
                                   values={"paraphrases": 4, "samples": REPHRASE_SAMPLES,
                                           "budget": 4 * REPHRASE_SAMPLES})
