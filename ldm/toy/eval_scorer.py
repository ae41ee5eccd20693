"""Measure the toy scorer on fresh renders: does it read what the generator drew?

    python -m ldm.toy.eval_scorer [--scorer ckpt/toy/scorer.safetensors] [--n 1000] [--seed 1]

Prints a table of per-attribute accuracy (the request is the rendered scene itself, so every
judgement should be True) on three sets of scenes drawn with seeds the scorer was not trained
on: the pretraining world, scenes with held-out (colour, shape) pairs, and scenes with a concept
look; each clean, degraded as in the scorer's training (colour shift, blur, noise) and degraded
twice as strongly (a stress test beyond its training). A second table checks that wrong
requests are rejected: a wrong shape, colour or position, a plain object asked for as a
concept, a concept asked for as a plain object.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from ldm.errors import UserError
from ldm.toy.scorer import REQUESTED, Scorer, attribute_accuracy
from ldm.toy.train_scorer import degrade, render_set
from ldm.toy.world import (BACKGROUNDS, COLOURS, CONCEPTS, POSITIONS, SHAPES, Scene, sample_object, sample_positions,
                           sample_scene)
from ldm.util import REPO_ROOT

COLUMNS = REQUESTED + ("plain_look", "count", "all_correct")
EVAL_OFFSET = 1_000_003  # eval seeds are [EVAL_OFFSET + seed, set, i]; training uses [seed, i]


def concept_scene(rng: np.random.Generator) -> Scene:
    """One concept object, alone (50%) or beside a plain object of any (colour, shape) pair."""
    positions = sample_positions(rng, 2 if rng.random() < 0.5 else 1)
    look = list(CONCEPTS)[int(rng.integers(len(CONCEPTS)))]
    objects = [sample_object(rng, positions[0], look=look)]
    objects += [sample_object(rng, p, "all") for p in positions[1:]]
    if rng.random() < 0.5:
        objects.reverse()
    return Scene(tuple(objects), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


SETS = {
    "world": lambda rng: sample_scene(rng, "train"),
    "held-out pairs": lambda rng: sample_scene(rng, "heldout"),
    "concepts": concept_scene,
    # generic two-colour textures (never a concept's): plain_look is the share NOT mistaken for a concept
    "textured": lambda rng: sample_scene(rng, "train", p_textured=1.0),
}


def _scenes(name: str, n: int, seed: int) -> list[Scene]:
    index = list(SETS).index(name)
    return [SETS[name](np.random.default_rng([EVAL_OFFSET + seed, index, i])) for i in range(n)]


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _with_first(scene: Scene, **changes) -> Scene:
    """`scene` with fields of its first object changed."""
    return replace(scene, objects=(replace(scene.objects[0], **changes),) + scene.objects[1:])


def wrong_requests(scenes: list[Scene], seed: int) -> dict[str, tuple[list[Scene], list[Scene], str]]:
    """name -> (scenes to draw, wrong requests for them, the attribute of object 0 that must be False)."""
    rng = np.random.default_rng([EVAL_OFFSET + seed, len(SETS)])
    plain = [s for s in scenes if s.objects and all(o.look == "plain" for o in s.objects)]
    single = [s for s in plain if len(s.objects) == 1]
    cases = {
        "wrong shape": (plain, [_with_first(s, shape=_other(rng, SHAPES, s.objects[0].shape)) for s in plain], "shape"),
        "wrong colour": (plain, [_with_first(s, colour=_other(rng, tuple(COLOURS), s.objects[0].colour))
                                 for s in plain], "colour"),
        "wrong position": (single, [_with_first(s, position=_other(rng, tuple(POSITIONS), s.objects[0].position))
                                    for s in single], "position"),
    }
    # A plain object of a concept's shape (any colour, the concept's own included) and the concept itself.
    plain_shapes, concepts = [], []
    for i, scene in enumerate(single):
        concept = list(CONCEPTS.values())[i % len(CONCEPTS)]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        plain_shapes.append(_with_first(scene, shape=concept.shape, colour=colour))
        concepts.append(_with_first(scene, shape=concept.shape, colour=None, look=concept.name))
    cases["plain drawn, concept asked"] = (plain_shapes, concepts, "look")
    cases["concept drawn, plain asked"] = (concepts, plain_shapes, "plain_look")
    return cases


def evaluate(scorer: Scorer, n: int = 1000, seed: int = 1) -> tuple[list, list]:
    """(rows of (set and condition, attribute_accuracy)), (rows of (wrong request, rejection rate, count))."""
    generator = torch.Generator().manual_seed(seed)
    rows, world = [], None
    for name in SETS:
        scenes = _scenes(name, n, seed)
        world = scenes if name == "world" else world
        images = render_set(scenes).float() / 255
        conditions = (("clean", images), ("degraded", degrade(images, generator)),
                      ("degraded x2", degrade(images, generator, strength=2.0)))
        for condition, batch in conditions:
            rows.append((f"{name}, {condition}", attribute_accuracy(scorer.score(batch, scenes))))
    rejections = []
    for name, (drawn, asked, attribute) in wrong_requests(world, seed).items():
        results = scorer.score(render_set(drawn).float() / 255, asked)
        values = [r["objects"][0][attribute] for r in results]
        rejections.append((name, sum(v is False for v in values) / len(values), len(values)))
    return rows, rejections


def format_tables(rows, rejections) -> str:
    lines = ["| scenes | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, acc in rows:
        cells = ["-" if np.isnan(acc[c]) else f"{100 * acc[c]:.1f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| wrong request | rejected (%) | cases |", "|---|---|---|"]
    lines += [f"| {name} | {100 * rate:.1f} | {count} |" for name, rate, count in rejections]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorer", default=str(REPO_ROOT / "ckpt/toy/scorer.safetensors"), help="scorer weights (default: %(default)s)")
    parser.add_argument("--n", type=int, default=1000, help="scenes per set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.n < 10:
        raise UserError(f"--n must be at least 10 scenes, got {args.n}")
    start = time.time()
    scorer = Scorer.load(args.scorer)
    rows, rejections = evaluate(scorer, args.n, args.seed)
    print(f"accuracy (%) of {args.scorer} on {args.n} fresh scenes per set (seed {args.seed}):\n")
    print(format_tables(rows, rejections))
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
