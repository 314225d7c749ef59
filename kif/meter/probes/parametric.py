"""Parametric traces (Hong et al. 2024, "Intrinsic Evaluation of Unlearning Using Parametric
Knowledge Traces", Sec. 4; METHODS.md "Concept vectors" and "Quantization attack").

* Concept vectors: per concept, the `N_VECTORS` MLP value vectors W_out[l, i] whose direct
  contribution to the answer logit is largest on the concept's forget prompts relative to other
  people's (`kif.signatures.concept_vectors.neuron_contributions`, on the base). Traces:
  cos(v_base, v_erased) and the Jaccard overlap of their top-200 vocabulary projections
  (`value_vector_cosine`, `top_token_jaccard`). Score: the mean cosine (clipped at 0; 1 = the
  concept vectors are untouched, 0 = orthogonal), Jaccard reported.
* |Delta W| against the quantization step: for every linear weight, the fraction of the changed
  weights whose change is below half the int8 / int4 quantization step (`kif.meter.probes.
  quantization`), i.e. that round-to-nearest quantization could map back onto the base's grid.

A ``trace`` probe, and only for an erased model derived from the base (an independently trained
model's value vectors do not correspond to the base's).
"""

import numpy as np
import torch

from kif.meter.probes.quantization import linear_weights, quantization_steps
from kif.meter.report import ProbeResult
from kif.signatures import concept_vectors as cv

N_VECTORS = 50
N_RETAIN = 240


def _vectors(audit) -> dict[int, torch.Tensor]:
    """Concept index -> [N_VECTORS, 2] (layer, neuron) of its concept vectors on the base."""
    def compute():
        forget = list(audit.probe_set("forget_small"))
        retain = list(audit.retain)[:N_RETAIN]
        c = cv.neuron_contributions(audit.base, forget + retain)          # [layer, n, d_mlp]
        nf = len(forget)
        r = c[:, nf:].mean(1)
        groups = torch.from_numpy(audit.groups("forget_small"))
        out = {}
        d_mlp = c.shape[-1]
        for k in range(len(audit.concepts)):
            m = groups == k
            if not m.any():
                continue
            s = (c[:, :nf][:, m].mean(1) - r).reshape(-1)
            top = torch.argsort(s, descending=True)[:N_VECTORS]
            out[k] = torch.stack([top // d_mlp, top % d_mlp], dim=1)
        return out

    return audit.per_model("base", ("cvecs", audit.set_key("forget_small"),
                                    audit.set_key("retain")), compute)


def run_parametric(audit) -> ProbeResult:
    audit.require_derived("parametric traces")
    vecs = _vectors(audit)
    L = audit.base.cfg.n_layers
    w_b = torch.stack([audit.base.blocks[l].mlp.W_out.detach() for l in range(L)]).float()
    w_e = torch.stack([audit.erased.blocks[l].mlp.W_out.detach() for l in range(L)]).float()
    per, cos_all, jac_all = {}, [], []
    for k, idx in vecs.items():
        vb, ve = w_b[idx[:, 0], idx[:, 1]], w_e[idx[:, 0], idx[:, 1]]
        cos = cv.value_vector_cosine(vb, ve)
        jac = cv.top_token_jaccard(vb, ve, audit.base)
        per[audit.concept_names[k]] = float(cos.clamp_min(0).mean())
        cos_all.append(float(cos.mean()))
        jac_all.append(float(jac.mean()))
    # |dW| against the quantization step, per tensor
    pb = linear_weights(audit.base)
    pe = dict(audit.erased.named_parameters())
    tensors = {}
    below = {"int8": [0, 0], "int4": [0, 0]}
    for name, wb in pb.items():
        dw = (pe[name].detach().float() - wb.detach().float()).abs()
        changed = dw > 0
        row = {"max_abs_dw": float(dw.max()), "mean_abs_dw": float(dw.mean()),
               "changed": float(changed.double().mean())}
        for scheme in below:
            step = quantization_steps(name, wb.detach().float(), scheme)
            small = (dw < step / 2) & changed
            row[f"below_half_{scheme}_step"] = float(small.sum()) / max(int(changed.sum()), 1)
            below[scheme][0] += int(small.sum())
            below[scheme][1] += int(changed.sum())
        tensors[name] = row
    values = {"erased": float(np.mean(cos_all)), "base": 1.0, "ref0": 0.0,
              "cosine": float(np.mean(cos_all)), "jaccard_top200": float(np.mean(jac_all)),
              **{f"changed_below_half_{s}_step": (b[0] / b[1] if b[1] else None)
                 for s, b in below.items()},
              "changed_fraction": float(sum(int((pe[n].detach() != w.detach()).sum())
                                            for n, w in pb.items()) /
                                        sum(w.numel() for w in pb.values()))}
    score = float(np.clip(np.mean([max(c, 0.0) for c in cos_all]), 0.0, 1.0))
    return ProbeResult("parametric", "trace", score, values=values, per_concept=per,
                       reference="cosine 0 (orthogonal concept vectors)",
                       info={"n_vectors": N_VECTORS, "tensors": tensors})
