"""`kif bench scale` (issue "Real-model reach", item 4): the bench runs end to end on a tiny
shape and reports every stage, the power-law fits recover known exponents, and bad input is one
line with exit status 2. No timed assertion: the figures are the bench's output, not a test's."""

import json
import math

import pytest

from kif import bench_scale
from kif.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `kif bench scale --quick --json --out` run, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("scale")
    out = tmp / "scale.json"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        rc = main(["bench", "scale", "--quick", "--workdir", str(tmp / "ckpts"), "--json",
                   "--out", str(out)])
    finally:
        capture.undo()
    return rc, json.loads(buf.getvalue()), out


def test_quick_bench_reports_every_stage(quick):
    rc, result, out = quick
    assert rc == 0
    assert json.loads(out.read_text()) == result  # --out holds what --json printed
    (shape,) = result["shapes"]
    assert shape["shape"] == "tiny" and shape["params"] > 0
    for stage in bench_scale.STAGES:
        row = shape["stages"][stage]
        assert row["seconds"] > 0, stage
        assert "peak_rss_above_baseline_mb" in row, stage
    kif = shape["stages"]["kif"]
    # the one optimisation step was taken and timed inside the pipeline's train section
    assert 0 < kif["step_seconds"] <= kif["sections"]["train"]
    assert kif["projected_seconds"] > kif["seconds"]
    assert shape["stages"]["forward_hooked"]["hooks"] >= 1
    assert shape["stages"]["stamp_cached"]["layer"] in range(shape["n_layers"])
    assert set(shape["stages"]["meter_fast"]["probes"]) >= {"surface", "logit-lens"}
    rows = result["growth"]["rows"]
    assert [r["facts"] for r in rows] == [1, 5]
    for r in rows:
        assert r["stamp_cold"]["seconds"] > 0 and r["kif"]["step_seconds"] > 0
    assert "stamp_cold.seconds" in result["exponents"]["facts"]
    assert "kif.seconds" in result["exponents"]["facts"]
    assert result["targets"] == {}  # targets are GPT-2 small's; tiny is not it


def test_checkpoint_is_written_once_and_loads(quick, tmp_path):
    """The random checkpoint is reused (same folder, same bytes) and its vocabulary keeps the
    shape's size while the tokenizer uses the first ids."""
    _, result, _ = quick
    import pathlib

    folder = pathlib.Path(result["shapes"][0]["model"])
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = bench_scale.write_checkpoint(bench_scale.SHAPES["tiny"], folder.parent)
    assert again == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert result["shapes"][0]["d_vocab"] == dict(bench_scale.SHAPES["tiny"].config)["vocab_size"]


def test_synthetic_concept_grows_only_the_forget_set():
    small, big = bench_scale.synthetic_concept(1), bench_scale.synthetic_concept(23)
    assert len(small.forget) == 1 and len(big.forget) == 23
    assert len(big.subjects) == 5  # five facts per person
    assert len(big.never_knew.names) >= 4 * len(big.subjects)  # the pipeline's n_names
    assert len(small.retain_corpus) == len(big.retain_corpus)
    assert not set(big.subjects) & {p.subject for p in big.retain_corpus}
    for p in big.forget:
        assert p.subject in p.prompt
    assert bench_scale.synthetic_concept(23) == big  # seeded


def test_fit_recovers_exact_power_laws():
    xs = [1e6, 3e6, 1.2e8, 5e8]
    fit = bench_scale.fit_power_law(xs, [3.0 * x ** 0.75 for x in xs])
    assert fit["exponent"] == pytest.approx(0.75, abs=1e-9)
    assert fit["coefficient"] == pytest.approx(3.0, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
    assert bench_scale.fit_power_law([5, 5], [1, 2]) is None  # no spread: no slope

    # through `exponents`, on results shaped like the bench's: params^a across shapes,
    # facts^b across forget sizes
    a, b = 1.3, 0.4
    shapes = [{"params": p, "stages": {"stamp_cold": {"seconds": 2e-7 * p ** a,
                                                       "peak_rss_above_baseline_mb": p ** 1.0}}}
              for p in xs]
    growth = [{"facts": n, "stamp_cold": {"seconds": 0.5 * n ** b}} for n in (1, 10, 100, 1000)]
    fits = bench_scale.exponents(shapes, growth)
    assert fits["params"]["stamp_cold.seconds"]["exponent"] == pytest.approx(a, abs=1e-6)
    assert fits["params"]["stamp_cold.peak_rss_above_baseline_mb"]["exponent"] == pytest.approx(1.0)
    assert fits["facts"]["stamp_cold.seconds"]["exponent"] == pytest.approx(b, abs=1e-6)
    assert math.isclose(fits["facts"]["stamp_cold.seconds"]["coefficient"], 0.5, rel_tol=1e-4)


def test_targets_read_gpt2_small():
    stages = {"forward_hooked": {"ratio_to_plain": 1.02, "cpu_ratio_to_plain": 1.07,
                                 "batch": [8, 128]},
              "stamp_cached": {"seconds": 12.0, "cpu_seconds": 6.0},
              "kif": {"projected_seconds": 300.0, "projected_cpu_seconds": 200.0,
                      "projected_for": "60 steps", "peak_rss_above_baseline_mb": 1500.0}}
    t = bench_scale.targets([{"shape": "gpt2-124m", "stage_facts": 20, "fp32_weights_mb": 500.0,
                              "stages": stages}])
    assert t["suppress_forward_ratio"]["met"] is True
    assert t["suppress_forward_ratio"]["met_on_cpu"] is False
    assert t["stamp_cached_seconds"]["met"] is False
    assert t["stamp_cached_seconds"]["met_on_cpu"] is True
    assert t["kif_seconds"]["met"] is True
    assert t["kif_peak_memory_over_fp32_weights"]["value"] == 3.0
    assert t["kif_peak_memory_over_fp32_weights"]["met"] is False


@pytest.mark.parametrize("argv, words", [
    (["--shapes", "gpt5-1t"], "unknown shape 'gpt5-1t'"),
    (["--shapes", "tiny", "--facts", "0"], "at least 1"),
    (["--shapes", "tiny", "--facts-shape", "zoo"], "not among --shapes"),
    (["--shapes", "tiny", "--dtype", "fp8"], "unknown dtype"),
])
def test_bad_input_is_one_line_exit_2(argv, words, tmp_path, capsys):
    out = tmp_path / "scale.json"
    rc = main(["bench", "scale", *argv, "--workdir", str(tmp_path / "w"), "--json",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and words in err
    assert not out.exists() and not (tmp_path / "w").exists()  # nothing written


def test_device_script_without_cuda_is_one_line(capsys):
    """`python -m kif.bench_scale --gpu` on a machine without CUDA refuses in one line."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: --gpu would run")
    assert bench_scale.main(["--gpu", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err


def test_device_path_in_bf16_on_cpu(tmp_path, capsys):
    """The device script's path (bf16 weights, the same stages) on a tiny shape on CPU: what
    `--gpu` runs on Llama shapes, less CUDA and the kernels."""
    rc = bench_scale.main(["--shapes", "tiny", "--facts", "1", "--stage-facts", "2",
                           "--batch", "1", "8", "--reps", "1", "--dtype", "bf16",
                           "--in-process", "--no-meter", "--workdir", str(tmp_path), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    st = result["shapes"][0]["stages"]
    assert result["config"]["dtype"] == "bf16"
    assert st["kif"]["step_seconds"] > 0 and st["forward_hooked"]["ratio_to_plain"] > 0
    assert "meter_fast" not in st


def test_merge_combines_runs_and_refits(quick, tmp_path, capsys):
    """Shapes benched by separate invocations merge into one result whose params fit spans
    them all; a file that is no result is one line, exit 2."""
    import copy

    _, result, out = quick
    other = copy.deepcopy(result)
    other["shapes"][0]["shape"] = "bigger"
    other["shapes"][0]["params"] *= 10
    other["growth"] = {"shape": None, "rows": []}
    second = tmp_path / "second.json"
    second.write_text(json.dumps(other))
    merged_path = tmp_path / "merged.json"
    assert main(["bench", "scale", "--merge", str(out), str(second), "--json",
                 "--out", str(merged_path)]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert [s["shape"] for s in merged["shapes"]] == ["tiny", "bigger"]
    assert merged["growth"]["rows"] == result["growth"]["rows"]
    assert merged["exponents"]["params"]["load.seconds"]["points"] == 2
    assert json.loads(merged_path.read_text()) == merged
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["bench", "scale", "--merge", str(bad), "--json"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
