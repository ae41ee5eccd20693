"""Text-to-image sampling with a LatentDiffusion model: prompts in, images in [0, 1] out."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.euler import EulerSampler
from ldm.models.diffusion.guidance import make_generator

SAMPLERS = {"ddim": DDIMSampler, "euler": EulerSampler}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_for(device: torch.device, precision: str):
    """Autocast context for 'fp16'/'bf16' (CUDA: both; CPU: bf16 only), nothing for 'fp32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("fp16 autocast needs a GPU; use --precision bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def latent_shape(model, n: int, height: int, width: int) -> tuple[int, int, int, int]:
    factor = model.first_stage_model.downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"--H {height} and --W {width} must be multiples of the autoencoder's factor {factor}")
    return (n, model.channels, height // factor, width // factor)


@torch.no_grad()
def generate(model, prompts: Sequence[str], negative_prompt: str = "", sampler: str = "ddim", steps: int = 50,
             scale: float = 7.5, eta: float = 0.0, height: int = 512, width: int = 512, seed: int | None = 42,
             x_T: torch.Tensor | None = None, precision: str = "fp32", conditioning=None) -> torch.Tensor:
    """Sample one image per prompt; returns (B, 3, H, W) in [0, 1] (float32, CPU).

    `conditioning`, if given, is a callable prompts -> encodings used instead of
    `model.get_learned_conditioning` (Perfusion uses it to route concept prompts).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    device = model.device
    encode = conditioning or model.get_learned_conditioning
    with autocast_for(device, precision):
        cond = encode(list(prompts))
        uncond = model.get_learned_conditioning([negative_prompt] * len(prompts)) if scale != 1.0 else None
        shape = latent_shape(model, len(prompts), height, width)
        kwargs = dict(steps=steps, uncond=uncond, scale=scale, x_T=x_T, generator=make_generator(seed, device))
        if sampler == "ddim":
            kwargs["eta"] = eta
        z = SAMPLERS[sampler](model).sample(cond, shape, **kwargs)
        images = model.decode_first_stage(z.to(next(model.first_stage_model.parameters()).dtype))
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu()
