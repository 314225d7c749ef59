"""`kif bench reliability`: the whole campaign (kills, full disks, races, tampering, fuzzing) on
the zoo model, as counts: faults injected, survived, data lost.

The setup runs once (the fact-world model, one `stamp` erasure, one signature, copies of a
shipped SAE and zoo model); every trial after that is a forked write or a read of a changed copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import random
import shutil
import tempfile
from typing import Any, Callable, Iterator

import torch

from kif.errors import KifError
from kif.reliability import crash, tamper, writers

DEMO_PERSON = "Miasmar Viahos"


@dataclasses.dataclass(frozen=True)
class ReliabilityConfig:
    kills: int = 400  # over all writers (about half land before the write has finished)
    disk_full: int = 6  # per writer and kind of full disk
    races: int = 4  # per writer
    flips: int = 20  # per file of each target
    fuzz: int = 10_000  # inputs per reader
    person: str = DEMO_PERSON
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Setup:
    model: Any
    work: pathlib.Path
    writers: tuple[writers.Writer, ...]
    targets: tuple[tamper.Target, ...]


def _setup(work: pathlib.Path, person: str) -> Setup:
    from kif import models, zoo
    from kif.erasure import erase, save_erasure
    from kif.erasure.registry import resolve_concepts
    from kif.signatures.registry import extract
    from kif.signatures.sae_features import shipped_hooks, shipped_sae_ref, _resolve_path
    from kif.world import FactWorld

    # one thread: the forked children must not inherit a half-used thread pool
    torch.set_num_threads(1)
    model = models.load(zoo.BASE)
    world = FactWorld.generate(0)
    concept = resolve_concepts(world, [person])
    erasure = erase(model, concept, method="stamp", world=world, base_spec=zoo.BASE,
                    progress=False)
    erased = save_erasure(erasure, model, work / "inputs" / "erased")
    signature = extract(model, concept, kind="concept-vectors")
    sig_folder = signature.save(work / "inputs" / "signature")
    hook = shipped_hooks(zoo.BASE)[0]
    sae = shutil.copytree(_resolve_path(shipped_sae_ref(zoo.BASE, hook)), work / "inputs" / "sae")
    zoo_copy = shutil.copytree(zoo.resolve(zoo.BASE), work / "inputs" / "zoo-model")
    cache_dir = work / "inputs" / "cache"
    cache_dir.mkdir(parents=True)
    cache = writers.cache_writer(cache_dir, model, "blocks.1.mlp.hook_post")
    cache_file = cache_dir / "stats.safetensors"
    cache.write(cache_file)
    ws = (writers.erase_writer(model, erasure), writers.restore_writer(erased),
          writers.signature_writer(signature, model), writers.zoo_writer(zoo_copy), cache)
    return Setup(model, work, ws, _targets(model, erased, sig_folder, sae, zoo_copy, cache_dir,
                                           cache_file))


def _targets(model, erased, sig_folder, sae, zoo_copy, cache_dir, cache_file
             ) -> tuple[tamper.Target, ...]:
    from kif import models, zoo
    from kif.erasure import stats
    from kif.signatures.base import Signature
    from kif.signatures.sae_features import load_sae

    def read_cache(folder: pathlib.Path, _scratch: pathlib.Path):
        return stats._read_cached(folder / cache_file.name, model, "blocks.1.mlp.hook_post",
                                  4 * stats.key_dim(model, "blocks.1.mlp.hook_post"), 1.0)

    def read_zoo(folder: pathlib.Path, _scratch: pathlib.Path):
        zoo.verify(folder, models.ModelLoadError, "zoo model")  # what `models.load(NAME)` runs
        return models.load(folder)

    return (
        tamper.Target("erasure folder", erased, tamper.read_erasure,
                      ("manifest.json", "erasure.safetensors", "restore.safetensors",
                       "model.safetensors", "config.json", "tokenizer.json", "kif_sha256.json")),
        tamper.Target("signature", sig_folder, lambda f, _s: Signature.load(f, model=model),
                      ("signature.json", "signature.safetensors", "kif_sha256.json")),
        tamper.Target("shipped SAE", sae, lambda f, _s: load_sae(f, model),
                      ("sae_weights.safetensors", "cfg.json", "kif_sha256.json")),
        tamper.Target("zoo model", zoo_copy, read_zoo,
                      ("model.safetensors", "config.json", "kif_sha256.json")),
        tamper.Target("key-statistics cache", cache_dir, read_cache, (cache_file.name,),
                      cache=True),
    )


def _crash_rows(setup: Setup, cfg: ReliabilityConfig, tick: Callable[[], None]) -> list[dict]:
    rng = random.Random(cfg.seed)
    rows = []
    for i, w in enumerate(setup.writers):
        kills = cfg.kills // len(setup.writers) + (i < cfg.kills % len(setup.writers))
        home = setup.work / "out" / w.name
        home.mkdir(parents=True)
        out = home / ("stats.safetensors" if w.is_file else "out")
        inputs = writers.digest(w.inputs)
        seconds, need = crash.measure_write(w, out)
        tally = crash.Tally(w.name, w.command)
        for _ in range(kills):
            crash.kill_trial(w, out, seconds, rng, inputs, tally)
            tick()
        for use_tmpfs in (True, False):
            for _ in range(cfg.disk_full):
                crash.disk_full_trial(w, out, need, rng, tally, use_tmpfs)
                tick()
        for _ in range(cfg.races):
            crash.race_trial(w, out, tally)
            tick()
        if digest_changed := writers.digest(w.inputs) != inputs:  # in the disk or race trials
            tally.inputs_modified += 1
            tally.fail("inputs changed during the full-disk or race trials")
        rows.append({**dataclasses.asdict(tally), "write_seconds": round(seconds, 3),
                     "output_bytes": need[0], "inputs_modified_at_end": digest_changed})
    return rows


def _tamper_rows(setup: Setup, cfg: ReliabilityConfig, tick: Callable[[], None]) -> list[dict]:
    rng = random.Random(cfg.seed + 1)
    work = setup.work / "tamper"
    work.mkdir()
    counts: list[tamper.Count] = []
    for target in setup.targets:
        counts += tamper.flips(target, cfg.flips, rng, work)
        tick()
    erased, signature = setup.targets[0], setup.targets[1]
    counts += tamper.erasure_cases(erased, work)
    counts += tamper.signature_cases(signature, work)
    tick()
    return [dataclasses.asdict(c) for c in counts]


def _fuzz_module():
    try:
        from kif.reliability import fuzz
    except ImportError as e:  # hypothesis is a test dependency
        raise KifError(f"fuzzing needs {e.name}: pip install 'kif[test]' (or pass --fuzz 0)"
                       ) from None
    return fuzz


def summarize(crash_rows: list[dict], tamper_rows: list[dict], fuzz_rows: list[dict]) -> dict:
    def total(rows, key):
        return sum(int(r[key]) for r in rows)

    s = {
        "kills": total(crash_rows, "kills"),
        "killed_mid_write": total(crash_rows, "killed_mid_write"),
        "torn": total(crash_rows, "torn"),
        "inputs_modified": total(crash_rows, "inputs_modified"),
        "next_run_failed": total(crash_rows, "next_run_failed"),
        "stale_left": total(crash_rows, "stale_left"),
        "disk_full": total(crash_rows, "disk_full"),
        "disk_full_clean": total(crash_rows, "disk_full_clean"),
        "races": total(crash_rows, "races"),
        "races_clean": total(crash_rows, "races_clean"),
        "tamper_trials": total(tamper_rows, "trials"),
        "tamper_detected": total(tamper_rows, "detected"),
        "tamper_executed": total(tamper_rows, "executed"),
        "tamper_wrote": total(tamper_rows, "wrote"),
        "fuzz_inputs": total(fuzz_rows, "inputs") if fuzz_rows else 0,
        "fuzz_tracebacks": total(fuzz_rows, "tracebacks") if fuzz_rows else 0,
    }
    s["failed"] = (s["torn"] + s["inputs_modified"] + s["next_run_failed"] + s["stale_left"]
                   + s["disk_full"] - s["disk_full_clean"] + s["races"] - s["races_clean"]
                   + s["tamper_trials"] - s["tamper_detected"] + s["tamper_executed"]
                   + s["tamper_wrote"] + s["fuzz_tracebacks"])
    s["targets"] = {
        "0 torn, 0 inputs modified, >= 200 kills mid-write": s["killed_mid_write"] >= 200
        and s["torn"] == 0 and s["inputs_modified"] == 0,
        "every tampering case detected": s["tamper_detected"] == s["tamper_trials"]
        and s["tamper_executed"] == 0 and s["tamper_wrote"] == 0,
        "0 tracebacks over >= 10,000 inputs per reader": bool(fuzz_rows)
        and s["fuzz_tracebacks"] == 0 and min(int(r["inputs"]) for r in fuzz_rows) >= 10_000,
    }
    return s


@contextlib.contextmanager
def _workdir(keep: pathlib.Path | None) -> Iterator[pathlib.Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=False)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="kif-reliability-") as tmp:
        yield pathlib.Path(tmp)


def run(cfg: ReliabilityConfig = ReliabilityConfig(), *, progress: bool = False,
        workdir: pathlib.Path | None = None) -> dict:
    """The campaign; returns {"crash": rows, "tamper": rows, "fuzz": rows, "summary": ...}."""
    from rich.progress import Progress

    fuzz = _fuzz_module() if cfg.fuzz > 0 else None  # refused before any setup
    with _workdir(workdir) as work, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("setting up", total=None)
        setup = _setup(work, cfg.person)
        n = cfg.kills + 5 * (2 * cfg.disk_full + cfg.races) + 6
        bar.update(task, description="faults", total=n, completed=0)
        tick = lambda: bar.advance(task)  # noqa: E731
        crash_rows = _crash_rows(setup, cfg, tick)
        tamper_rows = _tamper_rows(setup, cfg, tick)
        bar.update(task, description="fuzzing readers")
        fuzz_rows = ([dataclasses.asdict(r) for r in fuzz.run(cfg.fuzz, seed=cfg.seed)]
                     if fuzz is not None else [])
    return {"config": dataclasses.asdict(cfg), "crash": crash_rows, "tamper": tamper_rows,
            "fuzz": fuzz_rows, "summary": summarize(crash_rows, tamper_rows, fuzz_rows)}
