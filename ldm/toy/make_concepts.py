"""Write the toy world's personal concepts as Perfusion training folders.

    python -m ldm.toy.make_concepts --out data/toy/concepts

For each concept of `ldm.toy.world.CONCEPTS`: `<out>/<name>/<name>_<i>.png` (one object in
varied positions and backgrounds) and `<out>/<name>/mask/<name>_<i>.png` (the generator's exact
soft mask), the layout `ldm.data.personalized.PersonalizedDataset` reads.
`<out>/concepts.json` records each concept's superclass word and each image's scene, caption
and prompt template (the caption with `{}` for the concept's word: "a {} on the left, on a gray
background"); `<out>/preview.png` shows every image above its mask. The files depend only on
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

FORMAT, VERSION = "toy-concepts", 1


def concept_scenes(name: str, count: int = 5, seed: int = 0) -> list[Scene]:
    """`count` single-object scenes of concept `name`: every position and background in turn,
    the concept's size and offset jittered as in the pretraining world."""
    if name not in CONCEPTS:
        raise UserError(f"unknown concept {name!r}; expected one of {', '.join(CONCEPTS)}")
    if not 1 <= count <= 20:
        raise UserError(f"count must be between 1 and 20 images, got {count!r}")
    index = list(CONCEPTS).index(name)
    rng = np.random.default_rng([seed, index])
    positions, scenes = tuple(POSITIONS), []
    for i in range(count):
        size = float(rng.uniform(*WORLD_GEOMETRY.size))
        offset = tuple(float(v) for v in rng.uniform(-WORLD_GEOMETRY.jitter, WORLD_GEOMETRY.jitter, 2))
        obj = SceneObject.concept(name, positions[(i + index) % len(positions)], size=size, offset=offset)
        scenes.append(Scene((obj,), BACKGROUNDS[(i + 2 * index) % len(BACKGROUNDS)]))
    return scenes


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_concepts(out: str | Path, count: int = 5, seed: int = 0, size: int = 32) -> dict:
    """Write every concept folder, concepts.json and preview.png under `out`; returns the index."""
    out = Path(out)
    entries, rows = [], []
    for name, concept in CONCEPTS.items():
        folder = out / name
        names = [f"{name}_{i}.png" for i in range(count)]
        if folder.is_dir():
            stale = [p.name for p in list_images(folder) if p.name not in names]
            if stale:
                raise UserError(f"{folder}: holds images this generator did not write ({', '.join(stale[:3])}); "
                                 f"remove them or pick another --out")
        images = []
        for file, scene in zip(names, concept_scenes(name, count, seed)):
            image, (mask,) = render(scene, size)
            _save_png(image, folder / file)
            _save_png(Image.fromarray(mask, "L"), folder / "mask" / file)
            obj = scene.objects[0]
            images.append({
                "file": file, "mask": f"mask/{file}", "position": obj.position, "background": scene.background,
                "size": obj.size, "offset": list(obj.offset),
                "caption": caption(scene), "template": caption(scene, nouns=["{}"]),
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
    _save_png(_preview(rows, count, size), out / "preview.png")
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
    parser.add_argument("--images", type=int, default=5, help="images per concept (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sizes and offsets (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    index = write_concepts(args.out, args.images, args.seed, args.size)
    for entry in index["concepts"]:
        print(f"{args.out}/{entry['name']}: {len(entry['images'])} images + masks "
              f"(superclass '{entry['superclass']}', {entry['phrase']})")
    print(f"{args.out}/concepts.json, {args.out}/preview.png")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
