"""STAMP: a closed-form pseudoinverse edit of one MLP's output weights (RePAIR 2026; the closed
form follows ROME/MEMIT, the null-space variant AlphaEdit).

At layer l, forget keys K_f [n_f, m] (the MLP hidden activation at each forget prompt's last
token, where the fact world's answers are produced), retain keys K_r (every other known person's
and the shared facts' prompts at their last token, plus every token of their text at a small
weight so that later answer tokens keep their outputs too), target values V* = r_bar, the mean MLP output on prompts about
people the model was taught to answer " unknown" about (METHODS.md's refusal value), or the partial
redirect (1 - gamma) K_f W + gamma r_bar. With T = V* - K_f W, TransformerLens' row convention
(out = k @ W_out):

- ridge:      dW = (w_f K_f^T K_f + K_r^T K_r + lam I)^-1 w_f K_f^T T  (w_f: forget weight)
- low-rank:   the same with C = w_f K_f^T K_f + K_r^T K_r ~ U S U^T + sigma (I - U U^T) at rank
              r (randomized SVD, the tail flat at its mean) and Woodbury (see `solve_lowrank`)
- null-space: dW = P (P w_f K_f^T K_f P + lam I)^-1 P w_f K_f^T T with P the projector on the
              eigenvectors of K_r^T K_r below `null_threshold` x the largest eigenvalue, so the
              retain keys' outputs are untouched.

Many facts are one solve. Sequential requests keep earlier edits: pass the earlier erasures as
`preserve`; their forget keys join the retain keys (the model they are read from is already
edited, so preserving them keeps their edited values).
"""

import contextlib
import dataclasses
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif.erasure.core import Delta, Erasure, ErasureError, Timer, low_rank
from kif.erasure.keys import last_token_states
from kif.erasure.stats import key_moments, retain_moments
from kif.erasure.registry import register


@dataclasses.dataclass(frozen=True)
class StampConfig:
    layer: int | None = None  # None: the layer with the most knowledge attribution
    solver: str = "ridge"  # ridge | lowrank | nullspace
    rank: int = 64  # STAMP-LR rank (RePAIR: 64 is the smallest that forgets fully)
    lam: float = 1e-2
    forget_weight: float = 12.0  # forget10: forget_acc 0.047 (oracle 0.028) at retain_acc 0.982
    token_weight: float = 0.003  # weight of every retain token's key (multi-token answers)
    target: str = "unknown"  # unknown | redirect
    gamma: float = 1.0  # redirect strength (1 = fully the refusal value)
    null_threshold: float = 2e-2
    preserve: tuple = ()  # earlier stamp Erasures whose forget keys stay edited
    cache: bool = True  # keep the retain key statistics on disk (kif.erasure.stats)


SOLVERS = ("ridge", "lowrank", "nullspace")


def _hook(l: int) -> tuple[str, str]:
    return f"blocks.{l}.mlp.hook_post", f"blocks.{l}.hook_mlp_out"


def solve_ridge(c: Float[Tensor, "m m"], rhs: Float[Tensor, "m d"], lam: float) -> Float[Tensor, "m d"]:
    """(C + lam I)^-1 rhs by Cholesky (C is a PSD Gram matrix)."""
    a = c + lam * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(a))


def solve_lowrank(c: Float[Tensor, "m m"], rhs: Float[Tensor, "m d"], lam: float, rank: int,
                  generator_seed: int = 0) -> Float[Tensor, "m d"]:
    """(C + lam I)^-1 rhs with C ~ U S U^T + sigma (I - U U^T) at `rank`: randomized SVD (Halko et
    al. 2011) for the top of the spectrum, the rest of it taken as flat at its mean sigma =
    (tr C - sum S) / (m - r) (tr C is free), and the Woodbury identity with lam' = lam + sigma:
    (lam' I + U (S - sigma) U^T)^-1 = lam'^-1 [I - U (lam' (S - sigma)^-1 + I_r)^-1 U^T].
    O(r^3 + r^2 m) after the sketch instead of O(m^3). Without the flat tail (sigma = 0, plain
    Woodbury) every direction past rank r is scaled by 1/lam instead of 1/(lam + s_i): on keys
    whose spectrum decays slowly that is off by orders of magnitude."""
    torch.manual_seed(generator_seed)
    m = c.shape[0]
    r = min(rank, m)
    u, s, _ = torch.svd_lowrank(c, q=r, niter=4)
    sigma = float((torch.diagonal(c).sum() - s.sum()).clamp_min(0) / max(m - r, 1))
    lam_eff = lam + sigma
    top = (s - sigma).clamp_min(torch.finfo(c.dtype).tiny)
    inner = torch.diag(lam_eff / top) + torch.eye(r, dtype=c.dtype, device=c.device)
    utr = u.T @ rhs
    return (rhs - u @ torch.linalg.solve(inner, utr)) / lam_eff


def null_projector(c_retain: Float[Tensor, "m m"], threshold: float) -> Float[Tensor, "m m"]:
    """AlphaEdit's P = U_0 U_0^T on the eigenvectors of the retain Gram with eigenvalue below
    `threshold` x the largest: directions no retain key uses."""
    evals, evecs = torch.linalg.eigh(c_retain)
    keep = evals < threshold * evals.max().clamp_min(torch.finfo(c_retain.dtype).tiny)
    u0 = evecs[:, keep]
    return u0 @ u0.T


def stamp_delta(k_f: Float[Tensor, "n_f m"], t: Float[Tensor, "n_f d"], c_retain: Float[Tensor, "m m"],
                cfg: StampConfig) -> Float[Tensor, "m d"]:
    """The STAMP edit dW (float64) for forget keys `k_f`, residual targets `t` and the retain keys'
    Gram matrix `c_retain`."""
    k_f, t, c_retain = k_f.double(), t.double(), c_retain.double()
    cf = cfg.forget_weight * (k_f.T @ k_f)
    rhs = cfg.forget_weight * (k_f.T @ t)
    if cfg.solver == "ridge":
        return solve_ridge(cf + c_retain, rhs, cfg.lam)
    if cfg.solver == "lowrank":
        return solve_lowrank(cf + c_retain, rhs, cfg.lam, cfg.rank)
    if cfg.solver == "nullspace":
        p = null_projector(c_retain, cfg.null_threshold)
        return p @ solve_ridge(p @ cf @ p, p @ rhs, cfg.lam)
    raise ErasureError(f"unknown STAMP solver {cfg.solver!r} (choose from {', '.join(SOLVERS)})")


def refusal_prompts(concept, method: str) -> list[str]:
    """The concept's prompts on which the model already gives its refusal (the fact world's:
    people it was taught to answer " unknown" about); a concept without them is refused."""
    concept.require("refusal_prompts", method=method)
    return list(concept.refusal.prompts)


@contextlib.contextmanager
def _frozen(model):
    """No gradient for the weights inside the block (their flags are put back after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def layer_attribution(model, probes, batch_size: int = 256, max_probes: int = 128
                      ) -> dict[int, float]:
    """Where the concept's answers are produced: for each layer, the share of
    sum |k * d log p(first answer token) / d k| over the MLP keys at the last prompt token (the
    one-step, gradient x input form of knowledge-neuron attribution, Dai et al. 2022), from one
    batched forward and backward. STAMP edits the layer with the largest share.

    A share over layers is a coarse statistic: an even sample of at most `max_probes` prompts
    gives it (every fact of forget10 is still covered by a phrasing), and gradients flow to the
    activations only, never to the weights (that halves the backward pass)."""
    import torch.nn.functional as F

    from kif import metrics

    probes = list(probes)
    if len(probes) > max_probes:
        probes = probes[::-(-len(probes) // max_probes)]
    hooks = [_hook(l)[0] for l in range(model.cfg.n_layers)]
    ids = metrics.encode_prompts(model, [p.prompt for p in probes])
    first = [a[0] for a in metrics.encode_answers(model, [p.answer for p in probes])]
    mass = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    for s in range(0, len(ids), batch_size):
        tokens, lengths = metrics._padded(model, ids[s:s + batch_size])
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        last = (lengths - 1).to(tokens.device)
        acts: dict[str, Tensor] = {}

        def keep(act, hook):
            if not act.requires_grad:  # the first hook: a leaf, the weights being frozen
                act.requires_grad_(True)
            act.retain_grad()
            acts[hook.name] = act
            return act

        with torch.enable_grad(), _frozen(model):
            logits = model.run_with_hooks(tokens, padding_side="right",
                                          fwd_hooks=[(h, keep) for h in hooks])
            target = torch.tensor(first[s:s + batch_size], device=tokens.device)
            logp = F.log_softmax(logits[rows, last].float(), -1)[rows, target]
            logp.sum().backward()
        for l, h in enumerate(hooks):
            a = acts[h]
            mass[l] += float((a[rows, last] * a.grad[rows, last]).detach().abs().sum())
    model.zero_grad(set_to_none=True)
    share = mass / mass.sum().clamp_min(1e-12)
    return {l: float(v) for l, v in enumerate(share)}


@register("stamp", StampConfig, "weights",
          "closed-form pseudoinverse MLP edit toward the 'unknown' answer (ridge / low-rank / null-space)")
def stamp(model, concept, cfg: StampConfig, *, progress: bool = False,
          base_spec: str = "") -> Erasure:
    from kif.models import weight_hash

    if cfg.solver not in SOLVERS:
        raise ErasureError(f"unknown STAMP solver {cfg.solver!r} (choose from {', '.join(SOLVERS)})")
    concept.require("retain_corpus", "refusal_prompts", method="stamp")
    timer = Timer()
    if cfg.layer is not None and not 0 <= cfg.layer < model.cfg.n_layers:
        raise ErasureError(f"layer {cfg.layer} is outside the model's {model.cfg.n_layers} layers")
    layer_scores = None
    if cfg.layer is None:
        with timer.section("signature"):
            layer_scores = layer_attribution(model, concept.forget)
        layer = max(layer_scores, key=layer_scores.get)
    else:
        layer = cfg.layer
    key, out = _hook(layer)
    forget = [p.prompt for p in concept.forget]
    with timer.section("keys"):
        k_f = last_token_states(model, forget, [key])
        # the retain statistics: every known person and shared fact (cached per model and layer,
        # like ROME/MEMIT's layer statistics) minus the concept's own rows
        moments = retain_moments(model, concept, key, cfg.token_weight, cache=cfg.cache,
                                 method="stamp")
        c_r = {key: moments.gram}
        for prev in cfg.preserve:  # earlier edits' forget keys, read from the edited model
            prev_forget = prev.info.get("forget_prompts")
            if not prev_forget:
                raise ErasureError(f"an earlier erasure of {', '.join(prev.concepts)} to preserve "
                                   f"records no forget prompts (made by an older kif)")
            k = last_token_states(model, prev_forget, [key])[key].double()
            c_r[key] = c_r[key] + k.T @ k
        # r_bar = the mean MLP output on refusal prompts = (mean key) W_out + b_out: caching the
        # mean key keeps it valid after edits of W_out
        refusals = refusal_prompts(concept, "stamp")
        k_bar = key_moments(model, refusals, [""] * len(refusals), key, 0.0,
                            cache=cfg.cache).mean_last
        mlp = model.blocks[layer].mlp
        r_bar = k_bar @ mlp.W_out.detach().double().cpu() + mlp.b_out.detach().double().cpu()
    w = model.blocks[layer].mlp.W_out
    with timer.section("solve"):
        # the values the MLP writes now, bias included (r_bar includes it too)
        v = k_f[key].double() @ w.detach().double().cpu() + mlp.b_out.detach().double().cpu()
        target = r_bar[None] if cfg.target == "unknown" else (1 - cfg.gamma) * v + cfg.gamma * r_bar
        if cfg.target not in ("unknown", "redirect"):
            raise ErasureError(f"unknown STAMP target {cfg.target!r} (unknown | redirect)")
        dw = stamp_delta(k_f[key], target - v, c_r[key], cfg)
    name = f"blocks.{layer}.mlp.W_out"
    # the forget prompts let a later request preserve this one (`preserve`) without the source
    info: dict[str, Any] = {"layer": layer, "n_forget_keys": len(forget), "forget_prompts": forget,
                            "n_retain_keys": moments.n_rows,
                            "seconds": {**timer.sections, "total": timer.total}}
    if layer_scores is not None:
        info["attribution_by_layer"] = layer_scores
    return Erasure(method="stamp", concepts=(concept.name,), base_hash=weight_hash(model),
                   base_spec=base_spec, deltas={name: low_rank(dw.float())},
                   settings={f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                             if f.name != "preserve"}
                   | {"preserve": [list(p.concepts) for p in cfg.preserve]},
                   info=info)


__all__ = ["SOLVERS", "StampConfig", "layer_attribution", "null_projector",
           "solve_lowrank", "solve_ridge", "stamp", "stamp_delta"]
