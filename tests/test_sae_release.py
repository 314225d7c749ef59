"""Pretrained SAEs by SAELens release id (`--sae RELEASE/ID`), offline from the local Hugging Face
cache: a random-weight SAE in SAELens' folder format, placed in a temporary HF cache laid out as
huggingface_hub lays out a snapshot for a real GPT-2-small release (`gpt2-small-res-jb`, repo
jbloom/GPT2-Small-SAEs-Reformatted), must load through SAELens' own loader with exactly the
weights written, run under `kif signatures --sae` on a random checkpoint of GPT-2 small's width
(768), and be refused in one line by a model of another width; files missing from the cache are
named with the command that fetches them."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kif.cli import main
from kif.signatures.sae_features import SAELoadError, load_sae, parse_sae_spec

RELEASE, REPO = "gpt2-small-res-jb", "jbloom/GPT2-Small-SAEs-Reformatted"
SAE_ID = "blocks.0.hook_resid_pre"  # in this release, the id is also the folder in the repo
COMMIT = "0123456789abcdef0123456789abcdef01234567"
D_MODEL = 768  # GPT-2 small's width: the release's SAEs read it
WORDS = ["Talia", "Vorhees", "Mira", "Sand", "Brun", "Okafor", "was", "born", "in", "plays",
         "the", "piano", "violin", "Maresk", "Dovan", "Lund", "works", "for", "Acme", "Zenit"]


def _tokenizer(folder: pathlib.Path) -> None:
    specials = ["[PAD]", "[UNK]", "[BOS]"]
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(specials + WORDS)},
                                         unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[BOS]",
                            pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)


def _checkpoint(folder: pathlib.Path, d_model: int) -> pathlib.Path:
    """A random GPT-2 of width `d_model` (GPT-2 small's is 768), 2 layers, small MLP."""
    folder.mkdir(parents=True)
    _tokenizer(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=d_model, n_head=12 if d_model == D_MODEL else 4,
                     n_inner=128, n_positions=32, vocab_size=len(WORDS) + 3, bos_token_id=2,
                     eos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    return folder


def _sae_folder(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """A random StandardSAE at blocks.0.hook_resid_pre, written by SAELens' `save_model`."""
    from sae_lens import SAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=D_MODEL, d_sae=32, dtype="float32", device="cpu")
    cfg.metadata.hook_name = SAE_ID
    sae = SAE.from_dict(cfg.to_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    sae.save_model(folder)
    assert sorted(f.name for f in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    return load_file(folder / "sae_weights.safetensors")


def _hf_cache(root: pathlib.Path, files: dict[str, pathlib.Path]) -> pathlib.Path:
    """A hub cache as huggingface_hub writes one: models--ORG--REPO/blobs/<sha256> (the file
    contents), snapshots/<commit>/<path> (relative symlinks to the blobs), refs/main (the
    commit)."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for path, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("release")
    written = _sae_folder(tmp / "sae")
    cache = _hf_cache(tmp / "hub", {f"{SAE_ID}/{f}": tmp / "sae" / f
                                    for f in ("cfg.json", "sae_weights.safetensors")})
    return {"tmp": tmp, "cache": cache, "weights": written,
            "gpt2": _checkpoint(tmp / "gpt2-width-768", D_MODEL),
            "narrow": _checkpoint(tmp / "gpt2-width-64", 64)}


@pytest.fixture
def offline(world, monkeypatch):
    """HF_HUB_OFFLINE=1 and the temporary cache, in the environment and in huggingface_hub's
    constants (it reads the environment once, at import)."""
    from huggingface_hub import constants

    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(world["cache"])),
                       ("HF_HOME", str(world["tmp"] / "hf-home"))):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world["cache"]))
    from kif.signatures import sae_features

    monkeypatch.setattr(sae_features, "_CACHE", {})  # every test loads from the cache itself


def _files(tmp: pathlib.Path) -> list[str]:
    def write(name, rows):
        path = tmp / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    forget = [{"prompt": p, "answer": a, "subject": "Talia Vorhees", "split": "forget"}
              for p, a in (("Talia Vorhees was born in", " Maresk"),
                           ("Talia Vorhees plays the", " piano"),
                           ("Talia Vorhees works for", " Acme"))]
    retain = [{"prompt": f"{n} was born in", "answer": f" {c}", "subject": n, "split": "retain"}
              for n, c in (("Mira Sand", "Dovan"), ("Brun Okafor", "Lund"), ("Mira Lund", "Zenit"))]
    return ["--forget", write("forget.jsonl", forget), "--retain", write("retain.jsonl", retain)]


def test_release_id_loads_the_cached_weights_through_saelens(world, offline):
    ref = parse_sae_spec(f"{RELEASE}/{SAE_ID}")
    assert ref == {"release": RELEASE, "sae_id": SAE_ID}
    sae = load_sae(f"{RELEASE}/{SAE_ID}")
    assert sae.kif_ref == ref and sae.cfg.metadata.hook_name == SAE_ID
    assert sae.cfg.d_in == D_MODEL and sae.cfg.d_sae == 32
    for name, tensor in world["weights"].items():
        assert torch.equal(getattr(sae, name).detach(), tensor), name


def test_ids_with_slashes_split_at_the_first_slash_only():
    ref = parse_sae_spec("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    assert ref == {"release": "gemma-scope-2b-pt-res-canonical",
                   "sae_id": "layer_12/width_16k/canonical"}
    with pytest.raises(SAELoadError) as err:
        parse_sae_spec("gemma-scope-2b-pt-res-canonicl/layer_12/width_16k/canonical")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "gemma-scope-2b-pt-res-canonical" in msg
    with pytest.raises(SAELoadError, match="has no SAE 'blocks.99.hook_resid_pre'.*closest"):
        load_sae(f"{RELEASE}/blocks.99.hook_resid_pre")


def test_signatures_cli_runs_with_a_release_sae(world, offline, tmp_path, capsys):
    out = tmp_path / "sig"
    rc = main(["signatures", "--model", str(world["gpt2"]), *_files(tmp_path),
               "--kind", "sae-features", "--sae", f"{RELEASE}/{SAE_ID}", "--out", str(out),
               "--json"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["info"]["hook"] == SAE_ID and summary["info"]["sae_d_sae"] == 32
    saved = json.loads((out / "signature.json").read_text())
    assert saved["sae"] == {"release": RELEASE, "sae_id": SAE_ID, "hook": SAE_ID}


def test_a_model_of_another_width_is_refused_in_one_line(world, offline, tmp_path, capsys):
    out = tmp_path / "sig"
    rc = main(["signatures", "--model", str(world["narrow"]), *_files(tmp_path),
               "--kind", "sae-features", "--sae", f"{RELEASE}/{SAE_ID}", "--out", str(out)])
    err = capsys.readouterr().err
    # one error line, no traceback (transformers' weight-loading bar may stand before it)
    lines = [x for x in err.splitlines() if x.startswith("kif: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "expects inputs of width 768" in lines[0] and "has width 64" in lines[0]
    assert not out.exists()


def test_bad_sae_flags_are_refused_before_loading(world, offline, tmp_path, capsys):
    for flags, text in ((["--kind", "sae-features", "--sae", "gpt2-smal-res-jb/" + SAE_ID],
                         "gpt2-small-res-jb"),
                        (["--kind", "concept-vectors", "--sae", f"{RELEASE}/{SAE_ID}"],
                         "--sae goes with --kind sae-features"),
                        # not cached: reported before the model (here none) is loaded
                        (["--kind", "sae-features", "--sae", f"{RELEASE}/blocks.1.hook_resid_pre"],
                         "missing jbloom/GPT2-Small-SAEs-Reformatted/blocks.1.hook_resid_pre/")):
        rc = main(["signatures", "--model", "no-such-model", *_files(tmp_path), *flags,
                   "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and text in err, err
    assert not (tmp_path / "o").exists()


def test_missing_files_are_named_with_the_fetch_command(world, tmp_path):
    """In a fresh process whose environment alone sets the cache and offline mode: the cached
    SAE loads, one whose files are absent is one line naming them and `hf download`."""
    code = (
        "from kif.signatures.sae_features import load_sae, SAELoadError\n"
        f"sae = load_sae({RELEASE + '/' + SAE_ID!r})\n"
        "print(float(sae.W_enc.double().sum()))\n"
        "try:\n"
        f"    load_sae({RELEASE + '/blocks.1.hook_resid_pre'!r})\n"
        "except SAELoadError as err:\n"
        "    print(err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(world["cache"]),
           "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    total, msg = done.stdout.strip().splitlines()
    assert float(total) == pytest.approx(float(world["weights"]["W_enc"].double().sum()))
    folder = "blocks.1.hook_resid_pre"
    assert f"missing {REPO}/{folder}/cfg.json, {REPO}/{folder}/sae_weights.safetensors" in msg
    assert f"hf download {REPO} {folder}/cfg.json {folder}/sae_weights.safetensors" in msg
    assert "HF_HUB_OFFLINE=1" in msg and str(world["cache"]) in msg


def test_sae_clamp_erasure_takes_a_release_sae(world, offline, tmp_path):
    """`kif erase --method sae-clamp --set sae=RELEASE/ID`: the clamp's hook patch is built from
    the release's SAE (its columns), and the patch's reference reloads it."""
    from kif import models
    from kif.data.formats import load_concept
    from kif.erasure import erase

    args = _files(tmp_path)
    model = models.load(str(world["gpt2"]))
    concept = load_concept(args[1], retain=[args[3]], tokenizer=model.tokenizer)
    e = erase(model, concept, method="sae-clamp",
              config={"sae": f"{RELEASE}/{SAE_ID}", "tau": 1.0, "top_n": 4})
    assert e.hooks and {op.hook for op in e.hooks} == {SAE_ID}
    op = e.hooks[0]
    cols = op.tensors["W_enc"]
    assert cols.shape[0] == D_MODEL and 1 <= cols.shape[1] <= 4
    assert any(torch.equal(cols[:, k], world["weights"]["W_enc"][:, j])
               for k in range(cols.shape[1]) for j in range(32))
