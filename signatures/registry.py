"""The registry of signature kinds: where a concept lives in a model.

Four kinds, each a module that registers its extractor (`kif.signatures.base.register`):
causal tracing (Meng et al. 2022), knowledge neurons (Dai et al. 2022), concept vectors
(Hong et al. 2024; the KIF activation signature), SAE features (Farrell et al. 2024, SAELens).
`extract(model, concept, kind=...)` returns a `Signature` (`kif.signatures.base`). Kind modules
are imported on first use so that `import kif` stays light. `kif.signatures` is a namespace
package without an `__init__.py` (the README's development section says why).
"""

import importlib

from kif.errors import UnknownNameError
from kif.signatures.base import (KINDS, Signature, SignatureError, SignatureMismatchError,
                                 register)

# The registry of kinds: CLI choices come from here. kind -> module that registers it.
KIND_MODULES = {
    "causal-trace": "kif.signatures.causal_trace",
    "knowledge-neurons": "kif.signatures.knowledge_neurons",
    "concept-vectors": "kif.signatures.concept_vectors",
    "sae-features": "kif.signatures.sae_features",
}


def extractor(kind: str):
    if kind not in KIND_MODULES:
        raise UnknownNameError(f"unknown signature kind {kind!r} "
                               f"(choose from {', '.join(KIND_MODULES)})")
    importlib.import_module(KIND_MODULES[kind])
    return KINDS[kind]


def extract(model, concept, kind: str, **settings) -> Signature:
    """The signature of `concept` (a `kif.concepts.Concept`) in `model`, of the given kind."""
    return extractor(kind)(model, concept, **settings)


__all__ = ["KIND_MODULES", "KINDS", "Signature", "SignatureError", "SignatureMismatchError",
           "extract", "extractor", "register"]
