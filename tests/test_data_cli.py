"""Concepts from files: the fact world exported as kif JSONL or TOFU and read back gives the same
erasure as the world path (`kif erase --forget FILE` is `kif erase --forget-split` for the world's
own files); `kif eval --forget` prints the keys the files allow; bad files, unknown facts and
missing parts are refused in one line, exit status 2, nothing written."""

import contextlib
import io
import json

import pytest
import torch

import kif
from kif import zoo
from kif.cli import main
from kif.data.export import export_world
from kif.data.formats import load_concept
from kif.erasure import erase
from kif.world import FactWorld

SPLIT = "forget01"


@pytest.fixture(scope="module")
def world():
    return FactWorld.generate(0)


@pytest.fixture(scope="module")
def model():
    return kif.load(zoo.BASE)


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    """forget01 in both formats: fmt -> (forget, [retain files], neighbour, never-knew names)."""
    out = {}
    for fmt, ext in (("kif", "jsonl"), ("tofu", "json")):
        d = export_world(world, SPLIT, fmt, out_dir=tmp_path_factory.mktemp(fmt) / "concept")
        retain = [d / f"retain.{ext}"] + ([d / "refusal.jsonl"] if fmt == "tofu" else [])
        out[fmt] = (d / f"forget.{ext}", retain, d / f"neighbour.{ext}", d / "never_knew.txt")
    return out


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _file_args(f) -> list[str]:
    forget, retain, neighbour, names = f
    return ["--forget", str(forget), "--retain", *map(str, retain), "--neighbour", str(neighbour),
            "--never-knew", str(names)]


@pytest.mark.parametrize("fmt", ["kif", "tofu"])
def test_stamp_from_files_is_the_world_path(model, world, files, fmt):
    """Every part STAMP reads (forget prompts, retain corpus, refusal prompts) comes back from the
    files exactly, so the edit is the same to the bit."""
    forget, retain, neighbour, names = files[fmt]
    concept = load_concept(forget, retain, neighbour, never_knew=names)
    by_file = erase(model, concept, method="stamp", config={"cache": False})
    by_world = erase(model, SPLIT, method="stamp", world=world, config={"cache": False})
    assert by_file.deltas.keys() == by_world.deltas.keys()
    for name, d in by_file.deltas.items():
        like = dict(model.named_parameters())[name]
        assert torch.equal(d.value(like), by_world.deltas[name].value(like)), name


def test_eval_from_files_prints_the_keys_the_files_allow(files):
    code, out, _ = _run(["eval", "--model", zoo.BASE, *_file_args(files["kif"]), "--json"])
    assert code == 0
    rep = json.loads(out)
    for k in ("forget_acc", "forget_paraphrase_acc", "retain_acc", "retain_paraphrase_acc",
              "neighbour_acc", "shared_acc", "shared_paraphrase_acc", "model_utility",
              "forget_truth_ratio_median"):
        assert 0.0 <= rep[k] <= 1.0 or k == "forget_truth_ratio_median", k
    assert rep["forget_acc"] == 1.0 and rep["retain_acc"] >= 0.98
    # people the world does not contain and an oracle: not in the files, so absent, not zero
    assert "unknown_acc" not in rep and "forget_quality" not in rep


def test_erase_from_files_forgets_and_keeps(files, tmp_path):
    out = tmp_path / "erased"
    code, text, err = _run(["erase", "--model", zoo.BASE, *_file_args(files["kif"]),
                            "--method", "stamp", "--out", str(out), "--json"])
    assert code == 0, err
    rep = json.loads(text)
    assert rep["forget_acc"] <= 0.1 and rep["retain_acc"] >= 0.97 and rep["shared_acc"] >= 0.97
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _refused(argv, out, *needles):
    code, _, err = _run(argv)
    assert code == 2
    # one error line, no traceback (transformers' weight-loading bar may stand before it)
    lines = [x for x in err.splitlines() if x.startswith("kif: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()


def test_bad_files_are_refused_in_one_line(files, tmp_path, world):
    forget, retain, neighbour, names = files["kif"]
    out = tmp_path / "out"
    row = json.loads(forget.read_text().splitlines()[0])
    bad = _write(tmp_path / "bad.jsonl", [row, row, "{not json"])
    _refused(["erase", "--forget", str(bad), "--retain", str(retain[0]), "--out", str(out)],
             out, "bad.jsonl:3:")
    empty = _write(tmp_path / "empty.jsonl", [{**row, "split": "retain"}])
    _refused(["erase", "--forget", str(empty), "--out", str(out)], out, "no forget prompts")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\x00\x00")
    _refused(["erase", "--forget", str(weights), "--out", str(out)], out, "model.safetensors")
    _refused(["erase", "--forget-split", SPLIT, "--retain", str(retain[0]), "--out", str(out)],
             out, "--retain goes with --forget")


def test_what_the_model_does_not_know_is_not_erased(files, tmp_path):
    forget, retain, _, _ = files["kif"]
    rows = [json.loads(x) for x in forget.read_text().splitlines()]
    wrong = _write(tmp_path / "wrong.jsonl",
                   [{**r, "answer": " Nowhere"} for r in rows if r["split"] == "forget"])
    out = tmp_path / "out"
    _refused(["erase", "--forget", str(wrong), "--retain", str(retain[0]), "--method", "stamp",
              "--out", str(out)], out, "does not know", "nothing to erase")


def test_a_missing_part_names_what_to_pass(files, tmp_path):
    forget, retain, _, names = files["kif"]
    out = tmp_path / "out"
    no_refusal = _write(tmp_path / "retain.jsonl", [
        x for x in retain[0].read_text().splitlines() if json.loads(x)["split"] != "refusal"])
    _refused(["erase", "--forget", str(forget), "--retain", str(no_refusal), "--method", "stamp",
              "--out", str(out)], out, "stamp needs", "--refusal")
    _refused(["erase", "--forget", str(forget), "--method", "stamp", "--out", str(out)], out,
             "stamp needs", "retain corpus")
    rows = [json.loads(x) for x in forget.read_text().splitlines()]
    no_subject = _write(tmp_path / "anon.jsonl", [{**r, "subject": "Somebody Else"} for r in rows])
    _refused(["erase", "--forget", str(no_subject), "--retain", str(retain[0]), "--never-knew",
              str(names), "--method", "kif", "--out", str(out)], out, "kif needs", "subject")
