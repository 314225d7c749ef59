"""Keys and values of MLP layers, read in batched forwards (the inputs of closed-form edits).

A key is the MLP's hidden activation `blocks.{l}.mlp.hook_post` [d_mlp] (ROME/MEMIT's k: the
input of W_out); its value is `k @ W_out + b_out` (`blocks.{l}.hook_mlp_out`). Last-token keys
are where the fact world's answers are produced (causal tracing: every strong site sits at the
last prompt token). Their second moments over a corpus are `kif.erasure.stats`.
"""

import re
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif import metrics


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def resid_hook(model, hook: str) -> str:
    """`hook`, or where its state is in a model with parallel blocks.

    A parallel block (GPT-NeoX / Pythia, GPT-J: `cfg.parallel_attn_mlp`) computes attention and
    MLP from the same input and adds both to the stream at once: there is no state between them,
    and TransformerLens never calls its `hook_resid_mid`. The first state that holds the block's
    attention output is its `hook_resid_post`, which stands in for `hook_resid_mid` there (the
    methods' default site, blocks.0.hook_resid_mid, where layer 0's attention has met the name).
    """
    m = re.match(r"blocks\.(\d+)\.hook_resid_mid$", hook)
    if m and getattr(model.cfg, "parallel_attn_mlp", False):
        return f"blocks.{m.group(1)}.hook_resid_post"
    return hook


@torch.no_grad()
def last_token_states(model, prompts: Sequence[str], hooks: Sequence[str], batch_size: int = 512
                      ) -> dict[str, Float[Tensor, "n d"]]:
    """Each prompt's activation at each hook at its last token (float32, CPU), from right-padded
    batched forwards stopped after the deepest hook's layer; per-head hooks (`attn.hook_z`) come
    with their heads concatenated."""
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
            out[h].append(cache[h][rows, last].reshape(len(chunk), -1).float().cpu())
    return {h: torch.cat(v) if v else torch.zeros(0) for h, v in out.items()}


__all__ = ["last_token_states", "resid_hook"]
