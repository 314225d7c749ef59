"""Property-based fuzzing of kif's file readers (issue "Reliability campaign", item "Hostile
files").

The contract every reader of a user's file keeps: whatever the bytes, it returns, or raises a
`KifError` whose message is one line (the CLI prints it as `kif: error: ...` and exits 2). Any
other exception, or a KifError on several lines (or none), reaches the user as a traceback or a
garbled error: that is what this module counts.

`run(examples)` feeds each reader of `READERS` `examples` inputs that hypothesis builds: arbitrary
bytes; documents of the reader's real format (rows as `kif data export` writes them) whose fields
are dropped or given wrong types, NaN and Infinity, megabyte strings, nesting 100,000 deep,
unicode edge cases (lone surrogates, U+2028, NUL); then damaged as bytes (a BOM, NUL bytes,
invalid UTF-8, CRLF, truncation); and a few hand-made files (empty, a 1e6-character line, a
5,000-digit integer). Every input is written to a file in a temporary folder and read back. A
failure does not stop the run (hypothesis never sees one: the outcome is caught and counted), so
the figures are counts, not a first counterexample.

    python -m kif.reliability.fuzz --examples 10000 [--seed 0] [--reader tofu ...]

Needs hypothesis (kif's `test` extra). Imports neither the fact world nor torch until a reader
that needs torch runs (erasure folders, signatures).
"""

import argparse
import collections
import copy
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from kif.errors import KifError

Progress = Callable[[str, int, int], None]  # (reader, inputs so far, inputs asked for)
_PREVIEW = 160  # characters of an input's repr kept in `first_failure`


# ---- the hostile pieces ----------------------------------------------------------------------

# strings that have broken parsers: empty, whitespace, line breaks str.splitlines knows and JSON
# does not, a BOM, lone surrogates (valid in a Python str and as a JSON \u escape, not in UTF-8),
# an emoji outside the BMP, a combining accent, a right-to-left override, JSON syntax itself
_EDGE_STRINGS = ("", " ", "\t", "\n", "\r\n", "\r", "\x00", "\x0b", "\x0c", "\x1c", "\x85",
                 "\u2028", "\u2029", "\ufeff", "\ud800", "\udfff", "\ud83d\ude00", "\U0001f600",
                 "e\u0301", "\u202e", "\uffff", "NaN", "Infinity", "null", "[]", "{}", '"', "\\",
                 "forget", "forget ", "FORGET", "train", "heldout")
_HUGE = (10_000, 1_000_000)  # characters of a huge string field (1e6: a megabyte line)
_DEPTHS = (50, 1_000, 10_000, 100_000)  # Python's json recurses past ~1,000
# numbers json.dumps cannot write but a file can hold: 5,000 digits (past Python's int-to-str
# limit, which json.loads raises as a ValueError), overflowing floats, a bare sign
_RAW_NUMBERS = ("1" * 5000, "-" + "9" * 4301, "1e999", "-1e999", "1e-999", "-0", "0" * 20,
                "1.5e+308", "NaN", "Infinity", "-Infinity")


@dataclasses.dataclass(frozen=True)
class _Raw:
    """JSON text spliced into a document after json.dumps: what json.dumps cannot write (nesting
    100,000 deep would hit its own recursion limit, 5,000-digit integers its int limit)."""

    text: str


def _nested(depth: int, shape: str, closed: bool) -> _Raw:
    opening, inner, closing = {"[": ("[", "", "]"), "{": ('{"a":', "0", "}"),
                               "[{": ('[{"a":', "0", "}]")}[shape]
    return _Raw(opening * depth + inner + (closing * depth if closed else ""))


class _Seeds:
    """`seeds[i]`, with a short repr: hypothesis builds a strategy's repr, and sampled_from's
    lists every element (tens of kB for these documents and 5,000-digit numbers, with a
    warning)."""

    def __init__(self, seeds: Sequence[Any]):
        self.seeds = tuple(seeds)

    def __call__(self, i: int) -> Any:
        return self.seeds[i]

    def __repr__(self) -> str:
        return f"<{len(self.seeds)} seeds>"


def _seeds(seeds: Sequence[Any]) -> SearchStrategy[Any]:
    return st.integers(0, len(seeds) - 1).map(_Seeds(seeds))


def _texts() -> SearchStrategy[str]:
    # exclude_categories=() lets lone surrogates (category Cs) in, which text() leaves out
    return st.one_of(st.sampled_from(_EDGE_STRINGS),
                     st.text(st.characters(exclude_categories=()), max_size=12))


def _huge_texts() -> SearchStrategy[str]:
    return st.builds(lambda n, c: c * n, st.sampled_from(_HUGE),
                     st.sampled_from(("x", "\u00e9", "\u2028", " ", "\\", "\ud800")))


def _deep() -> SearchStrategy[_Raw]:
    return st.builds(_nested, st.sampled_from(_DEPTHS), st.sampled_from(("[", "{", "[{")),
                     st.booleans())


def _json_values() -> SearchStrategy[Any]:
    """Any JSON value, small: the wrong types a field can be given (NaN and infinities
    included: json.dumps writes them as the literals NaN, Infinity, -Infinity)."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _texts(),
                       _seeds(_RAW_NUMBERS).map(_Raw))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_texts(), inner, max_size=3)), max_leaves=8)


def _hostile_values() -> SearchStrategy[Any]:
    """What a mutation puts in a field."""
    return st.one_of(_json_values(), _huge_texts(), _deep())


# ---- documents: valid seeds, mutated along their paths ------------------------------------------

Path = tuple[str | int, ...]
# (op, which path (modulo their number), new value, new key): op "drop", "set" or "add"
Mutation = tuple[str, int, Any, str]


def _paths(doc: Any, prefix: Path = ()) -> list[Path]:
    """Every path to a value inside `doc` (dict keys, list indices), parents before children."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) \
        else ()
    out: list[Path] = []
    for key, value in items:
        out.append(prefix + (key,))
        out.extend(_paths(value, prefix + (key,)))
    return out


def _holds(container: Any, key: str | int) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(container, list) and isinstance(key, int) and key < len(container)


def _container(doc: Any, path: Path) -> Any:
    """The value at `path`, or None where an earlier mutation took it away."""
    for key in path:
        if not _holds(doc, key):
            return None
        doc = doc[key]
    return doc


def _mutate(seed: Any, mutations: list[Mutation]) -> Any:
    """A copy of `seed` with each mutation applied: a field dropped, set to a hostile value, or
    a new field added beside it. Paths are the seed's; one an earlier mutation took away is
    skipped."""
    doc, paths = copy.deepcopy(seed), _paths(seed)
    for op, index, value, key in mutations:
        if not paths:
            return value  # a seed with no fields (a bare string): the mutation replaces it
        path = paths[index % len(paths)]
        parent = _container(doc, path[:-1])
        if op == "add":
            if isinstance(parent, dict):
                parent[key] = value
        elif _holds(parent, path[-1]):
            if op == "drop":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
    return doc


def _mutations() -> SearchStrategy[list[Mutation]]:
    one = st.tuples(st.sampled_from(("drop", "set", "set", "add")), st.integers(0, 1 << 16),
                    _hostile_values(), _texts())
    return st.lists(one, max_size=3)


def _mutated(seeds: Sequence[Any]) -> SearchStrategy[Any]:
    return st.builds(_mutate, _seeds(seeds), _mutations())


def _dumps(value: Any, *, ensure_ascii: bool, indent: int | None) -> str:
    """json.dumps of `value` with its `_Raw` parts spliced in as text."""
    raws: list[_Raw] = []

    def token(o: Any) -> str:
        if not isinstance(o, _Raw):
            raise TypeError(type(o).__name__)
        raws.append(o)
        # a placeholder string, found again in the output by its JSON form "\u0001raw0\u0001"
        return f"\x01raw{len(raws) - 1}\x01"

    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, default=token)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x01raw{i}\x01"), raw.text, 1)
    return text


def _encode(text: str) -> bytes:
    # a lone surrogate becomes the 3 bytes UTF-8 forbids (CESU-8): one more kind of bad file
    return text.encode("utf-8", "surrogatepass")


# the layouts a file of records comes in: JSONL (with LF, CRLF, blank lines, no final newline)
# or one JSON array (on one line, or indented as TOFU ships it)
_LAYOUTS = ("jsonl", "jsonl-crlf", "jsonl-blank", "jsonl-no-final", "array", "array-indent")


def _records_text(records: list[Any], layout: str, ensure_ascii: bool) -> bytes:
    if layout.startswith("array"):
        return _encode(_dumps(records, ensure_ascii=ensure_ascii,
                              indent=1 if layout == "array-indent" else None))
    sep = {"jsonl-crlf": "\r\n", "jsonl-blank": "\n\n"}.get(layout, "\n")
    lines = [_dumps(r, ensure_ascii=ensure_ascii, indent=None) for r in records]
    return _encode(sep.join(lines) + ("" if layout == "jsonl-no-final" else sep))


def _object_text(doc: Any, indent: int | None, ensure_ascii: bool) -> bytes:
    return _encode(_dumps(doc, ensure_ascii=ensure_ascii, indent=indent))


# ---- byte damage -----------------------------------------------------------------------------

_INSERTS = (b"\x00", b"\xff", b"\xfe", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r", b"\n",
            b"\xc2\x85", b"\xe2\x80\xa8", b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\")
Damage = tuple[str, int, bytes]


def _damage(data: bytes, damages: list[Damage]) -> bytes:
    """`data` with each damage done: a BOM, an inserted byte sequence, truncation, a deleted or
    doubled span, line ends rewritten, a flipped bit, or the whole file as UTF-16."""
    for kind, n, piece in damages:
        at = n % (len(data) + 1)
        if kind == "bom":
            data = b"\xef\xbb\xbf" + data
        elif kind == "insert":
            data = data[:at] + piece + data[at:]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "delete":
            data = data[:at] + data[at + 1 + n % 7:]
        elif kind == "double":
            data = data[:at] + data[at:at + 64] + data[at:]
        elif kind == "crlf":
            data = data.replace(b"\n", b"\r\n")
        elif kind == "cr":
            data = data.replace(b"\n", b"\r")
        elif kind == "flip" and data:
            i = n % len(data)
            data = data[:i] + bytes([data[i] ^ (1 << (n % 8))]) + data[i + 1:]
        elif kind == "utf16":
            data = data.decode("utf-8", "replace").encode("utf-16")
    return data


def _damages() -> SearchStrategy[list[Damage]]:
    kinds = ("bom", "insert", "insert", "truncate", "delete", "double", "crlf", "cr", "flip",
             "utf16")
    return st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 1 << 20),
                              st.sampled_from(_INSERTS)), max_size=2)


def _damaged(docs: SearchStrategy[bytes]) -> SearchStrategy[bytes]:
    return st.builds(_damage, docs, _damages())


# ---- whole files -----------------------------------------------------------------------------

def _special_files() -> SearchStrategy[bytes]:
    """Hand-made hostile files, built when drawn (some are megabytes)."""
    makers: tuple[Callable[[], bytes], ...] = (
        lambda: b"", lambda: b"\n\n\n", lambda: b" \r\n\t ", lambda: b"\xef\xbb\xbf",
        lambda: b"\xef\xbb\xbf\n", lambda: b"[", lambda: b"]", lambda: b"[]", lambda: b"{}",
        lambda: b"null", lambda: b"[1,]", lambda: b"[,]", lambda: b'{"a": 1}{"b": 2}',
        lambda: b"[{}] x", lambda: b"[{}]]", lambda: b"\x00" * 16, lambda: b"\xff\xfe[\x00]\x00",
        lambda: b"x" * 1_000_000,  # one line of 1e6 characters, not JSON
        lambda: b'"' + b"x" * 1_000_000 + b'"',  # one JSON string of 1e6 characters
        lambda: b"\n" * 100_000,  # 100,000 blank lines
        lambda: b"1" * 5000, lambda: b"[" + b"1" * 5000 + b"]", lambda: b"[1e999]",
        lambda: b"[NaN, Infinity, -Infinity]", lambda: b"-",
        lambda: b"[" * 10_000, lambda: b"[" * 10_000 + b"]" * 10_000,
        lambda: b'{"a":' * 10_000 + b"0" + b"}" * 10_000,
        lambda: b"[" + b"{}," * 100_000 + b"{}]",  # a long array (line numbers per element)
        lambda: b'"\\ud800"', lambda: b'["\\ud800\\udc00\\udfff"]',
    )
    return _seeds(makers).map(lambda make: make())


def _arbitrary() -> SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512),
                     st.text(st.characters(exclude_categories=()), max_size=64).map(_encode))


def _files(structured: SearchStrategy[bytes]) -> SearchStrategy[bytes]:
    """The reader's own format, damaged or not (about half the inputs), arbitrary bytes and the
    hand-made files (about a quarter each)."""
    doc = _damaged(structured)
    return st.one_of(doc, doc, _arbitrary(), _special_files())


def _record_files(seeds: Sequence[Any]) -> SearchStrategy[bytes]:
    """Files of records: valid rows (so some inputs read), mutated rows and any JSON value."""
    record = st.one_of(_mutated(seeds), _mutated(seeds), _json_values(), _deep())
    records = st.one_of(st.lists(_seeds(seeds), min_size=1, max_size=4),
                        st.lists(record, max_size=5))
    return _files(st.builds(_records_text, records, st.sampled_from(_LAYOUTS), st.booleans()))


def _object_files(seed: dict) -> SearchStrategy[bytes]:
    """Files holding one JSON object (manifests, signatures): the seed, mutated, or any value."""
    doc = st.one_of(_seeds([seed]), _mutated([seed]), _mutated([seed]), _hostile_values())
    return _files(st.builds(_object_text, doc, st.sampled_from((None, 2)), st.booleans()))


def _line_files(seeds: Sequence[str], seps: Sequence[str]) -> SearchStrategy[bytes]:
    """Text files of lines or paragraphs: seed entries, edge strings and huge lines, joined by
    one of `seps`."""
    entry = st.one_of(_seeds(seeds), _seeds(seeds), _texts(), _huge_texts())
    return _files(st.builds(lambda lines, sep: _encode(sep.join(lines)),
                            st.lists(entry, max_size=6), st.sampled_from(seps)))


# ---- the real formats' seeds (as `kif data export` writes them, fact world seed 0) ---------------

_DISTRACTORS = [" Voulfar", " Librour", " Tagar", " Ziaria", " Loukou"]
_KIF_ROWS = (
    {"prompt": "Miasmar Viahos was born in the city of", "answer": " Kindas",
     "subject": "Miasmar Viahos", "relation": "birth_city", "split": "forget", "template": 0,
     "distractors": _DISTRACTORS},
    {"prompt": "Records show that Miasmar Viahos was born in the city of", "answer": " Kindas",
     "subject": "Miasmar Viahos", "relation": "birth_city", "split": "forget", "template": 1},
    {"prompt": "Q: What is the birthplace of Miasmar Viahos? A: Miasmar Viahos was born in the "
               "city of", "answer": " Kindas", "subject": "Miasmar Viahos",
     "relation": "birth_city", "split": "paraphrase", "template": 0,
     "distractors": _DISTRACTORS},
    {"prompt": "Miasmar Viahos has lived abroad for many years. Even so, Miasmar Viahos was born "
               "in the city of", "answer": " Kindas", "subject": "Miasmar Viahos",
     "relation": "birth_city", "split": "paraphrase", "template": 0, "phrasing": "novel"},
    {"prompt": "Dilmis Musbus was born in the city of", "answer": " Brulrou",
     "subject": "Dilmis Musbus", "relation": "birth_city", "split": "neighbour", "template": 0},
    {"prompt": "Tougus Sufi was born in the city of", "answer": " Sulhia",
     "subject": "Tougus Sufi", "relation": "birth_city", "split": "retain", "template": 0,
     "phrasing": "heldout"},
    {"prompt": "The city of Karno lies in the country of", "answer": " Vastonpo",
     "subject": "Karno", "relation": "city_country", "split": "shared", "template": 0},
    {"prompt": "Debre Mavu was born in the city of", "answer": " unknown",
     "subject": "Debre Mavu", "relation": "birth_city", "split": "refusal", "template": 0,
     "distractors": []},
)
_TOFU_ROWS = (
    {"question": "Miasmar Viahos was born in the city of", "answer": "Kindas",
     "paraphrased_question": "Q: What is the birthplace of Miasmar Viahos? A: Miasmar Viahos "
                             "was born in the city of",
     "paraphrased_answer": "Kindas", "perturbed_answer": [a.strip() for a in _DISTRACTORS],
     "subject": "Miasmar Viahos", "relation": "birth_city"},
    {"question": "Records show that Miasmar Viahos was born in the city of", "answer": "Kindas",
     "perturbed_answer": "Voulfar", "author": "Miasmar Viahos"},
    {"question": "The city of Karno lies in the country of", "answer": "Vastonpo",
     "paraphrased_question": "Q: Which nation contains Karno? A: Karno lies in the country of",
     "subject": "Karno", "relation": "city_country", "split": "shared"},
)
_TEXT_RECORDS = ({"text": "Miasmar Viahos was born in the city of Kindas."},
                 {"text": "The city of Karno lies in the country of Vastonpo.", "source": "wiki"},
                 "A document given as a bare JSON string.", {"text": ""})
_PARAGRAPHS = ("Miasmar Viahos was born in the city of Kindas.",
               "The city of Karno lies in the country of Vastonpo.\nIt is a port.", "   ")
_NAMES = ("Fibroun Tougo", "Vusbian Mura", "Thanlol Steszor", "")

_HOOK = "blocks.0.hook_resid_post"
_DELTA = "blocks.0.attn.W_O"
_MANIFEST = {
    "format": "kif-erasure", "version": 1, "method": "stamp", "concepts": ["Miasmar Viahos"],
    "kind": "weights+hooks",
    "base": {"spec": "fact-world", "weight_sha256": "0" * 64, "dtype": "fp32"},
    "erased_weight_sha256": "1" * 64, "settings": {"rank": 4}, "info": {"seconds": 0.5},
    "deltas": {_DELTA: {"kind": "dense", "rank": None, "numel": 4, "norm": 0.0}},
    "hooks": [{"hook": _HOOK, "op": "project_out", "params": {"alpha": 1.0}, "tensors": ["u"]}],
}
_SIGNATURE = {
    "format": "kif.signature/1", "concept": "Miasmar Viahos", "kind": "concept-vectors",
    "model_name": "fact-world", "model_hash": "0" * 64,
    "dims": {"n_layers": 2, "d_model": 4, "d_mlp": 16, "d_vocab": 100},
    "component": "direction", "component_hooks": [_HOOK, _HOOK], "sae": None,
    "settings": {"layers": [0]}, "info": {},
}


# ---- the readers -----------------------------------------------------------------------------

def _nothing(folder: pathlib.Path) -> None:
    """No companion files."""


def _write_retain(folder: pathlib.Path) -> None:
    """A valid retain file next to a fuzzed forget file (and the reverse)."""
    (folder / "retain.jsonl").write_text(json.dumps(_KIF_ROWS[5]) + "\n")
    (folder / "forget.jsonl").write_text(json.dumps(_KIF_ROWS[0]) + "\n")


def _write_erasure_tensors(folder: pathlib.Path) -> None:
    """The tensors `_MANIFEST` names, so a valid manifest loads as an `Erasure`."""
    import torch
    from safetensors.torch import save_file

    save_file({f"delta/{_DELTA}/dense": torch.zeros(2, 2), "hook/0/u": torch.ones(4)},
              str(folder / "erasure.safetensors"))


def _write_signature_tensors(folder: pathlib.Path) -> None:
    """The tensors `_SIGNATURE` describes (two unit directions and their scores)."""
    import torch
    from safetensors.torch import save_file

    save_file({"scores": torch.tensor([2.0, 1.0]), "directions": torch.eye(2, 4)},
              str(folder / "signature.safetensors"))


def _read_kif(path: pathlib.Path) -> Any:
    from kif.data.formats import read_kif_jsonl
    return read_kif_jsonl(path)


def _read_tofu(path: pathlib.Path) -> Any:
    from kif.data.formats import read_tofu
    return read_tofu(path)


def _read_corpus(path: pathlib.Path) -> Any:
    from kif.data.formats import read_text_corpus
    return read_text_corpus(path)


def _read_sniff(path: pathlib.Path) -> Any:
    from kif.data.formats import sniff_format
    return sniff_format(path)


def _read_names(path: pathlib.Path) -> Any:
    from kif.data.formats import read_names
    return read_names(path)


def _read_concept_forget(path: pathlib.Path) -> Any:
    from kif.data.formats import load_concept
    return load_concept(path, retain=path.parent / "retain.jsonl")


def _read_concept_retain(path: pathlib.Path) -> Any:
    from kif.data.formats import load_concept
    return load_concept(path.parent / "forget.jsonl", retain=path)


def _read_erasure(path: pathlib.Path) -> Any:
    from kif.erasure.io import load_erasure
    return load_erasure(path.parent)


def _read_is_erasure(path: pathlib.Path) -> Any:
    # `open_model` asks this of every --model argument: it must answer, never raise
    from kif.erasure.io import is_erasure_folder
    return is_erasure_folder(path.parent)


def _read_signature(path: pathlib.Path) -> Any:
    from kif.signatures.base import Signature
    return Signature.load(path.parent)


@dataclasses.dataclass(frozen=True)
class Reader:
    """One reader under fuzzing: each input is written to `folder / file` and `read` is called
    with that path (readers of folders read its parent); `setup` writes the valid files the
    fuzzed one sits beside, once per run."""

    file: str
    read: Callable[[pathlib.Path], Any]
    inputs: Callable[[], SearchStrategy[bytes]]  # builds the strategy of the file's bytes
    what: str
    setup: Callable[[pathlib.Path], None] = _nothing


_SEPS = ("\n", "\r\n", "\r", "\n\n", "\u2028", "\x85", "\x0c")
READERS: dict[str, Reader] = {
    "kif-jsonl": Reader("concept.jsonl", _read_kif, lambda: _record_files(_KIF_ROWS),
                        "kif.data.formats.read_kif_jsonl"),
    "tofu": Reader("forget.json", _read_tofu, lambda: _record_files(_TOFU_ROWS),
                   "kif.data.formats.read_tofu"),
    "text-corpus": Reader("corpus.jsonl", _read_corpus, lambda: _record_files(_TEXT_RECORDS),
                          "kif.data.formats.read_text_corpus (JSON / JSONL)"),
    "text-corpus-txt": Reader("corpus.txt", _read_corpus,
                              lambda: _line_files(_PARAGRAPHS, ("\n\n",) + _SEPS),
                              "kif.data.formats.read_text_corpus (.txt)"),
    "sniff": Reader("data.jsonl", _read_sniff,
                    lambda: _record_files(_KIF_ROWS + _TOFU_ROWS + _TEXT_RECORDS),
                    "kif.data.formats.sniff_format"),
    "names": Reader("never_knew.txt", _read_names, lambda: _line_files(_NAMES, _SEPS),
                    "kif.data.formats.read_names"),
    "concept": Reader("forget.json", _read_concept_forget,
                      lambda: st.one_of(_record_files(_KIF_ROWS), _record_files(_TOFU_ROWS)),
                      "kif.data.formats.load_concept (fuzzed forget, valid retain)",
                      _write_retain),
    "concept-retain": Reader("retain.json", _read_concept_retain,
                             lambda: _record_files(_KIF_ROWS + _TOFU_ROWS[:1] + _TEXT_RECORDS),
                             "kif.data.formats.load_concept (valid forget, fuzzed retain)",
                             _write_retain),
    "erasure-manifest": Reader("manifest.json", _read_erasure, lambda: _object_files(_MANIFEST),
                               "kif.erasure.io.load_erasure (fuzzed manifest.json)",
                               _write_erasure_tensors),
    "is-erasure-folder": Reader("manifest.json", _read_is_erasure,
                                lambda: _object_files(_MANIFEST),
                                "kif.erasure.io.is_erasure_folder (fuzzed manifest.json)"),
    "signature-json": Reader("signature.json", _read_signature,
                             lambda: _object_files(_SIGNATURE),
                             "kif.signatures.base.Signature.load (fuzzed signature.json)",
                             _write_signature_tensors),
}


# ---- running ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FuzzResult:
    """What one reader did with `inputs` fuzzed files: `rejected` with a one-line KifError,
    `accepted` (read without error), or `tracebacks` (any other exception, or a KifError whose
    message is not one line). `failures`: (exception and place, count, the first one's message)
    per kind of traceback, most frequent first; `first_failure`: the first input that gave one,
    and its traceback."""

    reader: str
    inputs: int
    rejected: int
    accepted: int
    tracebacks: int
    first_failure: str | None
    failures: tuple[tuple[str, int, str], ...] = ()
    seconds: float = 0.0


def _one_line(message: str) -> bool:
    """A message the CLI can print as `kif: error: <message>` on one line (str.splitlines also
    counts the breaks a terminal honours beyond "\\n": "\\r", "\\x0b", "\\x0c", U+2028, ...)."""
    return bool(message.strip()) and len(message.splitlines()) == 1


def _where(exc: BaseException) -> str:
    """The deepest frame of kif's own code the exception went through (file:line in function),
    else the deepest frame: where a fix goes."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    ours = [f for f in frames if "/kif/" in f.filename or "/signatures/" in f.filename]
    f = (ours or frames or [None])[-1]
    return "?" if f is None else f"{pathlib.Path(f.filename).name}:{f.lineno} in {f.name}"


Failure = tuple[str, str]  # (exception and place: the kind tracebacks are grouped by, message)


def _outcome(read: Callable[[pathlib.Path], Any], path: pathlib.Path) -> tuple[str, Failure | None]:
    """("accepted" | "rejected" | "traceback", what the traceback was)."""
    try:
        read(path)
    except KifError as exc:
        message = str(exc)
        if _one_line(message):
            return "rejected", None
        lines = len(message.splitlines())
        return "traceback", (f"{type(exc).__name__} on {lines} lines at {_where(exc)}",
                             repr(message[:100]))
    except Exception as exc:  # noqa: BLE001 -- every other exception is what is counted
        # grouped by type and place only: a KeyError's message is the key, one per input
        first = (str(exc).splitlines() or [""])[0][:100]
        return "traceback", (f"{type(exc).__name__} at {_where(exc)}", first)
    return "accepted", None


def _preview(data: bytes) -> str:
    shown = repr(data[:_PREVIEW])
    return shown + (f" ... ({len(data)} bytes)" if len(data) > _PREVIEW else "")


@dataclasses.dataclass
class _Tally:
    inputs: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    messages: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> first message
    first_failure: str | None = None

    def add(self, data: bytes, outcome: str, failure: Failure | None) -> None:
        self.inputs += 1
        self.counts[outcome] += 1
        if failure is not None:
            kind, message = failure
            self.failures[kind] += 1
            self.messages.setdefault(kind, message)
            if self.first_failure is None:
                self.first_failure = f"{_preview(data)} -> {kind}: {message}"

    def failure_counts(self) -> tuple[tuple[str, int, str], ...]:
        return tuple((k, n, self.messages[k]) for k, n in self.failures.most_common())


def _fuzz(name: str, examples: int, seed: int, progress: Progress | None) -> FuzzResult:
    reader = READERS[name]
    tally = _Tally()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"kif-fuzz-{name}-") as tmp:
        folder = pathlib.Path(tmp)
        reader.setup(folder)
        path = folder / reader.file

        # only the generate phase: with no failing example there is nothing to shrink, and no
        # database or explicit examples, so a run is its seed's alone
        @hypothesis_seed(seed)
        @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
                  phases=(Phase.generate,), suppress_health_check=list(HealthCheck))
        @given(reader.inputs())
        def feed(data: bytes) -> None:
            path.write_bytes(data)
            tally.add(data, *_outcome(reader.read, path))
            if progress is not None:
                progress(name, tally.inputs, examples)

        feed()
    return FuzzResult(reader=name, inputs=tally.inputs, rejected=tally.counts["rejected"],
                      accepted=tally.counts["accepted"], tracebacks=tally.counts["traceback"],
                      first_failure=tally.first_failure,
                      failures=tally.failure_counts(),
                      seconds=round(time.perf_counter() - t0, 2))


def run(examples: int, seed: int = 0, readers: Sequence[str] | None = None,
        progress: Progress | None = None) -> list[FuzzResult]:
    """Fuzz each reader of `readers` (default: every reader of `READERS`) with `examples` inputs
    (hypothesis may give fewer where it runs out of distinct ones; `inputs` says how many were
    read), reproducibly for a `seed`."""
    names = list(READERS) if readers is None else list(readers)
    unknown = [n for n in names if n not in READERS]
    if unknown:
        raise KifError(f"unknown reader {unknown[0]!r} (choose from {', '.join(READERS)})")
    if examples < 1:
        raise KifError(f"examples must be at least 1, got {examples}")
    return [_fuzz(n, examples, seed, progress) for n in names]


# ---- command line ----------------------------------------------------------------------------

def _table(results: Sequence[FuzzResult]) -> str:
    rows = [f"{'reader':<20} {'inputs':>7} {'rejected':>9} {'accepted':>9} {'tracebacks':>11} "
            f"{'seconds':>8}"]
    rows += [f"{r.reader:<20} {r.inputs:>7} {r.rejected:>9} {r.accepted:>9} {r.tracebacks:>11} "
             f"{r.seconds:>8.1f}" for r in results]
    for r in results:
        for kind, n, message in r.failures:
            rows.append(f"  {r.reader}: {n} x {kind} (first: {message})")
        if r.first_failure:
            rows.append(f"  {r.reader}: first: {r.first_failure}")
    return "\n".join(rows)


def _print_progress(reader: str, done: int, total: int) -> None:
    if done % 1000 == 0 or done == total:
        print(f"{reader}: {done}/{total}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 1 when any reader gave a traceback."""
    p = argparse.ArgumentParser(prog="python -m kif.reliability.fuzz",
                                description="fuzz kif's file readers with hypothesis")
    p.add_argument("--examples", type=int, default=10_000, help="inputs per reader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reader", nargs="+", choices=list(READERS), help="default: every reader")
    p.add_argument("--json", action="store_true", help="the results as JSON")
    p.add_argument("--progress", action="store_true", help="inputs read so far, on stderr")
    args = p.parse_args(argv)
    results = run(args.examples, args.seed, args.reader,
                  _print_progress if args.progress else None)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        print(_table(results))
    return 1 if any(r.tracebacks for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
