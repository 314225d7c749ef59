"""Hostile files (issue "Reliability campaign"): every reader of a user's file, fed fuzzed bytes
by `kif.reliability.fuzz`, returns or raises a one-line KifError, never a traceback; and through
the CLI such a file is `kif: error: ...` on one line with exit status 2.

The short form of the campaign (200 inputs per reader); the full one is
`python -m kif.reliability.fuzz --examples 10000`."""

import contextlib
import dataclasses
import io
import json
import pathlib

import pytest

from kif.cli import main
from kif.data.formats import DataFormatError, read_kif_jsonl, read_tofu
from kif.errors import KifError
from kif.reliability import fuzz

EXAMPLES = 200
# predicates that answer for every file (`open_model` asks is_erasure_folder of any --model):
# they never reject
NEVER_REJECT = {"is-erasure-folder"}


@pytest.mark.parametrize("reader", list(fuzz.READERS))
def test_reader_never_gives_a_traceback(reader):
    [r] = fuzz.run(EXAMPLES, seed=0, readers=[reader])
    assert r.tracebacks == 0, f"{r.tracebacks} of {r.inputs}: {r.failures}; {r.first_failure}"
    assert r.inputs == EXAMPLES == r.rejected + r.accepted
    # not vacuous: the strategies reach both outcomes (valid documents read, hostile refused)
    assert r.accepted > 0
    assert (r.rejected == 0) if reader in NEVER_REJECT else (r.rejected > 0)


def _explode(path: pathlib.Path) -> None:
    """A reader with a bug: a traceback on every other input, a two-line KifError on some."""
    data = path.read_bytes()
    if len(data) % 2:
        json.loads("[" * 100_000)  # RecursionError
    if data[:1] == b"{":
        raise KifError("first line\nsecond line")


def test_the_harness_counts_every_failure_and_goes_on(monkeypatch):
    """A failing reader is counted, input after input (hypothesis is not stopped at the first
    failure), and a KifError on two lines counts as a traceback."""
    broken = dataclasses.replace(fuzz.READERS["kif-jsonl"], read=_explode)
    monkeypatch.setitem(fuzz.READERS, "broken", broken)
    [r] = fuzz.run(100, seed=1, readers=["broken"])
    assert r.inputs == 100 and r.tracebacks > 1 and r.rejected == 0
    assert r.accepted + r.tracebacks == 100
    kinds = [kind for kind, _, _ in r.failures]
    assert any(k.startswith("RecursionError at ") for k in kinds), kinds
    assert any(k.startswith("KifError on 2 lines at ") for k in kinds), kinds
    assert sum(n for _, n, _ in r.failures) == r.tracebacks
    assert r.first_failure and "->" in r.first_failure


def test_run_refuses_an_unknown_reader():
    with pytest.raises(KifError, match="unknown reader 'nope'"):
        fuzz.run(1, readers=["nope"])


# ---- regressions the fuzzing found in kif.data.formats --------------------------------------

def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw inside strings; JSONL breaks
    lines at "\\n" only (str.splitlines cut such a record in two)."""
    row = {"prompt": "Ada\u2028Lovelace\x85was born in", "answer": " London",
           "subject": "Ada", "split": "forget"}
    path = tmp_path / "c.jsonl"
    path.write_bytes((json.dumps(row, ensure_ascii=False) + "\r\n").encode() * 2)
    assert [p.prompt for p in read_kif_jsonl(path)["forget"]] == [row["prompt"]] * 2


def test_array_line_numbers_count_from_each_element(tmp_path):
    rows = [{"question": f"q{i}", "answer": "a"} for i in range(3)] + [{"question": "q"}]
    path = tmp_path / "t.json"
    text = json.dumps(rows, indent=1)
    path.write_text(text)
    line = text[:text.rindex("{")].count("\n") + 1  # the last element's first line
    with pytest.raises(DataFormatError, match=rf"t\.json:{line}: missing field 'answer'"):
        read_tofu(path)


# ---- through the CLI -------------------------------------------------------------------------

def _row(**kw) -> str:
    return json.dumps({"prompt": "Ada was born in", "answer": " London", "subject": "Ada",
                       "split": "forget", **kw})


HOSTILE = {
    "deep.jsonl": b"[" * 10_000 + b"]" * 10_000 + b"\n",
    "deep-array.json": b"[" + b'{"a":' * 10_000 + b"0" + b"}" * 10_000 + b"]",
    "long-int.jsonl": b"1" * 5000 + b"\n",
    "binary.jsonl": b"\x89PNG\r\n\x1a\n\xff\xfe",
    "surrogate.jsonl": b'{"prompt": "\xed\xa0\x80"}\n',
    "key-newline.jsonl": b'{"a\\nb": 1, "\\ud800": 2}\n',
    "huge-split.jsonl": _row(split="x" * 1_000_000).encode() + b"\n",
    "empty.jsonl": b"",
    "nan.jsonl": _row(template=float("nan")).encode() + b"\n",
}


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_forget_file_is_one_error_line(tmp_path, name):
    """`kif eval --forget FILE` reads the files before loading any model."""
    path = tmp_path / name
    path.write_bytes(HOSTILE[name])
    code, err = _cli(["eval", "--forget", str(path)])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kif: error: ") and str(path) in err, err
    assert len(err) < 400  # a megabyte value is not quoted whole


@pytest.mark.parametrize("flag", ["--retain", "--never-knew"])
def test_hostile_companion_file_is_one_error_line(tmp_path, flag):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(_row() + "\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x00\xff" * 10)
    code, err = _cli(["eval", "--forget", str(forget), flag, str(bad)])
    assert code == 2 and err.count("\n") == 1 and err.startswith("kif: error: "), err
