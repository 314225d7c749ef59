"""`Concept` and its parts, re-exported from `kif.data.concept` (where they live since concepts
come from several data sources)."""

from kif.data.concept import Concept, NeverKnew, Refusal

__all__ = ["Concept", "NeverKnew", "Refusal"]
