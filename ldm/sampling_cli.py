"""The command line the sampling scripts share: scripts/txt2img.py and scripts/perfusion_txt2img.py
take the same flags with the same defaults and seed batch k with --seed + k; scripts/evaluate_concept.py
takes the ones it has in common under the same names. Everything is checked before a model is built."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ldm.cli import parse_device
from ldm.errors import UserError

DEFAULT_SCALE = 6.0
MAX_PIXELS = 4096 * 4096
MAX_BATCH = 1024   # images drawn at once; --n_iter repeats batches


def add_sampling_flags(p: argparse.ArgumentParser, outdir: str, batches: bool = True) -> None:
    """The sampler, its steps and guidance, the image size, the seed, the device and the output folder;
    with `batches` also the prompts, eta, batch size and count, fixed noise, precision and --skip_grid."""
    from ldm.sample import PRECISIONS, SAMPLERS

    if batches:
        p.add_argument("--prompt", default=None, help='the prompt (with concepts: "a photo of a {}")')
        p.add_argument("--from-file", dest="from_file", default=None, help="text file, one prompt per line")
        p.add_argument("--negative_prompt", default="")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="sampling steps")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="classifier-free guidance scale")
    p.add_argument("--H", type=int, default=None, help="image height (default: the config's)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the config's)")
    if batches:
        p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM's eta (--sampler ddim only)")
        p.add_argument("--n_samples", type=int, default=4, help="images per batch")
        p.add_argument("--n_iter", type=int, default=1, help="batches per prompt")
        p.add_argument("--seed", type=int, default=42, help="batch k of the run uses seed + k")
        p.add_argument("--fixed_code", action="store_true", help="every batch starts from the same noise (from --seed)")
        p.add_argument("--skip_grid", action="store_true", help="write the samples only, no grid per prompt")
        p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--max_pixels", type=int, default=MAX_PIXELS,
                   help="the largest --H x --W accepted (a guard against typos; raise it where memory allows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--outdir", "--out", dest="outdir", default=outdir, help="output folder")


def check_sampling_flags(args) -> None:
    """The shared flags' values, before anything is built: one line naming the flag."""
    for flag in ("scale", "ddim_eta"):
        value = getattr(args, flag, 0.0)
        if not math.isfinite(value):
            raise UserError(f"--{flag} must be a finite number, got {value}")
    eta = getattr(args, "ddim_eta", 0.0)
    if eta < 0:
        raise UserError(f"--ddim_eta must be >= 0, got {eta}")
    if eta > 0 and args.sampler != "ddim":
        raise UserError(f"--ddim_eta {eta}: only --sampler ddim has an eta (got --sampler {args.sampler})")
    for flag in ("steps", "n_samples", "n_iter", "H", "W"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if getattr(args, "n_samples", 1) > MAX_BATCH:
        raise UserError(f"--n_samples {args.n_samples}: at most {MAX_BATCH} images in one batch; ask for more "
                        "batches with --n_iter")
    pixels = (args.H or 1) * (args.W or 1)
    if pixels > args.max_pixels:
        raise UserError(f"--H {args.H} x --W {args.W} is {pixels:,} pixels, over --max_pixels {args.max_pixels:,} "
                        "(a typo?); pass a larger --max_pixels where the machine has the memory")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be a whole number in [0, 2^63), got {args.seed}")
    parse_device(args.device)
    out = Path(args.outdir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"--outdir {out}: {'it' if blocking == out else blocking} is a file; expected a folder")


def read_prompts(args, default: str | None = None) -> list[str]:
    """--prompt or the lines of --from-file (not both); `default` when neither is given, else an error."""
    from ldm.perfusion.inference import read_prompt_file

    if args.prompt is not None and args.from_file is not None:
        raise UserError("give --prompt or --from-file, not both")
    if args.from_file is not None:
        return read_prompt_file(args.from_file, "--from-file")
    if args.prompt is None and default is None:
        raise UserError('no prompt: pass --prompt "a photo of a {}" or --from-file FILE')
    return [default if args.prompt is None else args.prompt]


def as_given(path) -> str | None:
    """A path for the metadata: inside this repository relative to it (as configs name it), else as it is."""
    from ldm.util import REPO_ROOT

    if path is None:
        return None
    path = Path(path)
    return str(path.relative_to(REPO_ROOT)) if path.is_absolute() and path.is_relative_to(REPO_ROOT) else str(path)


def sampling_settings(args, ckpt, height: int, width: int) -> dict:
    """What a sampling run records in every PNG (besides prompt and seed): the shared flags' values."""
    settings = {"config": as_given(args.config), "ckpt": as_given(ckpt), "use_ema": args.use_ema,
                "negative_prompt": args.negative_prompt, "sampler": args.sampler, "steps": args.steps,
                "scale": args.scale, "H": height, "W": width, "n_samples": args.n_samples, "n_iter": args.n_iter,
                "fixed_code": args.fixed_code, "precision": args.precision}
    if args.sampler == "ddim":
        settings["ddim_eta"] = args.ddim_eta
    return settings


def sample_and_save(model, args, prompts: list[tuple[str, str]], negative: str, settings: dict, height: int,
                    width: int, sweep: list[float] | None = None, set_column=None, meta_for=None) -> tuple[list, list]:
    """Each (template, prompt) in --n_iter batches of --n_samples, batch k of the run from seed --seed + k
    (--fixed_code: all from --seed); with `sweep`, every batch again at each value (`set_column(value)`
    first). Writes OUTDIR/samples/NNNNN.png and, unless --skip_grid, one grid per prompt: a row per batch,
    or with `sweep` a row per sample and a column per value. `meta_for(value)` adds to each image's
    settings (None: the grid's). Returns (samples, grids)."""
    import sys

    from ldm.models.diffusion.guidance import initial_noise, make_generator
    from ldm.outputs import save_grid, save_labelled_grid, save_samples
    from ldm.sample import generate, latent_shape

    meta_for = meta_for or (lambda value: {})
    fixed = None
    if args.fixed_code:
        shape = latent_shape(model, args.n_samples, height, width)
        fixed = initial_noise(shape, model.device, make_generator(args.seed, model.device))
    written, grids, batch = [], [], 0
    for template, prompt in prompts:
        rows, metas, first = [], [], batch
        for _ in range(args.n_iter):
            seed, batch = args.seed + batch, batch + 1
            for value in sweep or [None]:
                if value is not None:
                    set_column(value)
                images = generate(model, [prompt] * args.n_samples, negative, args.sampler, args.steps, args.scale,
                                  args.ddim_eta, height, width, seed, x_T=fixed, precision=args.precision,
                                  progress=sys.stderr.isatty())
                meta = dict(settings, prompt_template=template, prompt=prompt, seed=seed, **meta_for(value))
                rows.append(images)
                metas.extend(dict(meta, index_in_batch=i) for i in range(len(images)))
        images = torch.cat(rows)
        paths = save_samples(images, args.outdir, metas)
        written += paths
        if args.skip_grid:
            continue
        grid_meta = dict(settings, prompt_template=template, prompt=prompt,
                         seeds=[args.seed + b for b in range(first, batch)], **meta_for(None))
        if sweep is None:
            grids.append(save_grid(images, Path(args.outdir) / f"grid-{paths[0].stem}.png", nrow=args.n_samples,
                                   metadata=grid_meta))
        else:   # (batch, value) blocks of n_samples images -> a row per sample, a column per value
            order = images.view(args.n_iter, len(sweep), args.n_samples, *images.shape[1:]).transpose(1, 2).flatten(0, 2)
            grids.append(save_labelled_grid(order, Path(args.outdir) / f"beta-sweep-{paths[0].stem}.png",
                                            [f"beta {b:g}" for b in sweep], metadata=dict(grid_meta, beta_sweep=sweep)))
    return written, grids


def report(written: list, grids: list) -> None:
    print(f"wrote {len(written)} samples to {written[0].parent}"
          + (f" and {len(grids)} grid{'s' if len(grids) != 1 else ''}: {', '.join(str(g) for g in grids)}" if grids else ""))
