"""Checksums of the folders kif writes and ships, and the staged writes that keep them whole.

Every folder kif writes (erasure folders, signatures) or ships (zoo models, zoo SAEs) holds
`kif_sha256.json`: the SHA-256 of each file in it, and a seal over its own content. A flipped
byte anywhere, a file swapped for another (a pickle where safetensors were), a `config.json`
edited to name another architecture: each is caught before the file is parsed, with one line.
The checksums guard against corruption and accidental edits, not against someone who rewrites
the checksum file too (that takes a signing key, which kif does not manage).

Folders are written whole into a staging sibling and renamed into place (`stage`, `publish`), so
a process killed at any point leaves the destination absent or complete. A killed process
cannot delete its staging folder; the pid in the staging folder's name lets the next write to
the same destination sweep the dead one's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import tempfile
import time
from typing import Iterable, Iterator

from safetensors import SafetensorError

from kif.errors import KifError

SUMS = "kif_sha256.json"
FORMAT = "kif-sha256"
_CHUNK = 1 << 20


class IntegrityError(KifError):
    """A file that does not match the checksum kif wrote for it."""


class WriteError(KifError):
    """A write that failed: a full disk, a lost race for the destination, permissions."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def seal(value) -> str:
    """SHA-256 of `value`'s canonical JSON (sorted keys, no spaces): the same for the object
    written and the object read back."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _files(folder: pathlib.Path) -> list[str]:
    """The regular files under `folder` (relative POSIX paths), the checksum file excluded."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != SUMS)


def write_sums(folder: str | os.PathLike, names: Iterable[str] | None = None) -> pathlib.Path:
    """Write `kif_sha256.json` into `folder` for `names` (default: every file in it)."""
    folder = pathlib.Path(folder)
    files = {n: file_sha256(folder / n) for n in (_files(folder) if names is None else names)}
    body = {"format": FORMAT, "files": files}
    (folder / SUMS).write_text(json.dumps({**body, "seal": seal(body)}, indent=2) + "\n")
    return folder / SUMS


# Folders already verified in this process, by each file's identity and change time (inode,
# size, mtime, ctime; users can set mtime but not ctime): tests and notebooks load the zoo
# models hundreds of times. A file changed within the last 2 s is not memoised (git's "racy"
# rule: a filesystem with coarse timestamps could change it again within the same tick).
_VERIFIED: set[tuple] = set()
_RACY_SECONDS = 2.0


def _state(folder: pathlib.Path, names: Iterable[str]) -> tuple | None:
    stats, now = [], time.time_ns()
    for n in (SUMS, *names):
        st = (folder / n).stat()
        if now - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_SECONDS * 1e9:
            return None
        stats.append((n, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return (str(folder.resolve()), tuple(stats))


def _read_sums(folder: pathlib.Path, error: type[KifError]) -> dict[str, str]:
    try:
        data = json.loads((folder / SUMS).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise error(f"{folder / SUMS} is unreadable: the folder was modified or is corrupt"
                    ) from None
    body = {k: data.get(k) for k in ("format", "files")} if isinstance(data, dict) else None
    if (body is None or body["format"] != FORMAT or not isinstance(body["files"], dict)
            or data.get("seal") != seal(body)):
        raise error(f"{folder / SUMS} does not match its own seal: the folder was modified")
    return body["files"]


def verify(folder: str | os.PathLike, *, error: type[KifError] = IntegrityError,
           what: str = "folder", hint: str = "") -> None:
    """Raise `error` (one line, ending in `hint`) unless every file `kif_sha256.json` lists in
    `folder` is there with the listed SHA-256. A folder without the file is refused."""
    folder = pathlib.Path(folder)
    if not (folder / SUMS).is_file():
        raise error(f"{folder} has no {SUMS}: not a {what} written by this kif, or modified{hint}")
    files = _read_sums(folder, error)
    for n in files:  # only names inside the folder: a sums file cannot point elsewhere
        if not isinstance(n, str) or pathlib.PurePosixPath(n).is_absolute() or ".." in n.split("/"):
            raise error(f"{folder / SUMS} lists {str(n)[:60]!r}, outside the folder: "
                        f"modified{hint}")
    missing = [n for n in files if not (folder / n).is_file()]
    if missing:
        raise error(f"{folder} lacks {missing[0]}, which its {SUMS} lists: the {what} is "
                    f"incomplete{hint}")
    key = _state(folder, files)
    if key is not None and key in _VERIFIED:
        return
    for name, want in files.items():
        if file_sha256(folder / name) != want:
            raise error(f"{folder / name} does not match its SHA-256 in {SUMS}: the {what} was "
                        f"modified after kif wrote it{hint}")
    if key is not None:
        _VERIFIED.add(key)


# ---- staged writes -------------------------------------------------------------------------

# Staging folders are named `.NAME.kif-HOST-PID-...`: HOST (a hash of this machine's name)
# keeps a writer on another machine sharing the filesystem (an NFS home, a cluster's cache)
# from judging this one dead by a pid that means nothing there.
HOST = hashlib.sha256(platform.node().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists (True when it cannot be told: on Windows,
    signal 0 is a Ctrl-C, so nothing is swept there)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process, or no way to tell
    return True


def _stale(out: pathlib.Path) -> list[tuple[pathlib.Path, bool]]:
    """This machine's dead writers' staging entries of `out`, each with whether it is a
    moved-aside previous output ("-old-"), those first."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.kif-{HOST}-(\d+)-(old-)?")
    found = []
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            found.append((p, m.group(2) is not None))
    return sorted(found, key=lambda e: not e[1])


def sweep_stale(out: pathlib.Path) -> int:
    """Remove the staging folders of `out` left by processes that died before renaming them.
    A previous output that a dead writer had moved aside, and not yet replaced, is put back
    first. Returns how many entries went."""
    gone = 0
    for p, moved_aside in _stale(out):
        if moved_aside and not out.exists() and (p / out.name).exists():
            os.replace(p / out.name, out)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone += 1
    return gone


def stage(out: str | os.PathLike) -> pathlib.Path:
    """A new empty staging folder beside `out` (same filesystem, so the rename is atomic),
    named with this machine and process; dead writers' staging folders of `out` are swept
    first."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.kif-{HOST}-{os.getpid()}-",
                                         dir=out.parent))


@contextlib.contextmanager
def staged(out: str | os.PathLike, error: type[KifError] = WriteError
           ) -> Iterator[pathlib.Path]:
    """`stage(out)` for the block, removed after it whatever happens (after a successful
    `publish` it is already gone). Failing to create it is one line of `error`."""
    with writing(out, error):
        tmp = stage(out)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Write one text file whole or not at all: a private temporary sibling, flushed and
    renamed over `path` (a reader never sees half a report)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def writing(out: str | os.PathLike, error: type[KifError] = WriteError) -> Iterator[None]:
    """Report a failed write of `out` as one line of `error`: a full disk (safetensors reports
    it as its own error type), a second writer that renamed its output into place first."""
    try:
        yield
    except KifError:
        raise
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise error(f"{out} was written by another run meanwhile: choose a new output "
                        "folder") from None
        raise error(f"cannot write {out}: {e.strerror or e}") from None
    except SafetensorError as e:
        raise error(f"cannot write {out}: {str(e).splitlines()[0] if str(e) else 'safetensors'}"
                    ) from None


def _fsync(path: pathlib.Path) -> None:
    """Flush a file or a folder's entries to the disk (a power cut after the rename must not
    find a renamed folder of empty files). Folders cannot be opened for fsync on Windows."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable(staged: pathlib.Path) -> None:
    """fsync every file under `staged`, then `staged` itself."""
    if staged.is_dir():
        for f in staged.rglob("*"):
            if f.is_file():
                _fsync(f)
    _fsync(staged)


def publish(staged: pathlib.Path, out: pathlib.Path, *, replace: bool = False) -> None:
    """Make the finished `staged` folder durable and rename it to `out`. An existing `out` is
    an error unless `replace`: then it is moved aside first and deleted after. A kill in
    between leaves `out` absent and the previous folder aside, which the next `stage` of
    `out` puts back. A second writer that loses the race for an absent `out` gets an OSError
    (ENOTEMPTY/EEXIST) from the rename unless it replaces."""
    durable(staged)
    if out.exists() and not replace:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise FileExistsError(f"{out} exists")
    if not out.exists():
        try:
            os.replace(staged, out)
            return _fsync(out.parent)
        except OSError as e:
            if not replace or e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # another writer got there first
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.kif-{HOST}-{os.getpid()}-old-",
                                        dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(staged, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    _fsync(out.parent)


__all__ = ["SUMS", "IntegrityError", "WriteError", "durable", "file_sha256", "pid_alive",
           "publish", "seal", "stage", "staged", "sweep_stale", "verify", "write_sums",
           "write_text", "writing"]
