"""Keys and values of MLP layers, read in batched forwards (the inputs of closed-form edits).

A key is the MLP's hidden activation `blocks.{l}.mlp.hook_post` [d_mlp] (ROME/MEMIT's k: the
input of W_out); its value is `k @ W_out + b_out` (`blocks.{l}.hook_mlp_out`). Last-token keys
are where the fact world's answers are produced (causal tracing: every strong site sits at the
last prompt token); the Gram matrix of all tokens' keys is accumulated with the streaming
key-statistics kernel, never holding every key in memory.
"""

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif import metrics


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


@torch.no_grad()
def last_token_states(model, prompts: Sequence[str], hooks: Sequence[str], batch_size: int = 512
                      ) -> dict[str, Float[Tensor, "n d"]]:
    """Each prompt's activation at each hook at its last token (float32, CPU), from right-padded
    batched forwards stopped after the deepest hook's layer."""
    ids = metrics.encode_prompts(model, list(prompts))
    names = set(hooks)
    stop = max(int(h.split(".")[1]) for h in hooks) + 1
    stop_at = stop if stop < model.cfg.n_layers else None
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for chunk in _batches(len(ids), batch_size):
        tokens, lengths = metrics._padded(model, [ids[i] for i in chunk])
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                        padding_side="right", stop_at_layer=stop_at)
        rows = torch.arange(len(chunk), device=tokens.device)
        last = (lengths - 1).to(tokens.device)
        for h in hooks:
            out[h].append(cache[h][rows, last].float().cpu())
    return {h: torch.cat(v) if v else torch.zeros(0) for h, v in out.items()}


@torch.no_grad()
def token_grams(model, texts: Sequence[str], hooks: Sequence[str], batch_size: int = 256,
                backend: str = "auto") -> dict[str, Float[Tensor, "d d"]]:
    """Sum over every non-BOS, non-padding token of `texts` of k k^T at each hook (float32), with
    the masked streaming key-statistics kernel."""
    from kif.kernels import KeyStats

    ids = metrics.encode_prompts(model, list(texts))
    names = set(hooks)
    stop = max(int(h.split(".")[1]) for h in hooks) + 1
    stop_at = stop if stop < model.cfg.n_layers else None
    stats = {}
    for chunk in _batches(len(ids), batch_size):
        tokens, lengths = metrics._padded(model, [ids[i] for i in chunk])
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                        padding_side="right", stop_at_layer=stop_at)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        mask = (pos[None] < lengths.to(tokens.device)[:, None]) & (pos[None] > 0)
        for h in hooks:
            act = cache[h]
            if h not in stats:
                stats[h] = KeyStats(act.shape[-1], device=act.device, backend=backend)
            stats[h].update(act.reshape(-1, act.shape[-1]), mask.reshape(-1))
    return {h: s.result().gram for h, s in stats.items()}


__all__ = ["last_token_states", "token_grams"]
