"""In-context re-introduction: the person's *other* facts are written into the prompt (never the
asked one) and the question follows. A model that merely gates the person's facts away (a
refusal triggered by the name, a suppression conditioned on the context) can be reminded of them;
a model that never knew the asked fact cannot infer it (the fact world's attributes are
independent).

Context: for each other fact of the same person among the concept's forget probes, its first
training phrasing with the answer and a full stop. Asked: the first training phrasing of each
fact. x = accuracy; ref0 = the oracle with the same contexts, or
the base on unseen people with their own other facts in context.
"""


import numpy as np

from kif.meter.audit import ProbeSkipped, run_pass
from kif.meter.report import ProbeResult


def _with_context(probes) -> tuple[list, list[str]]:
    """The asked probes and their prompts with the subject's other facts in front."""
    statement: dict[tuple[str, str], str] = {}
    for p in probes:
        if p.phrasing == "train" and (p.subject, p.relation) not in statement:
            statement[(p.subject, p.relation)] = p.prompt + p.answer + "."
    asked, prompts = [], []
    seen = set()
    for p in probes:
        key = (p.subject, p.relation)
        if key in seen or p.phrasing != "train":
            continue
        seen.add(key)
        ctx = [s for (subj, rel), s in statement.items() if subj == p.subject and rel != p.relation]
        if not ctx:
            continue
        asked.append(p)
        prompts.append(" ".join(ctx) + " " + p.prompt)
    return asked, prompts


def run_in_context(audit) -> ProbeResult:
    def rows(role: str, which: str) -> np.ndarray:
        def compute():
            asked, prompts = _with_context(list(audit.probe_set(which)))
            if not asked:
                raise ProbeSkipped("no concept has two facts to put in context")
            return run_pass(audit.model(role), asked, prompts=prompts,
                            resid=False).scores.correct.astype(float)
        return audit.per_model(role, ("incontext", which, audit.set_key(which)), compute)

    asked, _ = _with_context(list(audit.probe_set("facts")))
    if not asked:
        raise ProbeSkipped("no concept has two facts to put in context")
    r_asked, _ = _with_context(list(audit.probe_set("reference")))
    subj = list(dict.fromkeys(p.subject for p in audit.reference))
    groups = np.array([audit.subject_concept.get(p.subject, -1) for p in asked])
    r_groups = np.array([subj.index(p.subject) for p in r_asked])
    from kif.meter.calibrate import score_rows

    o = rows("oracle", "facts") if audit.oracle is not None else None
    s = score_rows(rows("erased", "facts"), rows("base", "facts"), groups=groups,
                   names=audit.concept_names, oracle=o, reference=rows("base", "reference"),
                   reference_groups=r_groups, null=rows("erased", "reference"))
    return ProbeResult.from_scored("in-context", "latent", s,
                                   "oracle" if o is not None else "base model on unseen people",
                                   values={"n_asked": len(asked)})
