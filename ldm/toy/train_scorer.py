"""Train the toy world's scorer on labelled renders of the generator.

    python -m ldm.toy.train_scorer --out ckpt/toy/scorer.safetensors

The training scenes cover the whole world, held-out (colour, shape) pairs and concept looks
included (the scorer is a measuring instrument, not the model under test), with a wider spread
of object sizes and offsets than the pretraining world, empty scenes, and degradations (colour
shifts, blur, noise) so that it also reads the imperfect images a diffusion model makes.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.toy.drawing import render
from ldm.toy.scorer import SLOTS, Scorer, ScorerNet
from ldm.toy.world import (BACKGROUNDS, COLOURS, CONCEPTS, LOOKS, SHAPES, Geometry, Scene, sample_object,
                           sample_positions, sample_textured)
from ldm.util import REPO_ROOT

SCORER_GEOMETRY = Geometry(size=(0.3, 0.45), jitter=0.065)
IGNORE = -100  # label of an absent object's attributes, and of a concept's colour


def scorer_scene(rng: np.random.Generator, p_concept: float = 0.25, p_textured: float = 0.2,
                 geometry: Geometry = SCORER_GEOMETRY) -> Scene:
    """0 (5%), 1 (40%) or 2 (55%) objects of any (colour, shape) pair, concept look or generic
    texture (labelled "plain": not a concept, so a look is only credited with its own pattern and colours)."""
    r = rng.random()
    count = 0 if r < 0.05 else 1 if r < 0.45 else 2
    objects = []
    for position in (sample_positions(rng, count) if count else ()):
        r = rng.random()
        if r < p_concept:
            objects.append(sample_object(rng, position, "all", LOOKS[1 + int(rng.integers(len(CONCEPTS)))], geometry))
        elif r < p_concept + p_textured:
            objects.append(sample_textured(rng, position, geometry))
        else:
            objects.append(sample_object(rng, position, "all", "plain", geometry))
    return Scene(tuple(objects), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def labels(scene: Scene) -> dict[str, np.ndarray]:
    """Per-slot targets of `scene` (IGNORE where a slot is empty or a concept has no colour)."""
    out = {"presence": np.zeros(len(SLOTS), np.float32),
           **{k: np.full(len(SLOTS), IGNORE, np.int64) for k in ("shape", "colour", "look")},
           "background": np.int64(BACKGROUNDS.index(scene.background))}
    for obj in scene.objects:
        s = SLOTS.index(obj.position)
        out["presence"][s] = 1.0
        out["shape"][s] = SHAPES.index(obj.shape)
        out["look"][s] = LOOKS.index(obj.look)
        if obj.colour is not None:
            out["colour"][s] = list(COLOURS).index(obj.colour)
    return out


def render_set(scenes: list[Scene]) -> torch.Tensor:
    """(N, 3, 32, 32) uint8 renders of `scenes`."""
    arrays = [np.asarray(render(scene, 32)[0]) for scene in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def label_set(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    per_scene = [labels(s) for s in scenes]
    return {k: torch.from_numpy(np.stack([p[k] for p in per_scene])) for k in per_scene[0]}


def degrade(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random per-image colour gain and offset, Gaussian blur (sigma up to 0.7 px) and noise
    (sigma up to 0.04) on float images in [0, 1]; `strength` scales all of them."""
    b = images.shape[0]
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * 0.08 * strength
    offset = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * 0.05 * strength
    x = images * gain + offset
    sigma = torch.rand(b, generator=generator) * 0.7 * strength
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel1d = torch.exp(-taps[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel1d = kernel1d / kernel1d.sum(1, keepdim=True)
    kernel = (kernel1d[:, :, None] * kernel1d[:, None, :]).repeat_interleave(3, 0)[:, None]  # (b*3, 1, 5, 5)
    x = F.conv2d(F.pad(x.reshape(1, b * 3, *x.shape[-2:]), (2, 2, 2, 2), mode="replicate"), kernel, groups=b * 3)
    x = x.reshape(images.shape)
    noise = torch.randn(images.shape, generator=generator)
    noise = noise * torch.rand(b, 1, 1, 1, generator=generator) * 0.04 * strength
    return (x + noise).clamp(0, 1)


def losses(logits: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    total = F.binary_cross_entropy_with_logits(logits["presence"], target["presence"])
    for key in ("shape", "colour", "look"):
        t = target[key].reshape(-1)
        if (t != IGNORE).any():
            total = total + F.cross_entropy(logits[key].reshape(t.shape[0], -1), t, ignore_index=IGNORE)
    return total + F.cross_entropy(logits["background"], target["background"])


def scenes_from_seed(seed: int, count: int, make=scorer_scene) -> list[Scene]:
    """Scene i is drawn from `numpy.random.default_rng([seed, i])`."""
    return [make(np.random.default_rng([seed, i])) for i in range(count)]


def train(samples: int = 24000, epochs: int = 5, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
          p_degrade: float = 0.7, log=print) -> tuple[ScorerNet, dict]:
    torch.manual_seed(seed)
    start = time.time()
    scenes = scenes_from_seed(seed, samples)
    images, target = render_set(scenes), label_set(scenes)
    log(f"rendered {samples} training scenes in {time.time() - start:.0f} s")
    net = ScorerNet()
    steps = epochs * math.ceil(samples / batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for epoch in range(epochs):
        order, running = torch.randperm(samples, generator=generator), 0.0
        for i in range(0, samples, batch_size):
            idx = order[i:i + batch_size]
            x = images[idx].float() / 255
            hit = torch.rand(len(idx), generator=generator) < p_degrade
            if hit.any():
                x[hit] = degrade(x[hit], generator)
            loss = losses(net(x), {k: v[idx] for k, v in target.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {running / samples:.4f} ({time.time() - start:.0f} s)")
    net.eval()
    info = {"samples": samples, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "p_degrade": p_degrade, "seconds": round(time.time() - start, 1)}
    return net, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "ckpt/toy/scorer.safetensors"), help="output file (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=24000, help="training renders (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over them (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of scenes, augmentation and weights (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.samples < 100 or args.epochs < 1:
        raise UserError(f"need at least 100 samples and 1 epoch, got {args.samples} and {args.epochs}")
    net, info = train(args.samples, args.epochs, seed=args.seed)
    Scorer.save(net, args.out, info)
    size = Path(args.out).stat().st_size
    print(f"saved {args.out} ({size / 1e6:.2f} MB, {sum(p.numel() for p in net.parameters()):,} parameters, "
          f"trained in {info['seconds']:.0f} s); measure it with `python -m ldm.toy.eval_scorer --scorer {args.out}`")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
