"""The prompt-ensemble soft mask: CLIPSeg's sigmoid prediction averaged over prompt templates.

Perfusion weights its diffusion loss by a zero-shot soft mask of the concept (Tewel et al. 2023,
the "zero-shot mask" of the training setup and its ablation); here it is the mean over the
training templates ("a photo of a {}", ...) filled with the superclass word, resized back to
each image's size. It is stored unnormalised; training normalises it by its maximum.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data.templates import TEMPLATES, fill
from ldm.errors import UserError


class SoftMasker:
    """Soft masks of one word for batches of images.

    The text side (one conditional embedding per template) is computed once; for each batch of
    images the CLIP vision encoder runs once and only CLIPSeg's small decoder runs per template.
    """

    def __init__(self, model, processor, word: str, templates: Sequence[str] = TEMPLATES):
        word = " ".join(word.split())
        if not word:
            raise UserError("the superclass word is empty")
        if not templates:
            raise UserError("no prompt templates given")
        self.model, self.processor = model, processor
        self.prompts = [fill(t, word) for t in templates]
        self.device = next(model.parameters()).device
        text = processor.tokenizer(self.prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            self.conditionals = model.get_conditional_embeddings(
                batch_size=len(self.prompts),
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )  # (T, projection_dim)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Mean over templates of sigmoid(logits), shape (B, H, W) at CLIPSeg's resolution, on the CPU."""
        if not images:
            raise UserError("no images given")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        # Same steps as CLIPSegForImageSegmentation.forward, with the vision pass shared by all
        # templates (tests/test_soft_segment.py checks equality with forward()).
        vision = self.model.clip.vision_model(pixel_values=pixels, output_hidden_states=True,
                                              interpolate_pos_encoding=True)
        activations = [vision.hidden_states[i + 1] for i in self.model.extract_layers]
        total = None
        for cond in self.conditionals:
            logits = self.model.decoder(activations, cond.expand(pixels.shape[0], -1)).logits
            prob = torch.sigmoid(logits.float())
            total = prob if total is None else total + prob
        return (total / len(self.conditionals)).cpu()

    def masks(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """One uint8 mask (height, width) per image, at that image's own size."""
        probs = self.probabilities(images)
        return [probability_to_uint8(p, img.size) for p, img in zip(probs, images)]


def probability_to_uint8(prob: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resize a (h, w) probability map bilinearly to `size` = (width, height) and quantise to 0..255."""
    width, height = size
    resized = F.interpolate(prob[None, None].float(), size=(height, width), mode="bilinear", align_corners=False,
                            antialias=True)[0, 0]
    return (resized.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
