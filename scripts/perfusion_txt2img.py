r"""Sample images with one or several trained Perfusion concepts.

    python scripts/perfusion_txt2img.py --config configs/perfusion_teddy.yaml \
        --ckpt ckpt/v1-5-pruned-emaonly.ckpt --personalized_ckpt teddy.safetensors,cat.safetensors \
        --prompt "a photo of a {1} and a {2}" --beta 0.7,0.6 --tau 0.15 --steps 50 --scale 6 \
        --n_samples 4 --n_iter 1 --seed 42 --outdir outputs/

The prompt names concepts `{}` (one concept) or `{1}`, `{2}`, ... in the order of
--personalized_ckpt. Each concept gets its own placeholder token when it is loaded, so
concepts trained with the same placeholder combine. Lower beta shows more of a concept.
--beta_sweep 0.4:0.8:5 renders the same seeds at 5 beta values as one labelled grid.
--show_gates prints, for each prompt, every token's sim and gate per concept (Eq. 3) and exits;
every sampling run warns when a gate opens above 0.5 at a token that is not the concept's own.
Without --ckpt (and no model.ckpt in the config) the model has seeded random weights (tiny configs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.build import build_perfusion  # noqa: E402
from ldm.cli import run_cli  # noqa: E402
from ldm.concepts import load_concept  # noqa: E402
from ldm.errors import UserError  # noqa: E402
from ldm.evaluation.harness import DEFAULT_BETA, DEFAULT_TAU, choose_gates, parse_sweep, recommended_gates  # noqa: E402
from ldm.gates import format_gate_table, gate_tables, leak_warning  # noqa: E402
from ldm.inference import (PLACEHOLDER_TOKENS, format_prompt, load_concepts, parse_numbers,  # noqa: E402
                           per_concept, prepare_prompt, read_prompt_file, set_gates)
from ldm.models.diffusion.guidance import initial_noise, make_generator  # noqa: E402
from ldm.modules.perfusion import MULTI  # noqa: E402
from ldm.outputs import save_grid, save_labelled_grid, save_samples  # noqa: E402
from ldm.sample import PRECISIONS, SAMPLERS, check_sampling_flags, generate, latent_shape  # noqa: E402



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the Perfusion model YAML the concepts were trained with")
    p.add_argument("--ckpt", default=None, help="base SD checkpoint or diffusers folder (default: the config's model.ckpt)")
    p.add_argument("--use_ema", action="store_true", help="use the checkpoint's model_ema.* U-Net weights")
    p.add_argument("--personalized_ckpt", required=True, help="concept file(s), comma-separated: a.safetensors,b.safetensors")
    p.add_argument("--prompt", default=None, help='e.g. "a photo of a {}" or "a {1} next to a {2}"')
    p.add_argument("--from-file", dest="from_file", default=None, help="text file, one prompt per line")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--beta", default=None, help="gate bias, one value or one per concept (default: a concept's "
                   "stored recommendation, see scripts/evaluate_concept.py; else "
                   f"{DEFAULT_BETA[False]}, with --global_locking {DEFAULT_BETA[True]})")
    p.add_argument("--tau", default=None, help="gate temperature > 0, one value or one per concept (default: the "
                   f"stored recommendation, else {DEFAULT_TAU})")
    p.add_argument("--beta_sweep", default=None, metavar="START:STOP:COUNT",
                   help="render each seed at COUNT evenly spaced betas (all concepts) as one labelled grid")
    p.add_argument("--global_locking", action="store_true",
                   help="keys see the whole prompt with each concept's superclass word")
    p.add_argument("--gate_at", choices=("all", "concept"), default="all",
                   help="all: Eq. 3's gate at every token (the paper's rule); concept: the edit only at each "
                        "concept's own token")
    p.add_argument("--show_gates", action="store_true",
                   help="print each prompt's tokens with sim and gate per concept, then exit without sampling")
    multi = p.add_mutually_exclusive_group()
    multi.add_argument("--multi", choices=MULTI, default="named",
                       help="several concepts: named (default): at each concept's token only that concept edits, "
                            "elsewhere Appendix B; separate: Appendix B as written (each gate from its own "
                            "concept's sim); joint: gates from the exact projection's coordinates; approx: the "
                            "authors' approximation W e - sum_n sim_n(e) W i*_n")
    for flag, rule in (("--exact_multi", "joint"), ("--separate_gates", "separate"), ("--approx_multi", "approx")):
        multi.add_argument(flag, dest="multi", action="store_const", const=rule, help=f"same as --multi {rule}")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--H", type=int, default=None, help="image height (default: the config's)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the config's)")
    p.add_argument("--n_samples", type=int, default=4, help="images per batch")
    p.add_argument("--n_iter", type=int, default=1, help="batches per prompt")
    p.add_argument("--seed", type=int, default=42, help="batch k of the run uses seed + k")
    p.add_argument("--fixed_code", action="store_true", help="every batch starts from the same noise (from --seed)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--outdir", default="outputs/perfusion")
    return p


def read_prompts(args) -> list[str]:
    if args.prompt is not None and args.from_file is not None:
        raise UserError("give --prompt or --from-file, not both")
    if args.from_file is not None:
        return read_prompt_file(args.from_file, "--from-file")
    if args.prompt is None:
        raise UserError('no prompt: pass --prompt "a photo of a {}" or --from-file FILE')
    return [args.prompt]


def check_args(args):
    """Everything that can be checked without building the model: fail fast, one line."""
    paths = [p.strip() for p in args.personalized_ckpt.split(",")]
    if any(not p for p in paths):
        raise UserError(f"--personalized_ckpt {args.personalized_ckpt!r} has an empty entry")
    n = len(paths)
    if n > len(PLACEHOLDER_TOKENS):
        raise UserError(f"{n} concepts given; at most {len(PLACEHOLDER_TOKENS)} can be loaded at once")
    betas = per_concept(parse_numbers(args.beta, "--beta"), n, "beta") if args.beta else None
    taus = per_concept(parse_numbers(args.tau, "--tau"), n, "tau") if args.tau else None
    sweep = parse_sweep(args.beta_sweep) if args.beta_sweep else None
    check_sampling_flags(args)
    if args.n_iter < 1:
        raise UserError(f"--n_iter must be at least 1, got {args.n_iter}")
    prompts = read_prompts(args)
    for template in prompts + [args.negative_prompt]:
        format_prompt(template, PLACEHOLDER_TOKENS[:n])
    return paths, betas, taus, sweep, prompts


def describe(loaded, sources) -> list[dict]:
    """Per-concept settings for the PNG metadata, with where beta and tau came from."""
    return [dict(entry, gates_from=origin) for entry, origin in zip(loaded.describe(), sources)]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    paths, betas, taus, sweep, prompts = check_args(args)
    concepts = [load_concept(p) for p in paths]
    betas, taus, sources = choose_gates(concepts, betas, taus, args.global_locking)
    for path, concept, origin in zip(paths, concepts, sources):
        if "recommendation" in origin.values():
            print(f"{path}: " + ", ".join(f"{k} from its stored recommendation" for k, v in origin.items()
                                          if v == "recommendation")
                  + f" ({recommended_gates(concept)['rule']})", file=sys.stderr)
    model, ckpt, weights_seed = build_perfusion(args.config, args.ckpt, args.use_ema, args.device)
    loaded = load_concepts(model, concepts, betas, taus, args.global_locking, args.multi, names=paths,
                           gate_at=args.gate_at)
    tokenizer = model.cond_stage_model.tokenizer
    if args.show_gates and not model.bank.active:
        raise UserError("--show_gates: textual-inversion concepts have no gate")
    if model.bank.active and (args.show_gates or args.gate_at == "all"):
        tables = gate_tables(model, [prepare_prompt(tokenizer, t, loaded) for t in prompts])
        if args.show_gates:
            print(f"beta {loaded.betas}, tau {loaded.taus}; * marks a concept's own token")
            print("\n\n".join(format_gate_table(t) for t in tables))
            return 0
        for line in filter(None, (leak_warning(table, loaded.betas) for table in tables)):
            print(line, file=sys.stderr)
    side = model.image_size * model.first_stage_model.downsample_factor
    height = side if args.H is None else args.H
    width = side if args.W is None else args.W
    shape = latent_shape(model, args.n_samples, height, width)
    negative = prepare_prompt(tokenizer, args.negative_prompt, loaded)
    fixed = initial_noise(shape, model.device, make_generator(args.seed, model.device)) if args.fixed_code else None
    settings = {
        "config": args.config, "ckpt": ckpt, "use_ema": args.use_ema, "negative_prompt": args.negative_prompt,
        "global_locking": args.global_locking, "gate_at": args.gate_at, "multi_concept": args.multi,
        "sampler": args.sampler, "steps": args.steps, "scale": args.scale, "H": height, "W": width,
        "n_samples": args.n_samples, "n_iter": args.n_iter, "fixed_code": args.fixed_code, "precision": args.precision,
    }
    if ckpt is None:
        settings["random_weights_seed"] = weights_seed
    if args.sampler == "ddim":
        settings["ddim_eta"] = args.ddim_eta
    written, grids, batch = [], [], 0
    for template in prompts:
        prompt = prepare_prompt(tokenizer, template, loaded)
        columns = sweep or [None]
        rows, metas = [], []
        for _ in range(args.n_iter):
            seed = args.seed + batch
            batch += 1
            for beta in columns:
                if beta is not None:
                    set_gates(model, loaded, beta, loaded.taus)
                images = generate(model, [prompt] * args.n_samples, negative, args.sampler, args.steps, args.scale,
                                  args.ddim_eta, height, width, seed, x_T=fixed, precision=args.precision,
                                  progress=sys.stderr.isatty())
                meta = dict(settings, prompt_template=template, prompt=prompt, seed=seed,
                            concepts=describe(loaded, sources))
                rows.append(images)
                metas.extend(dict(meta, index_in_batch=i) for i in range(len(images)))
        images = torch.cat(rows)
        paths_out = save_samples(images, args.outdir, metas)
        written += paths_out
        grid_meta = dict(settings, prompt_template=template, prompt=prompt, seeds=[args.seed + b for b in
                         range(batch - args.n_iter, batch)], concepts=describe(loaded, sources))
        if sweep is None:
            grids.append(save_grid(images, Path(args.outdir) / f"grid-{paths_out[0].stem}.png",
                                   nrow=args.n_samples, metadata=grid_meta))
        else:
            # rows: (iteration, beta) blocks of n_samples images -> one row per sample, one column per beta
            k = len(sweep)
            order = images.view(args.n_iter, k, args.n_samples, *images.shape[1:]).transpose(1, 2).flatten(0, 2)
            grid_meta.update(beta_sweep=sweep, concepts=[dict(c, beta=sweep) for c in describe(loaded, sources)])
            grids.append(save_labelled_grid(order, Path(args.outdir) / f"beta-sweep-{paths_out[0].stem}.png",
                                            [f"beta {b:g}" for b in sweep], metadata=grid_meta))
    print(f"wrote {len(written)} samples to {written[0].parent} and {len(grids)} grid"
          f"{'s' if len(grids) != 1 else ''}: {', '.join(str(g) for g in grids)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
