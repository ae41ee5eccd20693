"""The training set of one concept: a few photos, their soft masks, and prompt templates.

Layout on disk (masks are written by `data/soft_segment.py`):

    <data_root>/cat1.jpg, cat2.png, ...        the concept's images
    <data_root>/mask/cat1.png, cat2.png, ...   8-bit soft masks, same stem, same size as the upright image
    <data_root>/captions.json                   optional (`captions`): {"cat1.jpg": "a {} on a sofa", ...}

Every image and mask is read, checked, cropped and resized once when the dataset is built (a
concept has a handful of images), so that a bad file fails before training starts and a
training step only flips and converts arrays.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info

from ldm.data.images import list_images, load_rgb, to_rgb
from ldm.data.templates import TEMPLATES, fill
from ldm.errors import MissingFileError, UserError

_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


class PersonalizedDataset(Dataset):
    """Items: `image` (3, size, size) in [-1, 1], `mask` (1, size, size) in [0, 1], `caption` (a template
    with `placeholder`), `caption_super` (the same template with `superclass`) and `key` (which image, and
    whether flipped: the key of its cached latent)

    Randomness (template, horizontal flip) comes from a generator seeded with `torch.initial_seed()`
    of the process or DataLoader worker that draws the item, so a run is reproducible from its seed.
    """

    def __init__(self, data_root: str | Path, placeholder: str, superclass: str, size: int = 512,
                 flip_p: float = 0.5, center_crop: bool = True, templates: Sequence[str] | None = None,
                 use_masks: bool = True, mask_dirname: str = "mask", captions: str | None = None):
        self.data_root = Path(data_root)
        for name, word in (("placeholder", placeholder), ("superclass", superclass)):
            if not isinstance(word, str) or not word.strip():
                raise UserError(f"{name} must be a non-empty word, got {word!r}")
        if not isinstance(size, int) or size < 1:
            raise UserError(f"size must be a positive number of pixels, got {size!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise UserError(f"flip_p must be a probability in [0, 1], got {flip_p!r}")
        self.templates = list(TEMPLATES if templates is None else templates)
        if not self.templates:
            raise UserError("templates is empty; give at least one prompt template such as 'a photo of a {}'")
        for template in self.templates:
            fill(template, placeholder)  # raises ValueError naming a template without exactly one '{}'
        self.placeholder, self.superclass = placeholder, superclass
        self.size, self.flip_p, self.center_crop = size, flip_p, center_crop

        self.paths = list_images(self.data_root)
        if not self.paths:
            raise UserError(f"{self.data_root}: no images found (expected files such as .jpg, .png, .webp)")
        self.image_templates = self._read_captions(captions, placeholder) if captions else None
        self.mask_paths = self._find_masks(mask_dirname) if use_masks else None
        self._images: list[np.ndarray] = []  # (size, size, 3) uint8
        self._masks: list[np.ndarray] = []  # (size, size) uint8
        for i, path in enumerate(self.paths):
            image = load_rgb(path)
            mask = self._read_mask(self.mask_paths[i], image.size) if use_masks else None
            self._images.append(np.array(self._fit(image, Image.Resampling.LANCZOS)))
            if mask is not None:
                self._masks.append(np.array(self._fit(mask, Image.Resampling.BILINEAR)))
        if self._masks and not any(m.any() for m in self._masks):
            raise UserError(f"{self.data_root / mask_dirname}: every mask is black, so the loss would see no pixel of "
                            "the concept; remake them (data/soft_segment.py, another --super_class) or set use_masks: false")
        self._rng: torch.Generator | None = None
        self._rng_owner: tuple[int, int | None] | None = None

    # ----------------------------------------------------------------- building
    def _find_masks(self, mask_dirname: str) -> list[Path]:
        stems: dict[str, Path] = {}
        for path in self.paths:
            if path.stem in stems:
                raise UserError(f"{path} and {stems[path.stem]} share the mask name {path.stem}.png; "
                                 "rename one of them")
            stems[path.stem] = path
        mask_dir = self.data_root / mask_dirname
        masks = [mask_dir / f"{path.stem}.png" for path in self.paths]
        missing = [m for m in masks if not m.is_file()]
        if missing:
            names = ", ".join(m.name for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise MissingFileError(
                f"{mask_dir}: {len(missing)} of {len(masks)} masks missing ({names}); make them with "
                f"`python data/soft_segment.py --image_dir {self.data_root} --super_class {self.superclass}` "
                f"or set use_masks: false")
        return masks

    def _read_captions(self, captions: str, placeholder: str) -> list[str]:
        """One template per image from a JSON object {image file name: template with '{}'}; it replaces
        `templates` (a caption that describes the rest of the picture leaves only the concept to learn)."""
        import json

        path = Path(captions) if Path(captions).is_absolute() else self.data_root / captions
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot read the captions file ({err.__class__.__name__}: {err})") from err
        if not isinstance(table, dict):
            raise UserError(f"{path}: expected a JSON object {{image file name: template}}, got {type(table).__name__}")
        missing = [p.name for p in self.paths if p.name not in table]
        if missing:
            raise UserError(f"{path}: no caption for {len(missing)} image(s) ({', '.join(missing[:3])})")
        templates = [table[p.name] for p in self.paths]
        wrong = [name for name, t in zip((p.name for p in self.paths), templates) if not isinstance(t, str)]
        if wrong:
            raise UserError(f"{path}: the caption of {wrong[0]} is {table[wrong[0]]!r}; expected text such as \"a {{}} on a sofa\"")
        for template in templates:
            fill(template, placeholder)   # raises ValueError naming a template without exactly one '{}'
        return templates

    @staticmethod
    def _read_mask(path: Path, image_size: tuple[int, int]) -> Image.Image:
        """The mask as 8-bit grayscale; it must have the size of the upright image."""
        try:
            with Image.open(path) as mask:
                mask.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise UserError(f"{path}: cannot read mask ({err.__class__.__name__}: {err})") from err
        if mask.size != image_size:
            raise UserError(f"{path}: mask is {mask.size[0]}x{mask.size[1]} but its image is "
                             f"{image_size[0]}x{image_size[1]} (width x height, after EXIF rotation); "
                             f"recompute it with data/soft_segment.py --overwrite")
        if mask.mode in _HIGH_DEPTH_MODES:
            return to_rgb(mask).convert("L")  # scales 16-bit / float ranges to 0..255
        return mask.convert("L")

    def _fit(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        """Centre square crop (if `center_crop`), then resize to size x size."""
        if self.center_crop:
            w, h = image.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side))
        return image.resize((self.size, self.size), resample=resample)

    # ----------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.paths)

    def _generator(self) -> torch.Generator:
        """A generator per process / DataLoader worker, seeded from that process's torch seed."""
        worker = get_worker_info()
        owner = (os.getpid(), worker.id if worker is not None else None)
        if self._rng is None or self._rng_owner != owner:
            self._rng = torch.Generator().manual_seed(torch.initial_seed())
            self._rng_owner = owner
        return self._rng

    def __getitem__(self, index: int) -> dict:
        rng = self._generator()
        if self.image_templates is not None:
            template = self.image_templates[index]
        else:
            template = self.templates[int(torch.randint(len(self.templates), (), generator=rng))]
        flip = bool(torch.rand((), generator=rng) < self.flip_p)
        image = self._images[index]
        mask = self._masks[index] if self._masks else None
        if flip:
            image = image[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        if mask is None:
            mask = torch.ones(1, self.size, self.size)
        else:
            mask = torch.from_numpy(np.ascontiguousarray(mask)).float().unsqueeze(0) / 255.0
        return {
            "image": image,
            "mask": mask,
            "caption": fill(template, self.placeholder),
            "caption_super": fill(template, self.superclass),
            "key": f"{index}{' flipped' if flip else ''}",   # the latent cache's key (ldm training_latents)
        }
