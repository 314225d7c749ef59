"""Restoration and steering attacks (METHODS.md, "Restoration / steering").

* ``restoration``: add back what the erasure took from the concept's signature. For the
  signature direction r (the KIF activation signature, `kif.meter.probes.signature`) at its hook,
  f = h . r per position, and for the concept's SAE features f = their activations;
  f_res = f_unl + alpha (f_orig - f_unl), alpha in {1, 5, 10}, written back into the erased
  model's residual (h += (f_res - f_unl) r, or + sum_i (f_res - f_unl)_i W_dec[i]) at every
  position of the forget prompts, f_orig read from the base at the same positions. x = forget
  accuracy after restoration (the best alpha and kind); ref0 = an oracle that shares the base's
  weights, restored the same way (the injection itself may carry the answer), else the base on
  unseen people (where f_orig = f_unl: nothing to restore). Values report METHODS' restoration rate
  (acc_res - acc_unl) / (acc_orig - acc_unl). A knowledge that only lost its signature direction
  comes back; one deleted downstream does not. Needs an erased model derived from the base.
* ``steering``: anonymized activation steering (Seyitoglu et al. 2024, "Extracting Unlearned
  Information from LLMs with Activation Steering"): S = A(q) - mean A(q_anonymized), the
  erased model's own last-prompt-position state at the penultimate block output, the name in q
  replaced by unseen people's names; c S (c = 2) is added at the last prompt position (the
  first generated token) and `STEER_SAMPLES` answers are "sampled": the attack succeeds with
  probability 1 - (1 - p)^N, p the steered model's probability of the whole answer (the exact
  expectation of sampling, as in the rephrasing attack). Comparable on the oracle (its own
  activations) or the base on unseen people.
"""

import numpy as np
import torch

from kif.meter.audit import ProbeSkipped, run_pass
from kif.meter.calibrate import score_rows
from kif.meter.report import ProbeResult

ALPHAS = (1.0, 5.0, 10.0)
STEER_C = 2.0
STEER_SAMPLES = 10
N_ANON = 2


class _Components:
    """Per-row readers f(h) = act((h - b0) E + b) and writers delta f -> delta f D, grouped by
    hook (a row's concept decides its hook and components)."""

    def __init__(self, hooks, enc, enc_b, dec, b0, relu):
        self.hooks, self.enc, self.enc_b, self.dec, self.b0, self.relu = \
            hooks, enc, enc_b, dec, b0, relu

    def read(self, h, rows):
        f = torch.einsum("bpd,bdk->bpk", h - self.b0[rows][:, None], self.enc[rows]) + \
            self.enc_b[rows][:, None]
        return torch.relu(f) if self.relu else f

    def write(self, df, rows):
        return torch.einsum("bpk,bkd->bpd", df, self.dec[rows])


def _restore(audit, comps: _Components, probes, alpha: float | None, store: dict,
             role: str = "erased"):
    """alpha None: capture the base's f; else restore `role`'s model with it."""
    model = audit.model("base" if alpha is None else role)
    n = len(probes)

    def batch_hooks(idx, tokens):
        idx_t = torch.tensor(idx)
        width = tokens.shape[1]
        out = []
        for hook in sorted(set(comps.hooks[i] for i in idx)):
            sel = torch.tensor([j for j, i in enumerate(idx) if comps.hooks[i] == hook])
            rows = idx_t[sel]

            def fn(act, hook, sel=sel, rows=rows):
                h = act[sel].float()
                f = comps.read(h, rows)
                if alpha is None:
                    store.setdefault("f", {})
                    for r, row in enumerate(rows.tolist()):
                        store["f"][row] = f[r].clone()
                    return act
                f_orig = torch.stack([store["f"][row][:width] for row in rows.tolist()])
                act = act.clone()
                act[sel] = (h + comps.write(alpha * (f_orig - f), rows)).to(act.dtype)
                return act
            out.append((hook, fn))
        return out

    return run_pass(model, probes, resid=False, batch_hooks=batch_hooks)


def _direction_components(audit):
    from kif.meter.probes.signature import _hooks, directions

    dirs = directions(audit)
    groups = audit.groups("forget_small")
    keep = [j for j, g in enumerate(groups) if int(g) in dirs]
    hooks_all = _hooks(audit.base)
    d = audit.base.cfg.d_model
    hooks = [hooks_all[dirs[int(groups[j])][0]] for j in keep]
    enc = torch.stack([dirs[int(groups[j])][1].float()[:, None] for j in keep])  # [n, d, 1]
    return keep, _Components(hooks, enc, torch.zeros(len(keep), 1), enc.transpose(1, 2),
                             torch.zeros(len(keep), d), relu=False)


def _sae_components(audit):
    from kif.meter.probes.signature import sae_features

    hook, sae, feats = sae_features(audit)
    groups = audit.groups("forget_small")
    keep = [j for j, g in enumerate(groups) if int(g) in feats and len(feats[int(g)])]
    if not keep:
        raise ProbeSkipped("no SAE concept features")
    k = max(len(feats[int(groups[j])]) for j in keep)
    d = audit.base.cfg.d_model
    enc = torch.zeros(len(keep), d, k)
    enc_b = torch.full((len(keep), k), -1e9)  # padding features never fire
    dec = torch.zeros(len(keep), k, d)
    w_enc, b_enc = sae.W_enc.detach().float().cpu(), sae.b_enc.detach().float().cpu()
    w_dec, b_dec = sae.W_dec.detach().float().cpu(), sae.b_dec.detach().float().cpu()
    for r, j in enumerate(keep):
        f = feats[int(groups[j])]
        enc[r, :, : len(f)] = w_enc[:, f]
        enc_b[r, : len(f)] = b_enc[f]
        dec[r, : len(f)] = w_dec[f]
    b0 = b_dec[None].expand(len(keep), d).clone()
    return keep, _Components([hook] * len(keep), enc, enc_b, dec, b0, relu=True)


def run_restoration(audit) -> ProbeResult:
    audit.require_derived("signature directions and SAE features")
    forget = audit.probe_set("forget_small")
    base_acc = audit.passes("base", "forget_small").scores.correct.astype(float)
    unl_acc = audit.passes("erased", "forget_small").scores.correct.astype(float)
    kinds = {"direction": lambda: _direction_components(audit)}
    try:
        from kif.meter.probes.signature import shipped_sae
        shipped_sae(audit)
        kinds["sae"] = lambda: _sae_components(audit)
    except ProbeSkipped:
        pass
    audit.bar.total(len(kinds) * (1 + len(ALPHAS)))
    groups = audit.groups("forget_small")
    ref = audit.passes("base", "reference_small").scores.correct.astype(float)
    best, values, per = None, {}, {}
    for kind, build in kinds.items():
        keep, comps = build()
        probes = [forget[j] for j in keep]
        idx = np.array(keep)
        store: dict = {}
        _restore(audit, comps, probes, None, store)
        audit.bar.advance()
        for alpha in ALPHAS:
            e = _restore(audit, comps, probes, alpha, store).scores.correct.astype(float)
            # an oracle that shares the base's weights receives the same injection: does it
            # "recover" facts it never knew? (else: the base on unseen people, nothing to restore)
            o = (_restore(audit, comps, probes, alpha, store, "oracle").scores.correct
                 .astype(float) if audit.oracle_derived else None)
            s = score_rows(e, base_acc[idx], groups=groups[idx], names=audit.concept_names,
                           oracle=o, reference=ref,
                           reference_groups=audit.groups("reference_small"))
            acc_unl = float(unl_acc[idx].mean())
            den = s.x_base - acc_unl
            values[f"{kind}/alpha={alpha:g}/acc"] = s.x_erased
            values[f"{kind}/alpha={alpha:g}/restoration_rate"] = \
                (s.x_erased - acc_unl) / den if den > 1e-9 else None
            for c, v in s.per_concept.items():
                if v is not None:
                    per[c] = max(per.get(c) or 0.0, v)
                else:
                    per.setdefault(c, None)
            if s.score is not None and (best is None or s.score > best[0].score):
                best = (s, kind, alpha)
            audit.bar.advance()
    if best is None:
        return ProbeResult("restoration", "latent", None, values=values, per_concept=per)
    s, kind, alpha = best
    values.update(s.values())
    values.update({"best_kind": kind, "best_alpha": alpha})
    return ProbeResult("restoration", "latent", s.score, values=values, per_concept=per,
                       chance=s.chance, reference="oracle, restored the same way"
                       if audit.oracle_derived else "base model on unseen people",
                       info={"alphas": list(ALPHAS), "kinds": list(kinds)})


# --------------------------------------------------------------------------------------------
# Anonymized activation steering
# --------------------------------------------------------------------------------------------


def _anon_names(audit, which: str) -> list[str]:
    """Names of people no model saw, other than the subjects of `which`."""
    own = {p.subject for p in audit.probe_set(which)}
    names = [s for s in dict.fromkeys(p.subject for p in audit.reference) if s not in own]
    if len(names) < N_ANON:
        names += [s for s in dict.fromkeys(p.subject for p in audit.retain) if s not in own]
    return names


def _steer(audit, role: str, which: str) -> np.ndarray:
    def compute():
        model = audit.model(role)
        layer = max(0, model.cfg.n_layers - 2)
        hook = f"blocks.{layer}.hook_resid_post"
        probes = list(audit.probe_set(which))
        names = _anon_names(audit, which)
        state = audit.passes(role, which).resid[layer + 1]                 # A(q)
        anon = []
        for j in range(N_ANON):
            swapped = [p.prompt.replace(p.subject, names[(i + j) % len(names)])
                       for i, p in enumerate(probes)]
            anon.append(run_pass(model, probes, prompts=swapped).resid[layer + 1])
        steer = STEER_C * (state - torch.stack(anon).mean(0))             # [n, d]
        from kif import metrics

        last = torch.tensor([len(x) - 1 for x in metrics.encode_prompts(
            model, [p.prompt for p in probes])])

        def batch_hooks(idx, tokens):
            idx_t = torch.tensor(idx)

            def fn(act, hook):
                act = act.clone()
                r = torch.arange(len(idx))
                act[r, last[idx_t]] += steer[idx_t].to(act.dtype)
                return act
            return [(hook, fn)]

        lp = run_pass(model, probes, resid=False, batch_hooks=batch_hooks).scores.logprob
        return 1.0 - (1.0 - np.minimum(np.exp(lp), 1.0)) ** STEER_SAMPLES

    return audit.per_model(role, ("steer", which, audit.set_key(which)), compute)


def run_steering(audit) -> ProbeResult:
    if audit.base.cfg.n_layers < 2:
        raise ProbeSkipped("steering needs at least two layers")
    e = _steer(audit, "erased", "forget_small")
    b = _steer(audit, "base", "forget_small")
    o = _steer(audit, "oracle", "forget_small") if audit.oracle is not None else None
    r = _steer(audit, "base", "reference_small")
    nul = _steer(audit, "erased", "reference_small")
    s = score_rows(e, b, groups=audit.groups("forget_small"), names=audit.concept_names,
                   oracle=o, reference=r, reference_groups=audit.groups("reference_small"),
                   null=nul)
    return ProbeResult.from_scored("steering", "latent", s,
                                   "oracle" if o is not None else "base model on unseen people",
                                   values={"c": STEER_C, "samples": STEER_SAMPLES,
                                           "anonymized_names": N_ANON,
                                           "layer": max(0, audit.base.cfg.n_layers - 2)})
