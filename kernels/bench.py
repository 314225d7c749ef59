"""Benchmark of kif's fused kernels against their torch references.

    python -m kif.kernels.bench [--op suppress|clamp|keys|all] [--json] [--tokens 8192 65536]
                                [--d 4096] [--dtype bf16] [--reps 20] [--interpret-smoke]

On a CUDA machine, for each op and token count, runs both backends through the public dispatchers
(`backend="triton"` and `backend="torch"`), times each with CUDA events (median of --reps calls
after one warm-up call, which also compiles the kernel), checks the kernel's output against the
reference's, and reports milliseconds and the speed-up (torch ms / triton ms). Exit status: 0,
1 when a kernel disagrees with its reference, 2 without CUDA. `--interpret-smoke` runs tiny
shapes on CPU under Triton's interpreter (wall clock; the timings mean nothing) to prove the
script works on a machine without a GPU.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE = dict(tokens=[67], d=72, rank=3, features=5, reps=1)


@dataclasses.dataclass
class Row:
    op: str
    tokens: int
    d: int
    width: int  # k (basis rank) for suppress, n (selected features) for clamp, d for keys
    dtype: str
    triton_ms: float
    torch_ms: float
    speedup: float
    rel_err: float  # max |triton - torch| / max |torch| over the outputs
    ok: bool


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _tolerance(dtype: torch.dtype) -> float:
    # bf16/fp16 outputs: the two backends may round a value to neighbouring representable numbers
    # (one ulp, 2^-7 / 2^-10 relative at worst); fp32: summation order over d (or the rows for keys)
    return {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(dtype, 1e-4)


def _suppress_case(tokens: int, d: int, rank: int, dtype: torch.dtype, device: torch.device, gen):
    from kif.kernels.dispatch import gated_suppression

    U, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, device=device))
    r = torch.randn(d, generator=gen, device=device)
    r = r - U @ (U.T @ r)
    r = r / r.norm()
    h = torch.randn(tokens, d, generator=gen, device=device)
    h[::2] += 6.0 * U[:, 0]  # half the rows carry the concept: their gate opens, the others' stays shut
    h = h.to(dtype)
    mu, sigma = float(rank) ** 0.5, 0.5

    def run(backend: str):
        return gated_suppression(h, U, r, mu=mu, sigma=sigma, backend=backend)

    return run, rank


def _clamp_case(tokens: int, d: int, n: int, dtype: torch.dtype, device: torch.device, gen):
    from kif.kernels.dispatch import sae_conditional_clamp

    h = torch.randn(tokens, d, generator=gen, device=device).to(dtype)
    W_enc = torch.randn(d, n, generator=gen, device=device) / d ** 0.5
    b_enc = torch.full((n,), -1.0, device=device)  # each feature fires on ~16 % of rows
    b_dec = 0.1 * torch.randn(d, generator=gen, device=device)
    W_dec = torch.randn(n, d, generator=gen, device=device) / d ** 0.5

    def run(backend: str):
        return sae_conditional_clamp(h, W_enc, b_enc, b_dec, W_dec, c=50.0, backend=backend)

    return run, n


def _keys_case(tokens: int, d: int, _width: int, dtype: torch.dtype, device: torch.device, gen):
    from kif.kernels.dispatch import KeyStats

    keys = torch.randn(tokens, d, generator=gen, device=device).to(dtype)
    mask = torch.rand(tokens, generator=gen, device=device) < 0.75

    def run(backend: str):  # timed without result(): its host sync and copy are not the kernel's
        return (KeyStats(d, device=device, backend=backend).update(keys, mask),)

    return run, d


OPS: dict[str, Callable] = {"suppress": _suppress_case, "clamp": _clamp_case, "keys": _keys_case}


def _time(fn: Callable, reps: int, cuda: bool) -> float:
    fn()  # warm-up: compiles the kernel, fills caches
    if not cuda:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t) / reps
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(ops: list[str], tokens: list[int], d: int, dtype: torch.dtype, rank: int, features: int,
          reps: int, device: torch.device) -> list[Row]:
    from kif.kernels.dispatch import KeyStats

    rows = []
    cuda = device.type == "cuda"
    for op in ops:
        for n_tok in tokens:
            gen = torch.Generator(device=device).manual_seed(0)
            run, width = OPS[op](n_tok, d, rank if op == "suppress" else features, dtype, device, gen)
            ms_triton = _time(lambda: run("triton"), reps, cuda)
            ms_torch = _time(lambda: run("torch"), reps, cuda)
            outputs = [[o.result().gram if isinstance(o, KeyStats) else o for o in run(b)]
                       for b in ("triton", "torch")]
            err = max(_rel_err(a, b) for a, b in zip(*outputs))
            tol = 1e-4 if op == "keys" else _tolerance(dtype)  # keys: fp32 sums either way
            rows.append(Row(op, n_tok, d, width, str(dtype).removeprefix("torch."), ms_triton,
                            ms_torch, ms_torch / ms_triton, err, err <= tol))
            if cuda:
                del run
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kif.kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=[*OPS, "all"], default="all")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--d", type=int, default=4096, help="d_model (the key width for keys)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--rank", type=int, default=8, help="basis rank k for suppress")
    p.add_argument("--features", type=int, default=16, help="selected SAE features n for clamp")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--interpret-smoke", action="store_true",
                   help="tiny shapes on CPU under Triton's interpreter: proves the script runs")
    args = p.parse_args(argv)
    ops = list(OPS) if args.op == "all" else [args.op]

    from kif.kernels.dispatch import triton_installed

    if not triton_installed():
        print("kif.kernels.bench: the triton package is not installed here (kif requires it only "
              "on Linux x86_64 and aarch64, where Triton publishes wheels)", file=sys.stderr)
        return 2
    if args.interpret_smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--interpret-smoke: triton was imported before TRITON_INTERPRET=1 could be set",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (the first launch)
        device = torch.device("cpu")
        sizes = dict(SMOKE)
    else:
        from kif.kernels.dispatch import triton_gpu_available

        if not (torch.cuda.is_available() and triton_gpu_available()):
            print("kif.kernels.bench: no CUDA device with a Triton driver here; the benchmark needs a "
                  "GPU (use --interpret-smoke to check the script on CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        sizes = dict(tokens=args.tokens, d=args.d, rank=args.rank, features=args.features, reps=args.reps)

    rows = bench(ops, dtype=DTYPES[args.dtype], device=device, **sizes)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    else:
        import triton

        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter"
        print(f"{where}; torch {torch.__version__}, triton {triton.__version__}; "
              f"{'median of %d' % sizes['reps']} call(s) per backend, ms")
        print(f"{'op':9s}{'tokens':>8s}{'d':>6s}{'k/n':>6s}{'dtype':>10s}{'triton':>10s}{'torch':>10s}"
              f"{'speed-up':>10s}{'rel err':>10s}  check")
        for r in rows:
            print(f"{r.op:9s}{r.tokens:8d}{r.d:6d}{r.width:6d}{r.dtype:>10s}{r.triton_ms:10.3f}"
                  f"{r.torch_ms:10.3f}{r.speedup:9.2f}x{r.rel_err:10.1e}  {'ok' if r.ok else 'MISMATCH'}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
