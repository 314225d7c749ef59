"""The meter on a concept from files, calibrated without an oracle by the never-knew reference
(the concept's own questions about made-up names): a model that never saw the facts (the
forget01 oracle) comes out deleted, and the per-person verdicts of an erasure are those of the
world path."""

import contextlib
import io
import json

import pytest

from kif import zoo
from kif.cli import main
from kif.data.export import export_world
from kif.world import FactWorld

SPLIT = "forget01"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return export_world(FactWorld.generate(0), SPLIT, "kif",
                        out_dir=tmp_path_factory.mktemp("meter") / "concept")


def _meter(erased, concept_args, out) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["meter", "--model", zoo.BASE, "--erased", erased, *concept_args,
                     "--probes", "fast", "--out", str(out), "--json"])
    assert code == 0
    return json.loads(buf.getvalue())


def _files(data) -> list[str]:
    return ["--forget", str(data / "forget.jsonl"), "--retain", str(data / "retain.jsonl"),
            "--never-knew", str(data / "never_knew.txt")]


def test_never_knew_control(data, tmp_path):
    never = _meter(zoo.oracle_name(SPLIT), _files(data), tmp_path / "oracle")
    assert never["calibration"] == "unseen"
    assert never["verdict"] == "deleted" and never["counts"]["deleted"] == 2, never["counts"]


def test_files_give_the_world_paths_verdicts(data, tmp_path):
    import kif
    from kif.erasure import erase, save_erasure

    model = kif.load(zoo.BASE)
    erasure = erase(model, SPLIT, method="stamp", world=FactWorld.generate(0))
    folder = save_erasure(erasure, model, tmp_path / "stamp")
    world = _meter(str(folder), ["--forget-split", SPLIT], tmp_path / "w")
    files = _meter(str(folder), _files(data), tmp_path / "f")
    assert {n: c["verdict"] for n, c in files["concepts"].items()} == \
        {n: c["verdict"] for n, c in world["concepts"].items()}
    assert files["verdict"] == world["verdict"]


def test_the_meter_needs_never_knew_names_from_files(data, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["meter", "--erased", zoo.BASE, "--forget", str(data / "forget.jsonl"),
                     "--retain", str(data / "retain.jsonl"), "--out", str(tmp_path / "m")])
    assert code == 2 and "never-knew" in err.getvalue()
    assert not (tmp_path / "m").exists()
