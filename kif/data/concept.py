"""Concepts: what a user asks kif to find or erase, as data (DESIGN.md, "Where a concept comes
from").

A concept is a name plus its probe sets: *forget* (its facts, the phrasings to erase),
*paraphrase* (its facts, held-out phrasings), *neighbour* (similar subjects that must survive),
*shared* (general facts every erasure keeps) and *retain* (everything else that must survive);
and the parts that methods need beyond probes: a *retain corpus* (texts for key statistics and
KL), a *refusal* (what the model should say instead, and prompts where it already says it),
answer *distractors* for truth ratios, and the *never-knew* rule (made-up names that replace the
subject: the oracle-free reference). Data sources build concepts: the fact world
(`kif.world.world_concept`), files (`kif.data.formats`), self-built probes. The core reads only
this type; a part a method needs and the concept lacks is a one-line error naming what to pass
(`Concept.require`), never a default.
"""

import dataclasses
from typing import Mapping

from kif.data.probe import Probe
from kif.errors import KifError


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What an erased model should answer: `target` (a continuation such as " unknown" or
    " I don't know"), and `prompts` on which the model already gives it (their states define the
    refusal value and direction that STAMP, the capsule and the KIF pipeline steer towards)."""

    target: str
    prompts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class NeverKnew:
    """The oracle-free reference: the concept's probes with each subject replaced by made-up
    `names` of the same shape, which the model never saw."""

    names: tuple[str, ...]

    def substitute(self, probes, i: int = 0) -> list[Probe]:
        """`probes` with subject k replaced by `names[(i + k) % len(names)]`."""
        subjects = list(dict.fromkeys(p.subject for p in probes))
        swap = {s: self.names[(i + k) % len(self.names)] for k, s in enumerate(subjects)}
        return [dataclasses.replace(p, prompt=p.prompt.replace(p.subject, swap[p.subject]),
                                    subject=swap[p.subject]) for p in probes]


def text_row(text: str) -> Probe:
    """A plain text of a corpus as a retain-corpus row (no answer, no subject)."""
    return Probe(prompt=text, answer="", subject="", kind="text")


# part -> what to pass when it is missing (the CLI's and the Python API's words)
_HOW_TO_PASS = {
    "retain": "retain probes (--retain FILE, or Concept(retain=...))",
    "retain_corpus": "a retain corpus (--retain FILE / --retain-corpus FILE, or "
                     "Concept(retain_corpus=...))",
    "refusal": "a refusal target (--refusal ' unknown', or Concept(refusal=Refusal(...)))",
    "refusal_prompts": "prompts the model already refuses (--refusal-prompts FILE, or "
                       "Refusal(prompts=...))",
    "never_knew": "made-up names for the never-knew reference (--never-knew-names N1 N2 ..., or "
                  "Concept(never_knew=NeverKnew(...)))",
    "subjects": "a subject per forget probe that occurs in its prompt (the JSONL 'subject' field)",
}


@dataclasses.dataclass(frozen=True)
class Concept:
    """A named concept, its probes and the parts methods need. See the module docstring."""

    name: str
    forget: tuple[Probe, ...]
    paraphrase: tuple[Probe, ...] = ()
    neighbour: tuple[Probe, ...] = ()
    shared: tuple[Probe, ...] = ()
    retain: tuple[Probe, ...] = ()
    # rows for key statistics and KL: probes, or texts as probes with an empty answer (`text_row`)
    retain_corpus: tuple[Probe, ...] = ()
    refusal: Refusal | None = None
    distractors: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict, hash=False)
    never_knew: NeverKnew | None = None
    source: str = ""  # where the concept came from, for manifests ("fact-world seed 0", a path)

    def __post_init__(self) -> None:
        if not self.forget:
            raise KifError(f"concept {self.name!r} has no forget prompts")

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.subject for p in self.forget))

    @property
    def truth_ratio_probes(self) -> list[Probe]:
        """One phrasing per forget fact for truth ratios and Forget Quality: the first held-out
        paraphrase (novel rows are a locality test, not TOFU's paraphrase), else the first
        forget phrasing."""
        held = [p for p in self.paraphrase if p.phrasing != "novel"]
        return nth_phrasing(held or self.forget, 0)

    def require(self, *parts: str, method: str) -> None:
        """Raise a one-line `KifError` naming the first of `parts` this concept lacks."""
        for part in parts:
            if part == "refusal_prompts":
                missing = self.refusal is None or not self.refusal.prompts
            elif part == "subjects":
                missing = any(not p.subject or p.subject not in p.prompt for p in self.forget)
            else:
                missing = not getattr(self, part)
            if missing:
                raise KifError(f"{method} needs {_HOW_TO_PASS[part]}; concept {self.name!r} "
                               f"has none")

    def answer_choices(self, relation: str) -> tuple[str, ...]:
        """Every answer the concept's data gives for `relation` (truth-ratio distractors and
        probe classes): the source's distractors, else the answers of its probes."""
        if relation in self.distractors:
            return tuple(self.distractors[relation])
        probes = self.forget + self.paraphrase + self.neighbour + self.retain + self.shared
        return tuple(sorted({p.answer for p in probes if p.relation == relation}))


# ---- selections from a retain corpus that the methods share ----------------------------------

def corpus_subjects(concept: Concept) -> dict[str, list[Probe]]:
    """The retain corpus's fact rows (kind "person") by subject, in corpus order."""
    out: dict[str, list[Probe]] = {}
    for p in concept.retain_corpus:
        if p.kind == "person":
            out.setdefault(p.subject, []).append(p)
    return out


def corpus_shared(concept: Concept) -> list[Probe]:
    """The retain corpus's shared-fact rows (kind "shared")."""
    return [p for p in concept.retain_corpus if p.kind == "shared"]


def nth_phrasing(rows, i: int) -> list[Probe]:
    """For each fact of `rows`, in order, its i-th phrasing (its last where it has fewer): one
    phrasing per fact, as a calibration or a check needs. A fact is (subject, relation); where
    the source names no relation (TOFU's QA rows), (subject, answer)."""
    facts: dict[tuple[str, str], list[Probe]] = {}
    for p in rows:
        facts.setdefault((p.subject, p.relation or "answer:" + p.answer), []).append(p)
    return [ps[min(i, len(ps) - 1)] for ps in facts.values()]


def by_subject(concept: Concept) -> list[Concept]:
    """One Concept per subject of `concept`: its own forget and paraphrase probes, the rest
    (retain, neighbours, corpus, refusal, ...) shared, so the other subjects stay out of each
    one's retain text (they are being erased too)."""
    return [dataclasses.replace(concept, name=s,
                                forget=tuple(p for p in concept.forget if p.subject == s),
                                paraphrase=tuple(p for p in concept.paraphrase if p.subject == s))
            for s in concept.subjects]

