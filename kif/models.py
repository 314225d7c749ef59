"""Model I/O: Hugging Face causal-LM checkpoints in, hooked TransformerLens models out, and back.

`load` turns a checkpoint (a kif zoo name, a local HF folder, or a hub name) into a
`transformer_lens.HookedTransformer` whose logits equal the HF model's; every other kif module
works on that hooked model through canonical hook names (`blocks.{l}.hook_resid_post`, ...).
`save` writes a (possibly edited) hooked model back as an HF checkpoint that plain
`transformers.AutoModelForCausalLM.from_pretrained` loads, through the inverse weight conversion
`to_hf`. `weight_hash` is the SHA-256 that reversible edits are keyed on (DESIGN convention 9).

Only safetensors and JSON are read from disk (DESIGN convention 10): a checkpoint that ships only
pickle weights (`pytorch_model.bin`) is refused, never unpickled.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from kif.errors import KifError

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelIOError",
    "ModelLoadError",
    "ModelSaveError",
    "architecture",
    "exact_hf_tensors",
    "keep_exact_hf_tensors",
    "load",
    "save",
    "snap_to_exportable",
    "to_hf",
    "weight_hash",
]

#: HF architectures (config.json "architectures"[0]) that kif both loads and saves back.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "GemmaForCausalLM",
    "MistralForCausalLM",
)

# Weight files kif refuses to read because they are pickles (DESIGN convention 10).
_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tokenizer files, copied verbatim from the source checkpoint on save: re-serialising a loaded
# tokenizer is not faithful (transformers 5 swaps in the model type's tokenizer class and writes
# load-time options such as local_files_only into tokenizer_config.json).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Any of these means the checkpoint ships a tokenizer (the others only accompany one).
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Files fetched from the hub: configs, safetensors weights and tokenizer files, never pickles.
_HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
# Substrings of a path that make TransformerLens guess the architecture from the name
# (convert_hf_model_config checks `"llama" in name`, `"gemma" in name` before reading config.json).
_TL_NAME_TRIGGERS = ("llama", "gemma")
# Tokens fed through both models to check a conversion; short, so checking stays cheap.
_VERIFY_TOKENS = 8
# Logit agreement required between HF and TL after a conversion, relative to the logit scale.
# Measured differences are ~1e-6 in float32 (only summation order differs); 1e-3 leaves room for
# real checkpoints with large logits while still catching any mis-mapped weight (errors of O(1)).
_VERIFY_RTOL = 1e-3


class ModelIOError(KifError):
    """Base of kif's model I/O errors: `str(err)` is one line, meant to be shown to the user."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class ModelLoadError(ModelIOError):
    """A checkpoint could not be loaded."""


class ModelSaveError(ModelIOError):
    """A hooked model could not be converted to HF or written to disk."""


def _one_line(message: str, limit: int = 400) -> str:
    """Collapse whitespace so that messages from deep inside libraries print on one line."""
    text = re.sub(r"\s+", " ", str(message)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, with its type when it has no text."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a checkpoint was found: the local folder to read and how to name it."""

    folder: pathlib.Path
    name: str
    origin: str  # "zoo", "local" or "hub", for messages


def load(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    device_map: str | dict[str, str | int] | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_memory: dict[str | int, str | int] | None = None,
) -> torch.nn.Module:
    """Load an HF causal-LM checkpoint as a `HookedTransformer` with logits equal to HF's.

    `device_map` places a model too large for one device across several (accelerate's
    `dispatch_model` on the hooked model; see `_dispatch`): a dict from the hooked model's module
    names (`embed`, `pos_embed`, `blocks.{l}`, `ln_final`, `unembed`, or "" for all) to a device
    (`"cuda:0"`, `0`, `"cpu"`, or `"disk"`, which needs `offload_folder`), or `"auto"`,
    `"balanced"`, `"balanced_low_0"`, `"sequential"` to let accelerate fill the devices
    (`max_memory` caps each). Modules offloaded to the CPU (when a GPU executes) or to the disk
    hold meta tensors between forwards: forwards and hooks work (the logit check runs on the
    dispatched model), reading or editing their weights does not. Exclusive with `device`.

    `name_or_path` is tried as (a) a kif zoo name, (b) an existing local folder holding
    config.json and safetensors weights, (c) a hub model name (only when it is not an existing
    path; fails cleanly offline). No LayerNorm folding or weight centring is applied, so the
    hooked weights are the checkpoint's weights and `save` can invert the conversion exactly.

    With `verify` (default), a few random tokens are run through both the HF and the hooked model
    and any disagreement raises `ModelLoadError` instead of returning a silently wrong model
    (checked in float32/float64 only: half-precision kernels differ too much between the two).

    The returned model carries `kif_source` (what was asked for), `kif_name` (zoo or folder
    name), `kif_hf_config` (the transformers config, needed by `save`), `kif_source_dir` (the
    folder read), `kif_tokenizer` (an untouched copy of the checkpoint's tokenizer, or None) and
    `kif_tokenizer_files` (the tokenizer files' bytes, written back unchanged by `save`),
    `kif_generation_config` (or None) and `kif_hf_exact` (the checkpoint's tensors that TL's
    conversion rounds, e.g. Gemma's norms, written back by `save` while the model leaves them
    unchanged: `exact_hf_tensors`).

    Raises:
        ModelLoadError: with a one-line message, for every failure.
    """
    if device_map is not None and torch.device(device) != torch.device("cpu"):
        raise ModelLoadError(f"cannot load model '{name_or_path}': pass device or device_map, "
                             "not both")
    try:
        source = _resolve_source(name_or_path)
        placement = None if device_map is None else _Placement(device_map, offload_folder,
                                                                max_memory)
        return _load_folder(source, str(name_or_path), device=device, dtype=dtype, verify=verify,
                            placement=placement)
    except ModelLoadError:
        raise
    except Exception as err:  # a library failure we did not anticipate: still one clear line
        raise ModelLoadError(
            f"cannot load model '{name_or_path}': {type(err).__name__}: {_first_line(err)}"
        ) from err


def _resolve_source(name_or_path: str | os.PathLike) -> _Source:
    """Find the local folder for a zoo name, a path, or a hub name (downloading the latter)."""
    text = str(os.fspath(name_or_path))
    if not text.strip():
        raise ModelLoadError("cannot load model '': empty model name or path")
    # Zoo names are plain strings; a Path object always means a filesystem path.
    if isinstance(name_or_path, str):
        zoo_folder = _zoo_resolve(text)
        if zoo_folder is not None:
            if not (zoo_folder / "config.json").is_file():
                raise ModelLoadError(
                    f"zoo model '{text}' is not built yet (no checkpoint in '{zoo_folder}'); "
                    "run `kif zoo build`"
                )
            from kif import zoo

            zoo.verify(zoo_folder, ModelLoadError, f"zoo model '{text}'")
            return _Source(zoo_folder.resolve(), text, "zoo")
    path = pathlib.Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"'{text}' is not a checkpoint folder (it is a file)")
        resolved = path.resolve()
        return _Source(resolved, resolved.name, "local")
    if _looks_like_path(text):
        raise ModelLoadError(f"cannot load model '{text}': no such file or directory")
    return _Source(_hub_snapshot(text), text, "hub")


def _zoo_resolve(name: str) -> pathlib.Path | None:
    """`kif.zoo.resolve(name)`, or None when there is no zoo (yet) or `name` is not in it."""
    try:
        from kif import zoo
    except ImportError:
        return None
    try:
        found = zoo.resolve(name)
    except AttributeError:
        return None
    return None if found is None else pathlib.Path(found)


def _looks_like_path(text: str) -> bool:
    """True for strings that can only be filesystem paths, never hub ids like 'org/model'."""
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith("/")
    )


def _hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads the variables only at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    env = any(str(v).strip().upper() in {"1", "ON", "YES", "TRUE"} for v in flags if v)
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_snapshot(name: str) -> pathlib.Path:
    """Download (or find in the local cache) a hub repo's config, safetensors and tokenizer."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hub_offline()
    try:
        folder = snapshot_download(
            repo_id=name, allow_patterns=_HUB_ALLOW_PATTERNS, local_files_only=offline
        )
    except HFValidationError as err:
        raise ModelLoadError(
            f"cannot load model '{name}': not an existing path and not a valid hub model name"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelLoadError(f"cannot load model '{name}': no such model on the hub") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as err:
        why = "hub access is disabled (HF_HUB_OFFLINE)" if offline else "the hub is unreachable"
        raise ModelLoadError(
            f"cannot load model '{name}': not a local checkpoint folder, not in the local hub "
            f"cache, and {why}"
        ) from err
    except Exception as err:
        raise ModelLoadError(
            f"cannot load model '{name}': hub download failed: {_first_line(err)}"
        ) from err
    return pathlib.Path(folder)


def _read_config_json(folder: pathlib.Path) -> dict[str, Any]:
    """config.json as a dict, or a ModelLoadError naming what is wrong with it."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"'{folder}' is not a checkpoint folder (no config.json)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(
            f"'{config_path}' is not a valid JSON config: {_first_line(err)}"
        ) from err
    if not isinstance(raw, dict):
        raise ModelLoadError(f"'{config_path}' is not a valid config (not a JSON object)")
    return raw


def _architecture_from_config(raw: dict[str, Any], folder: pathlib.Path) -> str:
    """The checkpoint's architecture, as named by config.json (never guessed from the path)."""
    names = raw.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ModelLoadError(
            f"'{folder / 'config.json'}' names no architecture (no \"architectures\" list)"
        )
    arch = names[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _check_weight_files(folder: pathlib.Path) -> None:
    """Refuse folders without safetensors weights, naming pickle-only checkpoints explicitly."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.endswith(_PICKLE_WEIGHT_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            f"'{folder}' holds only pickle weights ({', '.join(pickles)}); kif reads safetensors "
            "only: convert it with transformers' save_pretrained(..., safe_serialization=True) "
            "in a trusted environment"
        )
    raise ModelLoadError(f"'{folder}' has no weights (no model.safetensors)")


def _rope_theta(hf_config: Any) -> float | None:
    """The rotary base of a transformers 5 config (`rope_parameters`) or an older one."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    for name in ("rope_theta", "rotary_emb_base"):
        if getattr(hf_config, name, None) is not None:
            return float(getattr(hf_config, name))
    return None


def _rope_type(hf_config: Any) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if isinstance(params, dict):
        return str(params.get("rope_type") or params.get("type") or "default")
    return "default"


def _check_config_supported(arch: str, hf_config: Any) -> None:
    """Refuse config options the TL 3.9 conversion silently ignores (it would give wrong logits)."""
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        head_dim = getattr(hf_config, "head_dim", None)
        default = hf_config.hidden_size // hf_config.num_attention_heads
        if head_dim is not None and head_dim != default:
            raise ModelLoadError(
                f"unsupported {arch} config: head_dim {head_dim} != hidden_size / "
                f"num_attention_heads ({default})"
            )
    # TL drops Llama's optional biases and ignores Qwen2's sliding window (which a short
    # verification input would not reveal), so these are refused up front. TL fills Gemma's
    # attention biases with zeros whatever the checkpoint holds, and its GPT-NeoX converter
    # reads a fused q/k/v bias that `attention_bias=false` checkpoints lack. (Mistral's sliding
    # window TL does apply, as transformers does: checked on a 4-token window.)
    flags = {
        "LlamaForCausalLM": ("attention_bias", "mlp_bias"),
        "Qwen2ForCausalLM": ("use_sliding_window",),
        "GemmaForCausalLM": ("attention_bias",),
    }
    for flag in flags.get(arch, ()):
        if getattr(hf_config, flag, False):
            raise ModelLoadError(f"unsupported {arch} config: {flag}=true")
    if arch == "GPTNeoXForCausalLM" and not getattr(hf_config, "attention_bias", True):
        raise ModelLoadError(f"unsupported {arch} config: attention_bias=false")
    if arch == "GemmaForCausalLM" and _rope_type(hf_config) != "default":
        # kif builds Gemma's TL config itself (see `_gemma_tl_config`), with plain rotary
        raise ModelLoadError(f"unsupported {arch} config: rope type {_rope_type(hf_config)!r}")


def _load_folder(
    source: _Source, requested: str, *, device: str | torch.device, dtype: torch.dtype, verify: bool,
    placement: "_Placement | None" = None,
) -> Any:
    """Load the checkpoint in `source.folder` (see `load`)."""
    folder = source.folder
    raw = _read_config_json(folder)
    arch = _architecture_from_config(raw, folder)
    _check_weight_files(folder)
    hf_config = _hf_config(folder)
    _check_config_supported(arch, hf_config)
    _check_weights_fit_config(folder, hf_config)
    hf_model = _hf_model(folder, hf_config, arch, dtype)
    tokenizer = _hf_tokenizer(folder)
    model = _hooked_from_hf(hf_model, hf_config, arch, tokenizer, source, device, dtype)
    if placement is not None:
        _dispatch(model, placement)
    if verify:
        _verify_logits(hf_model, model, what=f"loading '{requested}'", error=ModelLoadError)
    model.kif_hf_exact = _exact_from_checkpoint(model, hf_model, arch)
    model.kif_source = requested
    model.kif_name = source.name
    model.kif_hf_config = hf_config
    model.kif_source_dir = folder
    model.kif_tokenizer = tokenizer
    model.kif_tokenizer_files = _read_tokenizer_files(folder) if tokenizer is not None else {}
    has_generation_config = (folder / "generation_config.json").is_file()
    model.kif_generation_config = (
        copy.deepcopy(hf_model.generation_config) if has_generation_config else None
    )
    logger.info("loaded %s (%s, %s) from %s", source.name, arch, source.origin, folder)
    return model


def _hf_config(folder: pathlib.Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read config of '{folder}': {_first_line(err)}") from err


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files transformers reads: the index's shards, else model.safetensors
    (other variants beside them, such as an fp16 copy or an unfetched LFS pointer, are not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = json.loads(index.read_text())["weight_map"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"cannot read weights of '{folder}': {index.name} is not a "
                                 "valid safetensors index") from None
        return [folder / str(n) for n in sorted(set(shards))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def _safetensors_shapes(folder: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the folder's safetensors files, read from their headers alone."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception as err:  # safetensors raises several types for corrupt files
            raise ModelLoadError(f"cannot read weights of '{folder}': {f.name} is not a readable "
                                 f"safetensors file ({type(err).__name__})") from None
    return shapes


def _check_weights_fit_config(folder: pathlib.Path, hf_config: Any) -> None:
    """Refuse a config.json that does not describe the weights beside it (another
    architecture's config, an edited size) before transformers allocates the model it
    describes (a config without sizes gets transformers' defaults, a model of billions of
    parameters): the parameter shapes the config implies, built on the meta device (no
    memory), against the safetensors headers."""
    from transformers import AutoModelForCausalLM

    have = _safetensors_shapes(folder)
    try:
        with torch.device("meta"), _quiet_tl():
            built = AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:
        raise ModelLoadError(f"cannot build the model config.json in '{folder}' describes: "
                             f"{_first_line(err)}") from None
    want = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    # checkpoints of the bare base model (the hub's original `gpt2`) store its keys without
    # the prefix (`h.0...` for `transformer.h.0...`); transformers maps them, so does this
    prefix = getattr(built, "base_model_prefix", "")
    if prefix:
        have |= {f"{prefix}.{k}": s for k, s in have.items() if not k.startswith(prefix + ".")}
    wrong = [k for k in want.keys() & have.keys() if want[k] != have[k]]
    found = sum(math.prod(s) for k, s in want.items() if k in have)
    total = sum(math.prod(s) for s in want.values())
    if wrong or found < 0.5 * total:
        what = (f"{wrong[0]} is {have[wrong[0]]} in the weights, {want[wrong[0]]} by the config"
                if wrong else f"the weights hold {found / max(total, 1):.0%} of the parameters it "
                "describes")
        raise ModelLoadError(f"config.json in '{folder}' does not describe the weights beside "
                             f"it ({what})")


def _hf_model(folder: pathlib.Path, hf_config: Any, arch: str, dtype: torch.dtype) -> Any:
    """The HF model, read from safetensors only (`use_safetensors=True` never falls back)."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_hf_bars():
            hf_model = AutoModelForCausalLM.from_pretrained(
                folder, config=hf_config, dtype=dtype, local_files_only=True,
                use_safetensors=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read weights of '{folder}': {_first_line(err)}") from err
    if type(hf_model).__name__ != arch:
        raise ModelLoadError(
            f"'{folder}': config.json says {arch} but transformers built {type(hf_model).__name__}"
        )
    hf_model.eval()
    for param in hf_model.parameters():
        param.requires_grad_(False)
    return hf_model


def _hf_tokenizer(folder: pathlib.Path) -> Any:
    """The folder's tokenizer, or None (with a warning) when the checkpoint ships none."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in _TOKENIZER_MARKERS):
        logger.warning("'%s' has no tokenizer; the hooked model will accept token ids only", folder)
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read tokenizer of '{folder}': {_first_line(err)}") from err


def _read_tokenizer_files(folder: pathlib.Path) -> dict[str, bytes]:
    """The checkpoint's tokenizer files, kept in memory so `save` can write them unchanged."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    wanted = sorted(n for n in names if n in _TOKENIZER_FILES or n.endswith(".tiktoken"))
    return {name: (folder / name).read_bytes() for name in wanted}


def _neutral_config_dir(parent: pathlib.Path, hf_config: Any, arch: str) -> pathlib.Path:
    """A config-only folder for TL whose path cannot trigger TL's name-based architecture guess.

    TL 3.9's `convert_hf_model_config` decides the architecture from the *path string* when it
    contains "llama" or "gemma" (and then skips reading config.json, crashing or mis-loading), and
    reads `n_ctx` from GPT-2 configs, which transformers 5 no longer writes. Handing TL a copy of
    the config in a neutrally named folder makes loading depend on config.json alone.
    """
    stage = parent / "checkpoint"
    if any(trigger in str(stage).lower() for trigger in _TL_NAME_TRIGGERS):
        raise ModelLoadError(
            f"temporary folder '{parent}' contains 'llama' or 'gemma', which TransformerLens "
            "would misread as an architecture; set TMPDIR to another folder"
        )
    staged = copy.deepcopy(hf_config)
    staged.architectures = [arch]
    if arch == "GPT2LMHeadModel" and getattr(staged, "n_ctx", None) is None:
        staged.n_ctx = staged.n_positions
    staged.save_pretrained(stage)
    return stage


def _gemma_tl_config(hf_config: Any, name: str, device: Any, dtype: torch.dtype) -> Any:
    """TL's config for a Gemma (1) checkpoint, from its config.json.

    TL 3.9 knows Gemma only by hub name (`google/gemma-2b`, ... with hard-coded dimensions) and
    raises NotImplementedError for a GemmaForCausalLM folder under any other name; its weight
    converter (`convert_gemma_weights`, dispatched on `original_architecture`) is generic. The
    fields are those of TL's own gemma-2b entry, read from the config instead; `_verify_logits`
    checks the result against HF like every other conversion.
    """
    from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    act = hf_config.hidden_act  # what transformers' GemmaMLP applies (legacy "gelu" -> tanh)
    theta = _rope_theta(hf_config)
    return HookedTransformerConfig.from_dict({
        "d_model": hf_config.hidden_size,
        "d_head": head_dim,
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": act,
        "initializer_range": getattr(hf_config, "initializer_range", 0.02),
        "normalization_type": "RMS",
        "rotary_base": 10000.0 if theta is None else theta,
        "rotary_dim": head_dim,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "gated_mlp": True,
        "final_rms": True,
        "original_architecture": "GemmaForCausalLM",
        # what get_pretrained_model_config adds to every converted config
        "model_name": name,
        "tokenizer_name": None,
        "init_weights": False,
        "from_checkpoint": False,
        "device": device,
        "n_devices": 1,
        "dtype": dtype,
        "default_prepend_bos": True,
    })


def _tl_overrides(arch: str, hf_config: Any) -> dict[str, Any]:
    """Config fields TL 3.9 derives wrongly or slowly for some checkpoints (verified by
    `_verify_logits`)."""
    out: dict[str, Any] = {}
    if arch == "GPTNeoXForCausalLM" and _rope_theta(hf_config) is not None:
        # TL's GPT-NeoX config leaves the rotary base at its default (10000, Pythia's)
        out["rotary_base"] = _rope_theta(hf_config)
    if arch == "GPT2LMHeadModel" and getattr(hf_config, "n_inner", None):
        # TL assumes d_mlp = 4 * n_embd and ignores GPT-2's optional n_inner.
        out["d_mlp"] = int(hf_config.n_inner)
    if arch == "GPT2LMHeadModel" and getattr(hf_config, "activation_function", None) == "gelu_new":
        # The same tanh approximation, fused: TL's Python gelu_new was 30 % of a CPU forward
        # of the zoo model (profiled on `kif eval`); results agree to float rounding.
        out["act_fn"] = "gelu_pytorch_tanh"
    return out


def _hooked_from_hf(
    hf_model: Any,
    hf_config: Any,
    arch: str,
    tokenizer: Any,
    source: _Source,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Any:
    """Convert a loaded HF model with TL's own config and weight converters (no processing)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    with tempfile.TemporaryDirectory(prefix="kif-tl-config-") as tmp:
        stage = str(_neutral_config_dir(pathlib.Path(tmp), hf_config, arch))
        with _quiet_tl():
            if arch == "GemmaForCausalLM":
                cfg = _gemma_tl_config(hf_config, source.name, device, dtype)
            else:
                cfg = get_pretrained_model_config(
                    stage, hf_cfg=hf_config.to_dict(), fold_ln=False, device=device, dtype=dtype
                )
            state_dict = get_pretrained_state_dict(stage, cfg, hf_model=hf_model, dtype=dtype)
    overrides = _tl_overrides(arch, hf_config)
    if overrides:
        cfg = type(cfg).from_dict({**cfg.to_dict(), **overrides})
    cfg.model_name = source.name
    # TL reloads the tokenizer from this name (to add BOS); the staged folder is gone by now.
    cfg.tokenizer_name = str(source.folder) if tokenizer is not None else None
    with _quiet_tl():
        # TL's set_tokenizer mutates (or replaces) the tokenizer it is given; keep ours pristine.
        tl_tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        model = HookedTransformer(cfg, tokenizer=tl_tokenizer)
    if tokenizer is not None and tokenizer.bos_token is None and model.cfg.default_prepend_bos:
        # A tokenizer without a BOS token (Qwen's, and Llama-architecture checkpoints that reuse
        # one) means the model was trained with none: TL would prepend its stand-in (the EOS
        # token it names BOS), and every kif score would condition on a token the model never saw
        # first. kif.metrics.encode_prompts follows this flag.
        model.cfg.default_prepend_bos = False
    with _quiet_tl():
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
            refactor_factored_attn_matrices=False,
        )
    model.eval()
    return model


@dataclasses.dataclass(frozen=True)
class _Placement:
    """`load`'s device_map, offload_folder and max_memory."""

    device_map: str | dict[str, str | int]
    offload_folder: str | os.PathLike | None = None
    max_memory: dict[str | int, str | int] | None = None


_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _dispatch(model: Any, placement: _Placement) -> None:
    """Spread the hooked model over devices with accelerate's `dispatch_model`.

    It works on TransformerLens' own modules, not the HF model's: kif reads the hooked model, and
    TL converts an HF model through its state dict, which accelerate's offloaded modules hold as
    meta tensors. Each module listed in the map gets a hook that moves its inputs to its device
    (and, for CPU/disk offload, its weights in for the forward and out after), so a residual
    stream that leaves `blocks.3` on cuda:0 enters `blocks.4` on cuda:1. A whole block is never
    split (`TransformerBlock` is accelerate's no-split class here). `cfg.device` becomes the main
    execution device, where TL and kif put input tokens. The model is built in host memory first:
    this spreads a model over devices, it does not load one larger than host memory."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import check_device_map, get_balanced_memory

    dm = placement.device_map
    if isinstance(dm, str):
        if dm not in _AUTO_MAPS:
            raise ModelLoadError(f"device_map {dm!r}: use a dict or one of {', '.join(_AUTO_MAPS)}")
        no_split = ["TransformerBlock"]
        max_memory = placement.max_memory
        if dm != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory,
                                             no_split_module_classes=no_split,
                                             low_zero=dm == "balanced_low_0")
        dm = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dm = {str(k): v for k, v in dm.items()}
    unknown = sorted(set(dm) - {n for n, _ in model.named_modules()})
    if unknown:
        raise ModelLoadError(f"device_map names modules the hooked model does not have: "
                             f"{', '.join(unknown[:5])} (its modules: embed, pos_embed, "
                             f"blocks.0..{model.cfg.n_layers - 1}, ln_final, unembed)")
    try:
        check_device_map(model, dm)
    except ValueError as err:
        raise ModelLoadError(f"device_map: {_first_line(err)}") from err
    if "disk" in dm.values() and placement.offload_folder is None:
        raise ModelLoadError("device_map offloads to 'disk': pass offload_folder")
    gpu = [v for v in dm.values() if v not in ("cpu", "disk")]
    # a string: accelerate compares main_device with "cpu" to decide what counts as offloaded
    main = str(torch.device(f"cuda:{gpu[0]}" if isinstance(gpu[0], int) else gpu[0])) if gpu \
        else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dispatch_model(model, device_map=dm, main_device=main,
                       offload_dir=None if placement.offload_folder is None
                       else str(placement.offload_folder))
    model.cfg.device = main
    model.kif_device_map = dict(dm)


@contextlib.contextmanager
def quiet_hf_bars() -> Iterator[None]:
    """transformers' own progress bars off ("Loading weights" of a few-second read, "Writing
    model shards"): kif shows its own bars on long work, and a refusal after a model was loaded
    stays one line on stderr."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_tl() -> Iterator[None]:
    """Silence TL's deprecation warning for HookedTransformer: kif uses it on purpose (DESIGN)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        yield


@torch.no_grad()
def _verify_logits(hf_model: Any, hooked: Any, *, what: str, error: type[Exception]) -> None:
    """Run a few random tokens through both models; raise `error` if their logits disagree."""
    dtypes = {next(hooked.parameters()).dtype, next(hf_model.parameters()).dtype}
    if not dtypes <= {torch.float32, torch.float64}:
        logger.info("%s: skipping the logit check in reduced precision", what)
        return
    n_tokens = min(_VERIFY_TOKENS, hooked.cfg.n_ctx)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hooked.cfg.d_vocab, (1, n_tokens), generator=generator)
    hooked_logits = hooked(tokens.to(hooked.cfg.device)).float().cpu()
    hf_device = next(hf_model.parameters()).device
    hf_logits = hf_model(input_ids=tokens.to(hf_device)).logits.float().cpu()
    if hooked_logits.shape != hf_logits.shape:
        raise error(
            f"{what}: logits shapes differ (hooked {tuple(hooked_logits.shape)}, HF "
            f"{tuple(hf_logits.shape)})"
        )
    scale = max(1.0, hf_logits.abs().max().item())
    diff = (hooked_logits - hf_logits).abs().max().item()
    if not diff <= _VERIFY_RTOL * scale:
        raise error(
            f"{what}: hooked and HF logits disagree (max abs diff {diff:.3g} at logit scale "
            f"{scale:.3g}); this checkpoint uses a feature the conversion does not support"
        )


# --------------------------------------------------------------------------------------------
# Inverse conversion (TransformerLens -> HF)
# --------------------------------------------------------------------------------------------
#
# TL stores attention per head and multiplies activations on the left (x @ W), HF's nn.Linear
# stores [out, in] and computes x @ W.T, and GPT-2's Conv1D stores [in, out] (x @ W). Each rule
# below says which of these layouts it bridges.


def _heads_to_linear(w: Float[Tensor, "n d_model d_head"]) -> Float[Tensor, "out d_model"]:
    """TL W_Q/W_K/W_V [head, in, d_head] -> nn.Linear weight [(head d_head), in] (x @ W.T)."""
    return einops.rearrange(w, "n m h -> (n h) m")


def _heads_to_conv1d(w: Float[Tensor, "n d_model d_head"]) -> Float[Tensor, "d_model out"]:
    """TL W_Q/W_K/W_V [head, in, d_head] -> GPT-2 Conv1D slice [in, (head d_head)] (x @ W)."""
    return einops.rearrange(w, "n m h -> m (n h)")


def _out_heads_to_linear(w: Float[Tensor, "n d_head d_model"]) -> Float[Tensor, "d_model inner"]:
    """TL W_O [head, d_head, out] -> nn.Linear o_proj weight [out, (head d_head)]."""
    return einops.rearrange(w, "n h m -> m (n h)")


def _out_heads_to_conv1d(w: Float[Tensor, "n d_head d_model"]) -> Float[Tensor, "inner d_model"]:
    """TL W_O [head, d_head, out] -> GPT-2 Conv1D c_proj weight [(head d_head), out]."""
    return einops.rearrange(w, "n h m -> (n h) m")


def _head_bias(b: Float[Tensor, "n d_head"]) -> Float[Tensor, " out"]:
    """TL per-head bias [head, d_head] -> flat bias [(head d_head)], the order HF splits heads."""
    return einops.rearrange(b, "n h -> (n h)")


def _transpose(w: Float[Tensor, "a b"]) -> Float[Tensor, "b a"]:
    """TL MLP/unembed matrices are [in, out] (x @ W); nn.Linear stores [out, in]."""
    return w.T


def _same(t: Tensor) -> Tensor:
    """Tensors whose layout TL and HF share (embeddings, norms, Conv1D MLP weights, biases)."""
    return t


def _gpt2_qkv_weight(
    q: Float[Tensor, "n d_model d_head"],
    k: Float[Tensor, "n d_model d_head"],
    v: Float[Tensor, "n d_model d_head"],
) -> Float[Tensor, "d_model out"]:
    """GPT-2 fuses q, k, v in one Conv1D whose output is concat([q, k, v]) along dim 1."""
    return torch.cat([_heads_to_conv1d(q), _heads_to_conv1d(k), _heads_to_conv1d(v)], dim=1)


def _gpt2_qkv_bias(
    q: Float[Tensor, "n d_head"], k: Float[Tensor, "n d_head"], v: Float[Tensor, "n d_head"]
) -> Float[Tensor, " out"]:
    """The fused c_attn bias, concat([b_q, b_k, b_v])."""
    return torch.cat([_head_bias(q), _head_bias(k), _head_bias(v)])


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One HF tensor built from TL tensors: `hf` <- fn(*tl). `{l}` is the layer index."""

    hf: str
    tl: tuple[str, ...]
    fn: Callable[..., Tensor]
    # TL's own conversion of the HF tensor back to `tl[0]`, for tensors it rounds when it
    # converts them (Gemma adds 1 to its norms in float32 and scales its embedding): `fn` may not
    # give the checkpoint's bits back, so `load` keeps the checkpoint's tensor and export writes
    # it while the TL sources are unchanged (`exact_hf_tensors`); and an edit of `tl[0]` may
    # reach a value no checkpoint float converts to (`snap_to_exportable`)
    to_tl: Callable[[Tensor], Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class _ArchSpec:
    """The inverse conversion for one architecture.

    `zero_only` lists TL parameters that the HF architecture does not have (TL adds them as
    zeros); an edit that made one non-zero cannot be exported and is reported, never dropped.
    """

    rules: tuple[_Rule, ...]
    layer_rules: tuple[_Rule, ...]
    zero_only: tuple[str, ...] = ()
    layer_zero_only: tuple[str, ...] = ()
    # the HF tensors that `tie_word_embeddings` makes one (compared after conversion: Gemma's
    # TL embedding is the HF one scaled by sqrt(d_model))
    embed: str = "model.embed_tokens.weight"
    unembed: str = "lm_head.weight"


def _r(
    hf: str,
    tl: str | tuple[str, ...],
    fn: Callable[..., Tensor] = _same,
    to_tl: Callable[[Tensor], Tensor] | None = None,
) -> _Rule:
    return _Rule(hf, (tl,) if isinstance(tl, str) else tl, fn, to_tl)


_GPT2 = _ArchSpec(
    rules=(
        _r("transformer.wte.weight", "embed.W_E"),
        _r("transformer.wpe.weight", "pos_embed.W_pos"),
        _r("transformer.ln_f.weight", "ln_final.w"),
        _r("transformer.ln_f.bias", "ln_final.b"),
        _r("lm_head.weight", "unembed.W_U", _transpose),
    ),
    layer_rules=(
        _r("transformer.h.{l}.ln_1.weight", "blocks.{l}.ln1.w"),
        _r("transformer.h.{l}.ln_1.bias", "blocks.{l}.ln1.b"),
        _r(
            "transformer.h.{l}.attn.c_attn.weight",
            ("blocks.{l}.attn.W_Q", "blocks.{l}.attn.W_K", "blocks.{l}.attn.W_V"),
            _gpt2_qkv_weight,
        ),
        _r(
            "transformer.h.{l}.attn.c_attn.bias",
            ("blocks.{l}.attn.b_Q", "blocks.{l}.attn.b_K", "blocks.{l}.attn.b_V"),
            _gpt2_qkv_bias,
        ),
        _r("transformer.h.{l}.attn.c_proj.weight", "blocks.{l}.attn.W_O", _out_heads_to_conv1d),
        _r("transformer.h.{l}.attn.c_proj.bias", "blocks.{l}.attn.b_O"),
        _r("transformer.h.{l}.ln_2.weight", "blocks.{l}.ln2.w"),
        _r("transformer.h.{l}.ln_2.bias", "blocks.{l}.ln2.b"),
        # Conv1D is [in, out] like TL's W_in/W_out: no transpose.
        _r("transformer.h.{l}.mlp.c_fc.weight", "blocks.{l}.mlp.W_in"),
        _r("transformer.h.{l}.mlp.c_fc.bias", "blocks.{l}.mlp.b_in"),
        _r("transformer.h.{l}.mlp.c_proj.weight", "blocks.{l}.mlp.W_out"),
        _r("transformer.h.{l}.mlp.c_proj.bias", "blocks.{l}.mlp.b_out"),
    ),
    zero_only=("unembed.b_U",),
    embed="transformer.wte.weight",
)


def _neox_qkv_weight(
    q: Float[Tensor, "n d_model d_head"],
    k: Float[Tensor, "n d_model d_head"],
    v: Float[Tensor, "n d_model d_head"],
) -> Float[Tensor, "out d_model"]:
    """GPT-NeoX fuses q, k, v in one nn.Linear whose output rows are ordered (head, qkv, d_head):
    the inverse of TL's `rearrange(W, "(i qkv h) m -> qkv i m h")`."""
    return einops.rearrange(torch.stack([q, k, v]), "qkv i m h -> (i qkv h) m")


def _neox_qkv_bias(
    q: Float[Tensor, "n d_head"], k: Float[Tensor, "n d_head"], v: Float[Tensor, "n d_head"]
) -> Float[Tensor, " out"]:
    """The fused query_key_value bias, in the same (head, qkv, d_head) order."""
    return einops.rearrange(torch.stack([q, k, v]), "qkv i h -> (i qkv h)")


_NEOX = _ArchSpec(
    rules=(
        _r("gpt_neox.embed_in.weight", "embed.W_E"),
        _r("gpt_neox.final_layer_norm.weight", "ln_final.w"),
        _r("gpt_neox.final_layer_norm.bias", "ln_final.b"),
        _r("lm_head.weight", "unembed.W_U", _transpose),
    ),
    layer_rules=(
        _r("gpt_neox.layers.{l}.input_layernorm.weight", "blocks.{l}.ln1.w"),
        _r("gpt_neox.layers.{l}.input_layernorm.bias", "blocks.{l}.ln1.b"),
        _r(
            "gpt_neox.layers.{l}.attention.query_key_value.weight",
            ("blocks.{l}.attn.W_Q", "blocks.{l}.attn.W_K", "blocks.{l}.attn.W_V"),
            _neox_qkv_weight,
        ),
        _r(
            "gpt_neox.layers.{l}.attention.query_key_value.bias",
            ("blocks.{l}.attn.b_Q", "blocks.{l}.attn.b_K", "blocks.{l}.attn.b_V"),
            _neox_qkv_bias,
        ),
        _r("gpt_neox.layers.{l}.attention.dense.weight", "blocks.{l}.attn.W_O",
           _out_heads_to_linear),
        _r("gpt_neox.layers.{l}.attention.dense.bias", "blocks.{l}.attn.b_O"),
        _r("gpt_neox.layers.{l}.post_attention_layernorm.weight", "blocks.{l}.ln2.w"),
        _r("gpt_neox.layers.{l}.post_attention_layernorm.bias", "blocks.{l}.ln2.b"),
        _r("gpt_neox.layers.{l}.mlp.dense_h_to_4h.weight", "blocks.{l}.mlp.W_in", _transpose),
        _r("gpt_neox.layers.{l}.mlp.dense_h_to_4h.bias", "blocks.{l}.mlp.b_in"),
        _r("gpt_neox.layers.{l}.mlp.dense_4h_to_h.weight", "blocks.{l}.mlp.W_out", _transpose),
        _r("gpt_neox.layers.{l}.mlp.dense_4h_to_h.bias", "blocks.{l}.mlp.b_out"),
    ),
    zero_only=("unembed.b_U",),
    embed="gpt_neox.embed_in.weight",
)


def _exact_inverse(
    y: Tensor, forward: Callable[[Tensor], Tensor], guess: Tensor, prefer: Tensor | None = None
) -> Tensor:
    """An x with forward(x) == y bit for bit, where the float rounding of `forward` allows one.

    TL stores some weights transformed (Gemma: the embedding times sqrt(d_model), each RMSNorm
    weight plus 1). The plain inverse (`guess`) can miss by an ulp, and a weight the erasure did
    not touch would then come back from the saved checkpoint with other bits: `restore` would not
    be exact. Per element, the first of `prefer` (the value the weight came from, where known),
    `guess` and the two floats next to it that maps back to `y` is taken; `guess` where none
    does (an edited weight no float maps to exactly keeps its nearest).
    """
    up = torch.nextafter(guess, torch.full_like(guess, float("inf")))
    down = torch.nextafter(guess, torch.full_like(guess, float("-inf")))
    out, found = guess.clone(), torch.zeros_like(y, dtype=torch.bool)
    for c in ([] if prefer is None else [prefer]) + [guess, up, down]:
        ok = (forward(c) == y) & ~found
        out = torch.where(ok, c, out)
        found |= ok
    return out


def _gemma_scale(w: Tensor) -> Tensor:
    """Gemma's embedding scale sqrt(d_model), in the weight's dtype as TL and HF compute it."""
    return torch.tensor(w.shape[-1] ** 0.5, dtype=w.dtype, device=w.device)


def _gemma_embed_to_tl(e: Float[Tensor, "vocab d_model"]) -> Float[Tensor, "vocab d_model"]:
    """TL's W_E from HF's embedding (`convert_gemma_weights`): times sqrt(d_model)."""
    return e * _gemma_scale(e)


def _gemma_embed(w_e: Float[Tensor, "vocab d_model"], w_u: Float[Tensor, "d_model vocab"]
                 ) -> Float[Tensor, "vocab d_model"]:
    """HF's embedding from TL's W_E: divided by sqrt(d_model), preferring the unembedding (the
    same HF tensor under tied embeddings) wherever it converts to W_E."""
    prefer = w_u.T if tuple(w_u.T.shape) == tuple(w_e.shape) else None
    return _exact_inverse(w_e, _gemma_embed_to_tl, w_e / _gemma_scale(w_e), prefer)


def _gemma_norm_to_tl(w: Float[Tensor, " d_model"]) -> Float[Tensor, " d_model"]:
    """GemmaRMSNorm multiplies by (1 + weight); TL stores 1 + weight, computed in float32."""
    return (w.float() + 1.0).to(w.dtype)


def _gemma_norm(w: Float[Tensor, " d_model"]) -> Float[Tensor, " d_model"]:
    """HF's norm weight from TL's (1 + weight)."""
    return _exact_inverse(w, _gemma_norm_to_tl, (w.float() - 1.0).to(w.dtype))


def _llama_like_layer_rules(qkv_bias: bool) -> tuple[_Rule, ...]:
    """Per-layer rules shared by Llama and Qwen2 (Qwen2 adds q/k/v biases)."""
    attn = "model.layers.{l}.self_attn"
    rules = [
        _r("model.layers.{l}.input_layernorm.weight", "blocks.{l}.ln1.w"),
        _r(f"{attn}.q_proj.weight", "blocks.{l}.attn.W_Q", _heads_to_linear),
        # Under grouped-query attention TL's parameters are _W_K/_W_V with n_kv heads;
        # `_tl_tensor` falls back to them, so one rule covers both layouts.
        _r(f"{attn}.k_proj.weight", "blocks.{l}.attn.W_K", _heads_to_linear),
        _r(f"{attn}.v_proj.weight", "blocks.{l}.attn.W_V", _heads_to_linear),
        _r(f"{attn}.o_proj.weight", "blocks.{l}.attn.W_O", _out_heads_to_linear),
        _r("model.layers.{l}.post_attention_layernorm.weight", "blocks.{l}.ln2.w"),
        _r("model.layers.{l}.mlp.up_proj.weight", "blocks.{l}.mlp.W_in", _transpose),
        _r("model.layers.{l}.mlp.gate_proj.weight", "blocks.{l}.mlp.W_gate", _transpose),
        _r("model.layers.{l}.mlp.down_proj.weight", "blocks.{l}.mlp.W_out", _transpose),
    ]
    if qkv_bias:
        rules += [
            _r(f"{attn}.q_proj.bias", "blocks.{l}.attn.b_Q", _head_bias),
            _r(f"{attn}.k_proj.bias", "blocks.{l}.attn.b_K", _head_bias),
            _r(f"{attn}.v_proj.bias", "blocks.{l}.attn.b_V", _head_bias),
        ]
    return tuple(rules)


_LLAMA_LIKE_GLOBAL_RULES = (
    _r("model.embed_tokens.weight", "embed.W_E"),
    _r("model.norm.weight", "ln_final.w"),
    _r("lm_head.weight", "unembed.W_U", _transpose),
)
_LLAMA_LIKE_ZERO_ONLY = ("blocks.{l}.attn.b_O", "blocks.{l}.mlp.b_in", "blocks.{l}.mlp.b_out")
_NO_QKV_BIAS = ("blocks.{l}.attn.b_Q", "blocks.{l}.attn.b_K", "blocks.{l}.attn.b_V")


def _gemma_layer_rules() -> tuple[_Rule, ...]:
    """Llama's rules with Gemma's (1 + weight) norms."""
    norms = {
        "model.layers.{l}.input_layernorm.weight": "blocks.{l}.ln1.w",
        "model.layers.{l}.post_attention_layernorm.weight": "blocks.{l}.ln2.w",
    }
    return tuple(
        _r(rule.hf, rule.tl, _gemma_norm, _gemma_norm_to_tl) if rule.hf in norms else rule
        for rule in _llama_like_layer_rules(qkv_bias=False)
    )


_ARCH_SPECS: dict[str, _ArchSpec] = {
    "GPT2LMHeadModel": _GPT2,
    "LlamaForCausalLM": _ArchSpec(
        rules=_LLAMA_LIKE_GLOBAL_RULES,
        layer_rules=_llama_like_layer_rules(qkv_bias=False),
        zero_only=("unembed.b_U",),
        layer_zero_only=(*_NO_QKV_BIAS, *_LLAMA_LIKE_ZERO_ONLY),
    ),
    "Qwen2ForCausalLM": _ArchSpec(
        rules=_LLAMA_LIKE_GLOBAL_RULES,
        layer_rules=_llama_like_layer_rules(qkv_bias=True),
        zero_only=("unembed.b_U",),
        layer_zero_only=_LLAMA_LIKE_ZERO_ONLY,
    ),
    "GPTNeoXForCausalLM": _NEOX,
    # Mistral's weights are Llama's, under the same names
    "MistralForCausalLM": _ArchSpec(
        rules=_LLAMA_LIKE_GLOBAL_RULES,
        layer_rules=_llama_like_layer_rules(qkv_bias=False),
        zero_only=("unembed.b_U",),
        layer_zero_only=(*_NO_QKV_BIAS, *_LLAMA_LIKE_ZERO_ONLY),
    ),
    "GemmaForCausalLM": _ArchSpec(
        rules=(
            _r("model.embed_tokens.weight", ("embed.W_E", "unembed.W_U"), _gemma_embed,
               _gemma_embed_to_tl),
            _r("model.norm.weight", "ln_final.w", _gemma_norm, _gemma_norm_to_tl),
            _r("lm_head.weight", "unembed.W_U", _transpose),
        ),
        layer_rules=_gemma_layer_rules(),
        zero_only=("unembed.b_U",),
        layer_zero_only=(*_NO_QKV_BIAS, *_LLAMA_LIKE_ZERO_ONLY),
    ),
}
assert set(_ARCH_SPECS) == set(SUPPORTED_ARCHITECTURES)


def _tl_key(params: dict[str, Tensor], name: str) -> str | None:
    """The TL parameter name for `name`, trying the grouped-query form (`attn._W_K`) too."""
    if name in params:
        return name
    module, _, leaf = name.rpartition(".")
    gqa = f"{module}._{leaf}"
    return gqa if gqa in params else None


def _expand(names: tuple[str, ...], n_layers: int) -> Iterator[str]:
    for name in names:
        if "{l}" in name:
            yield from (name.format(l=layer) for layer in range(n_layers))
        else:
            yield name


def architecture(model: torch.nn.Module) -> str:
    """The HF architecture a hooked model came from (e.g. "LlamaForCausalLM")."""
    hf_config = getattr(model, "kif_hf_config", None)
    names = getattr(hf_config, "architectures", None)
    if names:
        return str(names[0])
    arch = getattr(getattr(model, "cfg", None), "original_architecture", None)
    if arch:
        return str(arch)
    raise ValueError("model has no known architecture (it was not loaded by kif.models.load)")


def export_frozen_parameters(model: torch.nn.Module) -> list[str]:
    """Parameters of the hooked model that its Hugging Face architecture has no weight for
    (TransformerLens adds them as zeros, e.g. GPT-2's `unembed.b_U`): training must leave them at
    zero, or the result cannot be saved as an HF checkpoint. Empty for unknown architectures."""
    try:
        spec = _ARCH_SPECS.get(architecture(model))
    except Exception:  # a model built in memory, with no HF architecture behind it
        return []
    if spec is None:
        return []
    params = dict(model.named_parameters())
    keys = (_tl_key(params, n) for n in _expand(spec.zero_only + spec.layer_zero_only,
                                                 model.cfg.n_layers))
    return sorted({k for k in keys if k is not None})


def _jobs(
    spec: _ArchSpec, params: dict[str, Tensor], n_layers: int
) -> Iterator[tuple[_Rule, str, list[str]]]:
    """(rule, HF name, TL parameter names) of every tensor `spec` builds."""
    jobs = [(rule, None) for rule in spec.rules]
    jobs += [(rule, layer) for layer in range(n_layers) for rule in spec.layer_rules]
    for rule, layer in jobs:
        tl_names = []
        for tl in rule.tl:
            name = tl.format(l=layer)
            key = _tl_key(params, name)
            if key is None:
                raise ModelSaveError(f"cannot export: the hooked model has no parameter '{name}'")
            tl_names.append(key)
        yield rule, rule.hf.format(l=layer), tl_names


def _hf_state_dict(model: Any, spec: _ArchSpec) -> dict[str, Tensor]:
    """Apply `spec`'s rules to the hooked model's parameters; every parameter must be used."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    n_layers = model.cfg.n_layers
    exact = getattr(model, "kif_hf_exact", None) or {}
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for rule, hf_name, tl_names in _jobs(spec, params, n_layers):
        used.update(tl_names)
        kept = exact.get(hf_name)
        if kept is not None and all(
            torch.equal(params[k], v.to(params[k].device)) for k, v in zip(tl_names, kept[0])
        ):
            out[hf_name] = kept[1].to(params[tl_names[0]].device)  # unchanged: the source's bits
            continue
        out[hf_name] = rule.fn(*(params[k] for k in tl_names)).contiguous()
    for name in _expand(spec.zero_only + spec.layer_zero_only, n_layers):
        key = _tl_key(params, name)
        if key is None:
            continue
        used.add(key)
        if torch.count_nonzero(params[key]).item():
            raise ModelSaveError(
                f"cannot export: '{key}' is non-zero but {architecture(model)} has no such weight"
            )
    unused = sorted(set(params) - used)
    if unused:
        raise ModelSaveError(
            f"cannot export: hooked parameters with no place in {architecture(model)}: "
            f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}"
        )
    return out


def exact_hf_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """The checkpoint tensors the hooked model cannot hold bit for bit (TL rounds when it
    converts them: Gemma's norms), by HF name, kept by `load`. Empty for most architectures."""
    return {name: hf for name, (_, hf) in (getattr(model, "kif_hf_exact", None) or {}).items()}


def keep_exact_hf_tensors(model: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Record `tensors` (HF name -> the checkpoint's tensor) as what the model's *current*
    weights export to, e.g. after `kif.erasure.restore` put the base weights back."""
    spec = _ARCH_SPECS.get(architecture(model))
    if spec is None or not tensors:
        return
    params = {name: p.detach() for name, p in model.named_parameters()}
    exact = dict(getattr(model, "kif_hf_exact", None) or {})
    for rule, hf_name, tl_names in _jobs(spec, params, model.cfg.n_layers):
        if rule.to_tl is not None and hf_name in tensors:
            exact[hf_name] = (tuple(params[k].clone() for k in tl_names),
                              tensors[hf_name].detach().clone())
    model.kif_hf_exact = exact


@torch.no_grad()
def snap_to_exportable(model: torch.nn.Module) -> list[str]:
    """Move, in place, every weight that TL's conversion rounds (Gemma's embedding and norms) to
    the value it will have after `save` and `load`, and return the names of those that moved.

    An edit of such a weight (full fine-tuning) can reach a float that no checkpoint tensor
    converts to (for Gemma's embedding, scaled by sqrt(d_model), about one in seven): saved, it
    would come back other bits, and the erased checkpoint would not match its manifest's hash.
    A weight its checkpoint gave is left as it is. No-op for architectures without such weights.
    """
    try:
        spec = _ARCH_SPECS.get(architecture(model))
    except ValueError:
        return []
    if spec is None or not any(r.to_tl is not None for r in spec.rules + spec.layer_rules):
        return []
    params = dict(model.named_parameters())
    detached = {name: p.detach() for name, p in params.items()}
    moved = []
    for rule, _, tl_names in _jobs(spec, detached, model.cfg.n_layers):
        if rule.to_tl is None:
            continue
        target = params[tl_names[0]]
        back = rule.to_tl(rule.fn(*(detached[k] for k in tl_names))).to(target.dtype)
        if not torch.equal(back, target):
            target.copy_(back)
            moved.append(tl_names[0])
    return moved


def _exact_from_checkpoint(model: Any, hf_model: Any, arch: str) -> dict[str, Any]:
    """For every rule TL rounds (with a `to_tl`) whose inverse misses the checkpoint's bits:
    (its TL sources at load, the checkpoint's tensor). Only those rules are checked: loading
    any other architecture costs nothing more."""
    spec = _ARCH_SPECS[arch]
    if not any(r.to_tl is not None for r in spec.rules + spec.layer_rules):
        return {}
    params = {name: p.detach() for name, p in model.named_parameters()}
    hf = hf_model.state_dict()
    out = {}
    for rule, hf_name, tl_names in _jobs(spec, params, model.cfg.n_layers):
        if rule.to_tl is None or hf_name not in hf:
            continue
        source = hf[hf_name].detach()
        value = rule.fn(*(params[k] for k in tl_names))
        if not torch.equal(value.to(device=source.device, dtype=source.dtype), source):
            out[hf_name] = (tuple(params[k].clone() for k in tl_names), source.clone())
    return out


def _export_config(
    model: Any, spec: _ArchSpec, dtype: torch.dtype, state_dict: dict[str, Tensor]
) -> Any:
    """A copy of the source config for the exported model (never mutates `kif_hf_config`)."""
    hf_config = getattr(model, "kif_hf_config", None)
    if hf_config is None:
        raise ModelSaveError(
            "cannot export: model has no kif_hf_config (load it with kif.models.load)"
        )
    config = copy.deepcopy(hf_config)
    config.dtype = dtype
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and not torch.equal(state_dict[spec.embed], state_dict[spec.unembed]):
        # HF would overwrite one matrix with the other; untying keeps both edits exactly.
        logger.info("embedding and unembedding differ after editing: exporting them untied")
        config.tie_word_embeddings = False
    return config


def to_hf(model: torch.nn.Module, *, dtype: torch.dtype | None = None, verify: bool = True) -> Any:
    """Convert a hooked model (from `load`, possibly edited) back to a `transformers` model.

    The inverse of TL's weight conversion for the architectures in `SUPPORTED_ARCHITECTURES`.
    A fresh HF model is built from `model.kif_hf_config` on the hooked model's device and filled
    with strict key and shape checks. TL-only parameters (zero biases TL adds) must still be
    zero; an edit that made them non-zero raises `ModelSaveError` instead of being dropped. With
    `verify`, the HF model's logits are checked against the hooked model's.

    Args:
        model: a `HookedTransformer` returned by `load`.
        dtype: dtype of the HF model (default: the hooked model's current dtype).
        verify: check logits of the result against the hooked model (float32/64 only).

    Raises:
        ModelSaveError: with a one-line message, for every failure.
    """
    try:
        return _to_hf(model, dtype=dtype, verify=verify)
    except ModelSaveError:
        raise
    except Exception as err:  # a library failure we did not anticipate: still one clear line
        raise ModelSaveError(
            f"cannot export model: {type(err).__name__}: {_first_line(err)}"
        ) from err


def _no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' context that skips random initialisation (its module moved in v5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@torch.no_grad()
def _to_hf(model: torch.nn.Module, *, dtype: torch.dtype | None, verify: bool) -> Any:
    """See `to_hf`."""
    from transformers import AutoModelForCausalLM

    try:
        arch = architecture(model)
    except ValueError as err:
        raise ModelSaveError(f"cannot export model: {err}") from err
    spec = _ARCH_SPECS.get(arch)
    if spec is None:
        raise ModelSaveError(
            f"cannot export architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    first = next(model.parameters())
    dtype = first.dtype if dtype is None else dtype
    state_dict = _hf_state_dict(model, spec)
    config = _export_config(model, spec, dtype, state_dict)
    with _no_init_weights():  # every weight is overwritten below; random init is wasted time
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf_model.to(first.device)
    _load_strict(hf_model, state_dict, arch)
    if getattr(config, "tie_word_embeddings", False):
        # transformers 5 ties the two matrices while initialising weights, which
        # `_no_init_weights` skips: without this the model holds two equal copies and
        # save_pretrained writes lm_head.weight as well, a key the source checkpoint lacks
        hf_model.tie_weights()
    generation_config = getattr(model, "kif_generation_config", None)
    if generation_config is not None:
        hf_model.generation_config = copy.deepcopy(generation_config)
    hf_model.eval()
    if verify:
        _verify_logits(hf_model, model, what=f"exporting {arch}", error=ModelSaveError)
    return hf_model


def _load_strict(hf_model: Any, state_dict: dict[str, Tensor], arch: str) -> None:
    """Load `state_dict` into `hf_model`, reporting missing/unexpected keys and shape mismatches."""
    expected = hf_model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ModelSaveError(
            f"cannot export {arch}: missing HF keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    for name, tensor in state_dict.items():
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise ModelSaveError(
                f"cannot export {arch}: '{name}' has shape {tuple(tensor.shape)}, HF expects "
                f"{tuple(expected[name].shape)}"
            )
    dtype = next(hf_model.parameters()).dtype
    hf_model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> pathlib.Path:
    """Write a hooked model as an HF checkpoint folder that `transformers` loads directly.

    Writes config.json, model.safetensors, generation_config.json and the source's tokenizer
    files (byte for byte) into a temporary sibling folder, then renames it to `out_dir`, so a
    failure never leaves a half-written checkpoint. Refuses (with `ModelSaveError`, writing
    nothing) to write over or inside the folder the model was loaded from, or to replace an
    existing non-empty `out_dir` unless `overwrite=True` (DESIGN convention 9).

    Args:
        model: a `HookedTransformer` returned by `load`, possibly edited.
        out_dir: the checkpoint folder to create.
        overwrite: replace an existing non-empty `out_dir`.
        dtype: dtype of the saved weights (default: the hooked model's current dtype).

    Returns:
        The resolved path of the written folder.

    Raises:
        ModelSaveError: with a one-line message, for every failure (nothing is left behind).
    """
    out = pathlib.Path(out_dir).expanduser().resolve()
    with _save_errors(out_dir):
        _check_destination(model, out, overwrite)
        hf_model = to_hf(model, dtype=dtype)
        _write_atomically(hf_model, model, out, replace=overwrite)
    logger.info("saved %s to %s", getattr(model, "kif_name", "model"), out)
    return out


def save_into(model: torch.nn.Module, folder: str | os.PathLike, *,
              dtype: torch.dtype | None = None, where: str | os.PathLike | None = None) -> None:
    """`save`'s checkpoint files written into `folder`, an existing staging folder of the
    caller's (an erasure folder holds the checkpoint at its root): not atomic by itself.
    `where`: the destination to name in errors (not the hidden staging folder)."""
    with _save_errors(where or folder):
        _write_checkpoint(to_hf(model, dtype=dtype), model, pathlib.Path(folder))


@contextlib.contextmanager
def _save_errors(where: str | os.PathLike) -> Iterator[None]:
    """A library or filesystem failure (a full disk included) as one `ModelSaveError` line."""
    try:
        yield
    except ModelSaveError:
        raise
    except Exception as err:
        raise ModelSaveError(
            f"cannot save model to '{where}': {type(err).__name__}: {_first_line(err)}"
        ) from err


def _write_checkpoint(hf_model: Any, model: torch.nn.Module, folder: pathlib.Path) -> None:
    with quiet_hf_bars():
        hf_model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(model, folder)


def _write_atomically(hf_model: Any, model: torch.nn.Module, out: pathlib.Path, *,
                      replace: bool) -> None:
    """Write the checkpoint into a staging sibling of `out`, then rename it into place (a
    second writer racing for the same `out` fails unless `replace`)."""
    from kif import integrity

    with integrity.staged(out, ModelSaveError) as tmp:
        _write_checkpoint(hf_model, model, tmp)
        with integrity.writing(out, ModelSaveError):  # a lost race names `out`, not `tmp`
            integrity.publish(tmp, out, replace=replace)


def _write_tokenizer(model: torch.nn.Module, folder: pathlib.Path) -> None:
    """The source's tokenizer files verbatim; re-serialise only a tokenizer without files."""
    files = getattr(model, "kif_tokenizer_files", None) or {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    tokenizer = getattr(model, "kif_tokenizer", None)
    if not files and tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _overlaps(a: pathlib.Path, b: pathlib.Path) -> bool:
    """True when `a` and `b` are the same folder or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def _check_destination(model: Any, out: pathlib.Path, overwrite: bool) -> None:
    """Refuse destinations that would touch the input checkpoint or clobber existing work."""
    sources = {getattr(model, "kif_source_dir", None), getattr(model, "kif_source", None)}
    for source in sources:
        if source is None:
            continue
        source_path = pathlib.Path(source).expanduser()
        if not source_path.exists():
            continue  # a hub or zoo name, not a path; kif_source_dir covers its folder
        if _overlaps(out, source_path.resolve()):
            raise ModelSaveError(
                f"refusing to write '{out}': it overlaps the checkpoint the model was loaded "
                f"from ('{source_path.resolve()}'); kif never overwrites its input"
            )
    if out.exists() and not out.is_dir():
        raise ModelSaveError(f"refusing to write '{out}': a file with that name exists")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelSaveError(
            f"refusing to write '{out}': folder exists and is not empty (pass overwrite=True)"
        )


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def weight_hash(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's weights; reversible edits are keyed on it (convention 9).

    Hashes every parameter in sorted-name order as name, dtype, shape and the raw bytes of the
    contiguous CPU tensor. Buffers (causal masks, rotary tables) are derived from the config and
    left out, so the hash changes exactly when a weight changes. Deterministic across loads,
    processes and devices.
    """
    digest = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in sorted(params):
        tensor = params[name].detach().to("cpu").contiguous()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(str(tensor.dtype).encode("ascii") + b"\0")
        digest.update(str(tuple(tensor.shape)).encode("ascii") + b"\0")
        # A byte view works for every dtype (bfloat16 has no numpy equivalent).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
