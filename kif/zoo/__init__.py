"""kif's model zoo: the fact-world base model and its oracles, shipped as HF checkpoints.

The checkpoints live in this package's folder (package data), so kif works offline right after
`pip install`. `kif zoo build` retrains them from the world's seed (see `kif.zoo.build`).
"""

import dataclasses
import json
import os
import pathlib

ZOO_DIR = pathlib.Path(__file__).resolve().parent
BASE = "fact-world"
ORACLE_SPLITS = ("forget01", "forget05", "forget10")
# The Llama-architecture twin (RoPE, RMSNorm, SwiGLU, grouped-query attention) trained on the same
# world: a second architecture with ground truth. One oracle (forget10) keeps the package small.
LLAMA_BASE = "fact-world-llama"
LLAMA_ORACLE_SPLITS = ("forget10",)
ARCHS = ("gpt2", "llama")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    forget_split: str | None  # None for the base model; the split left out for an oracle
    arch: str = "gpt2"  # the zoo build's architecture recipe (kif.zoo.build.TrainConfig.for_arch)
    base: str = BASE  # the base model this entry is (or is an oracle of)

    @property
    def path(self) -> pathlib.Path:
        return ZOO_DIR / self.name


def oracle_name(split: str, base: str = BASE) -> str:
    return f"{base}-oracle-{split}"


ENTRIES: dict[str, ZooEntry] = {
    BASE: ZooEntry(BASE, "GPT-2 (4 x 256) trained on every fact of the fact world", None),
    **{oracle_name(s): ZooEntry(oracle_name(s), f"the same model trained without the {s} people", s)
       for s in ORACLE_SPLITS},
    LLAMA_BASE: ZooEntry(LLAMA_BASE, "Llama (4 x 256, RoPE, RMSNorm, SwiGLU, GQA 4/2) trained on "
                         "every fact of the fact world", None, "llama", LLAMA_BASE),
    **{oracle_name(s, LLAMA_BASE): ZooEntry(oracle_name(s, LLAMA_BASE), "the Llama twin trained "
                                            f"without the {s} people", s, "llama", LLAMA_BASE)
       for s in LLAMA_ORACLE_SPLITS},
}


def resolve(name: str) -> pathlib.Path | None:
    """The local folder of zoo model `name`, or None when `name` is not a zoo name."""
    entry = ENTRIES.get(str(name))
    return entry.path if entry is not None else None


def oracle_for(split: str, base: str = BASE) -> str | None:
    """The zoo oracle of `base` trained without `split`'s people, if the zoo has one."""
    name = oracle_name(split, base)
    return name if name in ENTRIES else None


def base_of(name: str) -> str | None:
    """The zoo base model that `name` is or is an oracle of; None when not a zoo name."""
    entry = ENTRIES.get(str(name))
    return entry.base if entry is not None else None


def is_built(name: str) -> bool:
    p = resolve(name)
    return p is not None and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def card(name: str) -> dict:
    """The training card written next to a built zoo model (seed, steps, timings, accuracy)."""
    p = resolve(name)
    if p is None or not (p / "kif_card.json").is_file():
        return {}
    return json.loads((p / "kif_card.json").read_text())


def publish(staged: pathlib.Path, dest: pathlib.Path) -> None:
    """Seal a finished zoo folder (a model or an SAE) with the checksums that every load checks,
    make it readable by every user (package data; staging folders are private) and rename it
    into place, replacing the previous build as a whole."""
    from kif import integrity

    integrity.write_sums(staged)
    os.chmod(staged, 0o755)
    for f in staged.iterdir():
        os.chmod(f, 0o644)
    integrity.publish(staged, dest, replace=True)


def verify(folder: pathlib.Path, error: type[Exception], what: str) -> None:
    """`kif.integrity.verify` of a shipped folder: a flipped byte in package data is refused."""
    from kif import integrity

    integrity.verify(folder, error=error, what=what,
                     hint=" (run `kif zoo build` to rebuild it, or reinstall kif)")
