"""Training a model in place, then giving it back bit for bit.

Erasure methods and meter attacks used to train a `copy.deepcopy` of the model: a second copy of
every weight, buffer and hook point. `inplace_training(model, names)` trains the model itself
and keeps, instead, one copy of the *original values of the named parameters only*: the few
matrices a LoRA or RMU touches, or every trained weight for full fine-tuning (which therefore
still needs one copy of the trained parameters, though not of the buffers, the untrained
parameters or the module tree).

On exit (normal return, an exception, KeyboardInterrupt) each touched parameter gets its original values back by `copy_` of the
saved tensor (never by subtracting the update, which is not bit-exact in floating point), and
every `requires_grad` flag and the train/eval mode are restored. Permanent hooks on the model
stay where they are, so a hook-based erasure is trained and measured as deployed.
"""

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor

from kif.errors import KifError


class InplaceTraining:
    """The state `inplace_training` restores; see the module docstring."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str]):
        params = dict(model.named_parameters())
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in params]
        if missing:
            raise KifError(f"the model has no parameter {missing[0]!r}")
        self.model = model
        self.params = {n: params[n] for n in names}  # the Parameter objects (kept by identity)
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}
        self._flags = [(p, p.requires_grad) for p in params.values()]
        self._training = model.training
        self.in_base = False
        self.active = True

    def add(self, names: Iterable[str]) -> None:
        """Also save and restore `names` (parameters found to need an edit during the block;
        they must not have been changed yet)."""
        params = dict(self.model.named_parameters())
        for n in names:
            if n not in self.params:
                if n not in params:
                    raise KifError(f"the model has no parameter {n!r}")
                self.params[n] = params[n]
                self.originals[n] = params[n].detach().clone()

    def trainable(self, names: Iterable[str] | None = None) -> list[Tensor]:
        """Freeze every parameter, then make `names` (default: all touched ones) trainable."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        chosen = [self.params[n] for n in (self.params if names is None else names)]
        for p in chosen:
            p.requires_grad_(True)
        return chosen

    def current(self, name: str) -> Tensor:
        """The parameter's stored value now."""
        return self.params[name].detach()

    def changed(self) -> dict[str, Tensor]:
        """Name -> float32 `new - original` of every touched parameter that moved."""
        out = {}
        for n, p in self.params.items():
            d = p.detach().float() - self.originals[n].float()
            if bool((d != 0).any()):
                out[n] = d
        return out

    @contextlib.contextmanager
    def base(self) -> Iterator[None]:
        """The model as it was given (frozen-reference forwards inside training): the saved
        originals swapped in by pointer (no copy), and `in_base` true for an adapter on the
        activations (`kif.erasure.lora.HookedLoRA`) to switch itself off."""
        current = {n: p.data for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.data = self.originals[n]
            self.in_base = True
            yield
        finally:
            self.in_base = False
            for n, p in self.params.items():
                p.data = current[n]

    def restore(self) -> None:
        """Everything back as it was (idempotent)."""
        if not self.active:
            return
        self.in_base = False
        with torch.no_grad():
            for n, p in self.params.items():
                o = self.originals[n]
                if p.data.dtype == o.dtype and p.data.shape == o.shape:
                    p.copy_(o)
                else:  # its data was replaced in another layout: the saved tensor itself
                    p.data = o
                p.grad = None
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.model.train(self._training)
        self.originals = {}
        self.active = False


@contextlib.contextmanager
def inplace_training(model: torch.nn.Module, names: Iterable[str] | None = None
                     ) -> Iterator[InplaceTraining]:
    """`with inplace_training(model, names) as t:` train `model` itself; on leaving the block,
    however it is left, the named parameters (default: all) hold their original bits again."""
    t = InplaceTraining(model, [n for n, _ in model.named_parameters()] if names is None else names)
    try:
        yield t
    finally:
        t.restore()


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` that shares its parameters and buffers (no weight memory): its own
    module objects and hook points, so hooks added to the copy stay off `model`. For models
    that differ from the original only in their hooks (a suppression patch)."""
    import copy

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


__all__ = ["InplaceTraining", "inplace_training", "shared_copy"]
