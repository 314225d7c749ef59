"""A `Concept` from self-built probes (`kif.data.elicit`), and the probes file a person reviews.

The concept's forget probes are the kept facts in the training frames, its paraphrases the same
facts in the held-out frames; neighbours (the user's, else names the model's continuations
brought up that have facts of their own) and the other such names are kept; the retain corpus
is their statements plus a general text corpus (kif's own, `GENERAL_CORPUS`, or the user's);
the refusal is the model's answer for made-up names (`elicit.refusal_of`); the never-knew
reference is the made-up names.

The file (`write_probes`) is kif JSONL: every row `kif.data.formats.read_kif_jsonl` reads, with an
`evidence` object on each fact's rows and the rejected candidates as rows with `"keep": false`,
so that a reviewer can flip a fact in or out; the made-up names go to a text file beside it
(`--never-knew`).
"""

import dataclasses
import json
import pathlib
from typing import Sequence

from kif.data.concept import Concept, NeverKnew, Refusal, text_row
from kif.data.elicit import (ElicitConfig, Elicited, Fact, default_answers, elicit, first_clause,
                             refusal_of)
from kif.data.elicit_bank import HELDOUT_FRAMES, TRAIN_FRAMES
from kif.data.formats import read_text_corpus
from kif.data.probe import Probe
from kif.errors import KifError

GENERAL_CORPUS = pathlib.Path(__file__).with_name("corpus") / "general.txt"
MIN_NEIGHBOUR_FACTS = 2  # a name the model states fewer facts about is not a subject it knows


@dataclasses.dataclass(frozen=True)
class SelfBuilt:
    """The elicitation of the targets and of the kept names, and the concept built from them."""

    targets: Elicited
    others: Elicited | None  # the neighbour and retain names
    neighbours: tuple[str, ...]
    retain_names: tuple[str, ...]
    concept: Concept


def _probes(facts: Sequence[Fact], frames: Sequence[str], phrasing: str) -> list[Probe]:
    return [Probe(prompt=p, answer=f.answer, subject=f.subject, relation=f.relation,
                  phrasing=phrasing, template=i % len(frames))
            for f in facts for i, p in enumerate(f.prompts(frames))]


def _require_known(el: Elicited) -> None:
    for s in el.subjects:
        if not el.kept(s):
            tried = sum(f.subject == s for f in el.facts)
            raise KifError(f"the model states no fact about {s!r} that holds across phrasings "
                           f"({tried} candidates, none kept): nothing to erase")


def _others(model, el: Elicited, neighbours: Sequence[str] | None, cfg: ElicitConfig):
    """(elicitation, neighbour names, retain names) of the other subjects. Neighbours: the
    user's, else the names the targets' continuations brought up (not an answer of their facts)
    that the model states facts about; retain: up to `cfg.retain_subjects` more such names, from
    those continuations and from the model's own sampled text (`discover_names`)."""
    from kif.data.elicit import discover_names

    # names that are answers (the target's, or the model's guesses for made-up names) are
    # things the subjects relate to ("Gunbris Systems"), not other subjects
    answers = {a.strip() for f in el.facts for a in (f.answer, *f.made_up_answers)}
    seen = [n for n in el.names_seen if n not in answers]
    near = list(dict.fromkeys(neighbours)) if neighbours else seen[: 2 * max(cfg.neighbours, 1)]
    taken = set(near) | set(el.subjects) | set(el.made_up) | answers
    far = [n for n in seen if n not in taken]
    want = 3 * cfg.retain_subjects // 2 - len(far)
    far += [n for n in discover_names(model, el.subjects[0], want, sorted(taken | set(far)), cfg)
            if n not in taken]
    names = near + far[: 3 * cfg.retain_subjects // 2]
    if not names:
        return None, (), ()
    others = elicit(model, names, dataclasses.replace(cfg, samples=0), made_up=el.made_up)
    # an answer of any subject (the employer of a neighbour) is not a subject itself
    answers |= {a.strip() for f in others.facts for a in (f.answer, *f.made_up_answers)}
    known = {n for n in others.subjects
             if len(others.kept(n)) >= MIN_NEIGHBOUR_FACTS and n not in answers}
    if neighbours:
        missing = [n for n in near if n not in known]
        if missing:
            raise KifError(f"neighbour {missing[0]!r}: the model states fewer than "
                           f"{MIN_NEIGHBOUR_FACTS} facts about it that hold across phrasings")
        kept_near = near
    else:
        kept_near = [n for n in near if n in known][: cfg.neighbours]
    kept_far = [n for n in others.subjects if n in known and n not in kept_near]
    return others, tuple(kept_near), tuple(kept_far[: cfg.retain_subjects])


def build(model, names: Sequence[str], *, neighbours: Sequence[str] | None = None,
          config: ElicitConfig | None = None, corpus: Sequence[str] | None = None,
          refusal: str | None = None) -> SelfBuilt:
    """The concept "these named subjects" from the model alone. `corpus`: retain texts (default
    kif's general corpus); `refusal`: the refusal target (default the model's answer for
    made-up names; none found and none given is an error only for the methods that need one)."""
    cfg = config or ElicitConfig()
    el = elicit(model, names, cfg)
    _require_known(el)
    others, near, far = _others(model, el, neighbours, cfg)
    kept_near = [f for f in (others.kept() if others else []) if f.subject in near]
    kept_far = [f for f in (others.kept() if others else []) if f.subject in far]
    texts = list(corpus) if corpus is not None else read_text_corpus(GENERAL_CORPUS)
    neighbour = _probes(kept_near, TRAIN_FRAMES, "train")
    retain = _probes(kept_far, TRAIN_FRAMES, "train")
    found = refusal_of(el)
    if refusal is not None:
        found = (refusal, found[1] if found and found[0] == refusal else [])
    concept = Concept(
        name=", ".join(el.subjects),
        distractors=_distractors(model, el, others),
        forget=tuple(_probes(el.kept(), TRAIN_FRAMES, "train")),
        paraphrase=tuple(_probes(el.kept(), HELDOUT_FRAMES, "heldout")),
        neighbour=tuple(neighbour), retain=tuple(retain),
        retain_corpus=tuple(neighbour + retain) + tuple(text_row(t) for t in texts),
        refusal=Refusal(found[0], tuple(found[1])) if found else None,
        never_knew=NeverKnew(el.made_up),
        source="self-built probes (kif.data.elicit)")
    return SelfBuilt(el, others, near, far, concept)


MIN_DISTRACTORS = 5  # the truth ratios' wrong answers per question (kif.truth_ratios)


def _distractors(model, el: Elicited, others: Elicited | None) -> dict[str, tuple[str, ...]]:
    """Per relation of a kept target fact, wrong answers of its kind for the truth ratios: the
    answers that the model gives, for any subject or made-up name, at any of the fact's cues or
    at a cue where another subject gave one of those answers; where that is at most
    MIN_DISTRACTORS, answers sampled at the fact's cues for made-up names; where still short,
    other kept answers (of another kind, which only makes the ratio easier to read as known).
    Never the model's default answer."""
    facts = list(el.facts) + list(others.facts if others else [])
    defaults = {d.strip() for d in default_answers(facts)}

    def usable(a: str) -> bool:
        return bool(a.strip()) and a.strip() not in defaults and a.strip() not in el.made_up

    at_cue: dict[str, set] = {}
    for f in facts:
        for c in f.cues:
            at_cue.setdefault(" ".join(c.split()), set()).update(
                a for a in (f.answer, *f.made_up_answers) if usable(a))
    out = {}
    for f in el.kept():
        pool = set().union(*(at_cue.get(" ".join(c.split()), set()) for c in f.cues))
        pool |= {a for cue, answers in at_cue.items() if answers & {f.answer}
                 for a in answers}
        out[f.relation] = pool
    short = [f for f in el.kept() if len(out[f.relation]) <= MIN_DISTRACTORS]
    if short:
        out = _sampled_distractors(model, el, short, out, usable)
    everything = {f.answer for f in el.kept()} | set().union(*at_cue.values())
    for f in el.kept():
        if len(out[f.relation]) <= MIN_DISTRACTORS:
            out[f.relation] |= set(sorted(everything - out[f.relation])[:MIN_DISTRACTORS + 1])
    return {r: tuple(sorted(a)) for r, a in out.items()}


def _sampled_distractors(model, el: Elicited, short: list[Fact], out: dict, usable) -> dict:
    """`out` with answers sampled (8 per made-up name) at the cues of the `short` facts."""
    from kif.metrics import greedy_generate

    rows = [(f.relation, m + c) for f in short for c in f.cues[:2] for m in el.made_up] * 8
    said = greedy_generate(model, [p for _, p in rows], el.config.max_answer_tokens + 1,
                           temperature=1.0, seed=el.config.seed)
    for (relation, _), text in zip(rows, said):
        a = first_clause(text)
        if usable(a):
            out[relation].add(a)
    return out


# ---- the probes file -------------------------------------------------------------------------

def _evidence(f: Fact) -> dict:
    return {"kept": f.kept, "reason": f.reason, "consistency": round(f.consistency, 4),
            "prob": round(f.prob, 4), "made_up_agree": round(f.made_up_agree, 4),
            "made_up_prob": round(f.made_up_prob, 4),
            "made_up_answers": list(f.made_up_answers), "openers": list(f.openers),
            "cues": list(f.cues)}


def records(sb: SelfBuilt) -> list[dict]:
    """Every row of the probes file (see the module docstring)."""
    from kif.data.formats import kif_record

    out = []
    everyone = list(sb.targets.facts) + list(sb.others.facts if sb.others else [])
    role = {**{s: "forget" for s in sb.targets.subjects},
            **{s: "neighbour" for s in sb.neighbours}, **{s: "retain" for s in sb.retain_names}}
    for f in everyone:
        split = role.get(f.subject)
        if split is None:
            continue  # a name with too few facts to keep
        rows = [(split, p) for p in _probes([f], TRAIN_FRAMES, "train")]
        if split == "forget":
            rows += [("paraphrase", p) for p in _probes([f], HELDOUT_FRAMES, "heldout")]
        for s, p in rows:
            out.append({**kif_record(p, s), "keep": f.kept, "evidence": _evidence(f)})
    r = sb.concept.refusal
    for prompt in (r.prompts if r else ()):
        who = next(m for m in sb.targets.made_up if m in prompt)
        out.append({**kif_record(Probe(prompt=prompt, answer=r.target, subject=who), "refusal"),
                    "evidence": {"reason": "the model's answer for a made-up name"}})
    return out


def write_probes(sb: SelfBuilt, path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The probes file and, beside it, the made-up names (`PATH.never-knew.txt`); each written
    whole or not at all."""
    from kif import integrity

    path = pathlib.Path(path)
    names = path.with_name(path.name + ".never-knew.txt")
    integrity.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in records(sb)))
    integrity.write_text(names, "".join(n + "\n" for n in sb.targets.made_up))
    return path, names


def summary(sb: SelfBuilt) -> dict:
    """Per target, the kept facts and the count rejected; the neighbours, the refusal."""
    per = {s: {"kept": [{"relation": f.relation, "answer": f.answer,
                         "consistency": f.consistency, "prob": round(f.prob, 4)}
                        for f in sb.targets.kept(s)],
               "rejected": sum(1 for f in sb.targets.facts if f.subject == s and not f.kept)}
           for s in sb.targets.subjects}
    r = sb.concept.refusal
    return {"targets": per, "neighbours": list(sb.neighbours), "retain": list(sb.retain_names),
            "refusal": r.target if r else None, "never_knew": list(sb.targets.made_up),
            "forget_probes": len(sb.concept.forget),
            "paraphrase_probes": len(sb.concept.paraphrase)}


__all__ = ["GENERAL_CORPUS", "SelfBuilt", "build", "records", "summary", "write_probes"]
