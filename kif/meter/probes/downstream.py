"""Downstream storage: UDS turned around. Where UDS patches the *erased* model's hidden states
into the base (has the representation lost the facts?), this patches the *base's* residual
stream after block l (every position of the forget prompt and answer) into the erased model and
asks whether the erased model's later blocks still decode the answers from it.

An erasure that blocks the concept where it is assembled (one early layer's edit: the person
no longer reaches the question positions) leaves every later memory intact: given the base's
representation, the erased model answers as the base does. That is also how the relearning
attack gets the facts back: fine-tuning the first blocks alone on half the facts restores the
representation, and the untouched later blocks read the other half from it. A model that never
knew the facts has no later memory to read: given the base's representation it decodes only what
the representation itself already carries.

x(s) = the erased model's forget accuracy with the base's residual at site s patched in, for the
embeddings' output and every block's output but the last (whose output is the answer itself);
the curves hold every site. The score is read at the site right after the erased model's first
edited weight (its embeddings, or block b's output for the first block b it changes): everything
behind the erasure's first edit, fed the state the base had there. ref0 = the oracle patched the
same way (an oracle that does not share the base's basis reads less of the base's state, so the
score then errs toward "still stored"), else the erased model on unseen people (the base's state
carries nothing about them: the chance level). An erasure that edits no weight (a hook) or only
the last block has nothing behind it to read, and is skipped; an erasure at the output is UDS's
case. A trace, not an attack: it needs the base's activations, which an attacker does not have.
"""

import re

import numpy as np
import torch

from kif.meter.audit import ProbeSkipped, run_pass
from kif.meter.calibrate import score_rows
from kif.meter.report import ProbeResult


def _hooks(model) -> list[str]:
    """The embeddings' output, then every block's output but the last."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post"
                                          for l in range(model.cfg.n_layers - 1)]


def first_edit_site(base, erased) -> str | None:
    """The residual right after `erased`'s first weight that differs from `base`'s (model
    order), or None when no weight before the last block differs."""
    theirs = dict(erased.named_parameters())
    last = base.cfg.n_layers - 1
    for name, p in base.named_parameters():
        q = theirs.get(name)
        if q is None or q.shape != p.shape or torch.equal(p, q):
            continue
        if name.startswith(("embed.", "pos_embed.")):
            return "blocks.0.hook_resid_pre"
        m = re.match(r"blocks\.(\d+)\.", name)
        if m and int(m.group(1)) < last:
            return f"blocks.{m.group(1)}.hook_resid_post"
    return None


def _patched(audit, role: str, which: str) -> np.ndarray:
    """[layer, row] correct answers of `role`'s model on probe set `which`, the base's residual
    after each block of `_hooks` patched in."""
    def compute():
        probes = list(audit.probe_set(which))
        names = _hooks(audit.base)
        store: dict = {}

        def capture(idx, tokens):
            def mk(h):
                def fn(act, hook):
                    for j, i in enumerate(idx):
                        store[(h, i)] = act[j].detach().clone()
                    return act
                return fn
            return [(h, mk(h)) for h in names]

        run_pass(audit.base, probes, resid=False, batch_hooks=capture)
        model = audit.model(role)
        out = np.zeros((len(names), len(probes)))
        for k, h in enumerate(names):
            def patch(idx, tokens, h=h):
                def fn(act, hook):
                    return torch.stack([store[(h, i)] for i in idx]).to(act.dtype)
                return [(h, fn)]
            out[k] = run_pass(model, probes, resid=False, batch_hooks=patch).scores.correct
            audit.bar.advance()
        return out

    return audit.per_model(role, ("downstream", audit.set_key(which), audit.key("base")), compute)


def run_downstream(audit) -> ProbeResult:
    audit.require_derived("the base's residual stream")
    site = first_edit_site(audit.base, audit.model("erased"))
    if site is None:
        raise ProbeSkipped("the erased model edits no weight before its last block: nothing "
                           "behind the erasure reads the base's state (UDS measures that case)")
    names = _hooks(audit.base)
    k = names.index(site)
    with_oracle = audit.oracle is not None
    audit.bar.total(len(names) * (2 + with_oracle))
    base_acc = audit.passes("base", "forget_small").scores.correct.astype(float)
    e = _patched(audit, "erased", "forget_small")
    o = _patched(audit, "oracle", "forget_small") if with_oracle else None
    null = _patched(audit, "erased", "reference_small")
    s = score_rows(e[k], base_acc, groups=audit.groups("forget_small"),
                   names=audit.concept_names, oracle=None if o is None else o[k],
                   reference=null[k], reference_groups=audit.groups("reference_small"))
    curves = {"erased": [float(x) for x in e.mean(1)],
              "unseen people": [float(x) for x in null.mean(1)]}
    if o is not None:
        curves["oracle"] = [float(x) for x in o.mean(1)]
    values = {**s.values(), "site": site,
              **{f"{h}/{c}": v[i] for c, v in curves.items() for i, h in enumerate(names)}}
    ref = "oracle, patched the same way" if o is not None else \
        "the erased model on unseen people, patched the same way"
    return ProbeResult("downstream", "trace", s.score, values=values, per_concept=s.per_concept,
                       curves=curves, chance=s.chance, reference=ref,
                       info={"hooks": names, "site": site})
