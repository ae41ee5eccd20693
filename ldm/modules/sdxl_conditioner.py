"""Stable Diffusion XL's text conditioning: two frozen text encoders, concatenated per token.

`embedders.0` is CLIP ViT-L/14 and `embedders.1` OpenCLIP ViT-bigG/14, both read at their
next-to-last layer without a final norm: 768 + 1280 = 2048 values per token, the U-Net's
cross-attention context. The second encoder's pooled embedding (1280) starts the vector `y` that
the U-Net adds to its timestep embedding (`size_vector`). The names are those of
`conditioner.embedders.N.*` in sd_xl_base_1.0.safetensors (ldm/checkpoint.py maps the prefix).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, fingerprint_used

SIZE_EMBEDDING = 256   # Fourier features per size value (sgm's ConcatTimestepEmbedderND outdim)


class SDXLConditioner(nn.Module):
    """encode(prompts) -> {"crossattn": (B, 77, 2048), "pooled": (B, 1280)}; the configs give
    each encoder's shape (the defaults are SDXL base 1.0's)."""

    def __init__(self, clip: dict | None = None, openclip: dict | None = None):
        super().__init__()
        clip = {"layer": "penultimate", **(clip or {})}
        openclip = {"width": 1280, "layers": 32, "heads": 20, "embed_dim": 1280, "layer": "penultimate",
                    "final_norm": False, **(openclip or {})}
        self.embedders = nn.ModuleList([FrozenCLIPEmbedder(**clip), FrozenOpenCLIPEmbedder(**openclip)])
        self.output_dim = sum(e.output_dim for e in self.embedders)

    def train(self, mode: bool = True):
        """Always stays in eval mode, as the encoders do."""
        return super().train(False)

    def encode(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        clip, openclip = self.embedders
        context = clip.encode(texts)
        tokens = openclip.tokenize(texts)
        second, pooled = openclip.encode_pooled(tokens, openclip.token_embedding(tokens))
        return {"crossattn": torch.cat([context, second.to(context.dtype)], dim=-1), "pooled": pooled}

    def forward(self, texts):
        return self.encode(texts)

    def unused_keys(self) -> list[str]:
        return [f"embedders.{i}.{k}" for i, e in enumerate(self.embedders) for k in e.unused_keys()]

    def fingerprint(self) -> str:
        return fingerprint_used(self)


def size_vector(pooled: torch.Tensor, original: tuple[int, int], crop: tuple[int, int],
                target: tuple[int, int]) -> torch.Tensor:
    """SDXL's added conditioning (Podell et al. 2023, Sec. 2.2): [pooled | Fourier(original h, w) |
    Fourier(crop top, left) | Fourier(target h, w)], each size value a 256-d [cos | sin] embedding."""
    values = torch.tensor([*original, *crop, *target], dtype=torch.float32, device=pooled.device)
    sizes = timestep_embedding(values, SIZE_EMBEDDING).reshape(1, -1).expand(pooled.shape[0], -1)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=-1)
