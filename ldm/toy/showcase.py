"""Render a trained toy concept in new contexts, beside a second concept, and over a beta sweep.

    python -m ldm.toy.showcase --concept logs/<run>/concepts/last.safetensors

Writes three labelled grids to --out (4 seeds per column, images enlarged 4x):
contexts.png (prompts never used in training), two_concepts.png (with --second, by default the
shipped lime star, or the teal ring if that is the one given) and beta_sweep.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.util import REPO_ROOT as ROOT

CONTEXTS = (
    ("at the top a {} and at the bottom a green circle", "top, green circle"),
    ("on a checkered background, on the right a {}", "right, checkered"),
    ("at the bottom a {} and at the top a white cross", "bottom, white cross"),
    ("on the left a red triangle and on the right a {}", "red triangle, right"),
)
PAIRS = (
    ("on the left a {1} and on the right a {2}", "yours left, 2nd right"),
    ("at the top a {2} and at the bottom a {1}", "2nd top, yours bottom"),
)
SWEEP_PROMPT = "on a gray background, on the left a {}"
SHIPPED = ROOT / "ckpt/toy/concepts"


def save(images: torch.Tensor, path: Path, labels: list[str], metadata: dict) -> Path:
    """Row-major images (one column per label), enlarged 4x, as a labelled grid."""
    from ldm.outputs import save_labelled_grid

    return save_labelled_grid(F.interpolate(images, scale_factor=4, mode="nearest"), path, labels, metadata=metadata)


def grid(model, loaded, prompts_labels, path: Path, seeds: int, steps: int, scale: float, seed: int) -> Path:
    from ldm.perfusion.prompts import prepare_prompt
    from ldm.sample import generate

    prompts = [prepare_prompt(model.cond_stage_model.tokenizer, p, loaded) for p, _ in prompts_labels]
    # row r, column c: prompt c with seed r (row-major, as save_labelled_grid expects)
    images = generate(model, [p for _ in range(seeds) for p in prompts], steps=steps, scale=scale,
                      height=32, width=32, seed=seed)
    return save(images, path, [label for _, label in prompts_labels],
                {"prompts": [p for p, _ in prompts_labels], "seed": seed, "steps": steps, "scale": scale,
                 "betas": loaded.betas, "taus": loaded.taus})


def main(argv=None) -> int:
    from ldm.build import build_model, load_config
    from ldm.perfusion.inference import load_concepts, set_gates
    from ldm.perfusion.prompts import prepare_prompt
    from ldm.sample import generate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", required=True, help="a concept file trained with configs/toy/perfusion.yaml")
    p.add_argument("--second", default=None, help="a second concept (default: a shipped one from ckpt/toy/concepts)")
    p.add_argument("--config", default=str(ROOT / "configs/toy/perfusion.yaml"))
    p.add_argument("--beta", type=float, default=0.7)
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--betas", default="0.5,0.7,0.9,1.0,1.1,1.2",
                   help="the sweep's beta values (past the concept token's sim, about 1, its gate shuts)")
    p.add_argument("--seeds", type=int, default=4, help="images per column")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "outputs/toy-showcase"))
    args = p.parse_args(argv)
    try:
        betas = [float(b) for b in args.betas.split(",")]
    except ValueError:
        raise UserError(f"--betas {args.betas!r} is not a comma-separated list of numbers (e.g. 0.5,0.7)")
    for flag in ("seeds", "steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be a positive whole number, got {getattr(args, flag)}")
    concept = Path(args.concept)
    second = Path(args.second) if args.second else SHIPPED / "lime_star.safetensors"
    if second.resolve() == concept.resolve():
        second = SHIPPED / "teal_ring.safetensors"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config([args.config])
    model = build_model(config, ckpt=config.model.ckpt)
    settings = dict(seeds=args.seeds, steps=args.steps, scale=args.scale, seed=args.seed)

    loaded = load_concepts(model, [concept], args.beta, args.tau, names=[str(concept)])
    written = [grid(model, loaded, CONTEXTS, out / "contexts.png", **settings)]
    prompt = prepare_prompt(model.cond_stage_model.tokenizer, SWEEP_PROMPT, loaded)
    images = []
    for beta in betas:   # the same seeds at every beta: only the gate changes
        set_gates(model, loaded, beta, args.tau)
        images.append(generate(model, [prompt] * args.seeds, steps=args.steps, scale=args.scale, height=32, width=32,
                               seed=args.seed))
    sweep_images = torch.stack(images, 1).flatten(0, 1)   # row = seed, column = beta
    written.append(save(sweep_images, out / "beta_sweep.png", [f"beta {b}" for b in betas],
                        {"prompt": SWEEP_PROMPT, "betas": betas, "tau": args.tau}))

    loaded = load_concepts(model, [concept, second], args.beta, args.tau, names=[str(concept), str(second)])
    written.append(grid(model, loaded, PAIRS, out / "two_concepts.png", **settings))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
