"""kif.kernels: fused Triton kernels, each with a torch reference and a dispatcher. Installed as
`kif.kernels` (pyproject maps this folder).

    gated_suppression(h, U, r_hat, mu=, sigma=, ...) -> (h', gate)     KIF suppression capsule
    sae_conditional_clamp(h, W_enc_sel, b_enc_sel, b_dec, W_dec_sel, c=, threshold=) -> (h', n_active)
    KeyStats(d).update(keys, mask).result() -> KeyStatistics(gram, mean, count)

Each takes backend="auto" (Triton on CUDA, torch elsewhere), "triton" or "torch". The kernel
modules (gated_suppress, sae_clamp, key_stats) and Triton itself are imported only when a kernel
is launched; `python -m kif.kernels.bench` times the kernels against the references.
"""

from kif.kernels import reference
from kif.kernels.dispatch import (
    Backend,
    KernelBackendError,
    KeyStatistics,
    KeyStats,
    gated_suppression,
    sae_conditional_clamp,
    triton_gpu_available,
)

__all__ = [
    "Backend",
    "KernelBackendError",
    "KeyStatistics",
    "KeyStats",
    "gated_suppression",
    "reference",
    "sae_conditional_clamp",
    "triton_gpu_available",
]
