"""`kif bench stamp`: STAMP-LR (randomized SVD + Woodbury) against the full ridge solve on
synthetic keys, at MLP widths of real models (m = 4096: GPT-2 XL / Llama-7B hidden 4096-wide
projections; m = 14336: Llama-3-8B's MLP).

Keys are drawn with a decaying spectrum (eigenvalue i ~ i^-alpha), as MLP activations are: the
relative error of the low-rank edit is ||dW_lr - dW_full|| / ||dW_full||, and both solves are
timed in the same run (ratios, not absolute times, carry between machines).
"""

import dataclasses
import time

import torch

from kif.erasure.stamp import solve_lowrank, solve_ridge


@dataclasses.dataclass(frozen=True)
class StampBenchRow:
    m: int
    rank: int
    n_forget: int
    full_seconds: float
    lowrank_seconds: float
    speedup: float
    rel_error: float
    dtype: str


def synthetic_keys(m: int, n: int, alpha: float, generator: torch.Generator,
                   dtype=torch.float32) -> torch.Tensor:
    """n keys of width m with covariance spectrum i^-alpha in a random basis."""
    scale = torch.arange(1, m + 1, dtype=dtype) ** (-alpha / 2)
    z = torch.randn(n, m, generator=generator, dtype=dtype) * scale
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=dtype))
    return z @ q.T


def bench_stamp(m: int, rank: int = 64, n_forget: int = 200, n_retain: int = 4096,
                d_out: int = 256, lam: float = 1e-2, alpha: float = 2.0, seed: int = 0,
                dtype=torch.float32) -> StampBenchRow:
    g = torch.Generator().manual_seed(seed)
    k_f = synthetic_keys(m, n_forget, alpha, g, dtype)
    k_r = synthetic_keys(m, n_retain, alpha, g, dtype)
    t = torch.randn(n_forget, d_out, generator=g, dtype=dtype)
    c = k_f.T @ k_f + k_r.T @ k_r
    rhs = k_f.T @ t
    t0 = time.perf_counter()
    full = solve_ridge(c, rhs, lam)
    t1 = time.perf_counter()
    low = solve_lowrank(c, rhs, lam, rank)
    t2 = time.perf_counter()
    err = float((low - full).norm() / full.norm())
    return StampBenchRow(m, rank, n_forget, t1 - t0, t2 - t1, (t1 - t0) / max(t2 - t1, 1e-9),
                         err, str(dtype).replace("torch.", ""))


__all__ = ["StampBenchRow", "bench_stamp", "synthetic_keys"]
