"""Perfusion on Stable Diffusion XL: PerfusionLatentDiffusion over SDXL's two text encoders.

The concept's word embedding is one 2048-d row whose halves are the placeholder's rows in the CLIP
ViT-L/14 (768) and OpenCLIP ViT-bigG/14 (1280) tables (`SDXLConditioner.token_embedding`), both
learned; i* and i_super are 2048-d encodings of the concatenated context, C is 2048 x 2048 over it,
and o*_V is one vector per cross-attention layer (70 in SDXL base).

The pooled embedding (bigG's end token, which enters every U-Net block through `label_emb`) is the
superclass prompt's, in training and in sampling. The concept then acts only through the gated
rank-1 edit, as the paper's method does: beta and tau dial all of it, and several concepts combine
as Appendix B says. A pooled vector of the concept prompt would be a global channel without a
gate: the learned embedding would reach every pixel through `label_emb` whatever beta is, and two
concepts' embeddings would mix there.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ldm.models.diffusion.sdxl import SDXLLatentDiffusion
from ldm.perfusion.model import PerfusionLatentDiffusion


class PerfusionSDXL(PerfusionLatentDiffusion, SDXLLatentDiffusion):
    def conditioning(self, context: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"crossattn": the (packed) context, "pooled": the superclass prompts' pooled embedding}."""
        pooled = self.frozen_encodings("pooled", [self.superclass_prompt(p) for p in prompts], self.cond_stage_model.pooled)
        return self.drop_empty({"crossattn": context, "pooled": pooled.to(context.dtype)}, prompts)
