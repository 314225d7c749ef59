"""Crash safety, full disks and concurrent writers: faults injected into kif's writes, counted.

Every trial forks the campaign's process (the model and the erasure are already in memory, so a
trial costs one write, not a `kif` start-up) and does one of:

- **kill**: SIGKILL at a uniformly random moment of the write (the write's duration, fork to
  exit, is measured first; kills that land after the child has finished are counted apart);
  afterwards the output must be absent or complete and loadable, the inputs byte-identical, and the next run must do the right thing: succeed (and sweep the dead
  writer's staging folder) where the output is absent or is replaced, refuse in one line where a
  complete output already stands;
- **full disk**: the write runs on a tmpfs too small for it (ENOSPC; where this process may
  mount one) or under a file-size limit (RLIMIT_FSIZE: the write fails with EFBIG at a random
  byte): it must fail with a one-line `KifError` (the cache: a logged warning) and leave
  nothing behind;
- **race**: two writers to the same output at once: one wins and the other fails in one line
  (writers that replace may both succeed, the later one's output standing); never a torn
  output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import random
import resource
import signal
import subprocess
import tempfile
import time
from typing import Iterator

from kif.errors import KifError
from kif.reliability.writers import Writer, digest, remove


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one forked write reported (None when it was killed)."""
    ok: bool
    kif_error: bool = False
    error: str = ""

    @property
    def one_line(self) -> bool:
        return self.kif_error and "\n" not in self.error.strip()


def _child(writer: Writer, out: pathlib.Path, w: int, fsize: int | None) -> None:
    """The forked writer: never returns (a child that fell back into the campaign's code
    would run trials of its own)."""
    try:
        try:
            if fsize is not None:  # the write fails with EFBIG past `fsize` bytes of any file
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
            writer.write(out)
            msg = {"ok": True}
        except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
            msg = {"ok": False, "kif_error": isinstance(e, KifError),
                   "error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(msg).encode())
    finally:
        os._exit(0)


def private_locks() -> None:
    """Give tqdm (the progress bars of transformers' loads and saves) a lock of this process's
    own. Its default lock is a multiprocessing semaphore shared with every forked child: a child
    killed while holding it would leave every later progress bar, the campaign's included,
    waiting forever."""
    import threading

    from tqdm import auto, std

    for cls in (std.tqdm, auto.tqdm):
        cls.set_lock(threading.RLock())


def start(writer: Writer, out: pathlib.Path, fsize: int | None = None) -> tuple[int, int]:
    private_locks()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(writer, out, w, fsize)
    os.close(w)
    return pid, r


def finish(pid: int, r: int, timeout: float = 120.0) -> Outcome | None:
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return Outcome(False, False, "hung")
        time.sleep(0.002)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    if os.WIFSIGNALED(done[1]) or not data:
        return None
    return Outcome(**json.loads(data))


def run(writer: Writer, out: pathlib.Path, fsize: int | None = None) -> Outcome:
    got = finish(*start(writer, out, fsize))
    return got if got is not None else Outcome(False, False, "killed")


def inspect(writer: Writer, out: pathlib.Path) -> str:
    """'absent', 'complete' (loads the way kif reads it) or 'torn'."""
    if not out.exists():
        return "absent"
    try:
        writer.check(out)
        return "complete"
    except Exception:  # noqa: BLE001 - anything short of a clean load is a torn output
        return "torn"


def measure_write(writer: Writer, out: pathlib.Path, repeats: int = 2
                  ) -> tuple[float, tuple[int, int]]:
    """The uninterrupted write's duration (the median of `repeats`), over which kills spread,
    and its output's sizes (`output_bytes`), which the full-disk trials cut short."""
    times = []
    for _ in range(repeats):
        remove(out)
        t0 = time.perf_counter()
        got = run(writer, out)
        if not got.ok:
            raise RuntimeError(f"{writer.name}: the uninterrupted write failed: {got.error}")
        times.append(time.perf_counter() - t0)
    sizes = output_bytes(out)
    if not writer.replaces:
        remove(out)
    return sorted(times)[len(times) // 2], sizes


@dataclasses.dataclass
class Tally:
    """Counts of one writer's fault trials."""
    writer: str
    command: str
    kills: int = 0
    killed_mid_write: int = 0  # the kill landed before the write finished
    absent: int = 0
    complete: int = 0
    torn: int = 0
    inputs_modified: int = 0
    next_run_ok: int = 0
    next_run_failed: int = 0
    stale_left: int = 0  # staging folders left after the next run (they should be swept)
    disk_full: int = 0
    disk_full_clean: int = 0  # one-line error (or, the cache, a silent skip) and nothing left
    races: int = 0
    races_clean: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def fail(self, what: str) -> None:
        if len(self.failures) < 10:
            self.failures.append(what)


def kill_trial(writer: Writer, out: pathlib.Path, seconds: float, rng: random.Random,
               inputs: dict[str, str], tally: Tally) -> None:
    pid, r = start(writer, out)
    time.sleep(rng.uniform(0.0, seconds))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    tally.kills += 1
    tally.killed_mid_write += finish(pid, r) is None
    state = inspect(writer, out)
    setattr(tally, state, getattr(tally, state) + 1)
    if state == "torn":
        tally.fail(f"kill {tally.kills}: torn output")
    if digest(writer.inputs) != inputs:
        tally.inputs_modified += 1
        tally.fail(f"kill {tally.kills}: an input changed")
    _next_run(writer, out, state, tally)


def _next_run(writer: Writer, out: pathlib.Path, state: str, tally: Tally) -> None:
    """After a kill: where a complete output stands and the writer never replaces, the next run
    must refuse it in one line; otherwise it must write a complete output."""
    got = run(writer, out)
    refuse = state == "complete" and not writer.replaces
    good = (got.one_line and inspect(writer, out) == "complete") if refuse else (
        got.ok and inspect(writer, out) == "complete")
    tally.next_run_ok += good
    tally.next_run_failed += not good
    if not good:
        tally.fail(f"next run after a kill ({state}): {got.error or inspect(writer, out)}")
    tally.stale_left += len(writer.staging(out))
    if not writer.replaces:
        remove(out)


@contextlib.contextmanager
def small_disk(size: int) -> Iterator[pathlib.Path | None]:
    """A tmpfs of `size` bytes (None where this process may not mount one)."""
    where = pathlib.Path(tempfile.mkdtemp(prefix="kif-full-disk-"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(where)], capture_output=True).returncode == 0
    except OSError:
        mounted = False
    try:
        yield where if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], capture_output=True)
        with contextlib.suppress(OSError):
            where.rmdir()


def output_bytes(out: pathlib.Path) -> tuple[int, int]:
    """The output's total size and its largest file's (a file-size limit stops one file)."""
    sizes = [out.stat().st_size] if out.is_file() else [
        p.stat().st_size for p in out.rglob("*") if p.is_file()]
    return sum(sizes), max(sizes)


def disk_full_trial(writer: Writer, out: pathlib.Path, need: tuple[int, int],
                    rng: random.Random, tally: Tally, use_tmpfs: bool) -> None:
    """One write on a disk that fills partway (a tmpfs of a random share of the output's size)
    or under a file-size limit below its largest file (`need`: `output_bytes`)."""
    total, largest = need
    if use_tmpfs:
        size = max(4096, int(rng.uniform(0.05, 0.95) * total))
        with small_disk(size) as disk:
            if disk is None:
                return
            _disk_full_check(writer, disk / out.name, None, tally)
    else:
        _disk_full_check(writer, out, max(1, int(rng.uniform(0.0, 0.95) * largest)), tally)


def _disk_full_check(writer: Writer, out: pathlib.Path, fsize: int | None, tally: Tally) -> None:
    if writer.replaces:
        remove(out)
    got = run(writer, out, fsize)
    tally.disk_full += 1
    left = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    # the cache swallows a failed write (it must not stop an erasure); the rest report it
    reported = got.ok if writer.is_file else got.one_line
    clean = reported and not out.exists() and not left
    tally.disk_full_clean += clean
    if not clean:
        tally.fail(f"full disk (limit {fsize or 'tmpfs'}): {got.error or 'no error'}; "
                   f"left {left[:3]}")
    remove(out)


def race_trial(writer: Writer, out: pathlib.Path, tally: Tally) -> None:
    """Two writers to `out` at once: a complete output and, unless both may write (a
    replacing writer), exactly one success and one one-line refusal."""
    remove(out)
    a, b = start(writer, out), start(writer, out)
    got = [finish(*a), finish(*b)]
    tally.races += 1
    if any(g is None for g in got):
        tally.fail("race: a writer died")
        return
    oks = sum(g.ok for g in got)
    fine = inspect(writer, out) == "complete" and (
        oks == 2 if writer.replaces else oks == 1 and any(g.one_line for g in got))
    tally.races_clean += fine
    if not fine:
        tally.fail(f"race: {[g.error or 'ok' for g in got]}, output {inspect(writer, out)}")
    if not writer.replaces:
        remove(out)
