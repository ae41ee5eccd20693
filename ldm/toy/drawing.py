"""Drawing toy-world scenes: each object's shape, fill (a colour, a concept's look, a two-colour
pattern) and position on its background, antialiased, with a soft mask per object."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from ldm.toy.world import BACKGROUNDS, COLOURS, CONCEPTS, POSITIONS, Scene, SceneObject, describe

_PLAIN_BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "brown": (110, 75, 45)}
_CHECKS = ((85, 85, 85), (45, 45, 45))  # light and dark cells of "checkered"
_CHECK_CELL = 4 / 32  # cell side, fraction of the image side (4 px at 32x32)
SUPERSAMPLE = 4  # render at 4x and average 4x4 blocks: antialiased edges, deterministic


def _shape_mask(shape: str, cx: float, cy: float, d: float, side: int) -> Image.Image:
    """Binary (0/255) mode-L mask of `shape` centred at (cx, cy) px with diameter d px."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    r = d / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        inner = 0.5 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        h = 0.85 * r
        _box(draw, cx - h, cy - h, cx + h, cy + h)
    elif shape == "cross":
        arm, w = 0.95 * r, 0.34 * r
        _box(draw, cx - arm, cy - w, cx + arm, cy + w)
        _box(draw, cx - w, cy - arm, cx + w, cy + arm)
    elif shape == "triangle":
        big = 1.15 * r  # circumradius; shifted down so that the bounding box is centred
        shift = big / 4
        draw.polygon([(cx + big * math.cos(a), cy + shift + big * math.sin(a))
                      for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=255)
    elif shape == "star":
        outer, inner = 1.1 * r, 0.5 * r
        shift = outer * (1 - math.cos(math.pi / 5)) / 2
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = outer if k % 2 == 0 else inner
            points.append((cx + rad * math.cos(a), cy + shift + rad * math.sin(a)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def _box(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float) -> None:
    """Fill the pixels whose centres lie in [x0, x1) x [y0, y1) (PIL's rectangle includes its end)."""
    draw.rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), fill=255)


@lru_cache(maxsize=32)
def _background(name: str, side: int) -> Image.Image:
    if name in _PLAIN_BACKGROUNDS:
        return Image.new("RGB", (side, side), _PLAIN_BACKGROUNDS[name])
    if name == "checkered":
        cell = max(1, round(_CHECK_CELL * side))
        idx = np.arange(side) // cell
        light = ((idx[:, None] + idx[None, :]) % 2 == 0)[..., None]
        return Image.fromarray(np.where(light, np.uint8(_CHECKS[0]), np.uint8(_CHECKS[1])).astype(np.uint8), "RGB")
    raise ValueError(f"unknown background {name!r}; expected one of {', '.join(BACKGROUNDS)}")


def _fill(obj: SceneObject, cx: float, cy: float, d: float, side: int) -> Image.Image:
    """The colours of the object's surface (its look) over the whole canvas, before masking."""
    if obj.look != "plain":
        concept = CONCEPTS[obj.look]
        pattern, colours = concept.pattern, concept.colours
        if pattern == "solid":
            return Image.new("RGB", (side, side), colours[0])
    elif obj.texture is not None:
        pattern, colours = obj.texture[0], tuple(COLOURS[c] for c in obj.texture[1:])
    else:
        return Image.new("RGB", (side, side), COLOURS[obj.colour])
    a, b = (np.array(c, np.uint8) for c in colours)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    if pattern == "stripes":
        # 4 px bands at 32x32, aligned on the object's centre (2-px bands blur in the autoencoder)
        band = side * 4 / 32
        second = np.floor((ys - cy) / band) % 2 == 1
    elif pattern == "dots":
        step, radius = 0.3 * d, 0.1 * d  # 3x3 dots inside the square (half side 0.425 d)
        gx, gy = np.round((xs - cx) / step), np.round((ys - cy) / step)
        near = (np.abs(gx) <= 1) & (np.abs(gy) <= 1)
        second = near & ((xs - cx - gx * step) ** 2 + (ys - cy - gy * step) ** 2 <= radius ** 2)
    elif pattern == "halves":
        second = ys >= cy
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return Image.fromarray(np.where(second[..., None], b, a), "RGB")


def render(scene: Scene, size: int = 32) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene as a size x size RGB image, and each object's soft mask (uint8, 255 = object).

    Drawn at SUPERSAMPLE times the size with hard edges, then each SUPERSAMPLE x SUPERSAMPLE
    block is averaged (box filter), which antialiases edges and makes the masks soft.
    """
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}")
    if scene.background is None:
        raise ValueError("cannot render a scene without a background (it is a request, not a scene)")
    side = size * SUPERSAMPLE
    canvas = _background(scene.background, side).copy()
    masks_hi: list[Image.Image] = []
    for obj in scene.objects:
        if obj.position is None or (obj.look == "plain" and obj.colour is None and obj.texture is None):
            raise ValueError(f"cannot render {describe(obj)!r}: position and colour (of a plain object) must be set")
        fx, fy = POSITIONS[obj.position]
        cx, cy, d = (fx + obj.offset[0]) * side, (fy + obj.offset[1]) * side, obj.size * side
        mask = _shape_mask(obj.shape, cx, cy, d, side)
        canvas.paste(_fill(obj, cx, cy, d, side), (0, 0), mask)
        hidden = ImageChops.invert(mask)  # a later object hides an earlier one
        masks_hi = [ImageChops.multiply(m, hidden) for m in masks_hi] + [mask]
    box = Image.Resampling.BOX
    masks = [np.asarray(m.resize((size, size), box)) for m in masks_hi]
    return canvas.resize((size, size), box), masks
