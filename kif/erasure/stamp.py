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
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif import integrity, metrics
from kif.erasure.core import Delta, Erasure, ErasureError, Timer, low_rank
from kif.erasure.keys import last_token_states
from kif.erasure.stats import cache_dir, key_dim, key_moments, retain_moments
from kif.erasure.registry import register


@dataclasses.dataclass(frozen=True)
class StampConfig:
    layer: int | None = None  # None: the layer with the most knowledge attribution
    solver: str = "ridge"  # ridge | lowrank | nullspace
    rank: int = 64  # STAMP-LR rank (RePAIR: 64 is the smallest that forgets fully)
    lam: float = 1e-2
    # None: the smallest of FORGET_WEIGHTS whose edit leaves at most `max_forget_acc` of the
    # forget prompts answered (chosen on the model; the retain cost grows with the weight)
    forget_weight: float | None = 12.0
    token_weight: float = 0.003  # weight of every retain token's key (multi-token answers)
    target: str = "unknown"  # unknown | redirect | optimized (multi-layer, `kif.erasure.spread`)
    gamma: float = 1.0  # redirect strength (1 = fully the refusal value)
    # optimized: the layers the edit is spread over (empty: `spread` layers from the attribution
    # layer on, as MEMIT spreads over a few consecutive MLPs (5 in GPT-J); every layer costs a
    # retain Gram of d_mlp^2 in float64 and one more solve)
    layers: tuple[int, ...] = ()
    spread: int = 5
    opt_steps: int = 100  # optimized: at most this many Adam steps for each prompt's target
    opt_lr: float = 0.1
    # optimized: a row stops once p(refusal) reaches this (None: every row takes opt_steps)
    opt_stop: float | None = None
    # optimized: L2 penalty on the residual change; a weaker one makes larger targets that a
    # smaller forget weight reaches, which costs the retain keys less (results/ has the sweep)
    opt_decay: float = 3e-4
    max_forget_acc: float = 0.02  # forget_weight=None: the calibration's bar
    null_threshold: float = 2e-2
    preserve: tuple = ()  # earlier stamp Erasures whose forget keys stay edited
    cache: bool = True  # keep the retain key statistics on disk (kif.erasure.stats)

    def __post_init__(self) -> None:
        if self.opt_stop is not None and not 0 < self.opt_stop < 1:
            raise ErasureError(f"STAMP's opt_stop is a probability between 0 and 1, got {self.opt_stop}")
        if self.opt_steps < 0:
            raise ErasureError(f"STAMP's opt_steps cannot be negative, got {self.opt_steps}")


SOLVERS = ("ridge", "lowrank", "nullspace")
TARGETS = ("unknown", "redirect", "optimized")
FORGET_WEIGHTS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 24.0)  # the calibration's grid, smallest first


def _hook(l: int) -> tuple[str, str]:
    return f"blocks.{l}.mlp.hook_post", f"blocks.{l}.hook_mlp_out"


def solve_ridge(c: Float[Tensor, "m m"], rhs: Float[Tensor, "m d"], lam: float,
                overwrite: bool = False) -> Float[Tensor, "m d"]:
    """(C + lam I)^-1 rhs by Cholesky (C is a PSD Gram matrix); with `overwrite`, C's own buffer
    is factored in place (an m x m float64 copy is 72 MiB at m = 3072)."""
    a = c if overwrite else c.clone()
    a.diagonal().add_(lam)  # no identity matrix
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(a, out=a))


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
    rhs = cfg.forget_weight * (k_f.T @ t)
    if cfg.solver == "nullspace":
        p = null_projector(c_retain, cfg.null_threshold)
        return p @ solve_ridge(p @ (cfg.forget_weight * (k_f.T @ k_f)) @ p, p @ rhs, cfg.lam)
    # C_retain + w K_f^T K_f in one m x m buffer (the Gram is the memory of the solve)
    c = torch.addmm(c_retain, k_f.T, k_f, alpha=cfg.forget_weight)
    if cfg.solver == "ridge":
        return solve_ridge(c, rhs, cfg.lam, overwrite=True)
    if cfg.solver == "lowrank":
        return solve_lowrank(c, rhs, cfg.lam, cfg.rank)
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


def _choose_layers(model, concept, cfg: StampConfig, timer: Timer
                   ) -> tuple[list[int], dict[int, float] | None]:
    """The edited layers: `cfg.layer`, else the one with the most knowledge attribution; the
    optimized target spreads from there over `cfg.spread` layers unless `cfg.layers` names them."""
    n = model.cfg.n_layers
    for l in (*cfg.layers, *(() if cfg.layer is None else (cfg.layer,))):
        if not 0 <= l < n:
            raise ErasureError(f"layer {l} is outside the model's {n} layers")
    if cfg.layers and cfg.target != "optimized":
        raise ErasureError("STAMP's layers= spreads the edit over several layers, which needs "
                           "target=optimized (the one-layer targets take layer=)")
    if cfg.layers:
        return sorted(set(cfg.layers)), None
    scores = None
    if cfg.layer is None:
        with timer.section("signature"):
            scores = layer_attribution(model, concept.forget)
        layer = max(scores, key=scores.get)
    else:
        layer = cfg.layer
    if cfg.target != "optimized":
        return [layer], scores
    if cfg.spread < 1:
        raise ErasureError(f"STAMP's spread must be at least 1 layer, got {cfg.spread}")
    return list(range(layer, min(layer + cfg.spread, n))), scores


def _retain_gram(model, concept, key: str, cfg: StampConfig) -> tuple[Tensor, int]:
    """The retain keys' Gram at `key` (cached per model and layer, like ROME/MEMIT's layer
    statistics, minus the concept's own rows), plus the earlier edits' forget keys to preserve
    (read from the edited model, so their edited values are kept)."""
    moments = retain_moments(model, concept, key, cfg.token_weight, cache=cfg.cache, method="stamp")
    gram = moments.gram
    for prev in cfg.preserve:
        prev_forget = prev.info.get("forget_prompts")
        if not prev_forget:
            raise ErasureError(f"an earlier erasure of {', '.join(prev.concepts)} to preserve "
                               f"records no forget prompts (made by an older kif)")
        k = last_token_states(model, prev_forget, [key])[key].double()
        gram = gram + k.T @ k
    return gram, moments.n_rows


# Above this many bytes, a spread edit's retain Grams wait on disk instead of in memory: the
# solve needs one layer's at a time, and five float64 d_mlp^2 Grams are 360 MiB on GPT-2 small
SPILL_BYTES = 128 * 2 ** 20


class _Grams(Mapping):
    """The retain Grams of the edited layers, `grams[l]`: held in memory, or, when the ones not
    being solved would take more than `SPILL_BYTES`, written to a staging folder in kif's cache
    (on disk, where /tmp may be memory) as each is computed, and read back whenever a solve asks
    for it (each calibration weight reads every layer's once): float64 written and read
    exactly, so the edit is the same. The folder is named with the machine and process, so one
    that a killed run left is swept by the next (`kif.integrity.stage`). A disk that refuses the
    write costs the memory, never the erasure: that Gram stays in memory. `close()` removes
    the folder."""

    def __init__(self, n_layers: int, m: int):
        self._held: dict[int, Tensor] = {}
        self._layers: list[int] = []
        self._on_disk: set[int] = set()
        self._dir: pathlib.Path | None = None
        if (n_layers - 1) * m * m * 8 > SPILL_BYTES:
            try:
                self._dir = integrity.stage(cache_dir() / "grams")
            except OSError:
                self._dir = None

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def spilled(self) -> bool:
        """Whether any Gram went to disk (read after `close()` too)."""
        return bool(self._on_disk)

    def _path(self, l: int) -> pathlib.Path:
        return self._dir / f"layer{l}.safetensors"

    def __setitem__(self, l: int, gram: Tensor) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        self._layers.append(l)
        if self._dir is not None:
            try:
                save_file({"gram": gram.contiguous()}, str(self._path(l)))
                self._on_disk.add(l)
                return
            except (OSError, SafetensorError):  # a full or read-only disk: keep it here
                self._path(l).unlink(missing_ok=True)
        self._held[l] = gram

    def __getitem__(self, l: int) -> Tensor:
        from safetensors.torch import load_file

        if l in self._on_disk:
            return load_file(str(self._path(l)))["gram"]
        return self._held[l]

    def close(self) -> None:
        self._held.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _one_layer_solver(model, concept, cfg: StampConfig, layer: int, gram: Tensor, forget: list[str]):
    """weight -> {W_out: delta} for the one-layer targets (the refusal value r_bar, or the
    partial redirect toward it)."""
    key = _hook(layer)[0]
    k_f = last_token_states(model, forget, [key])[key]
    # r_bar = the mean MLP output on refusal prompts = (mean key) W_out + b_out: caching the
    # mean key keeps it valid after edits of W_out
    refusals = refusal_prompts(concept, "stamp")
    k_bar = key_moments(model, refusals, [""] * len(refusals), key, 0.0, cache=cfg.cache).mean_last
    mlp = model.blocks[layer].mlp
    w_out, b_out = mlp.W_out.detach().double().cpu(), mlp.b_out.detach().double().cpu()
    r_bar = k_bar @ w_out + b_out
    v = k_f.double() @ w_out + b_out  # the values the MLP writes now, bias included
    target = r_bar[None] if cfg.target == "unknown" else (1 - cfg.gamma) * v + cfg.gamma * r_bar
    name = f"blocks.{layer}.mlp.W_out"

    def solve(weight: float) -> dict[str, Tensor]:
        return {name: stamp_delta(k_f, target - v, gram,
                                  dataclasses.replace(cfg, forget_weight=weight))}
    return solve


def _spread_solver(model, concept, cfg: StampConfig, layers: list[int], grams: Mapping[int, Tensor],
                   forget: list[str]):
    """weight -> {W_out: delta} for the optimized target spread over `layers`, and a summary of
    the residual targets (steps taken, the refusal's lowest probability, rows stopped short)."""
    from kif.erasure import spread

    _check_spread_model(model, layers)

    target_id = metrics.encode_answers(model, [concept.refusal.target])[0][0]
    ids = metrics.encode_prompts(model, forget)
    with _frozen(model):
        targets = spread.residual_targets(model, ids, layers[-1], target_id, cfg.opt_steps,
                                          cfg.opt_lr, cfg.opt_decay, cfg.opt_stop)
    first = spread.first_pass(model, forget, layers)  # the unedited model's: every weight's

    def solve(weight: float) -> dict[str, Tensor]:
        c = dataclasses.replace(cfg, forget_weight=weight)
        return spread.spread_edit(model, forget, layers, targets.delta, grams,
                                  lambda k, t, g: stamp_delta(k, t, g, c), first=first)[0]
    return solve, targets.summary(cfg.opt_stop)


def _check_spread_model(model, layers: list[int]) -> None:
    """The spread edit's forwards resume inside the model at `blocks.{l}.hook_resid_pre`: a hook
    there would run twice, so such a model gets a one-line refusal instead of a wrong edit (a
    model the key-value cache does not serve was refused before any forward, in `stamp`)."""
    hooked = [l for l in layers if metrics._has_hooks(model.blocks[l].hook_resid_pre)]
    if hooked:
        raise ErasureError(f"STAMP's optimized target cannot run with a hook on "
                           f"blocks.{hooked[0]}.hook_resid_pre (remove it first)")


def forget_accuracy(model, concept, deltas: dict[str, Tensor]) -> float:
    """The share of the concept's forget probes still answered with `deltas` added to the
    weights (the model is put back bit for bit)."""
    from kif.erasure.spread import with_deltas

    probes = list(concept.forget)
    return with_deltas(model, deltas, lambda: metrics.probe_accuracy(model, probes))


def _calibrated(model, concept, cfg: StampConfig, solve) -> tuple[dict[str, Tensor], float, list]:
    """`solve` at `cfg.forget_weight`, or (None) at the smallest grid weight whose edit leaves at
    most `cfg.max_forget_acc` of the forget probes answered (the largest if none does)."""
    if cfg.forget_weight is not None:
        return solve(cfg.forget_weight), cfg.forget_weight, []
    tried = []
    for w in FORGET_WEIGHTS:
        deltas = solve(w)
        acc = forget_accuracy(model, concept, deltas)
        tried.append({"forget_weight": w, "forget_acc": acc})
        if acc <= cfg.max_forget_acc:
            break
    return deltas, w, tried


@register("stamp", StampConfig, "weights",
          "closed-form pseudoinverse MLP edit toward the 'unknown' answer (ridge / low-rank / "
          "null-space; one layer, or spread over several toward optimized targets)")
def stamp(model, concept, cfg: StampConfig, *, progress: bool = False,
          base_spec: str = "") -> Erasure:
    from kif.models import weight_hash

    if cfg.solver not in SOLVERS:
        raise ErasureError(f"unknown STAMP solver {cfg.solver!r} (choose from {', '.join(SOLVERS)})")
    if cfg.target not in TARGETS:
        raise ErasureError(f"unknown STAMP target {cfg.target!r} (choose from {', '.join(TARGETS)})")
    if cfg.opt_stop is not None and cfg.target != "optimized":
        raise ErasureError("STAMP's opt_stop stops the optimized target's loop; it needs "
                           "target=optimized")
    concept.require("retain_corpus", "refusal_prompts", method="stamp")
    why = metrics.kv_cache_unsupported(model) if cfg.target == "optimized" else None
    if why is not None:  # before any forward: the refusal costs nothing
        raise ErasureError(f"STAMP's optimized target runs through the key-value cache, which "
                           f"does not serve this model: {why}")
    timer = Timer()
    layers, layer_scores = _choose_layers(model, concept, cfg, timer)
    forget = [p.prompt for p in concept.forget]
    grams = _Grams(len(layers), key_dim(model, _hook(layers[0])[0]))
    try:
        with timer.section("keys"):
            n_retain = 0
            for l in layers:
                grams[l], n_retain = _retain_gram(model, concept, _hook(l)[0], cfg)
            if cfg.target == "optimized":
                solve, target_info = _spread_solver(model, concept, cfg, layers, grams, forget)
            else:
                solve = _one_layer_solver(model, concept, cfg, layers[0], grams[layers[0]], forget)
        with timer.section("solve"):
            deltas, weight, tried = _calibrated(model, concept, cfg, solve)
    finally:
        grams.close()
    # the forget prompts let a later request preserve this one (`preserve`) without the source
    info: dict[str, Any] = {"layer": layers[0], "layers": layers, "n_forget_keys": len(forget),
                            "grams_spilled": grams.spilled,
                            "forget_prompts": forget, "n_retain_keys": n_retain,
                            "forget_weight": weight,
                            "seconds": {**timer.sections, "total": timer.total}}
    if tried:
        info["forget_weight_calibration"] = tried
    if cfg.target == "optimized":
        info["residual_targets"] = target_info
    if layer_scores is not None:
        info["attribution_by_layer"] = layer_scores
    return Erasure(method="stamp", concepts=(concept.name,), base_hash=weight_hash(model),
                   base_spec=base_spec, deltas={n: low_rank(d.float()) for n, d in deltas.items()},
                   settings={f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                             if f.name != "preserve"}
                   | {"preserve": [list(p.concepts) for p in cfg.preserve]},
                   info=info)


__all__ = ["FORGET_WEIGHTS", "SOLVERS", "TARGETS", "StampConfig", "forget_accuracy",
           "layer_attribution", "null_projector", "solve_lowrank", "solve_ridge", "stamp",
           "stamp_delta"]
