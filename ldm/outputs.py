"""Writing generated images: PNGs with their settings as text metadata, and grids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid

from ldm.errors import UserError
from ldm.util import atomic_path

SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "dpmpp_2m": "DPM++ 2M"}   # as AUTOMATIC1111 writes them


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def a1111_parameters(meta: dict) -> str:
    """The settings as AUTOMATIC1111 writes them under the PNG key `parameters` (prompt, "Negative prompt:",
    then "Steps: ..., Sampler: ..."), which image browsers and tools around it read."""
    fields = {"Steps": meta.get("steps"), "Sampler": SAMPLER_NAMES.get(meta.get("sampler"), meta.get("sampler")),
              "Schedule type": "Karras" if meta.get("sampler") in ("euler", "dpmpp_2m") else None,
              "CFG scale": meta.get("scale"), "Seed": meta.get("seed"),
              "Size": f"{meta['W']}x{meta['H']}" if "W" in meta and "H" in meta else None,
              "Model": Path(meta["ckpt"]).stem if meta.get("ckpt") else None,
              "Batch size": meta.get("n_samples"), "Batch pos": meta.get("index_in_batch"),
              "Eta": meta.get("ddim_eta") or None}
    lines = [meta.get("prompt", "")]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, metadata: Mapping | None = None) -> Path:
    """Write atomically; `metadata` goes into the text chunk 'settings' as JSON and, for the image of a
    prompt, into 'parameters' in AUTOMATIC1111's text form (a1111_parameters)."""
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text("settings", json.dumps(metadata, sort_keys=True))
        if "prompt" in metadata:
            info.add_text("parameters", a1111_parameters(dict(metadata)))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def next_index(folder: Path) -> int:
    """First unused sample number in `folder`, so runs never overwrite earlier samples."""
    numbers = [int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()]
    return max(numbers, default=-1) + 1


def save_samples(images: torch.Tensor, outdir: str | Path, metadata: Sequence[Mapping]) -> list[Path]:
    """Save each image as outdir/samples/NNNNN.png with its own metadata."""
    folder = Path(outdir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    start = next_index(folder)
    return [save_png(to_pil(img), folder / f"{start + i:05d}.png", meta)
            for i, (img, meta) in enumerate(zip(images, metadata))]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, metadata: Mapping | None = None) -> Path:
    return save_png(to_pil(make_grid(images, nrow=nrow, padding=2, pad_value=1.0)), Path(path), metadata)


def save_labelled_grid(images: torch.Tensor, path: str | Path, labels: Sequence[str],
                       metadata: Mapping | None = None) -> Path:
    """Grid with one column per label, the label written above its column.

    `images` (rows * len(labels), 3, H, W) in row-major order: image i is in column i % len(labels).
    """
    from PIL import ImageDraw, ImageFont

    cols = len(labels)
    if cols == 0 or len(images) % cols:
        raise UserError(f"{len(images)} images do not fill {cols} labelled columns")
    grid = to_pil(make_grid(images, nrow=cols, padding=2, pad_value=1.0))
    cell = images.shape[-1] + 2
    size = 24   # largest font size (up to 24 px) at which every label fits its column
    while size > 6 and max(ImageFont.load_default(size=size).getlength(t) for t in labels) > cell - 4:
        size -= 1
    font = ImageFont.load_default(size=size)
    margin = size + 6
    canvas = Image.new("RGB", (grid.width, grid.height + margin), "white")
    canvas.paste(grid, (0, margin))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        x = 2 + i * cell + (cell - 2 - font.getlength(label)) / 2
        draw.text((x, 3), label, fill="black", font=font)
    return save_png(canvas, Path(path), metadata)
