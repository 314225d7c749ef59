"""kif.models: HF checkpoint <-> hooked model round trips on tiny random checkpoints (no network).

Guarantees checked: hooked logits equal HF's; edits made through the hooked model survive
save -> plain transformers reload; the weight hash is stable and edit-sensitive; input
checkpoints are never overwritten; every load failure is a one-line ModelLoadError.
"""

import json
import pathlib
import shutil
import time

import pytest
import torch

from kif import models
from kif.models import ModelLoadError, ModelSaveError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 200
N_CTX = 64
ATOL = 1e-4

# name -> (folder name, builder key). The GPT-2 folder deliberately contains "llama": TL guesses
# the architecture from such names, and kif must read it from config.json instead.
CHECKPOINTS = {
    "gpt2": "llama-named-gpt2",
    "llama": "tiny-llama-untied",
    "llama-tied": "tiny-llama-tied",
    "qwen2": "tiny-qwen2",
}


def _tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """A WordLevel tokenizer over VOCAB tokens, with bos/eos/pad/unk specials."""
    specials = ["<unk>", "<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - 4)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )


def _hf_model(kind: str) -> "transformers.PreTrainedModel":
    ids = dict(vocab_size=VOCAB, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    llama_dims = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        num_hidden_layers=2, max_position_embeddings=N_CTX, **ids,
    )
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=N_CTX, **ids)
    elif kind in ("llama", "llama-tied"):
        config = transformers.LlamaConfig(tie_word_embeddings=kind == "llama-tied", **llama_dims)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=False, **llama_dims)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # HF initialises norms to 1 and biases to 0; perturb everything so that a mis-mapped norm,
    # bias or transpose changes the logits.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _write_checkpoint(folder: pathlib.Path, kind: str) -> pathlib.Path:
    model = _hf_model(kind)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {kind: _write_checkpoint(root / name, kind) for kind, name in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, pathlib.Path]) -> dict[str, torch.nn.Module]:
    torch.set_num_threads(1)
    return {kind: models.load(path) for kind, path in checkpoints.items()}


def _tokens(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (3, 12), generator=generator)


def _hf_logits(folder: pathlib.Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _assert_one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_hooked_logits_equal_hf(kind, checkpoints, loaded):
    tokens = _tokens()
    with torch.no_grad():
        hooked = loaded[kind](tokens)
    expected = _hf_logits(checkpoints[kind], tokens)
    torch.testing.assert_close(hooked, expected, atol=ATOL, rtol=0)
    model = loaded[kind]
    assert models.architecture(model) == model.kif_hf_config.architectures[0]
    assert model.kif_source == str(checkpoints[kind])
    assert model.kif_name == checkpoints[kind].name
    # Canonical TL hook names are what every other kif module keys on.
    assert "blocks.1.hook_resid_post" in model.hook_dict
    assert "blocks.0.mlp.hook_post" in model.hook_dict


def test_folder_name_does_not_pick_architecture(loaded):
    assert "llama" in loaded["gpt2"].kif_name
    assert models.architecture(loaded["gpt2"]) == "GPT2LMHeadModel"
    assert loaded["gpt2"].cfg.normalization_type == "LN"


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_edit_survives_save_and_reload(kind, checkpoints, tmp_path):
    model = models.load(checkpoints[kind])
    before = models.weight_hash(model)
    with torch.no_grad():
        model.blocks[0].mlp.W_out[3] += 1.0
        model.blocks[1].attn.W_Q[1, 5] -= 0.5
        if kind != "gpt2":  # a grouped-query K head: TL stores it as _W_K
            model.blocks[0].attn._W_K[1, 2] += 0.7
        if kind == "qwen2":
            model.blocks[1].attn.b_Q[0] += 0.3
        if kind == "llama-tied":  # an unembedding-only edit: must be exported untied
            model.unembed.W_U[:, 7] += 1.0
    assert models.weight_hash(model) != before
    tokens = _tokens(2)
    with torch.no_grad():
        edited = model(tokens)
    out = models.save(model, tmp_path / "edited")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # written back byte for byte
        assert (out / name).read_bytes() == (checkpoints[kind] / name).read_bytes()
    torch.testing.assert_close(_hf_logits(out, tokens), edited, atol=ATOL, rtol=0)
    # The edit really changed the model (not a vacuous pass).
    assert (_hf_logits(checkpoints[kind], tokens) - edited).abs().max() > 1e-2
    reloaded = models.load(out)
    assert models.weight_hash(reloaded) == models.weight_hash(model)
    assert reloaded.tokenizer is not None


def test_save_refuses_source_and_nonempty_dir(checkpoints, loaded, tmp_path):
    model = loaded["gpt2"]
    source = checkpoints["gpt2"]
    listing = sorted(p.name for p in source.iterdir())
    with pytest.raises(ModelSaveError, match="loaded from") as excinfo:
        models.save(model, source, overwrite=True)
    _assert_one_line_error(excinfo)
    with pytest.raises(ModelSaveError, match="loaded from"):
        models.save(model, source / "inside", overwrite=True)
    with pytest.raises(ModelSaveError, match="loaded from"):
        models.save(model, source.parent, overwrite=True)  # would delete the source
    assert sorted(p.name for p in source.iterdir()) == listing

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ModelSaveError, match="not empty"):
        models.save(model, occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]  # no temp folder left

    out = models.save(model, occupied, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_save_refuses_unexportable_edit(loaded, tmp_path):
    model = models.load(loaded["llama"].kif_source_dir)
    with torch.no_grad():
        model.blocks[0].attn.b_O[0] = 1.0  # Llama has no o_proj bias
    with pytest.raises(ModelSaveError, match="b_O"):
        models.save(model, tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_weight_hash_stable_and_edit_sensitive(checkpoints):
    a = models.load(checkpoints["qwen2"])
    b = models.load(checkpoints["qwen2"])
    assert models.weight_hash(a) == models.weight_hash(b)
    assert len(models.weight_hash(a)) == 64
    with torch.no_grad():
        b.blocks[1].ln2.w[0] += 1e-3
    assert models.weight_hash(a) != models.weight_hash(b)


def _corrupt(folder: pathlib.Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 10)


def _pickle_only(folder: pathlib.Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pretend pickle")


def _no_config(folder: pathlib.Path) -> None:
    (folder / "config.json").unlink()


def _foreign_config(folder: pathlib.Path) -> None:
    (folder / "config.json").write_text("<html>not json</html>")


def _unsupported_arch(folder: pathlib.Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["XForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_corrupt, "cannot read weights"),
        (_pickle_only, "pickle"),
        (_no_config, "no config.json"),
        (_foreign_config, "not a valid JSON config"),
        (_unsupported_arch, "unsupported architecture 'XForCausalLM'"),
    ],
)
def test_load_errors_are_one_line(damage, match, tmp_path):
    folder = _write_checkpoint(tmp_path / "ckpt", "gpt2")
    damage(folder)
    with pytest.raises(ModelLoadError, match=match) as excinfo:
        models.load(folder)
    _assert_one_line_error(excinfo)


def test_load_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file") as excinfo:
        models.load(tmp_path / "absent")
    _assert_one_line_error(excinfo)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ModelLoadError, match="not a checkpoint folder"):
        models.load(a_file)


def test_load_unreachable_hub_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="nonexistent-org/nonexistent-model") as excinfo:
        models.load("nonexistent-org/nonexistent-model")
    assert time.monotonic() - start < 10
    message = _assert_one_line_error(excinfo)
    assert "hub" in message


def test_zoo_names_resolve_first(checkpoints, monkeypatch, tmp_path):
    zoo = pytest.importorskip("kif.zoo")
    from kif import integrity

    shipped = shutil.copytree(checkpoints["gpt2"], tmp_path / "shipped")
    folders = {"tiny-zoo-model": shipped, "unbuilt-zoo-model": tmp_path / "unbuilt"}
    monkeypatch.setattr(zoo, "resolve", folders.get)
    with pytest.raises(ModelLoadError, match="no kif_sha256.json") as excinfo:
        models.load("tiny-zoo-model")  # package data is sealed; an unsealed folder is refused
    _assert_one_line_error(excinfo)
    integrity.write_sums(shipped)
    model = models.load("tiny-zoo-model")
    assert (model.kif_source, model.kif_name) == ("tiny-zoo-model", "tiny-zoo-model")
    with pytest.raises(ModelSaveError, match="loaded from"):  # zoo checkpoints are inputs too
        models.save(model, shipped, overwrite=True)
    with pytest.raises(ModelLoadError, match="not built") as excinfo:
        models.load("unbuilt-zoo-model")
    _assert_one_line_error(excinfo)
