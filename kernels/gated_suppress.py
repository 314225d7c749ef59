"""Fused gated subspace suppression: the Triton kernel and its launcher (the reference is
`kif.kernels.reference.gated_suppression`, the public entry point
`kif.kernels.dispatch.gated_suppression`)."""

import typing

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor


@triton.jit
@typing.no_type_check  # keeps jaxtyping's pytest import hook from wrapping the kernel function
def _gated_suppress_kernel(
    h_ptr,  # [rows, d] input activations (fp16/bf16/fp32), unit stride along d
    out_ptr,  # [rows, d] output, contiguous, same dtype as h
    gate_ptr,  # [rows] fp32 output: the gate g of each row
    ut_ptr,  # [k, d] fp32, the basis U transposed and contiguous: one coalesced load per basis vector
    r_ptr,  # [d] fp32 refusal direction r_hat (zeros for none)
    rows,  # number of rows
    d,  # row length (d_model)
    k,  # number of basis vectors (runtime: the loop over them is not unrolled)
    stride_h,  # elements between consecutive rows of h
    mu,  # fp32: benign mean of the projection score
    sigma,  # fp32: benign standard deviation of the score (> 0)
    k_gate,  # fp32: gate slope
    tau,  # fp32: gate threshold, in standard deviations
    s_abs,  # fp32: |s|, the fraction of the in-subspace component removed at g = 1
    beta,  # fp32: refusal steering strength at g = 1
    gate_floor,  # fp32: gates below it are set to exactly 0
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= d: a whole row block stays in registers, so h is read once
):
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < rows
    mask_d = offs_d < d
    mask = mask_r[:, None] & mask_d[None, :]
    offs_r64 = offs_r.to(tl.int64)  # rows * stride can pass 2^31 at 65536 tokens x 32768 wide

    h = tl.load(h_ptr + offs_r64[:, None] * stride_h + offs_d[None, :], mask=mask, other=0.0)
    hf = h.to(tl.float32)
    # One loop over the basis gives both the score and the in-subspace component (h U) U^T, so
    # U is read once per row block and nothing but the gate has to wait for the full projection.
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    inside = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j in range(0, k):
        u = tl.load(ut_ptr + j * d + offs_d, mask=mask_d, other=0.0)
        pj = tl.sum(hf * u[None, :], axis=1)
        sq += pj * pj
        inside += pj[:, None] * u[None, :]
    z = (tl.sqrt(sq) - mu) / sigma
    g = tl.sigmoid(k_gate * (z - tau))
    g = tl.where(g < gate_floor, 0.0, g)
    r = tl.load(r_ptr + offs_d, mask=mask_d, other=0.0)
    new = hf - (g * s_abs)[:, None] * inside + (g * beta)[:, None] * r[None, :]
    # A closed gate returns the loaded row itself: bit-identical, not h - 0 * x.
    out = tl.where((g > 0.0)[:, None], new.to(out_ptr.dtype.element_ty), h)
    tl.store(out_ptr + offs_r64[:, None] * d + offs_d[None, :], out, mask=mask)
    tl.store(gate_ptr + offs_r, g, mask=mask_r)


def launch(h: Float[Tensor, "rows d_model"], U: Float[Tensor, "d_model k"],
           r_hat: Float[Tensor, " d_model"], *, mu: float, sigma: float, k_gate: float, tau: float,
           s: float, beta: float, gate_floor: float, block_r: int | None = None,
           num_warps: int | None = None,
           ) -> tuple[Float[Tensor, "rows d_model"], Float[Tensor, " rows"]]:
    """Launch the kernel; h in fp16/bf16/fp32 with unit stride along d_model (copied otherwise)."""
    rows, d = h.shape
    if h.stride(-1) != 1:
        h = h.contiguous()
    out = torch.empty((rows, d), dtype=h.dtype, device=h.device)
    gate = torch.empty((rows,), dtype=torch.float32, device=h.device)
    if rows == 0:
        return out, gate
    ut = U.to(torch.float32).T.contiguous()
    r = r_hat.to(device=h.device, dtype=torch.float32).contiguous()
    block_d = triton.next_power_of_2(d)
    if block_r is None:  # about 4096 elements per program: a row block fits in registers
        block_r = max(1, min(16, 4096 // block_d))
    if num_warps is None:  # Liger-Kernel's rule for row-wise kernels, by elements per program
        n = block_r * block_d
        num_warps = 32 if n >= 32768 else 16 if n >= 8192 else 8 if n >= 2048 else 4
    grid = (triton.cdiv(rows, block_r),)
    _gated_suppress_kernel[grid](
        h, out, gate, ut, r, rows, d, ut.shape[0], h.stride(0),
        float(mu), float(sigma), float(k_gate), float(tau), abs(float(s)), float(beta),
        float(gate_floor), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return out, gate
