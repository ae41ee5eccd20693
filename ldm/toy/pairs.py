"""Two concepts in one model, every pair of the six toy concepts, under each multi-concept rule.

    python -m ldm.toy.pairs --out reports/toy-pairs          # ~15 min on 2 CPU cores
    python -m ldm.toy.pairs --out /tmp/pairs --quick --concepts magenta_square,polka_dot_square   # smoke

The concepts are the shipped ones (ckpt/toy/concepts: the toy benchmarks' layout-covering Perfusion
concepts); nothing is trained. For each pair (a, b), loaded as {1} and {2}, and each rule of
`ldm.perfusion.edit.MULTI`:

- both named, each in its place ("on the left a {1} and on the right a {2}", top/bottom, both orders):
  both looks right in one image, each look, and the positions;
- one named beside a plain white object of the other's shape ("... a {1} ... a white square"): the
  unnamed concept's look on the plain object must not appear, and the named one must keep the look it
  has when loaded alone (same prompts, same seeds);
- the gates over those prompts: at each placeholder its own gate and the other concept's, the tokens
  other than the placeholders whose gate opens, and in the one-named prompts the unnamed concept's
  largest gate;
- the conditioning of G = I C^-1 I^T (normalised to unit diagonal), which the joint rule inverts.
"""
from __future__ import annotations

import argparse
import json
import time
from itertools import combinations
from pathlib import Path
from typing import Sequence

import torch

from ldm.errors import UserError
from ldm.evaluation.harness import concepts_loaded
from ldm.perfusion.edit import MULTI
from ldm.toy.experiment import BETA, TAU, p_above, pair_scenes, templates
from ldm.toy.fewshot import pct
from ldm.toy.runner import Bench
from ldm.toy.world import CONCEPTS, Scene, SceneObject
from ldm.util import REPO_ROOT as ROOT

CONCEPT_DIR = ROOT / "ckpt/toy/concepts"
ARRANGEMENTS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
DEFAULT_RULE = MULTI[0]


def one_named_scenes(named: str, other: str) -> tuple[list[Scene], list[Scene]]:
    """(requests, leak probes): `named` beside a plain white object of `other`'s shape, and the same
    scenes with that object as `other` (whose look verdict says whether `other` was drawn there)."""
    shape = CONCEPTS[other].shape
    requests = [Scene((SceneObject.concept(named, p), SceneObject(shape, "white", q))) for p, q in ARRANGEMENTS]
    probes = [Scene((SceneObject.concept(named, p), SceneObject.concept(other, q))) for p, q in ARRANGEMENTS]
    return requests, probes


def conditioning(files: Sequence[Path], C_inv: torch.Tensor) -> tuple[float, float]:
    """(C^-1-correlation of the two i*, condition number of G normalised to unit diagonal)."""
    from ldm.perfusion.concepts import load_concept
    from ldm.perfusion.inference import i_star_correlations

    corr = i_star_correlations([load_concept(f) for f in files], C_inv)
    return float(corr[0, 1]), float(torch.linalg.cond(corr))


def gate_figures(bench: Bench, files: Sequence[Path], rule: str, both: Sequence[str], one: dict[int, Sequence[str]]
                 ) -> dict:
    """Over the both-named prompts: each placeholder's own gate and the other concept's gate there (means),
    and the tokens that are no placeholder with a gate above 0.5 (per prompt); over the one-named prompts,
    the unnamed concept's largest gate (mean)."""
    from ldm.perfusion.gates import gate_tables
    from ldm.perfusion.prompts import prepare_prompt

    with concepts_loaded(bench.model, list(files), BETA, TAU, multi=rule) as loaded:
        tok = bench.model.cond_stage_model.tokenizer
        tables = gate_tables(bench.model, [prepare_prompt(tok, p, loaded) for p in both])
        unnamed = {n: gate_tables(bench.model, [prepare_prompt(tok, p, loaded) for p in prompts])
                   for n, prompts in one.items()}
    own, cross, stray = [], [], []
    for t in tables:
        for n in (0, 1):
            own += [t.gate[k][n] for k in t.owned(n)]
            cross += [t.gate[k][1 - n] for k in t.owned(n)]
        stray.append(sum(max(g) > 0.5 for g, o in zip(t.gate, t.own) if not any(o)))
    leak = [max(t.gate[k][1 - n] for k in range(len(t.tokens))) for n, ts in unnamed.items() for t in ts]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"own_gate": mean(own), "cross_gate": mean(cross), "stray_open": mean(stray), "unnamed_max_gate": mean(leak)}


def seen(bench: Bench, images: torch.Tensor, scenes: Sequence[Scene], seeds: int, index: int) -> float:
    """Share of images (`seeds` per scene, prompt-major) whose object `index` shows its requested look."""
    requests = [s for s in scenes for _ in range(seeds)]
    return sum(bool(r["objects"][index]["look"]) for r in bench.scorer.score(images, requests)) / len(requests)


def measure_pair(bench: Bench, files: dict[str, Path], a: str, b: str, rules: Sequence[str], seeds: int) -> dict:
    """Every figure of one pair under each rule (see the module's docstring)."""
    pair = [files[a], files[b]]
    number = {a: "{1}", b: "{2}"}
    both = pair_scenes(a, b)
    one = {named: one_named_scenes(named, other) for named, other in ((a, b), (b, a))}
    corr, cond = conditioning(pair, bench.model.bank.C_inv)
    result = {"correlation": corr, "cond_G": cond, "same_superclass": CONCEPTS[a].shape == CONCEPTS[b].shape,
              "alone": {}, "rules": {}}
    for named, (requests, _) in one.items():   # the named concept loaded alone: the look it keeps
        result["alone"][named] = bench.measure([files[named]], requests, lambda o: "{}", BETA, TAU, seeds=seeds)[0]
    for rule in rules:
        figures = {"both": bench.measure(pair, both, lambda o: number[o.look], BETA, TAU, seeds=2 * seeds,
                                         multi=rule)[0]}
        for named, (requests, probes) in one.items():
            verdict, images = bench.measure(pair, requests, lambda o: number[o.look], BETA, TAU, seeds=seeds,
                                            multi=rule)
            alone = result["alone"][named]["fidelity"]
            figures[named] = {**verdict, "unnamed_seen": seen(bench, images, probes, seeds, 1),
                              "vs_alone": verdict["fidelity"] / alone if alone else float("nan")}
        figures["gates"] = gate_figures(bench, pair, rule, templates(both, lambda o: number[o.look]),
                                        {n: templates(one[name][0], lambda o: number[o.look])
                                         for n, name in enumerate((a, b))})
        result["rules"][rule] = figures
    return result


def run(out: Path, files: dict[str, Path], rules: Sequence[str], seeds: int, sample_steps: int, log=print) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(seeds, sample_steps)
    pairs = {}
    for a, b in combinations(files, 2):
        pairs[f"{a} + {b}"] = measure_pair(bench, files, a, b, rules, seeds)
        log(f"measured {a} + {b}")
    results = {"settings": {"concepts": list(files), "rules": list(rules), "seeds": seeds, "sample_steps": sample_steps,
                            "guidance": bench.scale, "beta": BETA, "tau": TAU, "threads": torch.get_num_threads()},
               "pairs": pairs, "seconds": round(time.perf_counter() - started, 1)}
    write_report(out, results)
    return results


# ----------------------------------------------------------------------------- report
def summary(pair: dict, rule: str) -> dict:
    """One pair under one rule: both present; the unnamed look on the plain object and the named look
    against alone, over both directions (the worse direction for the latter)."""
    figures = pair["rules"][rule]
    named = [k for k in figures if k not in ("both", "gates")]
    return {"both": figures["both"]["both"],
            "unnamed_seen": sum(figures[k]["unnamed_seen"] for k in named) / len(named),
            "vs_alone": min(figures[k]["vs_alone"] for k in named)}


def checks(results: dict, rule: str = DEFAULT_RULE, before: str = "joint") -> list[tuple[str, str, bool]]:
    """(what, measured, holds): the bars the default rule must clear; `before` is the rule it replaced."""
    pairs = results["pairs"]
    same = {k: summary(p, rule) for k, p in pairs.items() if p["same_superclass"]}
    out = []
    if same:
        out += [
            ("same superclass: unnamed concept on the plain object <= 5 % (each pair)",
             ", ".join(pct(s["unnamed_seen"]) for s in same.values()), max(s["unnamed_seen"] for s in same.values()) <= 0.05),
            ("same superclass: named concept >= 0.9x its look alone (each pair, each direction)",
             ", ".join(f"{s['vs_alone']:.2f}x" for s in same.values()), min(s["vs_alone"] for s in same.values()) >= 0.9),
            ("same superclass: both present >= 50 % (each pair)",
             ", ".join(pct(s["both"]) for s in same.values()), min(s["both"] for s in same.values()) >= 0.5)]
    if before in results["settings"]["rules"] and before != rule:
        other = [k for k, p in pairs.items() if not p["same_superclass"]]
        worse = [k for k in other if summary(pairs[k], rule)["both"] < summary(pairs[k], before)["both"]]
        out.append((f"other pairs: both present at least as often as with {before}",
                    f"{len(other) - len(worse)} of {len(other)}" + (f" (not: {', '.join(worse)})" if worse else ""),
                    not worse))
        # is `before` ahead by more than chance? (one-sided Fisher exact test on the images with both looks)
        p = {k: p_above(*_both_hits(pairs[k], before), *_both_hits(pairs[k], rule)) for k in other}
        low = min(p, key=p.get)
        out.append((f"other pairs: none significantly below {before} (one-sided Fisher exact p < 0.05)",
                    f"smallest p {p[low]:.2f} ({low})", p[low] >= 0.05))
    return out


def _both_hits(pair: dict, rule: str) -> tuple[int, int]:
    both = pair["rules"][rule]["both"]
    return round(both["both"] * both["images"]), both["images"]


def write_report(out: Path, results: dict) -> None:
    from ldm.util import atomic_path

    s, pairs, rules = results["settings"], results["pairs"], results["settings"]["rules"]
    lines = ["# Two concepts in one model: every pair, every rule", "",
             f"`python -m ldm.toy.pairs` — {len(s['concepts'])} shipped toy concepts (ckpt/toy/concepts), "
             f"{len(pairs)} pairs; beta {s['beta']}, tau {s['tau']}, DDIM {s['sample_steps']} steps, guidance "
             f"{s['guidance']}; {s['threads']} CPU threads; {results['seconds'] / 60:.1f} min in all.", "",
             f"Both named: 4 prompts (left/right and top/bottom, both orders) x {2 * s['seeds']} seeds. One named: "
             f"4 prompts x {s['seeds']} seeds per direction, the other concept's shape drawn as a plain white object "
             "beside it. Rules (`--multi`): named (at each placeholder only its own concept edits, elsewhere "
             "Appendix B; not in the paper), separate (Appendix B as written, the paper's rule), joint (gates "
             "from the exact projection's coordinates; not in the paper), approx (the authors' approximation).", "",
             "## Checks (default rule: " + DEFAULT_RULE + ")", "", "| check | measured | holds |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {'yes' if ok else '**no**'} |" for what, value, ok in checks(results)]
    lines += ["", "## Means over pairs", "",
              "Per cell: both present / unnamed concept on the plain object / named concept against alone "
              "(fidelity ratio, the worse direction), %, %, x.", "",
              "| pairs | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for kind, same in (("same superclass", True), ("different superclass", False)):
        chosen = [p for p in pairs.values() if p["same_superclass"] == same]
        if not chosen:
            continue
        cells = []
        for rule in rules:
            m = [summary(p, rule) for p in chosen]
            cells.append(f"{pct(sum(x['both'] for x in m) / len(m))} / {pct(sum(x['unnamed_seen'] for x in m) / len(m))}"
                         f" / {sum(x['vs_alone'] for x in m) / len(m):.2f}x")
        lines.append(f"| {kind} ({len(chosen)}) | " + " | ".join(cells) + " |")
    lines += ["", "## Every pair", "",
              "corr: the two i*'s C^-1-correlation; cond: the condition number of G (unit diagonal). Per rule: both "
              "present / unnamed on the plain object / named against alone.", "",
              "| pair | corr | cond | " + " | ".join(rules) + " |", "|---|---|---|" + "---|" * len(rules)]
    for name, p in pairs.items():
        mark = " (same superclass)" if p["same_superclass"] else ""
        cells = " | ".join("{} / {} / {:.2f}x".format(pct(x["both"]), pct(x["unnamed_seen"]), x["vs_alone"])
                           for x in (summary(p, r) for r in rules))
        lines.append(f"| {name}{mark} | {p['correlation']:.3f} | {p['cond_G']:.1f} | {cells} |")
    lines += ["", "## Gates", "",
              "Per rule: at each placeholder its own gate / the other concept's gate there (means), tokens that are "
              "no placeholder with a gate above 0.5 (per prompt), and in the one-named prompts the unnamed "
              "concept's largest gate (mean).", "",
              "| pair | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for name, p in pairs.items():
        cells = " | ".join("{own_gate:.2f} / {cross_gate:.2f} / {stray_open:.1f} / {unnamed_max_gate:.2f}".format(
            **p["rules"][r]["gates"]) for r in rules)
        lines.append(f"| {name} | {cells} |")
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    with atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "reports/toy-pairs"))
    p.add_argument("--concept_dir", default=str(CONCEPT_DIR), help="folder of <concept name>.safetensors")
    p.add_argument("--concepts", default=",".join(CONCEPTS), help="comma-separated (default: all six)")
    p.add_argument("--rules", default=",".join(MULTI), help="comma-separated, of " + ", ".join(MULTI))
    p.add_argument("--seeds", type=int, default=4, help="images per one-named prompt (both named: twice as many)")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 2 sampling steps")
    args = p.parse_args(argv)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if len(concepts) < 2 or any(c not in CONCEPTS for c in concepts):
        raise UserError(f"--concepts {args.concepts!r}: expected two or more of {', '.join(CONCEPTS)}")
    if not rules or any(r not in MULTI for r in rules):
        raise UserError(f"--rules {args.rules!r}: expected names from {', '.join(MULTI)}")
    if args.seeds < 1 or args.sample_steps < 1:
        raise UserError("--seeds and --sample_steps must be positive whole numbers")
    files = {c: Path(args.concept_dir) / f"{c}.safetensors" for c in concepts}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise UserError(f"--concept_dir {args.concept_dir}: no concept file {missing[0]}")
    if args.quick:
        args.seeds, args.sample_steps = 1, 2
    results = run(Path(args.out), files, rules, args.seeds, args.sample_steps)
    print(f"report: {Path(args.out) / 'report.md'} ({results['seconds'] / 60:.1f} min)")
    for what, value, ok in checks(results):
        print(f"{'ok ' if ok else 'NO '} {what}: {value}")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
