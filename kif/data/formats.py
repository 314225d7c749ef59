"""Readers of the files a concept comes in: kif's JSONL, TOFU / open-unlearning QA files and
plain text corpora (MUSE, WMDP), and `load_concept`, which turns them into a `Concept`.

Every problem with a file is a `DataFormatError` whose one-line message starts with the file and
the line of the record at fault (`forget.jsonl:12: ...`), as compilers report, so a user can open
the file at that line. JSON arrays are read element by element for the same reason: a TOFU file
that ships as one array still gets line numbers.

Nothing here imports the fact world (`kif.world`): it is one data source among others, and its
files are written by `kif.data.export`.
"""

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Callable, Iterator, Literal

from kif.data.concept import Concept, NeverKnew, Refusal, text_row
from kif.data.probe import Probe
from kif.errors import KifError

# refusal rows: prompts the model already answers with the refusal target (their answer)
SPLITS = ("forget", "paraphrase", "neighbour", "retain", "shared", "refusal")
PHRASINGS = ("train", "heldout", "novel")  # kif.data.probe.Phrasing
Format = Literal["kif", "tofu", "text"]
PathLike = str | os.PathLike

_KIF_FIELDS = ("prompt", "answer", "subject", "split")
_SNIFF_BYTES = 8192
_SHOWN = 60  # characters of a file's value quoted in a message (a field may be megabytes long)
_EXPECTED = ("expected kif JSONL (prompt, answer, subject, split), a TOFU QA file "
             "(question, answer) or a text corpus (text)")


class DataFormatError(KifError):
    """A data file kif cannot read; the message names the file and the line."""


# ---- records: one JSON value per JSONL line or per element of a JSON array ------------------

def _read_text(path: PathLike) -> str:
    """The file's text; binary files (NUL bytes, invalid UTF-8) are refused, not misread."""
    try:
        raw = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if b"\x00" in raw[:_SNIFF_BYTES]:
        raise DataFormatError(f"{path}: binary file, not text; {_EXPECTED}")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the first record
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text (binary file?); {_EXPECTED}") \
            from None
    # Windows and old Mac line ends become "\n", the only line break the readers split on (a
    # raw "\r" is never part of a JSON value, so no record changes)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _shown(value: Any) -> str:
    """`value` quoted for a one-line message: its repr (escapes line breaks and lone surrogates),
    cut to `_SHOWN` characters."""
    r = repr(value)
    return r if len(r) <= _SHOWN else r[:_SHOWN] + "..."


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _bad_json(path: PathLike, e: json.JSONDecodeError, line: int) -> DataFormatError:
    return DataFormatError(f"{path}:{line}: invalid JSON ({e.msg})")


def _decode(path: PathLike, line: int, decode: Callable[[], Any], *,
            whole_text: bool = False) -> Any:
    """`decode()` of the record at `line`, every way Python's json fails as a DataFormatError:
    a JSONDecodeError at the line it names (counted from the file's start when `decode` reads
    the `whole_text`, else from `line`), and the two failures that are not JSONDecodeErrors and
    would otherwise reach the user as tracebacks: RecursionError (arrays or objects nested about
    1,000 deep) and ValueError (an integer longer than `sys.get_int_max_str_digits()`)."""
    try:
        return decode()
    except json.JSONDecodeError as e:
        raise _bad_json(path, e, e.lineno if whole_text else line + e.lineno - 1) from None
    except RecursionError:
        raise DataFormatError(f"{path}:{line}: invalid JSON (nested too deeply)") from None
    except ValueError:
        raise DataFormatError(f"{path}:{line}: invalid JSON (an integer of more than "
                              f"{sys.get_int_max_str_digits()} digits)") from None


def _array_records(path: PathLike, text: str) -> Iterator[tuple[int, Any]]:
    """(line, element) of a JSON array, decoded one element at a time to know its line."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        return
    # lines are counted from the previous element on, not from the file's start: counting from
    # the start made a 2.5 MB TOFU array take seconds (quadratic in the number of elements)
    line, counted = 1, 0
    while True:
        line, counted = line + text.count("\n", counted, pos), pos
        value, end = _decode(path, line, lambda: decoder.raw_decode(text, pos), whole_text=True)
        yield line, value
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == "]":
            break
        if pos >= len(text) or text[pos] != ",":
            raise DataFormatError(f"{path}:{_line_of(text, pos)}: invalid JSON (expected ',' or "
                                  f"']' between array elements)")
        pos = _skip_ws(text, pos + 1)
    if _skip_ws(text, pos + 1) < len(text):
        raise DataFormatError(f"{path}:{_line_of(text, pos + 1)}: invalid JSON (text after the "
                              f"closing ']')")


def _jsonl_records(path: PathLike, text: str) -> Iterator[tuple[int, Any]]:
    # split on "\n" only: str.splitlines also breaks at U+2028, U+0085 and other characters that
    # json.dumps(ensure_ascii=False) writes raw inside a string, which would cut a valid record
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; editors leave them
        yield i, _decode(path, i, lambda: json.loads(line))


def _records(path: PathLike, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line, value) of every record: a JSON array's elements, else the JSONL lines."""
    text = _read_text(path) if text is None else text
    if text.lstrip().startswith("["):
        return _array_records(path, text)
    return _jsonl_records(path, text)


def _object(path: PathLike, line: int, value: Any) -> dict:
    if not isinstance(value, dict):
        raise DataFormatError(f"{path}:{line}: expected a JSON object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _string(path: PathLike, line: int, row: dict, field: str, *, required: bool = True,
            empty_ok: bool = False) -> str | None:
    """`row[field]` as a string; None when absent and not `required`."""
    if field not in row:
        if required:
            raise DataFormatError(f"{path}:{line}: missing field {field!r}")
        return None
    value = row[field]
    if not isinstance(value, str):
        raise DataFormatError(f"{path}:{line}: field {field!r} must be a string, got "
                              f"{_kind(value)}")
    if not empty_ok and not value.strip():
        raise DataFormatError(f"{path}:{line}: field {field!r} is empty")
    return value


def _string_list(path: PathLike, line: int, row: dict, field: str,
                 single_ok: bool = False) -> list[str]:
    """`row[field]` as a list of non-empty strings ([] when absent); TOFU may give one string."""
    value = row.get(field, [])
    if single_ok and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataFormatError(f"{path}:{line}: field {field!r} must be a list of non-empty "
                              f"strings")
    return value


# ---- kif JSONL -------------------------------------------------------------------------------

def _kif_probe(path: PathLike, line: int, row: dict) -> tuple[str, Probe]:
    """(split, probe) of one kif JSONL record."""
    if "prompt" not in row and "question" in row:
        raise DataFormatError(f"{path}:{line}: missing field 'prompt' (this looks like a TOFU "
                              f"QA file: load it with read_tofu or load_concept)")
    prompt, answer, subject, split = (_string(path, line, row, f) for f in _KIF_FIELDS)
    if split not in SPLITS:
        raise DataFormatError(f"{path}:{line}: unknown split {_shown(split)} (choose from "
                              f"{', '.join(SPLITS)})")
    relation = _string(path, line, row, "relation", required=False, empty_ok=True) or ""
    template = row.get("template", 0)
    if not isinstance(template, int) or isinstance(template, bool) or template < 0:
        raise DataFormatError(f"{path}:{line}: field 'template' must be a non-negative integer")
    # a held-out or novel phrasing is evaluated, never fitted: paraphrase rows are held out
    # (or say "novel"), other rows say so
    phrasing = row.get("phrasing", "heldout" if split == "paraphrase" else "train")
    if phrasing not in PHRASINGS or (split == "paraphrase" and phrasing == "train"):
        allowed = PHRASINGS[1:] if split == "paraphrase" else PHRASINGS
        raise DataFormatError(f"{path}:{line}: field 'phrasing' of a {split} row must be "
                              f"{' or '.join(repr(a) for a in allowed)}")
    probe = Probe(prompt=prompt, answer=answer, subject=subject, relation=relation,
                  phrasing=phrasing, template=template,
                  kind="shared" if split == "shared" else "person",
                  distractors=tuple(_string_list(path, line, row, "distractors")))
    return split, probe


def kif_record(p: Probe, split: str, distractors: tuple[str, ...] = ()) -> dict:
    """`p` as one kif JSONL record (`kif.data.formats.read_kif_jsonl` reads it back)."""
    row = {"prompt": p.prompt, "answer": p.answer, "subject": p.subject, "relation": p.relation,
           "split": split, "template": p.template, "distractors": list(distractors)}
    if p.phrasing != ("heldout" if split == "paraphrase" else "train"):
        row["phrasing"] = p.phrasing  # a phrasing other than the split's default
    return row


def read_kif_jsonl(path: PathLike) -> dict[str, list[Probe]]:
    """kif's JSONL: one object per line, `{"prompt", "answer", "subject", "split",
    "distractors"?, "relation"?, "template"?, "phrasing"?}`, split one of `SPLITS`, phrasing
    "train" (default), "heldout" (scored by `kif eval`, never fitted; the default of paraphrase
    rows) or "novel" (the broader locality set: scored as `*_novel_acc`, never fitted). Returns split -> probes
    (every split present, possibly empty). Answers are kept exactly as written: a leading space
    is the convention (the answer continues the prompt), not a requirement."""
    out: dict[str, list[Probe]] = {s: [] for s in SPLITS}
    for line, value in _records(path):
        row = _object(path, line, value)
        keep = row.get("keep", True)  # a reviewer's switch (self-built probes write it)
        if not isinstance(keep, bool):
            raise DataFormatError(f"{path}:{line}: field 'keep' must be true or false")
        if keep:
            split, probe = _kif_probe(path, line, row)
            out[split].append(probe)
    return out


# ---- TOFU / open-unlearning QA files ---------------------------------------------------------

def _spaced(answer: str) -> str:
    """TOFU answers come without the space that separates them from the question."""
    return answer if answer[:1].isspace() else " " + answer


def _tofu_probes(path: PathLike, line: int, index: int, row: dict,
                 split: str) -> tuple[Probe, Probe | None]:
    """The probe of one TOFU row and its paraphrase (None without `paraphrased_question`)."""
    question = _string(path, line, row, "question")
    answer = _spaced(_string(path, line, row, "answer"))
    subject = next((row[k] for k in ("subject", "author") if isinstance(row.get(k), str)), "")
    relation = _string(path, line, row, "relation", required=False, empty_ok=True) or ""
    wrong = tuple(_spaced(a) for a in _string_list(path, line, row, "perturbed_answer",
                                                   single_ok=True))
    kind = "shared" if split == "shared" else "person"
    probe = Probe(prompt=question, answer=answer, subject=subject, relation=relation,
                  template=index, kind=kind, distractors=wrong)
    para_q = _string(path, line, row, "paraphrased_question", required=False)
    if para_q is None:
        return probe, None
    para_a = _string(path, line, row, "paraphrased_answer", required=False)
    para = Probe(prompt=para_q, answer=_spaced(para_a) if para_a else answer, subject=subject,
                 relation=relation, phrasing="heldout", template=index, kind=kind,
                 distractors=wrong)
    return probe, para


def read_tofu(path: PathLike, split: str = "forget") -> dict[str, list[Probe]]:
    """A TOFU / open-unlearning QA file as its dataset ships it (a JSON array or JSONL of
    `{"question", "answer", "paraphrased_question"?, "paraphrased_answer"?,
    "perturbed_answer"?, "subject"? | "author"?, "relation"?}`): each row is a probe of `split`
    (its row index as `template`, perturbed answers as distractors), and its paraphrased question
    a held-out probe: in "paraphrase" for a forget file, else in `split` itself after its rows.
    A paraphrase shared by several rows is kept once. Returns split -> probes (every split
    present)."""
    if split not in SPLITS or split == "paraphrase":
        raise KifError(f"read_tofu: unknown split {split!r} (choose from forget, neighbour, "
                       f"retain, shared)")
    out: dict[str, list[Probe]] = {s: [] for s in SPLITS}
    paras: dict[tuple[str, str, str, str], Probe] = {}
    for index, (line, value) in enumerate(_records(path)):
        row = _object(path, line, value)
        s = _tofu_split(path, line, row, split)
        probe, para = _tofu_probes(path, line, index, row, s)
        out[s].append(probe)
        if para is not None:
            paras.setdefault(("paraphrase" if s == "forget" else s, para.prompt, para.answer,
                              para.subject), para)
    # after the file's own rows, so a retain file lists its training phrasings first
    for key, para in paras.items():
        out[key[0]].append(para)
    return out


def _tofu_split(path: PathLike, line: int, row: dict, default: str) -> str:
    """A row's own `split` (kif's extension of the format: a retain file may hold shared facts),
    else the file's."""
    s = _string(path, line, row, "split", required=False) or default
    if s not in ("forget", "neighbour", "retain", "shared"):
        raise DataFormatError(f"{path}:{line}: unknown split {_shown(s)} for a TOFU row (choose "
                              f"from forget, neighbour, retain, shared)")
    return s


# ---- text corpora ----------------------------------------------------------------------------

def _document(path: PathLike, line: int, value: Any) -> str:
    if isinstance(value, str):
        return value
    row = _object(path, line, value)
    if "text" not in row:
        raise DataFormatError(f"{path}:{line}: missing field 'text'")
    return _string(path, line, row, "text", empty_ok=True)


def read_text_corpus(path: PathLike) -> list[str]:
    """Documents of a text corpus: `.txt` (documents separated by blank lines), or JSON / JSONL
    of `{"text": ...}` objects (MUSE, WMDP) or of strings. Blank documents are dropped; a
    corpus with none is an error."""
    text = _read_text(path)
    if pathlib.Path(path).suffix.lower() == ".txt":
        docs = [d.strip() for d in _paragraphs(text)]
    else:
        docs = [_document(path, line, v) for line, v in _records(path, text)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataFormatError(f"{path}: no text (an empty corpus)")
    return docs


def _paragraphs(text: str) -> list[str]:
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    return out + (["\n".join(current)] if current else [])


# ---- format sniffing -------------------------------------------------------------------------

def _format_of(path: PathLike, line: int, value: Any) -> Format:
    if isinstance(value, str):
        return "text"
    keys = set(_object(path, line, value))
    if {"prompt", "answer", "split"} <= keys:
        return "kif"
    if {"question", "answer"} <= keys:
        return "tofu"
    if "text" in keys:
        return "text"
    # plain keys as they are; a key with a line break, a lone surrogate or megabytes quoted
    shown = ", ".join(k if k.isprintable() and len(k) <= _SHOWN else _shown(k)
                      for k in sorted(keys)[:8]) or "none"
    raise DataFormatError(f"{path}:{line}: unrecognised record (keys: {shown}); {_EXPECTED}")


def sniff_format(path: PathLike) -> Format:
    """"kif", "tofu" or "text", from a `.txt` suffix or the keys of the first record."""
    text = _read_text(path)
    if pathlib.Path(path).suffix.lower() == ".txt":
        return "text"
    for line, value in _records(path, text):
        return _format_of(path, line, value)
    raise DataFormatError(f"{path}: no records (an empty file)")


# ---- chat templates --------------------------------------------------------------------------

def apply_chat_template(tokenizer: Any, prompt: str, mode: str = "auto") -> str:
    """`prompt` as the user turn of the tokenizer's chat template, with the assistant's turn
    opened, so that the answer is what an instruction-tuned model says next; unchanged with
    `mode="none"` or a tokenizer without a chat template."""
    if mode not in ("auto", "none"):
        raise KifError(f"unknown chat template mode {mode!r} (choose from auto, none)")
    if mode == "none" or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


# ---- concepts from files ---------------------------------------------------------------------

def read_probes(path: PathLike, role: str) -> tuple[dict[str, list[Probe]], list[str]]:
    """(split -> probes, corpus documents) of the file given for `role` (forget, retain or
    neighbour). kif rows go to their own split; TOFU rows to `role`; a text corpus only to the
    retain corpus, and only where the role is retain."""
    fmt = sniff_format(path)
    if fmt == "kif":
        return read_kif_jsonl(path), []
    if fmt == "tofu":
        return read_tofu(path, split=role), []
    if role != "retain":
        raise DataFormatError(f"{path}: a text corpus has no prompts and answers; the {role} "
                              f"file must be kif JSONL or a TOFU QA file")
    return {s: [] for s in SPLITS}, read_text_corpus(path)


def _templated(probes: list[Probe], tokenizer: Any, mode: str) -> tuple[Probe, ...]:
    return tuple(dataclasses.replace(p, prompt=apply_chat_template(tokenizer, p.prompt, mode))
                 for p in probes)


def _distractors(probes: list[Probe]) -> dict[str, tuple[str, ...]]:
    """Per relation whose probes carry distractors: every answer and distractor given for it
    (the true answers too: `Concept.answer_choices` serves probe classes as well)."""
    out: dict[str, set[str]] = {}
    for p in probes:
        if p.distractors:
            out.setdefault(p.relation, set()).update(p.distractors)
    for p in probes:
        if p.relation in out:
            out[p.relation].add(p.answer)
    return {r: tuple(sorted(a)) for r, a in out.items()}


def _concept_name(name: str | None, forget: list[Probe], path: PathLike) -> str:
    if name:
        return name
    subjects = [s for s in dict.fromkeys(p.subject for p in forget) if s]
    return ", ".join(subjects) if subjects else pathlib.Path(path).stem


def read_names(path: PathLike) -> tuple[str, ...]:
    """Made-up names for the never-knew reference: one per line, blank lines skipped."""
    names = tuple(line.strip() for line in _read_text(path).splitlines() if line.strip())
    if not names:
        raise DataFormatError(f"{path}: no names (one made-up name per line)")
    return names


def _refusal(rows: list[Probe], target: str | None, where: str) -> Refusal | None:
    """The refusal target (given, else the one answer every refusal row has) and its prompts."""
    answers = sorted({p.answer for p in rows})
    if target is None and len(answers) > 1:
        raise DataFormatError(f"{where}: refusal rows have {len(answers)} different answers "
                              f"({', '.join(map(_shown, answers[:3]))}); pass the refusal "
                              f"target")
    target = target if target is not None else (answers[0] if answers else None)
    return None if target is None else Refusal(target, tuple(p.prompt for p in rows))


def _paths(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, os.PathLike)) else list(value)


def load_concept(forget: PathLike, retain: PathLike | list[PathLike] | None = None,
                 neighbour: PathLike | None = None, *, name: str | None = None,
                 refusal: str | None = None, never_knew: PathLike | None = None,
                 chat_template: str = "auto", tokenizer: Any = None) -> Concept:
    """A `Concept` from files, each in the format `sniff_format` finds (`retain` may be several
    files). Rows go to their own split whichever file holds them (a retain row of the forget
    file is a retain probe); a TOFU file's rows go to the role it was given for. The retain
    corpus is every retain and shared probe, then the documents of a text corpus given as
    `retain` (`text_row`). The refusal is `refusal` (a target such as " unknown") with the
    prompts of the `refusal` rows; without `refusal`, the refusal rows' own answer. `never_knew`
    is a file of made-up names (`read_names`). With a tokenizer, prompts are wrapped in its
    chat template (`apply_chat_template`)."""
    apply_chat_template(None, "", chat_template)  # an unknown mode fails before any reading
    roles = [(forget, "forget")] + [(p, "retain") for p in _paths(retain)] + \
            [(p, "neighbour") for p in _paths(neighbour)]
    paths = [p for p, _ in roles]
    splits: dict[str, list[Probe]] = {s: [] for s in SPLITS}
    corpus: list[str] = []
    for path, role in roles:
        if path is not None:
            got, docs = read_probes(path, role)
            for s in SPLITS:
                splits[s].extend(got[s])
            corpus.extend(docs)
    if not splits["forget"]:
        raise DataFormatError(f"{forget}: no forget prompts (no row with split 'forget')")
    parts = {s: _templated(ps, tokenizer, chat_template) for s, ps in splits.items()}
    # held-out phrasings are for evaluation only, never fitted (as the world's are never trained)
    rows = tuple(p for p in parts["retain"] + parts["shared"] if p.phrasing == "train") + \
        tuple(text_row(d) for d in corpus)
    return Concept(
        name=_concept_name(name, splits["forget"], forget),
        forget=parts["forget"], paraphrase=parts["paraphrase"], neighbour=parts["neighbour"],
        shared=parts["shared"], retain=parts["retain"], retain_corpus=rows,
        refusal=_refusal(list(parts["refusal"]), refusal, str(forget)),
        distractors=_distractors([p for s, ps in splits.items() if s != "refusal" for p in ps]),
        never_knew=NeverKnew(read_names(never_knew)) if never_knew is not None else None,
        source=", ".join(str(p) for p in paths))
