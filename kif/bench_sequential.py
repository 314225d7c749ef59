"""`kif bench sequential`: erasure requests one after another, each on the model the previous
ones left, with the curve of what the model keeps (GDPR requests arrive one at a time, and an
edit that holds alone can undo an earlier one or wear the model down).

Each request erases one fact-world person with the chosen method and is applied before the next:
`stamp` preserves the earlier edits' forget keys (`StampConfig.preserve`), the training methods
start from the model as it is. After every request the model is scored on the forget facts of
every person erased so far (and of the request's own person), on retain people no request
touches, on the shared facts and, every `utility_every` requests and after the last, on TOFU's
model utility. People are taken from forget10 first, then from the retain split.

The reference for "forgotten" is the zoo's forget10 oracle on the people it never saw; the
targets (issue "Reliability") are retain and shared accuracy within 0.03 of the base after
every request and, after the last, every erased person's forget accuracy within 0.05 of that
reference. The model is put back bit for bit at the end, also on errors.
"""

import dataclasses
import time
from typing import Any, Sequence

from kif.errors import KifError

RETAIN_TEMPLATES = (0, 2)
SLACK_KEEP = 0.03  # retain and shared: at least base - this after every request
SLACK_FORGET = 0.05  # every erased person: at most the oracle's level + this at the end


@dataclasses.dataclass(frozen=True)
class SequentialRow:
    request: int  # 0: the base, before any request
    person: str | None
    seconds: float  # the request's erasure (not its scoring)
    forget_acc: float | None  # every person erased so far
    own_forget_acc: float | None  # this request's person
    retain_acc: float
    shared_acc: float
    model_utility: float | None  # every `utility_every` requests and after the last


def request_people(world, n: int) -> list[str]:
    """The first `n` people to erase: forget10's, then the retain split's, leaving at least
    UTILITY_PEOPLE retain people untouched to score what is kept."""
    from kif.evaluation import UTILITY_PEOPLE

    pool = [p.name for p in world.split("forget10")] + [p.name for p in world.split("retain")]
    most = len(pool) - UTILITY_PEOPLE
    if not 1 <= n <= most:
        raise KifError(f"sequential requests: between 1 and {most} people, got {n}")
    return pool[:n]


def run_sequential(model, world, method: str, people: Sequence[str], *, config=None,
                   utility_every: int = 10, oracle_forget_acc: float | None = None,
                   profile: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Erase `people` one request at a time with `method` under the settings `profile` (see the
    module docstring; `utility_every` 0: no model utility, which is most of the scoring's
    time); returns {"rows": [SequentialRow as dict, the base first], "per_person_forget_acc",
    "summary"}."""
    from rich.progress import Progress

    from kif.erasure.registry import erase

    if utility_every < 0:
        raise KifError(f"utility_every must be at least 0 (0: never), got {utility_every}")
    score = _Scorer(model, world, people)
    rows = [score.row(0, None, 0.0, [], utility=utility_every > 0)]
    applied: list = []
    try:
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"sequential {method} requests", total=len(people))
            for i, name in enumerate(people, 1):
                cfg = dict(config or {})
                if method == "stamp":
                    cfg["preserve"] = tuple(a.erasure for a in applied)
                t0 = time.perf_counter()
                e = erase(model, name, method=method, config=cfg, world=world,
                          profile=profile)
                seconds = time.perf_counter() - t0
                applied.append(e.apply(model))
                last = i == len(people)
                due = utility_every > 0 and (last or i % utility_every == 0)
                rows.append(score.row(i, name, seconds, people[:i], utility=due))
                bar.advance(task)
        per_person = score.per_person(people)
    finally:
        for a in reversed(applied):
            a.remove()
    return {"method": method, "profile": profile, "requests": len(people),
            "config": dict(config or {}),
            "rows": [dataclasses.asdict(r) for r in rows], "per_person_forget_acc": per_person,
            "summary": summarize(rows, per_person, oracle_forget_acc)}


class _Scorer:
    """Fixed probe sets, scored on the model as it is now."""

    def __init__(self, model, world, people: Sequence[str]):
        chosen = set(people)
        self.model, self.world = model, world
        self.untouched = [p for p in world.split("retain") if p.name not in chosen]
        self.retain = world.person_probes(self.untouched, "train", list(RETAIN_TEMPLATES))
        self.shared = world.shared_probes("train")
        self.probes_of = {n: world.person_probes([world.person(n)], "train") for n in people}

    def _correct(self, probes):
        from kif import metrics

        return metrics.score_answers(self.model, [p.prompt for p in probes],
                                     [p.answer for p in probes]).correct

    def _acc(self, probes) -> float:
        return float(self._correct(probes).mean())

    def row(self, request: int, person: str | None, seconds: float, erased: Sequence[str],
            utility: bool) -> SequentialRow:
        from kif.evaluation import utility as model_utility

        forget = [p for n in erased for p in self.probes_of[n]]
        return SequentialRow(
            request=request, person=person, seconds=seconds,
            forget_acc=self._acc(forget) if forget else None,
            own_forget_acc=self._acc(self.probes_of[person]) if person else None,
            retain_acc=self._acc(self.retain), shared_acc=self._acc(self.shared),
            model_utility=(model_utility(self.model, self.world, self.untouched)[0]
                           if utility else None))

    def per_person(self, names: Sequence[str]) -> dict[str, float]:
        """Each person's forget accuracy, from one batched scoring."""
        correct = self._correct([p for n in names for p in self.probes_of[n]])
        out, at = {}, 0
        for n in names:
            k = len(self.probes_of[n])
            out[n] = float(correct[at:at + k].mean())
            at += k
        return out


def summarize(rows: Sequence[SequentialRow], per_person: dict[str, float],
              oracle_forget_acc: float | None) -> dict[str, Any]:
    """The curve's worst points against the targets (`targets_met` only with the oracle's
    level, which the forget target is read against)."""
    base, after = rows[0], rows[1:]
    worst_retain = min(r.retain_acc for r in after)
    worst_shared = min(r.shared_acc for r in after)
    out: dict[str, Any] = {
        "base_retain_acc": base.retain_acc, "base_shared_acc": base.shared_acc,
        "base_model_utility": base.model_utility,
        "worst_model_utility": min((r.model_utility for r in after
                                    if r.model_utility is not None), default=None),
        "final_retain_acc": after[-1].retain_acc, "final_shared_acc": after[-1].shared_acc,
        "final_model_utility": after[-1].model_utility,
        "final_forget_acc": after[-1].forget_acc,
        "worst_retain_acc": worst_retain, "worst_shared_acc": worst_shared,
        "max_person_forget_acc": max(per_person.values()),
        "seconds_per_request_median": sorted(r.seconds for r in after)[len(after) // 2],
        "oracle_forget_acc": oracle_forget_acc,
    }
    keep = (worst_retain >= base.retain_acc - SLACK_KEEP
            and worst_shared >= base.shared_acc - SLACK_KEEP)
    if oracle_forget_acc is not None:
        bar = oracle_forget_acc + SLACK_FORGET
        out["people_above_forget_bar"] = sorted(n for n, a in per_person.items() if a > bar)
        out["targets_met"] = keep and not out["people_above_forget_bar"]
    out["keep_targets_met"] = keep
    return out


def oracle_level(world, oracle) -> float:
    """The oracle's training-phrasing accuracy on the people it never saw (forget10's)."""
    from kif import metrics

    probes = world.person_probes(world.split("forget10"), "train")
    return float(metrics.score_answers(oracle, [p.prompt for p in probes],
                                       [p.answer for p in probes]).correct.mean())


def plot_sequential(result: dict[str, Any], path) -> None:
    """The curve as a PNG: accuracies and model utility against the number of requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["request"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("retain_acc", "retain (untouched people)"), ("shared_acc", "shared facts"),
                       ("forget_acc", "forget (everyone erased so far)")):
        pts = [(a, r[key]) for a, r in zip(x, rows) if r[key] is not None]
        ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 30 else None)
    mu = [(a, r["model_utility"]) for a, r in zip(x, rows) if r["model_utility"] is not None]
    if mu:
        ax.plot(*zip(*mu), "o--", label="model utility")
    s = result["summary"]
    if s.get("oracle_forget_acc") is not None:
        ax.axhline(s["oracle_forget_acc"] + SLACK_FORGET, color="grey", lw=0.8, ls=":",
                   label="forget bar (oracle + 0.05)")
    ax.axhline(s["base_retain_acc"] - SLACK_KEEP, color="grey", lw=0.8, ls="-.",
               label="retain bar (base - 0.03)")
    ax.set_xlabel(f"sequential {result['method']} requests")
    ax.set_ylabel("accuracy / utility")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["SequentialRow", "oracle_level", "plot_sequential", "request_people",
           "run_sequential", "summarize"]
