"""Keys and values of MLP layers, read in batched forwards (the inputs of closed-form edits).

A key is the MLP's hidden activation `blocks.{l}.mlp.hook_post` [d_mlp] (ROME/MEMIT's k: the
input of W_out); its value is `k @ W_out + b_out` (`blocks.{l}.hook_mlp_out`). Last-token keys
are where the fact world's answers are produced (causal tracing: every strong site sits at the
last prompt token). Their second moments over a corpus are `kif.erasure.stats`.
"""

import re
from typing import Callable, Sequence

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
def visit_states(model, ids: Sequence[Sequence[int]], hooks: Sequence[str],
                 visit: Callable[[str, Tensor, Tensor, range], None], batch_size: int = 256) -> None:
    """Right-padded batched forwards of the token ids `ids`, stopped after the deepest hook's
    layer, calling `visit(hook, activation, lengths, rows)` on each hook's activation as the
    forward passes it (`rows`: the batch's indices into `ids`).

    Nothing is cached: a pass over every residual site of a model holds one site's activation
    at a time, where `run_with_cache` would hold all of them (on GPT-2 small 24 sites of a
    256-row batch are most of a gigabyte)."""
    # stopping after the last block too: TransformerLens then returns the residual instead of
    # unembedding every position (256 rows x 20 tokens x 50257 logits are 1 GB on GPT-2 small)
    stop_at = max(int(h.split(".")[1]) for h in hooks) + 1
    for chunk in _batches(len(ids), batch_size):
        tokens, lengths = metrics._padded(model, [ids[i] for i in chunk])

        def hook_fn(act, hook, lengths=lengths, chunk=chunk):
            visit(hook.name, act, lengths.to(act.device), chunk)
        model.run_with_hooks(tokens, fwd_hooks=[(h, hook_fn) for h in dict.fromkeys(hooks)],
                             padding_side="right", stop_at_layer=stop_at)


def last_token_states(model, prompts: Sequence[str], hooks: Sequence[str], batch_size: int = 512
                      ) -> dict[str, Float[Tensor, "n d"]]:
    """Each prompt's activation at each hook at its last token (float32, CPU), from right-padded
    batched forwards stopped after the deepest hook's layer (all hooks in one pass); per-head
    hooks (`attn.hook_z`) come with their heads concatenated."""
    ids = metrics.encode_prompts(model, list(prompts))
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}

    def keep(hook: str, act: Tensor, lengths: Tensor, rows: range) -> None:
        at = act[torch.arange(len(rows), device=act.device), lengths - 1]
        out[hook].append(at.reshape(len(rows), -1).float().cpu())
    if ids:
        visit_states(model, ids, hooks, keep, batch_size)
    return {h: torch.cat(v) if v else torch.zeros(0) for h, v in out.items()}


__all__ = ["last_token_states", "resid_hook", "visit_states"]
