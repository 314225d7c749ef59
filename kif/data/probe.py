"""`Probe`: one prompt and the answer a model that knows the fact gives after it.

The unit every data source produces (the fact world, kif's JSONL, TOFU QA files, self-built
probes) and every part of the core reads (signatures, erasure operators, metrics, the meter).
"""

import dataclasses
from typing import Literal

# train: fitted on; heldout: scored, never fitted (the usual paraphrases); novel: scored, never
# fitted, framings further from the training ones (the broader locality set of `kif eval`)
Phrasing = Literal["train", "heldout", "novel"]
Kind = Literal["person", "shared", "text"]


@dataclasses.dataclass(frozen=True)
class Probe:
    """One prompt whose greedy continuation should be `answer` (leading space included).

    `subject` is the name or place the fact is about (it must occur in `prompt` for the methods
    that locate it); `relation` groups facts whose answers are interchangeable (truth-ratio
    distractors and probe classes are drawn within a relation); `distractors` are wrong answers
    of the same kind given by the source (TOFU's perturbed answers), used before the relation's.
    """

    prompt: str
    answer: str
    subject: str
    relation: str = ""
    phrasing: Phrasing = "train"
    template: int = 0  # index into the source's phrasings of the relation (0 where it has none)
    kind: Kind = "person"
    distractors: tuple[str, ...] = ()
