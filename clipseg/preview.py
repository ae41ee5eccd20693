"""A contact sheet of images beside their soft-mask overlays, to check the segmentation at a glance."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TINT = np.array([255.0, 40.0, 40.0])
BACKGROUND = (32, 32, 32)


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image dimmed where the mask is low and tinted red in proportion to the mask."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    if mask.shape != rgb.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.BILINEAR))
    m = (mask.astype(np.float64) / 255.0)[..., None]
    out = rgb * (0.25 + 0.75 * m) * (1 - 0.35 * m) + TINT * 0.35 * m
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _fit(image: Image.Image, box: int) -> Image.Image:
    """`image` scaled to fit a box x box square, centred on a dark canvas."""
    scale = box / max(image.size)
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", (box, box), BACKGROUND)
    canvas.paste(small, ((box - small.width) // 2, (box - small.height) // 2))
    return canvas


def make_preview(items: Sequence[tuple[str, Image.Image, np.ndarray]], thumb: int = 192,
                 pairs_per_row: int = 3) -> Image.Image:
    """Grid of (name, image, uint8 mask) entries: image | overlay, labelled with the name,
    the mask's peak and the fraction of pixels above one half."""
    if not items:
        raise ValueError("no images to preview")
    font = ImageFont.load_default()
    label_h, pad = 18, 6
    cols = min(pairs_per_row, len(items))
    rows = -(-len(items) // cols)
    cell_w, cell_h = 2 * thumb + pad, thumb + label_h
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, (name, image, mask) in enumerate(items):
        x = pad + (k % cols) * (cell_w + pad)
        y = pad + (k // cols) * (cell_h + pad)
        sheet.paste(_fit(image, thumb), (x, y))
        sheet.paste(_fit(overlay(image, mask), thumb), (x + thumb + pad, y))
        stats = f"peak {mask.max() / 255:.2f}, >0.5: {(mask > 127).mean():.0%}"
        draw.text((x, y + thumb + 3), f"{_shorten(name, 2 * thumb // 7 - len(stats) - 2)}  {stats}", fill=(230, 230, 230), font=font)
    return sheet


def _shorten(text: str, limit: int) -> str:
    limit = max(limit, 8)
    return text if len(text) <= limit else text[: limit - 3] + "..."
