"""Captioned toy-world images for pretraining, rendered on the fly from (seed, index).

Used by main.py through a config's data section:

    data:
      target: ldm.toy.dataset.ToyCaptionDataset
      params: {n: 200000, seed: 0, size: 32, split: train}
      batch_size: 32
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.errors import UserError
from ldm.toy.drawing import render
from ldm.toy.world import Scene, as_request, caption, sample_scene

SPLITS = ("train", "heldout")


class ToyCaptionDataset(Dataset):
    """Items `{"image": (3, size, size) float in [-1, 1], "caption": str}`.

    Item i is a pure function of (seed, i): the same on every machine, process and worker.
    split "train" never contains a HELD_OUT (colour, shape) pair nor a concept look; split
    "heldout" has at least one HELD_OUT pair in every scene. Captions leave out an object's
    colour with probability `p_drop_colour`, the position of a lone object with
    `p_drop_position` and the background with `p_drop_background`, so that the model also
    learns the shorter phrasings ("on the left a star") that concept prompts use. With probability
    `p_drop_caption` the whole caption is "" (decided by its own stream, so the other items do not
    change), which teaches the unconditional prediction that classifier-free guidance needs.
    `p_textured`: the share of objects drawn with a generic two-colour texture (split "train"),
    captioned with it ("a red and green striped star") unless the colour is dropped ("a star"), so a
    look can be put into words and a superclass word covers varied looks, as in real data.
    `hue_jitter`: the share of images whose hue is rotated by a random angle (a rotation of RGB
    about the gray axis: gray stays gray, the mean of R, G, B is kept unless clipped), which shows an autoencoder the
    colours between the named ones that personal concepts have; for autoencoder training, whose
    captions are unused.
    `masks=True` adds `"object_masks"` (2, size, size) float in [0, 1]: each object's soft mask in
    caption order, zeros where the scene has fewer objects (what the localization loss of
    `ldm.toy.localized` needs).
    """

    def __init__(self, n: int, seed: int = 0, size: int = 32, split: str = "train",
                 p_drop_colour: float = 0.1, p_drop_position: float = 0.1, p_drop_background: float = 0.15,
                 p_drop_caption: float = 0.0, p_textured: float = 0.0, hue_jitter: float = 0.0, masks: bool = False):
        if not isinstance(n, int) or n < 1:
            raise UserError(f"n must be a positive number of items, got {n!r}")
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not isinstance(size, int) or size < 16:
            raise UserError(f"size must be an integer of at least 16 pixels, got {size!r}")
        for name, p in (("p_drop_colour", p_drop_colour), ("p_drop_position", p_drop_position),
                        ("p_drop_background", p_drop_background), ("p_drop_caption", p_drop_caption),
                        ("p_textured", p_textured), ("hue_jitter", hue_jitter)):
            if not 0.0 <= p <= 1.0:
                raise UserError(f"{name} must be a probability in [0, 1], got {p!r}")
        self.n, self.seed, self.size, self.split = n, int(seed), size, split
        self.p_drop = (p_drop_colour, p_drop_position, p_drop_background)
        self.p_drop_caption, self.p_textured = float(p_drop_caption), float(p_textured)
        self.hue_jitter, self.masks = float(hue_jitter), bool(masks)

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> tuple[Scene, Scene]:
        """(the rendered scene, the request its caption states) of item `index`."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = np.random.default_rng([self.seed, index])
        scene = sample_scene(rng, self.split, p_textured=self.p_textured)
        p_colour, p_position, p_background = self.p_drop
        count = len(scene.objects)
        request = as_request(
            scene,
            drop_colour=[bool(rng.random() < p_colour) for _ in range(count)],
            drop_position=[count == 1 and bool(rng.random() < p_position)],
            drop_background=bool(rng.random() < p_background),
        )
        return scene, request

    def __getitem__(self, index: int) -> dict:
        scene, request = self.scene(index)
        image, masks = render(scene, self.size)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        hue = np.random.default_rng([self.seed, index, 2])
        if self.hue_jitter and hue.random() < self.hue_jitter:
            pixels = rotate_hue(pixels, float(hue.uniform(0, 2 * np.pi)))
        dropped = np.random.default_rng([self.seed, index, 1]).random() < self.p_drop_caption
        item = {"image": pixels, "caption": "" if dropped else caption(request)}
        if self.masks:
            item["object_masks"] = torch.zeros(2, self.size, self.size)
            for k, m in enumerate(masks):
                item["object_masks"][k] = torch.from_numpy(m.astype(np.float32) / 255.0)
        return item


def rotate_hue(pixels: torch.Tensor, angle: float) -> torch.Tensor:
    """(3, H, W) in [-1, 1], hue rotated by `angle` radians: Rodrigues' rotation about (1, 1, 1)."""
    c, s, k = np.cos(angle), np.sin(angle), 1 / np.sqrt(3)
    axis = np.full(3, k)
    cross = np.array([[0, -k, k], [k, 0, -k], [-k, k, 0]])
    m = torch.tensor(c * np.eye(3) + s * cross + (1 - c) * np.outer(axis, axis), dtype=pixels.dtype)
    rgb = (pixels + 1) / 2
    return (torch.einsum("ij,jhw->ihw", m, rgb).clamp(0, 1) * 2 - 1)
