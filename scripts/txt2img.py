r"""Sample images from a (base) latent-diffusion model.

    python scripts/txt2img.py --config configs/stable-diffusion/v1-inference.yaml \
        --ckpt ckpt/v1-5-pruned-emaonly.ckpt --prompt "a photo of a teddy bear on a beach"

The flags are scripts/perfusion_txt2img.py's (ldm/sampling_cli.py) less the concepts. Without --ckpt
the model keeps seeded random weights (useful only with the tiny configs).
"""
from __future__ import annotations

import argparse
import sys

from ldm.build import build_model, load_config
from ldm.cli import run_cli
from ldm.sampling_cli import (add_sampling_flags, check_sampling_flags, read_prompts, report, sample_and_save,
                              sampling_settings)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny/v1-tiny.yaml", help="model YAML")
    p.add_argument("--ckpt", default=None, help="base checkpoint (.ckpt, .safetensors or a diffusers folder); none: random weights")
    p.add_argument("--use_ema", action="store_true", help="use the checkpoint's model_ema.* U-Net weights")
    add_sampling_flags(p, "outputs/txt2img")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    check_sampling_flags(args)
    prompts = read_prompts(args, default="a photo of a teddy bear")
    config = load_config([args.config])
    if args.ckpt is None:
        print(f"note: no --ckpt given, {args.config} runs with seeded random weights", file=sys.stderr)
    model = build_model(config, args.ckpt, use_ema=args.use_ema, device=args.device)
    side = model.image_size * model.first_stage_model.downsample_factor
    height, width = args.H or side, args.W or side
    settings = sampling_settings(args, args.ckpt, height, width)
    report(*sample_and_save(model, args, [(p, p) for p in prompts], args.negative_prompt, settings, height, width))
    return 0


if __name__ == "__main__":
    run_cli(main)
