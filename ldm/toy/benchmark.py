"""The toy-world benchmark: does Perfusion do what the paper claims, measured by the scorer?

    python -m ldm.toy.benchmark --out reports/toy-benchmark            # ~40 min on 2 CPU cores
    python -m ldm.toy.benchmark --out /tmp/bench --quick               # smoke version (a minute)

Two regimes, each concept trained with configs/toy/perfusion.yaml (main.py's own training loop):

- few photos of one layout (data/toy/concepts-narrow, the main table; ldm.toy.fewshot): Perfusion
  and the paper's ablations (Fig. 9), each a curve over beta with 95 % intervals;
- layout-covering sets (data/toy/concepts): Perfusion, with trained keys instead of locked ones,
  as textual inversion (the embedding alone) and without the mask.

Every concept is then drawn from a fixed set of prompts never used in training, and the scorer
judges every image:

- concept fidelity: the concept's look (its colour, or pattern and colours) is seen on the object that names it;
- text alignment: every other requested attribute (positions, background, the other object's
  shape and colour) is right.

Per method (the two key-locking modes at sampling included, the superclass word with no concept
as the floor, the look spelled out in words (a combination pretraining never named; for a
solid colour, which has no word, its nearest colour word), and for
reference the whole U-Net fine-tuned on the concept's images, ldm.toy.full_finetune), the
fidelity/alignment curve over beta at tau 0.1 and 0.15, two concepts in one prompt (the default
multi-concept rule; every rule and pair: ldm.toy.pairs), every concept's look untrained (its autoencoder ceiling, and
the base model asked for it in words), concept file size and training time. Writes report.md,
results.json, methods.png, beta_curve.png and samples.png to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ldm.errors import UserError
from ldm.perfusion.gate_settings import DEFAULT_BETA, DEFAULT_TAU
from ldm.evaluation.harness import DEFAULT_FRACTION, Sampling, concepts_loaded, recommend, render, render_concepts, sweep
from ldm.toy import fewshot, full_finetune
from ldm.toy.world import COLOUR_CONCEPTS, CONCEPTS, Scene, SceneObject, caption, look_words
from ldm.util import REPO_ROOT as ROOT

CONFIG = ROOT / "configs/toy/perfusion.yaml"
CONCEPT_DIR = ROOT / "data/toy/concepts"

# Evaluation scenes: the concept (object 0 or 1) in positions, backgrounds and company never used
# in its training captions; the other objects are (colour, shape) pairs of pretraining.
SCENE_SPECS: tuple[tuple, ...] = (
    (("left",), (), None),
    (("top",), (), "gray"),
    (("centre",), (), "checkered"),
    (("bottom",), (), "brown"),
    (("right",), (("circle", "green", "left"),), None),
    (("top",), (("cross", "white", "bottom"),), "black"),
    (("right",), (("triangle", "red", "left"),), "black"),
    (("bottom",), (("square", "yellow", "top"),), None),
)
# past the concept token's sim (about 1) its gate shuts, so the sweep runs on to 1.2, as the showcase's does
BETAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
TAUS = (0.1, 0.15)
BETA, BETA_GLOBAL, TAU = DEFAULT_BETA[False], DEFAULT_BETA[True], DEFAULT_TAU   # the sampling defaults


GATE_PENALTY = 1.0   # the benchmark's gate-penalty variant (not in the paper: see model.params.gate_penalty)


@dataclass(frozen=True)
class Variant:
    """A trained concept variant: model.params.method, whether the loss is masked, where the gated
    edit applies in training (model.params.gate_at) and model.params.gate_penalty."""
    key: str
    method: str
    masks: bool
    gate_at: str = "all"
    gate_penalty: float = 0.0

    @property
    def overrides(self) -> tuple[str, ...]:
        return (f"model.params.method={self.method}", f"data.params.use_masks={self.masks}",
                f"model.params.gate_at={self.gate_at}", f"model.params.gate_penalty={self.gate_penalty}")


VARIANTS = (Variant("perfusion", "perfusion", True), Variant("trained_keys", "trained_keys", True),
            Variant("embedding", "embedding", True), Variant("perfusion_no_mask", "perfusion", False))
# The gate study (`--gate_study`): the same training with sim detached at other tokens, with the edit
# at the concept token only and with the leaked gates penalised.
GATE_STUDY = (Variant("perfusion_detached", "perfusion", True, "all_detached"),
              Variant("perfusion_gate_concept", "perfusion", True, "concept"),
              Variant("perfusion_gate_penalty", "perfusion", True, gate_penalty=GATE_PENALTY))
# Sim and gate at the other tokens at initialisation and after training with each rule.
GATE_ROWS = (("At initialisation (i* = i_super, superclass embedding)", "init"),
             ("Trained with Eq. 3 at every token", "perfusion"),
             ("Trained with sim detached at other tokens", "perfusion_detached"),
             ("Trained with the edit at the concept token only", "perfusion_gate_concept"),
             (f"Trained with the leaked gates penalised (gate_penalty {GATE_PENALTY:g})", "perfusion_gate_penalty"))
NARROW_GATE_ROWS = (("Trained, i* and i_super over the target templates (default)", "perfusion"),
                    ("Trained, i* and i_super over the images' captions", "targets_from_captions"))
SUPERCLASS = "Superclass word, no concept"
WORDS = "The look in words (a solid colour: its nearest colour word), no concept"
FULL_UNET = "Whole U-Net fine-tuned, superclass word (reference)"
# (row label, variant trained, global key-locking at sampling, gate_at at sampling); the last three
# rows load no concept and name the object by NO_CONCEPT[key] (the last one with a fine-tuned U-Net)
METHODS = (
    ("Perfusion, local key-locking", "perfusion", False, "all"),
    ("Perfusion, global key-locking", "perfusion", True, "all"),
    ("Perfusion, sampled with the edit at the concept token only", "perfusion", False, "concept"),
    ("Perfusion, trained with sim detached at other tokens", "perfusion_detached", False, "all"),
    ("Perfusion, edit at the concept token only (training and sampling)", "perfusion_gate_concept", False,
     "concept"),
    (f"Perfusion, trained with the leaked gates penalised (gate_penalty {GATE_PENALTY:g})", "perfusion_gate_penalty",
     False, "all"),
    ("Trained keys (ablation)", "trained_keys", False, "all"),
    ("Embedding only (textual inversion)", "embedding", False, "all"),
    ("Perfusion, no mask in training", "perfusion_no_mask", False, "all"),
    (WORDS, "words", False, "all"),
    (SUPERCLASS, "superclass", False, "all"),
    (FULL_UNET, "full_unet", False, "all"),
)
NO_CONCEPT = {"words": lambda o: look_words(o.look), "superclass": lambda o: o.shape,
              "full_unet": lambda o: o.shape}


def eval_scenes(concept: str, specs: Sequence[tuple] = SCENE_SPECS) -> list[Scene]:
    """One request Scene per spec: the concept at its position, plain objects beside it."""
    scenes = []
    for (position,), others, background in specs:
        objects = [SceneObject.concept(concept, position)] + [SceneObject(s, c, p) for s, c, p in others]
        if position in ("right", "bottom") and others:   # the concept second in the caption, too
            objects.reverse()
        scenes.append(Scene(tuple(objects), background))
    return scenes


def concept_index(scene: Scene) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if o.look != "plain"]


def templates(scenes: Sequence[Scene], nouns_for) -> list[str]:
    """Captions with the concept objects named by `nouns_for(object)` ('{}', '{1}', 'star', ...)."""
    return [caption(s, [nouns_for(o) if o.look != "plain" else None for o in s.objects]) for s in scenes]


def judge(results: Sequence[dict], scenes: Sequence[Scene]) -> dict[str, float]:
    """fidelity: concept objects whose look is right; alignment: all other requested attributes;
    both: images where every concept's look is right."""
    looks, others, both = [], [], []
    for result, scene in zip(results, scenes):
        concepts = concept_index(scene)
        image_looks = [bool(result["objects"][i]["look"]) for i in concepts]
        looks += image_looks
        both.append(all(image_looks))
        for i, obj in enumerate(result["objects"]):
            attrs = ("position",) if i in concepts else ("shape", "colour", "position")
            others += [bool(obj[a]) for a in attrs if obj[a] is not None]
        if result["background"] is not None:
            others.append(bool(result["background"]))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"fidelity": mean(looks), "alignment": mean(others), "both": mean(both), "images": len(results),
            "looks": len(looks), "attributes": len(others)}


def p_above(hits: int, n: int, floor_hits: int, floor_n: int) -> float:
    """One-sided Fisher exact test: the probability of `hits` or more of the pooled successes
    landing in the first group if both groups had the same rate (hypergeometric upper tail)."""
    total = hits + floor_hits
    tail = sum(math.comb(n, k) * math.comb(floor_n, total - k) for k in range(hits, min(n, total) + 1))
    return tail / math.comb(n + floor_n, total)


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


NARROW_METHODS = (   # (row label, fewshot curve, or a variant measured at the default gates)
    ("Perfusion (default settings)", fewshot.Curve()),
    ("Perfusion, global key-locking", fewshot.Curve(global_locking=True)),
    ("Perfusion, i* and i_super over the images' captions", fewshot.Curve("targets_from_captions")),
    ("Trained keys (ablation)", fewshot.Curve("trained_keys")),
    ("Perfusion, no mask in training", fewshot.Curve("no_mask")),
    ("Perfusion, 1 image", fewshot.Curve("one_image")),
    ("Embedding only (textual inversion)", "embedding"),
    (WORDS, "words"), (SUPERCLASS, "superclass"),
    ("Whole U-Net fine-tuned on the same images, superclass word (reference)", "full_unet"),
)


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


PAIR_EXAMPLE = caption(Scene((SceneObject("ring", position="left"), SceneObject("star", position="right"))),
                       nouns=["{1}", "{2}"])


def pair_scenes(a: str, b: str) -> list[Scene]:
    return [Scene((SceneObject.concept(x, p), SceneObject.concept(y, q)), None)
            for x, y in ((a, b), (b, a)) for p, q in (("left", "right"), ("top", "bottom"))]


# ----------------------------------------------------------------------------- report
def _mean(per_concept: dict) -> dict:
    keys = ("fidelity", "alignment", "both")
    return {k: sum(r[k] for r in per_concept.values()) / len(per_concept) for k in keys}


def _looks_seen(per_concept: dict) -> tuple[int, int]:
    """(concept objects whose look was seen, all concept objects), over every concept."""
    return (round(sum(r["fidelity"] * r["looks"] for r in per_concept.values())),
            sum(r["looks"] for r in per_concept.values()))


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


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
        ("autoencoder ceiling >= 95 % for every concept's look", ", ".join(_pct(c) for c in ceiling.values()),
         min(ceiling.values()) >= 0.95),
        ("base model: >= 90 % of requested attributes on held-out prompts", _pct(base["overall"]), base["overall"] >= 0.9),
        ("base model: positions >= 85 %", _pct(base["position"]), base["position"] >= 0.85),
        ("base model: a patterned look in words drawn right >= 70 %",
         ", ".join(_pct(r["fidelity"]) for r in spelled.values()), words >= 0.7),
        ("nouns attend inside their object >= 3x outside", f"{base['noun_localization']:.2f}x",
         base["noun_localization"] >= 3),
        ("median largest gate at another token < 0.1 (Eq. 3 training, default beta/tau)",
         ", ".join(f"{g:.3f}" for g in gate), max(gate) < 0.1),
        ("Perfusion mean fidelity >= 60 %", _pct(p_mean["fidelity"]), p_mean["fidelity"] >= 0.6),
        ("Perfusion fidelity >= 0.8x the whole-U-Net reference", f"{p_mean['fidelity'] / max(full['fidelity'], 1e-9):.2f}x",
         p_mean["fidelity"] >= 0.8 * full["fidelity"]),
        ("every concept's fidelity >= 40 %", _pct(worst), worst >= 0.4),
        ("Perfusion alignment within 5 points of the superclass word's", f"{_pct(p_mean['alignment'])} against "
         f"{_pct(_mean(floor)['alignment'])}", p_mean["alignment"] >= _mean(floor)["alignment"] - 0.05),
        (f"beta sweep ({results['beta_curve'][str(TAU)][0]['beta']:g} to "
         f"{results['beta_curve'][str(TAU)][-1]['beta']:g}, tau {TAU}) spans >= 30 points of fidelity", f"{_pct(max(curve) - min(curve))} points",
         max(curve) - min(curve) >= 0.3),
        ("two concepts in one prompt both present >= 50 %", _pct(sum(both) / len(both)), sum(both) / len(both) >= 0.5),
    ]


def narrow_checks(results: dict) -> list[tuple[str, str, bool]]:
    """(what, measured, holds) for the few-shot regime at the default settings."""
    methods = results["narrow"]["methods"]
    labels = [label for label, _ in NARROW_METHODS]
    perfusion, floor, full = (_mean(methods[label]) for label in (labels[0], SUPERCLASS, labels[-1]))
    worst = min(r["fidelity"] for r in methods[labels[0]].values())
    return [
        ("Perfusion mean fidelity in new contexts >= 70 %", _pct(perfusion["fidelity"]), perfusion["fidelity"] >= 0.7),
        ("every concept's fidelity >= 50 %", _pct(worst), worst >= 0.5),
        ("Perfusion alignment within 5 points of the superclass word's",
         f"{_pct(perfusion['alignment'])} against {_pct(floor['alignment'])}",
         perfusion["alignment"] >= floor["alignment"] - 0.05),
        ("Perfusion fidelity >= 0.8x the whole U-Net fine-tuned on the same images",
         f"{perfusion['fidelity'] / max(full['fidelity'], 1e-9):.2f}x ({_pct(full['fidelity'])})",
         perfusion["fidelity"] >= 0.8 * full["fidelity"]),
    ]


def _methods_table(per_label: dict, concepts: Sequence[str]) -> list[str]:
    lines = ["| method | " + " | ".join(concepts) + " | mean fidelity | mean alignment |",
             "|---|" + "---|" * (len(concepts) + 2)]
    for label, per in per_label.items():
        m = _mean(per)
        cells = " | ".join(f"{_pct(per[c]['fidelity'])} / {_pct(per[c]['alignment'])}" for c in concepts)
        lines.append(f"| {label} | {cells} | **{_pct(m['fidelity'])}** | {_pct(m['alignment'])} |")
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
                 + " | ".join(_pct(c) for c in ceiling) + f" | {_pct(sum(ceiling) / len(ceiling))} | |")
    perfusion = _mean(results["methods"][labels[0]])["fidelity"]
    floor = _mean(results["methods"][SUPERCLASS])["fidelity"]
    counts = [_looks_seen(results["methods"][label]) for label in (labels[0], SUPERCLASS)]
    lines += ["", f"Perfusion's fidelity {_pct(perfusion)}% against {_pct(floor)}% for the superclass word alone: "
              f"looks seen {counts[0][0]} of {counts[0][1]} against {counts[1][0]} of {counts[1][1]}; one-sided "
              f"Fisher exact p = {p_above(*counts[0], *counts[1]):.2g}.", "",
              "### Checks", "", "| check | measured | holds |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {'yes' if ok else '**no**'} |" for what, value, ok in checks(results, labels)]
    base = results["base_model"]
    lines += ["", "### Base model", "",
              f"`python -m ldm.toy.evaluate` on the {base['prompts']} held-out prompts x {base['seeds']} seeds: "
              + ", ".join(f"{k} {_pct(base[k])}%" for k in ("shape", "colour", "position", "background", "overall")
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
        cells = " | ".join(f"{_pct(curve[str(t)][i]['fidelity'])} / {_pct(curve[str(t)][i]['alignment'])}" for t in TAUS)
        lines.append(f"| {point['beta']} | {cells} |")
    rec = results.get("recommendation")
    lines += ["", (f"Recommended (the highest fidelity whose alignment is at least {DEFAULT_FRACTION:g}x the "
                   "superclass word's, the rule of scripts/evaluate_concept.py): "
                   + (f"beta {rec['beta']}, tau {rec['tau']} ({_pct(rec['fidelity'])} / {_pct(rec['alignment'])})."
                      if rec else "none; no setting keeps that alignment.")),
              "", "![beta curve](beta_curve.png)", "", "### Two concepts in one prompt", "",
              f"Prompts \"{PAIR_EXAMPLE}\" (and top/bottom, both orders; {s['pair_seeds']} seeds each), "
              "Perfusion with the default multi-concept rule (`--multi named`: at each placeholder only its own "
              "concept edits, elsewhere Appendix B). Every pair of the six toy concepts under every rule, and "
              "each concept beside a plain object of the other's shape: `python -m ldm.toy.pairs` "
              "(reports/toy-pairs).", "", "| concepts | both appear | fidelity (each) | alignment |", "|---|---|---|---|"]
    for pair, r in results["pairs"].items():
        lines.append(f"| {pair} | {_pct(r['both'])} | {_pct(r['fidelity'])} | {_pct(r['alignment'])} |")
    lines += ["", "## Every concept's look, untrained", "",
              "The scorer on each concept's 8 prompts: its own renders through the autoencoder (the ceiling), and "
              "the base model asked for the look in words (a solid colour: its nearest colour word). Per cell: "
              "fidelity, or fidelity / alignment, %.", "",
              "| concept | autoencoder ceiling | the look in words |", "|---|---|---|"]
    for c, r in results["looks"].items():
        words = f"{_pct(r['words']['fidelity'])} / {_pct(r['words']['alignment'])}"
        lines.append(f"| {c} | {_pct(r['ceiling'])} | {words} |")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "reports/toy-benchmark"), help="report folder (training runs go to OUT/runs)")
    p.add_argument("--concepts", default=",".join(COLOUR_CONCEPTS),
                   help="comma-separated, of " + ", ".join(CONCEPTS) + " (default: %(default)s)")
    p.add_argument("--train_steps", type=int, default=None, help="default: the config's max_steps")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=2,
                   help="concepts trained side by side, in processes of one thread each (default: %(default)s)")
    p.add_argument("--gate_study", action="store_true",
                   help="also train the covering sets with sim detached at other tokens, with the edit at the concept "
                        "token only and with the leaked gates penalised")
    p.add_argument("--quick", action="store_true",
                   help="smoke version: 2 concepts, 2 training steps, 3 prompts, 1 seed, 2 sampling steps, 2 betas")
    args = p.parse_args(argv)
    for flag in ("train_steps", "seeds", "sample_steps", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be a positive whole number, got {value}")
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown or not concepts:
        raise UserError(f"--concepts {args.concepts!r}: expected names from {', '.join(CONCEPTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    specs, betas, narrow_betas = SCENE_SPECS, BETAS, fewshot.BETAS
    if args.quick:
        concepts, specs, betas, narrow_betas = concepts[:2], SCENE_SPECS[3:6], BETAS[2:4], (BETA_GLOBAL, BETA)
        args.train_steps, args.seeds, args.sample_steps = 2, 1, 2
    results = run(Path(args.out), concepts, args.train_steps, args.seeds, args.sample_steps, specs, betas,
                  finetune_steps=2 if args.quick else full_finetune.STEPS, narrow_betas=narrow_betas,
                  gate_study=args.gate_study, workers=args.workers)
    m = {f"narrow {label}": per for label, per in results["narrow"]["methods"].items()} | results["methods"]
    print(f"report: {Path(args.out) / 'report.md'} ({results['seconds'] / 60:.1f} min); mean fidelity: "
          + ", ".join(f"{label} {_pct(_mean(per)['fidelity'])}%" for label, per in m.items()))
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
