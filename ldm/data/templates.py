"""Prompt templates of the training set, textual-inversion style; `{}` stands for the word.

The Perfusion dataset fills them with the concept's placeholder token, and the CLIPSeg mask
script fills them with the superclass word, so that the soft mask is averaged over the same
phrasings the concept is trained on.
"""
from __future__ import annotations

from ldm.errors import UserError

TEMPLATES: list[str] = [
    "a photo of a {}",
    "a photo of the {}",
    "a photo of my {}",
    "a photo of one {}",
    "a good photo of a {}",
    "a good photo of the {}",
    "a close-up photo of a {}",
    "a close-up photo of the {}",
    "a cropped photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of the {}",
    "a dark photo of the {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a photo of a small {}",
    "a photo of the large {}",
    "a photo of a nice {}",
    "a photo of the cool {}",
    "a photo of the weird {}",
    "a picture of a {}",
    "an image of the {}",
    "a rendering of a {}",
    "a rendition of the {}",
]


def fill(template: str, word: str) -> str:
    """`template` with `{}` replaced by `word` (a single placeholder is required)."""
    if template.count("{}") != 1:
        raise UserError(f"template {template!r} must contain exactly one '{{}}' placeholder")
    return template.replace("{}", word)
