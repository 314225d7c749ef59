"""Membership inference (METHODS.md, "Membership inference"; MUSE, Shi et al. 2024): does the
model still treat the forget text as training data? Min-K%++ (Zhang et al. 2024, k = 20 %) on
`[BOS] + prompt + answer` of the forget facts (members) against the same phrasings about the
unseen reference people (non-members), summarised by the ROC AUC. A ``trace`` probe: it shows a
remnant, it does not recover the answer.

x = AUC of the erased model; x_base = the base's; ref0 = the oracle's AUC, or 0.5 without one
(for a model that never saw either set they are exchangeable). PrivLeak =
(AUC_erased - AUC_oracle) / AUC_oracle with an oracle (0 = like the oracle).
"""

import numpy as np

from kif import metrics
from kif.meter.calibrate import calibrate
from kif.meter.report import ProbeResult

K = 0.2


def _scores(audit, role: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    def compute():
        texts = [p.prompt + p.answer for p in audit.probe_set(which)]
        stats = metrics.token_logprob_stats(audit.model(role), texts)
        return np.array([metrics.mia_min_k_plus_plus(s.logprob, s.mu, s.sigma, K)
                         for s in stats]), audit.groups(which)

    return audit.per_model(role, ("mia", which, audit.set_key(which)), compute)


def run_membership(audit) -> ProbeResult:
    roles = ["erased", "base"] + (["oracle"] if audit.oracle is not None else [])
    aucs, per_auc = {}, {}
    nonmember = {r: _scores(audit, r, "reference_small")[0] for r in roles}
    for r in roles:
        s, groups = _scores(audit, r, "forget_small")
        aucs[r] = metrics.auc(s, nonmember[r])
        per_auc[r] = {c: metrics.auc(s[groups == c], nonmember[r])
                      for c in range(len(audit.concepts)) if (groups == c).any()}
    ref0 = aucs.get("oracle", 0.5)
    per = {}
    for c, name in enumerate(audit.concept_names):
        if c not in per_auc["erased"]:
            per[name] = None
            continue
        r0 = per_auc["oracle"][c] if "oracle" in per_auc else 0.5
        per[name] = calibrate(per_auc["erased"][c], per_auc["base"][c], r0)
    values = {"erased": aucs["erased"], "base": aucs["base"], "ref0": ref0,
              "auc_erased": aucs["erased"], "auc_base": aucs["base"], "k": K}
    if "oracle" in aucs:
        values["auc_oracle"] = aucs["oracle"]
        values["privleak"] = metrics.privleak(aucs["erased"], aucs["oracle"])
        values["privleak_base"] = metrics.privleak(aucs["base"], aucs["oracle"])
    return ProbeResult("membership", "trace", calibrate(aucs["erased"], aucs["base"], ref0),
                       values=values, per_concept=per,
                       reference="oracle" if "oracle" in aucs else "AUC 0.5 (never seen)",
                       info={"attack": "Min-K%++", "members": "forget facts (prompt + answer)",
                             "non_members": "the same phrasings about unseen people"})
