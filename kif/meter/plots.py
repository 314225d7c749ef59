"""PNG plots of a `TraceReport`: the answer's rank per layer before and after the erasure, and the
recovery of every probe (matplotlib, Agg backend; files only)."""

import math
import os
import pathlib
import tempfile

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

from kif.meter.report import INTACT_SURFACE, SUPPRESSED_LATENT, TraceReport  # noqa: E402

_COLORS = {"surface": "#444444", "latent": "#c0392b", "trace": "#2e86c1"}
_LINES = {"base": ("#2c3e50", "-"), "erased": ("#c0392b", "-"), "oracle": ("#27ae60", "--"),
          "reference": ("#7f8c8d", ":")}


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    # written under a temporary name, then renamed: a crash never leaves half a PNG
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_answer_rank(report: TraceReport, path: pathlib.Path) -> pathlib.Path | None:
    """Median rank of the answer's first token per layer (logit lens), and the lens top-1 rate."""
    ar = report.probes.get("answer-rank")
    ll = report.probes.get("logit-lens")
    if ar is None or ar.skipped or not ar.curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, values in ar.curves.items():
        if not key.startswith("median_rank/"):
            continue
        who = key.split("/", 1)[1]
        color, style = _LINES.get(who, ("#999999", "-"))
        axes[0].plot(range(len(values)), [v + 1 for v in values], style, color=color,
                     marker="o", label=who)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("residual index (0 = embeddings, l+1 = block l)")
    axes[0].set_ylabel("median rank of the answer + 1")
    axes[0].set_title("answer rank per layer (logit lens)", fontsize=9)
    axes[0].legend(fontsize=7)
    if ll is not None and not ll.skipped:
        for who in ("base", "erased", "oracle", "reference"):
            if who in ll.curves:
                color, style = _LINES[who]
                axes[1].plot(range(len(ll.curves[who])), ll.curves[who], style, color=color,
                             marker="o", label=who)
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].set_xlabel("residual index")
        axes[1].set_ylabel("answer is the lens's top-1")
        axes[1].set_title("logit lens", fontsize=9)
        axes[1].legend(fontsize=7)
    fig.suptitle(f"{report.models.get('erased')} vs {report.models.get('base')}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_probes(report: TraceReport, path: pathlib.Path) -> pathlib.Path:
    """One bar per probe: its score (0 = never knew, 1 = as the base), coloured by group."""
    items = [(n, p) for n, p in report.probes.items()]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(items) + 1.6))
    ys = list(range(len(items)))[::-1]
    for y, (name, p) in zip(ys, items):
        v = p.score
        if v is None or (isinstance(v, float) and math.isnan(v)):
            ax.text(0.01, y, "skipped" if p.skipped else "no signal", va="center", fontsize=7,
                    color="#888888")
            continue
        ax.barh(y, v, color=_COLORS.get(p.group, "#999999"))
        ax.text(min(v + 0.01, 0.93), y, f"{v:.2f}", va="center", fontsize=7)
    ax.axvline(SUPPRESSED_LATENT, color=_COLORS["latent"], lw=0.8, ls="--")
    ax.axvline(INTACT_SURFACE, color=_COLORS["surface"], lw=0.8, ls=":")
    ax.set_yticks(ys, [f"{n} ({p.group})" for n, p in items], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("recovery (0 = as a model that never knew, 1 = as the base)")
    lts = report.latent_trace_score
    ax.set_title(f"verdict: {report.verdict}   latent trace score: "
                 f"{'-' if lts is None else f'{lts:.2f}'}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_report(report: TraceReport, out_dir: str | os.PathLike) -> list[pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_probes(report, out / "probes.png"),
             plot_answer_rank(report, out / "answer_rank.png")]
    return [p for p in paths if p is not None]
