"""The writes the reliability campaign interrupts, and how to tell a whole output from a torn one.

Each `Writer` is one of kif's output paths, set up once in the campaign's process (the model
loaded, the erasure computed) so that a trial costs only the write itself: `write(out)` is what
`kif erase --out`, `kif restore --out`, `kif signatures --out`, `kif zoo build --out` and the
key-statistics cache do to the disk. `check(out)` loads the output the way kif's readers do and
raises on anything less than a complete one; `inputs` are the files the write must not change.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Callable

import torch

from kif import integrity


@dataclasses.dataclass(frozen=True)
class Writer:
    name: str
    command: str  # the CLI command whose write this is
    write: Callable[[pathlib.Path], None]
    check: Callable[[pathlib.Path], None]  # raises unless `out` is complete and loadable
    inputs: tuple[pathlib.Path, ...]  # files the write reads and must leave byte-identical
    replaces: bool = False  # writes over an existing output (signatures --overwrite, zoo build)
    is_file: bool = False  # the output is one file (the statistics cache), not a folder
    staging: Callable[[pathlib.Path], list[pathlib.Path]] = lambda out: sorted(
        out.parent.glob(f".{out.name}.kif-*"))


def _files(folder: pathlib.Path) -> tuple[pathlib.Path, ...]:
    return tuple(sorted(p for p in folder.rglob("*") if p.is_file()))


def erase_writer(model, erasure) -> Writer:
    from kif.erasure.io import load_erasure, open_model, save_erasure

    def check(out: pathlib.Path) -> None:
        load_erasure(out)
        open_model(out)  # the checkpoint against the manifest's weight hash

    return Writer("erase", "kif erase --out", lambda out: save_erasure(
        erasure, model, out, report={"method": erasure.method}, report_md="# report\n"),
        check, _files(pathlib.Path(model.kif_source_dir)))


def restore_writer(erased: pathlib.Path) -> Writer:
    from kif import models
    from kif.erasure.io import restore

    def check(out: pathlib.Path) -> None:
        models.load(out)

    return Writer("restore", "kif restore --out", lambda out: restore(erased, out), check,
                  _files(erased))


def signature_writer(signature, model) -> Writer:
    from kif.signatures.base import Signature

    return Writer("signatures", "kif signatures --out --overwrite", signature.save,
                  lambda out: Signature.load(out, model=model),
                  _files(pathlib.Path(model.kif_source_dir)), replaces=True)


def zoo_writer(source: pathlib.Path) -> Writer:
    """`kif zoo build --out`'s write of a trained model (`kif.zoo.build._save_atomic`), fed a
    zoo checkpoint instead of a fresh training run (the training is not what a kill tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kif import models, zoo
    from kif.zoo.build import _save_atomic

    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(source)
    card = zoo.card(source.name) or {"name": source.name}

    def check(out: pathlib.Path) -> None:
        zoo.verify(out, models.ModelLoadError, "zoo model")
        models.load(out)

    return Writer("zoo-build", "kif zoo build --out", lambda out: _save_atomic(hf, tok, out, card),
                  check, _files(source), replaces=True)


def cache_writer(moments_path_dir: pathlib.Path, model, hook: str) -> Writer:
    """The key-statistics cache: one file per key, written by `kif.erasure.stats._write_cache`."""
    from kif.erasure import stats

    m = stats.key_dim(model, hook)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4 * m, m, generator=gen, dtype=torch.float64)
    tensors = {"gram": x.T @ x, "mean_last": x.mean(0), "n_rows": torch.tensor(4 * m)}

    def check(out: pathlib.Path) -> None:
        got = stats._read_cached(out, model, hook, 4 * m, 1.0)
        if got is None or not torch.equal(got.gram, tensors["gram"]):
            raise RuntimeError(f"{out} is not the statistics written")

    return Writer("stats-cache", "key-statistics cache (kif erase, stamp)",
                  lambda out: stats._write_cache(out, tensors), check, (), replaces=True,
                  is_file=True)


def remove(out: pathlib.Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)


def digest(paths: tuple[pathlib.Path, ...]) -> dict[str, str]:
    return {str(p): integrity.file_sha256(p) for p in paths}
