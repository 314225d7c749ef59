"""The method registry and `kif.erase`, the one entry point of every erasure operator.

A method is a function `(model, concept, config, *, progress, base_spec) -> Erasure` (it reads
the `Concept` only, never a data source) registered with its
frozen config dataclass; the CLI's `--method` choices come from `METHODS` (DESIGN.md convention 6).
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from kif import settings
from kif.errors import KifError, UnknownNameError

# the best measured on forget10 (README: erasure table): every surface target, Forget Quality 0.59
# (npo 0.39, stamp 1.7e-10) in 105 s; `stamp` is the one to pick when seconds matter (2-12 s)
DEFAULT_METHOD = "kif"


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    config: type
    kind: str  # "weights" or "hooks": what its Erasure carries
    summary: str


METHODS: dict[str, Method] = {}

# method name -> the module that registers it: the CLI lists choices without importing torch
METHOD_MODULES = {
    "kif": "kif.erasure.pipeline",
    "stamp": "kif.erasure.stamp",
    "suppress": "kif.erasure.suppress",
    "ga": "kif.erasure.baselines",
    "gradiff": "kif.erasure.baselines",
    "npo": "kif.erasure.baselines",
    "rmu": "kif.erasure.baselines",
    "sae-clamp": "kif.erasure.baselines",
    "neuron-ablate": "kif.erasure.baselines",
    "undo": "kif.erasure.distill",
}


def register(name: str, config: type, kind: str, summary: str):
    def deco(fn):
        METHODS[name] = Method(name, fn, config, kind, summary)
        return fn
    return deco


def _load_methods() -> None:
    # importing the modules registers them (kept out of import time of kif.erasure itself)
    import importlib

    for module in dict.fromkeys(METHOD_MODULES.values()):
        importlib.import_module(module)


def methods() -> dict[str, Method]:
    _load_methods()
    return METHODS


def make_config(method: str, config: Mapping[str, Any] | Any | None = None):
    """The method's config dataclass from a mapping (unknown keys are refused), or as given."""
    m = get(method)
    if config is None:
        return m.config()
    if isinstance(config, m.config):
        return config
    return m.config(**settings.checked(method, m.config, config))


def get(method: str) -> Method:
    if method in METHOD_MODULES and method not in METHODS:
        import importlib

        importlib.import_module(METHOD_MODULES[method])
    ms = METHODS if method in METHODS else methods()
    if method not in ms:
        raise UnknownNameError(f"unknown erasure method {method!r} (choose from "
                               f"{', '.join(sorted(ms))})")
    return ms[method]


def resolve_concepts(world, concepts):
    """Person names, `Concept`s or a split name ("forget10") -> one `Concept` of all the people
    (an erasure of several people is one joint edit). Unknown names and people the model was
    never taught are refused with a clear message."""
    from kif.concepts import Concept

    if isinstance(concepts, Concept):
        return concepts
    if isinstance(concepts, str):
        if concepts.startswith("forget"):
            names = [p.name for p in world.split(concepts)]
        else:
            names = [concepts]
    else:
        items = list(concepts)
        if items and all(isinstance(c, Concept) for c in items):
            if len(items) == 1:
                return items[0]
            if world is None:
                raise KifError("several Concepts are erased jointly only by name in the fact "
                               "world; give one Concept with all their probes")
            names = [s for c in items for s in c.subjects]
        else:
            names = [str(c) for c in items]
    if not names:
        raise KifError("no concept to erase")
    from kif.world import world_concept  # names are the fact world's

    return world_concept(world, names)


def erase(model, concepts, method: str = DEFAULT_METHOD, config=None, *, world=None,
          base_spec: str | None = None, progress: bool = False, profile: str | None = None):
    """Erase `concepts` (person names, a `Concept`, or a split like "forget10") from `model`.

    A `Concept` (from files, `kif.data.formats.load_concept`, or any source) carries every part
    the methods read; a part a method needs and the concept lacks is a one-line error. Names and
    splits are the fact world's (`world`, or the zoo's world, seed 0).

    `profile` names the settings profile (`kif.profiles`: `fact-world` or `auto`; None: the
    model's default, `fact-world` on the zoo's GPT-2 and `auto` elsewhere); `config`'s own
    settings win over it. The erasure's `info["profile"]` records which constants were chosen on
    the model and which are the fact world's.

    Returns an `Erasure` (a reversible weight delta or a hook patch); `model` itself is left as
    it was. Apply it with `erasure.apply(model)`, save it with `kif.erasure.save_erasure`.
    """
    from kif import profiles
    from kif.concepts import Concept

    m = get(method)
    prof = profiles.get(profile or profiles.default_for(model))
    cfg = profiles.configure(method, m.config, prof, config)
    given = [concepts] if isinstance(concepts, (str, Concept)) else list(concepts)
    if world is None and not all(isinstance(c, Concept) for c in given):
        from kif.world import FactWorld

        world = FactWorld.generate()  # person names and split names are the default world's
    concept = resolve_concepts(world, concepts)
    spec = base_spec or getattr(model, "kif_source", None) or getattr(model.cfg, "model_name", "")
    erasure = _measured(m.fn, model, concept, cfg, progress=progress, base_spec=str(spec))
    info = {**erasure.info, "profile": profiles.describe(prof, method, cfg)}
    return dataclasses.replace(erasure, info=info)


def _measured(fn: Callable, *args, **kwargs):
    """`fn`'s Erasure with the peak memory of the call in its info (`peak_rss_mb`, and
    `peak_cuda_mb` on a GPU; `memory`: the whole `kif.memory.MemoryReport`). Measured here,
    once for every method, so no method has to."""
    from kif.memory import PeakMemory

    with PeakMemory() as pm:
        erasure = fn(*args, **kwargs)
    mem = pm.report.as_dict()
    info = {**erasure.info, "peak_rss_mb": mem["peak_rss_mb"], "memory": mem}
    if "peak_cuda_mb" in mem:
        info["peak_cuda_mb"] = mem["peak_cuda_mb"]
    return dataclasses.replace(erasure, info=info)


__all__ = ["DEFAULT_METHOD", "METHODS", "METHOD_MODULES", "Method", "erase", "get", "make_config", "methods",
           "register", "resolve_concepts"]
