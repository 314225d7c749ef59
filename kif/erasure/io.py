"""Erasure folders: save, load, open as a model, restore the base bit for bit.

An erasure folder (written by `kif erase --out DIR`) holds:

- `manifest.json`: format tag, method, concepts, kind, the base model (spec and weight SHA-256),
  the erased weights' SHA-256, settings, timings, each delta's kind/rank/norm and each hook op;
- `erasure.safetensors`: the deltas (dense or low-rank factors) and the hook ops' tensors;
- weight methods: the erased model as an HF checkpoint at the folder's root (`config.json`,
  `model.safetensors`, tokenizer; float32 so that small edits survive), and
  `restore.safetensors`, the original values of every edited tensor (`orig/NAME`), and the base
  checkpoint's tensors that the hooked model holds only rounded (`hf/NAME`, HF names: Gemma's
  norms, `kif.models.exact_hf_tensors`), so `restore` is bit-exact without the base checkpoint;
- `report.json` (and `report.md`) when the caller passes one;
- `kif_sha256.json`: the SHA-256 of every other file but the reports (`kif.integrity`),
  checked before anything in the folder is read (format version 2; version-1 folders, written
  before it, have none).

Only safetensors and JSON are read (no pickle). Everything is written to a staging sibling
folder and renamed into place, and nothing is ever written over an existing folder or a model's
source (DESIGN.md convention 9).
"""

import copy
import json
import os
import pathlib
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from kif import integrity
from kif.erasure.core import Delta, Erasure, ErasureError, HookOp

FORMAT = "kif-erasure"
# 2: the folder holds kif_sha256.json (every file's SHA-256), checked before anything is read
VERSION = 2
READABLE = (1, 2)
MANIFEST = "manifest.json"
TENSORS = "erasure.safetensors"
RESTORE = "restore.safetensors"


def is_erasure_folder(path: str | os.PathLike) -> bool:
    p = pathlib.Path(path)
    if not (p / MANIFEST).is_file():
        return False
    try:
        m = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 16 else f"tensor{tuple(x.shape)}"
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _destination(out_dir: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ErasureError(f"{out} exists and is not empty: choose a new --out folder")
    return out


def save_erasure(erasure: Erasure, base_model, out_dir: str | os.PathLike,
                 report: Mapping[str, Any] | None = None, report_md: str | None = None) -> pathlib.Path:
    """Write `erasure` (computed on `base_model`, whose weights are left as they were) to a new
    folder `out_dir`. Returns the folder."""
    erasure.check_base(base_model)
    out = _destination(out_dir)
    with integrity.staged(out, ErasureError) as stage, integrity.writing(out, ErasureError):
        _write_folder(erasure, base_model, stage, out, report, report_md)
        integrity.publish(stage, out)
    return out


def _write_folder(erasure: Erasure, base_model, stage: pathlib.Path, out: pathlib.Path,
                  report: Mapping[str, Any] | None, report_md: str | None) -> None:
    """Every file of the erasure folder into `stage`, checksums last (`out`: the destination,
    for messages)."""
    from kif import models

    tensors, deltas_meta, hooks_meta = _tensors_and_meta(erasure)
    erased_hash = None
    if erasure.deltas:
        with erasure.apply(base_model) as applied:
            erased_hash = models.weight_hash(applied.model)
            originals = {f"orig/{n}": t.cpu().contiguous() for n, t in applied._originals.items()}
            originals |= {f"hf/{n}": t.detach().cpu().contiguous()
                          for n, t in models.exact_hf_tensors(base_model).items()}
            models.save_into(applied.model, stage, dtype=torch.float32, where=out)
        save_file(originals, str(stage / RESTORE))
    save_file(tensors, str(stage / TENSORS))
    for n, v in erasure.delta_norms().items():
        deltas_meta[n]["norm"] = v
    manifest = {
        "format": FORMAT, "version": VERSION, "method": erasure.method,
        "concepts": list(erasure.concepts), "kind": erasure.kind,
        "base": {"spec": erasure.base_spec, "weight_sha256": erasure.base_hash,
                 "dtype": _dtype_of(base_model), **_base_config(base_model)},
        "erased_weight_sha256": erased_hash,
        "settings": _jsonable(erasure.settings), "info": _jsonable(erasure.info),
        "deltas": deltas_meta, "hooks": hooks_meta,
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # the checksums cover what the readers parse, not the reports a person may annotate
    integrity.write_sums(stage)
    if report is not None:
        (stage / "report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    if report_md is not None:
        (stage / "report.md").write_text(report_md)


def _tensors_and_meta(erasure: Erasure) -> tuple[dict[str, torch.Tensor], dict, list]:
    tensors: dict[str, torch.Tensor] = {}
    deltas_meta = {}
    for name, d in erasure.deltas.items():
        for part in ("dense", "a", "b"):
            t = getattr(d, part)
            if t is not None:
                tensors[f"delta/{name}/{part}"] = t.detach().float().cpu().contiguous()
        deltas_meta[name] = {"kind": "dense" if d.dense is not None else "low-rank",
                             "rank": d.rank, "numel": d.numel()}
    hooks_meta = []
    for i, op in enumerate(erasure.hooks):
        for key, t in op.tensors.items():
            tensors[f"hook/{i}/{key}"] = t.detach().cpu().contiguous()
        hooks_meta.append({"hook": op.hook, "op": op.op, "params": _jsonable(op.params),
                           "tensors": sorted(op.tensors)})
    return tensors, deltas_meta, hooks_meta


def _dtype_of(model) -> str:
    """The precision the erasure was computed in (its hashes are of weights in that dtype)."""
    from kif.devices import dtype_name

    return dtype_name(next(model.parameters()).dtype)


def _recorded_dtype(m: Mapping[str, Any]):
    """The torch dtype a manifest's hashes were taken in (fp32 for manifests that predate it)."""
    from kif.devices import torch_dtype

    name = m["base"].get("dtype", "fp32")
    return torch_dtype(name if isinstance(name, str) else repr(name))


def _base_config(model) -> dict[str, Any]:
    """What the erased checkpoint's config.json may say otherwise than the base's: an edit that
    makes the embedding and the unembedding differ is saved untied (`kif.models.save`), and
    `restore` ties them again."""
    tied = getattr(getattr(model, "kif_hf_config", None), "tie_word_embeddings", None)
    return {} if tied is None else {"tie_word_embeddings": bool(tied)}


def _manifest(path: pathlib.Path) -> dict[str, Any]:
    """The folder's manifest, after its checksums (when it has them) have matched every file:
    a flipped byte or a swapped file is refused before anything in the folder is parsed."""
    if not (path / MANIFEST).is_file():
        raise ErasureError(f"{path} is not an erasure folder (no {MANIFEST})")
    sealed = (path / integrity.SUMS).is_file()
    if sealed:
        integrity.verify(path, error=ErasureError, what="erasure folder")
    try:
        m = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ErasureError(f"{path / MANIFEST} is not valid JSON "
                           f"({getattr(e, 'msg', type(e).__name__)})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ErasureError(f"{path / MANIFEST} is not a kif erasure manifest")
    if m.get("version") not in READABLE or isinstance(m.get("version"), bool):
        raise ErasureError(f"{path} has erasure format version {str(m.get('version'))[:40]!r}; "
                           f"this kif reads versions {', '.join(map(str, READABLE))}")
    if m["version"] >= 2 and not sealed:
        raise ErasureError(f"{path} lacks {integrity.SUMS}, which format version "
                           f"{m['version']} writes: the folder was modified")
    return m


def _load_tensors(file: pathlib.Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ErasureError(f"{file} is not a readable safetensors file "
                           f"({type(e).__name__})") from None


def load_erasure(path: str | os.PathLike) -> Erasure:
    """The `Erasure` stored in an erasure folder."""
    return _read(pathlib.Path(path).expanduser().resolve())[1]


def _read(p: pathlib.Path) -> tuple[dict[str, Any], Erasure]:
    """The folder's manifest (checksums verified, read once) and the `Erasure` it holds."""
    m = _manifest(p)
    t = _load_tensors(p / TENSORS)
    try:
        return m, _erasure_of(m, t)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # a version-1 folder has no checksums: a hand-edited manifest gets here
        raise ErasureError(f"{p / MANIFEST} is not a valid erasure manifest "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
                           ) from None


def _erasure_of(m: dict[str, Any], t: dict[str, torch.Tensor]) -> Erasure:
    deltas = {}
    for name in _listed(m, "deltas", dict):
        parts = {k: t.get(f"delta/{name}/{k}") for k in ("dense", "a", "b")}
        deltas[name] = Delta(**parts)
    hooks = tuple(HookOp(hook=str(h["hook"]), op=str(h["op"]), params=dict(h["params"]),
                         tensors={str(k): t[f"hook/{i}/{k}"] for k in h["tensors"]})
                  for i, h in enumerate(_listed(m, "hooks", list)))
    base = _listed(m, "base", dict)
    return Erasure(method=str(m["method"]), concepts=tuple(str(c) for c in m["concepts"]),
                   base_hash=str(base["weight_sha256"]), base_spec=str(base["spec"]),
                   deltas=deltas, hooks=hooks, settings=dict(m["settings"]), info=dict(m["info"]))


def _listed(m: dict[str, Any], key: str, kind: type) -> Any:
    if not isinstance(m[key], kind):
        raise TypeError(f"{key!r} is a {type(m[key]).__name__}, not a {kind.__name__}")
    return m[key]


def open_model(spec: str | os.PathLike, *, dtype=None, device: str = "cpu"):
    """A model name or checkpoint path -> `kif.models.load(spec)`; an erasure folder -> the erased
    model (weight methods: the saved checkpoint, checked against the manifest's hash; hook
    methods: the base model with the patch as permanent hooks).

    `dtype` (a torch dtype; None: float32, or an erasure folder's own precision) and `device` are
    `kif.models.load`'s. An erasure folder is opened in the precision its hashes were taken in,
    checked, and only then cast to `dtype`."""
    from kif import models

    if not is_erasure_folder(spec):
        return models.load(spec, **({} if dtype is None else {"dtype": dtype}), device=device)
    p = pathlib.Path(spec).expanduser().resolve()
    m, erasure = _read(p)
    recorded = _recorded_dtype(m)
    if erasure.deltas:
        model = models.load(p, dtype=recorded, device=device)
        if models.weight_hash(model) != m.get("erased_weight_sha256"):
            raise ErasureError(f"the checkpoint in {p} does not match its manifest (edited "
                               f"after it was written?)")
        from kif.erasure.hooks import build_hook

        for op in erasure.hooks:
            model.add_hook(op.hook, build_hook(op), is_permanent=True)
    else:
        model = models.load(erasure.base_spec, dtype=recorded, device=device)
        erasure.apply(model)
    if dtype is not None and dtype != recorded:
        model.to(dtype, print_details=False)  # TransformerLens: the weights and cfg.dtype
    return model


def restore(path: str | os.PathLike, out_dir: str | os.PathLike, *,
            device: str = "cpu") -> pathlib.Path:
    """Write the base model of an erasure folder to `out_dir`, its weights bit for bit those the
    erasure was computed on (checked against the manifest's SHA-256, in the precision the
    manifest records: a restore has no dtype of its own)."""
    from kif import models

    p = pathlib.Path(path).expanduser().resolve()
    m, _ = _read(p)  # the manifest's structure checked before anything is loaded or written
    out = _destination(out_dir)
    recorded = _recorded_dtype(m)
    if m["deltas"]:
        model = models.load(p, dtype=recorded, device=device)
        originals = _load_tensors(p / RESTORE)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in m["deltas"]:
                key = f"orig/{name}"
                if key not in originals or name not in params:
                    raise ErasureError(f"{p / RESTORE} lacks the original of {name!r}")
                params[name].copy_(originals[key])
    else:
        model = models.load(m["base"]["spec"], dtype=recorded, device=device)
    if models.weight_hash(model) != m["base"]["weight_sha256"]:
        raise ErasureError(f"restoring {p} did not give the base weights back (hash mismatch): "
                           f"the folder was modified")
    if m["deltas"]:
        # the base checkpoint's own bits where the hooked model holds them rounded
        models.keep_exact_hf_tensors(model, {k[3:]: t for k, t in originals.items()
                                             if k.startswith("hf/")})
        tied = m["base"].get("tie_word_embeddings")
        if tied is not None and getattr(model, "kif_hf_config", None) is not None:
            model.kif_hf_config = copy.deepcopy(model.kif_hf_config)
            model.kif_hf_config.tie_word_embeddings = tied
    return models.save(model, out)


__all__ = ["FORMAT", "is_erasure_folder", "load_erasure", "open_model", "restore", "save_erasure"]
