"""`kif bench sequential`: erasure requests one after another on the model the previous ones
left (the short form of the reliability campaign's long sequences; the full 100-request run is
`kif bench sequential --requests 100`, its figures in the README)."""

import json

import pytest

from kif import bench_sequential as bsq
from kif import models
from kif.cli import main
from kif.world import FactWorld


@pytest.fixture(scope="module")
def world():
    return FactWorld.generate(0)


def test_sequential_stamp_requests_keep_earlier_erasures_and_the_rest(world, tmp_path):
    model = models.load("fact-world")
    before = models.weight_hash(model)
    people = bsq.request_people(world, 3)
    assert people[:2] == [p.name for p in world.split("forget10")][:2]
    r = bsq.run_sequential(model, world, "stamp", people, utility_every=0,
                           oracle_forget_acc=0.03)
    assert models.weight_hash(model) == before  # every request removed, bit for bit
    rows = r["rows"]
    assert [row["request"] for row in rows] == [0, 1, 2, 3]
    base = rows[0]
    for row in rows[1:]:
        # what no request touched stays within the campaign's bar after every request
        assert row["retain_acc"] >= base["retain_acc"] - bsq.SLACK_KEEP
        assert row["shared_acc"] >= base["shared_acc"] - bsq.SLACK_KEEP
    # the first two people stay forgotten through the later requests
    assert rows[2]["forget_acc"] <= 0.05
    assert r["per_person_forget_acc"][people[0]] <= 0.05
    assert r["per_person_forget_acc"][people[1]] <= 0.05
    s = r["summary"]
    assert s["keep_targets_met"] and s["worst_retain_acc"] == min(x["retain_acc"] for x in rows[1:])
    assert s["targets_met"] == (not s["people_above_forget_bar"])
    bsq.plot_sequential(r, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--requests", "0"], "between 1 and"),
    (["--requests", "500"], "between 1 and"),
    (["--utility-every", "-1"], "at least 0"),
    (["--set", "no_such_setting=1"], "no_such_setting"),
])
def test_bad_sequential_requests_are_one_line(argv, message, capsys, tmp_path):
    assert main(["bench", "sequential", *argv, "--record", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()  # nothing written
