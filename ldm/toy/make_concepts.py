"""Write the toy world's personal concepts as Perfusion training folders.

    python -m ldm.toy.make_concepts                   # covering sets, in data/toy/concepts
    python -m ldm.toy.make_concepts --layout narrow   # few-shot sets, in data/toy/concepts-narrow

Two layouts. "covering": the concept alone in every position and background in turn, then beside
a plain object that its caption names first. "narrow", what a user's few photos look like: N
images (default 6) of one layout (in the centre, on black), all with one caption, only the size
and offset jittered.
For each concept of `ldm.toy.world.CONCEPTS`: `<out>/<name>/<name>_<i>.png` and
`<out>/<name>/mask/<name>_<i>.png` (the generator's exact soft mask of the concept), the layout
`ldm.data.personalized.PersonalizedDataset` reads.
`<out>/concepts.json` records each concept's superclass word and each image's scene, caption
and prompt template (the caption with `{}` for the concept's word: "on a gray background, on
the left a {}"); `<out>/preview.png` shows every image above its mask. The files depend only on
`--seed`, so rerunning rewrites identical bytes. Either layout also writes `data/toy/templates.txt`,
the toy language's target templates (configs/toy/perfusion.yaml's model.params.target_templates).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.images import list_images
from ldm.errors import UserError
from ldm.toy.drawing import render
from ldm.toy.world import (BACKGROUNDS, CONCEPTS, PAIRED_POSITIONS, POSITIONS, WORLD_GEOMETRY, Scene, SceneObject,
                           caption)
from ldm.util import REPO_ROOT, atomic_path

FORMAT, VERSION = "toy-concepts", 3
LAYOUTS = ("covering", "narrow")
TEMPLATES_FILE = REPO_ROOT / "data/toy/templates.txt"
NARROW = ("centre", "black")   # the narrow sets' one position and background
# The plain objects beside the concept in its two-object images: (shape, colour, position, the
# concept's position, background). In a causal text encoder the concept word's encoding depends on
# the words before it; when Eq. 3's i* was its mean over the training captions, captions that never
# named another object before the concept left its gate half shut in prompts that name it second
# (i* now reads the target templates, which name company both ways; the covering sets keep theirs).
# None of these (colour, shape) pairs is in the benchmark's prompts; a companion of the concept's
# shape is a triangle.
COMPANIONS = (("ring", "blue", "top", "bottom", "gray"), ("cross", "orange", "right", "left", "brown"),
              ("circle", "purple", "bottom", "top", "checkered"))


def concept_scenes(name: str, count: int = 5, seed: int = 0, pairs: int | None = None,
                   layout: str = "covering") -> list[Scene]:
    """`count` single-object scenes of concept `name` (covering: every position and background in
    turn; narrow: all at NARROW), then `pairs` (default: all COMPANIONS when covering, none when
    narrow) with a companion named first; the concept's size and offset jittered as in the
    pretraining world."""
    if name not in CONCEPTS:
        raise UserError(f"unknown concept {name!r}; expected one of {', '.join(CONCEPTS)}")
    if not 1 <= count <= 20:
        raise UserError(f"count must be between 1 and 20 images, got {count!r}")
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    pairs = (0 if layout == "narrow" else len(COMPANIONS)) if pairs is None else pairs
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
        if layout == "narrow":
            scenes.append(Scene((concept(NARROW[0]),), NARROW[1]))
        else:
            scenes.append(Scene((concept(positions[(i + index) % len(positions)]),),
                                BACKGROUNDS[(i + 2 * index) % len(BACKGROUNDS)]))
    for shape, colour, position, own, background in COMPANIONS[:pairs]:
        shape = "triangle" if shape == CONCEPTS[name].shape else shape
        scenes.append(Scene((SceneObject(shape, colour, position), concept(own)), background))
    return scenes


# The plain objects of the target templates: none of them (nor any of COMPANIONS) is in the
# benchmark's prompts.
TEMPLATE_COMPANIONS = (("ring", "blue"), ("cross", "orange"), ("circle", "purple"), ("triangle", "white"))


def target_templates() -> list[str]:
    """The toy language's template set for Eq. 3's targets (model.params.target_templates), the role
    "a photo of a {}", ... play on SD: the concept alone at every position on every background (or
    none), and beside each plain object of TEMPLATE_COMPANIONS, named first and second, in both pairs
    of places. Text only: no image of these layouts is needed."""
    # a colourless ring stands for the concept: its noun becomes '{}'
    placed = [(position, background) for position in POSITIONS for background in (None, *BACKGROUNDS)]
    scenes = [Scene((SceneObject("ring", position=p),), b) for p, b in placed]
    for k, (shape, colour) in enumerate(TEMPLATE_COMPANIONS):
        for pair in PAIRED_POSITIONS:
            for first, second in (pair, pair[::-1]):
                background = (None, *BACKGROUNDS)[(k + len(scenes)) % (len(BACKGROUNDS) + 1)]
                scenes.append(Scene((SceneObject(shape, colour, first), SceneObject("ring", position=second)),
                                    background))
                scenes.append(Scene((SceneObject("ring", position=first), SceneObject(shape, colour, second)),
                                    background))
    return [caption(s, [None if o.colour else "{}" for o in s.objects]) for s in scenes]


def write_templates(path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("# the toy world's target templates (python -m ldm.toy.make_concepts)\n"
                       + "\n".join(target_templates()) + "\n")
    return path


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_concepts(out: str | Path, count: int = 5, seed: int = 0, size: int = 32,
                   pairs: int | None = None, layout: str = "covering") -> dict:
    """Write every concept folder, concepts.json and preview.png under `out`; returns the index."""
    out = Path(out)
    entries, rows = [], []
    for name, concept in CONCEPTS.items():
        folder = out / name
        scenes = concept_scenes(name, count, seed, pairs, layout)
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
    index = {"format": FORMAT, "version": VERSION, "layout": layout, "seed": seed, "size": size, "concepts": entries}
    with atomic_path(out / "concepts.json") as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n")
    _save_png(_preview(rows, len(scenes), size), out / "preview.png")
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
    parser.add_argument("--layout", choices=LAYOUTS, default="covering",
                        help="covering: every position, background and company; narrow: N images of one layout "
                             "and one caption (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: data/toy/concepts, or data/toy/concepts-narrow)")
    parser.add_argument("--images", type=int, default=None,
                        help="images of the concept alone (default: 5 covering, 6 narrow)")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"images beside a companion named first (default: {len(COMPANIONS)} covering, 0 narrow)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sizes and offsets (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    narrow = args.layout == "narrow"
    args.out = args.out or str(REPO_ROOT / ("data/toy/concepts-narrow" if narrow else "data/toy/concepts"))
    images = args.images if args.images is not None else (6 if narrow else 5)
    index = write_concepts(args.out, images, args.seed, args.size, args.pairs, args.layout)
    for entry in index["concepts"]:
        print(f"{args.out}/{entry['name']}: {len(entry['images'])} images + masks "
              f"(superclass '{entry['superclass']}', {entry['phrase']})")
    print(f"{args.out}/concepts.json, {args.out}/preview.png, {write_templates(TEMPLATES_FILE)}")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
