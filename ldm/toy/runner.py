"""The toy benchmark's runner: trains every variant with main.py's loop (two at a time, one thread
each), then draws and judges every method, curve and pair of ldm.toy.experiment."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ldm.evaluation.harness import (DEFAULT_FRACTION, Sampling, concepts_loaded, recommend, render, render_concepts,
                                    sweep)
from ldm.toy import fewshot, full_finetune
from ldm.toy.experiment import (BETA, BETA_GLOBAL, CONCEPT_DIR, CONFIG, GATE_ROWS, GATE_STUDY, METHODS,
                                NARROW_GATE_ROWS, NARROW_METHODS, NO_CONCEPT, SUPERCLASS, TAU, TAUS, VARIANTS, WORDS,
                                eval_scenes, judge, pair_scenes, templates)
from ldm.toy.report import write_report
from ldm.toy.world import CONCEPTS, Scene
from ldm.util import REPO_ROOT as ROOT


class Bench:
    """The base model, scorer and sampling settings shared by every measurement."""

    def __init__(self, seeds: int, steps: int, scale: float = 4.0):
        from ldm.build import build_model, load_config
        from ldm.toy.scorer import Scorer

        config = load_config([CONFIG])
        self.model = build_model(config, ckpt=config.model.ckpt)
        self.model.ensure_covariance()
        self.scorer = Scorer.load(ROOT / "ckpt/toy/scorer.safetensors")
        self.seeds, self.steps, self.scale = seeds, steps, scale
        self.sampling = Sampling(steps, scale, "ddim", 32, 32, batch=64)

    @torch.no_grad()
    def autoencoder_ceiling(self, scenes: Sequence[Scene]) -> dict:
        """The generator's own renders of `scenes` passed through the first stage (encode, decode):
        the highest fidelity any method can reach through this autoencoder (a request that names no
        background is drawn on black)."""
        from dataclasses import replace

        from ldm.toy.train_scorer import render_set

        drawn = render_set([replace(s, background=s.background or "black") for s in scenes])
        z = self.model.encode_first_stage(drawn.float() / 127.5 - 1.0, sample=False)
        images = ((self.model.decode_first_stage(z).clamp(-1, 1) + 1) / 2).cpu()
        return judge(self.scorer.score(images, scenes), scenes)

    def score(self, prompts: Sequence[str], scenes: Sequence[Scene], model=None,
              seeds: int | None = None) -> tuple[dict, torch.Tensor]:
        """Render each prompt with seeds 0 .. seeds - 1 (default: self.seeds) with `model` (default: the
        base model), judge against its scene (the evaluation harness renders, as for
        scripts/evaluate_concept.py)."""
        images = render(model or self.model, prompts, range(seeds or self.seeds), self.sampling)
        return self.verdict(images, scenes, seeds), images

    def verdict(self, images: torch.Tensor, scenes: Sequence[Scene], seeds: int | None = None) -> dict:
        """The scorer's verdict on `seeds` (default: self.seeds) renders per scene (prompt-major, as the
        harness renders)."""
        requests = [s for s in scenes for _ in range(seeds or self.seeds)]
        return judge(self.scorer.score(images, requests), requests)

    def measure(self, concepts: Sequence[Path], scenes: Sequence[Scene], nouns_for, beta=BETA, tau=TAU,
                global_locking: bool = False, gate_at: str = "all", seeds: int | None = None,
                **options) -> tuple[dict, torch.Tensor]:
        """Load `concepts` (none: the base model), render the scenes' captions with `seeds` (default:
        self.seeds) each, judge them; `options` go to load_concepts."""
        prompts = templates(scenes, nouns_for)
        if not concepts:
            return self.score(prompts, scenes, seeds=seeds)
        images = render_concepts(self.model, concepts, prompts, range(seeds or self.seeds), self.sampling,
                                 beta, tau, global_locking=global_locking, gate_at=gate_at, **options)
        return self.verdict(images, scenes, seeds), images

    def gates(self, concept, scenes: Sequence[Scene]) -> dict[str, float]:
        """At BETA/TAU, over the scenes' prompts: the median of the largest gate at a token other than
        the concept's, the mean number of such tokens above 0.5, and the concept token's mean sim."""
        from statistics import median

        from ldm.perfusion.gates import gate_tables
        from ldm.perfusion.prompts import prepare_prompt

        with concepts_loaded(self.model, [concept], BETA, TAU) as loaded:
            tokenizer = self.model.cond_stage_model.tokenizer
            tables = gate_tables(self.model, [prepare_prompt(tokenizer, p, loaded)
                                              for p in templates(scenes, lambda o: "{}")])
        others = [[t.gate[k][0] for k in t.others()] for t in tables]
        own_sim = [t.sim[k][0] for t in tables for k in t.owned()]
        other_sim = [max(t.sim[k][0] for k in t.others()) for t in tables]
        return {"median_max_other_gate": median(max(o) for o in others),
                "others_open": sum(sum(g > 0.5 for g in o) for o in others) / len(others),
                "concept_sim": sum(own_sim) / len(own_sim), "median_max_other_sim": median(other_sim)}

    def initial_concept(self, trained_file: Path):
        """The concept as training starts: i* = i_super and the superclass word's embedding."""
        from dataclasses import replace

        from ldm.perfusion.concepts import load_concept
        from ldm.perfusion.model import superclass_embedding
        from ldm.perfusion.prompts import superclass_token_ids

        concept = load_concept(trained_file)
        encoder = self.model.cond_stage_model
        ids = superclass_token_ids(encoder.tokenizer, concept.superclass)
        return replace(concept, i_star=concept.i_super, embedding=superclass_embedding(encoder, ids).detach().cpu())

    def base_model(self, seeds: int = 3) -> dict:
        """Prompt-following on the held-out prompts (`seeds` renders each) and the nouns' attention
        localization on the one-object ones."""
        from ldm.toy.evaluate import noun_localization, prompt_accuracy
        from ldm.toy.world import held_out_scenes

        scenes = held_out_scenes()
        runs = [prompt_accuracy(self.model, self.scorer, scenes, steps=self.steps, scale=self.scale, seed=100 * k)
                for k in range(seeds)]
        accuracy = {a: sum(r[a] for r in runs) / seeds for a in runs[0] if runs[0][a] == runs[0][a]}
        return {"prompts": len(scenes), "seeds": seeds, **accuracy,
                "noun_localization": noun_localization(self.model, scenes)}


def train_concept(name: str, run_name: str, overrides: Sequence[str], steps: int, logdir: Path,
                  data: Path = CONCEPT_DIR) -> tuple[Path, float]:
    """Train on `data`/`name` with main.py's loop and `overrides`; returns (concept file, wall seconds)."""
    from ldm import train

    info = CONCEPTS[name]
    overrides = [f"data.params.data_root={data / name}", f"model.params.superclass={info.shape}", *overrides,
                 "lightning.callbacks.image_logger.every_n_steps=1000000", f"lightning.trainer.max_steps={steps}"]
    start = time.perf_counter()
    trainer = train.run(["--base", str(CONFIG), "-t", "--name", f"{name}-{run_name}", "--logdir", str(logdir),
                        *overrides])
    seconds = time.perf_counter() - start
    return Path(trainer.default_root_dir) / "concepts" / "last.safetensors", seconds


def _one_thread() -> None:
    torch.set_num_threads(1)


def train_all(jobs: dict[tuple[str, str], tuple], workers: int, log=print) -> dict[tuple[str, str], tuple[Path, float]]:
    """train_concept(*args) for every job, in `workers` processes of one torch thread each (the toy
    model is too small to keep two threads busy: two one-thread runs side by side finish 1.6x sooner
    than one after the other with two threads); key -> (concept file, wall seconds)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers == 1:
        done = {key: train_concept(*args) for key, args in jobs.items()}
    else:
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
            futures = {key: pool.submit(train_concept, *args) for key, args in jobs.items()}
            done = {key: future.result() for key, future in futures.items()}
    for (name, key), (_, seconds) in done.items():
        log(f"trained {name} / {key} in {seconds:.0f} s")
    return done


def run(out: Path, concepts: Sequence[str], train_steps: int | None, seeds: int, sample_steps: int,
        specs: Sequence[tuple], betas: Sequence[float], finetune_steps: int = full_finetune.STEPS,
        narrow_betas: Sequence[float] = fewshot.BETAS, gate_study: bool = False, workers: int = 2,
        log=print) -> dict:
    from ldm.build import load_config

    train_steps = train_steps or int(load_config([CONFIG]).lightning.trainer.max_steps)
    out.mkdir(parents=True, exist_ok=True)
    logdir = out / "runs"
    started = time.perf_counter()
    variants = VARIANTS + (GATE_STUDY if gate_study else ())
    methods_used = [m for m in METHODS if m[1] in {v.key for v in variants} | set(NO_CONCEPT)]
    gate_rows = [g for g in GATE_ROWS if g[1] in {v.key for v in variants} | {"init"}]
    files: dict[str, dict[str, Path]] = {c: {} for c in concepts}
    narrow_files: dict[str, dict[str, Path]] = {c: {} for c in concepts}
    narrow_data = {variant.key: fewshot.data_dir(out, variant) for variant in fewshot.VARIANTS}
    jobs, destination = {}, {}   # (concept, label) -> train_concept's arguments; -> (files table, variant key)
    for name in concepts:
        for variant in fewshot.VARIANTS:
            label = f"narrow {variant.key}"
            jobs[name, label] = (name, f"narrow-{variant.key}", variant.overrides, train_steps, logdir,
                                 narrow_data[variant.key])
            destination[name, label] = narrow_files, variant.key
        for variant in variants:
            jobs[name, variant.key] = (name, variant.key, variant.overrides, train_steps, logdir)
            destination[name, variant.key] = files, variant.key
    training = {c: {} for c in concepts}
    for (name, label), (path, seconds) in train_all(jobs, workers, log).items():
        table, key = destination[name, label]
        table[name][key] = path
        training[name][label] = {"seconds": round(seconds, 1), "bytes": path.stat().st_size}

    bench = Bench(seeds, sample_steps)
    base = bench.base_model(seeds=1 if seeds == 1 else 3)
    log(f"measured the base model: {base}")
    methods: dict[str, dict] = {label: {} for label, *_ in methods_used}
    gates: dict[str, dict] = {label: {} for label, _ in gate_rows}
    samples = []
    for name in concepts:
        scenes = eval_scenes(name, specs)
        for label, key in gate_rows:
            concept = bench.initial_concept(files[name]["perfusion"]) if key == "init" else files[name][key]
            gates[label][name] = bench.gates(concept, scenes)
        for label, key, global_locking, gate_at in methods_used:
            if key == "full_unet":
                result, images = finetuned(bench, CONCEPT_DIR, name, scenes, finetune_steps, training[name], key)
                log(f"fine-tuned the whole U-Net on {name} in {training[name][key]['seconds']:.0f} s")
            elif key in NO_CONCEPT:
                result, images = bench.measure([], scenes, NO_CONCEPT[key])
            else:
                result, images = bench.measure([files[name][key]], scenes, lambda o: "{}",
                                               BETA_GLOBAL if global_locking else BETA, TAU, global_locking, gate_at)
            methods[label][name] = result
            if name == concepts[0]:
                samples.append(images[::bench.seeds])
        log(f"measured the methods on {name}")
    # every concept's look, trained in this run or not: through the autoencoder, and spelled in words
    # (for the concepts trained here, the methods' row of the look in words)
    looks = {}
    for name in CONCEPTS:
        scenes = eval_scenes(name, specs)
        words = methods[WORDS][name] if name in concepts else bench.measure([], scenes, NO_CONCEPT["words"])[0]
        looks[name] = {"ceiling": bench.autoencoder_ceiling(scenes)["fidelity"], "words": words}
    log("measured every concept's look without training")

    first = concepts[0]
    curve = {str(tau): sweep([(beta, tau) for beta in betas], lambda b, t: bench.measure(
        [files[first]["perfusion"]], eval_scenes(first, specs), lambda o: "{}", b, t)[0]) for tau in TAUS}
    recommended = recommend([p for points in curve.values() for p in points],
                            methods[SUPERCLASS][first]["alignment"], DEFAULT_FRACTION)
    log(f"measured the beta curve on {first}; recommended: {recommended and (recommended['beta'], recommended['tau'])}")

    # as many images per pair as per concept: len(specs) prompts x seeds
    pair_seeds = max(1, seeds * len(specs) // len(pair_scenes(first, first)))
    pairs = {}   # with the default multi-concept rule; every rule, every pair of the six: ldm.toy.pairs
    for a, b in [(concepts[i], concepts[j]) for i in range(len(concepts)) for j in range(i + 1, len(concepts))]:
        number = {a: "{1}", b: "{2}"}
        pairs[f"{a} + {b}"] = bench.measure([files[a]["perfusion"], files[b]["perfusion"]], pair_scenes(a, b),
                                            lambda o: number[o.look], BETA, TAU, seeds=pair_seeds)[0]
    log("measured two concepts per prompt")
    narrow = measure_narrow(bench, narrow_files, concepts, specs, narrow_betas, methods, finetune_steps, training,
                            log)

    results = {
        "settings": {"concepts": list(concepts), "seeds": seeds, "pair_seeds": pair_seeds,
                     "train_steps": train_steps, "finetune_steps": finetune_steps,
                     "finetune_learning_rate": full_finetune.LEARNING_RATE,
                     "sample_steps": sample_steps, "guidance": bench.scale, "prompts": len(specs),
                     "beta": BETA, "beta_global": BETA_GLOBAL, "tau": TAU, "threads": torch.get_num_threads(),
                     "training_workers": workers,
                     "narrow_images": len(list((fewshot.NARROW_DIR / concepts[0]).glob("*.png"))),
                     "looks_per_point": seeds * len(specs) * len(concepts)},
        "narrow": narrow, "base_model": base, "looks": looks, "gates": gates, "methods": methods,
        "beta_curve": {"concept": first, **curve},
        "recommendation": recommended,
        "pairs": pairs, "training": training,
        "prompts": templates(eval_scenes(first, specs), lambda o: "{}"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(out, results, torch.cat(samples), [label for label, *_ in methods_used])
    return results


def finetuned(bench: Bench, data: Path, name: str, scenes: Sequence[Scene], steps: int, training: dict,
              key: str) -> tuple[dict, torch.Tensor]:
    """The whole-U-Net reference fine-tuned on `data`/`name`, judged on `scenes`; its time and size go
    to `training`[`key`]."""
    model, seconds = full_finetune.finetune(data / name, CONCEPTS[name].shape, steps)
    training[key] = {"seconds": round(seconds, 1),
                     "bytes": sum(p.numel() * p.element_size() for p in model.model.parameters())}
    return bench.score(templates(scenes, NO_CONCEPT["full_unet"]), scenes, model)



def measure_narrow(bench: Bench, files: dict, concepts: Sequence[str], specs, betas: Sequence[float],
                   covering_methods: dict, finetune_steps: int, training: dict, log=print) -> dict:
    """The few-shot regime: every fewshot curve over `betas`, the methods table at the default gates
    (the rows without a concept are the covering regime's, which no training touched) and the gates."""
    curves = {}
    for curve in fewshot.curves():
        points = []
        for beta in betas:
            per = {name: bench.measure([files[name][curve.variant]], eval_scenes(name, specs), lambda o: "{}", beta,
                                       curve.tau, curve.global_locking)[0] for name in concepts}
            points.append({"beta": beta, "tau": curve.tau, **fewshot.pooled(per), "per_concept": per})
        curves[fewshot.curve_key(curve)] = points
        log(f"measured the narrow curve {fewshot.curve_key(curve)}")
    methods = {}
    for label, source in NARROW_METHODS:
        if isinstance(source, fewshot.Curve):
            beta = BETA_GLOBAL if source.global_locking else BETA
            methods[label] = next(p for p in curves[fewshot.curve_key(source)] if p["beta"] == beta)["per_concept"]
            continue
        methods[label] = {}
        for name in concepts:
            scenes = eval_scenes(name, specs)
            if source == "full_unet":
                methods[label][name] = finetuned(bench, fewshot.NARROW_DIR, name, scenes, finetune_steps,
                                                 training[name], "narrow full_unet")[0]
            elif source == "embedding":
                methods[label][name] = bench.measure([files[name][source]], scenes, lambda o: "{}")[0]
            else:
                methods[label][name] = covering_methods[{"words": WORDS, "superclass": SUPERCLASS}[source]][name]
    gates = {label: {name: bench.gates(files[name][key], eval_scenes(name, specs)) for name in concepts}
             for label, key in NARROW_GATE_ROWS}
    log("measured the narrow regime's methods and gates")
    return {"curves": curves, "methods": methods, "gates": gates, "betas": list(betas)}
