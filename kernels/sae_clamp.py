"""Fused SAE conditional clamp: the Triton kernel and its launcher (the reference is
`kif.kernels.reference.sae_conditional_clamp`, the public entry point
`kif.kernels.dispatch.sae_conditional_clamp`)."""

import typing

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor


@triton.jit
@typing.no_type_check  # keeps jaxtyping's pytest import hook from wrapping the kernel function
def _sae_clamp_kernel(
    h_ptr,  # [rows, d] input activations (fp16/bf16/fp32), unit stride along d
    out_ptr,  # [rows, d] output, contiguous, same dtype as h
    nact_ptr,  # [rows] int32 output: number of selected features active in the row
    wenc_ptr,  # [n, d] fp32, the selected encoder columns transposed: one coalesced load per feature
    benc_ptr,  # [n] fp32 selected encoder biases
    bdec_ptr,  # [d] fp32 decoder bias (subtracted from h before encoding)
    wdec_ptr,  # [n, d] fp32 selected decoder rows
    thr_ptr,  # [n] fp32 JumpReLU thresholds (zeros for a ReLU SAE)
    rows,  # number of rows
    d,  # row length (d_model)
    n,  # number of selected features (runtime: the loop over them is not unrolled)
    stride_h,  # elements between consecutive rows of h
    neg_c,  # fp32: -c, the value an active selected feature is clamped to
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
    x = hf - tl.load(bdec_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    # Encode and correct in the same loop: feature i's correction needs only its own activation.
    delta = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    n_active = tl.zeros([BLOCK_R], dtype=tl.int32)
    for i in range(0, n):
        w = tl.load(wenc_ptr + i * d + offs_d, mask=mask_d, other=0.0)
        pre = tl.sum(x * w[None, :], axis=1) + tl.load(benc_ptr + i)
        active = (pre > 0.0) & (pre > tl.load(thr_ptr + i))
        coef = tl.where(active, neg_c - pre, 0.0)
        wd = tl.load(wdec_ptr + i * d + offs_d, mask=mask_d, other=0.0)
        delta += coef[:, None] * wd[None, :]
        n_active += active.to(tl.int32)
    # Rows without an active selected feature return the loaded row itself: bit-identical.
    out = tl.where((n_active > 0)[:, None], (hf + delta).to(out_ptr.dtype.element_ty), h)
    tl.store(out_ptr + offs_r64[:, None] * d + offs_d[None, :], out, mask=mask)
    tl.store(nact_ptr + offs_r, n_active, mask=mask_r)


def launch(h: Float[Tensor, "rows d_model"], W_enc_sel: Float[Tensor, "d_model n"],
           b_enc_sel: Float[Tensor, " n"], b_dec: Float[Tensor, " d_model"],
           W_dec_sel: Float[Tensor, "n d_model"], threshold: Float[Tensor, " n"], *, c: float,
           block_r: int | None = None, num_warps: int | None = None,
           ) -> tuple[Float[Tensor, "rows d_model"], Int[Tensor, " rows"]]:
    """Launch the kernel; h in fp16/bf16/fp32 with unit stride along d_model (copied otherwise)."""
    rows, d = h.shape
    if h.stride(-1) != 1:
        h = h.contiguous()
    out = torch.empty((rows, d), dtype=h.dtype, device=h.device)
    n_active = torch.empty((rows,), dtype=torch.int32, device=h.device)
    if rows == 0:
        return out, n_active

    def f32(t: Tensor) -> Tensor:
        return t.to(device=h.device, dtype=torch.float32).contiguous()

    wenc = f32(W_enc_sel.T)
    block_d = triton.next_power_of_2(d)
    if block_r is None:  # about 4096 elements per program: a row block fits in registers
        block_r = max(1, min(16, 4096 // block_d))
    if num_warps is None:  # Liger-Kernel's rule for row-wise kernels, by elements per program
        e = block_r * block_d
        num_warps = 32 if e >= 32768 else 16 if e >= 8192 else 8 if e >= 2048 else 4
    grid = (triton.cdiv(rows, block_r),)
    _sae_clamp_kernel[grid](
        h, out, n_active, wenc, f32(b_enc_sel), f32(b_dec), f32(W_dec_sel), f32(threshold),
        rows, d, wenc.shape[0], h.stride(0), -float(c),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return out, n_active
