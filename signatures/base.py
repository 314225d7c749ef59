"""The `Signature` type: where a concept lives in a model, saved as safetensors + JSON.

Every signature kind produces one: components (unit directions at a hook, MLP neurons, or SAE
features), a score per component (higher = more important to the concept, sorted descending), the
canonical TransformerLens hook names it refers to, optional maps (e.g. causal-tracing grids), and
the settings used. A signature is tied to the model it was taken from by name, dimensions and
weight hash; applying it to another model is an error (`SignatureMismatchError`).
"""

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Literal

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from kif import integrity
from kif.errors import KifError

Kind = str
FORMAT = "kif.signature/1"


class SignatureError(KifError):
    """A signature file is missing, corrupt or foreign."""


class SignatureMismatchError(KifError):
    """A signature was applied to a model it was not taken from."""


def model_dims(model) -> dict[str, int]:
    c = model.cfg
    return {"n_layers": int(c.n_layers), "d_model": int(c.d_model), "d_mlp": int(c.d_mlp or 0),
            "d_vocab": int(c.d_vocab)}


@dataclasses.dataclass(frozen=True)
class Signature:
    """Where `concept` lives in the model `model_name` (weights `model_hash`).

    Components, one per row, sorted by `scores` (descending):
      * `component == "direction"`: `directions[i]` is a unit vector in the space of hook
        `component_hooks[i]` (e.g. `blocks.2.hook_resid_post`, `blocks.2.hook_mlp_out`);
      * `component == "neuron"`: `indices[i] = (layer, neuron)`, hook `blocks.{layer}.mlp.hook_post`;
      * `component == "feature"`: `indices[i] = (0, feature id)` of the SAE `sae` (a reference
        dict: where to load it and its hook), hook `component_hooks[i]`.
    `maps` holds per-kind extras (e.g. `"resid_ie"`: a [layer, pos] causal-tracing grid).
    """

    concept: str
    kind: Kind
    model_name: str
    model_hash: str
    dims: dict[str, int]
    component: Literal["direction", "neuron", "feature"]
    component_hooks: tuple[str, ...]
    scores: Float[Tensor, " k"]
    directions: Float[Tensor, "k d"] | None = None
    indices: Int[Tensor, "k 2"] | None = None
    sae: dict[str, Any] | None = None
    maps: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # measured side facts

    def __post_init__(self) -> None:
        k = int(self.scores.shape[0])
        if len(self.component_hooks) != k:
            raise SignatureError(f"{k} scores but {len(self.component_hooks)} hooks")
        if self.component == "direction" and (self.directions is None or self.directions.shape[0] != k):
            raise SignatureError("a direction signature needs one direction per score")
        if self.component in ("neuron", "feature") and (self.indices is None or self.indices.shape[0] != k):
            raise SignatureError(f"a {self.component} signature needs one index per score")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def hooks(self) -> tuple[str, ...]:
        """The distinct hooks the signature touches, in order of first appearance."""
        return tuple(dict.fromkeys(self.component_hooks))

    def top(self, k: int) -> "Signature":
        """The `k` highest-scoring components."""
        k = min(k, len(self))
        return dataclasses.replace(
            self, scores=self.scores[:k], component_hooks=self.component_hooks[:k],
            directions=None if self.directions is None else self.directions[:k],
            indices=None if self.indices is None else self.indices[:k])

    # ---- compatibility ----------------------------------------------------------------------

    def check_model(self, model) -> None:
        """Raise SignatureMismatchError unless `model` is the model this was taken from."""
        from kif.models import weight_hash

        dims = model_dims(model)
        if dims != self.dims:
            raise SignatureMismatchError(
                f"signature of {self.concept!r} was taken from a model with {self.dims}, "
                f"this one has {dims}")
        h = weight_hash(model)
        if h != self.model_hash:
            raise SignatureMismatchError(
                f"signature of {self.concept!r} was taken from {self.model_name} "
                f"(weights {self.model_hash[:12]}), this model's weights are {h[:12]}")

    # ---- disk -------------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> pathlib.Path:
        """Write `signature.json`, `signature.safetensors` and their checksums as the folder
        `out_dir`, atomically. An existing `out_dir` that holds only a signature and its plots
        is replaced as a whole; any other existing folder is refused."""
        out = pathlib.Path(out_dir).expanduser().resolve()
        _check_replaceable(out)
        tensors = {"scores": self.scores.detach().float().cpu().contiguous()}
        if self.directions is not None:
            tensors["directions"] = self.directions.detach().float().cpu().contiguous()
        if self.indices is not None:
            tensors["indices"] = self.indices.detach().long().cpu().contiguous()
        for name, t in self.maps.items():
            tensors[f"maps.{name}"] = t.detach().float().cpu().contiguous()
        meta = {"format": FORMAT, "concept": self.concept, "kind": self.kind,
                "model_name": self.model_name, "model_hash": self.model_hash, "dims": self.dims,
                "component": self.component, "component_hooks": list(self.component_hooks),
                "sae": self.sae, "settings": self.settings, "info": self.info}
        # the whole folder is staged and renamed into place: a kill leaves the old signature
        # or the new one, never a mix (plots the CLI adds afterwards go in beside it)
        with integrity.staged(out, SignatureError) as tmp, integrity.writing(out, SignatureError):
            save_file(tensors, str(tmp / "signature.safetensors"))
            (tmp / "signature.json").write_text(json.dumps(meta, indent=2, default=_jsonable))
            integrity.write_sums(tmp, ["signature.json", "signature.safetensors"])
            integrity.publish(tmp, out, replace=True)
        return out

    @staticmethod
    def load(path: str | os.PathLike, model=None) -> "Signature":
        """Read a signature folder; with `model`, also check it was taken from that model."""
        p = pathlib.Path(path)
        if (p / integrity.SUMS).is_file():  # folders written before checksums have none
            integrity.verify(p, error=SignatureError, what="signature")
        try:
            meta = json.loads((p / "signature.json").read_text())
            tensors = load_file(str(p / "signature.safetensors"))
        except FileNotFoundError:
            raise SignatureError(f"{p} is not a kif signature folder "
                                 "(signature.json + signature.safetensors)") from None
        except Exception as exc:  # corrupt JSON or safetensors
            raise SignatureError(f"{p} holds a corrupt signature: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SignatureError(f"{p / 'signature.json'} is not a kif signature ({FORMAT})")
        try:
            sig = _from_meta(meta, tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise SignatureError(f"{p / 'signature.json'} is not a valid kif signature "
                                 f"({type(exc).__name__}: {first})") from None
        if model is not None:
            sig.check_model(model)
        return sig


# What a signature folder holds (the CLI adds its plots): only a folder of these is replaced.
_OWN_FILES = ("signature.json", "signature.safetensors", integrity.SUMS)


def _check_replaceable(out: pathlib.Path) -> None:
    """`Signature.save` replaces `out` as a whole: refuse a file, the current folder, and a
    folder that holds anything but a signature and its plots (a `--out .` or `--out results`
    must not take other work with it)."""
    if out.exists() and not out.is_dir():
        raise SignatureError(f"{out} is a file: choose a folder for the signature")
    here = pathlib.Path.cwd().resolve()
    if out.exists() and (out == here or out in here.parents):
        raise SignatureError(f"refusing to replace {out}, the current folder or one above it: "
                             "choose a new folder for the signature")
    if out.is_dir():
        other = [f.name for f in out.iterdir()
                 if f.name not in _OWN_FILES and not (f.is_file() and f.suffix == ".png")]
        if other:
            raise SignatureError(f"{out} holds {other[0]!r}, which is not part of a signature: "
                                 "choose a new folder (saving replaces the folder as a whole)")


def _from_meta(meta: dict[str, Any], tensors: dict[str, Tensor]) -> Signature:
    return Signature(
        concept=str(meta["concept"]), kind=meta["kind"], model_name=str(meta["model_name"]),
        model_hash=str(meta["model_hash"]), dims=dict(meta["dims"]), component=meta["component"],
        component_hooks=tuple(str(h) for h in meta["component_hooks"]), scores=tensors["scores"],
        directions=tensors.get("directions"), indices=tensors.get("indices"),
        sae=meta.get("sae"),
        maps={k[len("maps."):]: v for k, v in tensors.items() if k.startswith("maps.")},
        settings=dict(meta.get("settings") or {}), info=dict(meta.get("info") or {}))


def _jsonable(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, pathlib.Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# ---- the registry ---------------------------------------------------------------------------

Extractor = Callable[..., Signature]
KINDS: dict[Kind, Extractor] = {}


def register(kind: Kind) -> Callable[[Extractor], Extractor]:
    """Register an extractor `fn(model, concept, **settings) -> Signature` under `kind`."""

    def deco(fn: Extractor) -> Extractor:
        if kind in KINDS:
            raise ValueError(f"signature kind {kind!r} registered twice")
        KINDS[kind] = fn
        return fn

    return deco


# ---- helpers shared by the extractors --------------------------------------------------------

def new_signature(model, concept, kind: Kind, **fields: Any) -> Signature:
    """A Signature stamped with the model's name, dimensions and weight hash."""
    from kif.models import weight_hash

    return Signature(concept=concept.name, kind=kind,
                     model_name=str(getattr(model, "kif_name", model.cfg.model_name)),
                     model_hash=weight_hash(model), dims=model_dims(model), **fields)


def subject_positions(model, prompt: str, subject: str) -> list[int]:
    """Token positions (in `[BOS] + tokens(prompt)`, as `kif.metrics` encodes prompts) covering
    the first occurrence of `subject` in `prompt`."""
    start = prompt.find(subject)
    if start < 0:
        raise KifError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    end = start + len(subject)
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offset = 1 if model.cfg.default_prepend_bos else 0
    pos = [i + offset for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    if not pos:
        raise KifError(f"no token of {prompt!r} covers {subject!r}")
    return pos


def unit(x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
