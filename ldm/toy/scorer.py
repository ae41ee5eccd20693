"""Judge generated toy-world images against what their prompts asked for.

    scorer = Scorer.load("ckpt/toy/scorer.safetensors")
    results = scorer.score(images, requests)  # images (B, 3, 32, 32) in [0, 1]; requests: Scenes
    attribute_accuracy(results)  # {"shape": 0.93, "colour": 0.88, ..., "overall": 0.9}

A small CNN (`ScorerNet`) trained on the generator's labelled renders (`python -m
ldm.toy.train_scorer`) predicts, for each of the five position slots, whether an object is there
and its shape, colour and look, and the background. `Scorer.score` then matches the requested
objects to the occupied slots (the assignment under which most requested attributes hold, so
that an object drawn at the wrong place still gets its shape and colour judged) and reports one
boolean per requested attribute; attributes the request leaves unset are None.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ldm.errors import MissingFileError, UserError
from ldm.toy.world import BACKGROUNDS, COLOURS, LOOKS, POSITIONS, SHAPES, Scene, vocabulary
from ldm.util import atomic_path

FORMAT, VERSION = "toy-scorer", 1
SLOTS: tuple[str, ...] = tuple(POSITIONS)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
IMAGE_SIZE = 32
PRESENT = 0.5  # presence probability above which a slot counts as occupied
# Attributes a prompt asks for; "overall" pools them. `plain_look` (a plain object shows no
# concept look: leakage) and `count` (no missing or extra objects) are reported beside them.
REQUESTED = ("shape", "colour", "position", "look", "background")
DIAGNOSTIC = ("plain_look", "count")


class ScorerNet(nn.Module):
    """A small fully convolutional trunk (32x32 -> 8x8 features, receptive field 30 px: twice
    the largest object), its features read at each slot's centre by one head shared by all
    slots (presence, shape, colour and look logits), and a background head on the globally
    pooled features. Input in [0, 1]."""

    def __init__(self, width: int = 24, hidden: int = 64):
        super().__init__()
        self.width, self.hidden = width, hidden
        w = width

        def block(cin, cout, kernel=3, stride=1):
            return [nn.Conv2d(cin, cout, kernel, stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(*block(3, w, kernel=4, stride=2), *block(w, 2 * w), nn.MaxPool2d(2),
                                   *block(2 * w, 3 * w), *block(3 * w, 3 * w))
        self.per_slot = 1 + len(SHAPES) + len(COLOURS) + len(LOOKS)
        self.slot_head = nn.Sequential(nn.Linear(3 * w, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, self.per_slot))
        self.background_head = nn.Linear(3 * w, len(BACKGROUNDS))
        # An 8x8 feature map averaged over 2x2 cells has 7x7 cells centred on pixel 4j + 4
        # (continuous coordinates); slot centres (fractions f of 32 px) fall on cell j = 8f - 1.
        cells = [(round(8 * POSITIONS[s][1]) - 1) * 7 + round(8 * POSITIONS[s][0]) - 1 for s in SLOTS]
        self.register_buffer("slot_cells", torch.tensor(cells), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"ScorerNet reads {IMAGE_SIZE}x{IMAGE_SIZE} images, got {tuple(images.shape[-2:])}")
        features = self.trunk(images * 2 - 1)  # (B, C, 8, 8)
        local = F.avg_pool2d(features, 2, stride=1).flatten(2)  # (B, C, 49)
        slots = self.slot_head(local[:, :, self.slot_cells].transpose(1, 2))  # (B, slots, per_slot)
        s, c = len(SHAPES), len(COLOURS)
        return {
            "presence": slots[..., 0],  # logits (B, slots)
            "shape": slots[..., 1:1 + s],  # logits (B, slots, shapes)
            "colour": slots[..., 1 + s:1 + s + c],
            "look": slots[..., 1 + s + c:],
            "background": self.background_head(features.mean((2, 3))),  # logits (B, backgrounds)
        }


class Scorer:
    """A trained ScorerNet with the matching and judging logic."""

    def __init__(self, net: ScorerNet, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval()
        self.device = torch.device(device)

    # ----------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Scorer":
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: no scorer weights; train them with "
                                    f"`python -m ldm.toy.train_scorer --out {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: not a readable safetensors file ({err})") from err
        if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
            raise UserError(f"{path}: not a toy scorer file (format {meta.get('format')!r}, "
                             f"version {meta.get('version')!r}; expected {FORMAT!r}, {VERSION})")
        if json.loads(meta.get("vocabulary", "null")) != vocabulary():
            raise UserError(f"{path}: trained for another version of the toy world (its shapes, colours, looks "
                             f"or backgrounds differ); retrain with `python -m ldm.toy.train_scorer --out {path}`")
        config = json.loads(meta.get("config", "{}"))
        net = ScorerNet(**config)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            message = " ".join(str(err).split())[:300]
            raise UserError(f"{path}: weights do not fit ScorerNet({config}): {message}") from err
        return cls(net, device)

    @staticmethod
    def save(net: ScorerNet, path: str | Path, training: dict | None = None) -> None:
        metadata = {"format": FORMAT, "version": str(VERSION), "vocabulary": json.dumps(vocabulary()),
                    "config": json.dumps({"width": net.width, "hidden": net.hidden}),
                    "training": json.dumps(training or {})}
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=metadata)

    # ----------------------------------------------------------------- predictions
    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per image: presence probabilities (B, slots), predicted indices of shape, colour and
        look per slot (B, slots), and background (B,)."""
        images = _check_images(images)
        outs = []
        for start in range(0, images.shape[0], batch_size):
            logits = self.net(images[start:start + batch_size].to(self.device, torch.float32))
            outs.append({
                "presence": logits["presence"].sigmoid(),
                "shape": logits["shape"].argmax(-1), "colour": logits["colour"].argmax(-1),
                "look": logits["look"].argmax(-1), "background": logits["background"].argmax(-1),
            })
        return {k: torch.cat([o[k] for o in outs]).cpu() for k in outs[0]}

    def score(self, images: torch.Tensor, requests: Sequence[Scene]) -> list[dict]:
        """One dict per image: `objects` (per requested object: shape, colour, position, look,
        plain_look as bool, or None where not requested), `background` (bool or None), `count`
        (as many occupied slots as requested objects) and `slots` (the slot matched to each object,
        or None). Objects are matched to occupied slots by the assignment under which most
        requested attributes hold; an object left without a slot fails all of them."""
        images = _check_images(images)
        if len(requests) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(requests)} requests")
        pred = self.predict(images)
        return [self._judge(scene, {k: v[b] for k, v in pred.items()}) for b, scene in enumerate(requests)]

    # ----------------------------------------------------------------- judging
    @staticmethod
    def _judge_object(obj, slot: int | None, pred: dict) -> dict:
        if slot is None:  # nothing drawn for it: every requested attribute fails
            return {"shape": False, "colour": None if obj.colour is None else False,
                    "position": None if obj.position is None else False,
                    "look": None if obj.look == "plain" else False, "plain_look": None}
        look = LOOKS[int(pred["look"][slot])]
        return {
            "shape": SHAPES[int(pred["shape"][slot])] == obj.shape,
            "colour": None if obj.colour is None else COLOUR_NAMES[int(pred["colour"][slot])] == obj.colour,
            "position": None if obj.position is None else SLOTS[slot] == obj.position,
            "look": None if obj.look == "plain" else look == obj.look,
            "plain_look": look == "plain" if obj.look == "plain" else None,
        }

    def _judge(self, scene: Scene, pred: dict) -> dict:
        occupied = [s for s in range(len(SLOTS)) if float(pred["presence"][s]) > PRESENT]
        n = len(scene.objects)
        candidates = occupied + [None] * n
        best, best_key = None, None
        for choice in sorted(set(itertools.permutations(candidates, n)), key=_slot_order):
            judged = [self._judge_object(o, s, pred) for o, s in zip(scene.objects, choice)]
            correct = sum(v is True for j in judged for k, v in j.items() if k != "plain_look")
            found = sum(s is not None for s in choice)
            key = (correct, found, sum(float(pred["presence"][s]) for s in choice if s is not None))
            if best_key is None or key > best_key:  # ties keep the first in slot order
                best, best_key = (judged, choice), key
        judged, choice = best
        background = None if scene.background is None else BACKGROUNDS[int(pred["background"])] == scene.background
        return {"objects": judged, "background": background, "count": len(occupied) == n,
                "slots": [None if s is None else SLOTS[s] for s in choice]}


def _slot_order(choice: tuple) -> tuple:
    return tuple(len(SLOTS) if s is None else s for s in choice)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
    images = images.float()
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.clamp(0, 1)


# ----------------------------------------------------------------------------- summaries
def _values(results: Iterable[dict], attribute: str) -> list[bool]:
    values = []
    for r in results:
        if attribute in ("background", "count"):
            values.append(r[attribute])
        else:
            values.extend(o[attribute] for o in r["objects"])
    return [v for v in values if v is not None]


def attribute_counts(results: Sequence[dict]) -> dict[str, tuple[int, int]]:
    """(correct, judged) per attribute, for REQUESTED + DIAGNOSTIC, `overall` (REQUESTED pooled)
    and `all_correct` (images whose requested attributes all hold)."""
    counts = {}
    for attribute in REQUESTED + DIAGNOSTIC:
        values = _values(results, attribute)
        counts[attribute] = (sum(values), len(values))
    counts["overall"] = tuple(sum(counts[a][i] for a in REQUESTED) for i in range(2))
    every = [all(v for a in REQUESTED for v in _values([r], a)) for r in results]
    counts["all_correct"] = (sum(every), len(every))
    return counts


def attribute_accuracy(results: Sequence[dict]) -> dict[str, float]:
    """Fraction correct per attribute (see `attribute_counts`); NaN where nothing was judged."""
    return {k: (c / n if n else float("nan")) for k, (c, n) in attribute_counts(results).items()}
