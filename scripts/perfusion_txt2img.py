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

from ldm.build import build_perfusion
from ldm.cli import run_cli
from ldm.errors import UserError
from ldm.evaluation.harness import parse_sweep
from ldm.perfusion.concepts import load_concept
from ldm.perfusion.edit import MULTI
from ldm.perfusion.gate_settings import DEFAULT_BETA, DEFAULT_TAU, choose_gates, per_concept, recommended_gates
from ldm.perfusion.gates import format_gate_table, gate_tables, leak_warning
from ldm.perfusion.inference import load_concepts, parse_numbers, set_gates
from ldm.perfusion.prompts import PLACEHOLDER_TOKENS, format_prompt, prepare_prompt
from ldm.sampling_cli import (add_sampling_flags, check_sampling_flags, read_prompts, report, sample_and_save,
                              sampling_settings)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the Perfusion model YAML the concepts were trained with")
    p.add_argument("--ckpt", default=None, help="base SD checkpoint or diffusers folder (default: the config's model.ckpt)")
    p.add_argument("--use_ema", action="store_true", help="use the checkpoint's model_ema.* U-Net weights")
    p.add_argument("--personalized_ckpt", required=True, help="concept file(s), comma-separated: a.safetensors,b.safetensors")
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
    add_sampling_flags(p, "outputs/perfusion")
    return p


def check_args(args):
    """Everything that can be checked without building the model: fail fast, one line."""
    paths = [p.strip() for p in args.personalized_ckpt.split(",")]
    if any(not p for p in paths):
        raise UserError(f"--personalized_ckpt {args.personalized_ckpt!r} has an empty entry")
    n = len(paths)
    if n > len(PLACEHOLDER_TOKENS):
        raise UserError(f"{n} concepts given; at most {len(PLACEHOLDER_TOKENS)} can be loaded at once")
    betas = per_concept(parse_numbers(args.beta, "--beta"), n, "beta", "--beta") if args.beta else None
    taus = per_concept(parse_numbers(args.tau, "--tau"), n, "tau", "--tau") if args.tau else None
    sweep = parse_sweep(args.beta_sweep) if args.beta_sweep else None
    check_sampling_flags(args)
    prompts = read_prompts(args)
    for template in prompts + [args.negative_prompt]:
        try:
            format_prompt(template, PLACEHOLDER_TOKENS[:n])
        except UserError as err:   # say which files the commas gave
            raise UserError(f"{err} (--personalized_ckpt names {n}: {', '.join(paths)})") from None
    return paths, betas, taus, sweep, prompts


def describe(loaded, sources) -> list[dict]:
    """Per-concept settings for the PNG metadata, with where beta and tau came from."""
    return [dict(entry, gates_from=origin) for entry, origin in zip(loaded.describe(), sources)]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    paths, betas, taus, sweep, prompts = check_args(args)
    concepts = [load_concept(p) for p in paths]
    betas, taus, sources = choose_gates(concepts, betas, taus, args.global_locking, paths)
    for path, concept, origin in zip(paths, concepts, sources):
        if "recommendation" in origin.values():
            print(f"{path}: " + ", ".join(f"{k} from its stored recommendation" for k, v in origin.items()
                                          if v == "recommendation")
                  + f" ({recommended_gates(concept, path)['rule']})", file=sys.stderr)
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
    height, width = args.H or side, args.W or side
    settings = dict(sampling_settings(args, ckpt, height, width), global_locking=args.global_locking,
                    gate_at=args.gate_at, multi_concept=args.multi)
    if ckpt is None:
        settings["random_weights_seed"] = weights_seed

    def concepts_now(value):   # per image: the gates it was drawn with; for a sweep's grid, every beta
        described = describe(loaded, sources)
        return {"concepts": [dict(c, beta=sweep) for c in described] if value is None and sweep else described}

    report(*sample_and_save(model, args, [(t, prepare_prompt(tokenizer, t, loaded)) for t in prompts],
                            prepare_prompt(tokenizer, args.negative_prompt, loaded), settings, height, width, sweep,
                            lambda beta: set_gates(model, loaded, beta, loaded.taus), concepts_now))
    return 0


if __name__ == "__main__":
    run_cli(main)
