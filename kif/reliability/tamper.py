"""Tampering: flipped bytes and swapped files in everything kif reads back, each read counted.

A trial changes one file of a copy of a folder kif wrote or ships, then reads the folder the
way kif does. The read must fail with a one-line `KifError` (the key-statistics cache: refuse
the file and recompute), execute nothing (a pickle planted where safetensors were would create
a marker file if it were ever unpickled) and write nothing (the folder's bytes, and the output
a refused `restore` would have written, are checked).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import shlex
import shutil
from typing import Callable

from kif import integrity
from kif.errors import KifError

MARKER = "PICKLE_EXECUTED"


@dataclasses.dataclass(frozen=True)
class Target:
    """A folder kif reads, the reader, and the files in it to tamper with."""
    name: str
    folder: pathlib.Path  # a pristine copy; trials work on a copy of it
    read: Callable[[pathlib.Path, pathlib.Path], object]  # (folder, scratch dir) -> anything
    files: tuple[str, ...]
    cache: bool = False  # a cache: "detected" means the read refuses the file (returns None)


@dataclasses.dataclass
class Count:
    target: str
    case: str
    trials: int = 0
    detected: int = 0
    executed: int = 0  # the planted pickle ran
    wrote: int = 0  # the read changed the folder or wrote an output
    failures: list[str] = dataclasses.field(default_factory=list)


def hostile_pickle(marker: pathlib.Path) -> bytes:
    """A protocol-0 pickle that runs `touch MARKER` when unpickled (written by hand: kif's
    package imports no pickle module, which tests/test_no_pickle.py checks)."""
    command = f"touch {shlex.quote(str(marker))}".replace("\\", "\\\\").replace("'", "\\'")
    return b"cos\nsystem\n(S'" + command.encode() + b"'\ntR."


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flip(path: pathlib.Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data))
    data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def plant_pickle(path: pathlib.Path, marker: pathlib.Path) -> None:
    path.write_bytes(hostile_pickle(marker))


def edit_json(path: pathlib.Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def trial(target: Target, case: str, change: Callable[[pathlib.Path], None],
          work: pathlib.Path, count: Count, reseal: bool = False) -> None:
    """Copy the folder, `change` it (then rewrite its checksums when `reseal`: someone who
    edited the folder and re-hashed it, so that the check behind the checksums is what
    answers), read it, and count."""
    copy = work / f"{target.name}-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(target.folder, copy)
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    marker = work / MARKER
    marker.unlink(missing_ok=True)
    change(copy)
    if reseal and (copy / integrity.SUMS).is_file():
        integrity.write_sums(copy)
    before = _snapshot(copy)
    integrity._VERIFIED.clear()  # measure the check itself, not this process's memo of it
    count.trials += 1
    try:
        got = target.read(copy, scratch)
        detected = target.cache and got is None
        error = "read without error"
    except KifError as e:
        detected = "\n" not in str(e).strip()
        error = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a traceback is a failure to count
        detected, error = False, f"{type(e).__name__}: {e}"
    count.detected += detected
    executed = marker.exists()
    wrote = _snapshot(copy) != before or any(scratch.iterdir())
    count.executed += executed
    count.wrote += wrote
    if (not detected or executed or wrote) and len(count.failures) < 5:
        count.failures.append(f"{case}: {error[:200]}" + (" (executed)" if executed else "")
                              + (" (wrote)" if wrote else ""))


def flips(target: Target, n: int, rng: random.Random, work: pathlib.Path) -> list[Count]:
    """`n` single-byte flips in each of the target's files."""
    out = []
    for name in target.files:
        count = Count(target.name, f"flip {name}")
        for _ in range(n):
            trial(target, count.case, lambda f: flip(f / name, rng), work, count)
        out.append(count)
    return out


def swapped(target: Target, name: str, work: pathlib.Path, reseal: bool) -> Count:
    """`name` replaced by a hostile pickle."""
    count = Count(target.name, f"pickle as {name}" + (" (resealed)" if reseal else ""))
    trial(target, count.case, lambda f: plant_pickle(f / name, work / MARKER), work, count,
          reseal=reseal)
    return count


def edited(target: Target, case: str, name: str, edit: Callable[[dict], None],
           work: pathlib.Path, reseal: bool) -> Count:
    count = Count(target.name, case + (" (resealed)" if reseal else ""))
    trial(target, count.case, lambda f: edit_json(f / name, edit), work, count, reseal=reseal)
    return count


def _other_architecture(cfg: dict) -> None:
    cfg.update({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def _other_hash(manifest: dict) -> None:
    manifest["erased_weight_sha256"] = "0" * 64
    manifest["base"]["weight_sha256"] = "f" * 64


def erasure_cases(target: Target, work: pathlib.Path) -> list[Count]:
    """The issue's named cases on an erasure folder, each with and without resealing."""
    out = []
    for reseal in (False, True):
        out.append(edited(target, "manifest hashes changed", "manifest.json", _other_hash,
                          work, reseal))
        out.append(edited(target, "config.json names another architecture", "config.json",
                          _other_architecture, work, reseal))
        for name in ("model.safetensors", "erasure.safetensors", "restore.safetensors"):
            out.append(swapped(target, name, work, reseal))
    return out


def read_erasure(folder: pathlib.Path, scratch: pathlib.Path) -> object:
    """`kif meter --erased`/`kif eval` open the folder; `kif restore` rebuilds the base."""
    from kif.erasure.io import open_model, restore

    try:
        open_model(folder)
    finally:
        restore(folder, scratch / "restored")
    return True


def signature_cases(target: Target, work: pathlib.Path) -> list[Count]:
    return [swapped(target, "signature.safetensors", work, reseal) for reseal in (False, True)]


__all__ = ["Count", "Target", "erasure_cases", "flips", "hostile_pickle", "read_erasure",
           "signature_cases"]
