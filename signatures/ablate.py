"""Ablating a signature's components through TransformerLens hooks (the causality proof).

Directions are projected out of their hook's activation (every position), neurons are zeroed at
`blocks.{l}.mlp.hook_post`, SAE features are clamped to `-clamp` when active (Farrell et al.
2024) through the closed form h' = h + sum_{i in S, a_i > 0} (-c - a_i) W_dec[i], which needs only
the selected encoder columns. The same functions ablate random components of equal size, the
control every causality claim is measured against.
"""

from collections import defaultdict
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from kif.signatures.base import Signature, unit

FwdHook = tuple[str, Callable]


def _project_out(basis: Float[Tensor, "k d"]) -> Callable:
    # Orthonormalise so that several directions at one hook are removed exactly once each.
    q, _ = torch.linalg.qr(basis.T.double())
    q = q.T.float()

    def hook(act: Float[Tensor, "batch pos d"], hook) -> Float[Tensor, "batch pos d"]:
        qq = q.to(act.device, act.dtype)
        return act - (act @ qq.T) @ qq

    return hook


def _zero_neurons(idx: Tensor) -> Callable:
    def hook(act: Float[Tensor, "batch pos d_mlp"], hook) -> Float[Tensor, "batch pos d_mlp"]:
        act = act.clone()
        act[..., idx.to(act.device)] = 0.0
        return act

    return hook


def _clamp_features(sae, idx: Tensor, clamp: float) -> Callable:
    w_enc = sae.W_enc[:, idx].detach()
    b_enc = sae.b_enc[idx].detach()
    w_dec = sae.W_dec[idx].detach()
    b_dec = sae.b_dec.detach()

    def hook(act: Float[Tensor, "batch pos d"], hook) -> Float[Tensor, "batch pos d"]:
        pre = (act - b_dec.to(act)) @ w_enc.to(act) + b_enc.to(act)
        a = torch.relu(pre)
        delta = torch.where(a > 0, -clamp - a, torch.zeros_like(a))
        return act + delta @ w_dec.to(act)

    return hook


def ablation_hooks(sig: Signature, sae=None, clamp: float = 50.0) -> list[FwdHook]:
    """TransformerLens forward hooks that remove every component of `sig`."""
    by_hook: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(sig.component_hooks):
        by_hook[h].append(i)
    hooks: list[FwdHook] = []
    for h, rows in by_hook.items():
        rows_t = torch.tensor(rows)
        if sig.component == "direction":
            hooks.append((h, _project_out(unit(sig.directions[rows_t].float()))))
        elif sig.component == "neuron":
            hooks.append((h, _zero_neurons(sig.indices[rows_t, 1])))
        elif sig.component == "feature":
            if sae is None:
                raise ValueError("ablating SAE features needs the SAE")
            hooks.append((h, _clamp_features(sae, sig.indices[rows_t, 1], clamp)))
    return hooks


def random_like(sig: Signature, generator: torch.Generator, sae=None) -> Signature:
    """A signature with the same number of components at the same hooks, chosen at random:
    random unit directions, random neurons of the same layers, random SAE features."""
    import dataclasses

    k = len(sig)
    if sig.component == "direction":
        d = torch.randn(sig.directions.shape, generator=generator)
        return dataclasses.replace(sig, directions=unit(d))
    width = sig.dims["d_mlp"] if sig.component == "neuron" else int(sae.cfg.d_sae)
    idx = sig.indices.clone()
    taken: set[tuple[int, int]] = set()
    for r in range(k):
        while True:
            j = int(torch.randint(width, (1,), generator=generator))
            key = (int(idx[r, 0]), j)
            if key not in taken and j not in sig.indices[sig.indices[:, 0] == idx[r, 0], 1].tolist():
                taken.add(key)
                idx[r, 1] = j
                break
    return dataclasses.replace(sig, indices=idx)
