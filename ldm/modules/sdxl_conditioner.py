"""Stable Diffusion XL's text conditioning: two frozen text encoders, concatenated per token.

`embedders.0` is CLIP ViT-L/14 and `embedders.1` OpenCLIP ViT-bigG/14, both read at their
next-to-last layer without a final norm: 768 + 1280 = 2048 values per token, the U-Net's
cross-attention context. The second encoder's pooled embedding (1280) starts the vector `y` that
the U-Net adds to its timestep embedding (`size_vector`). The names are those of
`conditioner.embedders.N.*` in sd_xl_base_1.0.safetensors (ldm/checkpoint.py maps the prefix).

It also has the text-encoder interface that Perfusion and the covariance estimate use (`tokenize`,
`token_embedding`, `encode_embeddings`): both encoders share CLIP's vocabulary, so one token row
holds a word's embedding in both tables side by side (768 + 1280), and a placeholder's learned row
is one 2048-d vector whose halves go to the two encoders.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, fingerprint_used
from ldm.util import to_device

SIZE_EMBEDDING = 256   # Fourier features per size value (sgm's ConcatTimestepEmbedderND outdim)


class JointEmbedding:
    """Both encoders' token embeddings side by side: tokens (B, T) -> (B, T, 768 + 1280). A view of the
    two tables, not a module of its own (it adds no weights and no state-dict names)."""

    def __init__(self, tables: Sequence[nn.Embedding]):
        self.tables = list(tables)
        self.embedding_dim = sum(t.embedding_dim for t in self.tables)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([t(tokens) for t in self.tables], dim=-1)


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
        self.tokenizer = self.embedders[0].tokenizer   # end-token padding; the second encoder's is derived
        self.max_length = self.tokenizer.max_length

    def train(self, mode: bool = True):
        """Always stays in eval mode, as the encoders do."""
        return super().train(False)

    @property
    def token_embedding(self) -> JointEmbedding:
        return JointEmbedding([e.token_embedding for e in self.embedders])

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B, 77) padded with the end token, as the first encoder reads them."""
        return self.embedders[0].tokenize(texts)

    def encode(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenize(texts)
        context, pooled = self.encode_pooled(tokens, self.token_embedding(tokens))
        return {"crossattn": context, "pooled": pooled}

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """The second encoder's pooled embedding (B, 1280) of prompts, alone."""
        openclip = self.embedders[1]
        tokens = openclip.tokenize(texts)
        return openclip.encode_pooled(tokens, openclip.token_embedding(tokens))[1]

    def encode_embeddings(self, tokens: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The cross-attention context (B, 77, 2048) from joint token embeddings (B, 77, 768 + 1280)."""
        return self._encode(tokens, embeds, pooled=False)[0]

    def encode_pooled(self, tokens: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context as `encode_embeddings`, the second encoder's pooled embedding (B, 1280))."""
        return self._encode(tokens, embeds, pooled=True)

    def _encode(self, tokens: torch.Tensor, embeds: torch.Tensor, pooled: bool):
        clip, openclip = self.embedders
        context = clip.encode_embeddings(tokens, embeds[..., :clip.width])
        # OpenCLIP pads with token 0: the positions after the first end token get its id and embedding.
        end = (tokens == self.tokenizer.eot_token_id).int()
        pad = end.cumsum(1) - end > 0
        tokens_2 = tokens.masked_fill(pad, 0)
        embeds_2 = torch.where(pad[..., None], openclip.token_embedding(tokens_2), embeds[..., clip.width:])
        if pooled:
            second, vector = openclip.encode_pooled(tokens_2, embeds_2)
        else:
            second, vector = openclip.encode_embeddings(tokens_2, embeds_2), None
        return torch.cat([context, second.to(context.dtype)], dim=-1), vector

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
    values = to_device(torch.tensor([*original, *crop, *target], dtype=torch.float32), pooled.device)
    sizes = timestep_embedding(values, SIZE_EMBEDDING).reshape(1, -1).expand(pooled.shape[0], -1)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=-1)
