"""The reliability campaign's short form (the full one: `kif bench reliability`), and the
pieces it stands on: checksums, staged writes, the sweep of dead writers' staging folders."""

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys

import pytest

from kif import integrity
from kif.errors import KifError


def test_checksums_catch_any_changed_byte_and_a_changed_seal(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(range(256)))
    (tmp_path / "b.json").write_text('{"x": 1}')
    integrity.write_sums(tmp_path)
    integrity.verify(tmp_path)
    data = bytearray((tmp_path / "a.bin").read_bytes())
    data[100] ^= 1
    (tmp_path / "a.bin").write_bytes(bytes(data))
    with pytest.raises(integrity.IntegrityError, match="a.bin does not match"):
        integrity.verify(tmp_path)
    integrity.write_sums(tmp_path)
    sums = json.loads((tmp_path / integrity.SUMS).read_text())
    sums["files"]["a.bin"] = "0" * 64  # edited without its seal
    (tmp_path / integrity.SUMS).write_text(json.dumps(sums))
    with pytest.raises(integrity.IntegrityError, match="seal"):
        integrity.verify(tmp_path)
    (tmp_path / integrity.SUMS).unlink()
    with pytest.raises(integrity.IntegrityError, match="no kif_sha256.json"):
        integrity.verify(tmp_path)


def test_a_dead_writers_staging_folder_is_swept_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out, host = tmp_path / "out", integrity.HOST
    (tmp_path / f".out.kif-{host}-{dead.pid}-abc").mkdir()
    (tmp_path / f".out.kif-{host}-{os.getpid()}-mine").mkdir()
    (tmp_path / f".out.kif-0123abcd-{dead.pid}-other-machine").mkdir()  # its pid means nothing here
    (tmp_path / ".other.kif-1-x").mkdir()
    stage = integrity.stage(out)
    left = {p.name for p in tmp_path.iterdir()}
    assert f".out.kif-{host}-{dead.pid}-abc" not in left
    assert {f".out.kif-{host}-{os.getpid()}-mine", f".out.kif-0123abcd-{dead.pid}-other-machine",
            ".other.kif-1-x", stage.name} <= left


def test_a_previous_output_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """A replacing writer killed between moving the old folder aside and renaming the new one
    in leaves `out` absent; the next write to `out` restores the old folder first."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    aside = tmp_path / f".out.kif-{integrity.HOST}-{dead.pid}-old-xyz"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "f").write_text("previous")
    integrity.stage(out)
    assert (out / "f").read_text() == "previous" and not aside.exists()


def test_a_signature_never_replaces_a_folder_of_other_work(tmp_path):
    import torch

    from kif.signatures.base import Signature, SignatureError

    sig = Signature(concept="c", kind="concept-vectors", model_name="m", model_hash="h",
                    dims={"d_model": 2}, component="direction", component_hooks=("blocks.0.x",),
                    scores=torch.ones(1), directions=torch.ones(1, 2))
    work = tmp_path / "results"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(SignatureError, match="notes.txt"):
        sig.save(work)
    assert (work / "notes.txt").read_text() == "mine"
    sig.save(tmp_path / "sig")
    (tmp_path / "sig" / "scores.png").write_bytes(b"png")  # the CLI's plots
    sig.save(tmp_path / "sig")  # a signature folder is replaced as a whole
    assert Signature.load(tmp_path / "sig").concept == "c"


def test_publish_refuses_a_second_writer_and_replaces_only_when_asked(tmp_path):
    out = tmp_path / "out"
    first, second = integrity.stage(out), integrity.stage(out)
    (first / "f").write_text("first")
    (second / "f").write_text("second")
    integrity.publish(first, out)
    with pytest.raises(integrity.WriteError, match="another run"):
        with integrity.writing(out):
            integrity.publish(second, out)
    assert (out / "f").read_text() == "first"
    integrity.publish(second, out, replace=True)
    assert (out / "f").read_text() == "second"
    assert not list(tmp_path.glob(".out.kif-*"))  # the replaced folder went too


def test_the_planted_pickle_is_live(tmp_path):
    """The tampering trials count 'executed' by a marker file: this payload does create it when
    something unpickles it, so a count of 0 means nothing did."""
    from kif.reliability.tamper import hostile_pickle

    marker = tmp_path / "it ran"
    pickle.loads(hostile_pickle(marker))  # noqa: S301 - the point of the test
    assert marker.exists()


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    from kif.reliability import bench

    work = tmp_path_factory.mktemp("reliability") / "work"
    cfg = bench.ReliabilityConfig(kills=10, disk_full=1, races=1, flips=2, fuzz=0)
    return bench.run(cfg, workdir=work), work


def test_short_campaign_survives_every_fault(campaign):
    r, _ = campaign
    s = r["summary"]
    assert s["kills"] == 10 and s["torn"] == 0 and s["inputs_modified"] == 0
    assert s["next_run_failed"] == 0 and s["stale_left"] == 0
    assert s["disk_full"] >= 5 and s["disk_full_clean"] == s["disk_full"]
    assert s["races"] == 5 and s["races_clean"] == 5
    assert s["tamper_trials"] >= 40 and s["tamper_detected"] == s["tamper_trials"]
    assert s["tamper_executed"] == 0 and s["tamper_wrote"] == 0
    assert s["failed"] == 0, [row["failures"] for row in r["crash"] + r["tamper"]]
    writers = {row["writer"] for row in r["crash"]}
    assert writers == {"erase", "restore", "signatures", "zoo-build", "stats-cache"}


def test_a_full_disk_under_the_cli_is_one_line_and_leaves_nothing(campaign, tmp_path):
    resource = pytest.importorskip("resource")  # POSIX
    _, work = campaign
    out = tmp_path / "restored"

    def limit():  # the checkpoint is 15 MB: its write fails partway, with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    got = subprocess.run([sys.executable, "-m", "kif", "restore", str(work / "inputs" / "erased"),
                          "--out", str(out)], capture_output=True, text=True, preexec_fn=limit,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [ln for ln in got.stderr.splitlines() if ln.startswith("kif: error:")]
    assert got.returncode == 2 and len(lines) == 1, got.stderr[-2000:]
    assert "Traceback" not in got.stderr and "File too large" in lines[0]
    assert not out.exists() and not any(tmp_path.glob(".restored*"))


def test_a_config_of_another_architecture_is_refused_before_it_is_built(tmp_path):
    """A GPT-2 checkpoint whose config.json says Llama would have transformers allocate a
    default-sized Llama (billions of parameters): refused from the headers instead."""
    import shutil

    from kif import models, zoo

    folder = shutil.copytree(zoo.resolve(zoo.BASE), tmp_path / "ckpt")
    (folder / integrity.SUMS).unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.ModelLoadError, match="does not describe the weights") as e:
        models.load(folder)
    assert "\n" not in str(e.value) and isinstance(e.value, KifError)


def test_a_bare_base_model_checkpoint_still_fits_its_config(tmp_path):
    """The hub's original `gpt2` stores its keys without the `transformer.` prefix; the check
    of weights against config.json maps them as transformers does."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kif import models, zoo

    folder = shutil.copytree(zoo.resolve(zoo.BASE), tmp_path / "bare")
    (folder / integrity.SUMS).unlink()
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert models.load(folder).cfg.n_layers == 4


def test_two_cli_erasures_to_one_out_one_wins_the_other_refuses_in_one_line(campaign, tmp_path):
    """The real `kif erase`, twice at once to the same --out (the campaign's setup has filled
    the key-statistics cache, so each run is seconds): one writes a complete folder, the other
    refuses in one line, whether it lost the rename or found the folder already there."""
    from kif.erasure.io import load_erasure

    out = tmp_path / "erased"
    cmd = [sys.executable, "-m", "kif", "erase", "--model", "fact-world", "--concept",
           "Miasmar Viahos", "--method", "stamp", "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    results = [(r.wait(timeout=600), r.stderr.read()) for r in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    lines = [ln for ln in refusal.splitlines() if ln.startswith("kif: error:")]
    assert len(lines) == 1 and "Traceback" not in refusal, refusal[-2000:]
    assert "another run meanwhile" in lines[0] or "exists and is not empty" in lines[0]
    assert load_erasure(out).method == "stamp"
    assert not list(tmp_path.glob(".erased.kif-*"))
