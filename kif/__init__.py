"""kif: representation-level erasure for transformer language models.

Find where a concept lives (signatures), remove it (suppression or a reversible weight edit), and
prove with a latent-trace meter whether it is deleted or only suppressed.

The public API is re-exported here lazily (PEP 562), so `import kif` stays fast: TransformerLens
alone takes seconds to import and the CLI's `--help` should not wait for it.
"""

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "load": ("kif.models", "load"),
    "save": ("kif.models", "save"),
    "to_hf": ("kif.models", "to_hf"),
    "weight_hash": ("kif.models", "weight_hash"),
    "FactWorld": ("kif.world", "FactWorld"),
    "Person": ("kif.world", "Person"),
    "Probe": ("kif.data.probe", "Probe"),
    "Concept": ("kif.data.concept", "Concept"),
    "load_concept": ("kif.data.formats", "load_concept"),
    "evaluate_concept": ("kif.evaluation", "evaluate_concept"),
    "evaluate": ("kif.evaluation", "evaluate"),
    "EvalReport": ("kif.evaluation", "EvalReport"),
    "score_answers": ("kif.metrics", "score_answers"),
    "greedy_generate": ("kif.metrics", "greedy_generate"),
    "KifError": ("kif.errors", "KifError"),
    "erase": ("kif.erasure", "erase"),
    "Erasure": ("kif.erasure", "Erasure"),
    "trace": ("kif.meter", "trace"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kif' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
