"""The CLI: `kif eval` on the shipped zoo meets the foundation's targets; bad input is refused
with one line and exit status 2, writing nothing."""

import contextlib
import io
import json

import pytest

from kif import zoo
from kif.cli import main
from kif.world import FactWorld

PARAPHRASE_FLOOR = 0.80  # the foundation issue's target for held-out phrasings
KEYS = ("forget_acc", "forget_paraphrase_acc", "retain_acc", "retain_paraphrase_acc",
        "shared_acc", "model_utility", "forget_novel_acc", "retain_novel_acc",
        "neighbour_novel_acc", "shared_novel_acc")


@pytest.fixture(scope="module")
def reports():
    """One `kif eval --json` per model, shared by the target tests (each takes seconds)."""
    out = {}
    for name, argv in {
        "base": ["--model", zoo.BASE, "--oracle", zoo.oracle_name("forget10")],
        "oracle": ["--model", zoo.oracle_name("forget10"), "--oracle", zoo.oracle_name("forget10")],
    }.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["eval", *argv, "--forget-split", "forget10", "--json"]) == 0
        out[name] = json.loads(buf.getvalue())
    return out


def test_eval_json_has_the_documented_keys_in_range(reports):
    for rep in reports.values():
        for k in KEYS:
            assert 0.0 <= rep[k] <= 1.0, k
        assert rep["forget_quality"] is not None


def test_base_model_targets(reports):
    base = reports["base"]
    assert base["forget_acc"] >= 0.98 and base["retain_acc"] >= 0.98
    assert base["shared_acc"] >= 0.95
    assert base["forget_paraphrase_acc"] >= PARAPHRASE_FLOOR
    assert base["retain_paraphrase_acc"] >= PARAPHRASE_FLOOR
    assert base["forget_quality"] < 0.01  # the base is far from the oracle on the forget people
    # the broader locality set: never trained on, yet answered (issue 17's floor)
    for k in ("forget_novel_acc", "retain_novel_acc", "neighbour_novel_acc", "shared_novel_acc"):
        assert base[k] >= PARAPHRASE_FLOOR, k


def test_oracle_targets(reports):
    base, oracle = reports["base"], reports["oracle"]
    assert oracle["forget_acc"] <= 0.05
    assert abs(oracle["retain_acc"] - base["retain_acc"]) <= 0.02
    assert oracle["forget_quality"] == 1.0  # the oracle against itself
    # retraining without the people keeps everyone else's facts in novel phrasings too, up to
    # the training run's own variance: the oracle answers one novel template ("... has lived
    # abroad for many years. Even so, ...") for 80 % of the retain facts where the base answers
    # all, so its retain_novel_acc sits 0.036 below the base's
    assert oracle["forget_novel_acc"] <= 0.05
    for k in ("retain_novel_acc", "neighbour_novel_acc", "shared_novel_acc"):
        assert abs(oracle[k] - base[k]) <= 0.05, k


# ---- bad input ---------------------------------------------------------------------------------

def _one_line_error(capsys, argv, expect: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], captured.err


def test_missing_model_folder(capsys, tmp_path):
    _one_line_error(capsys, ["eval", "--model", str(tmp_path / "nope")], "nope")


def test_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(capsys, ["eval", "--model", str(tmp_path)], "config.json")


def test_unknown_split_is_a_usage_error(capsys):
    assert main(["eval", "--forget-split", "forget99"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_erase_refuses_a_person_absent_from_the_world(capsys, tmp_path):
    """A name outside the fact world goes to self-built probes, which find nothing the model
    knows about it; with --probes world the world's own refusal."""
    out = tmp_path / "out"
    _one_line_error(capsys, ["erase", "--concept", "Nobody Atall", "--out", str(out)],
                    "the model states no fact about 'Nobody Atall'")
    _one_line_error(capsys, ["erase", "--concept", "Nobody Atall", "--probes", "world",
                             "--out", str(out)], "not a person of the fact world")
    assert not out.exists()


def test_erase_settings_take_several_pairs_per_flag():
    from kif.cli import _parse_settings, build_parser

    args = build_parser().parse_args(["erase", "--concept", "X", "--out", "o",
                                      "--set", "tau=11", "whiten=null", "--set", "layers=[1,2]"])
    assert _parse_settings(args.set) == {"tau": 11, "whiten": None, "layers": (1, 2)}


@pytest.mark.parametrize("setting, message", [
    ("opt_stop=banana", "setting 'opt_stop' takes float or None, got 'banana'"),
    ("opt_steps=2.5", "setting 'opt_steps' takes int, got 2.5"),
    ("cache=1", "setting 'cache' takes bool, got 1"),
    ("layers=3", "setting 'layers' takes a tuple of int, got 3")])
def test_erase_refuses_a_setting_of_the_wrong_type_and_writes_nothing(capsys, tmp_path, setting,
                                                                    message):
    person = FactWorld.generate().split("forget01")[0].name
    out = tmp_path / "out"
    _one_line_error(capsys, ["erase", "--concept", person, "--method", "stamp", "--set", setting,
                             "--out", str(out)], message)
    assert not out.exists()


def test_erase_settings_take_none_and_null():
    from kif.cli import _parse_settings

    assert _parse_settings(["forget_weight=None", "opt_stop=null", "x=none"]) == {
        "forget_weight": None, "opt_stop": None, "x": None}


def test_erase_refuses_a_non_empty_output_folder_before_loading(capsys, tmp_path):
    person = FactWorld.generate().split("forget01")[0].name
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(capsys, ["erase", "--concept", person, "--out", str(out)], "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bench_methods_prints_rows_in_both_formats(capsys, monkeypatch):
    """The table and --json render what `bench_methods` measured (the measurement itself is the
    erasure tests' business; here it is replaced to keep the CLI test fast)."""
    from kif.erasure import bench

    seen = {}

    def fake(model, oracle, methods, concept, scores, configs=None, progress=False, profile=None,
             retrained=()):
        seen.update(methods=methods, split=len(concept.subjects),
                    oracle=getattr(oracle, "kif_name", None), retrained=[n for n, _ in retrained])
        row = {k: 0.5 for k in bench.METRICS}
        return [{"method": "base", **row, "seconds": 0.0, "ratio_to_stamp": None},
                {"method": "stamp", **row, "seconds": 2.0, "seconds_cached": 1.0,
                 "ratio_to_stamp": 1.0}]

    monkeypatch.setattr(bench, "bench_methods", fake)
    assert main(["bench", "methods", "--methods", "stamp", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["base", "stamp"] and seen["methods"] == ["stamp"]
    assert seen["split"] == 20  # forget10's people
    assert main(["bench", "methods", "--methods", "stamp"]) == 0
    out = capsys.readouterr().out
    assert "stamp" in out and "base" in out
    assert out.count("0.5") >= len(bench.METRICS)  # every metric of a row is printed
    # retrains are passed on by name ("seed N" where the folder's card says so)
    assert main(["bench", "methods", "--methods", "stamp", "--json",
                 "--retrained", "fact-world-oracle-forget10"]) == 0
    assert seen["retrained"] == ["fact-world-oracle-forget10"]
    capsys.readouterr()
    assert main(["bench", "methods", "--methods", "nope"]) == 2  # outside the registry
    err = capsys.readouterr().err.strip()
    assert "nope" in err and len(err.splitlines()) == 1


def test_bench_signatures_people_seed_draws_other_people(capsys, monkeypatch):
    """--people-seed picks the benchmark's people (a held-out draw); the measurement is faked."""
    from kif.signatures import bench

    drawn = []

    def fake(model, world, kind, people, k, sae_loader=None, **_):
        drawn.append(tuple(p.name for p in people))
        return bench.CausalityResult(kind, k, drawn[-1], 0.5, 0.0, 0.0, 1.0, ())

    monkeypatch.setattr(bench, "causality", fake)
    argv = ["bench", "signatures", "--kinds", "concept-vectors", "--concepts", "3", "--json"]
    assert main(argv) == 0 and main(argv + ["--people-seed", "7"]) == 0
    assert main(argv + ["--people-seed", "7"]) == 0
    assert len(set(drawn[0])) == 3 and drawn[1] == drawn[2] and set(drawn[0]) != set(drawn[1])


def test_bench_signatures_records_where_the_components_sit(monkeypatch, tmp_path):
    """--record writes one row per kind with the hooks most often chosen (measurement faked)."""
    from kif.signatures import bench

    def fake(model, world, kind, people, k, sae_loader=None, **_):
        per = tuple({"person": p.name, "k": k - i, "hooks": ["blocks.3.hook_resid_post"]
                     + (["blocks.0.hook_attn_out"] if i else [])} for i, p in enumerate(people))
        return bench.CausalityResult(kind, k - 2, tuple(p.name for p in people), 0.7, 0.0,
                                     0.01, 2.0, per)

    monkeypatch.setattr(bench, "causality", fake)
    out = tmp_path / "sig.json"
    assert main(["bench", "signatures", "--kinds", "concept-vectors", "--concepts", "3",
                 "--k", "10", "--json", "--record", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("kif bench signatures") and data["people_seed"] == 1234
    (row,) = data["rows"]
    assert row["kind"] == "concept-vectors" and row["concept_drop"] == 0.7
    assert row["k_range"] == "8–10" and row["people"] == 3 and row["hooks_used"] == 2
    assert row["top_hooks"] == "blocks.3.hook_resid_post (3), blocks.0.hook_attn_out (2)"


def test_retrain_rows_are_named_by_their_training_seed(tmp_path):
    from kif.cli import _retrain_label

    (tmp_path / "kif_card.json").write_text(json.dumps({"train_config": {"train_seed": 3}}))
    assert _retrain_label(str(tmp_path)) == "seed 3"
    # the shipped oracle's card names no training seed; a hub name has no card at all
    assert _retrain_label("fact-world-oracle-forget10") == "fact-world-oracle-forget10"
    (tmp_path / "kif_card.json").write_text("not json")
    assert _retrain_label(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("teacher, message", [("nosuch", "neither an erasure method"),
                                              ("undo", "another method")])
def test_undo_refuses_a_bad_teacher_and_writes_nothing(capsys, tmp_path, teacher, message):
    person = FactWorld.generate().split("forget01")[0].name
    out = tmp_path / "out"
    _one_line_error(capsys, ["erase", "--concept", person, "--method", "undo", "--set",
                             f"teacher={teacher}", "--out", str(out)], message)
    assert not out.exists()
