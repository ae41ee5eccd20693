"""One DreamBench subject after another: masks (CLIPSeg) where a folder has none, training through
main.py's loop (ldm.train.run), then renders of its prompts with and without the concept, scored.

Each subject's result goes to OUT/subjects/<name>.json once it is complete; everything bulky (masks
made here, training runs, the concept file, tiny metric models) goes under OUT/runs/, which may be deleted.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ldm.errors import UserError
from ldm.evaluation.concept_eval import Judge, mean, seed_means
from ldm.evaluation.dreambench.subjects import Subject, has_masks, reference_images
from ldm.evaluation.harness import Sampling, render, render_concepts, sweep
from ldm.util import atomic_path

# --metrics: the open_clip architecture of each preset. DreamBench's CLIP is OpenAI's ViT-B/32, which
# was trained with QuickGELU: its weights load into plain ViT-B-32 too, but compute other features there.
PRESETS = {"dreambooth": "ViT-B-32-quickgelu", "vit-l-14": "ViT-L-14", "tiny": None}


@dataclass(frozen=True)
class Plan:
    """What every subject shares: the training config and overrides, prompts per kind, seeds, sampling,
    gates and the sweep; `settings` is all of it as written into each result file."""
    config: str
    overrides: tuple[str, ...]
    templates: dict[str, list[str]]
    seeds: list[int]
    sampling: Sampling
    beta: float
    tau: float
    betas: list[float]
    settings: dict


def load_judge(preset: str, clip_ckpt: str | None, dino: str | None, runs: Path, device: str) -> Judge:
    """CLIP and DINO of a --metrics preset, from local files only (tiny: random ones written under `runs`)."""
    from ldm.evaluation.metrics import ClipMetric, DinoMetric
    from ldm.evaluation.tiny import write_tiny_metric_models

    if preset == "tiny":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # the command's output stays its own lines
        config, checkpoint, folder = write_tiny_metric_models(runs / "tiny-metrics")
        return Judge(ClipMetric(str(config), checkpoint, device), DinoMetric(folder, device))
    if clip_ckpt is None or dino is None:
        raise UserError(f"--metrics {preset} needs --clip_ckpt (the open_clip {PRESETS[preset]} weights file) and "
                        "--dino (the transformers folder of facebook/dino-vits16); nothing is downloaded")
    return Judge(ClipMetric(PRESETS[preset], clip_ckpt, device), DinoMetric(dino, device))


def result_path(out: Path, subject: Subject) -> Path:
    return out / "subjects" / f"{subject.name}.json"


def finished(out: Path, subject: Subject, settings: dict) -> bool:
    """Whether the subject's result is complete (then it is skipped); one made with other settings is
    refused rather than mixed into the table."""
    path = result_path(out, subject)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not result.get("complete"):
        return False
    if result.get("settings") != settings:
        changed = sorted(k for k in settings.keys() | result.get("settings", {}).keys()
                         if settings.get(k) != result.get("settings", {}).get(k))
        raise UserError(f"{path}: made with other settings ({', '.join(changed)}); use another --out, or delete it "
                        "to measure the subject again")
    return True


def make_masks(subject: Subject, clipseg: str, work: Path) -> None:
    """CLIPSeg masks of the subject's class word under `work`, leaving the dataset folder as it is."""
    from clipseg.soft_segment import main as soft_segment

    soft_segment(["--image_dir", str(subject.folder), "--super_class", subject.superclass, "--model_weight",
                  str(clipseg), "--out_dir", str(work / "mask")])


def training_args(subject: Subject, plan: Plan, work: Path, masks: Path | None) -> list[str]:
    """main.py's arguments for the subject: the config, its folder and class word, masks made here, overrides."""
    overrides = [f"data.params.data_root={subject.folder.resolve()}", f"model.params.superclass={subject.superclass}"]
    if masks is not None:
        overrides.append(f"data.params.mask_dirname={masks.resolve()}")
    return ["--base", plan.config, "-t", "--name", subject.name, "--logdir", str(work / "runs"), *overrides,
            *plan.overrides]


def train(work: Path, args: Sequence[str]) -> Path:
    """Train the concept with main.py's loop; its file is copied to work/concept.safetensors when done,
    beside train.json (the arguments), by which a later run knows it may reuse it."""
    from ldm import train as training

    shutil.rmtree(work / "runs", ignore_errors=True)   # a run cut short is trained again from the start
    trainer = training.run(list(args))
    target = work / "concept.safetensors"
    with atomic_path(target) as tmp:
        shutil.copyfile(Path(trainer.default_root_dir) / "concepts" / "last.safetensors", tmp)
    with atomic_path(work / "train.json") as tmp:
        tmp.write_text(json.dumps(list(args)))
    return target


def trained_before(work: Path, args: Sequence[str]) -> bool:
    try:
        return (work / "concept.safetensors").is_file() and json.loads((work / "train.json").read_text()) == list(args)
    except (OSError, ValueError):
        return False


def measure(model, judge: Judge, toy, subject: Subject, concept_file: Path, plan: Plan) -> dict:
    """The subject's scores: per prompt with the concept at (beta, tau), the class word without it, the sweep."""
    from ldm.perfusion.concepts import load_concept
    from ldm.perfusion.inference import check_concepts
    from ldm.perfusion.prompts import format_prompt

    concept = load_concept(concept_file)
    check_concepts(model, [concept], [str(concept_file)])
    references = judge.references(reference_images(subject.folder))
    templates, seeds = plan.templates[subject.kind], plan.seeds
    texts = [format_prompt(t, [subject.superclass]) for t in templates]   # CLIP-T reads the class word

    def scores(images: torch.Tensor) -> list[dict]:
        judged = judge(images, [t for t in texts for _ in seeds], [references])
        values = {"dino": judged["dino"][0], "clip_i": judged["clip_i"][0], "clip_t": judged["clip_t"]}
        if toy is not None:
            values.update(toy(images, templates, len(seeds), subject.name))
        return seed_means(values, templates, len(seeds))

    def alone(beta: float, tau: float) -> list[dict]:
        return scores(render_concepts(model, [concept], templates, seeds, plan.sampling, beta, tau,
                                      names=[str(concept_file)]))

    baseline = scores(render(model, texts, seeds, plan.sampling))
    rows = alone(plan.beta, plan.tau)
    points = sweep([(b, plan.tau) for b in plan.betas], lambda b, t: mean(alone(b, t)))
    return {"per_prompt": rows, "mean": mean(rows), "baseline": {"per_prompt": baseline, "mean": mean(baseline)},
            "sweep": points}


def run(subjects: Sequence[Subject], plan: Plan, model, judge: Judge, toy, out: Path, clipseg: str | None,
        device: str, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[Path]:
    """Train and measure every subject whose result is not complete yet; returns the result files written.
    `model` (the base model, on the CPU while concepts train) renders on `device`."""
    pending = [s for s in subjects if not finished(out, s, plan.settings)]
    for s in subjects:
        if s not in pending:
            log(f"{s.name}: finished before ({result_path(out, s)}), skipped")
    concepts, seconds = {}, {}
    for s in pending:
        work = out / "runs" / s.name
        masks = None if has_masks(s.folder) else work / "mask"
        args = training_args(s, plan, work, masks)
        concepts[s.name] = work / "concept.safetensors"
        if trained_before(work, args):
            log(f"{s.name}: trained before ({concepts[s.name]})")
            continue
        if masks is not None:
            make_masks(s, clipseg, work)
        start = time.perf_counter()
        train(work, args)
        seconds[s.name] = round(time.perf_counter() - start, 1)
        log(f"{s.name}: trained in {seconds[s.name]:.0f} s")
    model.to(device)
    written = []
    for s in pending:
        start = time.perf_counter()
        scores = measure(model, judge, toy, s, concepts[s.name], plan)
        result = {"subject": s.name, "superclass": s.superclass, "kind": s.kind, "folder": str(s.folder),
                  "references": len(reference_images(s.folder)), "beta": plan.beta, "tau": plan.tau, **scores,
                  "train_seconds": seconds.get(s.name), "eval_seconds": round(time.perf_counter() - start, 1),
                  "settings": plan.settings, "complete": True}
        with atomic_path(result_path(out, s)) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        written.append(result_path(out, s))
        log(f"{s.name}: " + ", ".join(f"{m} {v:.4f}" for m, v in result["mean"].items()))
    return written


def check_masks(subjects: Sequence[Subject], out: Path, clipseg: str | None) -> None:
    """Before any training: subjects without masks need a CLIPSeg folder."""
    from clipseg.model import check_model_dir

    bare = [s.name for s in subjects if not has_masks(s.folder)]
    if bare and clipseg is None:
        raise UserError(f"{len(bare)} subject(s) have no masks ({', '.join(bare[:3])}{', ...' if len(bare) > 3 else ''}"
                        "); give --clipseg FOLDER (CIDAS/clipseg-rd64-refined) to make them")
    if bare:
        check_model_dir(clipseg)
