"""Erasure benchmarks.

`kif bench methods`: every erasure method on a forget split against the oracle, with its time and
the ratio to STAMP's, in one run.

`kif bench scoring`: truth-ratio scoring with each question run once (its KV cache shared by its
six candidate answers, `metrics.score_candidates`) against the six full rows
(`metrics.score_answers`), on the same questions, alternating, in one run.

`kif bench stamp`: STAMP-LR (randomized SVD + Woodbury) against the full ridge solve on
synthetic keys, at MLP widths of real models (m = 4096: GPT-2 XL / Llama-7B hidden 4096-wide
projections; m = 14336: Llama-3-8B's MLP).

Keys are drawn with a decaying spectrum (eigenvalue i ~ i^-alpha), as MLP activations are: the
relative error of the low-rank edit is ||dW_lr - dW_full|| / ||dW_full||, and both solves are
timed in the same run (ratios, not absolute times, carry between machines).
"""

import dataclasses
import functools
import time
from typing import Any, Callable

import torch

from kif.erasure.stamp import solve_lowrank, solve_ridge


@dataclasses.dataclass(frozen=True)
class StampBenchRow:
    m: int
    rank: int
    n_forget: int
    full_seconds: float
    lowrank_seconds: float
    speedup: float
    rel_error: float  # ||dW_lr - dW|| / ||dW||
    edit_error: float  # ||K_f (dW_lr - dW)|| / ||K_f dW||: what the edit does to the forget keys
    lam: float
    dtype: str


def synthetic_keys(m: int, n: int, alpha: float, generator: torch.Generator,
                   dtype=torch.float32) -> torch.Tensor:
    """n keys of width m with covariance spectrum i^-alpha in a random basis."""
    scale = torch.arange(1, m + 1, dtype=dtype) ** (-alpha / 2)
    z = torch.randn(n, m, generator=generator, dtype=dtype) * scale
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=dtype))
    return z @ q.T


def bench_stamp(m: int, rank: int = 64, n_forget: int = 200, n_retain: int = 4096,
                d_out: int = 256, lam: float | None = None, alpha: float = 2.0, seed: int = 0,
                dtype=torch.float32) -> StampBenchRow:
    """lam None: the ridge at the rank's scale, the rank-th eigenvalue of C (from the sketch);
    a rank-r solve cannot resolve directions below it, and a ridge far below it is a different
    regularizer (the full solve then fits what rank r drops, and the edits differ)."""
    g = torch.Generator().manual_seed(seed)
    k_f = synthetic_keys(m, n_forget, alpha, g, dtype)
    k_r = synthetic_keys(m, n_retain, alpha, g, dtype)
    t = torch.randn(n_forget, d_out, generator=g, dtype=dtype)
    c = k_f.T @ k_f + k_r.T @ k_r
    rhs = k_f.T @ t
    if lam is None:
        lam = float(torch.svd_lowrank(c, q=rank, niter=4)[1][-1])
    t0 = time.perf_counter()
    full = solve_ridge(c, rhs, lam)
    t1 = time.perf_counter()
    low = solve_lowrank(c, rhs, lam, rank)
    t2 = time.perf_counter()
    err = float((low - full).norm() / full.norm())
    edit = float((k_f @ (low - full)).norm() / (k_f @ full).norm())
    return StampBenchRow(m, rank, n_forget, t1 - t0, t2 - t1, (t1 - t0) / max(t2 - t1, 1e-9),
                         err, edit, lam, str(dtype).replace("torch.", ""))


METRICS = ("forget_acc", "forget_paraphrase_acc", "retain_acc", "retain_paraphrase_acc",
           "neighbour_acc", "shared_acc", "shared_paraphrase_acc", "model_utility", "forget_quality", "forget_truth_ratio_median",
           "forget_quality_fine", "forget_ks_fine",
           # the broader locality set (`kif.world`'s novel phrasings)
           "forget_novel_acc", "retain_novel_acc", "neighbour_novel_acc", "shared_novel_acc")


def bench_methods(model, oracle, methods: list[str], concept, scores: Callable[[Any], dict],
                  configs: dict | None = None, progress: bool = False,
                  profile: str | None = None, retrained=()) -> list[dict]:
    """Every method in `methods` on `concept`, in one run (so ratios are comparable): its surface
    metrics (`scores(model)`: `kif eval`'s keys against `oracle`; `world_scorer` for a fact-world
    split, `concept_scorer` for a concept from files), its compute seconds and the ratio to
    STAMP's.

    STAMP is timed twice: cold (`cache=False`, every retain statistic computed) and cached (the
    retain key statistics already on disk, as for every request after a model's first; ROME and
    MEMIT cache theirs the same way); `seconds` is the cold figure and `seconds_cached` the other.
    The model is restored bit for bit after each method. The first row is the base model and the
    second the oracle, for reference, then one row per (name, model) of `retrained` (models
    trained without the concept as the oracle was, another seed: what an exact retrain scores,
    the reference for every target). `profile`: the settings profile of every method
    (`kif.profiles`; None: the model's default)."""
    from kif.erasure.registry import erase as erase_

    configs = configs or {}
    names = concept  # every method erases the same concept
    erase = functools.partial(erase_, profile=profile)
    rows = [{"method": "base", **scores(model), "seconds": 0.0},
            {"method": "oracle", **scores(oracle), "seconds": None}]
    rows += [{"method": f"retrain {name}", **scores(m), "seconds": None} for name, m in retrained]
    for method in methods:
        cfg = dict(configs.get(method, {}))
        extra = {}
        if method == "stamp":
            t0 = time.perf_counter()
            erase(model, names, method="stamp", config={**cfg, "cache": False})
            cold = time.perf_counter() - t0
            erase(model, names, method="stamp", config=cfg)  # fills the cache
        t0 = time.perf_counter()
        e = erase(model, names, method=method, config=cfg, progress=progress)
        seconds = time.perf_counter() - t0
        if method == "stamp":
            extra, seconds = {"seconds_cached": seconds}, cold
        with e.applied(model):
            rows.append({"method": method, **scores(model), "seconds": seconds, **extra,
                         "profile": e.info["profile"]["name"]})
    stamp_s = next((r["seconds"] for r in rows if r["method"] == "stamp"), None)
    for r in rows:
        r["ratio_to_stamp"] = (r["seconds"] / stamp_s if stamp_s and r["seconds"]
                               is not None and r["method"] != "base" else None)
    return rows


def world_scorer(world, split: str, oracle) -> Callable[[Any], dict]:
    """`kif eval`'s `METRICS` of a model on a fact-world split (the oracle's truth ratios
    computed once)."""
    from kif.evaluation import evaluate, forget_truth_ratio_probes, truth_ratios

    forget = world.split(split)
    tr_oracle, tr_fine = (truth_ratios(oracle, world, forget_truth_ratio_probes(world, forget, f))
                          for f in (False, True))

    def scores(m) -> dict:
        d = evaluate(m, world, split, oracle_truth_ratios=tr_oracle,
                     oracle_fine_truth_ratios=tr_fine).to_dict()
        return {k: d[k] for k in METRICS}
    return scores


def concept_scorer(concept, oracle) -> Callable[[Any], dict]:
    """`kif eval --forget`'s `METRICS` of a model on a concept from any source (a key the
    concept's probes do not allow is None)."""
    from kif.evaluation import evaluate_concept
    from kif.truth_ratios import truth_ratios

    tr_oracle = truth_ratios(oracle, concept, concept.truth_ratio_probes)

    def scores(m) -> dict:
        d = evaluate_concept(m, concept, oracle_truth_ratios=tr_oracle)
        return {k: d.get(k) for k in METRICS}
    return scores


def candidate_scoring(model, world, split: str = "forget10", repeats: int = 3,
                      progress: bool = False) -> dict:
    """Seconds to score the truth-ratio rows of `split`'s training questions (what every `kif`
    checkpoint check and `kif eval` run) as full rows and with each question's KV cache shared
    by its candidates; the two alternate `repeats` times and the medians are compared. Also the
    largest difference between the two scores (float rounding only)."""
    import numpy as np

    from kif import metrics
    from kif.evaluation import truth_ratio_candidates

    probes = world.person_probes(world.split(split), "train")
    prompts = [p.prompt for p in probes]
    cands = truth_ratio_candidates(world, probes, 0)
    rows_p = [p for p, c in zip(prompts, cands) for _ in c]
    rows_a = [a for c in cands for a in c]
    full_s, kv_s = [], []
    from rich.progress import track

    for _ in track(range(repeats), description="scoring both ways", transient=True,
                   disable=not progress):
        t0 = time.perf_counter()
        full = metrics.score_answers(model, rows_p, rows_a)
        t1 = time.perf_counter()
        kv = metrics.score_candidates(model, prompts, cands)
        t2 = time.perf_counter()
        full_s.append(t1 - t0)
        kv_s.append(t2 - t1)
    return {"split": split, "questions": len(probes), "rows": len(rows_a), "repeats": repeats,
            "full_rows_seconds": float(np.median(full_s)), "kv_cache_seconds": float(np.median(kv_s)),
            "speedup": float(np.median(full_s) / np.median(kv_s)),
            "max_abs_logprob_diff": float(np.abs(full.logprob - kv.logprob).max()),
            "same_correct": bool((full.correct == kv.correct).all())}


def _spread(values) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def never_knew_ceiling(model, world, oracle, split: str = "forget10", draws: int = 20,
                       seed: int = 100, progress: bool = False, retrained=()) -> dict:
    """What Forget Quality a model that truly never knew the people scores on this test.

    For each of `draws` draws of never-seen names (`kif.world.fresh_names`), the forget split's
    Forget Quality questions are asked about those names instead, of `model` (the base: it never
    met them) and of the oracle itself, and compared with the oracle's truth ratios on the real
    people, exactly as `kif eval` scores an erasure. The KS p-value of two samples of one
    distribution is uniform, so this is the spread an erasure's Forget Quality should be read
    against: on forget10's 120 questions the median is about 0.6, not 1.

    `retrained`, pairs (name, model) of models trained without the people as the oracle was but
    with another seed (`kif zoo build --train-seed`), are scored on the real people as an erasure
    is: the Forget Quality of an exact retrain."""
    import numpy as np

    from kif import metrics
    from kif.world import fresh_names
    from kif.evaluation import forget_truth_ratio_probes, truth_ratios

    forget = world.split(split)
    probes = forget_truth_ratio_probes(world, forget)
    tr_oracle = truth_ratios(oracle, world, probes)
    out: dict = {"split": split, "questions": len(probes), "draws": draws,
                 "base_fresh": [], "oracle_fresh": []}
    from rich.progress import track

    for d in track(range(draws), description="never-seen names", transient=True,
                   disable=not progress):
        names = dict(zip((p.name for p in forget), fresh_names(world, len(forget), seed + d)))
        asked = [dataclasses.replace(p, prompt=p.prompt.replace(p.subject, names[p.subject]))
                 for p in probes]
        out["base_fresh"].append(metrics.forget_quality(truth_ratios(model, world, asked), tr_oracle))
        out["oracle_fresh"].append(metrics.forget_quality(truth_ratios(oracle, world, asked),
                                                          tr_oracle))
    fine = forget_truth_ratio_probes(world, forget, fine=True)
    tr_oracle_fine = truth_ratios(oracle, world, fine) if retrained else None
    out["retrained"] = []
    for name, m in retrained:
        tr_fine = truth_ratios(m, world, fine)
        out["retrained"].append({
            "model": name,
            "forget_quality": metrics.forget_quality(truth_ratios(m, world, probes), tr_oracle),
            "forget_quality_fine": metrics.forget_quality(tr_fine, tr_oracle_fine),
            "forget_ks_fine": metrics.ks_distance(tr_fine, tr_oracle_fine)})
    if out["retrained"]:
        out["retrained_summary"] = {k: _spread([r[k] for r in out["retrained"]]) for k in (
            "forget_quality", "forget_quality_fine", "forget_ks_fine")}
    for key in ("base_fresh", "oracle_fresh"):
        v = np.asarray(out[key])
        out[f"{key}_summary"] = {"median": float(np.median(v)), "mean": float(v.mean()),
                                 "min": float(v.min()), "max": float(v.max()),
                                 "share_at_least_0.9": float((v >= 0.9).mean())}
    return out


__all__ = ["METRICS", "StampBenchRow", "bench_methods", "bench_stamp", "candidate_scoring",
           "concept_scorer", "world_scorer",
           "never_knew_ceiling", "synthetic_keys"]
