"""Pretraining of the toy base model with cross-attention that routes by word.

Stable Diffusion's cross-attention singles out a word where it applies after billions of images;
a toy model trained for an hour on a CPU does not get there by itself (its nouns got about 4 % of
the attention, spread evenly over the image). Perfusion's edit acts only through the attention
that falls on the concept's token, so the toy base model is pretrained with the localization
loss of FastComposer (Xiao et al. 2023, "cross-attention localization"): each object's noun should attend inside the
object's mask and not outside it. The generator knows every mask exactly. Only pretraining uses
it; Perfusion trains on the resulting model exactly as on SD.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.attention import cross_attention_layers


class LocalizedLatentDiffusion(LatentDiffusion):
    """LatentDiffusion plus `localization_weight` x the balanced localization loss of the nouns.

    `localize_words`: the object nouns (one token each); the k-th of them in a caption is object k,
    whose mask is `batch["object_masks"][:, k]`. A batch without object masks (fine-tuning on a
    concept's photos) trains as plain LatentDiffusion.
    """

    def __init__(self, *args, localize_words: Sequence[str], localization_weight: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        tokenizer = self.cond_stage_model.tokenizer
        ids = []
        for word in localize_words:
            encoded = tokenizer.encode(word)
            if len(encoded) != 1:
                raise ValueError(f"localize word {word!r} is {len(encoded)} tokens; each must be one token")
            ids.append(encoded[0])
        self.register_buffer("noun_ids", torch.tensor(ids), persistent=False)
        self.localization_weight = float(localization_weight)

    def noun_slots(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch index, object index, token position) of every noun in the captions."""
        tokens = self.cond_stage_model.tokenize(list(captions)).to(self.noun_ids.device)
        is_noun = torch.isin(tokens, self.noun_ids)
        rows, positions = is_noun.nonzero(as_tuple=True)             # row-major: caption order
        objects = is_noun.long().cumsum(dim=1)[rows, positions] - 1  # k-th noun of its caption
        keep = objects < 2
        return rows[keep], objects[keep], positions[keep]

    def localization_loss(self, probs: list[torch.Tensor], masks: torch.Tensor, slots) -> torch.Tensor:
        """mean over layers and nouns of (mean attention outside the mask - mean inside)."""
        rows, objects, positions = slots
        losses = []
        for p in probs:                                   # (B, heads, h*w, tokens)
            side = int(round(p.shape[2] ** 0.5))
            a = p.mean(dim=1)[rows, :, positions]         # (n, h*w): each noun's attention map
            m = F.interpolate(masks.float(), size=(side, side), mode="area")[rows, objects].flatten(1)
            inside = (a * m).sum(1) / m.sum(1).clamp_min(1e-6)
            outside = (a * (1 - m)).sum(1) / (1 - m).sum(1).clamp_min(1e-6)
            losses.append((outside - inside).mean())
        return torch.stack(losses).mean()

    def shared_step(self, batch):
        if "object_masks" not in batch:
            return super().shared_step(batch)
        captions = batch[self.cond_stage_key]
        slots = self.noun_slots(captions)
        probs: list[torch.Tensor] = []
        layers = [attn for _, attn in cross_attention_layers(self.model.diffusion_model)]
        for attn in layers:
            attn.attention_probs_hook = lambda module, p: probs.append(p)
        try:
            loss = super().shared_step(batch)
        finally:
            for attn in layers:
                attn.attention_probs_hook = None
        if len(slots[0]) == 0:
            return loss
        localization = self.localization_loss(probs, batch["object_masks"], slots)
        if self.training:
            self.log("train/localization", localization, on_step=True, batch_size=len(captions))
        return loss + self.localization_weight * localization
