"""Latent diffusion as Stable Diffusion XL conditions it: a context of two text encoders and a vector
of the pooled text embedding and the image's size conditioning (Podell et al. 2023, Sec. 2.2)."""
from __future__ import annotations

from typing import Sequence

import torch

from ldm.errors import UserError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.sdxl_conditioner import size_vector
from ldm.util import to_device


class SDXLLatentDiffusion(LatentDiffusion):
    """A conditioning is {"crossattn": (B, 77, 2048), "pooled": (B, 1280)}.

    The size conditioning follows the image being denoised: original size = target size = the
    latent's size in pixels, crop (0, 0), the defaults of SDXL sampling (and right for training on
    images resized, not cropped, to the training size). `original_size`/`crop` (h, w) fix them instead.
    An empty prompt's encodings are zeros (`zero_empty_prompt`), as SDXL base was trained to drop
    its captions and as its sampling uses for the unconditional branch. `upcast_vae` decodes in
    float32 with autocast off: the published SDXL VAE overflows to NaN in fp16 (a VAE fine-tuned
    to stay finite in fp16, given as `first_stage_ckpt`, can set it false).
    """

    def __init__(self, *args, original_size: Sequence[int] | None = None, crop: Sequence[int] = (0, 0),
                 zero_empty_prompt: bool = True, upcast_vae: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.original_size = None if original_size is None else _pair(original_size, "original_size", low=1)
        self.crop = _pair(crop, "crop", low=0)
        self.zero_empty_prompt = zero_empty_prompt
        self.upcast_vae = upcast_vae

    def get_learned_conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.drop_empty(self.cond_stage_model.encode(list(prompts)), prompts)

    def drop_empty(self, cond: dict[str, torch.Tensor], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """With `zero_empty_prompt`, the rows of empty prompts set to zero."""
        if not self.zero_empty_prompt or all(prompts):   # nothing to zero: the same tensors (the edit knows them)
            return cond
        keep = to_device(torch.tensor([p != "" for p in prompts]), cond["pooled"].device)
        return {k: v * keep.view(-1, *[1] * (v.dim() - 1)).to(v.dtype) for k, v in cond.items()}

    def apply_model(self, x_noisy, t, cond):
        factor = self.first_stage_model.downsample_factor
        target = (x_noisy.shape[2] * factor, x_noisy.shape[3] * factor)
        y = size_vector(cond["pooled"], self.original_size or target, self.crop, target)
        return self.model(x_noisy, t, cond["crossattn"], y=y)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        if not self.upcast_vae:
            return super().decode_first_stage(z)
        with torch.autocast(z.device.type, enabled=False):
            self.first_stage_model.float()
            return super().decode_first_stage(z.float())


def _pair(value, name: str, low: int) -> tuple[int, int]:
    """model.params.`name`: two whole numbers (height, width), each >= `low`; one line naming it otherwise."""
    numbers = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if numbers is None or len(numbers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                                                       for v in numbers):
        raise UserError(f"model.params.{name} must be two whole numbers (height, width) >= {low}, got {value!r}")
    return tuple(numbers)
