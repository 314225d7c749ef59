"""STAMP's multi-layer form: the edit spread over several MLPs (MEMIT's spreading, Meng et al.
2023), toward per-prompt optimized residual targets (ROME's v*, Meng et al. 2022).

A one-layer edit toward the mean refusal value works where one MLP writes the answer (the zoo's
GPT-2). Where the answer is read through several layers (the Llama twin), rewriting one MLP's
output leaves the others to rebuild it. Here, for each forget prompt:

1. z_i = h_i + delta_i: the residual after the last edited layer L, at the prompt's last token,
   plus the smallest change (Adam on log p(refusal) with an L2 penalty) that makes the refusal
   the answer. Only the last token runs in that loop, through the layers after L, on the
   prompt's cached keys and values.
2. For the edited layers l_1 < ... < l_k in turn, on the model carrying the edits made so far:
   the remaining gap (z - h_L) is split evenly over the layers still to edit, and layer l_j's MLP
   takes its share, solved in STAMP's closed form (`stamp_delta`, with the retain keys' Gram of
   the unedited model, as MEMIT uses its precomputed covariances).

The edits are made in place only while they are solved; the model is put back bit for bit,
also on errors, and the caller gets the deltas.
"""

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from kif import metrics
from kif.erasure.keys import last_token_states
from kif.inplace import inplace_training


def residual_targets(model, ids: Sequence[Sequence[int]], layer: int, target_id: int, steps: int,
                     lr: float, decay: float, batch_size: int = 256) -> Float[Tensor, "b d"]:
    """delta_i at `blocks.{layer}.hook_resid_post`, last token: argmin over delta of
    -log p(target | h + delta) + decay |delta|^2 (per row; rows are independent), for the
    prompts' token ids `ids` (rows in order)."""
    out: list[Tensor | None] = [None] * len(ids)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(i)
    for members in by_length.values():
        for s in range(0, len(members), batch_size):
            chunk = members[s:s + batch_size]
            tok = torch.tensor([list(ids[i]) for i in chunk], dtype=torch.long,
                               device=model.cfg.device)
            h, tail = last_token_tail(model, tok, layer)
            delta = torch.zeros(h.shape, device=h.device, dtype=torch.float32,
                                requires_grad=True)
            opt = torch.optim.Adam([delta], lr=lr)
            for _ in range(steps):
                logp = F.log_softmax(tail(h + delta.to(h.dtype)).float(), -1)[:, target_id]
                loss = -logp.sum() + decay * delta.pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for j, i in enumerate(chunk):
                out[i] = delta[j].detach().double().cpu()
    return torch.stack(out)


def last_token_tail(model, tokens: Int[Tensor, "b n"], layer: int
                    ) -> tuple[Float[Tensor, "b d"], Callable[[Tensor], Tensor]]:
    """For prompts of one length (no padding): the residual at `blocks.{layer}.hook_resid_post`
    of the last token, and the map from that residual to the last token's logits.

    A change at the last token cannot reach the positions before it (causal attention), so
    their keys and values are computed once (TransformerLens's KV cache, frozen) and the map
    runs one token through the layers after `layer` and one row of the unembedding: an
    optimisation step costs 1/n of the full-sequence forward and backward."""
    n_layers = model.cfg.n_layers
    cache = metrics._kv_cache_class().init_cache(model.cfg, model.cfg.device, tokens.shape[0])
    with torch.no_grad():
        if tokens.shape[1] > 1:
            prefix = tokens[:, :-1]
            model(prefix, attention_mask=torch.ones_like(prefix), past_kv_cache=cache,
                  stop_at_layer=n_layers)
        cache.freeze()
        last = tokens[:, -1:]
        h = model(last, attention_mask=torch.ones_like(last), past_kv_cache=cache,
                  stop_at_layer=layer + 1)[:, -1]

    def tail(resid: Float[Tensor, "b d"]) -> Float[Tensor, "b d_vocab"]:
        # no attention mask: the cached prefix has no padding, and the causal mask with the
        # cache's offset lets the one query see every key
        r = model(resid[:, None], start_at_layer=layer + 1, stop_at_layer=n_layers,
                  past_kv_cache=cache)
        return metrics._head(model, r[:, -1])
    return h, tail


def resid_last(model, tokens, lengths, layer: int) -> Float[Tensor, "b d"]:
    hook = f"blocks.{layer}.hook_resid_post"
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    with torch.no_grad():
        h = model(tokens, stop_at_layer=layer + 1, padding_side="right")
    return h[rows, (lengths - 1).to(tokens.device)].double().cpu()


def with_deltas(model, deltas: dict[str, Tensor], fn: Callable[[], float]) -> float:
    """`fn()` evaluated with `deltas` added to the named weights (put back bit for bit after)."""
    params = dict(model.named_parameters())
    with inplace_training(model, list(deltas)), torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d.to(params[n].dtype).to(params[n].device))
        return fn()


def spread_edit(model, prompts: Sequence[str], layers: Sequence[int],
                deltas_at_last: Float[Tensor, "n d"],
                retain_grams: Mapping[int, Float[Tensor, "m m"]],
                solve: Callable[[Tensor, Tensor, Tensor], Tensor],
                check: Callable[[], float] | None = None
                ) -> tuple[dict[str, Float[Tensor, "m d"]], float | None]:
    """MEMIT's loop over `layers` (ascending) toward z = h_L + `deltas_at_last`; `solve(k_f, t,
    c_retain)` is one layer's closed form. Returns {W_out name: delta} and `check()` evaluated
    with every edit in place (None without it). The model is left as it was."""
    from kif.erasure.stamp import _hook

    layers = sorted(layers)
    top = layers[-1]
    ids = metrics.encode_prompts(model, list(prompts))
    tokens, lengths = metrics._padded(model, ids)
    z = resid_last(model, tokens, lengths, top) + deltas_at_last
    names = [f"blocks.{l}.mlp.W_out" for l in layers]
    out: dict[str, Tensor] = {}
    with inplace_training(model, names), torch.no_grad():
        for j, l in enumerate(layers):
            key = _hook(l)[0]
            k_f = last_token_states(model, prompts, [key])[key]
            gap = (z - resid_last(model, tokens, lengths, top)) / (len(layers) - j)
            dw = solve(k_f, gap, retain_grams[l])
            w = model.blocks[l].mlp.W_out
            w.add_(dw.to(w.dtype).to(w.device))
            out[f"blocks.{l}.mlp.W_out"] = dw
        checked = check() if check is not None else None
    return out, checked


__all__ = ["last_token_tail", "residual_targets", "resid_last", "spread_edit", "with_deltas"]
