"""Surface evaluation: the numbers `kif eval` prints, for a fact-world split (`evaluate`) or for
any `Concept`, from files or elsewhere (`evaluate_concept`).

Accuracy is greedy (the answer's tokens are each the argmax, teacher-forced, which equals greedy
decoding of the answer). Model Utility and Forget Quality follow TOFU (Maini et al. 2024): MU is
the harmonic mean of answer probability, ROUGE-L recall and truth score on the retain people and on
the shared facts; FQ is the KS-test p-value between the truth ratios of the evaluated model and the
oracle on the forget facts.
"""

import dataclasses
import time
from typing import Sequence

import numpy as np
from transformer_lens import HookedTransformer

from kif import metrics
from kif.data.concept import Concept, nth_phrasing
from kif.data.probe import Probe
from kif.truth_ratios import (N_PERTURBED, truth_ratio_candidates,  # noqa: F401 (re-exported)
                              truth_ratios, truth_ratios_and_correct)

UTILITY_PEOPLE = 60
# Training phrasings scored for the retain people: a statement and a question. The forget people
# get all five; the retain set is nine times larger and is what makes `kif eval` slow.
RETAIN_TEMPLATES = (0, 2)
# Novel phrasings scored per retain person and neighbour (rotating, so every template is scored)
NOVEL_PER_PERSON = 2


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Surface metrics of one model on one forget split (fractions in [0, 1])."""

    model: str
    forget_split: str
    forget_acc: float
    forget_paraphrase_acc: float
    retain_acc: float
    retain_paraphrase_acc: float
    neighbour_acc: float
    shared_acc: float
    shared_paraphrase_acc: float
    # novel phrasings (`kif.world`): framings further from the training ones, never trained on
    forget_novel_acc: float
    retain_novel_acc: float
    neighbour_novel_acc: float
    shared_novel_acc: float
    unknown_acc: float  # people the world does not contain, answered " unknown"
    model_utility: float
    utility_components: dict[str, float]
    forget_truth_ratio_median: float
    forget_quality: float | None  # None without an oracle
    # The finer companion (`forget_truth_ratio_probes(..., fine=True)`): every training and
    # held-out phrasing of the forget facts (forget10: 960 truth ratios, not 120), its KS p-value
    # and KS distance against the oracle's on the same rows; None without an oracle
    forget_quality_fine: float | None
    forget_ks_fine: float | None
    oracle: str | None
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _acc(model, probes: Sequence[Probe], fwd_hooks) -> tuple[float, metrics.AnswerScores]:
    s = metrics.score_answers(model, [p.prompt for p in probes], [p.answer for p in probes],
                              fwd_hooks=fwd_hooks)
    return float(np.mean(np.asarray(s.correct, dtype=np.float64))), s


def _utility_part(model, source, probes: Sequence[Probe], fwd_hooks) -> dict[str, float]:
    """Probability, ROUGE-L recall and truth score on one probe set (TOFU's three MU terms)."""
    _, s = _acc(model, probes, fwd_hooks)
    # Where every answer token is the teacher-forced argmax, greedy decoding reproduces the whole
    # answer, so its ROUGE-L recall is exactly 1: only the other rows need generating.
    rouge = np.ones(len(probes))
    wrong = np.flatnonzero(~np.asarray(s.correct, dtype=bool))
    if wrong.size:
        todo = [probes[i] for i in wrong]
        answer_len = max(len(model.tokenizer(p.answer)["input_ids"]) for p in todo)
        gens = metrics.greedy_generate(model, [p.prompt for p in todo], answer_len + 1,
                                       fwd_hooks=fwd_hooks)
        rouge[wrong] = metrics.rouge_l_recall_many([g.split(".")[0] for g in gens],
                                                   [p.answer for p in todo])
    tr = truth_ratios(model, source, probes, fwd_hooks)
    return {"prob": float(np.mean(np.asarray(s.prob, dtype=np.float64))),
            "rouge_l": float(np.mean(rouge)),
            "truth": float(np.mean(metrics.truth_score(tr)))}


def utility(model: HookedTransformer, world, retain, fwd_hooks=()) -> tuple[float, dict[str, float]]:
    """TOFU's model utility and its components on the fact world: one held-out ("paraphrased")
    question per fact, over a fixed subset of the retain set (TOFU's retain_perturbed holds 400
    questions), here the first UTILITY_PEOPLE people of `retain` (360 facts), and the shared
    facts."""
    parts = {"retain": _utility_part(model, world,
                                     world.person_probes(retain[:UTILITY_PEOPLE], "heldout", [0]),
                                     fwd_hooks),
             "shared": _utility_part(model, world, world.shared_probes("heldout", [0]), fwd_hooks)}
    components = {f"{k}_{m}": v for k, d in parts.items() for m, v in d.items()}
    return float(metrics.model_utility(components)), components


def forget_truth_ratio_probes(world, forget, fine: bool = False) -> list[Probe]:
    """The forget facts' truth-ratio rows: TOFU's, one held-out phrasing per fact (forget10: 120,
    Forget Quality), or with `fine` every training and held-out phrasing (960: the companion that
    resolves differences a 120-row KS test cannot; its rows are correlated, eight per fact, so
    its p-value is read against the exact retrains', never as an absolute)."""
    if not fine:
        return world.person_probes(forget, "heldout", [0])
    return world.person_probes(forget, "train") + world.person_probes(forget, "heldout")


def evaluate(model: HookedTransformer, world=None,
             forget_split: str | Sequence[str] = "forget10",
             oracle: HookedTransformer | None = None, fwd_hooks=(),
             oracle_truth_ratios: np.ndarray | None = None,
             oracle_fine_truth_ratios: np.ndarray | None = None) -> EvalReport:
    """Every surface metric of `model` on `forget_split` (see `EvalReport`): a split name, or
    the names of the people erased (their neighbours and the retain people are scored as usual).

    `fwd_hooks` lets hook-based erasures be evaluated without touching weights. With `oracle` (or
    its precomputed `oracle_truth_ratios` and `oracle_fine_truth_ratios`, on
    `forget_truth_ratio_probes`), Forget Quality and its finer companion are measured against it.
    """
    from kif.world import FactWorld  # the fact world's split evaluation

    t0 = time.perf_counter()
    world = FactWorld.generate() if world is None else world
    if isinstance(forget_split, str):
        forget = world.split(forget_split)
    else:
        forget = [world.person(n) for n in forget_split]
        forget_split = ", ".join(forget_split)
    forget_names = {p.name for p in forget}
    retain = [p for p in world.split("retain") if p.name not in forget_names]
    neighbours = {q.name: q for p in forget for q in world.neighbours(p.name, retain)}

    forget_acc, _ = _acc(model, world.person_probes(forget, "train"), fwd_hooks)
    forget_para, _ = _acc(model, world.person_probes(forget, "heldout"), fwd_hooks)
    retain_acc, _ = _acc(model, world.person_probes(retain, "train", RETAIN_TEMPLATES), fwd_hooks)
    retain_para, _ = _acc(model, world.person_probes(retain, "heldout"), fwd_hooks)
    neigh_acc, _ = _acc(model, world.person_probes(list(neighbours.values()), "train",
                                                   RETAIN_TEMPLATES), fwd_hooks)
    shared_acc, _ = _acc(model, world.shared_probes("train"), fwd_hooks)
    shared_para, _ = _acc(model, world.shared_probes("heldout"), fwd_hooks)
    novel = {"forget": world.novel_probes(forget),
             "retain": world.novel_probes(retain, NOVEL_PER_PERSON),
             "neighbour": world.novel_probes(list(neighbours.values()), NOVEL_PER_PERSON),
             "shared": world.shared_probes("novel")}
    novel_acc = {k: _acc(model, ps, fwd_hooks)[0] for k, ps in novel.items()}
    unknown_acc, _ = _acc(model, world.person_probes(world.split("unknown"), "heldout", [0]),
                          fwd_hooks)

    mu, components = utility(model, world, retain, fwd_hooks)

    forget_tr_probes = forget_truth_ratio_probes(world, forget)
    tr = truth_ratios(model, world, forget_tr_probes, fwd_hooks)
    fq = fq_fine = ks_fine = None
    if oracle is not None and oracle_truth_ratios is None:
        oracle_truth_ratios = truth_ratios(oracle, world, forget_tr_probes)
    if oracle is not None and oracle_fine_truth_ratios is None:
        oracle_fine_truth_ratios = truth_ratios(oracle, world,
                                                forget_truth_ratio_probes(world, forget, True))
    if oracle_truth_ratios is not None:
        fq = float(metrics.forget_quality(tr, oracle_truth_ratios))
    if oracle_fine_truth_ratios is not None:
        tr_fine = truth_ratios(model, world, forget_truth_ratio_probes(world, forget, True),
                               fwd_hooks)
        fq_fine = metrics.forget_quality(tr_fine, oracle_fine_truth_ratios)
        ks_fine = metrics.ks_distance(tr_fine, oracle_fine_truth_ratios)
    return EvalReport(
        model=getattr(model, "kif_name", "model"), forget_split=forget_split,
        forget_acc=forget_acc, forget_paraphrase_acc=forget_para, retain_acc=retain_acc,
        retain_paraphrase_acc=retain_para, neighbour_acc=neigh_acc, shared_acc=shared_acc,
        shared_paraphrase_acc=shared_para, unknown_acc=unknown_acc,
        **{f"{k}_novel_acc": v for k, v in novel_acc.items()}, model_utility=float(mu),
        utility_components=components, forget_truth_ratio_median=float(np.median(tr)),
        forget_quality=fq, forget_quality_fine=fq_fine, forget_ks_fine=ks_fine, oracle=getattr(oracle, "kif_name", None) if oracle is not None else None,
        seconds=time.perf_counter() - t0)


def evaluate_concept(model: HookedTransformer, concept: Concept,
                     oracle: HookedTransformer | None = None, fwd_hooks=(),
                     oracle_truth_ratios: np.ndarray | None = None) -> dict:
    """`kif eval`'s keys for a `Concept` from any source, those its probes allow (a key whose
    probes the concept lacks is absent, never zero): accuracies of the forget, paraphrase,
    retain (training and held-out phrasings), neighbour and shared probes, and of the rows marked
    "novel" (the broader locality set: `*_novel_acc`, novel paraphrase rows for the forget facts);
    model utility on one
    held-out phrasing per retain fact (the first `UTILITY_PEOPLE` subjects) and per shared fact;
    the forget truth ratios on one held-out phrasing per forget fact and, with an oracle, Forget
    Quality against it."""
    t0 = time.perf_counter()
    paraphrase = [p for p in concept.paraphrase if p.phrasing != "novel"]
    sets = {"forget_acc": concept.forget, "forget_paraphrase_acc": paraphrase,
            "retain_acc": _phrased(concept.retain, "train"),
            "retain_paraphrase_acc": _phrased(concept.retain, "heldout"),
            "neighbour_acc": _phrased(concept.neighbour, "train"),
            "shared_acc": _phrased(concept.shared, "train"),
            "shared_paraphrase_acc": _phrased(concept.shared, "heldout"),
            "forget_novel_acc": _phrased(concept.paraphrase, "novel"),
            "retain_novel_acc": _phrased(concept.retain, "novel"),
            "neighbour_novel_acc": _phrased(concept.neighbour, "novel"),
            "shared_novel_acc": _phrased(concept.shared, "novel")}
    out: dict = {"model": getattr(model, "kif_name", "model"), "concept": concept.name}
    out |= {k: _acc(model, ps, fwd_hooks)[0] for k, ps in sets.items() if ps}
    subjects = list(dict.fromkeys(p.subject for p in sets["retain_paraphrase_acc"]))
    utility_sets = {
        "retain": nth_phrasing([p for p in sets["retain_paraphrase_acc"]
                                if p.subject in set(subjects[:UTILITY_PEOPLE])], 0),
        "shared": nth_phrasing(sets["shared_paraphrase_acc"], 0)}
    if all(utility_sets.values()):
        parts = {k: _utility_part(model, concept, ps, fwd_hooks) for k, ps in utility_sets.items()}
        out["utility_components"] = {f"{k}_{m}": v for k, d in parts.items() for m, v in d.items()}
        out["model_utility"] = float(metrics.model_utility(out["utility_components"]))
    tr_probes = concept.truth_ratio_probes
    tr = truth_ratios(model, concept, tr_probes, fwd_hooks)
    out["forget_truth_ratio_median"] = float(np.median(tr))
    if oracle is not None and oracle_truth_ratios is None:
        oracle_truth_ratios = truth_ratios(oracle, concept, tr_probes)
    if oracle_truth_ratios is not None:
        out["forget_quality"] = float(metrics.forget_quality(tr, oracle_truth_ratios))
        out["oracle"] = getattr(oracle, "kif_name", None)
    out["seconds"] = time.perf_counter() - t0
    return out


def per_subject(model: HookedTransformer, concept: Concept, fwd_hooks=()) -> dict[str, dict]:
    """Each subject's own forget and paraphrase accuracy (a batch of targets erased in one run,
    reported target by target), from one batched scoring."""
    rows = [("forget_acc", p) for p in concept.forget] + \
        [("forget_paraphrase_acc", p) for p in concept.paraphrase if p.phrasing != "novel"]
    _, s = _acc(model, [p for _, p in rows], fwd_hooks)
    out: dict[str, dict[str, list]] = {}
    for (key, p), ok in zip(rows, s.correct):
        out.setdefault(p.subject, {}).setdefault(key, []).append(bool(ok))
    return {n: {k: float(np.mean(v)) for k, v in d.items()} for n, d in out.items()}


def _phrased(probes: Sequence[Probe], phrasing: str) -> list[Probe]:
    return [p for p in probes if p.phrasing == phrasing]

