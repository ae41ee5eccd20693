"""Measure trained concepts on a base model: CLIP-T, CLIP-I and DINO per prompt, against the
superclass word without the concept, over a beta/tau sweep, and for two concepts in one prompt.

CLIP-T (the paper's text alignment) compares an image with its prompt where the concept is
named by its superclass word ("a teddy in the jungle"): the text CLIP knows. CLIP-I and DINO
(fidelity) are each image's mean cosine with the concept's own training images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ldm.evaluation.harness import Sampling, recommend, render, render_concepts, sweep
from ldm.perfusion.prompts import format_prompt

METRICS = ("clip_t", "clip_i", "dino")


@dataclass
class Judge:
    """CLIP (text and image) and, optionally, DINO; adds up the seconds it spends."""
    clip: object
    dino: object | None = None
    seconds: float = 0.0

    def _fidelity_metrics(self):
        return [(name, m) for name, m in (("clip_i", self.clip), ("dino", self.dino)) if m is not None]

    def references(self, images: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """A concept's training images as features of each fidelity metric, computed once per run."""
        start = time.perf_counter()
        features = {name: metric.image_features(images) for name, metric in self._fidelity_metrics()}
        self.seconds += time.perf_counter() - start
        return features

    def __call__(self, images: torch.Tensor, texts: Sequence[str], references: Sequence[dict]) -> dict[str, torch.Tensor]:
        """CLIP-T against `texts`; CLIP-I and DINO (one row per concept) against each concept's `references`."""
        start = time.perf_counter()
        scores = {"clip_t": self.clip.text_similarity(images, texts)}
        for name, metric in self._fidelity_metrics():
            scores[name] = torch.stack([metric.similarity_to(images, refs[name]) for refs in references])
        self.seconds += time.perf_counter() - start
        return scores


def seed_means(scores: dict[str, torch.Tensor], templates: Sequence[str], n_seeds: int) -> list[dict]:
    """Mean over the seeds of each template, per score (one value per image, prompt-major as `render` draws)."""
    return [{"prompt": t, **{m: v[k * n_seeds:(k + 1) * n_seeds].mean().item() for m, v in scores.items()}}
            for k, t in enumerate(templates)]


def by_prompt(scores: dict[str, torch.Tensor], templates: Sequence[str], n_seeds: int, which: int = 0) -> list[dict]:
    """`seed_means` of CLIP-T and of the fidelity scores against concept `which`'s images."""
    return seed_means({"clip_t": scores["clip_t"], **{m: scores[m][which] for m in ("clip_i", "dino") if m in scores}},
                      templates, n_seeds)


def mean(rows: Sequence[dict]) -> dict:
    """Each score's mean over the rows of `seed_means`."""
    return {m: sum(r[m] for r in rows) / len(rows) for m in rows[0] if m != "prompt"} if rows else {}


def evaluate(model, concepts: Sequence, names: Sequence[str], references: Sequence[Sequence[torch.Tensor]],
             templates: Sequence[str], judge: Judge, seeds: Sequence[int], sampling: Sampling,
             gates: Sequence[tuple[float, float]], settings: Sequence[tuple[float, float]] = (),
             pair_templates: Sequence[str] = (), fraction: float = 0.95, log: Callable = print) -> dict:
    """Concept n (file `names[n]`, loaded Concept `concepts[n]`, training images `references[n]`) at
    `gates[n]` = (beta, tau) on every template; each alone over `settings`; all together on `pair_templates`."""
    sampled = {"seconds": 0.0}
    features = [judge.references(images) for images in references]   # once per concept, not per render

    def timed(fn, *args, **kwargs):
        start = time.perf_counter()
        images = fn(*args, **kwargs)
        sampled["seconds"] += time.perf_counter() - start
        return images

    def alone(n: int, beta: float, tau: float) -> list[dict]:
        c = concepts[n]
        images = timed(render_concepts, model, [c], templates, seeds, sampling, beta, tau, names=[names[n]])
        texts = [format_prompt(t, [c.superclass]) for t in templates for _ in seeds]
        return by_prompt(judge(images, texts, [features[n]]), templates, len(seeds))

    results = {"concepts": [], "pairs": None}
    for n, (concept, name) in enumerate(zip(concepts, names)):
        prompts = [format_prompt(t, [concept.superclass]) for t in templates]
        baseline = by_prompt(judge(timed(render, model, prompts, seeds, sampling),
                                   [p for p in prompts for _ in seeds], [features[n]]), templates, len(seeds))
        beta, tau = gates[n]
        rows = alone(n, beta, tau)
        entry = {"file": name, "superclass": concept.superclass, "references": len(references[n]),
                 "beta": beta, "tau": tau, "per_prompt": rows, "mean": mean(rows),
                 "baseline": {"per_prompt": baseline, "mean": mean(baseline)}}
        log(f"{name}: " + ", ".join(f"{m} {v:.4f}" for m, v in entry["mean"].items())
            + " (superclass word: " + ", ".join(f"{m} {v:.4f}" for m, v in entry["baseline"]["mean"].items()) + ")")
        if settings:
            entry["sweep"] = sweep(settings, lambda b, t: mean(alone(n, b, t)))
            entry["recommendation"] = recommend(entry["sweep"], entry["baseline"]["mean"]["clip_t"], fraction,
                                                fidelity="clip_i", alignment="clip_t")
        results["concepts"].append(entry)

    if pair_templates and len(concepts) > 1:
        images = timed(render_concepts, model, concepts, pair_templates, seeds, sampling,
                       [g[0] for g in gates], [g[1] for g in gates], names=list(names))
        texts = [format_prompt(t, [c.superclass for c in concepts]) for t in pair_templates for _ in seeds]
        scores = judge(images, texts, features)
        rows = [by_prompt(scores, pair_templates, len(seeds), which=n) for n in range(len(concepts))]
        results["pairs"] = {"per_prompt": [{"prompt": t, "clip_t": rows[0][k]["clip_t"],
                                            **{m: [r[k][m] for r in rows] for m in ("clip_i", "dino") if m in rows[0][k]}}
                                           for k, t in enumerate(pair_templates)],
                            "mean": {"clip_t": mean(rows[0])["clip_t"],
                                     **{m: [mean(r)[m] for r in rows] for m in ("clip_i", "dino") if m in rows[0][0]}}}
    results["timing"] = {"sampling_s": round(sampled["seconds"], 3), "metrics_s": round(judge.seconds, 3),
                         "metrics_over_sampling": judge.seconds / max(sampled["seconds"], 1e-9)}
    return results


# ----------------------------------------------------------------------------- report
def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def write_report(out: Path, results: dict, header: Sequence[str]) -> list[Path]:
    """report.md, results.json and tradeoff.png (with a sweep) under `out`."""
    import json

    from ldm.evaluation.plots import plot_per_prompt, plot_tradeoff
    from ldm.util import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in METRICS if m in results["concepts"][0]["mean"]]
    lines = ["# Concept evaluation", "", *header, ""]
    for entry in results["concepts"]:
        lines += [f"## {entry['file']} (superclass {entry['superclass']!r}, {entry['references']} training images)", "",
                  f"beta {entry['beta']:g}, tau {entry['tau']:g}. Per cell: concept / superclass word without it.", "",
                  _row(["prompt", *metrics]), _row(["---"] * (1 + len(metrics)))]
        for row, base in zip(entry["per_prompt"], entry["baseline"]["per_prompt"]):
            lines.append(_row([row["prompt"], *(f"{_f(row[m])} / {_f(base[m])}" for m in metrics)]))
        lines.append(_row(["**mean**", *(f"**{_f(entry['mean'][m])}** / {_f(entry['baseline']['mean'][m])}"
                                         for m in metrics)]))
        if "sweep" in entry:
            lines += ["", "Sweep (means over the prompts):", "", _row(["beta", "tau", *metrics]),
                      _row(["---"] * (2 + len(metrics)))]
            lines += [_row([f"{p['beta']:g}", f"{p['tau']:g}", *(_f(p[m]) for m in metrics)]) for p in entry["sweep"]]
            rec = entry["recommendation"]
            lines += ["", f"Recommended: beta {rec['beta']:g}, tau {rec['tau']:g} (the highest CLIP-I whose CLIP-T "
                          f"is at least {results['fraction']:g}x the superclass word's)." if rec else
                      f"Recommended: none; no setting keeps CLIP-T at {results['fraction']:g}x the superclass word's."]
        lines.append("")
    if results["pairs"]:
        p = results["pairs"]
        lines += ["## All concepts in one prompt", "", "Fidelity of each concept against its own training images, "
                  "from the same images.", "", _row(["prompt", *metrics]), _row(["---"] * (1 + len(metrics)))]
        for row in p["per_prompt"] + [{"prompt": "**mean**", **p["mean"]}]:
            lines.append(_row([row["prompt"], *(_f(row[m]) if m == "clip_t" else " / ".join(_f(v) for v in row[m])
                                                for m in metrics)]))
        lines.append("")
    t = results["timing"]
    lines += [f"Sampling {t['sampling_s']:.1f} s, metrics {t['metrics_s']:.1f} s "
              f"({100 * t['metrics_over_sampling']:.1f} % of the sampling time)."]
    written = []
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    written.append(out / "report.md")
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n")
    written.append(out / "results.json")
    for n, entry in enumerate(results["concepts"]):
        series = {label: {m: [r[m] for r in rows] for m in metrics}
                  for label, rows in (("concept", entry["per_prompt"]), ("superclass word", entry["baseline"]["per_prompt"]))}
        written.append(plot_per_prompt(out / f"per_prompt_{n + 1}.png", [r["prompt"] for r in entry["per_prompt"]],
                                       series, f"{entry['file']}: per prompt"))
    swept = [e for e in results["concepts"] if "sweep" in e]
    if swept:
        written.append(plot_tradeoff(
            out / "tradeoff.png", {Path(e["file"]).stem: e["sweep"] for e in swept}, "clip_t", "clip_i",
            "CLIP-T (text alignment)", "CLIP-I (concept fidelity)", "beta/tau sweep",
            baselines={f"{Path(e['file']).stem}: superclass word, no concept": e["baseline"]["mean"] for e in swept},
            recommended={Path(e["file"]).stem: e["recommendation"] for e in swept}))
    return written
