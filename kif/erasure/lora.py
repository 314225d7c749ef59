"""LoRA on a TransformerLens model's weights, applied to the activations.

`W + A @ B` as a parametrization forms every adapted weight once per forward (or once per step
under `parametrize.cached()`), keeps it for the backward pass, and computes the full-size
gradient `x^T g` of each before reducing it to the factors: on GPT-2 small with every layer
adapted that is 340 MiB of formed weights plus their gradients, on top of the model. Here the
weight is never formed: each adapted product `x @ W` gets `(x @ A) @ B` added where the model
computes it (the same function, up to float rounding), so the update costs two rank-r matmuls
per weight and nothing of the weight's size. The model's parameters are not touched (nothing
to save, nothing to restore); `delta(name)` is the update, `remove()` takes every hook off.

Where each product is computed (TransformerLens components):
- `W_Q`, `W_K`, `W_V` (`_W_K`, `_W_V` under grouped-query attention): the attention's query,
  key and value inputs (its forward arguments) times the weight, added at `hook_q/k/v`;
- `W_O`: `hook_z` times the weight, added to the attention module's output;
- `W_in` (`hook_pre`, or `hook_pre_linear` where the MLP is gated) and `W_gate` (`hook_pre`):
  the MLP's input times the weight;
- `W_out`: `hook_post` times the weight, added to the MLP module's output.
The hooks are plain torch hooks (not TransformerLens's): `run_with_hooks` and `reset_hooks`
leave them alone, and a permanent hook of an installed erasure keeps its place.
"""

from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kif.erasure.core import ErasureError

# LoRA targets: attention too, since the concept is first assembled by layer 0's attention over
# the name tokens (the capsule's site, blocks.0.hook_resid_mid, lies before any MLP); W_gate
# where the MLP is gated (SwiGLU / GeGLU: Llama, Qwen2, Mistral, Gemma), whose gate decides
# as much as W_in which keys the MLP writes with. A weight the block lacks is skipped.
WEIGHTS = (("attn", "W_Q"), ("attn", "W_K"), ("attn", "W_V"), ("attn", "W_O"),
           ("mlp", "W_in"), ("mlp", "W_gate"), ("mlp", "W_out"))

# configurations whose attention or MLP inputs are not one [batch, pos, d_model] tensor
_UNSUPPORTED_FLAGS = ("use_split_qkv_input", "use_attn_in", "load_in_4bit")


def lora_targets(model, layers: Sequence[int]) -> list[tuple[str, torch.nn.Module, str]]:
    """(parameter name, module, attribute) of every weight of `WEIGHTS` in `layers`, named as
    `model.named_parameters()` names it. Under grouped-query attention TransformerLens stores
    K and V per key/value head as `_W_K` / `_W_V` and `W_K` / `W_V` are read-only properties that
    repeat them per query head: the LoRA goes on the stored parameter (what the checkpoint holds),
    so the update stays one per key/value head."""
    out = []
    for l in layers:
        block = model.blocks[l]
        for part, attr in WEIGHTS:
            mod = getattr(block, part)
            own = dict(mod.named_parameters(recurse=False))
            name = next((n for n in (attr, f"_{attr}") if n in own), None)
            if name is not None:
                out.append((f"blocks.{l}.{part}.{name}", mod, name))
    return out


class LoRAFactors(torch.nn.Module):
    """The factors of one adapted weight: per-head weights [n_heads, ., .] are treated as the
    matrix [prod(leading dims), last dim]. `a` starts random, `b` at zero (no change)."""

    def __init__(self, shape: tuple[int, ...], rank: int, generator: torch.Generator):
        super().__init__()
        rows = 1
        for x in shape[:-1]:
            rows *= x
        self.shape = tuple(shape)
        # float32 factors whatever the model's dtype (their updates are too small for bf16)
        self.a = torch.nn.Parameter(torch.randn(rows, rank, generator=generator) / rows ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(rank, shape[-1]))

    def delta(self) -> Tensor:
        """A @ B in the weight's shape (float32)."""
        return (self.a @ self.b).reshape(self.shape)

    def heads(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos heads d_head"]:
        """x @ delta[h] for each head h of a per-head input weight [heads, d_in, d_head]."""
        heads, d_in = self.shape[0], self.shape[1]
        a = self.a.to(x.dtype).view(heads, d_in, -1)
        return torch.einsum("bpd,hdr->bphr", x, a) @ self.b.to(x.dtype)

    def matrix(self, x: Float[Tensor, "batch pos rows"]) -> Float[Tensor, "batch pos cols"]:
        """x @ delta, the weight read as [rows, cols] (W_O's heads flattened by the caller)."""
        return (x @ self.a.to(x.dtype)) @ self.b.to(x.dtype)


def _input(args: tuple, kwargs: dict, name: str, position: int) -> Tensor:
    return kwargs[name] if name in kwargs else args[position]


class HookedLoRA:
    """LoRA factors for `targets` (from `lora_targets`), added to the model's activations by
    torch hooks while `active()` is true (the hooks stay registered; `remove()` takes them
    off). `parameters()` are the factors to train; `delta(name)` the update of one weight."""

    def __init__(self, model, targets: Sequence[tuple[str, torch.nn.Module, str]], rank: int,
                 generator: torch.Generator, active: Callable[[], bool] = lambda: True):
        bad = [f for f in _UNSUPPORTED_FLAGS if getattr(model.cfg, f, False)]
        if bad:
            raise ErasureError(f"LoRA on activations needs the model's plain attention and MLP "
                               f"inputs: turn off cfg.{bad[0]}")
        self.active = active
        self.factors: dict[str, LoRAFactors] = {}
        self._handles: list = []
        self._seen: dict[tuple[int, str], Tensor] = {}  # (module id, input) -> this forward's
        by_module: dict[int, tuple[torch.nn.Module, dict[str, LoRAFactors]]] = {}
        for name, mod, attr in targets:
            weight = getattr(mod, attr)
            f = LoRAFactors(tuple(weight.shape), rank, generator).to(weight.device)
            self.factors[name] = f
            by_module.setdefault(id(mod), (mod, {}))[1][attr.lstrip("_")] = f
        try:
            for mod, fs in by_module.values():
                if {"W_Q", "W_K", "W_V", "W_O"} & fs.keys():
                    self._attention(mod, fs)
                else:
                    self._mlp(mod, fs)
        except BaseException:
            self.remove()
            raise

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for f in self.factors.values() for p in f.parameters()]

    def delta(self, name: str) -> Tensor:
        return self.factors[name].delta().detach()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    # ---- hooks -------------------------------------------------------------------------------

    def _keep(self, mod: torch.nn.Module, key: str, value: Tensor) -> None:
        self._seen[(id(mod), key)] = value

    def _add(self, hook_point: torch.nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
        def hook(_m, _inp, out):
            return out + fn(out) if self.active() else None
        self._handles.append(hook_point.register_forward_hook(hook))

    def _capture(self, hook_point: torch.nn.Module, mod: torch.nn.Module, key: str) -> None:
        def hook(_m, _inp, out):
            self._keep(mod, key, out)
        self._handles.append(hook_point.register_forward_hook(hook))

    def _pre(self, mod: torch.nn.Module, names: Sequence[tuple[str, int]]) -> None:
        def hook(_m, args, kwargs):
            for key, position in names:
                self._keep(mod, key, _input(args, kwargs, key, position))
        self._handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, mod: torch.nn.Module, key: str, f: LoRAFactors | None) -> None:
        """The module's output gets `seen[key] @ delta` (W_O, W_out); the forward's captured
        inputs are dropped either way (they would otherwise outlive the step)."""
        def hook(_m, _inp, out):
            x = self._seen.get((id(mod), key))
            for k in [k for k in self._seen if k[0] == id(mod)]:
                del self._seen[k]
            if f is None or x is None or not self.active():
                return None
            return out + f.matrix(x.flatten(-2) if key == "z" else x)
        self._handles.append(mod.register_forward_hook(hook))

    def _attention(self, attn: torch.nn.Module, fs: dict[str, LoRAFactors]) -> None:
        self._pre(attn, [("query_input", 0), ("key_input", 1), ("value_input", 2)])
        for w, key, hp in (("W_Q", "query_input", attn.hook_q), ("W_K", "key_input", attn.hook_k),
                           ("W_V", "value_input", attn.hook_v)):
            if w in fs:
                self._add(hp, self._heads_fn(attn, key, fs[w]))
        if "W_O" in fs:
            self._capture(attn.hook_z, attn, "z")
        self._post(attn, "z", fs.get("W_O"))

    def _heads_fn(self, mod: torch.nn.Module, key: str, f: LoRAFactors):
        def fn(out: Tensor) -> Tensor:
            d = f.heads(self._seen[(id(mod), key)])
            if d.shape[2] != out.shape[2]:  # grouped-query attention ungrouped by TL's flag
                d = d.repeat_interleave(out.shape[2] // d.shape[2], dim=2)
            return d
        return fn

    def _mlp(self, mlp: torch.nn.Module, fs: dict[str, LoRAFactors]) -> None:
        self._pre(mlp, [("x", 0)])
        gated = hasattr(mlp, "hook_pre_linear")
        # a gated MLP computes x @ W_gate at hook_pre and x @ W_in at hook_pre_linear
        for w, hp in (("W_in", mlp.hook_pre_linear if gated else mlp.hook_pre),
                      ("W_gate", mlp.hook_pre if gated else None)):
            if w in fs:
                f = fs[w]
                self._add(hp, lambda out, f=f: f.matrix(self._seen[(id(mlp), "x")]))
        if "W_out" in fs:
            self._capture(mlp.hook_post, mlp, "post")
        self._post(mlp, "post", fs.get("W_out"))


__all__ = ["WEIGHTS", "HookedLoRA", "LoRAFactors", "lora_targets"]
