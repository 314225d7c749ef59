"""kif.data: the data a concept is made of, and the readers of the files it comes in.

`Probe` (one prompt and its answer), `Concept` with its parts (`kif.data.concept`), and readers of
kif's JSONL, TOFU / open-unlearning QA files and plain text corpora (`kif.data.formats`). Nothing
here imports the fact world, which is one data source among others (`kif.world`).
"""

from kif.data.concept import Concept, NeverKnew, Refusal
from kif.data.probe import Probe

__all__ = ["Concept", "NeverKnew", "Probe", "Refusal"]
