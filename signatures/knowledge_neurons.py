"""Knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers", ACL 2022).

A knowledge neuron is an MLP key (TransformerLens `blocks.{l}.mlp.hook_post`, METHODS.md
"Knowledge neurons") whose integrated-gradients attribution to the probability of a fact's answer
is large on most prompts that express the fact.

1. Attribution (Dai et al. Eq. 3-4, Riemann approximation with m steps, zero baseline): for the
   answer's first token y* and the activation vector w̄ of layer l at the prompt's last token,

       Attr(w_i) = w̄_i · (1/m) Σ_{k=1..m} ∂P(y* | (k/m)·w̄) / ∂w_i,

   the whole layer scaled together, one layer at a time (`attributions`).
2. Per prompt, keep neurons with Attr ≥ `threshold` × max over all layers (Dai et al. §3.2,
   t = 0.2); a fact's neurons are those kept in ≥ `share` of its prompts (p = 70 %) and in ≥
   `min_prompts` prompts (the paper's refining step: neurons shared by the fact's diverse prompts).
3. A concept (one or several people) is the union of its facts' neurons, scored by the mean
   relative attribution Attr / max over the concept's prompts and sorted by it (kif's choice, the
   paper stops at per-fact sets).

Departures, measured on the fact-world model (4 layers, d_mlp 1024) with
`kif.signatures.bench.causality` (10 `bench_people`, top-k neurons zeroed at every position;
targets: concept drop >= 0.5 and >= 5x random, collateral <= 0.02):

* `threshold` defaults to 0.05, not the paper's 0.2. With t = 0.2 a person gets about 70
  neurons, almost all in layer 0 (whose MLP at the last token carries nearly all the
  attribution), and zeroing them drops the person's accuracy by 0.15 (collateral 0.002): the
  facts are spread over a few hundred layer-0 neurons. With t = 0.05 a person gets 230-320
  neurons; zeroing the top 200 gives concept drop 0.69, random drop 0.00, collateral 0.013.
* Refining against unrelated facts (removing neurons common to other people's facts) is the
  option `refine_share`, off by default. Neurons kept on >= 50 % of `concept.retain` prompts are
  only ~1 % of the set (top 200: 0.68 / 0.00 / 0.012, the same); removing every neuron kept on
  any retain prompt, or subtracting the retain attribution, took the concept drop to about 0 on
  the development people: the neurons that carry a person are also used by others.
* `positions="all"` is an extension: the layer's activations at every position are scaled
  together and the attribution is summed over positions, so that it measures what zeroing the
  neuron at every position removes (IG completeness: sum_i Attr_i = P(w̄) - P(layer zeroed
  everywhere)). It is not better here (t = 0.1, top 200: 0.64 / 0.00 / 0.015) and 4x slower;
  the default, `"answer"`, is the paper's last-token attribution.

Cost: the attribution of layer l only changes the answer position from layer l on (causal
attention), so for `positions="answer"` the scaled copies run one position from layer l up,
attending to the clean keys and values of the earlier positions (TransformerLens' frozen
key/value cache); one forward + backward per layer and batch of prompts. On the fact-world model
(one core, shared) a person's 30 prompts take 1.5-2 s, one fact's 5 prompts 0.3 s: about 8x
less than running the whole sequences, which is the fallback for other position schemes.
"""

import logging
import time
from collections import Counter
from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from kif import metrics
from kif.signatures.base import Signature, new_signature, register

log = logging.getLogger(__name__)

# Neurons ablated by `kif bench signatures`: one person's facts are spread over ~200 neurons
# (mostly layer 0) in the embedded model; 10 neurons move nothing measurable.
BENCH_K = 200

Positions = Literal["answer", "all"]


def _post(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def _final_logits(model, resid: Float[Tensor, "batch pos d_model"]
                  ) -> Float[Tensor, "batch pos d_vocab_out"]:
    # The tail of HookedTransformer.forward, applied to the answer position only (the unembedding
    # of every position would cost more than the blocks on a small model).
    from transformer_lens.utils import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


def _hooked_kv_unsupported(model) -> str | None:
    """Why the answer-position shortcut would not be exact (None: it is). Beyond the cache's own
    conditions (`metrics.kv_cache_unsupported`), the shortcut fills its cache from the values
    read at `hook_k` and `hook_v`, and TransformerLens transforms keys and values after those
    hooks on some architectures (the OLMo family's q/k norm, q/k/v clipping): its own cache holds
    the transformed ones, a cache filled from the hooks would not."""
    c = model.cfg
    why = metrics.kv_cache_unsupported(model)
    if why is None and getattr(c, "clip_qkv", None) is not None:
        why = "clipped queries, keys and values"
    if why is None and c.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM",
                                                    "Olmo3ForCausalLM"):
        why = f"the {c.original_architecture} q/k norm"
    return why


def _frozen_kv_cache(model, cache, lo: int, last, steps: int):
    """A frozen key/value cache holding the clean keys and values of every prompt position before
    the answer position (layers `lo`..), each prompt repeated `steps` times."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    width = int(last.max())
    entries = []
    for layer in range(int(model.cfg.n_layers)):
        if layer < lo:
            k = v = cache[f"blocks.{lo}.attn.hook_k"][:1, :0]  # never read
        else:
            k = cache[f"blocks.{layer}.attn.hook_k"][:, :width].repeat_interleave(steps, dim=0)
            v = cache[f"blocks.{layer}.attn.hook_v"][:, :width].repeat_interleave(steps, dim=0)
        entries.append(TransformerLensKeyValueCacheEntry(past_keys=k, past_values=v, frozen=True))
    mask = torch.arange(width + 1, device=last.device)[None, :] < last[:, None]
    mask[:, width] = True  # the answer position itself, fed as the one new token
    previous = mask[:, :width].int().repeat_interleave(steps, dim=0)
    kv = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=previous,
                                      frozen=True)
    return kv, mask.int().repeat_interleave(steps, dim=0)


def _prob_cached(model, cache, kv, layer: int, z: Float[Tensor, "rows d_mlp"], last, tgt,
                 steps: int) -> Float[Tensor, " rows"]:
    # Patching layer l at the answer position changes nothing at earlier positions (causal
    # attention), so only the answer position is run from layer l on, attending to the clean
    # keys and values of the earlier positions. The padding mask also gives rotary embeddings
    # the true position of that token.
    past, mask = kv
    b = last.shape[0]
    resid = cache[f"blocks.{layer}.hook_resid_pre"][torch.arange(b, device=last.device), last]
    resid = resid.repeat_interleave(steps, dim=0)[:, None]

    def patch(a, hook):
        return z[:, None].to(a.dtype)

    final = model.run_with_hooks(resid, start_at_layer=layer, stop_at_layer=int(model.cfg.n_layers),
                                 past_kv_cache=past, attention_mask=mask,
                                 fwd_hooks=[(_post(layer), patch)])
    logits = _final_logits(model, final)[:, 0].float()
    return torch.softmax(logits, dim=-1).gather(-1, tgt[:, None])[:, 0]


def _max_err(prob: Float[Tensor, " rows"], clean: Float[Tensor, " b"], steps: int) -> float:
    return float((prob.detach().unflatten(0, (clean.shape[0], steps))[:, -1] - clean).abs().max())


def _prob_full(model, cache, layer: int, z: Tensor, last, tgt, steps: int,
               positions: Positions) -> Float[Tensor, " rows"]:
    # Every position from layer l on, started at the clean residual stream of layer l.
    rows = torch.arange(z.shape[0], device=last.device)
    last_r = last.repeat_interleave(steps)

    if positions == "all":
        def patch(a, hook):
            return z.to(a.dtype)
    else:
        def patch(a, hook):
            return a.index_put((rows, last_r), z.to(a.dtype))

    resid = cache[f"blocks.{layer}.hook_resid_pre"].repeat_interleave(steps, dim=0)
    final = model.run_with_hooks(resid, start_at_layer=layer, stop_at_layer=int(model.cfg.n_layers),
                                 fwd_hooks=[(_post(layer), patch)])
    logits = _final_logits(model, final[rows, last_r][:, None])[:, 0].float()
    return torch.softmax(logits, dim=-1).gather(-1, tgt[:, None])[:, 0]


def attributions(model, prompts: Sequence[str], answers: Sequence[str], *, steps: int = 20,
                 layers: Sequence[int] | None = None, positions: Positions = "answer",
                 max_rows: int = 256) -> Float[Tensor, "n_prompts n_layers d_mlp"]:
    """Integrated-gradients attribution of every MLP neuron to P(first answer token).

    Dai et al. 2022, Eq. 3-4, zero baseline, m = `steps` Riemann steps:
    Attr(w_i) = w̄_i · (1/m) Σ_{k=1..m} ∂P(y* | (k/m)·w̄)/∂w_i, where w̄ is the activation
    vector of `blocks.{l}.mlp.hook_post` at the prompt's last token (the position whose logits
    predict y*, the answer's first token), the whole vector scaled together, one layer at a time.
    With `positions="all"` the layer's activations at every prompt position are scaled together
    and each neuron's attribution is summed over positions (kif's extension, see the module doc).

    Batched: one clean forward per batch of prompts caches every layer's input; then per layer
    one forward + backward over the `steps` scaled copies of all the batch's prompts (at most
    `max_rows` rows), started at `blocks.{l}.hook_resid_pre` so that the layers below l are not
    recomputed (a pass per layer, because each starts at its own layer: together they cost less
    than one pass over all layers with n_layers times the rows). With `positions="answer"` only
    the answer position is run, against the clean keys and values of the earlier positions
    (module docstring, "Cost"); the clean copy k = m checks that this reproduces the model, else
    whole sequences are run. Prompts are encoded as `kif.metrics` does (`[BOS] +
    tokens(prompt)`, right-padded). Returns float32 attributions in `layers` order (default:
    every layer).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if positions not in ("answer", "all"):
        raise ValueError(f"positions must be 'answer' or 'all', got {positions!r}")
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    layers = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    p_ids = metrics.encode_prompts(model, prompts)
    a_ids = metrics.encode_answers(model, answers)
    for i, a in enumerate(a_ids):
        if not a:
            raise ValueError(f"answer {i} ({answers[i]!r}) has no tokens")
    targets = torch.tensor([a[0] for a in a_ids], dtype=torch.long)
    out = torch.zeros(len(p_ids), len(layers), d_mlp, dtype=torch.float32,
                      device=model.cfg.device)
    if not p_ids:
        return out
    lo = min(layers)
    names = {_post(x) for x in layers} | {f"blocks.{x}.hook_resid_pre" for x in layers}
    cached = positions == "answer" and _hooked_kv_unsupported(model) is None
    if cached:
        names |= {f"blocks.{x}.attn.hook_{kv}" for x in range(lo, n_layers) for kv in "kv"}
    per_batch = max(1, max_rows // steps)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
    with torch.inference_mode(False), torch.enable_grad():
        for idx in metrics._batches([len(p) for p in p_ids], per_batch):
            tokens, lengths = metrics._padded(model, [p_ids[i] for i in idx])
            b, device = len(idx), tokens.device
            last = lengths.to(device) - 1  # [b]: the position that predicts y*
            with torch.no_grad():
                logits, cache = model.run_with_cache(
                    tokens, names_filter=lambda nm: nm in names, padding_side="right")
                clean = torch.softmax(logits[torch.arange(b, device=device), last].float(), -1)
                clean = clean.gather(-1, targets[idx].to(device)[:, None])[:, 0]
            tgt = targets[idx].to(device).repeat_interleave(steps)
            if cached:
                kv = _frozen_kv_cache(model, cache, lo, last, steps)
            for j, layer in enumerate(layers):
                act = cache[_post(layer)]  # [b, pos, d_mlp]
                wbar = act if positions == "all" else act[torch.arange(b, device=device), last]
                a = alphas.to(device=device, dtype=act.dtype)
                a = a.view((1, steps) + (1,) * (wbar.ndim - 1))
                z = (a * wbar[:, None]).flatten(0, 1).detach().requires_grad_()  # [b*steps, ...]
                # Row k = m of each prompt is the clean run: a cheap check that the shortcuts
                # (start at layer l; answer position only) reproduce the model.
                tol = 1e-3 if act.dtype in (torch.float32, torch.float64) else 5e-2
                if cached:
                    prob = _prob_cached(model, cache, kv, layer, z, last, tgt, steps)
                    if _max_err(prob, clean, steps) > tol:
                        log.warning("the key/value-cache shortcut does not reproduce %s; "
                                    "running whole sequences", model.cfg.model_name)
                        cached = False
                if not cached:
                    prob = _prob_full(model, cache, layer, z, last, tgt, steps, positions)
                    err = _max_err(prob, clean, steps)
                    if err > tol:
                        raise RuntimeError(f"the attribution forward of layer {layer} does not "
                                           f"reproduce the model (max |dP| = {err:.2e})")
                (grad,) = torch.autograd.grad(prob.sum(), z)
                attr = wbar.float() * grad.float().unflatten(0, (b, steps)).mean(1)
                if positions == "all":
                    attr = attr.sum(1)
                out[torch.tensor(idx, device=out.device), j] = attr.to(out.device)
    return out


def relative(attr: Float[Tensor, "n_prompts n_layers d_mlp"]
             ) -> Float[Tensor, "n_prompts n_layers d_mlp"]:
    """Attributions divided by each prompt's maximum over all layers and neurons (Dai et al.
    §3.2 threshold each prompt against it); a prompt with no positive attribution gets 0."""
    mx = attr.flatten(1).amax(1)
    scale = torch.where(mx > 0, mx, torch.inf)
    return attr / scale[:, None, None]


def fact_neurons(rel: Float[Tensor, "n_prompts n_layers d_mlp"], threshold: float = 0.2,
                 share: float = 0.7, min_prompts: int = 3) -> Bool[Tensor, "n_layers d_mlp"]:
    """Boolean [n_layers, d_mlp] mask of one fact's knowledge neurons: relative attribution
    ≥ `threshold` in at least `share` of the fact's prompts and in at least `min_prompts` of them
    (Dai et al. 2022 §3.2, t = 0.2, p = 70 %)."""
    kept = (rel >= threshold).sum(0)
    need = max(float(min_prompts), share * rel.shape[0])
    return kept >= need - 1e-9


@register("knowledge-neurons")
def extract_knowledge_neurons(model, concept, *, steps: int = 20, threshold: float = 0.05,
                              share: float = 0.7, min_prompts: int = 3,
                              positions: Positions = "answer",
                              layers: Sequence[int] | None = None,
                              refine_share: float | None = None, max_rows: int = 256
                              ) -> Signature:
    """The knowledge neurons of `concept` (Dai et al. 2022; see the module docstring).

    Attribution on every `concept.forget` prompt; the facts are the (subject, relation) groups of
    those prompts; the signature is the union of the facts' neurons (`fact_neurons` with
    `threshold`, `share`, `min_prompts`), scored by the mean relative attribution over all the
    concept's prompts, descending. `refine_share`: also drop neurons kept (relative attribution
    ≥ `threshold`) on at least this share of `concept.retain` prompts (other people's facts).
    `maps["attribution"]`: mean attribution [n_layers, d_mlp]; `maps["score"]`: the score of every
    neuron; `info["facts"]`: the neuron count of each fact. On the fact-world model the top 200
    neurons are causal (module docstring); `layers` restricts the attribution to some layers.
    """
    t0 = time.perf_counter()
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    layer_list = list(range(n_layers)) if layers is None else sorted({int(x) % n_layers
                                                                      for x in layers})
    probes = list(concept.forget)
    attr = attributions(model, [p.prompt for p in probes], [p.answer for p in probes],
                        steps=steps, layers=layer_list, positions=positions, max_rows=max_rows)
    full = attr.new_zeros(len(probes), n_layers, d_mlp)
    full[:, layer_list] = attr
    rel = relative(full)
    score = rel.mean(0)

    facts: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(probes):
        facts.setdefault((p.subject, p.relation), []).append(i)
    union = torch.zeros(n_layers, d_mlp, dtype=torch.bool, device=full.device)
    fact_info = []
    for (subject, relation), rows in facts.items():
        mask = fact_neurons(rel[rows], threshold, share, min_prompts)
        union |= mask
        fact_info.append({"subject": subject, "relation": relation, "n_prompts": len(rows),
                          "n_neurons": int(mask.sum())})

    n_refined = 0
    if refine_share is not None and concept.retain:
        r_attr = attributions(model, [p.prompt for p in concept.retain],
                              [p.answer for p in concept.retain], steps=steps,
                              layers=layer_list, positions=positions, max_rows=max_rows)
        r_full = r_attr.new_zeros(len(concept.retain), n_layers, d_mlp)
        r_full[:, layer_list] = r_attr
        common = (relative(r_full) >= threshold).float().mean(0) >= refine_share
        n_refined = int((union & common).sum())
        union &= ~common

    idx = union.nonzero()  # [k, 2] (layer, neuron)
    s = score[idx[:, 0], idx[:, 1]]
    order = torch.argsort(s, descending=True, stable=True)
    idx, s = idx[order], s[order]
    if len(idx) == 0:
        log.warning("no knowledge neurons found for %r (threshold %s, share %s)",
                    concept.name, threshold, share)
    by_layer = Counter(int(x) for x in idx[:, 0])
    mean_attr = full.mean(0)
    layer_mass = mean_attr.clamp_min(0).sum(-1)  # where the attribution lies, per layer
    seconds = time.perf_counter() - t0
    log.info("knowledge neurons of %r: %d neurons %s in %.1f s", concept.name, len(idx),
             dict(sorted(by_layer.items())), seconds)
    return new_signature(
        model, concept, "knowledge-neurons", component="neuron",
        component_hooks=tuple(_post(int(x)) for x in idx[:, 0]),
        scores=s.float(), indices=idx.long(),
        maps={"attribution": mean_attr, "score": score},
        settings={"steps": steps, "threshold": threshold, "share": share,
                  "min_prompts": min_prompts, "positions": positions, "layers": layer_list,
                  "refine_share": refine_share, "max_rows": max_rows, "baseline": "zero",
                  "target": "P(first answer token)",
                  "score": "mean relative attribution over the concept's forget prompts"},
        info={"n_prompts": len(probes), "n_facts": len(facts), "facts": fact_info,
              "n_neurons": int(len(idx)), "n_refined_out": n_refined,
              "neurons_per_layer": {str(k): v for k, v in sorted(by_layer.items())},
              "attribution_per_layer": [round(float(x), 6) for x in layer_mass],
              "best_layer": int(layer_mass.argmax()),
              "seconds": round(seconds, 3)})
