r"""Sample images from a (base) latent-diffusion model.

    python scripts/txt2img.py --config configs/stable-diffusion/v1-inference.yaml \
        --ckpt ckpt/v1-5-pruned-emaonly.ckpt --prompt "a photo of a teddy bear on a beach"

Without --ckpt the model keeps seeded random weights (useful only with the tiny configs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.build import build_model, load_config  # noqa: E402
from ldm.cli import run_cli  # noqa: E402
from ldm.outputs import save_grid, save_samples  # noqa: E402
from ldm.sample import PRECISIONS, SAMPLERS, check_sampling_flags, generate  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny/v1-tiny.yaml", help="model YAML")
    p.add_argument("--ckpt", default=None, help="base checkpoint (.ckpt, .safetensors or a diffusers folder); none: random weights")
    p.add_argument("--use_ema", action="store_true", help="use the checkpoint's model_ema.* U-Net weights")
    p.add_argument("--prompt", default="a photo of a teddy bear")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--H", type=int, default=None, help="image height (default: the config's)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the config's)")
    p.add_argument("--n_samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--outdir", default="outputs/txt2img")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    check_sampling_flags(args)
    config = load_config([args.config])
    if args.ckpt is None:
        print(f"note: no --ckpt given, {args.config} runs with seeded random weights", file=sys.stderr)
    model = build_model(config, args.ckpt, use_ema=args.use_ema, device=args.device)
    side = model.image_size * model.first_stage_model.downsample_factor
    height = side if args.H is None else args.H
    width = side if args.W is None else args.W
    images = generate(model, [args.prompt] * args.n_samples, args.negative_prompt, args.sampler, args.steps,
                      args.scale, args.ddim_eta, height, width, args.seed, precision=args.precision,
                      progress=sys.stderr.isatty())
    settings = {k: v for k, v in vars(args).items() if k not in ("device",)}
    paths = save_samples(images, args.outdir, [dict(settings, index=i) for i in range(len(images))])
    grid = save_grid(images, Path(args.outdir) / f"grid-{paths[0].stem}.png", nrow=min(4, len(images)), metadata=settings)
    print(f"wrote {len(paths)} samples to {paths[0].parent} and the grid {grid}")
    return 0


if __name__ == "__main__":
    run_cli(main)
