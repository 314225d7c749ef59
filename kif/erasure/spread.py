"""STAMP's multi-layer form: the edit spread over several MLPs (MEMIT's spreading, Meng et al.
2023), toward per-prompt optimized residual targets (ROME's v*, Meng et al. 2022).

A one-layer edit toward the mean refusal value works where one MLP writes the answer (the zoo's
GPT-2). Where the answer is read through several layers (the Llama twin), rewriting one MLP's
output leaves the others to rebuild it. Here, for each forget prompt:

1. z_i = h_i + delta_i: the residual after the last edited layer L, at the prompt's last token,
   plus a small change that makes the refusal the answer: Adam on -log p(refusal) with an L2
   penalty, each row stopped once p(refusal) reaches a set probability (as ROME and MEMIT stop
   their v*), at most a set number of steps. Only the last token runs in that loop, through
   the layers after L, on the prompts' cached keys and values, all prompts in one batch.
2. For the edited layers l_1 < ... < l_k in turn, on the model carrying the edits made so far:
   the remaining gap (z - h_L) is split evenly over the layers still to edit, and layer l_j's MLP
   takes its share, solved in STAMP's closed form (`stamp_delta`, with the retain keys' Gram of
   the unedited model, as MEMIT uses its precomputed covariances).

The edits are made in place only while they are solved; the model is put back bit for bit,
also on errors, and the caller gets the deltas.
"""

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from kif import metrics
from kif.inplace import inplace_training


@dataclasses.dataclass(frozen=True)
class ResidualTargets:
    """Per-row residual changes and how each was reached (rows in the caller's order)."""
    delta: Float[Tensor, "b d"]  # float64, CPU
    steps: Int[Tensor, "b"]  # Adam steps the row took
    prob: Float[Tensor, "b"]  # p(target) with the change

    def summary(self, stop_prob: float | None) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "rows": len(self.steps), "steps_max": int(self.steps.max()),
            "steps_mean": round(float(self.steps.float().mean()), 2),
            "prob_min": round(float(self.prob.min()), 4),
            "norm_mean": round(float(self.delta.norm(dim=1).mean()), 3)}
        if stop_prob is not None:  # rows the step cap stopped short of the stopping probability
            out["rows_short"] = int((self.prob < stop_prob).sum())
        return out


def residual_targets(model, ids: Sequence[Sequence[int]], layer: int, target_id: int, steps: int,
                     lr: float, decay: float, stop_prob: float | None = None,
                     batch_size: int = 256) -> ResidualTargets:
    """delta_i at `blocks.{layer}.hook_resid_post`, last token, for the prompts' token ids `ids`:
    Adam on -log p(target | h + delta) + decay |delta|^2 (rows independent) for at most `steps`
    steps; with `stop_prob`, each row stops at the first step where p(target) reaches it, as ROME
    and MEMIT stop their v*. (The penalised optimum itself is ill-conditioned: Adam is still
    shrinking the changes after 400 steps, results/stamp_target_convergence.py.) Prompts of every
    length share one batch: a step streams the weights after `layer` once, whatever the rows."""
    parts: list[ResidualTargets] = []
    log_stop = math.log(stop_prob) if stop_prob is not None else math.inf
    # batches of similar lengths: the prompts' forward pads each to its batch's longest
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(ids), batch_size):
        h, tail = last_token_tail(model, [ids[i] for i in order[s:s + batch_size]], layer)
        delta = torch.zeros(h.shape, device=h.device, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        taken = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        done = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        for step in range(steps + 1):
            logp = F.log_softmax(tail(h + delta.to(h.dtype)).float(), -1)[:, target_id]
            done |= logp.detach() >= log_stop
            if step == steps or bool(done.all()):
                break
            loss = (-logp + decay * delta.pow(2).sum(1))[~done].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            kept = delta.detach()[done].clone()
            opt.step()
            with torch.no_grad():  # a stopped row keeps its change (Adam's momentum would move it)
                delta[done] = kept
            taken += (~done).long()
        parts.append(ResidualTargets(delta.detach().double().cpu(), taken.cpu(),
                                     logp.detach().exp().double().cpu()))
    back = torch.empty(len(ids), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(ids))
    return ResidualTargets(*(torch.cat([getattr(p, f) for p in parts])[back]
                             for f in ("delta", "steps", "prob")))


def last_token_tail(model, ids: Sequence[Sequence[int]], layer: int
                    ) -> tuple[Float[Tensor, "b d"], Callable[[Tensor], Tensor]]:
    """For prompts' token ids `ids` (any lengths): the residual at `blocks.{layer}.hook_resid_post`
    of each last token, and the map from that residual to the last token's logits.

    A change at the last token cannot reach the positions before it (causal attention), so
    their keys and values are computed once (TransformerLens's KV cache, frozen; the prompts
    left-padded, the attention mask hiding the padding and counting each row's positions from
    its own first token) and the map runs one token through the layers after `layer` and one
    row of the unembedding: an optimisation step costs 1/n of the full-sequence forward and
    backward."""
    n_layers = model.cfg.n_layers
    tokens, mask = metrics._left_padded(model, ids)
    cache = metrics._kv_cache_class().init_cache(model.cfg, model.cfg.device, len(ids))
    with torch.no_grad():
        if tokens.shape[1] > 1:
            model(tokens[:, :-1], attention_mask=mask[:, :-1], past_kv_cache=cache,
                  stop_at_layer=n_layers)
        cache.freeze()
        h = model(tokens[:, -1:], attention_mask=mask[:, -1:], past_kv_cache=cache,
                  stop_at_layer=layer + 1)[:, -1]

    def tail(resid: Float[Tensor, "b d"]) -> Float[Tensor, "b d_vocab"]:
        # from a layer on, TransformerLens takes the whole mask (prefix and this token) as given
        r = model(resid[:, None], start_at_layer=layer + 1, stop_at_layer=n_layers,
                  past_kv_cache=cache, attention_mask=mask)
        return metrics._head(model, r[:, -1])
    return h, tail


def with_deltas(model, deltas: dict[str, Tensor], fn: Callable[[], float]) -> float:
    """`fn()` evaluated with `deltas` added to the named weights (put back bit for bit after)."""
    params = dict(model.named_parameters())
    with inplace_training(model, list(deltas)), torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d.to(params[n].dtype).to(params[n].device))
        return fn()


@dataclasses.dataclass(frozen=True)
class _Pass:
    """What one forward leaves for the next layer of the spread loop."""
    resid_pre: Float[Tensor, "n pos d"]  # before the key layer's block, every position
    keys: Float[Tensor, "n m"]  # the key layer's MLP keys, last tokens
    h_top: Float[Tensor, "n d"]  # the residual after the top edited layer, last tokens (float64)


@torch.no_grad()
def _forward(model, x: Tensor, start: int | None, key_layer: int, top: int,
             lengths: Int[Tensor, "n"]) -> _Pass:
    """Blocks `start`..`top` on `x` (the residual before block `start`; right-padded token ids
    when `start` is None), keeping what the next layer of the loop needs."""
    from kif.erasure.stamp import _hook

    got: dict[str, Tensor] = {}

    def keep(act, hook):
        got[hook.name] = act
    pre, key = f"blocks.{key_layer}.hook_resid_pre", _hook(key_layer)[0]
    kw = {"padding_side": "right"} if start is None else {"start_at_layer": start}
    h = model.run_with_hooks(x, fwd_hooks=[(pre, keep), (key, keep)], stop_at_layer=top + 1, **kw)
    def at_last(act: Tensor) -> Tensor:
        return act[torch.arange(act.shape[0], device=act.device), (lengths - 1).to(act.device)]
    return _Pass(got[pre], at_last(got[key]).float().cpu(), at_last(h).double().cpu())


def first_pass(model, prompts: Sequence[str], layers: Sequence[int]) -> tuple[_Pass, Tensor]:
    """The spread loop's first forward, on the unedited model (the same for every forget weight
    the calibration tries), and the prompts' lengths."""
    tokens, lengths = metrics._padded(model, metrics.encode_prompts(model, list(prompts)))
    return _forward(model, tokens, None, min(layers), max(layers), lengths), lengths


def spread_edit(model, prompts: Sequence[str], layers: Sequence[int],
                deltas_at_last: Float[Tensor, "n d"],
                retain_grams: Mapping[int, Float[Tensor, "m m"]],
                solve: Callable[[Tensor, Tensor, Tensor], Tensor],
                check: Callable[[], float] | None = None,
                first: tuple[_Pass, Tensor] | None = None
                ) -> tuple[dict[str, Float[Tensor, "m d"]], float | None]:
    """MEMIT's loop over `layers` (ascending) toward z = h_L + `deltas_at_last`; `solve(k_f, t,
    c_retain)` is one layer's closed form. Returns {W_out name: delta} and `check()` evaluated
    with every edit in place (None without it). The model is left as it was. `first`:
    `first_pass(model, prompts, layers)`, when the caller reuses it.

    Each layer's forward starts at the layer edited before it, from the residual the previous
    forward kept there (the blocks below it have not changed since), and gives this layer's
    keys and the top residual in one pass: over layers l_1..l_k up to L, sum_j (L - l_{j-1} + 1)
    blocks instead of a forward to l_j and another to L for every layer."""
    layers = sorted(layers)
    top = layers[-1]
    state, lengths = first if first is not None else first_pass(model, prompts, layers)
    z = state.h_top + deltas_at_last
    names = [f"blocks.{l}.mlp.W_out" for l in layers]
    out: dict[str, Tensor] = {}
    with inplace_training(model, names), torch.no_grad():
        for j, l in enumerate(layers):
            if j:
                state = _forward(model, state.resid_pre, layers[j - 1], l, top, lengths)
            gap = (z - state.h_top) / (len(layers) - j)
            dw = solve(state.keys, gap, retain_grams[l])
            w = model.blocks[l].mlp.W_out
            w.add_(dw.to(w.dtype).to(w.device))
            out[f"blocks.{l}.mlp.W_out"] = dw
        checked = check() if check is not None else None
    return out, checked


__all__ = ["ResidualTargets", "last_token_tail", "first_pass", "residual_targets", "spread_edit",
           "with_deltas"]
