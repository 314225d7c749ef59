"""UDS, the unlearning depth score (METHODS.md, "UDS"): how deep in the network the erasure
reaches, measured against the oracle.

For a model M and a layer l, M's residual stream after block l (every position of the forget
prompt and answer) is patched into the base model, and the drop in the base's answer log-prob is
Delta_M(l) = mean NLL per answer token (patched) - (base). Over the layers where the oracle's
drop Delta_o(l) > 0.05,

    UDS = sum_l Delta_o(l) clip(Delta_u(l) / Delta_o(l), 0, 1) / sum_l Delta_o(l),

1 = as deep as the oracle. The latent score is 1 - UDS (0 = as the oracle, 1 = no depth at all:
the erased model's hidden states give the base back its answers at every layer). Per concept the
same on the concept's rows. Only with an oracle.
"""

import numpy as np

from kif.meter.audit import ProbeSkipped, captured, patched_passes, run_pass
from kif.meter.report import ProbeResult

MIN_DROP = 0.05


def _drops(audit, role: str) -> np.ndarray:
    """[layer, row] Delta_role(l) on the small forget subset."""
    def compute():
        probes = list(audit.probe_set("forget_small"))
        model = audit.model(role)
        base = audit.base
        L = base.cfg.n_layers
        names = [f"blocks.{l}.hook_resid_post" for l in range(L)]
        store = captured(model, probes, names)
        clean = run_pass(base, probes, resid=False).scores.mean_nll
        out = np.zeros((L, len(probes)))
        for l, p in enumerate(patched_passes(base, probes, store, names)):
            out[l] = p.scores.mean_nll - clean
            audit.bar.advance()
        return out

    return audit.per_model(role, ("uds", audit.set_key("forget_small"), audit.key("base")),
                           compute)


def uds(d_u: np.ndarray, d_o: np.ndarray, min_drop: float = MIN_DROP) -> float | None:
    """METHODS.md's UDS from per-layer drops of the unlearned model and the oracle."""
    keep = d_o > min_drop
    if not keep.any():
        return None
    w = d_o[keep]
    return float((w * np.clip(d_u[keep] / w, 0.0, 1.0)).sum() / w.sum())


def run_uds(audit) -> ProbeResult:
    if audit.oracle is None:
        raise ProbeSkipped("UDS is measured against an oracle (pass one)")
    audit.bar.total(2 * audit.base.cfg.n_layers)
    du = _drops(audit, "erased")
    do = _drops(audit, "oracle")
    groups = audit.groups("forget_small")
    score_all = uds(du.mean(1), do.mean(1))
    per = {}
    for c, name in enumerate(audit.concept_names):
        m = groups == c
        u = uds(du[:, m].mean(1), do[:, m].mean(1)) if m.any() else None
        per[name] = None if u is None else 1.0 - u
    return ProbeResult("uds", "latent", None if score_all is None else 1.0 - score_all,
                       values={"uds": score_all, "min_drop": MIN_DROP},
                       per_concept=per, reference="oracle",
                       curves={"drop/erased": du.mean(1).tolist(),
                               "drop/oracle": do.mean(1).tolist()},
                       info={"layers": "blocks.l.hook_resid_post, l = 0..n_layers-1"})
