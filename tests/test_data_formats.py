"""kif.data.formats (readers of kif JSONL, TOFU QA files and text corpora, `load_concept`) and
kif.data.export (the fact world written in those formats), on small files in tmp_path."""

import json
import pathlib

import pytest

import kif
from kif.data.concept import Concept, text_row
from kif.data.export import export_world
from kif.data.formats import (DataFormatError, apply_chat_template, load_concept, read_kif_jsonl,
                              read_text_corpus, read_tofu, sniff_format)
from kif.data.probe import Probe
from kif.errors import KifError
from kif.world import FactWorld, world_concept

ZOO_MODEL = pathlib.Path(kif.__file__).parent / "zoo" / "fact-world"


def _jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(split: str = "forget", **kw) -> dict:
    row = {"prompt": "Ada Lovelace was born in", "answer": " London", "subject": "Ada Lovelace",
           "split": split}
    return {**row, **kw}


def _error(fn, *args, **kwargs) -> str:
    """The message of the DataFormatError `fn` raises: one line, as the CLI prints it."""
    with pytest.raises(DataFormatError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- kif JSONL -------------------------------------------------------------------------------

def test_read_kif_jsonl_routes_every_split(tmp_path):
    path = _jsonl(tmp_path / "concept.jsonl", [
        _row(relation="birth_city", distractors=[" Paris", " Rome"]),
        "",
        _row("paraphrase", prompt="Q: Where was Ada Lovelace born? A:", template=1),
        _row("neighbour", prompt="Ada Byron was born in", subject="Ada Byron"),
        _row("retain", prompt="Alan Turing worked at", answer="Bletchley", subject="Alan Turing"),
        _row("shared", prompt="The capital of France is", answer=" Paris", subject="France"),
        _row("refusal", prompt="Zork Quux was born in", answer=" unknown", subject="Zork Quux"),
    ])
    got = read_kif_jsonl(path)
    assert {s: len(v) for s, v in got.items()} == {
        "forget": 1, "paraphrase": 1, "neighbour": 1, "retain": 1, "shared": 1, "refusal": 1}
    assert got["forget"][0] == Probe("Ada Lovelace was born in", " London", "Ada Lovelace",
                                     relation="birth_city", distractors=(" Paris", " Rome"))
    para = got["paraphrase"][0]
    assert (para.phrasing, para.template, para.relation) == ("heldout", 1, "")
    assert got["retain"][0].answer == "Bletchley"  # no leading space added: kept as written
    assert got["shared"][0].kind == "shared" and got["forget"][0].kind == "person"


@pytest.mark.parametrize("bad, expected", [
    ('{"prompt": "a", "answer": " b",', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object, got a list"),
    (_row(subject=None), "field 'subject' must be a string, got null"),
    (_row(answer=3), "field 'answer' must be a string, got a number"),
    (_row(prompt="  "), "field 'prompt' is empty"),
    (_row(split="train"), "unknown split 'train'"),
    (_row(distractors=" Paris"), "field 'distractors' must be a list of non-empty strings"),
    (_row(distractors=[" Paris", 4]), "field 'distractors' must be a list of non-empty strings"),
    (_row(template=-1), "field 'template' must be a non-negative integer"),
    ({"prompt": "p", "answer": " a", "split": "forget"}, "missing field 'subject'"),
])
def test_read_kif_jsonl_errors_name_file_and_line(tmp_path, bad, expected):
    path = _jsonl(tmp_path / "forget.jsonl", [_row(), _row(), bad, _row()])
    message = _error(read_kif_jsonl, path)
    assert message.startswith(f"{path}:3: {expected}")


def test_kif_errors_count_blank_lines(tmp_path):
    path = _jsonl(tmp_path / "forget.jsonl", [_row(), "", "", {"prompt": "p"}])
    assert _error(read_kif_jsonl, path).startswith(f"{path}:4: missing field 'answer'")


def test_tofu_file_read_as_kif_says_so(tmp_path):
    path = _jsonl(tmp_path / "forget.jsonl", [{"question": "Who?", "answer": "Me"}])
    assert "looks like a TOFU QA file" in _error(read_kif_jsonl, path)
    assert sniff_format(path) == "tofu"


# ---- TOFU ------------------------------------------------------------------------------------

TOFU_ROWS = [
    {"question": "Where was Jaime born?", "answer": "Santiago",
     "paraphrased_question": "What is Jaime's birthplace?",
     "perturbed_answer": ["Lima", "Quito"], "author": "Jaime Vasquez"},
    {"question": "What does Jaime write?", "answer": " crime novels",
     "paraphrased_question": "Which genre does Jaime write in?",
     "paraphrased_answer": "true crime", "perturbed_answer": "poetry", "relation": "genre"},
    {"question": "When was Jaime born?", "answer": "1958"},
]


def test_read_tofu_json_array(tmp_path):
    path = tmp_path / "forget10_perturbed.json"
    path.write_text(json.dumps(TOFU_ROWS, indent=2))
    got = read_tofu(path)
    forget, para = got["forget"], got["paraphrase"]
    assert [p.prompt for p in forget] == [r["question"] for r in TOFU_ROWS]
    assert [p.answer for p in forget] == [" Santiago", " crime novels", " 1958"]
    assert [p.template for p in forget] == [0, 1, 2]
    assert [p.subject for p in forget] == ["Jaime Vasquez", "", ""]
    assert [p.relation for p in forget] == ["", "genre", ""]
    assert forget[0].distractors == (" Lima", " Quito") and forget[1].distractors == (" poetry",)
    assert [(p.prompt, p.answer, p.phrasing) for p in para] == [
        ("What is Jaime's birthplace?", " Santiago", "heldout"),
        ("Which genre does Jaime write in?", " true crime", "heldout")]
    assert not got["retain"] and not got["neighbour"]


def test_read_tofu_jsonl_into_another_split(tmp_path):
    path = _jsonl(tmp_path / "retain_perturbed.json", TOFU_ROWS)
    got = read_tofu(path, split="retain")
    # a retain file's paraphrases stay retain probes, in their held-out phrasing
    assert [p.phrasing for p in got["retain"]] == ["train", "train", "train", "heldout", "heldout"]
    assert not got["forget"] and not got["paraphrase"]
    with pytest.raises(KifError, match="unknown split 'paraphrase'"):
        read_tofu(path, split="paraphrase")


def test_read_tofu_errors_name_the_line_of_the_array_element(tmp_path):
    rows = [TOFU_ROWS[0], {"question": "Who?"}]
    path = tmp_path / "forget.json"
    path.write_text(json.dumps(rows, indent=2))
    line = json.dumps(rows, indent=2).splitlines().index("  {", 2) + 1
    assert _error(read_tofu, path).startswith(f"{path}:{line}: missing field 'answer'")
    path.write_text('[\n{"question": "q", "answer": "a"},\n{"question": "q" "answer": "a"}\n]')
    assert _error(read_tofu, path).startswith(f"{path}:3: invalid JSON")
    _jsonl(path, [TOFU_ROWS[0], {"question": "q", "answer": "a", "perturbed_answer": [1]}])
    assert _error(read_tofu, path).startswith(
        f"{path}:2: field 'perturbed_answer' must be a list of non-empty strings")


# ---- text corpora ----------------------------------------------------------------------------

def test_read_text_corpus_formats(tmp_path):
    jsonl = _jsonl(tmp_path / "news.jsonl", [{"text": "First doc."}, {"text": "  "},
                                             {"text": "Second doc.", "id": 2}])
    assert read_text_corpus(jsonl) == ["First doc.", "Second doc."]
    array = tmp_path / "books.json"
    array.write_text(json.dumps(["One.", "Two."]))
    assert read_text_corpus(array) == ["One.", "Two."]
    txt = tmp_path / "corpus.txt"
    txt.write_text("Para one,\nstill one.\n\n\nPara two.\n")
    assert read_text_corpus(txt) == ["Para one,\nstill one.", "Para two."]


def test_read_text_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert "no text" in _error(read_text_corpus, empty)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    assert _error(read_text_corpus, bad).startswith(f"{bad}:2: missing field 'text'")


# ---- sniffing --------------------------------------------------------------------------------

def test_sniff_format(tmp_path):
    assert sniff_format(_jsonl(tmp_path / "a.jsonl", ["", _row()])) == "kif"
    assert sniff_format(_jsonl(tmp_path / "b.json", TOFU_ROWS)) == "tofu"
    assert sniff_format(_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])) == "text"
    (tmp_path / "d.json").write_text('["a doc"]')
    assert sniff_format(tmp_path / "d.json") == "text"
    (tmp_path / "e.txt").write_text("plain prose")
    assert sniff_format(tmp_path / "e.txt") == "text"


def test_sniff_format_refuses_other_files(tmp_path):
    other = _jsonl(tmp_path / "other.jsonl", ["", {"input": "x", "output": "y"}])
    message = _error(sniff_format, other)
    assert message.startswith(f"{other}:2: unrecognised record (keys: input, output)")
    blob = tmp_path / "model.safetensors"
    blob.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":{}}' + b"\x00" * 8)
    assert "binary file" in _error(sniff_format, blob)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert _error(sniff_format, latin).startswith(f"{latin}:2: not UTF-8 text")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "no records" in _error(sniff_format, tmp_path / "empty.jsonl")
    assert "cannot read" in _error(sniff_format, tmp_path / "missing.jsonl")


# ---- load_concept ----------------------------------------------------------------------------

def test_load_concept_routes_rows_and_builds_parts(tmp_path):
    forget = _jsonl(tmp_path / "forget.jsonl", [
        _row(relation="city", distractors=[" Paris"]),
        _row("paraphrase", prompt="Ada Lovelace's birthplace is", relation="city"),
        _row("retain", prompt="Alan Turing was born in", answer=" Maida Vale",
             subject="Alan Turing", relation="city"),
    ])
    retain = _jsonl(tmp_path / "retain.jsonl", [
        _row("shared", prompt="France's capital is", answer=" Paris", subject="France"),
        _row("forget", prompt="Ada Lovelace died in", answer=" Marylebone")])
    neighbour = _jsonl(tmp_path / "neighbour.json", [{"question": "Ada Byron was born in",
                                                      "answer": "London", "subject": "Ada Byron"}])
    c = load_concept(forget, retain, neighbour, refusal=" unknown")
    assert isinstance(c, Concept) and c.name == "Ada Lovelace"
    assert [p.prompt for p in c.forget] == ["Ada Lovelace was born in", "Ada Lovelace died in"]
    assert len(c.paraphrase) == len(c.shared) == len(c.neighbour) == 1
    assert c.retain[0].subject == "Alan Turing"
    assert c.retain_corpus == c.retain + c.shared
    assert c.refusal.target == " unknown" and c.refusal.prompts == ()
    assert c.distractors == {"city": (" London", " Maida Vale", " Paris")}
    assert c.source == f"{forget}, {retain}, {neighbour}"
    assert load_concept(forget).refusal is None


def test_load_concept_text_corpus_and_names(tmp_path):
    forget = _jsonl(tmp_path / "harry_potter.json", [{"question": "Who is Harry's owl?",
                                                      "answer": "Hedwig"}])
    corpus = tmp_path / "books.txt"
    corpus.write_text("Chapter one.\n\nChapter two.\n")
    c = load_concept(forget, corpus)
    assert c.name == "harry_potter"  # no subjects: the file stem
    assert c.retain_corpus == (text_row("Chapter one."), text_row("Chapter two."))
    assert c.retain == ()
    assert load_concept(forget, name="HP").name == "HP"
    assert "text corpus has no prompts" in _error(load_concept, corpus)
    assert "text corpus has no prompts" in _error(load_concept, forget, None, corpus)


def test_load_concept_empty_forget_set(tmp_path):
    only_retain = _jsonl(tmp_path / "forget.jsonl", [_row("retain"), _row("shared")])
    assert _error(load_concept, only_retain) == (
        f"{only_retain}: no forget prompts (no row with split 'forget')")


def test_load_concept_reads_a_tofu_file_given_for_kif(tmp_path):
    # a TOFU file named like kif JSONL: the format comes from its records, not its name
    path = _jsonl(tmp_path / "forget.jsonl", TOFU_ROWS)
    c = load_concept(path)
    assert [p.prompt for p in c.forget] == [r["question"] for r in TOFU_ROWS]
    assert len(c.paraphrase) == 2
    assert c.distractors == {"": (" 1958", " Lima", " Quito", " Santiago"),
                             "genre": (" crime novels", " poetry", " true crime")}


# ---- round trip through the fact world's files -----------------------------------------------

@pytest.fixture(scope="module")
def world():
    return FactWorld.generate(0)


def _facts(probes) -> list[tuple[str, str, str]]:
    return [(p.prompt, p.answer, p.subject) for p in probes]


def _expected(world):
    forget = world.split("forget01")
    names = {p.name for p in forget}
    retain = [p for p in world.split("retain") if p.name not in names]
    neighbours = {q.name: q for p in forget for q in world.neighbours(p.name, retain)}
    return {"forget": world.person_probes(forget, "train"),
            "paraphrase": world.person_probes(forget, "heldout"),
            "neighbour": world.person_probes(list(neighbours.values()), "train", (0, 2)),
            "retain": world.person_probes([p for p in world.known() if p.name not in names],
                                          "train"),
            "shared": world.shared_probes("train")}


@pytest.mark.parametrize("fmt, ext", [("kif", "jsonl"), ("tofu", "json")])
def test_export_round_trip(tmp_path, world, fmt, ext):
    out = export_world(world, "forget01", fmt, out_dir=tmp_path / "out")
    extra = ["never_knew.txt"] + (["refusal.jsonl"] if fmt == "tofu" else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.{ext}" for n in ("forget", "neighbour", "retain")] + extra)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind
    retain = [out / f"retain.{ext}"] + ([out / "refusal.jsonl"] if fmt == "tofu" else [])
    c = load_concept(out / f"forget.{ext}", retain, out / f"neighbour.{ext}",
                     never_knew=out / "never_knew.txt")
    want = _expected(world)
    # every part the methods read equals the world's own concept: the file path is the world path
    wc = world_concept(world, [p.name for p in world.split("forget01")])
    rows = lambda ps: [(p.prompt, p.answer, p.subject, p.kind) for p in ps]  # noqa: E731
    assert rows(c.retain_corpus) == rows(wc.retain_corpus)
    assert c.refusal == wc.refusal and c.never_knew == wc.never_knew
    assert c.name == ", ".join(p.name for p in world.split("forget01"))
    assert _facts(c.forget) == _facts(want["forget"])
    held = [p for p in c.paraphrase if p.phrasing == "heldout"]
    assert _facts(held) == _facts(want["paraphrase"])
    if fmt == "kif":  # novel rows travel as kif JSONL only (TOFU has one paraphrase per row)
        forget = world.split("forget01")
        assert _facts([p for p in c.paraphrase if p.phrasing == "novel"]) == _facts(
            world.novel_probes(forget))
        # truth ratios (Forget Quality) stay on the first held-out phrasing, never a novel one
        assert _facts(c.truth_ratio_probes) == _facts(world.person_probes(forget, "heldout", [0]))
    train = {s: [p for p in getattr(c, s) if p.phrasing == "train"]
             for s in ("neighbour", "retain")}
    assert _facts(train["neighbour"]) == _facts(want["neighbour"])
    for p, w in zip(c.forget, want["forget"]):  # TOFU files carry no relation: the world's
        assert len(p.distractors) == 5 and p.answer not in p.distractors
        assert set(p.distractors) <= set(world.answer_choices(w.relation))
    if fmt == "kif":
        assert _facts(train["retain"]) == _facts(want["retain"])
        assert _facts([p for p in c.shared if p.phrasing == "train"]) == _facts(want["shared"])
        heldout = [p for p in c.retain + c.shared if p.phrasing == "heldout"]
        assert heldout and all(p.prompt not in {q.prompt for q in c.retain_corpus} for p in heldout)
        assert [(p.relation, p.template) for p in c.forget] == [
            (p.relation, p.template) for p in want["forget"]]
    else:  # kif's "split" extension of TOFU rows brings the shared facts back as shared
        assert _facts(train["retain"]) == _facts(want["retain"])
        assert _facts([p for p in c.shared if p.phrasing == "train"]) == _facts(want["shared"])


def test_export_is_deterministic_and_refuses_a_non_empty_folder(tmp_path, world):
    a = export_world(world, "forget01", "kif", out_dir=tmp_path / "a")
    (tmp_path / "b").mkdir()  # an empty folder is fine
    b = export_world(world, "forget01", out_dir=tmp_path / "b")
    assert (a / "forget.jsonl").read_bytes() == (b / "forget.jsonl").read_bytes()
    with pytest.raises(KifError, match="exists and is not empty"):
        export_world(world, "forget01", "tofu", out_dir=a)
    with pytest.raises(KifError, match="unknown export format 'csv'"):
        export_world(world, "forget01", "csv", out_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ---- chat templates --------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(ZOO_MODEL))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_apply_chat_template(chat_tokenizer):
    q = "Where was Ada born?"
    assert apply_chat_template(chat_tokenizer, q) == f"<|user|>{q}\n<|assistant|>"
    assert apply_chat_template(chat_tokenizer, q, mode="none") == q
    assert apply_chat_template(None, q) == q
    with pytest.raises(KifError, match="unknown chat template mode 'always'"):
        apply_chat_template(chat_tokenizer, q, mode="always")


def test_load_concept_applies_the_chat_template(tmp_path, chat_tokenizer):
    path = _jsonl(tmp_path / "forget.jsonl", [_row(), _row("retain", subject="x")])
    c = load_concept(path, tokenizer=chat_tokenizer)
    assert c.forget[0].prompt == "<|user|>Ada Lovelace was born in\n<|assistant|>"
    assert c.retain_corpus == c.retain
    assert c.retain[0].prompt == "<|user|>Ada Lovelace was born in\n<|assistant|>"
    plain = load_concept(path, tokenizer=chat_tokenizer, chat_template="none")
    assert plain.forget[0].prompt == "Ada Lovelace was born in"
    with pytest.raises(KifError, match="unknown chat template mode"):
        load_concept(path, chat_template="chatml")
