"""The trade-off plot of the paper's figures: fidelity against alignment, one point per gate setting."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def plot_tradeoff(path: Path, curves: Mapping[str, Sequence[dict]], x: str, y: str, xlabel: str, ylabel: str,
                  title: str, baselines: Mapping[str, dict] = {}, recommended: Mapping[str, dict | None] = {},
                  scale: float = 1.0) -> Path:
    """`curves`: label -> points (dicts with beta, tau, x, y); each point is annotated with its beta
    (and tau when a curve mixes taus). `baselines` (legend label -> point) are marked x;
    `recommended` (curve label -> point) are circled in their curve's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.util import atomic_path

    fig, ax = plt.subplots(figsize=(5, 4))
    for label, points in curves.items():
        line = ax.plot([scale * p[x] for p in points], [scale * p[y] for p in points], "o-", label=label)[0]
        several_taus = len({p["tau"] for p in points}) > 1
        for p in points:
            text = f"{p['beta']:g}" + (f"/{p['tau']:g}" if several_taus else "")
            ax.annotate(text, (scale * p[x], scale * p[y]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        if recommended.get(label):
            ax.plot(scale * recommended[label][x], scale * recommended[label][y], "o", markersize=13,
                    markerfacecolor="none", color=line.get_color(), label=f"{label}: recommended")
    markers = iter("xP*D")
    for label, point in baselines.items():
        ax.plot(scale * point[x], scale * point[y], next(markers, "x"), color="black", markersize=9, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_per_prompt(path: Path, prompts: Sequence[str], series: Mapping[str, Mapping[str, Sequence[float]]],
                    title: str) -> Path:
    """One panel per metric: a bar per prompt for each series (e.g. the concept and the superclass
    word), the mean over prompts as the last group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.util import atomic_path

    metrics = list(next(iter(series.values())))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.32 * len(prompts) + 2), 2.4 * len(metrics)),
                             squeeze=False)
    width = 0.8 / len(series)
    for ax, metric in zip(axes[:, 0], metrics):
        for k, (label, values) in enumerate(series.items()):
            ys = list(values[metric]) + [sum(values[metric]) / len(values[metric])]
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(ys))], ys, width, label=label)
        ax.set_ylabel(metric.replace("_", "-").upper(), fontsize=8)
        ax.set_xticks(range(len(prompts) + 1), [*prompts, "mean"], rotation=60, ha="right", fontsize=6)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
