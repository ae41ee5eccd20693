"""Text-to-image sampling with a LatentDiffusion model: prompts in, images in [0, 1] out."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from ldm.errors import UserError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.euler import EulerSampler
from ldm.models.diffusion.guidance import make_generator

SAMPLERS = {"ddim": DDIMSampler, "euler": EulerSampler, "dpmpp_2m": DPMSolverSampler}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_for(device: torch.device, precision: str):
    """Autocast context for 'fp16'/'bf16' (CUDA: both; CPU: bf16 only), nothing for 'fp32'."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise UserError("fp16 autocast needs a GPU; use --precision bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def latent_shape(model, n: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(n, C, h, w) of the latents of n images of height x width: both multiples of the autoencoder's
    factor times the U-Net's downsampling (8 x 8 = 64 px for SD 1.x/2.x, 8 x 4 = 32 for SDXL), checked
    before any work."""
    factor = model.first_stage_model.downsample_factor * 2 ** (model.model.diffusion_model.num_levels - 1)
    for flag, value in (("--H", height), ("--W", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < factor:
            raise UserError(f"{flag} (height/width) must be a whole number of pixels >= {factor}, got {value!r}")
    if height % factor or width % factor:
        raise UserError(f"--H {height} and --W {width} must be multiples of {factor} (the autoencoder's factor "
                        f"times the U-Net's downsampling), e.g. {height // factor * factor or factor} x "
                        f"{width // factor * factor or factor}")
    factor = model.first_stage_model.downsample_factor
    return (n, model.channels, height // factor, width // factor)


@torch.no_grad()
def generate(model, prompts: Sequence[str], negative_prompt: str = "", sampler: str = "ddim", steps: int = 50,
             scale: float = 7.5, eta: float = 0.0, height: int = 512, width: int = 512, seed: int | None = 42,
             x_T: torch.Tensor | None = None, precision: str = "fp32", conditioning=None,
             progress: bool = False) -> torch.Tensor:
    """Sample one image per prompt; returns (B, 3, H, W) in [0, 1] (float32, CPU). `progress`
    shows a bar over the sampling steps.

    `conditioning`, if given, is a callable prompts -> encodings used instead of
    `model.get_learned_conditioning` (Perfusion uses it to route concept prompts).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"prompts must be a non-empty list of text prompts, got {prompts!r}")
    if not (isinstance(scale, (int, float)) and scale == scale and abs(scale) != float("inf")):
        raise UserError(f"the guidance scale must be a finite number, got {scale!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a whole number >= 1, got {steps!r}")
    device = model.device
    encode = conditioning or model.get_learned_conditioning
    with autocast_for(device, precision):
        cond = encode(list(prompts))
        uncond = model.get_learned_conditioning([negative_prompt] * len(prompts)) if scale != 1.0 else None
        shape = latent_shape(model, len(prompts), height, width)
        kwargs = dict(steps=steps, uncond=uncond, scale=scale, x_T=x_T, generator=make_generator(seed, device),
                      progress=progress)
        if sampler == "ddim":
            kwargs["eta"] = eta
        z = SAMPLERS[sampler](model).sample(cond, shape, **kwargs)
        images = model.decode_first_stage(z.to(next(model.first_stage_model.parameters()).dtype))
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu()
