"""Self-built probes (`kif probes`, `kif erase --probes auto`): facts elicited from the model given
only a name, checked against the fact world's ground truth, which the elicitation never reads."""

import json
import unicodedata

import numpy as np
import pytest

from kif import metrics
from kif.cli import main
from kif.data import elicit as el
from kif.data.formats import load_concept, read_kif_jsonl
from kif.data.selfbuilt import build, write_probes
from kif.erasure.registry import erase
from kif.errors import KifError
from kif.models import load
from kif.world import FactWorld

# a cheaper elicitation than the default (no sampled continuations, fewer retain subjects): the
# guarantees below hold for it too
FAST = el.ElicitConfig(samples=0, neighbours=2, retain_subjects=6)


@pytest.fixture(scope="module")
def world():
    return FactWorld.generate(0)


@pytest.fixture(scope="module")
def model():
    return load("fact-world")


@pytest.fixture(scope="module")
def built(model, world):
    """The concept of one forget10 person (the people the forget10 oracle never saw), from the
    name alone."""
    return build(model, [world.split("forget10")[3].name], config=FAST)


def _acc(model, probes) -> float:
    return float(metrics.score_answers(model, [p.prompt for p in probes],
                                       [p.answer for p in probes]).correct.mean())


def _true_facts(person, facts):
    truth = {v.strip() for v in person.attributes.values()}
    found = {t for t in truth for f in facts if f.answer.strip().endswith(t)}
    false = [f.answer for f in facts if not any(f.answer.strip().endswith(t) for t in truth)]
    return found, false


def test_names_and_topics():
    assert el.check_name("  Ada   Lovelace ") == "Ada Lovelace"
    with pytest.raises(KifError, match="not a name.*--forget FILE"):
        el.check_name("bioweapons")
    made = el.made_up_names(["Tougus Sufi"], 8)
    assert len(set(made)) == 8 and all(len(m.split()) == 2 for m in made)
    assert not {w.lower() for m in made for w in m.split()} & {"tougus", "sufi"}
    texts = ["x. Question: What does Bevia Brinhos do", "Bevia Brinhos and Voubour Velsos met.",
             "Tell me about Tougus Sufi.", "cut at the end Zalni Reg"]
    assert el.names_in(texts, "Tougus Sufi", exclude=["Tougus Sufi"]) == [
        "Bevia Brinhos", "Voubour Velsos"]


def test_token_matches_and_sampling(model):
    prompts = ["Tougus Sufi competes in the sport of", "Tougus Sufi works in the profession of"]
    greedy = metrics.greedy_generate_ids(model, prompts, 3)
    assert [m.all() for m in metrics.token_matches(model, prompts, greedy)] == [True, True]
    wrong = [[t + 1 for t in g] for g in greedy]
    assert not any(m.any() for m in metrics.token_matches(model, prompts, wrong))
    # repeated (prompt, continuation) pairs run once and come back in order, each its own array
    mixed = metrics.token_matches(model, prompts * 2 + prompts, greedy * 2 + wrong)
    assert [m.all() for m in mixed] == [True] * 4 + [False] * 2
    mixed[0][:] = False
    assert mixed[2].all()
    a = metrics.greedy_generate_ids(model, prompts * 4, 6, temperature=1.0, seed=3)
    b = metrics.greedy_generate_ids(model, prompts * 4, 6, temperature=1.0, seed=3)
    assert a == b  # seeded: reproducible
    with pytest.raises(ValueError):
        metrics.greedy_generate_ids(model, prompts, 2, temperature=-1.0)


def test_elicitation_finds_the_facts_and_nothing_false(model, world):
    """The guarantee of self-built probes: the world's facts of a person, found from the name
    alone, and no kept fact the world does not hold."""
    people = world.split("retain")[:2]
    for person in people:
        got = el.elicit(model, [person.name], FAST)
        found, false = _true_facts(person, got.kept())
        assert len(found) >= 4, (person.name, [f.answer for f in got.kept()])
        assert not false, false
        assert all(f.reason for f in got.facts)
        assert any(not f.kept for f in got.facts)  # candidates were rejected, with evidence


def test_a_name_the_model_does_not_know(model):
    with pytest.raises(KifError, match="states no fact about 'Quorvex Blandish'"):
        build(model, ["Quorvex Blandish"], config=FAST)


@pytest.mark.parametrize("name, needle", [
    ("", "an empty name"),
    ("A" * 500, "too long for a name"),
    # letters the model never saw: it maps such names to one stock profile, which made-up names
    # in the same script also get; that is no knowledge of the name
    ("Zoë Ångström", "states no fact about 'Zoë Ångström'"),
])
def test_bad_names_are_one_line_and_write_nothing(name, needle, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["probes", "--concept", name, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_made_up_names_keep_the_script():
    made = el.made_up_names(["Zoë Ångström"], 6)
    assert len(set(made)) == 6
    assert all(not m.isascii() and len(m) == len("Zoë Ångström") for m in made)
    cyr = el.made_up_names(["Иван Петров"], 3)
    assert all("CYRILLIC" in unicodedata.name(c) for m in cyr for c in m if c.isalpha())
    # a word without letters stays; the others still vary
    for name in ("Café №5", "Apollo 11"):
        made = el.made_up_names([name], 6)
        assert len(set(made)) == 6 and all(m.split()[1] == name.split()[1] for m in made)
    with pytest.raises(KifError, match="too few letters"):
        el.made_up_names(["№5"], 6)


def test_probes_file_round_trip(built, tmp_path):
    sb = built
    path, names = write_probes(sb, tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert any(r["keep"] is False for r in rows if "keep" in r)  # the rejected, for review
    assert all("evidence" in r for r in rows)
    c = load_concept(path, never_knew=names)
    assert len(c.forget) == len(sb.concept.forget) and c.refusal.target == " unknown"
    assert c.never_knew.names == sb.concept.never_knew.names
    # a reviewer drops a fact: its rows are no longer forget probes
    dropped = rows[0]["answer"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps({**r, "keep": False} if r["answer"] == dropped and
                                         r["split"] == "forget" else r) + "\n" for r in rows))
    assert all(p.answer != dropped for p in read_kif_jsonl(edited)["forget"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "keep": "yes"}) + "\n")
    with pytest.raises(KifError, match="field 'keep' must be true or false"):
        read_kif_jsonl(bad)


def test_erase_by_name_deletes_the_person_and_keeps_the_others(model, world, built):
    """stamp on a concept built from the name alone, scored on the world's own probes, which the
    elicitation never read: the person's facts fail in the world's training and held-out
    phrasings, other people's and the shared facts hold."""
    person = world.person(built.concept.subjects[0])
    sets = {"forget": world.person_probes([person], "train"),
            "heldout": world.person_probes([person], "heldout"),
            "retain": world.person_probes(world.split("retain")[:40], "train", [0]),
            "shared": world.shared_probes("train", [0])}
    base = {k: _acc(model, ps) for k, ps in sets.items()}
    e = erase(model, built.concept, method="stamp")
    with e.apply(model):
        after = {k: _acc(model, ps) for k, ps in sets.items()}
    assert base["forget"] == 1.0 and after["forget"] <= 0.1, after
    assert after["heldout"] <= 0.15, after
    assert after["retain"] >= base["retain"] - 0.02, after
    assert after["shared"] >= base["shared"] - 0.02, after


def test_cli(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    name = FactWorld.generate(0).split("retain")[1].name
    fast = ["--probe-set", "samples=0", "neighbours=1", "retain_subjects=0"]
    assert main(["probes", "--concept", name, "--out", str(out), "--json", *fast]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["out"] == str(out) and len(s["targets"][name]["kept"]) >= 4
    assert (tmp_path / "p.jsonl.never-knew.txt").exists()
    before = out.read_bytes()
    assert main(["probes", "--concept", name, "--out", str(out)]) == 2  # never overwritten
    assert out.read_bytes() == before
    err = capsys.readouterr().err
    assert "exists" in err and len(err.strip().splitlines()) == 1
    assert main(["probes", "--concept", "bioweapons", "--out", str(tmp_path / "t.jsonl")]) == 2
    assert main(["probes", "--concept", name, "--out", str(tmp_path / "u.jsonl"),
                 "--probe-set", "nope=1"]) == 2
    assert main(["erase", "--concept", name, "--probes", "auto", "--retain", str(out),
                 "--out", str(tmp_path / "e")]) == 2
    assert main(["erase", "--forget-split", "forget01", "--neighbours", name,
                 "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "t.jsonl").exists() and not (tmp_path / "e").exists()
    assert "goes with" in capsys.readouterr().err


def test_meter_audits_by_name_with_self_built_probes(tmp_path, capsys):
    """`kif meter --concept NAME` on a name with no world probes behind it: the probes come from
    the base model, and the base audited against itself is intact."""
    name = FactWorld.generate(0).split("retain")[2].name
    out = tmp_path / "m"
    assert main(["meter", "--erased", "fact-world", "--concept", name, "--concept-probes",
                 "auto", "--probes", "fast", "--out", str(out), "--json", "--probe-set",
                 "samples=0", "neighbours=1", "retain_subjects=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "intact"
    assert (out / "report.md").read_text().strip()
    assert main(["meter", "--erased", "fact-world", "--forget-split", "forget01",
                 "--concept-probes", "auto", "--out", str(tmp_path / "n")]) == 2
    assert "--concept-probes goes with --concept" in capsys.readouterr().err
    assert main(["meter", "--erased", "fact-world", "--forget-split", "forget01",
                 "--probe-set", "samples=0", "--out", str(tmp_path / "n")]) == 2
    assert "goes with self-built probes" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_batch_of_targets_by_name(tmp_path, capsys, world):
    """`kif erase --concept A B --probes auto`: one edit, each target reported on its own."""
    names = [p.name for p in world.split("forget10")[4:6]]
    out = tmp_path / "e"
    assert main(["erase", "--concept", *names, "--probes", "auto", "--method", "stamp",
                 "--out", str(out), "--json", "--probe-set", "samples=0", "neighbours=1",
                 "retain_subjects=4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["per_target"]) == set(names)
    assert all(d["forget_acc"] <= 0.1 for d in report["per_target"].values()), report["per_target"]
    assert report["retain_acc"] >= 0.9 and report["probes"]["refusal"] == " unknown"
    assert "Per target" in (out / "report.md").read_text()


def test_bench_probes_scores_against_the_world(tmp_path, capsys):
    rec = tmp_path / "r.json"
    assert main(["bench", "probes", "--people", "1", "--erase", "0", "--json",
                 "--record", str(rec)]) == 0
    r = json.loads(capsys.readouterr().out)
    row = r["elicitation"][0]
    assert row["facts"] == 6 and row["found"] >= 4 and row["false"] == []
    assert r["summary"]["people_with_4_of_6"] == 1
    assert json.loads(rec.read_text())["command"].startswith("kif bench probes")
    assert main(["bench", "probes", "--people", "0"]) == 2
