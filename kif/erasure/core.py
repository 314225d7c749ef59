"""The `Erasure`: what every erasure operator returns (DESIGN.md convention 9).

An erasure is either a *weight delta* (dense tensors or low-rank factors per parameter, added to
the base model's weights) or a *hook patch* (operators on canonical TransformerLens hooks, e.g. the
gated suppression capsule), or both. It is tied to the SHA-256 of the weights it was computed on
(`kif.models.weight_hash`): applying it to another model is refused. Applying returns a handle
that holds the original tensors, so removing it gives the base weights back bit for bit (a float
subtraction `(W + dW) - dW` would not).
"""

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif.errors import KifError


class ErasureError(KifError):
    """An erasure that cannot be applied, saved or loaded (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Delta:
    """A change to one parameter: `dense` ([*param shape]) or low-rank `a @ b` (a: [rows, r],
    b: [r, cols], for 2-D parameters; TransformerLens per-head weights are 3-D and use dense)."""

    dense: Tensor | None = None
    a: Tensor | None = None
    b: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.a is None or self.b is None):
            raise ErasureError("a Delta is either dense or low-rank (a, b)")

    @property
    def rank(self) -> int | None:
        return None if self.a is None else int(self.a.shape[1])

    def value(self, like: Tensor) -> Tensor:
        """The full change in `like`'s dtype and device, computed in float32 (deterministic: the
        same inputs give the same bits, which `apply` relies on for re-application)."""
        if self.dense is not None:
            d = self.dense.to(device=like.device, dtype=torch.float32)
        else:
            d = self.a.to(like.device, torch.float32) @ self.b.to(like.device, torch.float32)
        return d.reshape(like.shape)

    def numel(self) -> int:
        return sum(t.numel() for t in (self.dense, self.a, self.b) if t is not None)


@dataclasses.dataclass(frozen=True)
class HookOp:
    """One operator on one hook: `op` names a builder in `kif.erasure.hooks.HOOK_OPS`, which
    turns (`tensors`, `params`) into a TransformerLens forward hook."""

    hook: str
    op: str
    tensors: Mapping[str, Tensor]
    params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Erasure:
    """A reversible erasure of `concepts` from the model whose weights hash to `base_hash`.

    Apply with `handle = erasure.apply(model)`, remove with `handle.remove()` (bit-exact), or
    `with erasure.applied(model): ...`. Save with `kif.erasure.io.save_erasure`.
    """

    method: str
    concepts: tuple[str, ...]
    base_hash: str
    base_spec: str  # the name or path the base model was loaded from (to reopen hook patches)
    deltas: Mapping[str, Delta] = dataclasses.field(default_factory=dict)
    hooks: tuple[HookOp, ...] = ()
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """'weights', 'hooks' or 'weights+hooks'."""
        parts = (["weights"] if self.deltas else []) + (["hooks"] if self.hooks else [])
        return "+".join(parts) or "empty"

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of each parameter's change (for reports)."""
        out = {}
        for name, d in self.deltas.items():
            like = torch.empty(d.dense.shape if d.dense is not None
                               else (d.a.shape[0], d.b.shape[1]))
            out[name] = float(d.value(like).norm())
        return out

    def check_base(self, model) -> None:
        from kif.models import weight_hash

        h = weight_hash(model)
        if h != self.base_hash:
            raise ErasureError(f"this erasure was computed on weights {self.base_hash[:12]}; the "
                               f"model's weights hash to {h[:12]} (another model, or already "
                               f"edited)")

    def apply(self, model, check: bool = True) -> "AppliedErasure":
        """Add the deltas to `model`'s weights (in place) and its hook patch as permanent hooks.
        Refuses a model whose weights are not the base this erasure was computed on."""
        if check:
            self.check_base(model)
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise ErasureError(f"the model has no parameter {missing[0]!r}")
        originals = {}
        with torch.no_grad():
            for name, d in self.deltas.items():
                p = params[name]
                originals[name] = p.detach().clone()
                p.copy_((p.float() + d.value(p)).to(p.dtype))
        from kif.erasure.hooks import build_hook

        hooks = [(op.hook, build_hook(op)) for op in self.hooks]
        for name, fn in hooks:
            model.add_hook(name, fn, is_permanent=True)
        return AppliedErasure(self, model, originals, hooks)

    def applied(self, model) -> "AppliedErasure":
        return self.apply(model)


class AppliedErasure:
    """An erasure in place on a model; `remove()` restores the original tensors bit for bit and
    takes its hooks off (also usable as a context manager)."""

    def __init__(self, erasure: Erasure, model, originals: dict[str, Tensor],
                 hooks: list[tuple[str, Callable]]):
        self.erasure, self.model, self._originals, self._hooks = erasure, model, originals, hooks
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in self._originals.items():
                params[name].copy_(t)
        if self._hooks:
            mod = self.model.mod_dict
            for name, fn in self._hooks:
                hp = mod[name]
                # take off exactly our permanent hooks; other tools' hooks stay
                for h in [h for h in hp.fwd_hooks if h.user_hook is fn]:
                    h.hook.remove()
                    hp.fwd_hooks.remove(h)
        self.active = False

    def __enter__(self) -> "AppliedErasure":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def low_rank(delta: Float[Tensor, "rows cols"], rank: int | None = None, rtol: float = 1e-6) -> Delta:
    """A Delta for `delta`: low-rank factors when that is smaller (numerical rank at `rtol` of the
    largest singular value, or `rank`), dense otherwise."""
    if delta.ndim != 2:
        return Delta(dense=delta.detach().float().cpu())
    d64 = delta.detach().double().cpu()
    u, s, vh = torch.linalg.svd(d64, full_matrices=False)
    r = int((s > rtol * s[0]).sum()) if rank is None and s.numel() and s[0] > 0 else (rank or 0)
    if r * (delta.shape[0] + delta.shape[1]) >= delta.numel():
        return Delta(dense=delta.detach().float().cpu())
    return Delta(a=(u[:, :r] * s[:r]).float(), b=vh[:r].float())


class Timer:
    """Named wall-clock sections, for an erasure's `info["seconds"]`."""

    def __init__(self) -> None:
        self.sections: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def section(self, name: str):
        timer = self

        class _S:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.sections[name] = timer.sections.get(name, 0.0) + time.perf_counter() - self.t

        return _S()

    @property
    def total(self) -> float:
        return time.perf_counter() - self._t0


def concept_names(concepts: Iterable[Any]) -> tuple[str, ...]:
    out: list[str] = []
    for c in concepts:
        out.append(c if isinstance(c, str) else c.name)
    return tuple(out)


__all__ = ["AppliedErasure", "Delta", "Erasure", "ErasureError", "HookOp", "Timer",
           "concept_names", "low_rank"]
