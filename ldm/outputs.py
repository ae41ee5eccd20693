"""Writing generated images: PNGs with their settings as text metadata, and grids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid

from ldm.util import atomic_path


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_png(image: Image.Image, path: Path, metadata: Mapping | None = None) -> Path:
    """Write atomically; `metadata` goes into a tEXt chunk 'parameters' as JSON."""
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text("parameters", json.dumps(metadata, sort_keys=True))
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
