"""Hook operators of erasure patches, from one registry (`HOOK_OPS`).

Each builder turns a `HookOp`'s tensors and parameters into a TransformerLens forward hook
`fn(act, hook) -> act` that runs the fused kernel through its dispatcher (`kif.kernels`: Triton
on CUDA, the torch reference elsewhere). The dispatchers flatten [batch, pos, d] to rows themselves.
"""

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from kif.erasure.core import ErasureError, HookOp

HOOK_OPS: dict[str, Callable[[HookOp], Callable]] = {}


def hook_op(name: str):
    def deco(fn):
        HOOK_OPS[name] = fn
        return fn
    return deco


def build_hook(op: HookOp) -> Callable:
    try:
        builder = HOOK_OPS[op.op]
    except KeyError:
        raise ErasureError(f"unknown hook operator {op.op!r} (known: {', '.join(HOOK_OPS)})") from None
    return builder(op)


@hook_op("gated_suppress")
def _gated_suppress(op: HookOp) -> Callable:
    """KIF's dynamic suppression capsule (METHODS.md): h' = h - g|s|(hU)U^T + g*beta*r_hat with
    g = sigmoid(k(z - tau)) from the row's own projection score; rows with a closed gate are
    returned unchanged, bit for bit."""
    from kif.kernels.dispatch import gated_suppression

    t, p = op.tensors, dict(op.params)
    basis, refusal = t["basis"], t["refusal"]
    # the BOS position (the attention sink: a huge norm, no concept) is never gated, or every
    # prompt would be edited there; a model that takes no BOS has none to skip ("skip" 0, set by
    # `build_capsule`, whose calibration leaves out the same positions). Patches written before
    # the parameter existed were all built on models with a BOS.
    skip = int(p.get("skip", 1))

    def hook(act: Float[Tensor, "batch pos d_model"], hook) -> Float[Tensor, "batch pos d_model"]:
        out, _ = gated_suppression(act[:, skip:], basis.to(act.device), refusal.to(act.device),
                                   mu=p["mu"], sigma=p["sigma"], k_gate=p["k_gate"], tau=p["tau"],
                                   s=p["s"], beta=p["beta"], gate_floor=p["gate_floor"])
        return torch.cat([act[:, :skip], out], dim=1) if skip else out

    return hook


@hook_op("sae_clamp")
def _sae_clamp(op: HookOp) -> Callable:
    """Farrell et al. (2024) conditional clamp of selected SAE features to -c, with only the
    selected encoder columns: h' = h + sum_{i in S, a_i > 0} (-c - a_i) W_dec[i]."""
    from kif.kernels.dispatch import sae_conditional_clamp

    t, p = op.tensors, dict(op.params)

    def hook(act: Float[Tensor, "batch pos d"], hook) -> Float[Tensor, "batch pos d"]:
        dev = act.device
        out, _ = sae_conditional_clamp(
            act, t["W_enc"].to(dev), t["b_enc"].to(dev), t["b_dec"].to(dev), t["W_dec"].to(dev),
            c=p["clamp"], threshold=t["threshold"].to(dev) if "threshold" in t else None)
        return out

    return hook


__all__ = ["HOOK_OPS", "build_hook", "hook_op"]
