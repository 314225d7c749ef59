"""kif.meter: the latent-trace meter. Is a concept intact, suppressed or deleted?

`trace(base, erased, concepts, oracle=None, probes=None)` runs the probes of `PROBES` (surface,
lenses, Patil et al.'s attacks, linear probes, quantization, relearning, signature persistence,
restoration, steering, UDS, membership inference, in-context re-introduction, parametric traces)
and returns a `TraceReport`: a score in [0, 1] per probe (0 = as a model that never knew, 1 = as
the base), per-layer curves, per-concept verdicts, an overall verdict and the
`latent_trace_score`. `kif meter` is the same call from the command line.

Exports are lazy (PEP 562): importing kif.meter does not import TransformerLens.
"""

import importlib

_EXPORTS = {
    "trace": ("kif.meter.audit", "trace"),
    "Audit": ("kif.meter.audit", "Audit"),
    "ProbeSkipped": ("kif.meter.audit", "ProbeSkipped"),
    "TraceReport": ("kif.meter.report", "TraceReport"),
    "ProbeResult": ("kif.meter.report", "ProbeResult"),
    "ConceptVerdict": ("kif.meter.report", "ConceptVerdict"),
    "PROBES": ("kif.meter.registry", "PROBES"),
    "PROBE_SETS": ("kif.meter.registry", "PROBE_SETS"),
    "ProbeSpec": ("kif.meter.registry", "ProbeSpec"),
    "calibrate": ("kif.meter.calibrate", "calibrate"),
    "LeaceFitter": ("kif.meter.leace", "LeaceFitter"),
    "LeaceEraser": ("kif.meter.leace", "LeaceEraser"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kif.meter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
