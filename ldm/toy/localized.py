"""Toy base model training whose cross-attention routes by word, with the text encoder frozen.

Perfusion's edit acts only through the attention that falls on the concept's token, and its key
lock assumes the superclass word attends where its object is. Stable Diffusion learns that from
billions of images; the toy model, trained for an hour, spreads every word's attention over the
whole image. So the toy U-Net is trained with FastComposer's localization loss (Xiao et al.
2023) added: each object's words (its position, colour, pattern and noun) should attend inside the
object's mask, which the generator knows exactly. The text encoder stays frozen, as SD's is: the
loss trains the U-Net's queries and keys only, so it cannot collapse what the words encode (with a
trainable encoder it did: docs/toy-world.md). Only pretraining uses this; Perfusion then trains
on the result exactly as on SD.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.attention import cross_attention_layers


class LocalizedLatentDiffusion(LatentDiffusion):
    """LatentDiffusion + `localization_weight` x the balanced localization loss of object words.

    Caption grammar: an object's `before` words (in the toy's: position, colour, pattern) precede its
    noun, its `after` words (none in the toy's) follow it, so a word's object is the count of nouns
    around it. Object k's mask is `batch["object_masks"][:, k]`; a batch without masks trains as
    plain LatentDiffusion.
    """

    def __init__(self, *args, nouns: Sequence[str], before: Sequence[str] = (), after: Sequence[str] = (),
                 localization_weight: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise UserError("LocalizedLatentDiffusion needs cond_stage_trainable: false (a frozen text encoder)")
        for name, words in (("nouns", nouns), ("before", before), ("after", after)):
            self.register_buffer(f"{name}_ids", self._token_ids(words), persistent=False)
        self.localization_weight = float(localization_weight)

    def _token_ids(self, words: Sequence[str]) -> torch.Tensor:
        ids = []
        for word in words:
            encoded = self.cond_stage_model.tokenizer.encode(word)
            if len(encoded) != 1:
                raise UserError(f"localized word {word!r} is {len(encoded)} tokens; each must be one token")
            ids.append(encoded[0])
        return torch.tensor(ids, dtype=torch.long)

    def word_slots(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch index, object index, token position) of every localized word of the captions."""
        tokens = self.cond_stage_model.tokenize(list(captions)).to(self.nouns_ids.device)
        is_noun = torch.isin(tokens, self.nouns_ids)
        is_before, is_after = torch.isin(tokens, self.before_ids), torch.isin(tokens, self.after_ids)
        nouns_so_far = is_noun.long().cumsum(dim=1)                  # including this token
        objects = torch.where(is_before, nouns_so_far, nouns_so_far - 1)
        keep = (is_noun | is_before | is_after) & (objects >= 0) & (objects < 2)
        rows, positions = keep.nonzero(as_tuple=True)
        return rows, objects[rows, positions], positions

    @staticmethod
    def localization_loss(probs: list[torch.Tensor], masks: torch.Tensor, slots) -> torch.Tensor:
        """Mean over layers and words of (mean attention outside the object's mask - mean inside)."""
        rows, objects, positions = slots
        losses = []
        for p in probs:                                   # (B, heads, h*w, tokens)
            side = int(round(p.shape[2] ** 0.5))
            a = p.mean(dim=1)[rows, :, positions]         # (n, h*w): each word's attention map
            m = F.interpolate(masks.float(), size=(side, side), mode="area")[rows, objects].flatten(1)
            inside = (a * m).sum(1) / m.sum(1).clamp_min(1e-6)
            outside = (a * (1 - m)).sum(1) / (1 - m).sum(1).clamp_min(1e-6)
            losses.append((outside - inside).mean())
        return torch.stack(losses).mean()

    def shared_step(self, batch):
        if "object_masks" not in batch:
            return super().shared_step(batch)
        slots = self.word_slots(batch[self.cond_stage_key])
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
            self.log("train/localization", localization, on_step=True, batch_size=len(slots[0]))
        return loss + self.localization_weight * localization
