"""SAE-feature signatures (Farrell, Lau & Conmy 2024, "Applying sparse autoencoders to unlearn
knowledge in language models", Sec. 3; SAELens).

A concept's SAE features are the features of a sparse autoencoder at one hook that fire often on
the concept's text and (almost) never on other text. With a_i(x_t) = ReLU((x_t - b_dec) W_enc[:, i]
+ b_enc[i]) the activation of feature i at token t:

    f_forget[i] = mean_{t in forget tokens} 1[a_i(x_t) > 0]
    f_retain[i] = mean_{t in retain tokens} 1[a_i(x_t) > 0]
    S = top-N of { i : f_retain[i] < tau } ranked by f_forget[i] (descending)

(Farrell et al. 2024: drop features with retain sparsity >= tau, tau in {0.01, 0.001}; keep the
N = 10-20 most frequent on the forget set). Forget text = the concept's forget prompts, retain text
= other people's probes and the shared facts, each as `[BOS] + prompt + answer`. The concept's
neighbours (people who share a name piece or an employer) are part of the retain text by default:
they are the people a clamp is most likely to hurt. The signature's components are these features
(`indices[i] = (0, feature id)`), scored by f_forget; `ablate.ablation_hooks` clamps them to -c
when active (Farrell et al. 2024, Eq. 2), at every position, the concept's features and the
benchmark's random control alike.

Positions (`positions="name-end+last"`, the default). f_forget counts only the forget prompts'
last subject token and last prompt token: the fact world's answers are read out at the last prompt
token (causal tracing puts every strong site there), from what layer 0's attention gathers of the
name, and the name's last token is the first position where both names have met. Counted on all
the subject's tokens (`positions="subject+last"`), features of one name piece rank among the
concept's: a first name is shared by several people of the world (three of the ten bench people
are called Kianme), so clamping it hurts them all, and the collateral weight then keeps the
clamp too small to erase the concept. Counted on every position (`positions="all"`), features of
the phrasings' frame words ("the", "was", "works") that are rare on retain text rank among the
concept's; each fires on a few percent of everybody's tokens, and a clamp to -25 where a shipped
SAE's activations are 1-3 (residual norm about 20) breaks any probe it touches. f_retain still
counts every retain token, because the clamp acts at every position.

Adaptive selection (`adaptive=True`). For each shipped SAE (hook) and each size m in
{1, 2, 3, 5, 10, 20}, the top-m features are clamped and the accuracy drop is measured on the
forget probes and on all the concept's neighbour and retain probes:
separation = drop_forget - collateral_weight * drop_others; the best (hook, m) is kept. A trial
scores only the probes on which one of its features fires (the conditional clamp leaves every other
probe exactly unchanged), which makes the 24 trials cheap enough to validate on all the others.
collateral_weight is 20 (was 2, then 10): a weight of 2 let a drop of 0.1 on other people buy a drop
of 0.2 on the concept; the benchmark's target is collateral <= 0.02. Measured on 3-6 bench people
(`kif bench signatures --kinds sae-features`): every-position counting with weight 2 (the previous
defaults): concept 0.70, random 0.18, collateral 0.09; subject+last with weight 2: 0.72 / 0.03 /
0.08; tau = 0.001 (either ranking): concept 0.12-0.17; a clamp of 10: 0.48 / 0.04 / 0.04;
features ranked by a clamp attribution (gradient x activation on the answer log-prob, frequency
as the filter): 0.47 / 0.10 / 0.07; subject+last with weight 10 (the previous defaults): 0.49 / 0.02 /
0.02 on 6 people, and on the 10 default people 0.397 / 0.067 / 0.0195 at 28 s per person (was
0.703 / 0.180 / 0.092 at 73 s): collateral and the 5x random ratio meet their targets, the
concept's drop (>= 0.5) does not. name-end+last with weight 10: 0.603 / 0.013 / 0.0218; with
weight 20 (the defaults): 0.557 / 0.013 / 0.0191 at 10.6 s per person, and on a fresh draw of 10
people (`--people-seed 7`) 0.570 / 0.003 / 0.0161 at 10.9 s: every target met. A larger SAE
(8192 features, 800k tokens, layer 0) did not help: 0.363 / 0.073 / 0.0173 with subject+last.
The shipped SAEs (4096 features, explained variance 0.60-0.76) have few features specific to one
person at the subject's first tokens: there their features are mostly sub-word pieces of names
shared by several people, so the concept's drop and the collateral trade off against each other.

SAEs are SAELens objects, loaded by `load_sae` from a local SAELens folder (cfg.json +
sae_weights.safetensors), a SAELens release, or the SAEs shipped with kif's zoo model
(`kif.zoo.build_saes`, `default_sae`).
"""

import json
import logging
import os
import pathlib
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kif.errors import KifError
from kif.signatures.base import Signature, new_signature, register

log = logging.getLogger(__name__)

KIND = "sae-features"
_SAE_FILES = ("cfg.json", "sae_weights.safetensors")
_SIZES = (1, 2, 3, 5, 10, 20)  # numbers of features the adaptive selection tries
_D_MLP_HOOKS = ("mlp.hook_pre", "mlp.hook_post")
# forget positions whose firing counts: "name-end+last" = the subject's last token and the last
# prompt token (where the fact world's answers are read out), "subject+last" = every subject token
# and the last prompt token, "all" = every token of [BOS] + prompt
POSITIONS = ("subject+last", "name-end+last", "all")


class SAELoadError(KifError):
    """An SAE cannot be loaded, or does not fit the model it is used with."""


# ---- locating and loading SAEs -----------------------------------------------------------------

def _kif_root() -> pathlib.Path:
    import kif

    return pathlib.Path(kif.__file__).resolve().parent


def _zoo_sae_root() -> pathlib.Path:
    from kif.zoo.build_saes import SAE_DIR

    return SAE_DIR


def shipped_hooks(model_name: str) -> list[str]:
    """Hooks at which kif ships an SAE for zoo model `model_name` (sorted by layer)."""
    root = _zoo_sae_root() / str(model_name)
    if not root.is_dir():
        return []
    hooks = [p.name for p in root.iterdir()
             if p.is_dir() and not p.name.startswith(".") and all((p / f).is_file() for f in _SAE_FILES)]
    return sorted(hooks, key=lambda h: (_layer(h), h))


def shipped_sae_ref(model_name: str, hook: str) -> dict[str, Any]:
    """The reference dict of the SAE shipped for `model_name` at `hook` (path relative to the
    installed `kif` package, so that a saved signature reloads it on any install)."""
    if hook not in shipped_hooks(model_name):
        have = ", ".join(shipped_hooks(model_name)) or "none"
        raise SAELoadError(f"kif ships no SAE for model {model_name!r} at {hook!r} "
                           f"(shipped hooks: {have}); pass an SAE with sae=...")
    folder = _zoo_sae_root() / str(model_name) / hook
    return {"package": "kif", "path": folder.relative_to(_kif_root()).as_posix(), "hook": hook}


def _model_name(model) -> str:
    return str(getattr(model, "kif_name", None) or model.cfg.model_name)


def default_sae(model, hook: str):
    """The SAE kif ships for `model` (a zoo model, by name) at `hook`."""
    return load_sae(shipped_sae_ref(_model_name(model), hook), model)


_CACHE: dict[tuple[str, int], Any] = {}
_CACHE_SIZE = 8  # SAEs kept loaded (the shipped ones are 4 x ~4 MB)


def _load_folder(folder: pathlib.Path):
    if not folder.is_dir():
        raise SAELoadError(f"cannot load SAE: {folder} is not a folder")
    missing = [f for f in _SAE_FILES if not (folder / f).is_file()]
    if missing:
        raise SAELoadError(f"cannot load SAE from {folder}: not a SAELens SAE folder "
                           f"(missing {', '.join(missing)}; only safetensors + JSON are read)")
    from kif import integrity

    # shipped SAEs (and copies of them, which keep their kif_sha256.json) are checked against
    # their checksums; a SAELens folder from elsewhere has none to check
    if (folder / integrity.SUMS).is_file() or _zoo_sae_root() in folder.resolve().parents:
        integrity.verify(folder, error=SAELoadError, what=f"SAE {folder.name}")
    key = (str(folder.resolve()), (folder / _SAE_FILES[1]).stat().st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    try:
        from sae_lens import SAE

        sae = SAE.load_from_disk(folder, device="cpu")
    except Exception as err:
        raise SAELoadError(f"cannot load SAE from {folder}: {type(err).__name__}: "
                           f"{_first_line(err)}") from None
    sae.eval()
    try:  # how a signature refers to this SAE: relative to the package for shipped ones
        sae.kif_ref = {"package": "kif",
                       "path": folder.resolve().relative_to(_kif_root()).as_posix()}
    except ValueError:
        sae.kif_ref = {"path": str(folder.resolve())}
    _remember(key, sae)
    return sae


def _remember(key: tuple[str, int], sae) -> None:
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = sae


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def _resolve_path(ref: dict[str, Any]) -> pathlib.Path:
    path = pathlib.Path(ref["path"])
    if ref.get("package") == "kif":
        return _kif_root() / path
    return path


def load_sae(ref: "dict[str, Any] | str | os.PathLike[str]", model=None):
    """Load a SAELens SAE from a reference:

    * a local SAELens folder (a path, or `{"path": folder}`),
    * a folder relative to the installed kif package (`{"package": "kif", "path": ...}`, how
      signatures refer to the shipped SAEs),
    * a SAELens release, through SAELens' own loader (`SAE.from_pretrained`, files from the
      Hugging Face cache or hub): `{"release": ..., "sae_id": ...}` or the text "RELEASE/ID"
      (`parse_sae_spec`; a `str` naming an existing folder is that folder),
    * the SAE shipped for a zoo model (`{"model": "fact-world", "hook": ...}`).

    With `model`, the SAE must fit it: its hook must exist in the model and its input width must
    equal the hook's width. Every failure is a one-line `SAELoadError` (a `KifError`).
    """
    if isinstance(ref, str):
        ref = parse_sae_spec(ref)
    elif isinstance(ref, os.PathLike):
        ref = {"path": os.fspath(ref)}
    if not isinstance(ref, dict):
        raise SAELoadError(f"cannot load SAE from {ref!r}: expected a folder or a reference dict")
    if "release" in ref:
        sae = _load_release(str(ref["release"]), str(ref.get("sae_id", "")))
    elif "path" in ref:
        sae = _load_folder(_resolve_path(ref))
    elif "model" in ref and "hook" in ref:
        sae = _load_folder(_resolve_path(shipped_sae_ref(str(ref["model"]), str(ref["hook"]))))
    else:
        raise SAELoadError(f"cannot load SAE from {ref!r}: give a path, a release + sae_id, "
                           "or a zoo model + hook")
    hook = sae_hook(sae, ref)
    if model is not None:
        check_sae_fits(sae, model, hook)
    return sae


# ---- SAELens releases (pretrained SAEs on the Hugging Face hub) --------------------------------

# Files that SAELens' hub loader of each kind reads from the release's folder and cannot do
# without (sparsity.safetensors is optional). Other loaders read files kif does not name: a miss
# there is reported as the whole folder.
_RELEASE_FILES = {"sae_lens": ("cfg.json", "sae_weights.safetensors"), "gemma_2": ("params.npz",)}


def _release_directory() -> dict[str, Any]:
    """SAELens' directory of releases (its pretrained_saes.yaml; parsed once, SAELens caches it)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _closest(name: str, known, n: int = 3) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(known), n=n, cutoff=0.0)
    return ", ".join(near) or "none"


def parse_sae_spec(spec: str) -> dict[str, Any]:
    """The `load_sae` reference of a `--sae` text: an existing folder is that folder; otherwise
    "RELEASE/ID" of a SAELens release, split at the first slash (ids may hold slashes, as Gemma
    Scope's "layer_12/width_16k/canonical" do; release names hold none). An unknown release is
    one line naming the known releases closest to it."""
    text = str(spec).strip()
    if pathlib.Path(text).expanduser().is_dir() or text.startswith(("/", ".", "~", os.sep)):
        return {"path": text}
    release, _, sae_id = text.partition("/")
    directory = _release_directory()
    if release not in directory:
        raise SAELoadError(f"SAE {text!r}: no such folder, and {release!r} is not a SAELens "
                           f"release (closest: {_closest(release, directory)}); give a SAELens "
                           "SAE folder or RELEASE/ID")
    if not sae_id:
        ids = list(directory[release].saes_map)
        raise SAELoadError(f"SAE {text!r}: give RELEASE/ID; release {release!r} has "
                           f"{len(ids)} SAEs, e.g. {', '.join(ids[:3])}")
    return {"release": release, "sae_id": sae_id}


def _load_release(release: str, sae_id: str):
    """`SAE.from_pretrained(release, sae_id)`: SAELens' own loader for the release, reading its
    files through `huggingface_hub.hf_hub_download` (the local HF cache first; offline, with
    HF_HUB_OFFLINE=1, only the cache)."""
    directory = _release_directory()
    if release not in directory:
        raise SAELoadError(f"{release!r} is not a SAELens release (closest: "
                           f"{_closest(release, directory)})")
    if sae_id not in directory[release].saes_map:
        raise SAELoadError(f"SAELens release {release!r} has no SAE {sae_id!r} (closest: "
                           f"{_closest(sae_id, directory[release].saes_map)})")
    key = (f"release:{release}/{sae_id}", 0)  # a signature + a clamp patch load it twice
    if key in _CACHE:
        return _CACHE[key]
    try:
        from sae_lens import SAE

        sae = SAE.from_pretrained(release, sae_id, device="cpu").eval()
    except Exception as err:
        if _not_cached(err):
            raise SAELoadError(_missing_message(release, sae_id, directory[release])) from None
        raise SAELoadError(f"cannot load SAE {sae_id!r} of SAELens release {release!r}: "
                           f"{type(err).__name__}: {_first_line(err)}") from None
    sae.kif_ref = {"release": release, "sae_id": sae_id}
    _remember(key, sae)
    return sae


def _not_cached(err: BaseException | None) -> bool:
    """Did the hub loader fail for want of a file that is neither cached nor downloadable
    (offline mode, or no network)?"""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _missing_message(release: str, sae_id: str, lookup) -> str:
    """One line: which of the release's files the local HF cache lacks, and the command that
    fetches them on a machine with network."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, folder = lookup.repo_id, lookup.saes_map[sae_id]
    loader = lookup.conversion_func or "sae_lens"
    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    why = " (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else " and the hub is unreachable"
    then = "then copy that cache here (or point HF_HUB_CACHE at a copy)"
    if loader in _RELEASE_FILES:
        files = [f"{folder}/{f}" for f in _RELEASE_FILES[loader]]
        missing = [f for f in files if not isinstance(try_to_load_from_cache(repo, f), str)]
        missing = missing or files  # all cached, yet the loader missed one: name them all
        args = f"{repo} {' '.join(missing)}"
        return (f"SAE {sae_id!r} of SAELens release {release!r} is not in {where}{why}: missing "
                f"{', '.join(f'{repo}/{f}' for f in missing)}; on a machine with network run "
                f"`hf download {args}` (huggingface_hub < 1.0: `huggingface-cli download {args}`), "
                f"{then}")
    args = f"{repo} --include '{folder}' '{folder}/*'"
    return (f"SAE {sae_id!r} of SAELens release {release!r} is not in {where}{why}: its files "
            f"under {repo}/{folder} are missing; on a machine with network run `hf download "
            f"{args}` (huggingface_hub < 1.0: `huggingface-cli download {args}`), {then}")


def sae_hook(sae, ref: dict[str, Any] | None = None) -> str:
    """The TransformerLens hook an SAE reads (its metadata), checked against `ref["hook"]`."""
    meta = getattr(sae.cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) if meta is not None else None
    want = (ref or {}).get("hook")
    if hook and want and hook != want:
        raise SAELoadError(f"the SAE reads {hook!r}, but the reference says {want!r}")
    hook = hook or want
    if not hook:
        raise SAELoadError("the SAE's config names no hook (metadata.hook_name); give one in the "
                           "reference dict ('hook')")
    return str(hook)


def _hook_width(model, hook: str) -> int:
    if hook.endswith(_D_MLP_HOOKS):
        return int(model.cfg.d_mlp)
    if hook.startswith("blocks.") and ".attn." not in hook:
        return int(model.cfg.d_model)
    # other hooks (attention heads, ...): measure on one token
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.zeros((1, 1), dtype=torch.long,
                                                    device=model.cfg.device), names_filter=[hook])
    return int(cache[hook].reshape(1, -1).shape[-1])


def check_sae_fits(sae, model, hook: str) -> None:
    """Raise SAELoadError unless `hook` exists in `model` with width `sae.cfg.d_in`."""
    if hook not in model.hook_dict:
        raise SAELoadError(f"the SAE reads hook {hook!r}, which this model "
                           f"({_model_name(model)}, {model.cfg.n_layers} layers) does not have")
    width = _hook_width(model, hook)
    if int(sae.cfg.d_in) != width:
        raise SAELoadError(f"the SAE at {hook} expects inputs of width {int(sae.cfg.d_in)}, but "
                           f"this model's {hook} has width {width}")


def _card(ref: dict[str, Any]) -> dict[str, Any]:
    if "path" not in ref:
        return {}
    p = _resolve_path(ref) / "kif_sae_card.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _layer(hook: str) -> int:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else -1


# ---- the statistics ----------------------------------------------------------------------------

def _padded(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[Int[Tensor, "batch pos"],
                                                                       Bool[Tensor, "batch pos"]]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return tokens.to(device), mask.to(device)


@torch.no_grad()
def token_activations(model, hooks: Sequence[str], texts: Sequence[str], batch_size: int = 256
                      ) -> tuple[dict[str, Float[Tensor, "tokens d"]], Int[Tensor, " texts"]]:
    """Activations at `hooks` of every token of `[BOS] + tokens(text)`, concatenated in text
    order, and each text's length. Texts are batched by length (little padding), one forward per
    batch for all hooks, stopped after the last hook's layer."""
    from kif import metrics

    return sequence_activations(model, hooks, metrics.encode_prompts(model, texts), batch_size)


@torch.no_grad()
def sequence_activations(model, hooks: Sequence[str], seqs: Sequence[Sequence[int]],
                         batch_size: int = 256
                         ) -> tuple[dict[str, Float[Tensor, "tokens d"]], Int[Tensor, " seqs"]]:
    """`token_activations` of token-id sequences (already with their BOS)."""
    from kif import metrics

    lengths = torch.tensor([len(q) for q in seqs])
    order = torch.argsort(lengths, descending=True, stable=True)
    stop = max(_layer(h) for h in hooks) + 1
    stop_at = stop if 0 < stop < model.cfg.n_layers else None
    chunks: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for start in range(0, len(seqs), batch_size):
        idx = order[start:start + batch_size].tolist()
        tokens, mask = _padded([seqs[i] for i in idx], metrics._pad_id(model), model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=list(hooks), padding_side="right",
                                        stop_at_layer=stop_at)
        for h in hooks:
            chunks[h].append(cache[h][mask])
    # tokens are in length order: text i's tokens start at the offset of its rank in `order`
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    sorted_len = lengths[order]
    offset = (torch.cumsum(sorted_len, 0) - sorted_len)[rank]  # per text, in the sorted stream
    text_start = torch.cumsum(lengths, 0) - lengths
    n = int(lengths.sum())
    within = torch.arange(n) - torch.repeat_interleave(text_start, lengths)
    gather = torch.repeat_interleave(offset, lengths) + within
    return {h: torch.cat(c)[gather.to(c[0].device)] for h, c in chunks.items()}, lengths


def feature_activations(sae, acts: Float[Tensor, "tokens d"]) -> Float[Tensor, "tokens d_sae"]:
    """a = ReLU((x - b_dec) W_enc + b_enc) through SAELens' encoder, in float32."""
    return sae.encode(acts.to(sae.W_enc.device, torch.float32))


def firing_counts(sae, acts: Float[Tensor, "tokens d"],
                  chunk: int = 8192) -> Float[Tensor, " d_sae"]:
    """How many of the tokens each feature fires on (float64), encoding `chunk` tokens at a time
    to bound memory (tokens x d_sae activations)."""
    counts = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64, device=sae.W_enc.device)
    for start in range(0, acts.shape[0], chunk):
        counts += (feature_activations(sae, acts[start:start + chunk]) > 0).sum(0).double()
    return counts


def select_features(f_forget: Float[Tensor, " d_sae"], f_retain: Float[Tensor, " d_sae"],
                    tau: float, top_n: int,
                    tiebreak: Float[Tensor, " d_sae"] | None = None) -> Int[Tensor, " n"]:
    """Farrell et al. 2024: features with retain frequency < tau, the `top_n` most frequent on
    the forget text (ties broken by `tiebreak`, e.g. the mean forget activation), never a feature
    that does not fire on the forget text at all."""
    key = f_forget.double().clone()
    if tiebreak is not None:
        # forget frequencies are multiples of 1/n_tokens; a tiebreak below that resolution
        # orders equal frequencies without reordering different ones
        tb = tiebreak.double()
        key = key + 1e-9 * tb / tb.abs().max().clamp_min(1e-12)
    key[(f_retain >= tau) | (f_forget <= 0)] = -float("inf")
    order = torch.argsort(key, descending=True, stable=True)[:top_n]
    return order[torch.isfinite(key[order])]


def _subject_mask(model, texts: Sequence[str], subjects: Sequence[str],
                  width: int) -> Bool[Tensor, "batch pos"]:
    """Positions (in `[BOS] + tokens`) covering each text's subject (one batched tokenizer call)."""
    enc = model.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    off = 1 if model.cfg.default_prepend_bos else 0
    mask = torch.zeros((len(texts), width), dtype=torch.bool)
    for r, (text, subj, offsets) in enumerate(zip(texts, subjects, enc["offset_mapping"])):
        start = text.find(subj)
        end = start + len(subj)
        cols = [i + off for i, (a, b) in enumerate(offsets) if start >= 0 and a < end and b > start]
        mask[r, cols] = True
    return mask


def _counted_mask(model, forget, subj: Bool[Tensor, "batch pos"], width: int,
                  with_answers: bool, positions: str) -> Bool[Tensor, "batch pos"]:
    """The forget-text positions whose firing counts (see `POSITIONS`)."""
    from kif import metrics

    if positions == "all":
        return torch.ones((len(forget), width), dtype=torch.bool)
    prompts = [p.prompt for p in forget]
    p_len = torch.tensor([len(q) for q in metrics.encode_prompts(model, prompts)])
    pos = torch.arange(width)[None, :]
    last = pos == (p_len - 1)[:, None]
    if positions == "name-end+last":  # the subject's last token only (first and last name meet)
        end = (subj.long() * (pos + 1)).argmax(1)  # last subject column (0 when there is none)
        subj = subj & (pos == end[:, None])
    mask = subj | last
    if with_answers:
        a_len = torch.tensor([len(a) for a in
                              metrics.encode_answers(model, [p.answer for p in forget])])
        mask |= (pos >= p_len[:, None]) & (pos < (p_len + a_len)[:, None])
    return mask


def retain_text(concept, with_neighbours: bool = True, matched: bool = True,
                per_prompt: int | None = 16) -> list[str]:
    """The retain text (prompt + answer) a concept's features are contrasted with.

    Other people: the concept's `neighbour` people (when `with_neighbours`) and its `retain`
    people. With `matched`, the forget prompts are asked about the other people (the subject
    swapped, the answer that person's answer for the relation), so that the retain text has the
    forget text's phrasings: otherwise the words of the phrasings that `retain` does not use (it
    holds one phrasing per fact) look concept-specific. Each forget prompt is asked about
    `per_prompt` of the other people (None: all), taken in turn from the list (neighbours first),
    so every person is asked about in several phrasings. Without `matched`, the other people's own
    probes. The shared facts are always included.
    """
    probes = [p for p in concept.neighbour if p.kind == "person"] if with_neighbours else []
    probes += [p for p in concept.retain if p.kind == "person"]
    probes = list(dict.fromkeys(probes))
    own = set(concept.subjects)
    if matched:
        answer = {(p.subject, p.relation): p.answer for p in probes}
        subjects = [s for s in dict.fromkeys(p.subject for p in probes) if s not in own]
        forget = [f for f in concept.forget if f.kind == "person"]
        n = len(subjects) if per_prompt is None else min(per_prompt, len(subjects))
        texts = [f.prompt.replace(f.subject, s, 1) + answer[(s, f.relation)]
                 for j, f in enumerate(forget)
                 for s in (subjects[(j * n + i) % len(subjects)] for i in range(n))
                 if (s, f.relation) in answer]
    else:
        texts = [p.prompt + p.answer for p in probes if p.subject not in own]
    return list(dict.fromkeys(texts)) + [p.prompt + p.answer for p in concept.shared]


# ---- the extractor -----------------------------------------------------------------------------

@register(KIND)
@torch.no_grad()
def extract_sae_features(model, concept, *, hook: str | None = None, tau: float = 0.01,
                         top_n: int = 20, sae=None, with_answers: bool = False,
                         with_neighbours: bool = True, matched_phrasings: bool = True,
                         retain_per_prompt: int | None = 16, clamp: float = 25.0,
                         adaptive: bool = True, collateral_weight: float = 20.0,
                         n_validation_others: int | None = None,
                         positions: str = "name-end+last") -> Signature:
    """The SAE features of `concept` (Farrell et al. 2024; see the module docstring).

    Args:
        hook: the hook whose SAE to use. Default: among the SAEs shipped for this zoo model, the
            one with the best separation: its selected features, clamped to -`clamp`, lower the
            accuracy on the concept's forget probes most relative to other people's probes
            (`info["separation_by_hook"]`).
        tau: retain-frequency threshold; features firing on >= tau of the retain tokens are
            dropped (Farrell et al.: 0.01 or 0.001).
        top_n: how many features to keep (Farrell et al.: 10-20).
        sae: an SAELens SAE object or a `load_sae` reference (overrides the shipped ones).
        with_answers: count the forget answers' tokens too (`[BOS] + prompt + answer`); by
            default only the forget prompts are (Farrell et al.'s "forget prompts"). Retain text
            always includes its answers, so that a feature firing on other people's answers is
            dropped.
        with_neighbours: count the concept's neighbours (people sharing a first name, last name
            or employer) as retain text too, so that features of a shared name piece are dropped.
        matched_phrasings: retain text in the forget prompts' phrasings (see `retain_text`).
        retain_per_prompt: other people each forget prompt is asked about (`retain_text`).
        clamp: the value c a clamp sets active features to (-c), recorded for
            `ablate.ablation_hooks(sig, sae, clamp=sig.settings["clamp"])`.
        adaptive: choose the number of features (and, without `hook`, the hook) by clamping
            them (see the module docstring).
        collateral_weight: weight of the other people's accuracy drop in that choice.
        n_validation_others: other people's probes the choice is measured on (neighbours first,
            then retain people); None: all of them.
        positions: forget positions whose firing counts: "name-end+last" (the subject's last
            token and the last prompt token), "subject+last" (every subject token and the last
            prompt token) or "all" (`POSITIONS`).
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    candidates = _candidate_saes(model, hook, sae)  # [(hook, sae, ref)]

    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    forget = list(concept.forget)
    retain_texts = retain_text(concept, with_neighbours=with_neighbours,
                               matched=matched_phrasings, per_prompt=retain_per_prompt)
    forget_texts = [p.prompt + (p.answer if with_answers else "") for p in forget]
    acts, lengths = token_activations(model, [h for h, _, _ in candidates],
                                      forget_texts + retain_texts)
    f_len = lengths[:len(forget)]
    n_forget = int(f_len.sum())  # forget texts come first, so do their tokens
    width = int(f_len.max())
    in_text = torch.arange(width)[None, :] < f_len[:, None]
    subj = _subject_mask(model, forget_texts, [p.subject for p in forget], width)
    counted = _counted_mask(model, forget, subj, width, with_answers, positions)[in_text]
    subj = subj[in_text]  # [forget tokens]

    others = _validation_others(concept, n_validation_others)
    per_hook = []
    for h, s, ref in candidates:  # a handful of hooks
        x = acts[h]
        a = feature_activations(s, x[:n_forget])
        active = a > 0
        f_forget = active[counted].double().mean(0)
        f_retain = firing_counts(s, x[n_forget:]) / max(len(x) - n_forget, 1)
        chosen = select_features(f_forget, f_retain, tau, top_n,
                                 tiebreak=a[counted].double().mean(0))
        fire = active[:, chosen].any(-1)  # [forget tokens]
        per_hook.append({"hook": h, "sae": s, "ref": ref, "chosen": chosen,
                         "coverage": float(fire.double().mean()) if len(chosen) else 0.0,
                         "f_forget": f_forget, "f_retain": f_retain,
                         "fire_by_feature": active[:, chosen]})
    sizes = sorted({m for m in _SIZES if m < top_n} | {top_n}) if adaptive else [top_n]
    validated = len(per_hook) > 1 or len(sizes) > 1
    if validated:
        _clamp_separation(model, concept, per_hook, clamp, sizes, collateral_weight, others)
    best = max(per_hook, key=lambda r: (r.get("separation", 0.0), -_layer(r["hook"])))
    chosen = best["chosen"][:best.get("n_best", top_n)]
    fire_all = best["fire_by_feature"][:, :len(chosen)]
    best["fire"] = fire_all.any(-1)
    best["coverage"] = float(best["fire"].double().mean()) if len(chosen) else 0.0
    if len(chosen) == 0:
        log.warning("no SAE feature of %s separates %r (tau=%g)", best["hook"], concept.name, tau)

    n_fire = max(int(best["fire"].sum()), 1)
    ref = dict(best["ref"])
    card = _card(ref)
    info = {
        "hook": best["hook"], "layer": _layer(best["hook"]),
        "n_selected": int(len(chosen)), "coverage": best["coverage"],
        "coverage_by_hook": {r["hook"]: r["coverage"] for r in per_hook},
        "fires_on_subject_fraction": float((best["fire"] & subj).sum()) / n_fire,
        "forget_tokens": n_forget, "counted_forget_tokens": int(counted.sum()),
        "retain_tokens": int(lengths.sum()) - n_forget,
        "sae_explained_variance": card.get("explained_variance"), "sae_l0": card.get("l0"),
        "sae_d_sae": int(best["sae"].cfg.d_sae),
    }
    if validated:
        top = next((t for t in best["trials"] if t["n"] == len(chosen)), {})
        info.update(drop_forget=top.get("drop_forget"), drop_others=top.get("drop_others"),
                    separation=top.get("separation"),
                    separation_by_hook={r["hook"]: r["trials"] for r in per_hook})
    n = len(chosen)
    return new_signature(
        model, concept, KIND, component="feature",
        component_hooks=(best["hook"],) * n,
        scores=best["f_forget"][chosen].float(),
        indices=torch.stack([torch.zeros(n, dtype=torch.long), chosen.long().cpu()], dim=1),
        sae=ref,
        maps={"forget_freq": best["f_forget"].float().cpu(),
              "retain_freq": best["f_retain"].float().cpu()},
        settings={"hook": hook, "tau": tau, "top_n": top_n, "with_answers": with_answers,
                  "with_neighbours": with_neighbours, "matched_phrasings": matched_phrasings,
                  "retain_per_prompt": retain_per_prompt, "clamp": clamp, "adaptive": adaptive,
                  "collateral_weight": collateral_weight,
                  "n_validation_others": n_validation_others, "positions": positions,
                  "sae": ref,
                  "n_retain_texts": len(retain_texts), "n_forget_prompts": len(forget)},
        info=info)


def _validation_others(concept, n_others: int | None) -> list:
    """Other people's probes the selection is validated on: neighbours first, then retain
    people (None: all of them)."""
    others = list(dict.fromkeys(list(concept.neighbour) + list(concept.retain)))
    return others if n_others is None else others[:n_others]


def _clamp_separation(model, concept, rows: list[dict[str, Any]], clamp: float,
                      sizes: Sequence[int], collateral_weight: float, others: list) -> None:
    """For each candidate hook and each number m in `sizes`, clamp the top-m selected features to
    -`clamp` when active (Farrell et al. 2024, Eq. 2) and measure the accuracy drop on the
    concept's forget probes and on `others` (other people's probes, `_validation_others`):
    separation = drop_forget - collateral_weight * drop_others.
    Sets each row's best m (`n_best`), its separation and all trials.

    The clamp changes a probe only where a selected feature is active on one of its tokens (rows
    of a batch do not interact), so each trial scores only those probes: the others' drop is
    exact, and a trial costs a forward of the forget probes plus the few others it touches."""
    from kif import metrics
    from kif.signatures.ablate import _clamp_features

    probes = list(concept.forget) + others
    prompts, answers = [p.prompt for p in probes], [p.answer for p in probes]
    nf, n = len(concept.forget), len(probes)
    base = torch.from_numpy(metrics.score_answers(model, prompts, answers).correct).double()
    # the token sequences score_answers feeds: [BOS] + prompt + answer
    seqs = [q + a for q, a in zip(metrics.encode_prompts(model, prompts),
                                  metrics.encode_answers(model, answers))]
    acts, lengths = sequence_activations(model, [r["hook"] for r in rows], seqs)
    row_of_token = torch.repeat_interleave(torch.arange(n), lengths)
    for r in rows:
        r["trials"] = []
        active = feature_activations(r["sae"], acts[r["hook"]])[:, r["chosen"]] > 0
        # fires[p, j]: feature j (in selection order) is active on some token of probe p
        fires = torch.zeros((n, active.shape[1])).index_add_(0, row_of_token,
                                                              active.float().cpu()) > 0
        for m in sorted({min(m, len(r["chosen"])) for m in sizes} - {0}):
            touched = fires[:, :m].any(-1).nonzero().flatten().tolist()
            drop = torch.zeros(n, dtype=torch.float64)
            if touched:
                hooks = [(r["hook"], _clamp_features(r["sae"], r["chosen"][:m], clamp))]
                ok = metrics.score_answers(model, [prompts[i] for i in touched],
                                           [answers[i] for i in touched], fwd_hooks=hooks).correct
                drop[touched] = base[touched] - torch.from_numpy(ok).double()
            t = {"n": m, "drop_forget": float(drop[:nf].mean()),
                 "drop_others": float(drop[nf:].mean()) if others else 0.0,
                 "others_touched": int(fires[nf:, :m].any(-1).sum())}
            t["separation"] = t["drop_forget"] - collateral_weight * t["drop_others"]
            r["trials"].append(t)
        # ties (e.g. no measurable effect at all) keep more features, Farrell et al.'s choice
        top = max(r["trials"], key=lambda t: (t["separation"], t["n"]),
                  default={"n": 0, "separation": 0.0})
        r["n_best"], r["separation"] = top["n"], top["separation"]


def _candidate_saes(model, hook: str | None, sae) -> list[tuple[str, Any, dict[str, Any]]]:
    if sae is not None:
        if isinstance(sae, (dict, str, os.PathLike)):
            obj = load_sae(sae if isinstance(sae, (str, os.PathLike)) else dict(sae), model)
            ref = {**dict(sae if isinstance(sae, dict) else {}), **obj.kif_ref}
        else:
            obj = sae
            # an SAE from load_sae knows where it came from; any other in-memory SAE cannot be
            # reloaded from the signature (the caller keeps it)
            ref = dict(getattr(obj, "kif_ref", {}))
        h = sae_hook(obj, {"hook": hook} if hook else ref)
        check_sae_fits(obj, model, h)
        return [(h, obj, {**ref, "hook": h})]
    name = _model_name(model)
    hooks = [hook] if hook is not None else shipped_hooks(name)
    if not hooks:
        raise SAELoadError(f"kif ships no SAE for model {name!r}; pass one with sae=...")
    out = []
    for h in hooks:
        ref = shipped_sae_ref(name, h)
        out.append((h, load_sae(ref, model), ref))
    return out


__all__ = ["SAELoadError", "check_sae_fits", "default_sae", "extract_sae_features",
           "feature_activations", "firing_counts", "load_sae", "parse_sae_spec", "retain_text",
           "sae_hook",
           "token_activations",
           "select_features", "shipped_hooks", "shipped_sae_ref"]
