"""A contact sheet of images beside their soft-mask overlays, to check the segmentation at a glance."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm.errors import UserError

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
    """`image` scaled to fit inside a box x box square, aspect ratio kept."""
    scale = box / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def make_preview(items: Sequence[tuple[str, Image.Image, np.ndarray]], thumb: int = 192,
                 pairs_per_row: int = 3) -> Image.Image:
    """Grid of (name, image, uint8 mask) entries: image | overlay, labelled with the name,
    the mask's peak and the fraction of pixels above one half."""
    if not items:
        raise UserError("no images to preview")
    font = ImageFont.load_default()
    label_h, pad = 18, 6
    cols = min(pairs_per_row, len(items))
    cells = [(name, _fit(image, thumb), _fit(overlay(image, mask), thumb), mask) for name, image, mask in items]
    rows = [cells[i : i + cols] for i in range(0, len(cells), cols)]
    heights = [max(c[1].height for c in row) + label_h for row in rows]
    cell_w = 2 * thumb + pad
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, sum(heights) + pad * (len(rows) + 1)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = pad
    for row, height in zip(rows, heights):
        for k, (name, small, over, mask) in enumerate(row):
            x = pad + k * (cell_w + pad)
            sheet.paste(small, (x + (thumb - small.width) // 2, y))
            sheet.paste(over, (x + thumb + pad + (thumb - over.width) // 2, y))
            stats = f"peak {mask.max() / 255:.2f}, >0.5: {(mask > 127).mean():.0%}"
            label = f"{_shorten(name, 2 * thumb // 7 - len(stats) - 2)}  {stats}"
            draw.text((x, y + height - label_h + 3), label, fill=(230, 230, 230), font=font)
        y += height + pad
    return sheet


def _shorten(text: str, limit: int) -> str:
    limit = max(limit, 8)
    return text if len(text) <= limit else text[: limit - 3] + "..."
