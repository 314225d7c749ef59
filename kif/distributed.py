"""Data parallelism over `torch.distributed`: the helpers kif's data-parallel paths share.

Two kinds of work run data-parallel, each rank holding its own copy of the model(s):

* key statistics (`kif.erasure.stats.compute_key_moments`, what STAMP and kif's signature removal
  solve with; ROME/MEMIT's covariance pass): each rank takes a contiguous shard of the corpus'
  rows (`rank_shard`), sums its partial second moments, and `all_reduce_sum` adds them up, so
  every rank ends with the same statistics;
* the latent-trace meter (`kif.meter.trace`): the probes are dealt to the ranks
  (`deal`), each runs its share on the same audit, and `all_gather_json` brings every result to
  every rank, which then builds the same report a single process would.

Launch with torchrun (`torchrun --nproc-per-node N -m kif erase ...`): `init_from_env` reads
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and opens the
process group, gloo on CPU and nccl where CUDA is available. When no process group is initialised
(a plain `kif ...` or `python` run), every helper is the identity and the single-process code path
is the one that runs.

Nothing here reads the environment at import.
"""

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Mapping, Sequence, TypeVar

from kif.errors import KifError

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_PARALLEL = {
    "erase": "the key statistics of stamp and kif (the retain corpus is sharded over ranks)",
    "meter": "the probes (dealt to the ranks, gathered into one report)",
}
"""`kif` commands that have a data-parallel path under torchrun -> what runs in parallel. Other
commands refuse to run under torchrun rather than repeat the same work on every rank."""

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_OWNED = False  # whether init_from_env opened the process group (and shutdown may close it)


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process' rank (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the one that writes files and prints (True when not distributed)."""
    return rank() == 0


def rank_shard(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous rows [start, stop) of `n` that `rank_` (default: this rank) takes: sizes
    differ by at most one, the first n % world ranks take the larger ones, and the shards of all
    ranks tile range(n) in order (range(n) when not distributed)."""
    world = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"rank {r} is not in a world of {world}")
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def deal(items: Sequence[T], cost: Callable[[T], float] | None = None,
         world: int | None = None, rank_: int | None = None) -> list[T]:
    """The items this rank runs, in their given order. With `cost`, greedy longest-first
    assignment to the least loaded rank (ties: the lower rank); without, round-robin. Every rank
    computes the same assignment (no communication). All items when not distributed."""
    world = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if world == 1:
        return list(items)
    if cost is None:
        owner = {i: i % world for i in range(len(items))}
    else:
        load = [0.0] * world
        owner = {}
        for i in sorted(range(len(items)), key=lambda i: (-cost(items[i]), i)):
            k = min(range(world), key=lambda k: (load[k], k))
            owner[i] = k
            load[k] += cost(items[i])
    return [x for i, x in enumerate(items) if owner[i] == r]


def _collective_device():
    """Where collective tensors must live: the rank's CUDA device for nccl, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t):
    """The sum of `t` over all ranks, on `t`'s device and in its dtype (`t` itself when not
    distributed; `t` is never modified)."""
    import torch.distributed as dist

    if not is_distributed():
        return t
    buf = t.detach().to(_collective_device(), copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank (so that all ranks take the same branch before a
    collective: one rank skipping it would leave the others waiting)."""
    import torch
    import torch.distributed as dist

    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order ([obj] when not distributed), sent as JSON: `obj` holds
    dicts, lists, strings, numbers (NaN and inf kept) and numpy or torch values (sent as lists
    and numbers); tuples come back as lists. Not torch's `all_gather_object`, which unpickles
    what it receives: no pickle crosses between kif's processes either."""
    import json

    import torch
    import torch.distributed as dist

    if not is_distributed():
        return [obj]
    device = _collective_device()
    data = json.dumps(obj, default=_json_default).encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    width = int(max(sizes).item())
    buf = torch.zeros(width, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.zeros(width, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(parts, buf.to(device))
    return [json.loads(bytes(p[:int(n.item())].cpu().numpy())) for p, n in zip(parts, sizes)]


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):  # numpy and torch values
        return x.tolist()
    raise TypeError(f"{type(x).__name__} cannot be sent between ranks")


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started as one of several ranks (torchrun's WORLD_SIZE > 1)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise KifError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not a number") from None


def init_from_env(environ: Mapping[str, str] | None = None, backend: str | None = None) -> bool:
    """Open the default process group from torchrun's environment variables when WORLD_SIZE > 1
    (gloo, or nccl when CUDA is available; each rank then uses the CUDA device LOCAL_RANK).
    Returns whether this process is distributed. A group that is already open is kept."""
    import torch
    import torch.distributed as dist

    global _OWNED
    env = os.environ if environ is None else environ
    if not launched(env):
        return False
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if not dist.is_available():
        raise KifError("this torch build has no torch.distributed")
    missing = [k for k in _ENV if k not in env]
    if missing:
        raise KifError(f"WORLD_SIZE is {env['WORLD_SIZE']} but {', '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    store_env = {k: env[k] for k in _ENV}
    with _patched_environ(store_env):  # env:// reads os.environ
        dist.init_process_group(backend=backend, init_method="env://",
                                rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]))
    _OWNED = True
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


@contextlib.contextmanager
def _patched_environ(values: Mapping[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown() -> None:
    """Close the process group if `init_from_env` opened it."""
    import torch.distributed as dist

    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


# ---- the command line under torchrun ------------------------------------------------------------

def run_command(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Run a parsed `kif` command: directly when not launched by torchrun; otherwise in the
    process group, rank 0 as a normal run, every other rank silent (stdout and stderr swallowed,
    `--out` redirected to a private temporary folder that is removed afterwards, so that only rank
    0 writes output files), returning 0 once its share is done. An expected error (`KifError`)
    is said by rank 0 alone; the other ranks exit 2 without a word (logged at -v)."""
    if not launched():
        return int(command(args) or 0)
    env_rank = os.environ.get("RANK", "0")
    try:
        name = getattr(args, "command", None)
        if name not in DATA_PARALLEL:
            raise KifError(f"`kif {name}` has no data-parallel path: run it without torchrun "
                           f"(under torchrun: {', '.join(f'kif {c}' for c in DATA_PARALLEL)})")
        init_from_env()
        try:
            if is_main():
                return int(command(args) or 0)
            return _run_silent(args, command)
        finally:
            shutdown()
    except KifError as exc:
        if env_rank == "0":
            raise
        log.info("rank %s: %s", env_rank, exc)
        return 2


def _run_silent(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    tmp = tempfile.mkdtemp(prefix=f"kif-rank{rank()}-")
    mine = argparse.Namespace(**vars(args))
    if getattr(mine, "out", None) is not None:
        mine.out = os.path.join(tmp, "out")
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return int(command(mine) or 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["DATA_PARALLEL", "all_gather_json", "all_reduce_sum", "all_true", "deal",
           "init_from_env", "is_distributed", "is_main", "launched", "rank", "rank_shard",
           "run_command", "shutdown", "world_size"]
