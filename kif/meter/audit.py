"""The audit context every probe reads, the one batched forward the meter is built on, and
`trace`, the entry point (`kif.meter.trace`).

One forward per (model, probe set) gives the teacher-forced answer scores and the residual stream
at the last prompt position of every layer (`run_pass`); an `Audit` memoizes them, so the surface
probe, the lenses, the Patil attacks and the linear probes share three passes (base, erased, and
the reference). Every read goes through TransformerLens hooks added *after* the model's own
permanent hooks, so a hook-based erasure acts exactly as it does in `model(...)`; the caller's
models are never modified (probes that change weights work on a `copy.deepcopy`).

Residual index convention (every lens and reader of the meter): index 0 is the input of block 0
(`blocks.0.hook_resid_pre`, the embeddings), index l + 1 is `blocks.{l}.hook_resid_post`; index
n_layers is the final residual stream, the one the final norm and the unembedding read.
"""

import collections
import dataclasses
import hashlib
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from kif import metrics
from kif.concepts import Concept
from kif.errors import KifError
from kif.data.probe import Probe
from kif.meter.config import MeterConfig

logger = logging.getLogger(__name__)

ROLES = ("base", "erased", "oracle")
RETAIN_PEOPLE: int | None = None
"""Retain people whose states train the meter's readers (tuned lens, linear probes); None: all
of the world's retain people outside the concepts. Each (person, attribute) is asked in one
training phrasing, the phrasings cycling over people: for a linear probe, more people beat more
phrasings of the same people (fact world, final layer: 40 people x 2 phrasings 0.41, 180 people x
1 phrasing 0.76 accuracy on the forget people)."""
DERIVED_MAX = 0.25
"""Largest relative distance ||W_erased - W_base|| / ||W_base|| at which one weight tensor
counts as kept from the base."""
DERIVED_SHARE = 0.5
"""Smallest share of the base's parameters, counted in the tensors kept from the base
(`DERIVED_MAX`), at which the erased model counts as derived from the base (fine-tuned, edited,
hooked). Readers trained on the base (the tuned lens, base-trained linear probes, signatures,
SAEs) only apply to derived models; an independently trained model gets its own or is skipped.
Per tensor, not over the whole model: an edit moves a few tensors far (a closed-form edit of
one `W_out` moves it by more than its own norm) and a fine-tune moves every tensor a little,
while an independent training moves every tensor far. A whole-model distance mixes the two: a
large edit of one tensor reads like an independent training, and the base's readers would skip
exactly the erasure they should audit. `kif meter --json` reports the erased model's share
(`settings.kept_share`); the README has the measured shares."""
SMALL_TEMPLATES = (0, 2)
"""Training phrasings (a statement and a question) the expensive probes read."""
SUBSETS = {
    "forget": ("facts", lambda p: p.phrasing == "train"),
    "paraphrase": ("facts", lambda p: p.phrasing != "train"),
    "forget_small": ("facts", lambda p: p.phrasing == "train" and p.template in SMALL_TEMPLATES),
    "reference_forget": ("reference", lambda p: p.phrasing == "train"),
    "reference_small": ("reference",
                        lambda p: p.phrasing == "train" and p.template in SMALL_TEMPLATES),
}
"""Derived probe sets: name -> (parent set, row filter); their passes are slices of the parent's."""
MAX_NEIGHBOUR = 120
"""Neighbour probes the surface probe scores for collateral damage (reported, not scored)."""


class ProbeSkipped(KifError):
    """A probe does not apply to this audit (no oracle, no SAE for the model, ...)."""


def resid_hooks(model) -> list[str]:
    """Canonical hook names of the residual indices 0..n_layers."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post"
                                          for l in range(model.cfg.n_layers)]


# --------------------------------------------------------------------------------------------
# The forward pass
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pass:
    """What one forward of a model over `[BOS] + prompt + answer` rows gives the meter.

    `resid` is float32 on CPU: [layer, row, d_model] at the last prompt position (the position
    that predicts the answer's first token), or, from `run_pass(..., all_positions=True)`,
    [layer, token, d_model] over every real token after BOS, rows concatenated; then
    `last_index[i]` is where row i's last prompt position sits among them.
    """

    scores: metrics.AnswerScores
    resid: Float[Tensor, "layer n d_model"] | None
    first_token: Int[Tensor, " batch"]
    last_index: Int[Tensor, " batch"] | None = None

    def last_resid(self) -> Float[Tensor, "layer batch d_model"]:
        return self.resid if self.last_index is None else self.resid[:, self.last_index]


BatchHooks = Callable[[list[int], Tensor], list]
"""Hooks for one batch: fn(row indices, padded tokens) -> [(hook name, fn), ...]."""


def _unembed_hooked(model) -> bool:
    """Whether a permanent hook sits on the unembedding's output (then the meter must read the
    model's own logits instead of unembedding the final normalised stream itself)."""
    return any(name.startswith("unembed.") for name, _ in hook_state(model))


def _final_affine(model) -> Callable[[Tensor], Tensor]:
    """What the final norm does after its `hook_normalized` (weight and bias, if any)."""
    kind = model.cfg.normalization_type
    ln = getattr(model, "ln_final", None)
    w = getattr(ln, "w", None) if kind in ("LN", "RMS") else None
    b = getattr(ln, "b", None) if kind == "LN" else None

    def f(x: Tensor) -> Tensor:
        if w is not None:
            x = x * w.detach()
        if b is not None:
            x = x + b.detach()
        return x

    return f


def run_pass(model, probes: Sequence[Probe], *, resid: bool = True, batch_size: int = 256,
             prompts: Sequence[str] | None = None, batch_hooks: BatchHooks | None = None,
             all_positions: bool = False) -> Pass:
    """Teacher-forced scores of every probe's answer (as `kif.metrics.score_answers`) and, with
    `resid`, the residual stream of every layer, in one forward per batch.

    `prompts` overrides the probes' prompts (answers stay the probes'); `batch_hooks` adds
    per-batch hooks that know which rows they see (restoration, steering, patching). Rows are
    right-padded `[BOS] + prompt + answer` batches of similar length; causal attention makes every
    real position exact. Logits are computed only at the answer positions, from the final
    normalised stream as the model's own forward produces it (hooks included), unless a
    permanent hook sits on the unembedding's output: then the model's full logits are used.
    """
    texts = [p.prompt for p in probes] if prompts is None else list(prompts)
    p_ids = metrics.encode_prompts(model, texts)
    a_ids = metrics.encode_answers(model, [p.answer for p in probes])
    for i, a in enumerate(a_ids):
        if not a:
            raise KifError(f"answer {probes[i].answer!r} has no tokens")
    n = len(probes)
    seqs = [p + a for p, a in zip(p_ids, a_ids)]
    out = {"logprob": np.zeros(n), "correct": np.zeros(n, dtype=bool),
           "first_rank": np.zeros(n, dtype=np.int64), "first_prob": np.zeros(n),
           "extraction": np.zeros(n)}
    names = resid_hooks(model) if resid else []
    first = 1 if model.cfg.default_prepend_bos else 0
    last_index = None
    if all_positions:
        offsets = np.concatenate([[0], np.cumsum([len(s) - first for s in seqs])])
        width = int(offsets[-1])
        last_index = torch.tensor([offsets[i] + len(p_ids[i]) - 1 - first for i in range(n)])
    else:
        width = n
    res = torch.zeros(len(names), width, model.cfg.d_model) if resid else None
    full_logits = _unembed_hooked(model)
    final_name = ("ln_final.hook_normalized" if model.cfg.normalization_type is not None
                  else f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    w_u = model.W_U.detach()
    b_u = getattr(model, "b_U", None)
    affine = _final_affine(model) if model.cfg.normalization_type is not None else (lambda x: x)
    with torch.inference_mode():
        for idx in metrics._batches([len(s) for s in seqs], batch_size):
            tokens, lengths = metrics._padded(model, [seqs[i] for i in idx])
            dev = tokens.device
            rows = torch.arange(len(idx), device=dev)
            last = torch.tensor([len(p_ids[i]) - 1 for i in idx], device=dev)
            if all_positions:
                mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).to(dev)
                mask[:, :first] = False
                dest = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx])
            else:
                dest = torch.tensor(idx)
            grabs = []
            for j, name in enumerate(names):
                def grab(act, hook, j=j):
                    sel = act[mask] if all_positions else act[rows, last]
                    res[j, dest] = sel.detach().float().cpu()
                grabs.append((name, grab))
            n_ans = torch.tensor([len(a_ids[i]) for i in idx], device=dev)
            span = torch.arange(int(n_ans.max()), device=dev)
            pos = torch.where(span[None] < n_ans[:, None], last[:, None] + span[None], 0)
            kept = {}
            if not full_logits:
                def keep(act, hook):
                    kept["x"] = act[rows[:, None], pos]
                grabs.append((final_name, keep))
            extra = batch_hooks(list(idx), tokens) if batch_hooks is not None else []
            # Capture hooks come after the model's permanent hooks and after `extra`, so they read
            # what the (possibly edited) forward computes at that point.
            logits = model.run_with_hooks(tokens, fwd_hooks=list(extra) + grabs,
                                          return_type="logits" if full_logits else None,
                                          padding_side="right")
            if full_logits:
                plens = [len(p_ids[i]) for i in idx]
            else:
                logits = affine(kept["x"]).to(w_u.dtype) @ w_u
                if b_u is not None:
                    logits = logits + b_u.detach()
                plens = [1] * len(idx)
            st = metrics._answer_stats(logits, plens, [a_ids[i] for i in idx])
            for key, val in st.items():
                out[key][idx] = val
    n_tok = np.array([len(a) for a in a_ids], dtype=np.int64)
    mean_nll = -out["logprob"] / n_tok
    scores = metrics.AnswerScores(logprob=out["logprob"], n_tokens=n_tok, mean_nll=mean_nll,
                                  prob=np.exp(-mean_nll), correct=out["correct"],
                                  first_rank=out["first_rank"], first_prob=out["first_prob"],
                                  extraction=out["extraction"])
    return Pass(scores=scores, resid=res,
                first_token=torch.tensor([a[0] for a in a_ids], dtype=torch.long),
                last_index=last_index)


def captured(model, probes: Sequence[Probe], hooks: Sequence[str]
             ) -> dict[tuple[str, int], Tensor]:
    """(hook, row) -> `model`'s whole activation at `hook` on probe row `row` (padded positions
    included), from one `run_pass`. `run_pass` batches deterministically, so a later pass over
    the same probes sees the same batch shapes and `patched_passes` can put these back."""
    store: dict[tuple[str, int], Tensor] = {}

    def capture(idx, tokens):
        def mk(h):
            def fn(act, hook):
                for j, i in enumerate(idx):
                    store[(h, i)] = act[j].detach().clone()
                return act
            return fn
        return [(h, mk(h)) for h in hooks]

    run_pass(model, probes, resid=False, batch_hooks=capture)
    return store


def patched_passes(model, probes: Sequence[Probe], store: dict[tuple[str, int], Tensor],
                   hooks: Sequence[str]):
    """For each hook of `hooks` in turn: `model`'s `run_pass` (no residual) with `store`'s
    activations (`captured`, same probes) written over its own at that hook. A generator, so a
    caller can advance a progress bar between passes."""
    for h in hooks:
        def patch(idx, tokens, h=h):
            def fn(act, hook):
                return torch.stack([store[(h, i)] for i in idx]).to(act.dtype)
            return [(h, fn)]
        yield run_pass(model, probes, resid=False, batch_hooks=patch)


# --------------------------------------------------------------------------------------------
# The audit context
# --------------------------------------------------------------------------------------------


def model_name(model) -> str:
    return str(getattr(model, "kif_name", None) or getattr(model.cfg, "model_name", "model"))


def hook_state(model) -> tuple:
    """The permanent hooks of a model (hook point, function id): part of every memo key, since
    a hook-based erasure shares its weights (and weight hash) with the base."""
    out = []
    for name, hp in model.hook_dict.items():
        for h in getattr(hp, "fwd_hooks", []):
            if getattr(h, "is_permanent", False):
                out.append((name, id(h)))
    return tuple(out)


_SHARED: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_SHARED_SIZE = 64


def clear_caches() -> None:
    """Forget every cross-audit memo (passes, tuned lenses, probe statistics): the next audit
    runs from scratch (benchmarks)."""
    _SHARED.clear()
    try:
        from kif.meter.probes import lens

        lens._TUNED_CACHE.clear()
    except ImportError:
        pass


def model_key(model) -> str:
    """Weights and permanent hooks of a model, as a short string (memo keys, reports)."""
    from kif.models import weight_hash

    h = weight_hash(model)
    hooks = hook_state(model)
    if not hooks:
        return h
    return h + "+hooks:" + hashlib.sha256(repr(hooks).encode()).hexdigest()[:12]


def _group_index(probes: Sequence[Probe], subject_concept: dict[str, int]) -> np.ndarray:
    return np.array([subject_concept.get(p.subject, -1) for p in probes], dtype=np.int64)


@dataclasses.dataclass
class Audit:
    """Everything a probe reads: the models, the concepts and their probe sets, memoized passes.

    Probe sets (tuples of `kif.data.probe.Probe`):
      * ``facts``: the concepts' forget probes (training phrasings) then their paraphrases
        (`groups("facts")[i]` is the concept index of row i);
      * ``reference``: the same relations asked about people no model was trained on (the
        world's holdout people), the "never knew" level the base model is compared with when
        there is no oracle, and for readers trained on the base;
      * ``retain``: other people's probes, on which the readers (tuned lens, linear probes) are
        trained;
      * ``neighbour``, ``shared``: collateral probes the surface probe reports;
      * the derived sets of `SUBSETS` (``forget``, ``paraphrase``, ``forget_small``,
        ``reference_forget``, ``reference_small``), whose passes are slices of their parent's.
    """

    base: Any
    erased: Any
    oracle: Any | None
    concepts: tuple[Concept, ...]
    facts: tuple[Probe, ...]
    n_forget: int  # facts[:n_forget] are training phrasings, the rest paraphrases
    reference: tuple[Probe, ...]
    retain: tuple[Probe, ...]
    world: Any  # the fact world the concepts came from, or None (concepts from other sources)
    neighbour: tuple[Probe, ...] = ()
    shared: tuple[Probe, ...] = ()
    seed: int = 0
    config: MeterConfig = MeterConfig()  # the profile's meter settings (`kif.meter.config`)
    memo: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    bar: Any = None  # per-probe progress (`_Bar`), set by `trace`

    def __post_init__(self) -> None:
        self.subject_concept = {s: i for i, c in enumerate(self.concepts) for s in c.subjects}
        self.concept_names = [c.name for c in self.concepts]
        if self.bar is None:
            self.bar = _Bar()

    # ---- models ---------------------------------------------------------------------------

    def model(self, role: str):
        m = {"base": self.base, "erased": self.erased, "oracle": self.oracle}[role]
        if m is None:
            raise ProbeSkipped(f"no {role} model")
        return m

    def distance(self, role: str) -> float:
        """Relative weight distance ||W_role - W_base|| / ||W_base|| over the whole model (inf:
        other shapes)."""
        return self.distances(role)[0]

    def kept_share(self, role: str) -> float:
        """Share of the base's parameters in tensors that `role` keeps from the base (relative
        distance per tensor <= `DERIVED_MAX`; 0 for other shapes)."""
        return self.distances(role)[1]

    def distances(self, role: str) -> tuple[float, float]:
        """(whole-model relative distance, kept share) of `role` against the base."""
        def compute():
            if self.same(role, "base"):
                return 0.0, 1.0
            pb = dict(self.base.named_parameters())
            pe = dict(self.model(role).named_parameters())
            if pb.keys() != pe.keys() or any(pb[k].shape != pe[k].shape for k in pb):
                return float("inf"), 0.0
            num = den = kept = total = 0.0
            with torch.no_grad():
                for k, w in pb.items():
                    d2 = float((pe[k].double() - w.double()).pow(2).sum())
                    n2 = float(w.double().pow(2).sum())
                    num, den, total = num + d2, den + n2, total + w.numel()
                    if d2 <= DERIVED_MAX ** 2 * n2:
                        kept += w.numel()
            return (num / max(den, 1e-300)) ** 0.5, kept / max(total, 1.0)
        return self.cached(("distances", role), compute)

    def is_derived(self, role: str) -> bool:
        """Whether `role`'s model is derived from the base (`DERIVED_SHARE`)."""
        return getattr(self, role) is not None and self.kept_share(role) >= DERIVED_SHARE

    @property
    def derived(self) -> bool:
        """Whether the erased model is derived from the base (`DERIVED_SHARE`)."""
        return self.is_derived("erased")

    @property
    def oracle_derived(self) -> bool:
        """Whether the oracle shares the base's weights closely enough for readers trained on
        the base to read it (then they are calibrated against it too)."""
        return self.is_derived("oracle")

    def require_derived(self, what: str) -> None:
        if not self.derived:
            raise ProbeSkipped(f"{what} trained on the base do not apply: the erased model is not "
                               f"derived from the base (it keeps "
                               f"{self.kept_share('erased'):.1%} of the base's parameters within "
                               f"{DERIVED_MAX} relative distance per tensor, < {DERIVED_SHARE:.0%})")

    @property
    def calibration(self) -> str:
        return "oracle" if self.oracle is not None else "unseen"

    def same(self, a: str, b: str) -> bool:
        """Whether two roles hold the same model (same weights and permanent hooks)."""
        ma, mb = getattr(self, a), getattr(self, b)
        if ma is None or mb is None:
            return False
        if ma is mb:
            return True
        return self.key(a) == self.key(b)

    def key(self, role: str) -> str:
        m = self.model(role)
        k = self.memo.get(("key", id(m)))
        if k is None:
            k = model_key(m)
            self.memo[("key", id(m))] = k
        return k

    # ---- probe sets -----------------------------------------------------------------------

    def subset(self, which: str) -> tuple[str, list[int]] | None:
        """For a derived probe set: (parent set, row indices into it); None for a base set."""
        if which not in SUBSETS:
            return None
        parent, keep = SUBSETS[which]
        def compute():
            return [i for i, p in enumerate(self.probe_set(parent)) if keep(p)]
        return parent, self.cached(("subset", which), compute)

    def probe_set(self, which: str) -> tuple[Probe, ...]:
        sub = self.subset(which)
        if sub is not None:
            parent = self.probe_set(sub[0])
            return tuple(parent[i] for i in sub[1])
        return {"facts": self.facts, "reference": self.reference, "retain": self.retain,
                "neighbour": self.neighbour, "shared": self.shared}[which]

    def groups(self, which: str) -> np.ndarray:
        """Row -> concept index (fact sets) or reference person index (reference sets)."""
        if which.startswith("reference"):
            subj = list(dict.fromkeys(p.subject for p in self.reference))
            return np.array([subj.index(p.subject) for p in self.probe_set(which)], np.int64)
        return _group_index(self.probe_set(which), self.subject_concept)

    def set_key(self, which: str) -> str:
        return self.cached(("setkey", which), lambda: hashlib.sha256(repr(
            [(p.prompt, p.answer) for p in self.probe_set(which)]).encode()).hexdigest()[:16])

    def passes(self, role: str, which: str, *, resid: bool = True) -> Pass:
        """The memoized `run_pass` of model `role` over probe set `which` (a derived set is a
        slice of its parent's pass)."""
        sub = self.subset(which)
        if sub is not None:
            parent, idx = sub
            p = self.passes(role, parent)
            it = torch.tensor(idx, dtype=torch.long)
            return Pass(scores=p.scores.select(np.array(idx, dtype=np.int64)),
                        resid=p.resid[:, it], first_token=p.first_token[it])

        def compute():
            t0 = time.perf_counter()
            p = run_pass(self.model(role), self.probe_set(which), resid=True)
            self.timings[f"pass {role}/{which}"] = time.perf_counter() - t0
            return p

        return self.per_model(role, ("pass", self.set_key(which)), compute)

    def cached(self, key: tuple, fn: Callable[[], Any]) -> Any:
        """Memoize `fn()` under `key` for the duration of the audit."""
        if key not in self.memo:
            self.memo[key] = fn()
        return self.memo[key]

    def per_model(self, role: str, key: tuple, fn: Callable[[], Any]) -> Any:
        """Memoize `fn()` for `role`'s model: across audits (a small in-process cache keyed by
        the weight hash) when the model has no permanent hooks, else for this audit only."""
        k = (self.key(role),) + tuple(key)
        if "+hooks:" in k[0]:
            return self.cached(k, fn)
        if k in _SHARED:
            _SHARED.move_to_end(k)
            return _SHARED[k]
        value = fn()
        _SHARED[k] = value
        while len(_SHARED) > _SHARED_SIZE:
            _SHARED.popitem(last=False)
        return value

    # ---- helpers for probes ---------------------------------------------------------------

    def ref_role(self, comparable: bool) -> str:
        """Where ref0 comes from: the oracle on the same facts when there is one and the probe's
        measurement means the same thing on the oracle, else the base on unseen people."""
        return "oracle" if (self.oracle is not None and comparable) else "reference"


# --------------------------------------------------------------------------------------------
# Building an audit from what the user gave
# --------------------------------------------------------------------------------------------


def resolve_concepts(concepts, world) -> list[Concept]:
    """Concepts from a split name, a person name, a list of names (the fact world's) or
    `Concept`s (one concept per person: the meter's per-concept detail is per person)."""
    if isinstance(concepts, Concept):
        return [concepts]
    from kif.world import world_concept  # names and splits are the fact world's

    if isinstance(concepts, str):
        if concepts.startswith("forget") or concepts in ("retain", "holdout", "unknown"):
            people = world.split(concepts)
            return [world_concept(world, p.name) for p in people]
        return [world_concept(world, concepts)]
    out = []
    for c in concepts:
        out.append(c if isinstance(c, Concept) else world_concept(world, c))
    if not out:
        raise KifError("no concepts to audit")
    return out


def _never_knew_reference(cs: Sequence[Concept], facts: Sequence[Probe]) -> list[Probe]:
    """The concepts' questions about their never-knew names (made-up names no model saw): the
    oracle-free zero point, as the fact world's holdout people are for its own people."""
    return cs[0].never_knew.substitute(facts)


def _one_phrasing_per_fact(rows: Sequence[Probe]) -> list[Probe]:
    """The first `RETAIN_PEOPLE` subjects' facts, each in one training phrasing, rotating
    through the phrasings (as the world path picks (person + attribute) mod phrasings), so
    that readers trained on them see every phrasing and no fact twice."""
    by_subject: dict[str, dict[str, list[Probe]]] = {}
    for p in rows:
        by_subject.setdefault(p.subject, {}).setdefault(p.relation or p.answer, []).append(p)
    return [ps[(i + j) % len(ps)]
            for i, facts in enumerate(list(by_subject.values())[:RETAIN_PEOPLE])
            for j, ps in enumerate(facts.values())]


def _mirror(world, facts: Sequence[Probe], people) -> list[Probe]:
    """The same (relation, phrasing, template) questions as `facts`, asked about `people` (of
    the fact world)."""
    from kif.world import ATTRIBUTES
    keys = list(dict.fromkeys((p.relation, p.phrasing, p.template) for p in facts
                              if p.relation in ATTRIBUTES))
    out = []
    for person in people:
        for rel, phrasing, template in keys:
            out += world.person_probes([person], phrasing, [template], [rel])
    return out


def build_audit(base, erased, concepts, oracle=None, *, world=None,
                reference: Sequence[Probe] | None = None, retain: Sequence[Probe] | None = None,
                seed: int = 0, config: MeterConfig = MeterConfig()) -> Audit:
    given = [concepts] if isinstance(concepts, Concept) else concepts
    needs_world = isinstance(concepts, str) or not all(isinstance(c, Concept) for c in given)
    # Concepts that carry never-knew names (from files, any source) are audited without the
    # world: the reference is their own probes about those names
    never_knew = not needs_world and all(c.never_knew is not None for c in given)
    if world is None and (needs_world or (not never_knew and (reference is None
                                                             or retain is None))):
        from kif.world import FactWorld

        world = FactWorld.generate(0)
    cs = resolve_concepts(concepts, world)
    seen: set[Probe] = set()
    forget = [p for c in cs for p in c.forget if not (p in seen or seen.add(p))]
    para = [p for c in cs for p in c.paraphrase if not (p in seen or seen.add(p))]
    subjects = {s for c in cs for s in c.subjects}
    if reference is None and world is None:
        reference = _never_knew_reference(cs, forget + para)
    if reference is None:
        try:
            people = world.split("holdout")
        except KifError:
            people = []
        reference = _mirror(world, forget + para, people)
        if not reference:
            raise KifError("no reference probes: pass `reference=` (questions about people the "
                           "models never saw) for concepts outside the fact world")
    if retain is None:
        if world is not None and all(s in world.by_name for s in subjects):
            people = [p for p in world.split("retain") if p.name not in subjects][:RETAIN_PEOPLE]
            from kif.world import ATTRIBUTES

            n_t = len(ATTRIBUTES[next(iter(ATTRIBUTES))]["train"])
            retain = [pr for i, person in enumerate(people)
                      for j, attr in enumerate(ATTRIBUTES)
                      for pr in world.person_probes([person], "train", [(i + j) % n_t], [attr])]
        else:
            retain = _one_phrasing_per_fact([p for p in dict.fromkeys(
                p for c in cs for p in c.retain if p.subject not in subjects)
                if p.phrasing == "train"])
    neighbour = list(dict.fromkeys(p for c in cs for p in c.neighbour
                                   if p.subject not in subjects))[:MAX_NEIGHBOUR]
    shared = list(dict.fromkeys(p for c in cs for p in c.shared))
    return Audit(base=base, erased=erased, oracle=oracle, concepts=tuple(cs),
                 facts=tuple(forget + para), n_forget=len(forget), reference=tuple(reference),
                 retain=tuple(retain), world=world, neighbour=tuple(neighbour),
                 shared=tuple(shared), seed=seed, config=config)


# --------------------------------------------------------------------------------------------
# Scoring helper shared by the probes
# --------------------------------------------------------------------------------------------


def score(audit: Audit, fn: Callable[[str, str], np.ndarray], *, comparable: bool | str = True,
          layered: bool = False, band: bool = True, facts: str = "facts",
          reference: str = "reference", null: bool = True, **kw):
    """Calibrate a measurement `fn(role, probe set) -> rows` ([layer, row] when `layered`):
    erased and base on the facts; ref0 from the oracle on the facts (when `comparable` and there
    is an oracle) or the base on the reference people. The chance band (when `band`) comes from
    the *erased* model's rows on the reference people (when `null`; else the base's): people it
    never saw, measured like concepts, are its own null distribution, quirks included.
    Returns (Scored, a description of ref0)."""
    from kif.meter.calibrate import score_layers, score_rows

    e = fn("erased", facts)
    b = fn("base", facts)
    if comparable == "derived":  # a reader trained on the base: the oracle only if it shares
        comparable = audit.oracle_derived  # the base's weights closely
    use_oracle = audit.oracle is not None and comparable
    o = fn("oracle", facts) if use_oracle else None
    r = fn("base", reference) if (band or not use_oracle) else None
    nul = fn("erased", reference) if (band and null) else None
    scorer = score_layers if layered else score_rows
    s = scorer(e, b, groups=audit.groups(facts), names=audit.concept_names, oracle=o,
               reference=r, reference_groups=audit.groups(reference) if r is not None else None,
               null=nul, **kw)
    label = "oracle" if use_oracle else "base model on unseen people"
    return s, label


# --------------------------------------------------------------------------------------------
# trace
# --------------------------------------------------------------------------------------------


class _Bar:
    """Per-probe progress: probes call `audit.bar.total(n)` / `audit.bar.advance()`."""

    def __init__(self, progress=None, task=None):
        self.progress, self.task = progress, task

    def total(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, total=n, completed=0)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)


def trace(base, erased, concepts, oracle=None, probes=None, *, world=None,
          reference: Sequence[Probe] | None = None, retain: Sequence[Probe] | None = None,
          seed: int = 0, progress: bool = True, profile: str | None = None):
    """Measure whether `concepts` are intact, suppressed or deleted in `erased` (vs `base`).

    Args:
        base, erased, oracle: TransformerLens `HookedTransformer`s; a hook-based erasure is a
            model with permanent hooks. None of them is modified. With `oracle` (a model trained
            without the concepts), scores are calibrated against it; without, against the base
            model on people it never saw (`kif.meter.calibrate`).
        concepts: a split name ("forget10"), a person's name, a list of names, or
            `kif.concepts.Concept`s; the per-concept detail is one entry per concept (per person
            when given names or a split).
        probes: probe names or sets from `kif.meter.PROBES` / `PROBE_SETS` (default: all).
        world: the fact world the names refer to (default: seed 0, the zoo's).
        reference: probes about people no model saw (default: the world's holdout people, asked
            the concepts' questions); needed for concepts outside the fact world.
        retain: probes about other people, for training readers (default: 60 retain people).
        progress: show rich progress bars (one per probe) on stderr.
        profile: the settings profile (`kif.profiles`): `fact-world` keeps the meter's constants
            measured on the zoo's GPT-2, `auto` chooses the relearning attack's rate on `base`
            (`kif.meter.config`); default: `fact-world` on the zoo's GPT-2 models, else `auto`.

    Under torch.distributed (`torchrun ... -m kif meter`, `kif.distributed`), every rank builds
    the same audit and runs its share of the probes; the results are gathered on every rank,
    which returns the report a single process would give (timings aside). The probes are
    divided, not the concepts: the per-concept scores depend on the other concepts of the audit
    (the layers a per-layer probe reads are chosen on the pooled signal, the chance band is
    Bonferroni-corrected over every concept, the pooled scores and the verdict pool them).

    Returns:
        a `TraceReport` (`kif.meter.report`).
    """
    from kif import distributed
    from kif.meter.registry import PROBES, resolve
    from kif.meter.report import ProbeResult, TraceReport

    t0, c0 = time.perf_counter(), time.process_time()
    from kif import profiles

    names = resolve(probes)
    prof = profiles.get(profile or profiles.default_for(base))
    config = profiles.configure("meter", MeterConfig, prof, None)
    audit = build_audit(base, erased, concepts, oracle, world=world, reference=reference,
                        retain=retain, seed=seed, config=config)
    mine = distributed.deal(names, cost=lambda n: PROBES[n].cost)
    results: dict[str, ProbeResult] = {}
    prog = None
    if progress and distributed.is_main():
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        prog = Progress(TextColumn("[bold]{task.description:<24}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=False)
        prog.start()
    try:
        for name in mine:
            spec = PROBES[name]
            task = prog.add_task(name, total=1) if prog is not None else None
            audit.bar = _Bar(prog, task)
            t, c = time.perf_counter(), time.process_time()
            try:
                r = spec.load()(audit)
            except ProbeSkipped as exc:
                r = ProbeResult.skip(name, spec.group, str(exc))
            r = dataclasses.replace(r, seconds=time.perf_counter() - t)
            # CPU seconds: on a shared machine, what the probe costs on an idle core
            audit.timings[f"cpu {name}"] = time.process_time() - c
            results[name] = r
            logger.info("probe %s: score %s (%.1f s)%s", name, r.score, r.seconds,
                        f" skipped: {r.skipped}" if r.skipped else "")
            if prog is not None:
                prog.update(task, completed=prog.tasks[-1].total or 1,
                            description=f"{name} {'-' if r.score is None else f'{r.score:.2f}'}")
    finally:
        if prog is not None:
            prog.stop()
    models = {"base": model_name(base), "erased": model_name(erased),
              "oracle": model_name(oracle) if oracle is not None else None}
    hashes = {r: (audit.key(r) if getattr(audit, r) is not None else None) for r in ROLES}
    audit.timings["cpu total"] = time.process_time() - c0
    settings = {"probes": names, "seed": seed, "n_concepts": len(audit.concepts),
                "n_facts": len(audit.facts), "n_reference": len(audit.reference),
                "n_retain": len(audit.retain),
                # which readers applied: those trained on the base need a derived erased model
                "derived": audit.derived, "kept_share": audit.kept_share("erased"),
                "distance": audit.distance("erased"),
                # the meter's own constants, which no model-side measurement chooses yet
                "constants": _constants(base, prof, config)}
    timings = dict(audit.timings)
    if distributed.is_distributed():
        results, timings, ranks = _gather(names, results, timings)
        settings["ranks"] = ranks
    return TraceReport.build(results, audit.concept_names, calibration=audit.calibration,
                             models=models, hashes=hashes, seconds=time.perf_counter() - t0,
                             settings=settings, timings=timings)


def _constants(base, profile, config: MeterConfig) -> dict[str, Any]:
    """The profile, what it chose on the model, the meter's fact-world constants and whether
    `base` is the model they were tuned on (the manifest's record, as `kif.profiles.describe` is
    an erasure's)."""
    from kif import profiles

    chosen = sorted(k for k, v in dataclasses.asdict(config).items() if v is None)
    return {"profile": profile.name, "chosen_on_the_model": chosen,
            "tuned_on_this_model": profiles.default_for(base) == "fact-world",
            "fact_world_constants": profiles.meter_constants(skip=chosen)}


def _gather(names: Sequence[str], results: dict, timings: dict[str, float]
            ) -> tuple[dict, dict[str, float], list[list[str]]]:
    """Every rank's probe results (in run order), the timings merged (a pass timed on several
    ranks keeps the lowest rank's time; `cpu total` is the sum over the ranks: what the audit
    cost) and which probes each rank ran."""
    from kif import distributed

    from kif.meter.report import ProbeResult

    sent = {n: dataclasses.asdict(r) for n, r in results.items()}
    parts = distributed.all_gather_json([sent, timings])
    merged: dict = {}
    merged_t: dict[str, float] = {}
    for res, tim in parts:
        merged.update({n: ProbeResult.from_dict(r) for n, r in res.items()})
        for k, v in tim.items():
            merged_t.setdefault(k, v)
    merged_t["cpu total"] = sum(t["cpu total"] for _, t in parts)
    missing = [n for n in names if n not in merged]
    if missing:  # a rank that dealt the probes differently: a bug, never a partial report
        raise RuntimeError(f"probes {missing} ran on no rank")
    return ({n: merged[n] for n in names}, merged_t,
            [[n for n in names if n in res] for res, _ in parts])
