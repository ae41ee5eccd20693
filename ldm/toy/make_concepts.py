"""Write the toy world's personal concepts as Perfusion training folders.

    python -m ldm.toy.make_concepts --out data/toy/concepts

For each concept of `ldm.toy.world.CONCEPTS`: `<out>/<name>/<name>_<i>.png` (the concept alone
in varied positions and backgrounds, then beside a plain object that its caption names first)
and `<out>/<name>/mask/<name>_<i>.png` (the generator's exact soft mask of the concept), the
layout `ldm.data.personalized.PersonalizedDataset` reads.
`<out>/concepts.json` records each concept's superclass word and each image's scene, caption
and prompt template (the caption with `{}` for the concept's word: "on a gray background, on
the left a {}"); `<out>/preview.png` shows every image above its mask. The files depend only on
`--seed`, so rerunning rewrites identical bytes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.images import list_images
from ldm.errors import UserError
from ldm.toy.world import BACKGROUNDS, CONCEPTS, POSITIONS, Scene, SceneObject, WORLD_GEOMETRY, caption, render
from ldm.util import REPO_ROOT, atomic_path

FORMAT, VERSION = "toy-concepts", 2
# The plain objects beside the concept in its two-object images: (shape, colour, position, the
# concept's position, background). In a causal text encoder the concept word's encoding depends on
# the words before it, and Eq. 3's i* is its mean over the training captions: captions that never
# name another object before the concept leave its gate half shut in prompts that name it second.
# None of these (colour, shape) pairs is in the benchmark's prompts; a companion of the concept's
# shape is a triangle.
COMPANIONS = (("ring", "blue", "top", "bottom", "gray"), ("cross", "orange", "right", "left", "brown"),
              ("circle", "purple", "bottom", "top", "checkered"))


def concept_scenes(name: str, count: int = 5, seed: int = 0, pairs: int = len(COMPANIONS)) -> list[Scene]:
    """`count` single-object scenes of concept `name` (every position and background in turn), then
    `pairs` with a companion named first (COMPANIONS); the concept's size and offset jittered as in
    the pretraining world."""
    if name not in CONCEPTS:
        raise UserError(f"unknown concept {name!r}; expected one of {', '.join(CONCEPTS)}")
    if not 1 <= count <= 20:
        raise UserError(f"count must be between 1 and 20 images, got {count!r}")
    if not 0 <= pairs <= len(COMPANIONS):
        raise UserError(f"pairs must be between 0 and {len(COMPANIONS)} images, got {pairs!r}")
    index = list(CONCEPTS).index(name)
    rng = np.random.default_rng([seed, index])
    positions, scenes = tuple(POSITIONS), []

    def concept(position: str) -> SceneObject:
        size = float(rng.uniform(*WORLD_GEOMETRY.size))
        offset = tuple(float(v) for v in rng.uniform(-WORLD_GEOMETRY.jitter, WORLD_GEOMETRY.jitter, 2))
        return SceneObject.concept(name, position, size=size, offset=offset)

    for i in range(count):
        scenes.append(Scene((concept(positions[(i + index) % len(positions)]),),
                            BACKGROUNDS[(i + 2 * index) % len(BACKGROUNDS)]))
    for shape, colour, position, own, background in COMPANIONS[:pairs]:
        shape = "triangle" if shape == CONCEPTS[name].shape else shape
        scenes.append(Scene((SceneObject(shape, colour, position), concept(own)), background))
    return scenes


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_concepts(out: str | Path, count: int = 5, seed: int = 0, size: int = 32,
                   pairs: int = len(COMPANIONS)) -> dict:
    """Write every concept folder, concepts.json and preview.png under `out`; returns the index."""
    out = Path(out)
    entries, rows = [], []
    for name, concept in CONCEPTS.items():
        folder = out / name
        scenes = concept_scenes(name, count, seed, pairs)
        names = [f"{name}_{i}.png" for i in range(len(scenes))]
        if folder.is_dir():
            stale = [p.name for p in list_images(folder) if p.name not in names]
            if stale:
                raise UserError(f"{folder}: holds images this generator did not write ({', '.join(stale[:3])}); "
                                 f"remove them or pick another --out")
        images = []
        for file, scene in zip(names, scenes):
            image, masks = render(scene, size)
            k = next(i for i, o in enumerate(scene.objects) if o.look == name)
            obj, mask = scene.objects[k], masks[k]
            _save_png(image, folder / file)
            _save_png(Image.fromarray(mask, "L"), folder / "mask" / file)
            images.append({
                "file": file, "mask": f"mask/{file}", "position": obj.position, "background": scene.background,
                "size": obj.size, "offset": list(obj.offset),
                "company": [[o.shape, o.colour, o.position] for o in scene.objects if o is not obj],
                "caption": caption(scene),
                "template": caption(scene, nouns=["{}" if o is obj else None for o in scene.objects]),
            })
            rows.append((image, mask))
        with atomic_path(folder / "captions.json") as tmp:   # per-image templates (PersonalizedDataset captions=)
            tmp.write_text(json.dumps({i["file"]: i["template"] for i in images}, indent=1) + "\n")
        entries.append({"name": name, "phrase": concept.phrase, "superclass": concept.shape,
                        "pattern": concept.pattern, "colours": [list(c) for c in concept.colours],
                        "images": images})
    index = {"format": FORMAT, "version": VERSION, "seed": seed, "size": size, "concepts": entries}
    with atomic_path(out / "concepts.json") as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n")
    _save_png(_preview(rows, count + pairs, size), out / "preview.png")
    return index


def _preview(rows: list[tuple[Image.Image, np.ndarray]], count: int, size: int, zoom: int = 4) -> Image.Image:
    """One row per concept: its images, and below each its mask, enlarged `zoom` times."""
    cell, pad = size * zoom, 4
    n_concepts = len(rows) // count
    sheet = Image.new("RGB", (count * (cell + pad), n_concepts * (2 * cell + 2 * pad)), (255, 255, 255))
    for k, (image, mask) in enumerate(rows):
        x, y = (k % count) * (cell + pad), (k // count) * (2 * cell + 2 * pad)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        sheet.paste(Image.fromarray(mask, "L").convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                    (x, y + cell + pad))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "data/toy/concepts"), help="output folder (default: %(default)s)")
    parser.add_argument("--images", type=int, default=5, help="images of the concept alone (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=len(COMPANIONS),
                        help="images beside a companion named first (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sizes and offsets (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    index = write_concepts(args.out, args.images, args.seed, args.size, args.pairs)
    for entry in index["concepts"]:
        print(f"{args.out}/{entry['name']}: {len(entry['images'])} images + masks "
              f"(superclass '{entry['superclass']}', {entry['phrase']})")
    print(f"{args.out}/concepts.json, {args.out}/preview.png")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
