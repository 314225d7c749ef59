"""Torch references of kif's three fused kernels. They are the CPU path of the dispatchers in
`kif.kernels.dispatch` and the ground truth the Triton kernels are tested against (run them on
float64 inputs for a float64 reference).

Arithmetic runs in `promote_types(input dtype, float32)`: float32 statistics for half-precision
inputs, float64 all the way for float64 inputs. Outputs have the input's dtype; rows the operator
leaves alone (closed gate, no active feature) are returned bit for bit, selected with
`torch.where`, never recomputed as `h - 0 * x`.
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gated_suppression(h: Float[Tensor, "rows d_model"], U: Float[Tensor, "d_model k"],
                      r_hat: Float[Tensor, " d_model"] | None = None, *, mu: float, sigma: float,
                      k_gate: float = 1.6, tau: float = 3.0, s: float = -0.8, beta: float = 15.0,
                      gate_floor: float = 1e-3,
                      ) -> tuple[Float[Tensor, "rows d_model"], Float[Tensor, " rows"]]:
    """Gated subspace suppression, the KIF dynamic suppression capsule (KIF/ERUF, arXiv
    2601.10566; METHODS.md "Erasure operators"), generalized to an orthonormal basis U:

        p = ||h U||_2,  z = (p - mu) / sigma,  g = sigmoid(k_gate (z - tau)),  g := 0 if g < gate_floor
        h' = h - g |s| (h U) U^T + g beta r_hat

    Returns (h', g); g is float32 (float64 for float64 inputs). Rows with g == 0 are h exactly."""
    cd = _compute_dtype(h.dtype)
    hf = h.to(cd)
    Uf = U.to(cd)
    proj = hf @ Uf                                            # [rows, k]
    p = torch.linalg.vector_norm(proj, dim=-1)
    z = (p - mu) / sigma
    g = torch.sigmoid(k_gate * (z - tau))
    g = torch.where(g < gate_floor, torch.zeros_like(g), g)
    new = hf - (g * abs(s))[:, None] * (proj @ Uf.T)
    if r_hat is not None:
        new = new + (g * beta)[:, None] * r_hat.to(cd)[None, :]
    out = torch.where((g > 0)[:, None], new.to(h.dtype), h)
    return out, g


def sae_conditional_clamp(h: Float[Tensor, "rows d_model"], W_enc_sel: Float[Tensor, "d_model n"],
                          b_enc_sel: Float[Tensor, " n"], b_dec: Float[Tensor, " d_model"],
                          W_dec_sel: Float[Tensor, "n d_model"], *, c: float,
                          threshold: Float[Tensor, " n"] | None = None,
                          ) -> tuple[Float[Tensor, "rows d_model"], Int[Tensor, " rows"]]:
    """SAE conditional clamp (Farrell, Lau & Conmy 2024, Eq. 2) over the selected features S only:

        pre = (h - b_dec) W_enc[:, S] + b_enc[S],  a = ReLU(pre) (JumpReLU: ReLU(pre) 1[pre > threshold])
        h' = h + sum_{i in S, a_i > 0} (-c - a_i) W_dec[i]

    This equals e + dec(a') with e = h - dec(a) and a'_i = -c on the active selected features,
    without the full SAE. Returns (h', number of active selected features per row, int32)."""
    cd = _compute_dtype(h.dtype)
    pre = (h.to(cd) - b_dec.to(cd)) @ W_enc_sel.to(cd) + b_enc_sel.to(cd)   # [rows, n]
    active = pre > 0
    if threshold is not None:
        active = active & (pre > threshold.to(cd))
    coef = torch.where(active, -c - pre, torch.zeros_like(pre))
    new = h.to(cd) + coef @ W_dec_sel.to(cd)
    n_active = active.sum(dim=-1, dtype=torch.int32)
    out = torch.where((n_active > 0)[:, None], new.to(h.dtype), h)
    return out, n_active


def key_moments(keys: Float[Tensor, "rows d"], mask: Bool[Tensor, " rows"] | None = None,
                ) -> tuple[Float[Tensor, "d d"], Float[Tensor, " d"], Int[Tensor, ""]]:
    """Masked key moments for STAMP's ridge/pseudoinverse form and AlphaEdit's null-space
    projector (C0 = K0^T K0; AlphaEdit, Fang et al. 2025): (K[mask]^T K[mask], column sums of K[mask],
    number of masked-in rows as a 0-d int64 tensor). Masked-out rows contribute nothing, even
    when they hold NaN or inf."""
    cd = _compute_dtype(keys.dtype)
    k = keys.to(cd)
    if mask is None:
        count = torch.tensor(keys.shape[0], dtype=torch.int64, device=keys.device)
    else:
        k = torch.where(mask[:, None], k, torch.zeros((), dtype=cd, device=k.device))
        count = mask.sum(dtype=torch.int64)
    return k.T @ k, k.sum(dim=0), count
