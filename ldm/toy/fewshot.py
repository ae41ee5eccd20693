"""The toy benchmark's few-shot regime: every concept learned from N images of one layout
(`python -m ldm.toy.make_concepts --layout narrow`: in the centre, on black, one caption), what a
user's few photos look like, then drawn in the benchmark's new contexts; and the paper's ablations
(Fig. 9) there, each a fidelity/alignment curve over beta with 95 % intervals.

The benchmark's runner (ldm.toy.runner) trains the VARIANTS and measures the curves through its Bench;
its report (ldm.toy.report) writes `lines` and `plot`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ldm.toy.make_concepts import write_concepts
from ldm.util import REPO_ROOT as ROOT

NARROW_DIR = ROOT / "data/toy/concepts-narrow"
BETAS = (0.3, 0.5, 0.7, 0.9)
TAUS = (0.1, 0.15, 0.2)
Z95 = 1.959964


@dataclass(frozen=True)
class Variant:
    """A concept variant trained on the narrow images: config overrides, and `images` (None: all
    of them) of each concept's set."""
    key: str
    overrides: tuple[str, ...] = ()
    images: int | None = None


VARIANTS = (
    Variant("perfusion"),
    Variant("targets_from_captions", ("model.params.target_templates=captions",)),
    Variant("trained_keys", ("model.params.method=trained_keys",)),
    Variant("no_mask", ("data.params.use_masks=false",)),
    Variant("one_image", images=1),
    Variant("train_beta_0.6", ("model.params.beta=0.6",)),
    Variant("train_beta_0.9", ("model.params.beta=0.9",)),
    Variant("embedding", ("model.params.method=embedding",)),
)


@dataclass(frozen=True)
class Curve:
    """One fidelity/alignment curve over BETAS: a trained variant sampled at `tau`, locally or globally."""
    variant: str = "perfusion"
    tau: float = 0.15
    global_locking: bool = False


# Fig. 9's panels, each (title, what the paper says of it, {curve label: Curve}); a curve at the defaults
# is the Perfusion curve itself, measured once.
PANELS = (
    ("Key-locking", "locking the keys avoids overfitting",
     {"locked keys": Curve(), "trained keys": Curve("trained_keys")}),
    ("Zero-shot mask", "one of its ablations",
     {"mask": Curve(), "no mask": Curve("no_mask")}),
    ("Training images", "one of its ablations",
     {"all images": Curve(), "1 image": Curve("one_image")}),
    ("Train bias", "one of its ablations",
     {"beta 0.6": Curve("train_beta_0.6"), "beta 0.75 (default)": Curve(), "beta 0.9": Curve("train_beta_0.9")}),
    ("Inference tau", "a higher tau than training's trades better",
     {f"tau {t:g}": Curve(tau=t) for t in TAUS}),
    ("Key-locking scope", "one of its ablations",
     {"local": Curve(), "global": Curve(global_locking=True)}),
    ("Targets i*, i_super (not in the paper)", "no such ablation",
     {"target templates (default)": Curve(), "the images' captions": Curve("targets_from_captions")}),
)


def curves() -> dict[Curve, None]:
    """Every distinct curve of the panels, in first-seen order."""
    return {c: None for _, _, panel in PANELS for c in panel.values()}


def data_dir(out: Path, variant: Variant) -> Path:
    """The concept sets `variant` trains on: NARROW_DIR, or the first `images` of each written under
    `out`/runs."""
    if variant.images is None:
        return NARROW_DIR
    folder = out / "runs" / f"narrow-{variant.images}"
    write_concepts(folder, count=variant.images, layout="narrow")   # the same first images as NARROW_DIR's
    return folder


def wilson(hits: float, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = hits / n, Z95 ** 2
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(per_concept: dict) -> dict:
    """Fidelity and alignment pooled over concepts (every look and every attribute counts once), with
    their 95 % intervals."""
    looks = sum(r["looks"] for r in per_concept.values())
    attributes = sum(r["attributes"] for r in per_concept.values())
    seen = sum(r["fidelity"] * r["looks"] for r in per_concept.values())
    right = sum(r["alignment"] * r["attributes"] for r in per_concept.values())
    return {"fidelity": seen / looks, "fidelity_ci": wilson(seen, looks),
            "alignment": right / attributes, "alignment_ci": wilson(right, attributes)}


def best_at_bar(points: Sequence[dict], bar: float) -> dict | None:
    """The point of highest fidelity whose alignment is at least `bar`."""
    kept = [p for p in points if p["alignment"] >= bar]
    return max(kept, key=lambda p: p["fidelity"]) if kept else None


def pct(x: float) -> str:
    """A share as a percentage with one decimal, "n/a" for NaN (the toy reports' cells)."""
    return "n/a" if x != x else f"{100 * x:.1f}"


def _ci(point: dict, key: str) -> str:
    low, high = point[f"{key}_ci"]
    return f"{pct(point[key])} [{pct(low)}, {pct(high)}]"


def lines(narrow: dict, settings: dict, floor_alignment: float) -> list[str]:
    """The report's Fig. 9 section: per panel and curve, the point at the default beta and the best
    fidelity within 5 points of the superclass word's alignment."""
    fig9, beta = narrow["curves"], settings["beta"]
    bar = floor_alignment - 0.05
    out = ["### The paper's ablations (Fig. 9), few photos of one layout", "",
           f"Pooled over the concepts ({settings['looks_per_point']} concept objects per point); "
           "each cell fidelity [95 % interval], %. \"At the bar\": the highest fidelity over the beta sweep "
           f"whose alignment is within 5 points of the superclass word's ({pct(floor_alignment)} %), and its beta.",
           "", "| panel | curve | at beta " + f"{beta:g}" + ": fidelity | alignment | at the bar: fidelity | beta |",
           "|---|---|---|---|---|---|"]
    for title, _, panel in PANELS:
        for label, curve in panel.items():
            points = fig9[curve_key(curve)]
            at = next(p for p in points if p["beta"] == beta)
            best = best_at_bar(points, bar)
            out.append(f"| {title} | {label} | {_ci(at, 'fidelity')} | {_ci(at, 'alignment')} | "
                       + (f"{_ci(best, 'fidelity')} | {best['beta']:g} |" if best else "none | |"))
    out += ["", "![Fig. 9 in the narrow regime](fig9.png)", ""]
    return out


def curve_key(curve: Curve) -> str:
    return f"{curve.variant} tau {curve.tau:g}" + (" global" if curve.global_locking else "")


def plot(path: Path, narrow: dict, floor: dict) -> None:
    """fig9.png: one panel per entry of PANELS, fidelity against alignment over beta with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.util import atomic_path

    fig, axes = plt.subplots(2, 4, figsize=(15, 7.4))
    for ax, (title, expectation, panel) in zip(axes.flat, PANELS):
        for label, curve in panel.items():
            points = narrow["curves"][curve_key(curve)]
            xs, ys = [100 * p["alignment"] for p in points], [100 * p["fidelity"] for p in points]
            yerr = [[y - 100 * p["fidelity_ci"][0] for y, p in zip(ys, points)],
                    [100 * p["fidelity_ci"][1] - y for y, p in zip(ys, points)]]
            xerr = [[x - 100 * p["alignment_ci"][0] for x, p in zip(xs, points)],
                    [100 * p["alignment_ci"][1] - x for x, p in zip(xs, points)]]
            ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, fmt="o-", capsize=2, label=label, markersize=3)
            for x, y, p in zip(xs, ys, points):
                ax.annotate(f"{p['beta']:g}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.plot(100 * floor["alignment"], 100 * floor["fidelity"], "x", color="black", label="superclass word")
        ax.set_title(f"{title}\n(paper: {expectation})", fontsize=8)
        ax.set_xlabel("text alignment (%)", fontsize=7)
        ax.set_ylabel("concept fidelity (%)", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle("Few photos of one layout: Perfusion's ablations over beta (95 % intervals)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
