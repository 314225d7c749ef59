"""`kif bench meter` (issue 15, item 4): the meter's meta-evaluation. The AUC and the robustness
forms on known inputs, and a fast population on the zoo (forget01, two lens probes, one
suppression strength): models that know the concept must outscore models that never knew it."""

import math

import pytest

from kif.cli import main
from kif.meter import meta


def test_auc_counts_ties_as_half():
    assert meta.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert meta.auc([0.1], [0.9]) == 0.0
    assert meta.auc([0.5, 0.9], [0.5]) == 0.75
    with pytest.raises(ValueError):
        meta.auc([], [0.1])


def test_robustness_forms():
    # a change within the noise floor is none
    assert meta.robustness_q(0.40, 0.40 + meta.NOISE / 2) == 1.0
    # quantization that revives a hidden fact (0.1 -> 0.9) is penalized, symmetric in direction
    assert math.isclose(meta.robustness_q(0.1, 0.9), 1 - 0.8 / 1.0)
    assert math.isclose(meta.robustness_q(0.9, 0.1), meta.robustness_q(0.1, 0.9))
    # relearning: the same change as the oracle's is robust, an opposite one is not
    assert meta.robustness_r(0.3, 0.3) == 1.0
    assert meta.robustness_r(0.0, 0.0) == 1.0
    assert meta.robustness_r(0.3, -0.3) == 0.0
    assert math.isclose(meta.robustness_r(0.6, 0.2), 1 - 0.4 / 0.8)
    assert meta.harmonic(1.0, 0.0) == 0.0


@pytest.fixture(scope="module")
def fast():
    return meta.run("fact-world", "forget01", probes=["logit-lens", "answer-rank"], lrs=(),
                    methods=(), strengths=(10.0,), robustness=True, progress=False)


def test_fast_population_separates(fast):
    rows = {(r["source"], r["treatment"]): r for r in fast.rows}
    base = rows[("fact-world", "as trained")]
    oracle = rows[("fact-world-oracle-forget01", "as trained")]
    supp = rows[("fact-world", "output-suppression(10)")]
    supp_oracle = rows[("fact-world-oracle-forget01", "output-suppression(10)")]
    assert [r["label"] for r in (base, supp)] == ["knows", "knows"]
    assert [r["label"] for r in (oracle, supp_oracle)] == ["never-knew", "never-knew"]
    # the guarantee the meta-evaluation rests on: the suppressed model fails at the surface like
    # the oracle does, yet the meter tells them apart
    assert supp["forget_acc"] <= 0.1 and oracle["forget_acc"] <= 0.2
    assert (base["verdict"], supp["verdict"]) == ("intact", "suppressed")
    assert oracle["verdict"] == supp_oracle["verdict"] == "deleted"
    assert fast.auc_model >= 0.95 and fast.auc_concept >= 0.95
    summary = fast.to_dict()["summary"][0]
    assert (summary["knows"], summary["never_knew"], summary["auc_model"]) == (2, 2, fast.auc_model)


def test_fast_robustness(fast):
    b = fast.robustness
    assert b["unlearned_members"] == 1
    for r in fast.rows:
        assert 0.0 <= r["q"] <= 1.0 and 0.0 <= r["r"] <= 1.0
        a = r["attacks"]
        assert a["relearn_shown"] and a["relearn_measured"]
        assert not set(a["relearn_shown"]) & set(a["relearn_measured"])
        assert a["relearn_lr"] == 1e-4  # the zoo's GPT-2: the fact world's rate
    # int4 adds no knowledge to a model that never knew the concept
    oracle = next(r for r in fast.rows if r["label"] == "never-knew")
    assert oracle["attacks"]["int4"]["latent_trace_score"] <= 0.2
    assert 0.0 <= b["hm"] <= 1.0 and b["auc_int4"] >= 0.95
    assert "AUC" in meta.headline(fast)


@pytest.mark.parametrize("argv, needle", [
    (["--probes", "nope"], "unknown probe"),
    (["--lrs", "-1"], "must be positive"),
    (["--lrs", "nan"], "must be positive"),
    (["--probes", "surface"], "reads the latent probes"),
    (["--forget-split", "forget7x"], "unknown split"),
])
def test_bench_meter_bad_input(argv, needle, capsys):
    assert main(["bench", "meter", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
