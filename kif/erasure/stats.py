"""Second-moment statistics of a layer's keys over a text corpus, cached on disk: an MLP's keys
(`blocks.{l}.mlp.hook_post`, the input of W_out) or an attention layer's (`blocks.{l}.attn.hook_z`,
every head's output concatenated, the input of W_O).

ROME and MEMIT compute the keys' second moment C = sum k k^T over a large corpus once per model
and layer and cache it (their `layer_stats`); every later edit is then a small solve. STAMP does
the same with the concept's retain corpus: the Gram of its prompts at the last token, plus every
token of their text at a small weight (in the fact world: every other known person's and every
shared fact's training phrasings).

The cache is keyed on what the keys actually depend on: the parameters *upstream* of
`blocks.{l}.mlp.hook_post` (embeddings, the blocks before l, and block l up to W_in), the token ids
of the corpus and the token weight. Editing an MLP's output weights (what STAMP does), or an
attention layer's (kif's signature removal), leaves its own keys unchanged, so a sequence of
STAMP requests at one layer keeps hitting the cache; any change upstream, of the data or the
tokenizer, misses it. What is cached is the corpus together with the concept's forget rows, and
the forget rows are subtracted (exact: a Gram is a sum), so one cached file serves every concept
of a source.

The cache folder is `$KIF_CACHE` or `~/.cache/kif`; files are written to a temporary name and
renamed, and an unreadable file is recomputed, never trusted.
"""

import dataclasses
import hashlib
import logging
import os
import pathlib
import re
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif import integrity, metrics

log = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when the statistics' definition changes


@dataclasses.dataclass(frozen=True)
class KeyMoments:
    """Statistics of one hook's keys over a corpus of (prompt, answer) rows, float64 on CPU.

    gram = sum over rows of k_last k_last^T + token_weight * sum over every non-BOS token of the
    row's prompt + answer of k k^T; mean_last = the mean last-prompt-token key; n_rows rows."""

    gram: Float[Tensor, "m m"]
    mean_last: Float[Tensor, "m"]
    n_rows: int
    token_weight: float

    def __sub__(self, other: "KeyMoments") -> "KeyMoments":
        if other.token_weight != self.token_weight:
            raise ValueError("key moments with different token weights cannot be combined")
        n = self.n_rows - other.n_rows
        mean = (self.mean_last * self.n_rows - other.mean_last * other.n_rows) / max(n, 1)
        return KeyMoments(self.gram - other.gram, mean, n, self.token_weight)


def cache_dir() -> pathlib.Path:
    """`$KIF_CACHE`, or `~/.cache/kif` (read at call time, never at import)."""
    return pathlib.Path(os.environ.get("KIF_CACHE") or pathlib.Path.home() / ".cache" / "kif")


KEY_HOOK = re.compile(r"blocks\.(\d+)\.(mlp\.hook_post|attn\.hook_z)$")


def _layer(hook: str) -> int:
    m = KEY_HOOK.match(hook)
    if not m:
        raise ValueError("key statistics are taken at blocks.{l}.mlp.hook_post or "
                         f"blocks.{{l}}.attn.hook_z, not {hook!r}")
    return int(m.group(1))


def key_dim(model, hook: str) -> int:
    """Width of the keys at `hook`: d_mlp, or n_heads * d_head for attention."""
    _layer(hook)
    return model.cfg.d_mlp if hook.endswith("mlp.hook_post") else model.cfg.n_heads * model.cfg.d_head


def upstream_parameters(model, hook: str) -> list[str]:
    """Names of the parameters the keys at `hook` depend on (sorted): everything before the
    hook's layer, and of that layer what runs before the hook (all but the MLP's output weights
    for MLP keys; the first LayerNorm and Q, K, V for attention keys)."""
    layer = _layer(hook)
    attn = hook.endswith("attn.hook_z")
    out = []
    for name, _ in model.named_parameters():
        m = re.match(r"blocks\.(\d+)\.(.*)$", name)
        if m is None:
            if not name.startswith(("ln_final", "unembed")):
                out.append(name)
        elif int(m.group(1)) < layer:
            out.append(name)
        elif int(m.group(1)) == layer:
            # grouped-query attention stores K and V as attn._W_K, attn._b_V, ...
            part = m.group(2).replace("attn._", "attn.")
            if (attn and (part.startswith("ln1") or part[:7] in ("attn.W_", "attn.b_")
                          and part[-1] in "QKV")) or (
                    not attn and part not in ("mlp.W_out", "mlp.b_out")):
                out.append(name)
    return sorted(out)


def _cache_key(model, hook: str, ids: Sequence[Sequence[int]], last: Sequence[int],
               token_weight: float) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{hook}|{token_weight!r}|".encode())
    first = metrics.bos_offset(model)
    if first != 1:
        # the token Gram starts at a model's first text token (`compute_key_moments`); up to
        # version 1 it always left position 0 out, which is still right after a BOS (those
        # entries stay valid), not for a model that takes none
        digest.update(f"first={first}|".encode())
    params = dict(model.named_parameters())
    for name in upstream_parameters(model, hook):
        t = params[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for row, j in zip(ids, last):
        digest.update(f"{j}:{','.join(map(str, row))};".encode())
    return digest.hexdigest()


def _encode_rows(model, prompts: Sequence[str], answers: Sequence[str]
                 ) -> tuple[list[list[int]], list[int]]:
    """[BOS] + prompt + answer token ids per row, and the position of the prompt's last token
    (the prompt is encoded on its own: where BPE merges across the boundary, the last token of
    the joined text's prompt part is the one whose prefix matches)."""
    full = metrics.encode_prompts(model, [p + a for p, a in zip(prompts, answers)])
    alone = metrics.encode_prompts(model, list(prompts))
    last = []
    for f, a in zip(full, alone):
        j = len(a) - 1
        while j > 0 and f[:j + 1] != a[:j + 1]:
            j -= 1  # a merged boundary token: fall back to the last shared position
        last.append(j)
    return full, last


@torch.no_grad()
def compute_key_moments(model, ids: Sequence[Sequence[int]], last: Sequence[int], hook: str,
                        token_weight: float, batch_size: int = 256, backend: str = "auto"
                        ) -> KeyMoments:
    """One batched pass (stopped after the hook's layer): the last-token Gram in float64 and the
    all-token Gram with the streaming key-statistics kernel.

    Under torch.distributed (`kif.distributed`), each rank reads a contiguous shard of the rows
    and the partial sums are all-reduced: every rank returns the statistics of all rows. The
    token Gram is then a float64 sum of per-rank float32 sums, so it equals the single-process
    one to float32 rounding (the order of the float32 additions differs), not bit for bit."""
    from kif import distributed
    from kif.kernels.dispatch import KeyStats

    layer = _layer(hook)
    stop_at = layer + 1  # after the last block too: no unembedding of every position
    m = key_dim(model, hook)
    gram_last = torch.zeros(m, m, dtype=torch.float64)
    sum_last = torch.zeros(m, dtype=torch.float64)
    tokens_stats = KeyStats(m, backend=backend)
    first = metrics.bos_offset(model)
    shard = distributed.rank_shard(len(ids))  # range(len(ids)) in a single process
    for s in range(shard.start, shard.stop, batch_size):
        e = min(s + batch_size, shard.stop)
        tokens, lengths = metrics._padded(model, ids[s:e])
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == hook,
                                        padding_side="right", stop_at_layer=stop_at)
        act = cache[hook].reshape(*tokens.shape, m)  # attention: heads concatenated
        rows = torch.arange(tokens.shape[0], device=act.device)
        k = act[rows, torch.tensor(last[s:e], device=act.device)].double().cpu()
        gram_last += k.T @ k
        sum_last += k.sum(0)
        if token_weight > 0:
            # every token of the text, the BOS (where the model takes one) left out
            pos = torch.arange(tokens.shape[1], device=act.device)
            mask = (pos[None] < lengths.to(act.device)[:, None]) & (pos[None] >= first)
            tokens_stats.update(act.reshape(-1, m), mask.reshape(-1))
    gram_last = distributed.all_reduce_sum(gram_last)  # the identity in a single process
    sum_last = distributed.all_reduce_sum(sum_last)
    gram = gram_last
    if token_weight > 0 and len(ids):  # len(ids), not the shard's: every rank joins the reduce
        gram = gram + token_weight * distributed.all_reduce_sum(
            tokens_stats.result().gram.double().cpu())
    return KeyMoments(gram, sum_last / max(len(ids), 1), len(ids), token_weight)


def _read_cached(path: pathlib.Path, model, hook: str, n_rows: int, token_weight: float
                 ) -> KeyMoments | None:
    """The cached statistics in `path`, or None (absent, unreadable or of the wrong shape)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:  # one read: header, then the numbers
            want = (f.metadata() or {}).get("sha256")
            if want is None:  # written before the checksum: recomputed once, then checked
                log.info("recomputing key statistics cached by an older kif: %s", path)
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}
        if want != _payload_sha256(t):  # a flipped byte in the numbers parses fine
            log.warning("ignoring key statistics that fail their checksum: %s", path)
            return None
        got = KeyMoments(t["gram"], t["mean_last"], int(t["n_rows"]), token_weight)
        m = key_dim(model, hook)
        if got.gram.shape == (m, m) and got.n_rows == n_rows:
            return got
        log.warning("ignoring key statistics of the wrong shape in %s", path)
    except Exception as err:  # a torn or foreign file: recompute, never trust it
        log.warning("ignoring unreadable key statistics %s (%s)", path, err)
    return None


def key_moments(model, prompts: Sequence[str], answers: Sequence[str], hook: str,
                token_weight: float, cache: bool = True) -> KeyMoments:
    """`KeyMoments` of `hook` over the rows (prompt, answer), from the cache when it holds them
    for these upstream weights and token ids, else computed (and stored when `cache`; under
    torch.distributed by rank 0 only, after a pass sharded over the ranks)."""
    from kif import distributed

    ids, last = _encode_rows(model, prompts, answers)
    if not cache:
        return compute_key_moments(model, ids, last, hook, token_weight)
    key = _cache_key(model, hook, ids, last, token_weight)
    path = cache_dir() / "key-moments" / f"{key}.safetensors"
    cached = _read_cached(path, model, hook, len(ids), token_weight)
    # every rank computes (a collective) unless every rank holds the file
    if distributed.all_true(cached is not None):
        return cached
    got = compute_key_moments(model, ids, last, hook, token_weight)
    if not distributed.is_main():
        return got  # one writer
    _write_cache(path, {"gram": got.gram.contiguous(), "mean_last": got.mean_last.contiguous(),
                        "n_rows": torch.tensor(got.n_rows)})
    return got


def _payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_cache(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write the statistics into a private staging folder beside `path` and rename the file
    into place: concurrent writers each rename a complete file (the same numbers); a killed one
    leaves only its staging folder (safetensors' own temporary file included), which the next
    writer of the same key sweeps. A failure (a full disk, a read-only home) costs the cache,
    never the erasure."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with integrity.staged(path) as stage:
            save_file(tensors, str(stage / path.name),
                      metadata={"sha256": _payload_sha256(tensors)})
            os.replace(stage / path.name, path)
    except (OSError, SafetensorError, integrity.WriteError) as err:
        log.warning("could not cache key statistics in %s (%s)", path.parent, err)


def retain_moments(model, concept, hook: str, token_weight: float, cache: bool = True,
                   method: str = "a closed-form edit") -> KeyMoments:
    """`KeyMoments` of `hook` over the concept's retain corpus (`Concept.retain_corpus`).

    The cached statistics are those of the corpus together with the concept's forget rows, in a
    canonical order, and the forget rows are subtracted (exact: a Gram is a sum). Concepts of
    one source share that union (the fact world's: every known person and shared fact), so one
    cached file serves every concept, sequential requests included."""
    concept.require("retain_corpus", method=method)
    rows = sorted({(p.prompt, p.answer) for p in (*concept.retain_corpus, *concept.forget)})
    corpus = {(p.prompt, p.answer) for p in concept.retain_corpus}
    mine = [r for r in dict.fromkeys((p.prompt, p.answer) for p in concept.forget)
            if r not in corpus]
    total = key_moments(model, [r[0] for r in rows], [r[1] for r in rows], hook, token_weight,
                        cache=cache)
    if not mine:
        return total
    return total - key_moments(model, [r[0] for r in mine], [r[1] for r in mine], hook,
                               token_weight, cache=False)


__all__ = ["KeyMoments", "cache_dir", "compute_key_moments", "key_dim", "key_moments",
           "retain_moments", "upstream_parameters"]
