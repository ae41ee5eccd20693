"""The toy benchmark's report: report.md, results.json, methods.png, beta_curve.png, samples.png and
fig9.png from the runner's results, with the checks each regime is meant to pass."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ldm.evaluation.harness import DEFAULT_FRACTION
from ldm.toy import fewshot
from ldm.toy.experiment import FULL_UNET, GATE_ROWS, NARROW_METHODS, PAIR_EXAMPLE, SUPERCLASS, TAU, TAUS, p_above
from ldm.toy.fewshot import pct
from ldm.toy.world import CONCEPTS


def _mean(per_concept: dict) -> dict:
    keys = ("fidelity", "alignment", "both")
    return {k: sum(r[k] for r in per_concept.values()) / len(per_concept) for k in keys}


def _looks_seen(per_concept: dict) -> tuple[int, int]:
    """(concept objects whose look was seen, all concept objects), over every concept."""
    return (round(sum(r["fidelity"] * r["looks"] for r in per_concept.values())),
            sum(r["looks"] for r in per_concept.values()))


def checks(results: dict, labels: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(what, measured, holds) for each bar the toy world is meant to clear."""
    methods, base = results["methods"], results["base_model"]
    perfusion, floor = methods[labels[0]], methods[SUPERCLASS]
    p_mean, full = _mean(perfusion), _mean(methods[FULL_UNET])
    ceiling = {c: r["ceiling"] for c, r in results["looks"].items()}
    # a solid colour has no words
    spelled = {c: r["words"] for c, r in results["looks"].items() if CONCEPTS[c].pattern != "solid"}
    words = _mean(spelled)["fidelity"]
    curve = [p["fidelity"] for p in results["beta_curve"][str(TAU)]]
    both = [r["both"] for r in results["pairs"].values()]
    gate = [g["median_max_other_gate"] for g in results["gates"][GATE_ROWS[1][0]].values()]
    worst = min(r["fidelity"] for r in perfusion.values())
    return [
        ("autoencoder ceiling >= 95 % for every concept's look", ", ".join(pct(c) for c in ceiling.values()),
         min(ceiling.values()) >= 0.95),
        ("base model: >= 90 % of requested attributes on held-out prompts", pct(base["overall"]), base["overall"] >= 0.9),
        ("base model: positions >= 85 %", pct(base["position"]), base["position"] >= 0.85),
        ("base model: a patterned look in words drawn right >= 70 %",
         ", ".join(pct(r["fidelity"]) for r in spelled.values()), words >= 0.7),
        ("nouns attend inside their object >= 3x outside", f"{base['noun_localization']:.2f}x",
         base["noun_localization"] >= 3),
        ("median largest gate at another token < 0.1 (Eq. 3 training, default beta/tau)",
         ", ".join(f"{g:.3f}" for g in gate), max(gate) < 0.1),
        ("Perfusion mean fidelity >= 60 %", pct(p_mean["fidelity"]), p_mean["fidelity"] >= 0.6),
        ("Perfusion fidelity >= 0.8x the whole-U-Net reference", f"{p_mean['fidelity'] / max(full['fidelity'], 1e-9):.2f}x",
         p_mean["fidelity"] >= 0.8 * full["fidelity"]),
        ("every concept's fidelity >= 40 %", pct(worst), worst >= 0.4),
        ("Perfusion alignment within 5 points of the superclass word's", f"{pct(p_mean['alignment'])} against "
         f"{pct(_mean(floor)['alignment'])}", p_mean["alignment"] >= _mean(floor)["alignment"] - 0.05),
        (f"beta sweep ({results['beta_curve'][str(TAU)][0]['beta']:g} to "
         f"{results['beta_curve'][str(TAU)][-1]['beta']:g}, tau {TAU}) spans >= 30 points of fidelity", f"{pct(max(curve) - min(curve))} points",
         max(curve) - min(curve) >= 0.3),
        ("two concepts in one prompt both present >= 50 %", pct(sum(both) / len(both)), sum(both) / len(both) >= 0.5),
    ]


def narrow_checks(results: dict) -> list[tuple[str, str, bool]]:
    """(what, measured, holds) for the few-shot regime at the default settings."""
    methods = results["narrow"]["methods"]
    labels = [label for label, _ in NARROW_METHODS]
    perfusion, floor, full = (_mean(methods[label]) for label in (labels[0], SUPERCLASS, labels[-1]))
    worst = min(r["fidelity"] for r in methods[labels[0]].values())
    return [
        ("Perfusion mean fidelity in new contexts >= 70 %", pct(perfusion["fidelity"]), perfusion["fidelity"] >= 0.7),
        ("every concept's fidelity >= 50 %", pct(worst), worst >= 0.5),
        ("Perfusion alignment within 5 points of the superclass word's",
         f"{pct(perfusion['alignment'])} against {pct(floor['alignment'])}",
         perfusion["alignment"] >= floor["alignment"] - 0.05),
        ("Perfusion fidelity >= 0.8x the whole U-Net fine-tuned on the same images",
         f"{perfusion['fidelity'] / max(full['fidelity'], 1e-9):.2f}x ({pct(full['fidelity'])})",
         perfusion["fidelity"] >= 0.8 * full["fidelity"]),
    ]


def _methods_table(per_label: dict, concepts: Sequence[str]) -> list[str]:
    lines = ["| method | " + " | ".join(concepts) + " | mean fidelity | mean alignment |",
             "|---|" + "---|" * (len(concepts) + 2)]
    for label, per in per_label.items():
        m = _mean(per)
        cells = " | ".join(f"{pct(per[c]['fidelity'])} / {pct(per[c]['alignment'])}" for c in concepts)
        lines.append(f"| {label} | {cells} | **{pct(m['fidelity'])}** | {pct(m['alignment'])} |")
    return lines


def _gates_table(per_label: dict, concepts: Sequence[str]) -> list[str]:
    lines = ["| state | " + " | ".join(concepts) + " |", "|---|" + "---|" * len(concepts)]
    for label, per in per_label.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{per[c]['median_max_other_gate']:.3f} / {per[c]['others_open']:.1f} / {per[c]['concept_sim']:.2f}"
            for c in concepts) + " |")
    return lines


def _narrow_lines(results: dict) -> list[str]:
    s, narrow = results["settings"], results["narrow"]
    concepts = s["concepts"]
    lines = ["## Few photos of one layout (main table)", "",
             f"Each concept learned from {s['narrow_images']} images in the centre on black, all captioned "
             "\"on a black background, in the centre a {}\" (data/toy/concepts-narrow), then drawn in the same "
             f"new contexts as below; sampling beta {s['beta']} (global locking {s['beta_global']}), tau {s['tau']}. "
             "Per cell: fidelity / alignment, %.", ""]
    lines += _methods_table(narrow["methods"], concepts)
    lines += ["", "| check | measured | holds |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {'yes' if ok else '**no**'} |" for what, value, ok in narrow_checks(results)]
    lines += ["", f"Gates (beta {s['beta']}, tau {s['tau']}): median largest gate at another token / tokens above 0.5 / "
              "the concept token's mean sim.", ""]
    lines += _gates_table(narrow["gates"], concepts)
    floor = _mean(narrow["methods"][SUPERCLASS])["alignment"]
    return lines + [""] + fewshot.lines(narrow, s, floor)


def write_report(out: Path, results: dict, samples: torch.Tensor, labels: Sequence[str]) -> None:
    from ldm.outputs import save_labelled_grid
    from ldm.util import atomic_path

    concepts = results["settings"]["concepts"]
    s = results["settings"]
    lines = ["# Toy-world benchmark", "",
             f"`python -m ldm.toy.benchmark` — {len(concepts)} concepts, {s['prompts']} held-out prompts x "
             f"{s['seeds']} seeds each, DDIM {s['sample_steps']} steps, guidance {s['guidance']}; "
             f"training {s['train_steps']} steps (the whole-U-Net reference: {s['finetune_steps']} steps at "
             f"learning rate {s['finetune_learning_rate']:g}); sampling "
             f"beta {s['beta']} (global locking {s['beta_global']}), tau {s['tau']}; {s['threads']} CPU threads "
             f"(training: {s['training_workers']} processes of one thread); "
             f"{results['seconds'] / 60:.1f} min in all.", "",
             "Fidelity: concept objects whose look (its colour, or pattern and colours) the scorer sees. Alignment: every other "
             "requested attribute (positions, background, the other object's shape and colour).", ""]
    lines += _narrow_lines(results)
    lines += ["## Layout-covering concept sets", "",
              "Each concept learned from 8 images covering every position and background and three kinds of company "
              "(data/toy/concepts). Per cell: fidelity / alignment, %.", "", "### Methods", ""]
    lines += _methods_table(results["methods"], concepts)
    ceiling = [results["looks"][c]["ceiling"] for c in concepts]
    lines.append("| *ceiling: the concept's own renders through the autoencoder* | "
                 + " | ".join(pct(c) for c in ceiling) + f" | {pct(sum(ceiling) / len(ceiling))} | |")
    perfusion = _mean(results["methods"][labels[0]])["fidelity"]
    floor = _mean(results["methods"][SUPERCLASS])["fidelity"]
    counts = [_looks_seen(results["methods"][label]) for label in (labels[0], SUPERCLASS)]
    lines += ["", f"Perfusion's fidelity {pct(perfusion)}% against {pct(floor)}% for the superclass word alone: "
              f"looks seen {counts[0][0]} of {counts[0][1]} against {counts[1][0]} of {counts[1][1]}; one-sided "
              f"Fisher exact p = {p_above(*counts[0], *counts[1]):.2g}.", "",
              "### Checks", "", "| check | measured | holds |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {'yes' if ok else '**no**'} |" for what, value, ok in checks(results, labels)]
    base = results["base_model"]
    lines += ["", "### Base model", "",
              f"`python -m ldm.toy.evaluate` on the {base['prompts']} held-out prompts x {base['seeds']} seeds: "
              + ", ".join(f"{k} {pct(base[k])}%" for k in ("shape", "colour", "position", "background", "overall")
                          if k in base)
              + f". The nouns' cross-attention inside their object's mask is {base['noun_localization']:.2f}x "
              "their attention outside it (one-object held-out prompts, the render noised to t = 500, mean over "
              "layers and heads).", "",
              f"### Gates (beta {s['beta']}, tau {s['tau']})", "",
              "Over each concept's 8 prompts: the median of the largest gate at a token that is not the concept's, "
              "the mean number of such tokens whose gate is above 0.5, and the concept token's mean sim. Per cell: "
              "median largest gate / tokens above 0.5 / concept sim.", ""]
    lines += _gates_table(results["gates"], concepts)
    lines += ["",
              "![methods](methods.png)", "", "![samples](samples.png)", "",
              f"Samples: one seed per prompt for {concepts[0]}; rows in the order of the table.", "",
              f"### Beta curve ({results['beta_curve']['concept']}, Perfusion, local key-locking)", "",
              "| beta | " + " | ".join(f"tau {t}: fidelity / alignment" for t in TAUS) + " |",
              "|---|" + "---|" * len(TAUS)]
    curve = results["beta_curve"]
    for i, point in enumerate(curve[str(TAUS[0])]):
        cells = " | ".join(f"{pct(curve[str(t)][i]['fidelity'])} / {pct(curve[str(t)][i]['alignment'])}" for t in TAUS)
        lines.append(f"| {point['beta']} | {cells} |")
    rec = results.get("recommendation")
    lines += ["", (f"Recommended (the highest fidelity whose alignment is at least {DEFAULT_FRACTION:g}x the "
                   "superclass word's, the rule of scripts/evaluate_concept.py): "
                   + (f"beta {rec['beta']}, tau {rec['tau']} ({pct(rec['fidelity'])} / {pct(rec['alignment'])})."
                      if rec else "none; no setting keeps that alignment.")),
              "", "![beta curve](beta_curve.png)", "", "### Two concepts in one prompt", "",
              f"Prompts \"{PAIR_EXAMPLE}\" (and top/bottom, both orders; {s['pair_seeds']} seeds each), "
              "Perfusion with the default multi-concept rule (`--multi named`: at each placeholder only its own "
              "concept edits, elsewhere Appendix B). Every pair of the six toy concepts under every rule, and "
              "each concept beside a plain object of the other's shape: `python -m ldm.toy.pairs` "
              "(reports/toy-pairs).", "", "| concepts | both appear | fidelity (each) | alignment |", "|---|---|---|---|"]
    for pair, r in results["pairs"].items():
        lines.append(f"| {pair} | {pct(r['both'])} | {pct(r['fidelity'])} | {pct(r['alignment'])} |")
    lines += ["", "## Every concept's look, untrained", "",
              "The scorer on each concept's 8 prompts: its own renders through the autoencoder (the ceiling), and "
              "the base model asked for the look in words (a solid colour: its nearest colour word). Per cell: "
              "fidelity, or fidelity / alignment, %.", "",
              "| concept | autoencoder ceiling | the look in words |", "|---|---|---|"]
    for c, r in results["looks"].items():
        words = f"{pct(r['words']['fidelity'])} / {pct(r['words']['alignment'])}"
        lines.append(f"| {c} | {pct(r['ceiling'])} | {words} |")
    lines += ["", "## Concept size and training time", "",
              "| concept | variant | file bytes | training s |", "|---|---|---|---|"]
    for c in concepts:
        for key, t in results["training"][c].items():
            lines.append(f"| {c} | {key} | {t['bytes']:,} | {t['seconds']} |")
    lines += ["", f"Training time is main.py's wall time (model build included) on this machine, "
              f"{s['training_workers']} runs side by side with one thread each; for full_unet, "
              "the Lightning fit alone, and its bytes are the U-Net's weights in float32, which it would have to "
              "store."]
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    with atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1))
    big = torch.nn.functional.interpolate(samples, scale_factor=3, mode="nearest")
    save_labelled_grid(big, out / "samples.png", [str(i + 1) for i in range(samples.shape[0] // len(labels))])
    plot(out, results, labels)
    fewshot.plot(out / "fig9.png", results["narrow"], _mean(results["narrow"]["methods"][SUPERCLASS]))


def plot(out: Path, results: dict, labels: Sequence[str]) -> None:
    import matplotlib

    from ldm.evaluation.plots import plot_tradeoff

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.util import atomic_path

    fig, ax = plt.subplots(figsize=(8, 3.6))
    means = [_mean(results["methods"][label]) for label in labels]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [100 * m["fidelity"] for m in means], 0.4, label="concept fidelity")
    ax.bar([x + 0.2 for x in xs], [100 * m["alignment"] for m in means], 0.4, label="text alignment")
    ax.set_xticks(list(xs), [label.replace(", ", ",\n").replace(" (", "\n(") for label in labels], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Toy world: fidelity and alignment per method (mean over concepts)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "methods.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    first = results["beta_curve"]["concept"]
    plot_tradeoff(out / "beta_curve.png", {f"tau {tau}": results["beta_curve"][str(tau)] for tau in TAUS},
                  "alignment", "fidelity", "text alignment (%)", "concept fidelity (%)", f"beta sweep, {first}",
                  baselines={"superclass word, no concept": results["methods"][SUPERCLASS][first]},
                  recommended={f"tau {results['recommendation']['tau']}": results["recommendation"]}
                  if results.get("recommendation") else {}, scale=100)
