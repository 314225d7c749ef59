"""Settings profiles: the fact world's constants stay the zoo GPT-2's default, `auto` chooses the
site and thresholds on the model, the user's settings win over either, and every erasure records
which constants were chosen on the model and which were carried over."""

import json

import pytest
import torch

from kif import metrics, models, profiles
from kif.cli import main
from kif.erasure import erase
from kif.erasure.suppress import SuppressConfig, calibrated_tau
from kif.world import FactWorld

PERSON = "Miasmar Viahos"


@pytest.fixture(scope="module")
def world() -> FactWorld:
    return FactWorld.generate(0)


@pytest.fixture(scope="module")
def model():
    return models.load("fact-world")


def _acc(model, probes) -> float:
    return float(metrics.score_answers(model, [p.prompt for p in probes],
                                       [p.answer for p in probes]).correct.mean())


def test_default_profile_is_the_fact_world_only_on_the_model_it_was_tuned_on(model):
    assert profiles.default_for(model) == "fact-world"

    class Other(torch.nn.Module):
        kif_name = "my-llama"

    assert profiles.default_for(Other()) == "auto"


def test_user_settings_win_over_the_profile():
    auto = profiles.get("auto")
    assert profiles.configure("suppress", SuppressConfig, auto, None).hook is None
    assert profiles.configure("suppress", SuppressConfig, auto, None).tau is None
    # a mapping: every key the user gave wins, even one equal to the fact-world default
    cfg = profiles.configure("suppress", SuppressConfig, auto, {"tau": 12.0})
    assert cfg.tau == 12.0 and cfg.hook is None
    # fact-world: the config's own defaults
    assert profiles.configure("suppress", SuppressConfig, profiles.get("fact-world"), None) == SuppressConfig()
    with pytest.raises(Exception, match="no setting 'nope'"):
        profiles.configure("suppress", SuppressConfig, auto, {"nope": 1})
    with pytest.raises(Exception, match="unknown settings profile"):
        profiles.get("llama-tuned")


def test_calibrated_tau_sits_between_benign_and_forget_z():
    zb = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    assert 3.0 < calibrated_tau(zb, torch.tensor([20.0, 25.0])) < 15.0
    # overlapping: the benign percentile, so the gate stays shut on benign text
    lo = float(torch.quantile(zb.double(), 0.999))
    assert calibrated_tau(zb, torch.tensor([1.0, 9.0])) == pytest.approx(lo)


def test_auto_suppress_chooses_its_site_and_thresholds_and_still_erases(model, world):
    own = world.person_probes([world.person(PERSON)], "train")
    others = world.person_probes([p for p in world.known() if p.name != PERSON][::9], "train", [0])
    e = erase(model, PERSON, method="suppress", world=world, profile="auto")
    prof = e.info["profile"]
    assert prof["name"] == "auto" and prof["chosen_on_the_model"] == ["hook", "tau"]
    assert "beta" in prof["fact_world_constants"]  # carried over, and said so
    assert e.info["sites_tried"] == 2 * model.cfg.n_layers
    assert e.info["tau"]["calibrated"] and e.hooks[0].params["tau"] != 12.0
    with e.applied(model):
        assert _acc(model, own) <= 0.2
        assert _acc(model, others) >= 0.95


def test_the_fact_world_profile_gives_the_shipped_erasure(model, world):
    a = erase(model, PERSON, method="stamp", world=world)  # the zoo GPT-2's default profile
    b = erase(model, PERSON, method="stamp", world=world, profile="fact-world")
    assert a.info["profile"]["name"] == "fact-world" == b.info["profile"]["name"]
    assert a.info["profile"]["fact_world_constants"]["forget_weight"] == 12.0
    assert a.deltas.keys() == b.deltas.keys()
    for name, d in a.deltas.items():
        for part in ("dense", "a", "b"):
            x, y = getattr(d, part), getattr(b.deltas[name], part)
            assert (x is None and y is None) or torch.equal(x, y)


def test_cli_profile_in_the_report_and_manifest(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["erase", "--concept", PERSON, "--method", "suppress", "--profile", "auto",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"]["name"] == "auto"
    manifest = json.loads((out / "manifest.json").read_text())
    assert "auto" in json.dumps(manifest)
    assert main(["erase", "--concept", PERSON, "--profile", "tuned", "--out",
                 str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_every_carried_constant_is_a_field_of_its_methods_config():
    """A profile names the constants carried over from the fact world; a renamed field would
    leave a manifest listing a setting that no longer exists."""
    import dataclasses

    from kif.erasure.registry import get
    from kif.profiles import PROFILES

    for prof in PROFILES.values():
        for name, fields in prof.carried.items():
            known = {f.name for f in dataclasses.fields(get(name).config)}
            assert set(fields) <= known, (prof.name, name, set(fields) - known)


def test_a_setting_of_the_wrong_type_is_refused_by_name():
    """The settings' types are checked against the config's fields, in the Python API as on the
    command line: a float field takes an int, a tuple field a list; a bool is no number."""
    from kif.erasure.stamp import StampConfig
    from kif.errors import KifError

    prof = profiles.get("auto")
    cfg = profiles.configure("stamp", StampConfig, prof,
                             {"forget_weight": 40, "layers": [1, 2], "opt_stop": None})
    assert cfg.forget_weight == 40 and list(cfg.layers) == [1, 2] and cfg.opt_stop is None
    for bad, message in (({"lam": "small"}, "'lam' takes float, got 'small'"),
                         ({"spread": True}, "'spread' takes int, got True"),
                         ({"forget_weight": "x"}, "'forget_weight' takes float or None")):
        with pytest.raises(KifError, match=message):
            profiles.configure("stamp", StampConfig, prof, bad)
