"""Peak memory of a stretch of work: resident set size (sampled) and CUDA allocations.

`ru_maxrss` is the process's lifetime peak and cannot be reset, so it cannot say what one method
added on top of a loaded model. `PeakMemory` samples the resident set size from
`/proc/self/statm` on a background thread (every `interval` seconds, plus once at entry and exit)
and reads `torch.cuda.max_memory_allocated` after resetting it at entry. A sampler can miss a
spike shorter than its interval; at the default 5 ms the allocations that matter here (weight
copies, activation caches, optimiser state) live far longer.
"""

import dataclasses
import os
import threading
import time
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The process's resident set size now (Linux `/proc/self/statm`; else `ru_maxrss`)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the lifetime peak is the best cheap figure there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """What a `PeakMemory` block used, in MiB."""

    peak_rss_mb: float  # the highest resident set size seen during the block
    start_rss_mb: float  # the resident set size at entry
    peak_cuda_mb: float | None  # torch.cuda.max_memory_allocated during the block; None off CUDA

    @property
    def added_rss_mb(self) -> float:
        """Peak above the entry level: what the block itself needed."""
        return max(0.0, self.peak_rss_mb - self.start_rss_mb)

    def as_dict(self) -> dict[str, Any]:
        out = {"peak_rss_mb": round(self.peak_rss_mb, 1), "start_rss_mb": round(self.start_rss_mb, 1),
               "added_rss_mb": round(self.added_rss_mb, 1)}
        if self.peak_cuda_mb is not None:
            out["peak_cuda_mb"] = round(self.peak_cuda_mb, 1)
        return out


class PeakMemory:
    """`with PeakMemory() as pm: ...` then `pm.report` (a `MemoryReport`)."""

    def __init__(self, interval: float = 0.005, cuda: bool | None = None):
        self.interval = interval
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self._peak = 0
        self._start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.report: MemoryReport | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self._start = self._peak = rss_bytes()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, name="kif-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        self.report = MemoryReport(self._peak / 2**20, self._start / 2**20, cuda_mb)


def measure(fn, *args, **kwargs) -> tuple[Any, MemoryReport, float]:
    """`fn(*args, **kwargs)`'s result, its peak memory and its wall time in seconds."""
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return out, pm.report, seconds


# glibc's mallopt parameter number (malloc.h)
_M_MMAP_THRESHOLD = -3


def lean_allocator(threshold: int = 256 * 1024) -> bool:
    """Make glibc serve every allocation of `threshold` bytes or more with its own mmap, given
    back to the system when it is freed. By default glibc raises that threshold to the size of
    the largest block freed so far (up to 32 MiB), so after the first large tensor is freed every
    smaller one comes from a heap that keeps freed memory and fragments: the process's resident
    memory then follows the most it ever held, and a later stage's peak lands on top of an earlier
    one's leftovers. It costs time (every large tensor is a fresh mapping, zero-filled by the
    kernel), so kif leaves it to the user: call it once from Python, or set the same thing for
    a command with glibc's own variable, `MALLOC_MMAP_THRESHOLD_=262144 kif ...`. Returns False
    (and changes nothing) off glibc."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


__all__ = ["MemoryReport", "PeakMemory", "lean_allocator", "measure", "rss_bytes"]
