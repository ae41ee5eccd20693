r"""Measure trained Perfusion concepts: CLIP-T, CLIP-I and DINO per prompt, the superclass word
without the concept as the baseline, the beta/tau trade-off curve and a recommended setting.

    python scripts/evaluate_concept.py --config configs/perfusion_teddy.yaml \
        --ckpt ckpt/v1-5-pruned-emaonly.ckpt --concepts teddy.safetensors --images data/teddy \
        --clip_model ViT-L-14 --clip_ckpt ckpt/metrics/open_clip_vit_l14.bin --dino ckpt/metrics/dino-vits16 \
        --prompts dreambooth-object --seeds 4 --beta_sweep 0.3:0.9:7 --write_recommendation --outdir eval/teddy

Writes report.md, results.json, per_prompt_<n>.png and (with a sweep) tradeoff.png to --outdir.
The recommended setting is the beta (and tau) with the highest CLIP-I whose CLIP-T is at least
--fraction of the superclass word's; --write_recommendation stores it in the concept file, and
scripts/perfusion_txt2img.py then uses it when no --beta/--tau is given. With several concepts,
each is measured alone, then all together on --pair_prompts (each against its own images).
Metric weights come only from local paths; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm.cli import run_cli
from ldm.errors import MissingFileError, NotAFolderError, UserError
from ldm.evaluation.harness import DEFAULT_FRACTION, Sampling, parse_sweep
from ldm.perfusion.gate_settings import DEFAULT_BETA, DEFAULT_TAU, choose_gates
from ldm.sampling_cli import add_sampling_flags, check_sampling_flags
from ldm.util import REPO_ROOT

PROMPT_SETS = {name: REPO_ROOT / f"data/prompts/{name}.txt" for name in ("dreambooth-object", "dreambooth-live")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the Perfusion model YAML the concepts were trained with")
    p.add_argument("--ckpt", default=None, help="base checkpoint (default: the config's model.ckpt)")
    p.add_argument("--concepts", required=True, help="concept file(s), comma-separated")
    p.add_argument("--images", required=True, help="each concept's training-image folder, comma-separated, same order")
    p.add_argument("--prompts", default="dreambooth-object",
                   help="dreambooth-object, dreambooth-live or a text file with one template per line, {} "
                        "for the concept (default: %(default)s)")
    p.add_argument("--pair_prompts", default=str(REPO_ROOT / "data/prompts/pairs.txt"),
                   help="several concepts: templates with {1}, {2}, ... (default: data/prompts/pairs.txt)")
    p.add_argument("--max_prompts", type=int, default=None, help="the first N templates only")
    p.add_argument("--clip_model", default="ViT-L-14", help="open_clip architecture, or its model config .json")
    p.add_argument("--clip_ckpt", required=True, help="the open_clip checkpoint file for --clip_model")
    p.add_argument("--dino", default=None, help="DINO ViT folder in transformers format (no DINO column without it)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt: seeds --seed .. --seed + N - 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", default=None, help="one per concept (default: the concept's stored recommendation, "
                   f"else {DEFAULT_BETA[False]})")
    p.add_argument("--tau", default=None, help=f"one per concept (default: the stored recommendation, else {DEFAULT_TAU})")
    p.add_argument("--beta_sweep", default=None, metavar="START:STOP:COUNT", help="trade-off curve over beta")
    p.add_argument("--tau_sweep", default=None, help="comma-separated taus the beta sweep crosses (default: --tau)")
    p.add_argument("--fraction", type=float, default=DEFAULT_FRACTION,
                   help="the recommendation keeps CLIP-T >= FRACTION x the superclass word's (default: %(default)s)")
    p.add_argument("--write_recommendation", action="store_true", help="store the recommended beta/tau in each concept file")
    p.add_argument("--batch", type=int, default=8, help="images per sampling batch (does not change the images)")
    add_sampling_flags(p, "outputs/evaluation", batches=False)
    return p


def read_templates(spec: str, flag: str) -> list[str]:
    """A shipped prompt set by name, or a file of templates."""
    from ldm.perfusion.inference import read_prompt_file

    if spec not in PROMPT_SETS and not Path(spec).is_file():
        raise MissingFileError(f"{flag} {spec}: no such file (or one of {', '.join(PROMPT_SETS)})")
    return read_prompt_file(PROMPT_SETS.get(spec, spec), flag)


def reference_images(folder: str) -> list[torch.Tensor]:
    from ldm.data.images import list_images, load_rgb

    path = Path(folder)
    if not path.is_dir():
        raise NotAFolderError(f"--images {folder}: not a folder of training images")
    files = list_images(path)
    if not files:
        raise UserError(f"--images {folder}: no images in it")
    import numpy as np

    return [torch.from_numpy(np.asarray(load_rgb(f)).copy()).permute(2, 0, 1).float() / 255 for f in files]


def numbers(text: str | None, flag: str, n: int | None = None) -> list[float] | None:
    """A flag's comma-separated numbers (None when not given); with `n`, one per concept."""
    from ldm.perfusion.gate_settings import per_concept
    from ldm.perfusion.inference import parse_numbers

    if text is None:
        return None
    values = parse_numbers(text, flag)
    name = "tau" if "tau" in flag else "beta"
    return list(per_concept(values, len(values) if n is None else n, name, flag))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from ldm.evaluation.concept_eval import Judge, evaluate, write_report
    from ldm.evaluation.metrics import ClipMetric, DinoMetric
    from ldm.perfusion.concepts import load_concept
    from ldm.perfusion.gate_settings import check_writable, write_recommendation

    files = [f.strip() for f in args.concepts.split(",") if f.strip()]
    folders = [f.strip() for f in args.images.split(",") if f.strip()]
    if len(folders) != len(files):
        raise UserError(f"--images names {len(folders)} folder(s) for {len(files)} concept(s); give one per concept")
    check_sampling_flags(args)
    if args.seeds < 1 or args.batch < 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise UserError("--seeds, --batch and --max_prompts must be at least 1")
    if args.seeds > 1000 or args.batch > 1024:
        raise UserError(f"--seeds {args.seeds} / --batch {args.batch}: at most 1000 seeds per prompt and 1024 images "
                        "per batch (for more seeds, evaluate in parts with --seed)")
    if args.write_recommendation and not args.beta_sweep:
        raise UserError("--write_recommendation needs --beta_sweep: the recommendation is chosen on the sweep")
    if args.write_recommendation:
        for f in files:
            check_writable(f)
    if args.tau_sweep and not args.beta_sweep:
        raise UserError("--tau_sweep needs --beta_sweep: it names the taus the beta sweep crosses")
    if not 0 < args.fraction <= 1:   # a nan fails this too
        raise UserError(f"--fraction {args.fraction}: must be in (0, 1], the share of the baseline's CLIP-T to keep")
    templates = read_templates(args.prompts, "--prompts")[:args.max_prompts]
    unnamed = [t for t in templates if "{}" not in t]
    if unnamed:
        raise UserError(f"--prompts {args.prompts}: template {unnamed[0]!r} does not name the concept with {{}}")
    pair_templates = read_templates(args.pair_prompts, "--pair_prompts") if len(files) > 1 else []
    for template in pair_templates:
        missing = [n for n in range(1, len(files) + 1) if f"{{{n}}}" not in template]
        if missing:
            raise UserError(f"--pair_prompts {args.pair_prompts}: template {template!r} does not name concept "
                            f"{{{missing[0]}}}; each names all {len(files)} concepts ({{1}}, {{2}}, ...)")
    concepts = [load_concept(f) for f in files]
    betas, taus, _ = choose_gates(concepts, numbers(args.beta, "--beta", len(files)),
                                  numbers(args.tau, "--tau", len(files)), names=files)
    gates = list(zip(betas, taus))
    sweep_taus = sorted(set(numbers(args.tau_sweep, "--tau_sweep") if args.tau_sweep else taus))
    settings = [(b, t) for t in sweep_taus for b in parse_sweep(args.beta_sweep)] if args.beta_sweep else []
    references = [reference_images(f) for f in folders]
    judge = Judge(ClipMetric(args.clip_model, args.clip_ckpt, args.device),
                  DinoMetric(args.dino, args.device) if args.dino else None)

    from ldm.build import build_perfusion
    from ldm.perfusion.inference import check_concepts

    model, ckpt, _ = build_perfusion(args.config, args.ckpt, device=args.device)
    check_concepts(model, concepts, files)   # before any sampling
    side = model.image_size * model.first_stage_model.downsample_factor
    sampling = Sampling(args.steps, args.scale, args.sampler, args.H or side, args.W or side, args.batch, progress=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = evaluate(model, concepts, files, references, templates, judge, seeds, sampling, gates, settings,
                       pair_templates, args.fraction, log=lambda m: print(m, file=sys.stderr))
    results.update(fraction=args.fraction, settings={
        "config": args.config, "ckpt": ckpt, "prompts": args.prompts, "seeds": seeds, "clip_model": args.clip_model,
        "clip_ckpt": args.clip_ckpt, "dino": args.dino, "sampler": args.sampler, "steps": args.steps,
        "scale": args.scale, "H": sampling.height, "W": sampling.width})
    header = [f"`{' '.join(sys.argv)}`", "",
              f"{len(templates)} prompts x {len(seeds)} seeds, {args.sampler} {args.steps} steps, guidance "
              f"{args.scale}, {sampling.height}x{sampling.width}; CLIP {args.clip_model}"
              + (", DINO" if args.dino else ", no DINO") + "."]
    written = write_report(Path(args.outdir), results, header)
    for entry, path in zip(results["concepts"], files):
        rec = entry.get("recommendation")
        if rec:
            print(f"{path}: recommended beta {rec['beta']:g}, tau {rec['tau']:g}")
            if args.write_recommendation:
                write_recommendation(path, rec, f"highest CLIP-I with CLIP-T >= {args.fraction:g} x the superclass "
                                     f"word's ({args.prompts}, {len(seeds)} seeds)")
                print(f"{path}: recommendation stored")
        elif args.beta_sweep:
            print(f"{path}: no setting keeps CLIP-T at {args.fraction:g}x the superclass word's; nothing recommended")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    run_cli(main)
