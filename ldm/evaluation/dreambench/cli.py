"""scripts/dreambench.py: train, render and score every subject of a DreamBench folder, or merge the
per-subject results of several shards into one table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import MissingFileError, UserError
from ldm.util import REPO_ROOT

PROMPTS = {"object": REPO_ROOT / "data/prompts/dreambooth-object.txt",
           "live": REPO_ROOT / "data/prompts/dreambooth-live.txt"}
TOY_PROMPTS = REPO_ROOT / "data/toy/dreambench-prompts.txt"
TOY_SCORER = REPO_ROOT / "ckpt/toy/scorer.safetensors"


def parser() -> argparse.ArgumentParser:
    from ldm.evaluation.dreambench.runner import PRESETS
    from ldm.evaluation.dreambench.subjects import LIVE_CLASSES
    from ldm.perfusion.gate_settings import DEFAULT_BETA, DEFAULT_TAU
    from ldm.sampling_cli import add_sampling_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Trailing key=value arguments override the training config, as main.py's do "
                                       "(e.g. lightning.trainer.max_steps=200).")
    p.add_argument("--subjects", help="DreamBooth dataset folder (prompts_and_classes.txt), a toy concept set "
                   "(concepts.json), or subject folders with a class.txt each")
    p.add_argument("--config", help="the Perfusion training config (e.g. configs/perfusion_custom.yaml)")
    p.add_argument("--ckpt", default=None, help="base checkpoint (default: the config's model.ckpt)")
    p.add_argument("--metrics", choices=sorted(PRESETS), default="dreambooth",
                   help="dreambooth: DINO ViT-S/16 and OpenAI CLIP ViT-B/32 (quick_gelu); vit-l-14: open_clip "
                        "ViT-L-14 and DINO; tiny: random tiny models, for smoke runs (default: %(default)s)")
    p.add_argument("--clip_ckpt", default=None, help="open_clip weights file of the preset's CLIP")
    p.add_argument("--dino", default=None, help="transformers folder of facebook/dino-vits16")
    p.add_argument("--clipseg", default=None, help="CLIPSeg folder, to make masks for subjects that have none")
    p.add_argument("--prompts", default=None, help="one template file ({} for the subject) for every subject "
                   "(default: DreamBooth's object or live prompts by kind; a toy set: data/toy/dreambench-prompts.txt)")
    p.add_argument("--max_prompts", type=int, default=None, help="the first N templates only")
    p.add_argument("--live_classes", default=",".join(LIVE_CLASSES),
                   help="class words whose subjects get the live prompts (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt: seeds --seed .. --seed + N - 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=DEFAULT_BETA[False])
    p.add_argument("--tau", type=float, default=DEFAULT_TAU)
    p.add_argument("--beta_sweep", default=None, metavar="START:STOP:COUNT", help="trade-off curve over beta at --tau")
    p.add_argument("--shard", default=None, metavar="INDEX/COUNT", help="every COUNT-th subject from INDEX (0-based)")
    p.add_argument("--merge", action="store_true", help="only write the table from the results under --out")
    p.add_argument("--toy_scorer", default=str(TOY_SCORER), help="a toy set's scorer (default: the shipped one)")
    p.add_argument("--batch", type=int, default=8, help="images per sampling batch (does not change the images)")
    add_sampling_flags(p, "outputs/dreambench", batches=False)
    p.set_defaults(steps=None, scale=None)   # then the config's log_sample_steps / log_guidance_scale
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    return p


def read_templates(spec: str | None, toy: bool, max_prompts: int | None) -> dict[str, list[str]]:
    from ldm.perfusion.inference import read_prompt_file

    if spec is not None and not Path(spec).is_file():
        raise MissingFileError(f"--prompts {spec}: no such file")
    files = {k: Path(spec) if spec else (TOY_PROMPTS if toy else PROMPTS[k]) for k in PROMPTS}
    templates = {k: read_prompt_file(f, "--prompts")[:max_prompts] for k, f in files.items()}
    for kind, lines in templates.items():
        unnamed = next((t for t in lines if "{}" not in t), None)
        if unnamed:
            raise UserError(f"--prompts {files[kind]}: template {unnamed!r} does not name the subject with {{}}")
    return templates


def main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    from ldm.evaluation.dreambench.report import load_results, write_report

    out = Path(args.outdir)
    if args.merge:
        results = load_results(out)
        written = write_report(out, results, [f"`{' '.join(sys.argv)}`", "", _protocol(results[0]["settings"])])
        print("wrote " + ", ".join(str(w) for w in written))
        return 0
    plan, subjects, toy, judge, model = prepare(args, out)
    from ldm.evaluation.dreambench.runner import run

    run(subjects, plan, model, judge, toy, out, args.clipseg, args.device)
    if args.shard:
        print(f"shard {args.shard} done; when every shard is: python scripts/dreambench.py --merge --out {out}")
        return 0
    results = load_results(out)
    written = write_report(out, results, [f"`{' '.join(sys.argv)}`", "", _protocol(plan.settings)])
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _protocol(s: dict) -> str:
    lists = s["prompts"]
    counts = (f"{len(lists['object'])} prompts" if lists["object"] == lists["live"] else
              ", ".join(f"{len(v)} {k} prompts" for k, v in lists.items()))
    return (f"{counts} x {len(s['seeds'])} seeds; {s['sampler']} {s['steps']} steps, guidance {s['scale']}, "
            f"{s['H']}x{s['W']}; beta {s['beta']:g}, tau {s['tau']:g}; metrics {s['metrics']}"
            + (" (random tiny CLIP and DINO: their numbers only show the table's shape)" if s["metrics"] == "tiny"
               else "") + f"; config {s['config']}, training overrides {s['overrides'] or 'none'}.")


def _in_repo(path: str) -> str:
    """A path inside the repository as a relative one, so that results made in two checkouts merge."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else path


def prepare(args, out: Path):
    """Every check before any training: flags, subjects, prompts, metric weights, masks, earlier results,
    the base model and each class word in its tokenizer."""
    from ldm.build import build_perfusion, load_config
    from ldm.evaluation.dreambench.runner import Plan, check_masks, finished, load_judge
    from ldm.evaluation.dreambench.subjects import TOY_CONCEPTS, discover, parse_shard, shard
    from ldm.evaluation.dreambench.toy import ToyJudge
    from ldm.evaluation.harness import Sampling, parse_sweep
    from ldm.perfusion.prompts import format_prompt, superclass_token_ids
    from ldm.sampling_cli import check_sampling_flags

    if not args.subjects or not args.config:
        raise UserError("--subjects and --config are required (or --merge --out DIR to only write the table)")
    if not Path(args.config).is_file():
        raise MissingFileError(f"--config {args.config}: no such file")
    index, count = parse_shard(args.shard) if args.shard else (0, 1)
    if not 1 <= args.seeds <= 1000 or args.batch < 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise UserError("--seeds (1 to 1000), --batch and --max_prompts must be at least 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"{bad[0]!r}: training overrides are key=value (e.g. lightning.trainer.max_steps=200)")
    params = load_config([args.config]).model.get("params", {})
    args.steps = args.steps or int(params.get("log_sample_steps", 50))
    args.scale = args.scale if args.scale is not None else float(params.get("log_guidance_scale", 6.0))
    check_sampling_flags(args)
    betas = parse_sweep(args.beta_sweep) if args.beta_sweep else []
    live = [w.strip() for w in args.live_classes.split(",") if w.strip()]
    subjects = shard(discover(args.subjects, live), index, count)
    is_toy = (Path(args.subjects) / TOY_CONCEPTS).is_file()
    templates = read_templates(args.prompts, is_toy, args.max_prompts)
    toy = ToyJudge(args.toy_scorer) if is_toy else None
    if toy is not None:
        from ldm.toy.world import CONCEPTS

        for s in subjects:
            if s.name not in CONCEPTS:
                raise UserError(f"{args.subjects}: {s.name!r} is not a toy concept ({', '.join(CONCEPTS)})")
            toy.check(templates[s.kind], s.name)
    judge = load_judge(args.metrics, args.clip_ckpt, args.dino, out / "runs", args.device)
    check_masks(subjects, out, args.clipseg)
    model, _, _ = build_perfusion(args.config, args.ckpt, device="cpu")   # on the device once concepts are trained
    side = model.image_size * model.first_stage_model.downsample_factor
    sampling = Sampling(args.steps, args.scale, args.sampler, args.H or side, args.W or side, args.batch)
    for s in subjects:
        try:
            superclass_token_ids(model.cond_stage_model.tokenizer, s.superclass)
        except (UserError, KeyError) as err:
            raise UserError(f"subject {s.name!r}: class {s.superclass!r} is unknown to the model's text encoder "
                            f"({err})") from None
        for template in templates[s.kind]:   # CLIP-T reads the prompt with the class word at {}
            format_prompt(template, [s.superclass])
    seeds = list(range(args.seed, args.seed + args.seeds))
    overrides = tuple(args.overrides) + ((f"model.ckpt={args.ckpt}",) if args.ckpt else ())
    settings = {"config": args.config, "ckpt": args.ckpt, "overrides": list(overrides),
                "metrics": args.metrics, "clip_ckpt": args.clip_ckpt, "dino": args.dino, "prompts": templates,
                "seeds": seeds, "sampler": args.sampler, "steps": args.steps, "scale": args.scale, "H": sampling.height,
                "W": sampling.width, "beta": args.beta, "tau": args.tau, "beta_sweep": betas, "live_classes": live,
                "toy_scorer": _in_repo(args.toy_scorer) if toy else None}
    for s in subjects:
        finished(out, s, settings)   # refuses a result of other settings now, not after training the others
    plan = Plan(args.config, overrides, templates, seeds, sampling, args.beta, args.tau, betas, settings)
    return plan, subjects, toy, judge, model
