"""Measured figures with their provenance.

A results file (`results/*.json`) is what a bench command wrote with `--record FILE`: its rows
beside the command that made them, the commit, the machine and the date, so that any figure can
be traced and re-run. The README's tables of measured figures are rendered from those files:
each table sits between two markers that name its file and its columns,

    <!-- results: results/x.json | method=method:code | forget=forget_acc:.3f | FQ=forget_quality:.2g -->
    | method | forget | FQ |
    | --- | --- | --- |
    ...
    <!-- /results -->

and `python -m kif.results --check` (a test) fails when a table and its file disagree;
`python -m kif.results --write` re-renders them. A column is `HEADER=FIELD:FORMAT`, FORMAT a
Python format spec or `code` (the value in backticks); a missing or null value prints as "—".
Options before the columns: `rows=KEY` (the list of rows, default `rows`; a dotted KEY reaches
into nested objects, and an object's entries become rows whose field `key` is the entry's name) and
`where=FIELD:PATTERN[,PATTERN...]` (keep the rows whose field prints as one of the shell-style
patterns: `where=method:retrain*`, `where=method:base,oracle`). A dotted FIELD reaches into
nested objects (`stages.kif.seconds`).
"""

import argparse
import datetime
import fnmatch
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from kif.errors import KifError

MARKER = re.compile(r"^<!-- results: (?P<spec>.+?) -->\n(?P<body>.*?)^<!-- /results -->$",
                    re.S | re.M)
PROVENANCE = ("command", "commit", "machine", "date")


def _commit() -> str:
    """The source tree's commit (`+dirty` when it has uncommitted changes), or "unknown" outside
    a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()

        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "kif")
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    """The machine in words: cores, threads, accelerator, platform."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"{os.cpu_count()} CPU cores"
            + (f" (OMP_NUM_THREADS={threads})" if threads else "")
            + f", {gpu}; {platform.platform()}")


def command_line() -> str:
    """This process's command as typed: `kif ...` for the entry point, `python -m MODULE ...`
    or `python SCRIPT ...` otherwise."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    rest = argv[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":  # interpreter flags
        rest = rest[1:]
    if rest and Path(rest[0]).name == "kif":
        return "kif " + shlex.join(rest[1:])
    return "python " + shlex.join(rest)


def provenance(argv: Sequence[str] | None = None) -> dict[str, str]:
    """The command (`kif ` + `argv`, or this process's command line), commit, machine and UTC
    date of this run."""
    command = command_line() if argv is None else "kif " + shlex.join(argv)
    return {"command": command, "commit": _commit(), "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def write(path: str | Path, argv: Sequence[str] | None, **payload: Any) -> Path:
    """Writes a results file: the provenance of this run (`argv`: the `kif` command's arguments;
    None: this process's command line), then `payload` (e.g. rows=[...]).
    Written whole or not at all (a temporary file renamed over the target)."""
    from kif import integrity

    return integrity.write_text(path, json.dumps({**provenance(argv), **payload}, indent=1,
                                                 default=str) + "\n")


def _get(row: dict, field: str) -> Any:
    """`row[field]`, a dotted field reaching into nested objects (`stages.kif.seconds`)."""
    for key in field.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if fmt == "code":
        return f"`{value}`"
    if isinstance(value, bool) or not fmt:
        return str(value).replace("|", "\\|")  # a bar would end the markdown cell
    return format(value, fmt)


def render(spec: str, root: Path) -> str:
    """The markdown table (header, rule, rows) that `spec` names, read from its file under
    `root`."""
    file, *parts = [p.strip() for p in spec.split("|")]
    path = root / file
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KifError(f"results table: cannot read {file}: {exc}") from None
    missing = [k for k in PROVENANCE if not data.get(k)]
    if missing:
        raise KifError(f"results table: {file} has no {', '.join(missing)} (write it with a "
                       f"bench command's --record)")
    opts = {k: v for k, v in (p.split("=", 1) for p in parts if p.split("=", 1)[0] in
                              ("rows", "where"))}
    cols = [p.split("=", 1) for p in parts if p.split("=", 1)[0] not in opts]
    rows = _get(data, opts.get("rows", "rows"))
    if isinstance(rows, dict):  # keyed rows (`exponents.params`, `targets`): the key is a field
        rows = [{"key": k, **(v if isinstance(v, dict) else {"value": v})}
                for k, v in rows.items()]
    if not isinstance(rows, list):
        raise KifError(f"results table: {file} has no list or object "
                       f"{opts.get('rows', 'rows')!r}")
    if "where" in opts:
        field, want = opts["where"].split(":", 1)
        rows = [r for r in rows
                if any(fnmatch.fnmatchcase(str(_get(r, field)), w) for w in want.split(","))]
    fields = [(header, *(c.split(":", 1) if ":" in c else (c, ""))) for header, c in cols]
    lines = ["| " + " | ".join(h for h, _, _ in fields) + " |",
             "| " + " | ".join("---" for _ in fields) + " |"]
    lines += ["| " + " | ".join(_cell(_get(r, f), fmt) for _, f, fmt in fields) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def tables(text: str, root: Path) -> list[tuple[str, str, str]]:
    """Every results table in `text`: (spec, the text between its markers, the rendering)."""
    return [(m["spec"], m["body"], render(m["spec"], root)) for m in MARKER.finditer(text)]


def rewrite(text: str, root: Path) -> str:
    return MARKER.sub(lambda m: f"<!-- results: {m['spec']} -->\n{render(m['spec'], root)}"
                                f"<!-- /results -->", text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kif.results", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("readme", nargs="?", default="README.md")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="fail when a table differs from its file")
    mode.add_argument("--write", action="store_true", help="re-render every table from its file")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    try:
        text = readme.read_text()
        if args.write:
            readme.write_text(rewrite(text, readme.parent))
            return 0
        stale = [spec.split("|")[0].strip() for spec, body, want in tables(text, readme.parent)
                 if body != want]
    except (OSError, KifError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for file in stale:
        print(f"{readme}: the table from {file} differs from the file "
              f"(python -m kif.results --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
