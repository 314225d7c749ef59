"""Streaming masked key statistics K[mask]^T K[mask]: the Triton kernel and its launcher (the
reference is `kif.kernels.reference.key_moments`, the public entry point `kif.kernels.dispatch.KeyStats`).

Work split: a grid over the output tiles of the gram (a GEMM whose reduction axis is the rows),
each program looping over the rows and writing its tile once: deterministic, no atomics, whenever
the tiles on or above the diagonal number at least twice the GPU's SMs (d >= 4096 at 128-wide
tiles on an H200). For narrower keys (few tiles) the rows are also split over a third grid axis
and the partial tiles are added with fp32 atomics (split-K): the only way to keep the GPU busy
when d is small, at the price of run-to-run rounding differences. The gram is symmetric, so only
tiles on or above the diagonal compute; each also writes its transpose, halving the work."""

import typing

import torch
import triton
import triton.language as tl
from jaxtyping import Bool, Float
from torch import Tensor


@triton.jit
@typing.no_type_check  # keeps jaxtyping's pytest import hook from wrapping the kernel function
def _key_gram_kernel(
    k_ptr,  # [rows, d] keys (fp16/bf16/fp32), unit stride along d, read in their own dtype
    mask_ptr,  # [rows] int8, nonzero = the row counts (not read when HAS_MASK is False)
    gram_ptr,  # [d, d] fp32 contiguous accumulator: the kernel adds K[mask]^T K[mask] into it
    sum_ptr,  # [d] fp32 accumulator: the kernel adds the column sums of K[mask] into it
    rows,  # number of rows
    d,  # key width
    stride_k,  # elements between consecutive rows of the keys
    rows_per_split,  # rows each program of grid axis 2 reduces over (a multiple of BLOCK_R)
    HAS_MASK: tl.constexpr,  # whether mask_ptr is read
    ATOMIC: tl.constexpr,  # True when grid axis 2 has several programs adding into the same tile
    IEEE: tl.constexpr,  # True for fp32 keys: exact fp32 products, not TF32 (16-bit products are exact)
    UPCAST: tl.constexpr,  # True only for bf16 keys under the interpreter, whose tl.dot multiplies bf16
    # bit patterns (triton#11584); bf16 products are exact in fp32, so upcast tiles give the same sums
    BLOCK_M: tl.constexpr,  # side of a square output tile
    BLOCK_R: tl.constexpr,  # rows per step: the inner dimension of each tl.dot
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_n >= pid_m:  # tiles below the diagonal are the transposes of tiles above it
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < d
        mask_n = offs_n < d
        acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        colsum = tl.zeros([BLOCK_M], dtype=tl.float32)
        row_start = pid_s * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, rows)
        for r0 in range(row_start, row_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            keep = offs_r < row_end
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + offs_r, mask=keep, other=0) != 0)
            row_off = offs_r.to(tl.int64) * stride_k
            # masked rows are never loaded (other=0): a NaN in an excluded row cannot leak in
            a_t = tl.load(k_ptr + row_off[None, :] + offs_m[:, None],
                          mask=keep[None, :] & mask_m[:, None], other=0.0)  # [BLOCK_M, BLOCK_R]
            b = tl.load(k_ptr + row_off[:, None] + offs_n[None, :],
                        mask=keep[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_M]
            if UPCAST:
                acc = tl.dot(a_t.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(a_t, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a_t, b, acc)
            if pid_m == pid_n:  # the diagonal program of each column tile also sums the keys
                colsum += tl.sum(a_t.to(tl.float32), axis=1)
        up = gram_ptr + offs_m[:, None] * d + offs_n[None, :]
        up_mask = mask_m[:, None] & mask_n[None, :]
        # acc[i, j] also belongs at gram[n_j, m_i]: a strided store instead of a transpose
        low = gram_ptr + offs_n[None, :] * d + offs_m[:, None]
        if ATOMIC:
            tl.atomic_add(up, acc, mask=up_mask, sem="relaxed")
            if pid_m != pid_n:
                tl.atomic_add(low, acc, mask=up_mask, sem="relaxed")
            else:
                tl.atomic_add(sum_ptr + offs_m, colsum, mask=mask_m, sem="relaxed")
        else:
            tl.store(up, tl.load(up, mask=up_mask, other=0.0) + acc, mask=up_mask)
            if pid_m != pid_n:
                tl.store(low, tl.load(low, mask=up_mask, other=0.0) + acc, mask=up_mask)
            else:
                s_ptr = sum_ptr + offs_m
                tl.store(s_ptr, tl.load(s_ptr, mask=mask_m, other=0.0) + colsum, mask=mask_m)


def launch(keys: Float[Tensor, "rows d"], mask: Bool[Tensor, " rows"] | None,
           gram: Float[Tensor, "d d"], colsum: Float[Tensor, " d"], *, block_m: int | None = None,
           block_r: int | None = None, split: int | None = None,
           num_warps: int | None = None) -> None:
    """Add K[mask]^T K[mask] into `gram` and the column sums of K[mask] into `colsum`, in place
    (both fp32, contiguous, on the keys' device); keys in fp16/bf16/fp32. `split` (rows split
    over that many programs per tile, with atomics when > 1) defaults to what fills the GPU."""
    rows, d = keys.shape
    if rows == 0:
        return
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if block_m is None:  # 128-wide tiles on a GPU from d = 2048 (136 tiles on or above the diagonal);
        # their fp32 accumulator (64 KB) is spread over 8 warps
        block_m = 128 if keys.is_cuda and d >= 2048 else 64 if d > 32 else 32
    block_r = block_r or 32  # 3 pipeline stages of two 128 x 32 tiles stay under 100 KB of shared memory
    num_warps = num_warps or (8 if block_m >= 128 else 4)
    tiles = triton.cdiv(d, block_m)
    if split is None:
        if keys.is_cuda:
            sms = torch.cuda.get_device_properties(keys.device).multi_processor_count
        else:  # the interpreter runs programs one by one: splitting only adds work
            sms = 0
        busy = tiles * (tiles + 1) // 2
        split = max(1, min(triton.cdiv(2 * sms, busy), rows // (8 * block_r)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, split), block_r) * block_r
    split = triton.cdiv(rows, rows_per_split)
    m = keys if mask is None else mask.to(device=keys.device, dtype=torch.int8).contiguous()
    grid = (tiles, tiles, split)
    _key_gram_kernel[grid](
        keys, m, gram, colsum, rows, d, keys.stride(0), rows_per_split,
        HAS_MASK=mask is not None, ATOMIC=split > 1, IEEE=keys.dtype == torch.float32,
        UPCAST=keys.dtype == torch.bfloat16 and not isinstance(_key_gram_kernel, triton.JITFunction),
        BLOCK_M=block_m, BLOCK_R=block_r, num_warps=num_warps)
