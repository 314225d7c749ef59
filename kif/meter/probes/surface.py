"""The surface probe: what the erased model answers (METHODS.md, "Surface metrics").

Score: calibrated greedy accuracy on the concepts' facts, training phrasings and held-out
phrasings together (``correct``: every answer token is the teacher-forced argmax, which equals
greedy decoding). Values also report the TOFU probability P = exp(-mean NLL) per phrasing kind,
and the collateral accuracy on neighbours (people sharing a name piece or an employer) and on
the shared facts about places, which every erasure must keep (reported, not scored).
"""

import numpy as np

from kif.meter.audit import score
from kif.meter.report import ProbeResult


def _acc(p) -> float:
    return float(np.mean(p.scores.correct)) if len(p.scores) else float("nan")


def run_surface(audit) -> ProbeResult:
    def correct(role: str, which: str) -> np.ndarray:
        return audit.passes(role, which).scores.correct.astype(np.float64)

    s, label = score(audit, correct, comparable=True, band=False)
    nf = audit.n_forget
    values = {}
    roles = ["erased", "base"] + (["oracle"] if audit.oracle is not None else [])
    for role in roles:
        sc = audit.passes(role, "facts").scores
        values[f"{role}/forget_acc"] = float(np.mean(sc.correct[:nf]))
        values[f"{role}/forget_prob"] = float(np.mean(sc.prob[:nf]))
        if len(sc) > nf:
            values[f"{role}/paraphrase_acc"] = float(np.mean(sc.correct[nf:]))
            values[f"{role}/paraphrase_prob"] = float(np.mean(sc.prob[nf:]))
    ref = audit.passes("base", "reference").scores
    values["reference/acc"] = float(np.mean(ref.correct))
    values["reference/prob"] = float(np.mean(ref.prob))
    for which in ("neighbour", "shared"):
        if audit.probe_set(which):
            for role in ("erased", "base"):
                values[f"{role}/{which}_acc"] = _acc(audit.passes(role, which, resid=False))
    return ProbeResult.from_scored("surface", "surface", s, label, values=values)
