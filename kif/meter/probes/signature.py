"""Signature persistence: does the concept's *signature* survive the erasure? (METHODS.md,
"Signatures"; KIF/ERUF's aim: an erasure should remove the signature itself, its Cohen's d
falling to a never-knew level.) Both are ``trace`` probes: they show a remnant, they do not
recover the answer.

* ``signature-persistence``: the KIF activation signature of each concept on the base
  (`kif.signatures.concept_vectors`: mean-pooled MLP output per prompt, z-scored, the
  mean-difference direction mapped back to raw space, at the hook with the largest Cohen's d;
  positives the concept's forget prompts, negatives other people's and the shared prompts).
  x = Cohen's d of the projections onto that base direction, measured on each model's own
  activations; ref0 = the base's d for the same direction with the concept's prompts replaced by
  unseen people's (a direction that only marks "a person is named" scores there too).
* ``sae-persistence``: the concept's SAE features (Farrell et al. 2024: retain firing frequency
  < 0.01, the 20 most frequent on the forget prompts) of the SAE kif ships for the base at the
  middle layer; x = their mean firing frequency on the concept's forget tokens; ref0 = the same
  features on unseen people's prompts under the base.

Both read the erased model through the base's directions and SAE, so they need an erased model
derived from the base (`kif.meter.audit.DERIVED_SHARE`).
"""

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kif import metrics
from kif.meter.audit import ProbeSkipped
from kif.meter.calibrate import calibrate
from kif.meter.report import ProbeResult
from kif.signatures import concept_vectors as cv
from kif.signatures.base import unit

N_NEGATIVES = 120
N_SAE_RETAIN = 240
SAE_TAU = 0.01
SAE_TOP_N = 20


def _negatives(audit) -> list:
    return list(audit.retain)[:N_NEGATIVES] + list(audit.shared)


def _hooks(model) -> list[str]:
    return [cv.HOOKS["mlp_out"].format(l=l) for l in range(model.cfg.n_layers)]


def _pooled(audit, role: str, which: str) -> Float[Tensor, "hook n d"]:
    def compute():
        prompts = (list(audit.probe_set("forget_small")) + _negatives(audit) if which == "main"
                   else list(audit.probe_set("reference_small")))
        return cv.pooled_activations(audit.model(role), prompts, _hooks(audit.model(role)))

    return audit.per_model(role, ("pooled", which, audit.set_key("forget_small"),
                                  audit.set_key("retain")), compute)


def directions(audit) -> dict[int, tuple[int, Tensor, float]]:
    """Concept index -> (hook index, raw unit direction, Cohen's d on the base)."""
    def compute():
        s = _pooled(audit, "base", "main")                   # [hook, n, d]
        nf = len(audit.probe_set("forget_small"))
        groups = audit.groups("forget_small")
        neg = s[:, nf:]
        out = {}
        for c in range(len(audit.concepts)):
            pos = s[:, :nf][:, groups == c]
            if pos.shape[1] < 2:
                continue
            both = torch.cat([pos, neg], dim=1)
            mu, sigma = both.mean(1, keepdim=True), both.std(1, keepdim=True)
            live = sigma > 1e-6 * sigma.amax(-1, keepdim=True).clamp_min(1e-30)
            inv = torch.where(live, 1.0 / sigma.clamp_min(1e-30), torch.zeros_like(sigma))
            diff = ((pos - mu) * inv).mean(1) - ((neg - mu) * inv).mean(1)
            raw = unit(unit(diff) * inv[:, 0])                  # [hook, d]
            d = cv._cohens_d(torch.einsum("hnd,hd->hn", pos, raw),
                             torch.einsum("hnd,hd->hn", neg, raw))
            h = int(torch.argmax(d))
            out[c] = (h, raw[h], float(d[h]))
        return out

    return audit.per_model("base", ("sigdirs", audit.set_key("forget_small"),
                                    audit.set_key("retain")), compute)


def run_signature(audit) -> ProbeResult:
    audit.require_derived("signature directions")
    dirs = directions(audit)
    if not dirs:
        raise ProbeSkipped("no concept has two forget prompts")
    nf = len(audit.probe_set("forget_small"))
    groups = audit.groups("forget_small")
    s_e = _pooled(audit, "erased", "main")
    ref = _pooled(audit, "base", "ref")
    ref_groups = audit.groups("reference_small")
    per, xs = {}, {"erased": [], "base": [], "ref0": []}
    for c, (h, r, d_b) in dirs.items():
        pe = s_e[h] @ r
        d_e = float(cv._cohens_d(pe[:nf][torch.from_numpy(groups == c)], pe[nf:]))
        neg_b = _pooled(audit, "base", "main")[h, nf:] @ r
        pr = ref[h] @ r
        d_0 = float(np.mean([float(cv._cohens_d(pr[torch.from_numpy(ref_groups == g)], neg_b))
                             for g in np.unique(ref_groups)]))
        per[audit.concept_names[c]] = calibrate(d_e, d_b, d_0)
        xs["erased"].append(d_e)
        xs["base"].append(d_b)
        xs["ref0"].append(d_0)
    x = {k: float(np.mean(v)) for k, v in xs.items()}
    hooks = _hooks(audit.base)
    return ProbeResult("signature-persistence", "trace", calibrate(x["erased"], x["base"],
                                                                  x["ref0"]),
                       values=x, per_concept=per,
                       reference="base model, concept prompts replaced by unseen people's",
                       info={"hooks": {audit.concept_names[c]: hooks[h]
                                       for c, (h, _, _) in dirs.items()},
                             "cohens_d": {audit.concept_names[c]: {"base": xs["base"][i],
                                                                   "erased": xs["erased"][i]}
                                          for i, c in enumerate(dirs)}})


# --------------------------------------------------------------------------------------------
# SAE features
# --------------------------------------------------------------------------------------------


def shipped_sae(audit):
    """(hook, SAE) kif ships for the base at its middle layer, or ProbeSkipped."""
    from kif.signatures import sae_features as sf

    name = str(getattr(audit.base, "kif_name", "") or "")
    hooks = sf.shipped_hooks(name) if name else []
    if not hooks:
        raise ProbeSkipped(f"kif ships no SAE for model {name or '(unnamed)'!r}")
    mid = f"blocks.{audit.base.cfg.n_layers // 2}.hook_resid_post"
    hook = mid if mid in hooks else hooks[len(hooks) // 2]
    return hook, sf.default_sae(audit.base, hook)


def _firing(audit, role: str, which: str, hook: str, sae) -> tuple[Tensor, Tensor]:
    """Per text of `which`: how many tokens each SAE feature fires on, and the token count."""
    def compute():
        model = audit.model(role)
        probes = audit.probe_set(which)
        if which == "retain":
            texts = [p.prompt + p.answer for p in probes][:N_SAE_RETAIN]
        else:
            texts = [p.prompt for p in probes]
        seqs = metrics.encode_prompts(model, texts)
        counts = torch.zeros(len(seqs), int(sae.cfg.d_sae))
        lengths = torch.tensor([len(q) for q in seqs])
        first = 1 if model.cfg.default_prepend_bos else 0
        layer = int(hook.split(".")[1])
        with torch.inference_mode():
            for idx in metrics._batches([len(q) for q in seqs], 128):
                tokens, lens = metrics._padded(model, [seqs[i] for i in idx])
                _, cache = model.run_with_cache(tokens, names_filter=[hook], padding_side="right",
                                                stop_at_layer=layer + 1)
                a = sae.encode(cache[hook].float().cpu()) > 0          # [b, pos, d_sae]
                mask = torch.arange(tokens.shape[1])[None] < lens[:, None]
                mask[:, :first] = False
                counts[idx] = (a & mask[..., None]).sum(1).float()
        return counts, (lengths - first).clamp_min(1).float()

    return audit.per_model(role, ("sae", hook, which, audit.set_key(which)), compute)


def sae_features(audit) -> tuple[str, object, dict[int, Tensor]]:
    """(hook, SAE, concept index -> selected feature ids) on the base (Farrell et al. 2024)."""
    from kif.signatures import sae_features as sf

    hook, sae = shipped_sae(audit)

    def compute():
        fc, fl = _firing(audit, "base", "forget_small", hook, sae)
        rc, rl = _firing(audit, "base", "retain", hook, sae)
        f_retain = rc.sum(0) / rl.sum()
        groups = torch.from_numpy(audit.groups("forget_small"))
        out = {}
        for c in range(len(audit.concepts)):
            m = groups == c
            if not m.any():
                continue
            f_forget = fc[m].sum(0) / fl[m].sum()
            out[c] = sf.select_features(f_forget, f_retain, SAE_TAU, SAE_TOP_N)
        return out

    return hook, sae, audit.per_model("base", ("saefeat", hook, audit.set_key("forget_small"),
                                               audit.set_key("retain")), compute)


def run_sae(audit) -> ProbeResult:
    audit.require_derived("SAE features")
    hook, sae, feats = sae_features(audit)
    groups = torch.from_numpy(audit.groups("forget_small"))
    ref_c, ref_l = _firing(audit, "base", "reference_small", hook, sae)
    e_c, e_l = _firing(audit, "erased", "forget_small", hook, sae)
    b_c, b_l = _firing(audit, "base", "forget_small", hook, sae)
    per, xs = {}, {"erased": [], "base": [], "ref0": []}
    n_sel = {}
    for c, f in feats.items():
        if len(f) == 0:
            per[audit.concept_names[c]] = None
            continue
        m = groups == c
        x_e = float((e_c[m][:, f].sum(0) / e_l[m].sum()).mean())
        x_b = float((b_c[m][:, f].sum(0) / b_l[m].sum()).mean())
        x_0 = float((ref_c[:, f].sum(0) / ref_l.sum()).mean())
        per[audit.concept_names[c]] = calibrate(x_e, x_b, x_0)
        xs["erased"].append(x_e)
        xs["base"].append(x_b)
        xs["ref0"].append(x_0)
        n_sel[audit.concept_names[c]] = int(len(f))
    if not xs["base"]:
        raise ProbeSkipped(f"no SAE feature of {hook} is specific to any concept")
    x = {k: float(np.mean(v)) for k, v in xs.items()}
    return ProbeResult("sae-persistence", "trace", calibrate(x["erased"], x["base"], x["ref0"]),
                       values=x, per_concept=per,
                       reference="the concept's features on unseen people's prompts (base)",
                       info={"hook": hook, "tau": SAE_TAU, "top_n": SAE_TOP_N,
                             "n_features": n_sel})
