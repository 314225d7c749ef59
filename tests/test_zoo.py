"""The zoo: a tiny rebuild is loadable and reproducible; the shipped models meet their targets."""

import json
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from kif import models, zoo
from kif.cli import main
from kif.zoo.build import TrainConfig, build

TINY = TrainConfig(steps=4, vocab_size=400, n_layer=1, n_embd=32, n_head=2, n_inner=64,
                   batch_size=4, row_len=64, warmup=2)


def test_tiny_build_is_loadable_and_bit_for_bit_reproducible(tmp_path):
    name = zoo.oracle_name("forget01")
    build([name], tmp_path / "a", TINY, show_progress=False)
    build([name], tmp_path / "b", TINY, show_progress=False)
    a, b = tmp_path / "a" / name, tmp_path / "b" / name
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    card = json.loads((a / "kif_card.json").read_text())
    assert card["forget_split"] == "forget01" and card["excluded_people"] == 2
    hf = AutoModelForCausalLM.from_pretrained(a)
    assert next(hf.parameters()).dtype == torch.float16  # shipped compact
    hooked = models.load(a)
    assert hooked.cfg.n_layers == 1 and hooked.cfg.d_mlp == 64
    # a model trained for a few steps on other settings must differ: the bytes carry the recipe
    build([name], tmp_path / "c", TrainConfig(**{**TINY.__dict__, "seed": 1}), show_progress=False)
    assert (tmp_path / "c" / name / "model.safetensors").read_bytes() != \
        (a / "model.safetensors").read_bytes()
    # a retrain with another training seed: the same world and tokenizer, other weights; the
    # world's own seed given explicitly is the default recipe, bit for bit
    for sub, train_seed in (("d", 1), ("e", 0)):
        build([name], tmp_path / sub, TrainConfig(**{**TINY.__dict__, "train_seed": train_seed}),
              show_progress=False)
        assert (tmp_path / sub / name / "tokenizer.json").read_bytes() == \
            (a / "tokenizer.json").read_bytes()
    assert (tmp_path / "d" / name / "model.safetensors").read_bytes() != \
        (a / "model.safetensors").read_bytes()
    assert (tmp_path / "e" / name / "model.safetensors").read_bytes() == \
        (a / "model.safetensors").read_bytes()


def test_unknown_zoo_name_is_refused(tmp_path, capsys):
    assert main(["zoo", "build", "--only", "no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown zoo model 'no-such-model'" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_retrain_with_another_seed_never_replaces_the_shipped_model(capsys):
    name = zoo.oracle_name("forget01")
    before = (zoo.ZOO_DIR / name / "model.safetensors").stat().st_mtime_ns
    assert main(["zoo", "build", "--only", name, "--train-seed", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1
    assert (zoo.ZOO_DIR / name / "model.safetensors").stat().st_mtime_ns == before


def test_zoo_list_json(capsys):
    assert main(["zoo", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(zoo.ENTRIES)
    assert all(r["built"] for r in rows), "the zoo ships built; run `kif zoo build`"
    total_mb = sum(r["megabytes"] for r in rows)
    saes_mb = sum(f.stat().st_size for f in (zoo.ZOO_DIR / "saes").rglob("*") if f.is_file()) / 2**20
    # the budget for every shipped model, the Llama twin and the SAEs included
    assert total_mb + saes_mb <= 60, f"shipped models take {total_mb + saes_mb:.1f} MiB (<= 60)"


def test_the_llama_twin_loads_and_is_a_llama():
    from kif import models

    for name in (zoo.LLAMA_BASE, zoo.oracle_name("forget10", zoo.LLAMA_BASE)):
        m = models.load(name)
        assert models.architecture(m) == "LlamaForCausalLM"
        assert m.cfg.n_key_value_heads == 2 and m.cfg.n_heads == 4
        assert m.cfg.positional_embedding_type == "rotary" and m.cfg.normalization_type == "RMS"
    assert zoo.oracle_for("forget10", zoo.LLAMA_BASE) == "fact-world-llama-oracle-forget10"
    assert zoo.base_of("fact-world-llama-oracle-forget10") == zoo.LLAMA_BASE


def test_shipped_models_are_package_data():
    for name in zoo.ENTRIES:
        path = zoo.resolve(name)
        assert path is not None and pathlib.Path(path).is_relative_to(zoo.ZOO_DIR)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= \
            {p.name for p in path.iterdir()}


def test_one_erasure_on_the_llama_twin():
    """The twin knows the world's people, and the suppression capsule under the `auto` profile
    (the twin is not the model the fact-world constants were measured on: its site and each
    gate's threshold are chosen on the twin; here among layer 3's two sites, to keep the test
    short) erases one while others keep their facts."""
    from kif import metrics, models
    from kif.erasure import erase
    from kif.world import FactWorld

    world = FactWorld.generate(0)
    model = models.load(zoo.LLAMA_BASE)
    person = world.split("forget01")[0]
    own = world.person_probes([person], "train")
    others = world.person_probes([p for p in world.known() if p.name != person.name][::12],
                                 "train", [0])

    def acc(probes):
        return float(metrics.score_answers(model, [p.prompt for p in probes],
                                           [p.answer for p in probes]).correct.mean())

    assert acc(own) >= 0.9 and acc(others) >= 0.95
    e = erase(model, person.name, method="suppress", world=world, config={"layer": 3})
    assert e.info["profile"]["name"] == "auto" and e.info["tau"]["calibrated"]
    before = models.weight_hash(model)
    with e.applied(model):
        assert acc(own) <= 0.2
        assert acc(others) >= 0.95
    assert models.weight_hash(model) == before
