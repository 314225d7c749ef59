"""Closed-form removal of a concept's signature: the step of the KIF pipeline that makes the
representation itself forget (METHODS.md "KIF pipeline": the update must remove the signature,
its Cohen's d falling to the oracle's level), as one least-squares edit instead of a loss.

The signature of each person is the suppression capsule's direction u at a residual hook (for
the fact world, `blocks.0.hook_resid_mid`, where layer 0's attention has bound the name's tokens
into the person); it is *present* when |h . u| on the person's prompts stands far above its mean
on benign tokens (the capsule's z-score). The component that writes that residual, the layer's
attention output W_O (or the MLP's W_out for `hook_resid_post`), is edited so that on every
forget prompt the projection falls to the benign mean mu:

    target   t_i = (sign(h_i . u_i) mu_i - h_i . u_i) u_i            (only along u_i)
    edit     dW  = argmin  w sum_i |k_i dW - t_i|^2 + tr(dW^T C_retain dW) + lam |dW|^2
                 = (w K^T K + C_retain + lam I)^-1 w K^T T

with k_i the layer's keys (the heads' outputs `attn.hook_z`, concatenated) at the forget prompt's
last token and C_retain their second moment over every other person's and every shared fact's
text (`kif.erasure.stats`, cached per model). It is STAMP's solve with another target: STAMP moves
the *output* toward a refusal; this moves the *representation* toward a name the model never
bound. On forget10 it takes the capsule's median z from 11.2 to about 1 (the retrained oracle
reads 2.4) while other people's facts stay at 0.998, and by itself already removes half of the
forget answers, since the later layers read the person from that direction.
"""

import dataclasses
import re

import torch
from jaxtyping import Float
from torch import Tensor

from kif.erasure.core import ErasureError
from kif.erasure.keys import last_token_states


@dataclasses.dataclass(frozen=True)
class UnbindConfig:
    forget_weight: float = 10.0  # w: the forget rows against the retain Gram (as STAMP's)
    lam: float = 1e-2
    token_weight: float = 0.003  # every retain token's key at this weight (STAMP's default)


def sites(hook: str, parallel: bool = False) -> tuple[str, str]:
    """(key hook, edited parameter) of the component that writes the residual `hook`.

    With `parallel` blocks (GPT-NeoX: attention and MLP read the same input and both write
    `hook_resid_post`) that is the attention's W_O for either hook: the block's MLP reads each
    token alone, so its keys at a prompt's last token are the same for every person asked in
    the same phrasing and cannot single out the concept; the attention's keys carry the name."""
    m = re.match(r"blocks\.(\d+)\.(hook_resid_mid|hook_resid_post)$", hook)
    if not m:
        raise ErasureError(f"the signature must sit at blocks.{{l}}.hook_resid_mid or "
                           f"hook_resid_post to be removed, not {hook!r}")
    l = m.group(1)
    if m.group(2) == "hook_resid_mid" or parallel:
        return f"blocks.{l}.attn.hook_z", f"blocks.{l}.attn.W_O"
    return f"blocks.{l}.mlp.hook_post", f"blocks.{l}.mlp.W_out"


def unbind_delta(model, concept, ops, cfg: UnbindConfig = UnbindConfig()
                 ) -> tuple[str, Float[Tensor, "..."], dict]:
    """(parameter name, delta of its shape, info) removing the capsules `ops` (one per person of
    `concept`, from `suppress.build_capsule`) from `model`'s representation of the concept."""
    from kif.erasure.stamp import solve_ridge
    from kif.erasure.stats import retain_moments

    hook = ops[0].hook
    key, param = sites(hook, parallel=bool(getattr(model.cfg, "parallel_attn_mlp", False)))
    by_person = {op.params["person"]: op for op in ops}
    forget = [p for p in concept.forget if p.subject in by_person]
    if not forget:
        raise ErasureError(f"no capsule covers a forget prompt of {concept.name!r}")
    states = last_token_states(model, [p.prompt for p in forget], [key, hook])
    k = states[key].double()  # [n, heads * d_head]: last_token_states concatenates the heads
    h = states[hook].double()
    u = torch.stack([by_person[p.subject].tensors["basis"][:, 0] for p in forget]).double()
    mu = torch.tensor([by_person[p.subject].params["mu"] for p in forget], dtype=torch.float64)
    proj = (h * u).sum(-1)
    target = (torch.sign(proj) * mu - proj)[:, None] * u
    c_retain = retain_moments(model, concept, key, cfg.token_weight, method="kif's unbinding").gram
    w = cfg.forget_weight
    dw = solve_ridge(w * k.T @ k + c_retain, w * k.T @ target, cfg.lam)
    weight = dict(model.named_parameters())[param]
    info = {"param": param, "key_hook": key, "n_forget_keys": len(forget),
            "relative_norm": float(dw.norm() / weight.detach().double().norm()),
            "target_residual": float((k @ dw - target).norm() / target.norm().clamp_min(1e-12))}
    return param, dw.reshape(weight.shape).float(), info


__all__ = ["UnbindConfig", "sites", "unbind_delta"]
