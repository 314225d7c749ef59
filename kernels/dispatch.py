"""Public entry points of kif's fused kernels (`kif.kernels.dispatch`): each picks the Triton kernel
or the torch reference.

    gated_suppression(h, U, r_hat, mu=, sigma=, ...) -> (h', gate)     KIF suppression capsule
    sae_conditional_clamp(h, W_enc_sel, b_enc_sel, b_dec, W_dec_sel, c=, threshold=) -> (h', n_active)
    KeyStats(d).update(keys, mask).result() -> KeyStatistics(gram, mean, count)

The kernel modules (gated_suppress, sae_clamp, key_stats) hold one `@triton.jit` kernel and its
launcher each, `reference` the torch references, `bench` the timings (`python -m
kif.kernels.bench`). `kif.kernels` is a namespace package without an `__init__.py` (the README's
development section says why).

backend="auto" runs Triton when the input is a CUDA tensor and Triton has an active GPU driver,
the torch reference otherwise (CPU tensors, float64 inputs, no driver). backend="triton" insists:
on CPU tensors it works only under Triton's interpreter (TRITON_INTERPRET=1 set before the
process first imports triton; for tests), and otherwise raises `KernelBackendError`.
backend="torch" always runs the reference. Triton is imported only when a kernel is launched, so
`import kif.kernels` stays light, and kif works without Triton installed (pyproject requires it
only on Linux x86_64 / aarch64, where Triton publishes wheels): "auto" then runs torch, and
"triton" raises `KernelBackendError` saying the package is missing.
"""

import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kif.errors import KifError
from kif.kernels import reference

Backend = Literal["auto", "triton", "torch"]
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelBackendError(KifError, RuntimeError):
    """The requested kernel backend cannot run here (e.g. Triton on a CPU tensor)."""


@functools.cache
def triton_gpu_available() -> bool:
    """True when Triton is importable and has an active GPU driver (cached: drivers don't come
    and go within a process)."""
    try:
        from triton.runtime import driver

        driver.active  # raises "0 active drivers" on a machine without a GPU
        return True
    except Exception:
        return False


@functools.cache
def triton_installed() -> bool:
    """True when the triton package is installed. Found, not imported: whether Triton's own jit
    functions run under its interpreter is fixed by the environment at its first import, which
    must stay where a kernel is launched (see `_launcher`)."""
    return importlib.util.find_spec("triton") is not None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")  # as Triton parses it


def _resolve(backend: str, x: Tensor) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise KernelBackendError(f"unknown kernel backend {backend!r}: use 'auto', 'triton' or 'torch'")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if x.dtype in _TRITON_DTYPES and x.is_cuda and triton_gpu_available():
            return "triton"
        return "torch"
    if not triton_installed():
        raise KernelBackendError(
            "backend='triton' needs the triton package, which is not installed here (kif requires "
            "it only on Linux x86_64 and aarch64, where Triton publishes wheels); use "
            "backend='auto' or 'torch'")
    if x.dtype not in _TRITON_DTYPES:
        raise KernelBackendError(f"the Triton kernels take float16, bfloat16 or float32 inputs, not "
                                 f"{x.dtype}; use backend='torch'")
    if x.is_cuda and triton_gpu_available():
        return "triton"
    if not _interpret_requested():
        got = "no GPU driver for Triton" if x.is_cuda else f"a {x.device.type} tensor"
        raise KernelBackendError(
            f"backend='triton' needs a CUDA tensor and a GPU driver for Triton (got {got}); "
            f"elsewhere it runs only under Triton's interpreter (TRITON_INTERPRET=1, for tests). "
            f"Use backend='auto' or 'torch'.")
    return "triton"


def _launcher(name: str, kernel: str, x: Tensor):
    """Import kif.kernels.<name> (and Triton with it). Off the GPU the kernel must run under
    Triton's interpreter, which Triton 3.9 decides when `@triton.jit` decorates a function: for
    our kernel when its module is first imported, for triton.language's own jit functions (the
    tl.sum combiner, tl.sigmoid) when `triton` is first imported. Both must have seen
    TRITON_INTERPRET=1; libraries such as transformer_lens import triton early."""
    module = importlib.import_module(f"kif.kernels.{name}")
    if not (x.is_cuda and triton_gpu_available()):
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(standard.sigmoid, InterpretedFunction):
            raise KernelBackendError(
                "triton was imported before TRITON_INTERPRET=1 was set, so its library functions "
                "are compiled for a GPU; set the variable before the first `import triton` in the "
                "process (transformer_lens and sae_lens import it)")
        if not isinstance(getattr(module, kernel), InterpretedFunction):
            raise KernelBackendError(
                f"{module.__name__} was imported before TRITON_INTERPRET=1 was set, so its kernel "
                f"is compiled for a GPU; set the variable before the module's first import")
    return module


def _rows(x: Tensor) -> Tensor:
    return einops.rearrange(x, "... d -> (...) d")


def gated_suppression(h: Float[Tensor, "*batch d_model"], U: Float[Tensor, "d_model k"],
                      r_hat: Float[Tensor, " d_model"] | None = None, *, mu: float, sigma: float,
                      k_gate: float = 1.6, tau: float = 3.0, s: float = -0.8, beta: float = 15.0,
                      gate_floor: float = 1e-3, backend: Backend = "auto",
                      ) -> tuple[Float[Tensor, "*batch d_model"], Float[Tensor, " *batch"]]:
    """Gated subspace suppression, the KIF dynamic suppression capsule (KIF/ERUF, arXiv
    2601.10566; METHODS.md "Erasure operators"), on each row (token) of h:

        p = ||h U||_2 (= |h . d| for k = 1),  z = (p - mu) / sigma,  g = sigmoid(k_gate (z - tau)),
        g := 0 where g < gate_floor,          h' = h - g |s| (h U) U^T + g beta r_hat

    U: orthonormal columns spanning the concept's subspace; r_hat: unit refusal direction
    (orthogonal to U; None = no steering); mu, sigma: the score's mean and standard deviation on
    benign text. Returns (h', g): h' in h's dtype, rows with g == 0 bit-identical to h; g float32
    with h's leading shape (for logging). Fused kernel: one read and one write of h."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    d = h.shape[-1]
    flat = _rows(h)
    if _resolve(backend, h) == "torch":
        out, g = reference.gated_suppression(flat, U, r_hat, mu=mu, sigma=sigma, k_gate=k_gate,
                                             tau=tau, s=s, beta=beta, gate_floor=gate_floor)
    else:
        mod = _launcher("gated_suppress", "_gated_suppress_kernel", h)
        if r_hat is None:
            r_hat = torch.zeros(d, dtype=torch.float32, device=h.device)
        out, g = mod.launch(flat, U.to(h.device), r_hat, mu=mu, sigma=sigma, k_gate=k_gate,
                            tau=tau, s=s, beta=beta, gate_floor=gate_floor)
    return out.reshape(h.shape), g.to(torch.float32).reshape(h.shape[:-1])


def sae_conditional_clamp(h: Float[Tensor, "*batch d_model"], W_enc_sel: Float[Tensor, "d_model n"],
                          b_enc_sel: Float[Tensor, " n"], b_dec: Float[Tensor, " d_model"],
                          W_dec_sel: Float[Tensor, "n d_model"], *, c: float,
                          threshold: Float[Tensor, " n"] | None = None, backend: Backend = "auto",
                          ) -> tuple[Float[Tensor, "*batch d_model"], Int[Tensor, " *batch"]]:
    """SAE conditional clamp (Farrell, Lau & Conmy 2024, Eq. 2) of the selected features S:

        pre = (h - b_dec) W_enc[:, S] + b_enc[S],  a = ReLU(pre)  (JumpReLU: ReLU(pre) 1[pre > threshold])
        h' = h + sum_{i in S, a_i > 0} (-c - a_i) W_dec[i]

    which is e + dec(a') with the active selected features set to -c, computed from the selected
    columns only (the full SAE is never built). threshold: per-feature JumpReLU thresholds (None =
    ReLU). Returns (h', n_active): h' in h's dtype, rows with no active selected feature
    bit-identical to h; n_active int32, the number of active selected features per row."""
    if c <= 0:
        raise ValueError(f"the clamp value c must be > 0, got {c}")
    flat = _rows(h)
    n = W_enc_sel.shape[-1]
    if _resolve(backend, h) == "torch" or n == 0:
        out, n_active = reference.sae_conditional_clamp(flat, W_enc_sel, b_enc_sel, b_dec,
                                                        W_dec_sel, c=c, threshold=threshold)
    else:
        mod = _launcher("sae_clamp", "_sae_clamp_kernel", h)
        if threshold is None:
            threshold = torch.zeros(n, dtype=torch.float32, device=h.device)
        out, n_active = mod.launch(flat, W_enc_sel, b_enc_sel, b_dec, W_dec_sel, threshold, c=c)
    return out.reshape(h.shape), n_active.reshape(h.shape[:-1])


@dataclasses.dataclass(frozen=True)
class KeyStatistics:
    """Accumulated key statistics: gram = sum K^T K over the counted rows (float32, [d, d],
    symmetric), mean = their mean key (float32, [d]; zeros when count == 0), count = rows counted.
    STAMP uses gram as K_r^T K_r; AlphaEdit's null-space projector is built from gram (C0)."""

    gram: Float[Tensor, "d d"]
    mean: Float[Tensor, " d"]
    count: int

    @property
    def second_moment(self) -> Float[Tensor, "d d"]:
        """E[k k^T] = gram / count (zeros when count == 0)."""
        return self.gram / max(self.count, 1)

    @property
    def covariance(self) -> Float[Tensor, "d d"]:
        """E[k k^T] - mean mean^T (the biased, population covariance)."""
        return self.second_moment - torch.outer(self.mean, self.mean)


class KeyStats:
    """Streaming masked key statistics for STAMP's closed form and AlphaEdit's null-space
    projection (Convention 1: a fitter whose `update` returns self; `result()` freezes it).

        stats = KeyStats(d).update(k1).update(k2, mask2).result()   # KeyStatistics

    update() adds K[mask]^T K[mask] (keys read in their dtype, accumulated in float32; masked-out
    rows contribute nothing, even NaN), the sum of the counted keys and their number. Buffers
    live on `device`, or on the first batch's device when device is None. The Triton kernel
    (backend "auto" on CUDA, or "triton") is a tiled masked K^T K; see kif.kernels.key_stats."""

    def __init__(self, d: int, device: torch.device | str | None = None, backend: Backend = "auto"):
        if backend not in ("auto", "triton", "torch"):
            raise KernelBackendError(f"unknown kernel backend {backend!r}: use 'auto', 'triton' or 'torch'")
        self.d = d
        self.backend = backend
        self._gram: Tensor | None = None
        self._sum: Tensor | None = None
        self._count: Tensor | None = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        self._gram = torch.zeros((self.d, self.d), dtype=torch.float32, device=device)
        self._sum = torch.zeros((self.d,), dtype=torch.float32, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device | None:
        return None if self._gram is None else self._gram.device

    def update(self, keys: Float[Tensor, "*batch d"], mask: Bool[Tensor, " *batch"] | None = None,
               ) -> "KeyStats":
        """Accumulate one batch of keys (any leading shape); mask selects the rows that count."""
        if keys.shape[-1] != self.d:
            raise ValueError(f"keys have width {keys.shape[-1]}, the statistics {self.d}")
        if self._gram is None:
            self._allocate(keys.device)
        keys = _rows(keys.to(self._gram.device))
        if mask is not None:
            mask = mask.reshape(-1).to(self._gram.device)
        if _resolve(self.backend, keys) == "torch":
            gram, colsum, count = reference.key_moments(keys, mask)
            self._gram += gram.to(torch.float32)
            self._sum += colsum.to(torch.float32)
            self._count += count
        else:
            mod = _launcher("key_stats", "_key_gram_kernel", keys)
            mod.launch(keys, mask, self._gram, self._sum)
            self._count += keys.shape[0] if mask is None else mask.sum(dtype=torch.int64)
        return self

    def result(self) -> KeyStatistics:
        """Freeze the statistics so far (copies: later updates do not change them)."""
        if self._gram is None:
            self._allocate(torch.device("cpu"))
        count = int(self._count)
        mean = self._sum / count if count else torch.zeros_like(self._sum)
        return KeyStatistics(gram=self._gram.clone(), mean=mean, count=count)
