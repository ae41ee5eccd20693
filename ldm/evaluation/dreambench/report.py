"""The DreamBench table from the per-subject result files under OUT/subjects/: per subject, per kind
(object, live) and overall, beside the class word without the concept and the published rows of other
methods; report.md, results.json and, with a sweep, tradeoff.png (means over the subjects)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ldm.errors import MissingFileError, UserError
from ldm.evaluation.dreambench.subjects import KINDS
from ldm.util import atomic_path

METRICS = ("dino", "clip_i", "clip_t", "shown", "asked")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "shown": "concept shown (toy scorer)",
          "asked": "rest of prompt (toy scorer)"}
# (method, DINO, CLIP-I, CLIP-T) as other papers report them on real Stable Diffusion; not measured here
PUBLISHED = (("DreamBooth", 0.668, 0.803, 0.305), ("Textual Inversion", 0.569, 0.780, 0.255),
             ("Custom Diffusion", 0.643, 0.790, 0.305))


def load_results(out: Path) -> list[dict]:
    """Every complete per-subject result under `out`, by subject name; all must share their settings."""
    files = sorted((out / "subjects").glob("*.json"))
    results = []
    for path in files:
        try:
            result = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"{path}: not a readable result file ({err}); delete it and run the subject "
                            "again") from None
        if result.get("complete"):
            results.append(result)
    if not results:
        raise MissingFileError(f"{out / 'subjects'}: no finished subject results to merge")
    other = next((r for r in results if r["settings"] != results[0]["settings"]), None)
    if other:
        raise UserError(f"{out / 'subjects'}: {results[0]['subject']}.json and {other['subject']}.json were made with "
                        "other settings; merge only results of one protocol")
    return results


def _mean(means: Sequence[dict]) -> dict:
    return {m: sum(x[m] for x in means) / len(means) for m in METRICS if means and m in means[0]}


def summarize(results: Sequence[dict]) -> dict:
    """Means over subjects (each subject counts once) overall and per kind, with and without the concept,
    and the sweep's points averaged over the subjects."""
    groups = {"overall": list(results), **{k: [r for r in results if r["kind"] == k] for k in KINDS}}
    summary = {name: {"subjects": len(rs), "mean": _mean([r["mean"] for r in rs]),
                      "baseline": _mean([r["baseline"]["mean"] for r in rs])} for name, rs in groups.items() if rs}
    points = [r["sweep"] for r in results]
    summary["sweep"] = [{"beta": p[0]["beta"], "tau": p[0]["tau"], **_mean(p)} for p in zip(*points)]
    return summary


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_report(out: Path, results: Sequence[dict], header: Sequence[str]) -> list[Path]:
    from ldm.evaluation.plots import plot_tradeoff

    summary = summarize(results)
    metrics = [m for m in METRICS if m in results[0]["mean"]]
    settings = results[0]["settings"]
    head = [_row(["", "subjects", *(LABELS[m] for m in metrics)]), _row(["---"] * (2 + len(metrics)))]
    lines = ["# DreamBench", "", *header, "", "## Means over subjects", "", *head]
    for name in ("overall", *KINDS):
        if name in summary:
            lines.append(_row([f"**Perfusion, {'all subjects' if name == 'overall' else name + 's'}**",
                               summary[name]["subjects"], *(f"**{_f(summary[name]['mean'][m])}**" for m in metrics)]))
    for name in ("overall", *KINDS):
        if name in summary:
            lines.append(_row([f"class word, no concept ({'all' if name == 'overall' else name + 's'})",
                               summary[name]["subjects"], *(_f(summary[name]["baseline"][m]) for m in metrics)]))
    for method, *values in PUBLISHED:
        cells = dict(zip(("dino", "clip_i", "clip_t"), values))
        lines.append(_row([f"*{method} (published, SD; another paper's figure)*", 30,
                           *(f"*{_f(cells[m])}*" if m in cells else "" for m in metrics)]))
    comparable = settings["metrics"] == "dreambooth"
    lines += ["", "Published rows: DreamBench as other papers report it on real Stable Diffusion (DINO ViT-S/16, "
              "CLIP ViT-B/32, 25 prompts x 4 images per subject); not measured here" +
              ("." if comparable else f", and not comparable with this run's --metrics {settings['metrics']}."), "",
              "## Per subject", "", "Per cell: with the concept / the class word without it.", "",
              _row(["subject", "class", "kind", *(LABELS[m] for m in metrics)]), _row(["---"] * (3 + len(metrics)))]
    for r in results:
        lines.append(_row([r["subject"], r["superclass"], r["kind"],
                           *(f"{_f(r['mean'][m])} / {_f(r['baseline']['mean'][m])}" for m in metrics)]))
    if summary["sweep"]:
        lines += ["", f"## Beta sweep (tau {summary['sweep'][0]['tau']:g}), means over subjects", "",
                  _row(["beta", *(LABELS[m] for m in metrics)]), _row(["---"] * (1 + len(metrics)))]
        lines += [_row([f"{p['beta']:g}", *(_f(p[m]) for m in metrics)]) for p in summary["sweep"]]
    trained = [r["train_seconds"] for r in results if r["train_seconds"] is not None]
    lines += ["", f"Training {sum(trained):.0f} s for {len(trained)} subject(s) (in this --out's runs), measuring "
              f"{sum(r['eval_seconds'] for r in results):.0f} s."]
    written = [out / "report.md", out / "results.json"]
    with atomic_path(written[0]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(written[1]) as tmp:
        tmp.write_text(json.dumps({"summary": summary, "published": PUBLISHED, "subjects": list(results)}, indent=1)
                       + "\n")
    if summary["sweep"]:
        # the toy world's scorer measures what its random tiny CLIP cannot: plot its two columns there
        x, y = ("asked", "shown") if "shown" in metrics else ("clip_t", "clip_i")
        written.append(plot_tradeoff(out / "tradeoff.png", {"Perfusion": summary["sweep"]}, x, y, LABELS[x],
                                     LABELS[y], f"beta sweep, mean over {len(results)} subjects",
                                     baselines={"class word, no concept": summary["overall"]["baseline"]}))
    return written
