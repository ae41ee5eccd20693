"""Loading user images as plain RGB, whatever their mode, orientation or format.

Shared by the mask script and the training dataset: both want an 8-bit RGB `PIL.Image` the way
the photo looks on screen (EXIF rotation applied, transparency over white).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import MissingFileError, NotAFolderError, UserError

# Extensions PIL can open (".jpg", ".png", ".webp", ...), computed once.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())


def is_image_file(path: str | Path) -> bool:
    """True for a file whose extension PIL knows how to open."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside `directory`, sorted by name.

    Sub-folders, hidden files (".DS_Store", "._x.jpg"), JSON files (a concept's captions.json) and
    class.txt (a DreamBench subject's class word) are ignored silently; any other file whose extension
    is not an image format is skipped with a warning.
    """
    directory = Path(directory)
    if not directory.exists():
        raise MissingFileError(f"{directory}: no such directory (expected a folder of images)")
    if not directory.is_dir():
        raise NotAFolderError(f"{directory}: is a file, expected a folder of images")
    images, skipped = [], []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() == ".json" or path.name == "class.txt" \
                or path.is_dir():
            continue
        if not path.is_file():   # a broken link, a link loop, a socket: not readable as an image
            skipped.append(path)
            continue
        (images if is_image_file(path) else skipped).append(path)
    if skipped:
        names = ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"{directory}: skipped {len(skipped)} file(s) that are not images (or not readable): {names}",
                      stacklevel=2)
    return images


def load_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image as 8-bit RGB, upright per its EXIF orientation, transparency composited on `background`.

    Handles RGB, RGBA/LA, grayscale (8- and 16-bit, float), palette (with or without a
    transparent colour) and CMYK. Raises FileNotFoundError or ValueError naming `path`.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read image ({err.__class__.__name__}: {err})") from err
    return to_rgb(img, background)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; an alpha channel is composited on `background`."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = _high_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float grayscale to 8-bit by the range of the format, not per-image stretching.

    "I;16*" is 0..65535; "I" (any integer depth) is taken as 16-bit when a value exceeds 255;
    "F" is taken as 0..1 when no value exceeds 1.
    """
    arr = np.asarray(img, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        arr = arr * (255.0 / 65535.0)
    elif img.mode == "F" and peak <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
