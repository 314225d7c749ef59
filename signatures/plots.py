"""PNG plots of a signature: its component scores, and every 2-D map it carries as a heatmap
(causal-tracing grids: layer x token role; attribution maps: layer x neuron)."""

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

from kif.signatures.base import Signature  # noqa: E402


def _label(sig: Signature, i: int) -> str:
    hook = sig.component_hooks[i].replace("blocks.", "L").replace(".hook_", " ").replace(".mlp", "")
    if sig.component == "direction":
        return f"{hook} dir{i}"
    return f"{hook} #{int(sig.indices[i, 1])}"


def plot_scores(sig: Signature, path: pathlib.Path, top: int = 20) -> pathlib.Path:
    n = min(top, len(sig))
    fig, ax = plt.subplots(figsize=(6, 0.28 * n + 1.2))
    ax.barh(range(n)[::-1], sig.scores[:n].float().numpy(), color="#3b6ea8")
    ax.set_yticks(range(n)[::-1], [_label(sig, i) for i in range(n)], fontsize=7)
    ax.set_xlabel("score")
    ax.set_title(f"{sig.kind}: {sig.concept}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_maps(sig: Signature, out_dir: pathlib.Path) -> list[pathlib.Path]:
    paths = []
    for name, grid in sig.maps.items():
        if grid.dim() != 2:
            continue
        g = grid.float().numpy()
        fig, ax = plt.subplots(figsize=(min(12.0, max(4.0, 0.45 * g.shape[1] + 2)),
                                        0.5 * g.shape[0] + 1.6))
        im = ax.imshow(g, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_ylabel("layer")
        ax.set_yticks(range(g.shape[0]))
        labels = sig.info.get(f"{name}_columns") or sig.info.get("roles")
        if labels and len(labels) == g.shape[1]:
            ax.set_xticks(range(g.shape[1]), labels, rotation=45, ha="right", fontsize=7)
        fig.colorbar(im, ax=ax)
        ax.set_title(f"{sig.kind} · {name}: {sig.concept}", fontsize=9)
        fig.tight_layout()
        p = out_dir / f"{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_signature(sig: Signature, out_dir: pathlib.Path) -> list[pathlib.Path]:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_scores(sig, out_dir / "scores.png"), *plot_maps(sig, out_dir)]
