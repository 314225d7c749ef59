"""Linear-probe recovery (METHODS.md, "Linear probe recovery"; Belrose et al. 2023; Patil et al.
2023 discuss the same white-box threat).

For each attribute (relation), a linear classifier over the attribute's answer values reads the
residual stream at the last prompt position, one per layer. kif's classifier is ridge least
squares onto the one-hot answer (closed form, one solve per layer and attribute, deterministic):
a linear probe in every sense the guarantee below needs, and with LEACE its weights are exactly
zero (`kif.meter.leace`).

* ``linear-probe``: trained on the *base* model's states of retain people, applied to the erased
  model's states on the concepts' facts (ref0: the base on unseen people, or an oracle whose
  weights are close enough to the base's for the probe to read it).
* ``linear-probe-retrained``: retrained on each model's own retain states and applied to the same
  model's facts (ref0: the oracle retrained on itself, or the base on unseen people). Its
  ``info["leace_check"]`` is the meter's self-check: at the layer where the base is most
  decodable, LEACE (fitted on the retain states' answer labels) is applied to the states, the
  probe retrained, and its accuracy compared with chance (the constant prediction).
"""

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from kif.meter.audit import ProbeSkipped, score
from kif.meter.leace import LeaceFitter
from kif.meter.probes.lens import retain_pass
from kif.meter.report import ProbeResult

RIDGE = 1.0
"""Ridge penalty per standardized feature, relative to the number of training rows."""


def fit_ridge(x: Float[Tensor, "layer n d"], y: Int[Tensor, " n"], n_classes: int,
              ridge: float = RIDGE):
    """Per-layer ridge classifier: standardize with the training statistics, solve
    (X^T X + lam n I) W = X^T Y_c for centred one-hot Y. Returns predict(x) -> [layer, m]."""
    x = x.double()
    mu = x.mean(1, keepdim=True)
    sd = x.std(1, keepdim=True).clamp_min(1e-6)
    z = (x - mu) / sd
    onehot = torch.nn.functional.one_hot(y, n_classes).double()
    prior = onehot.mean(0)
    yc = onehot - prior
    n, d = z.shape[1], z.shape[2]
    gram = z.transpose(1, 2) @ z + ridge * n * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(gram, z.transpose(1, 2) @ yc)            # [layer, d, C]

    def predict(xx: Float[Tensor, "layer m d"]) -> Int[Tensor, "layer m"]:
        logits = ((xx.double() - mu) / sd) @ w + prior
        return logits.argmax(-1)

    return predict


def _relations(audit):
    """relation -> sorted answer classes (from every probe set the probes read)."""
    out: dict[str, set] = {}
    for p in list(audit.retain) + list(audit.facts) + list(audit.reference):
        out.setdefault(p.relation, set()).add(p.answer)
    return {r: sorted(v) for r, v in out.items()}


def _retain_states(audit, role: str):
    p = retain_pass(audit, role)
    return p.last_resid()


def _probes_for(audit, role: str):
    """Per relation: a trained predict fn on `role`'s retain states (memoized)."""
    def compute():
        classes = _relations(audit)
        x = _retain_states(audit, role)
        out = {}
        for rel, cls in classes.items():
            rows = [i for i, p in enumerate(audit.retain) if p.relation == rel]
            if len(rows) < 4:
                continue
            ci = {c: j for j, c in enumerate(cls)}
            y = torch.tensor([ci[audit.retain[i].answer] for i in rows])
            out[rel] = (fit_ridge(x[:, rows], y, len(cls)), ci)
        return out

    return audit.per_model(role, ("linprobe", audit.set_key("retain"), audit.set_key("facts"),
                               audit.set_key("reference")), compute)


def _rows(audit, reader_role: str, role: str, which: str) -> np.ndarray:
    """[layer, row] correctness of `reader_role`'s probes on `role`'s states of probe set
    `which`; rows of relations without a probe are NaN-free zeros excluded by the caller."""
    def compute():
        probes = _probes_for(audit, reader_role)
        pset = audit.probe_set(which)
        x = audit.passes(role, which).resid
        out = np.zeros((x.shape[0], len(pset)))
        for rel, (predict, ci) in probes.items():
            rows = [i for i, p in enumerate(pset) if p.relation == rel and p.answer in ci]
            if not rows:
                continue
            y = torch.tensor([ci[pset[i].answer] for i in rows])
            out[:, rows] = (predict(x[:, rows]) == y).double().numpy()
        return out

    return audit.cached(("linrows", audit.key(reader_role), audit.key(role), which), compute)


def _check_relations(audit) -> None:
    rels = {p.relation for p in audit.retain}
    if not any(p.relation in rels for p in audit.facts):
        raise ProbeSkipped("no retain probes share a relation with the concepts' facts")


def run_base_probe(audit) -> ProbeResult:
    _check_relations(audit)
    audit.require_derived("linear probes")
    s, label = score(audit, lambda r, w: _rows(audit, "base", r, w), comparable="derived",
                     layered=True)
    return ProbeResult.from_scored("linear-probe", "latent", s, label,
                                   info={"classifier": "ridge least squares on one-hot answers",
                                         "trained_on": "base model, retain people",
                                         "n_train": len(audit.retain)})


def leace_check(audit, layer: int | None = None) -> dict:
    """Fit LEACE on the base's retain states at `layer` (default: the layer where the base-trained
    probe reads the facts best), erase the base's states there, retrain the probes on the erased
    retain states and measure their accuracy on the erased facts, against the constant
    prediction's (chance)."""
    classes = _relations(audit)
    xr = _retain_states(audit, "base")
    xf = audit.passes("base", "facts").resid
    if layer is None:
        acc = _rows(audit, "base", "base", "facts").mean(1)
        layer = int(np.argmax(acc))
    correct, chance, n = 0.0, 0.0, 0
    before = 0.0
    for rel, cls in classes.items():
        rows = [i for i, p in enumerate(audit.retain) if p.relation == rel]
        frows = [i for i, p in enumerate(audit.facts) if p.relation == rel and p.answer in cls]
        if len(rows) < 4 or not frows:
            continue
        ci = {c: j for j, c in enumerate(cls)}
        y = torch.tensor([ci[audit.retain[i].answer] for i in rows])
        yf = torch.tensor([ci[audit.facts[i].answer] for i in frows])
        eraser = LeaceFitter(xr.shape[-1], len(cls)).update(xr[layer, rows], y).eraser
        er, ef = eraser(xr[layer, rows]), eraser(xf[layer, frows])
        before += float((fit_ridge(xr[layer, rows][None], y, len(cls))(xf[layer, frows][None])[0]
                         == yf).sum())
        pred = fit_ridge(er[None], y, len(cls))(ef[None])[0]
        correct += float((pred == yf).sum())
        majority = int(torch.bincount(y, minlength=len(cls)).argmax())
        chance += float((yf == majority).sum())
        n += len(frows)
    if n == 0:
        return {}
    return {"layer": layer, "acc_before": before / n, "acc_after_leace": correct / n,
            "chance_acc": chance / n, "n": n}


def run_retrained_probe(audit) -> ProbeResult:
    _check_relations(audit)
    s, label = score(audit, lambda r, w: _rows(audit, r, r, w), comparable=True, layered=True)
    return ProbeResult.from_scored("linear-probe-retrained", "latent", s, label,
                                   info={"classifier": "ridge least squares on one-hot answers",
                                         "trained_on": "each model's own retain people",
                                         "leace_check": leace_check(audit)})
