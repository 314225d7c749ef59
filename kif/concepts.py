"""Concepts: what a user asks kif to find or erase, with the probe prompts that define it.

A concept is a name plus five probe sets (DESIGN.md, data flow): *forget* (its facts, training
phrasings), *paraphrase* (its facts, held-out phrasings), *neighbour* (similar people who must
survive), *shared* (public facts every erasure keeps) and *retain* (everyone else). Signature
extractors read the forget prompts and contrast them with retain/shared ones; erasure operators
and the meter read all five.
"""

import dataclasses
from typing import Iterable, Sequence

from kif.errors import KifError
from kif.world import FactWorld, Probe


@dataclasses.dataclass(frozen=True)
class Concept:
    """A named concept and its probes. Build one from the fact world with `Concept.from_world`."""

    name: str
    forget: tuple[Probe, ...]
    paraphrase: tuple[Probe, ...]
    neighbour: tuple[Probe, ...]
    shared: tuple[Probe, ...]
    retain: tuple[Probe, ...]

    def __post_init__(self) -> None:
        if not self.forget:
            raise KifError(f"concept {self.name!r} has no forget prompts")

    @staticmethod
    def from_world(world: FactWorld, names: str | Sequence[str], n_retain_people: int = 40,
                   exclude_from_retain: Iterable[str] = ()) -> "Concept":
        """The concept "these people": their facts are forgotten, everyone else's retained.

        `n_retain_people` bounds the retain probe set (taken from the fixed `retain` split, after
        removing the concept's own people and `exclude_from_retain`), to keep extraction fast.
        """
        names = [names] if isinstance(names, str) else list(names)
        people = [world.person(n) for n in names]
        for p in people:
            if p.group != "known":
                raise KifError(f"the model was never taught facts about {p.name!r} "
                               f"({p.group.replace('_', ' ')}): nothing to erase")
        own = {p.name for p in people} | set(exclude_from_retain)
        retain_people = [p for p in world.split("retain") if p.name not in own]
        neighbours = {q.name: q for p in people for q in world.neighbours(p.name, retain_people)}
        return Concept(
            name=", ".join(p.name for p in people),
            forget=tuple(world.person_probes(people, "train")),
            paraphrase=tuple(world.person_probes(people, "heldout")),
            neighbour=tuple(world.person_probes(list(neighbours.values()), "train", [0])),
            shared=tuple(world.shared_probes("train", [0])),
            retain=tuple(world.person_probes(retain_people[:n_retain_people], "train", [0])),
        )

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.subject for p in self.forget))
