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
embeddings' output and every block's output but the last (whose output is the answer itself); the
curves hold every site. The score is read at the site right after the erased model's first edit
(its embeddings, or block b's output for the first block b whose weights or hooks it changes):
everything behind the erasure's first edit, fed the state the base had there. ref0 = the oracle
patched the same way (an oracle that does not share the base's basis reads less of the base's
state, so the score then errs toward "still stored"), else the erased model on unseen people (the
base's state carries nothing about them: the chance level). A suppression hook counts as an edit of
its block (the patch overrides it where it sits on that block's output). An erasure that edits only
the last block has nothing behind it to read, and is skipped; an erasure at the output is UDS's
case. A trace, not an attack: it needs the base's activations, which an attacker does not have.
"""

import re

import numpy as np
import torch

from kif.meter.audit import ProbeSkipped, captured, patched_passes
from kif.meter.calibrate import score_rows
from kif.meter.report import ProbeResult


def _hooks(model) -> list[str]:
    """The embeddings' output, then every block's output but the last."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post"
                                          for l in range(model.cfg.n_layers - 1)]


# A half-precision round trip moves a weight by about 3e-4 of its norm: a weight that moved less
# than this was stored, not edited.
EDIT_RTOL = 1e-3


def _block_of(name: str) -> int | None:
    """The block a parameter or hook point belongs to: -1 for the embeddings, None after the
    blocks (final norm, unembedding). A hook on block b's input belongs to block b - 1's output."""
    if name.startswith(("embed.", "pos_embed.", "hook_embed", "hook_pos_embed")):
        return -1
    m = re.match(r"blocks\.(\d+)\.(hook_resid_pre)?", name)
    if m is None:
        return None
    return int(m.group(1)) - (1 if m.group(2) else 0)


def edited(base, erased) -> list[str]:
    """Names of `erased`'s weights that differ from `base`'s by more than `EDIT_RTOL` of their
    norm, and of its hook points that carry a permanent hook (a suppression patch)."""
    theirs = dict(erased.named_parameters())
    out = []
    for name, p in base.named_parameters():
        q = theirs.get(name)
        if q is None or q.shape != p.shape:
            continue
        p32, q32 = p.detach().float(), q.detach().float().to(p.device)
        if float((q32 - p32).norm()) > EDIT_RTOL * float(p32.norm()):
            out.append(name)
    out += [name for name, hp in erased.hook_dict.items() if hp.fwd_hooks]
    return out


def first_edit_site(base, erased) -> str | None:
    """The residual right after `erased`'s first edit (`edited`, model order), or None when it
    edits nothing before its last block."""
    blocks = [b for b in map(_block_of, edited(base, erased)) if b is not None]
    first = min(blocks, default=None)
    if first is None or first >= base.cfg.n_layers - 1:
        return None
    return "blocks.0.hook_resid_pre" if first < 0 else f"blocks.{first}.hook_resid_post"


def _patched(audit, role: str, which: str) -> np.ndarray:
    """[layer, row] correct answers of `role`'s model on probe set `which`, the base's residual
    after each block of `_hooks` patched in."""
    def compute():
        probes = list(audit.probe_set(which))
        names = _hooks(audit.base)
        store = captured(audit.base, probes, names)
        out = np.zeros((len(names), len(probes)))
        for k, p in enumerate(patched_passes(audit.model(role), probes, store, names)):
            out[k] = p.scores.correct
            audit.bar.advance()
        return out

    return audit.per_model(role, ("downstream", audit.set_key(which), audit.key("base")), compute)


def run_downstream(audit) -> ProbeResult:
    audit.require_derived("the base's residual stream")
    site = first_edit_site(audit.base, audit.model("erased"))
    if site is None:
        raise ProbeSkipped("the erased model edits no weight and carries no hook before its "
                           "last block: nothing behind the erasure reads the base's state (UDS "
                           "measures that case)")
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
