"""A procedurally generated toy world: small images of one or two shapes, with captions from a grammar.

    scene = Scene((SceneObject("circle", "red", "left"), SceneObject("square", "blue", "right")), "black")
    caption(scene)  # 'on a black background, on the left a red circle and on the right a blue square'
    image, masks = render(scene)  # 32x32 RGB PIL image, one uint8 soft mask per object

Grammar: 1 or 2 objects; SHAPES x COLOURS; one object at any of POSITIONS, two objects at
left+right or top+bottom; a background from BACKGROUNDS. The (colour, shape) pairs in HELD_OUT
never occur in the pretraining split, and the CONCEPTS (objects with a distinctive look: a
colour no caption names, or a two-colour pattern) never occur in it at all. Everything is a pure function of the scene (sizes and offsets
are fields of the scene), and scenes are drawn from `numpy.random.Generator`s, so a seed
fixes every image bit for bit.

A scene also serves as a *request* (what a prompt asks for): fields left as None (colour,
position, background) are simply not mentioned in the caption and not judged by the scorer;
such a scene cannot be rendered.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 235),
    "purple": (150, 60, 210),
    "white": (245, 245, 245),
}
# Object centres as fractions of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
PAIRED_POSITIONS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "brown", "checkered")

# (colour, shape) pairs that never occur in pretraining: one per shape, one per colour but white.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "cross"), ("orange", "circle"), ("yellow", "triangle"),
    ("green", "star"), ("blue", "ring"), ("purple", "square"),
})

DEFAULT_SIZE = 0.375  # object diameter as a fraction of the image side (12 px at 32x32)


@dataclass(frozen=True)
class Concept:
    """A personal object with a fixed look; `shape` is its superclass word."""
    name: str  # folder and look name
    phrase: str  # what a caption calls it when no placeholder is given
    shape: str
    pattern: str  # "solid" (one colour) | "stripes" | "dots" | "halves"
    colours: tuple[tuple[int, int, int], ...]  # one for "solid", two for a pattern


# Every look is symmetric under a left-right flip, so flip augmentation keeps it intact.
# Two kinds: a solid colour that lies between two of COLOURS (no caption has a word for it, but
# the base model draws its neighbours from words), and two-colour patterns, which the base
# model draws when they are spelled out in words (see docs/toy-world.md).
CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    # horizontal bands, 4 px each at 32x32 (2 latent pixels), yellow and blue
    Concept("striped_star", "striped star", "star", "stripes", (COLOURS["yellow"], COLOURS["blue"])),
    # red square with a 3x3 grid of white dots
    Concept("polka_dot_square", "polka-dot square", "square", "dots", (COLOURS["red"], COLOURS["white"])),
    # orange upper half, blue lower half
    Concept("two_tone_ring", "two-tone ring", "ring", "halves", (COLOURS["orange"], COLOURS["blue"])),
    Concept("magenta_square", "magenta square", "square", "solid", ((185, 45, 120),)),   # between red and purple
    Concept("teal_ring", "teal ring", "ring", "solid", ((0, 150, 150),)),                # between green and blue
    Concept("lime_star", "lime star", "star", "solid", ((142, 202, 50),)),               # between yellow and green
)}
COLOUR_CONCEPTS: tuple[str, ...] = tuple(n for n, c in CONCEPTS.items() if c.pattern == "solid")
LOOKS: tuple[str, ...] = ("plain",) + tuple(CONCEPTS)   # "plain": not one of the concepts
PATTERNS: tuple[str, ...] = ("stripes", "dots", "halves")
PATTERN_WORDS: dict[str, str] = {"stripes": "striped", "dots": "dotted", "halves": "two-tone"}
_COLOUR_NAME = {rgb: name for name, rgb in COLOURS.items()}
# (pattern, colour, colour) of each concept, in both colour orders: no generic texture (on any
# shape) may reproduce a concept's pattern and colours, so no caption of pretraining describes it.
CONCEPT_TEXTURES = frozenset(
    (c.pattern,) + tuple(_COLOUR_NAME[rgb] for rgb in colours)
    for c in CONCEPTS.values() if c.pattern in PATTERNS for colours in (c.colours, c.colours[::-1]))


@dataclass(frozen=True)
class SceneObject:
    """One object. `size` is its diameter and `offset` its shift from the position's centre,
    both as fractions of the image side. A concept look fixes the shape and has no colour.
    `texture` (pattern, colour, colour) gives a plain object a two-colour pattern instead of one
    colour ("a red and green striped star"), never a concept's pattern and colours: the text
    conditioning of pretraining learns to express looks, and the superclass word ("a star", when
    a caption leaves the look out) covers varied ones, as in real data."""
    shape: str
    colour: str | None = None
    position: str | None = None
    look: str = "plain"
    size: float = DEFAULT_SIZE
    offset: tuple[float, float] = (0.0, 0.0)
    texture: tuple[str, str, str] | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {', '.join(COLOURS)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {', '.join(POSITIONS)}")
        if self.look not in LOOKS:
            raise ValueError(f"unknown look {self.look!r}; expected one of {', '.join(LOOKS)}")
        if self.look != "plain":
            concept = CONCEPTS[self.look]
            if self.shape != concept.shape:
                raise ValueError(f"look {self.look!r} is a {concept.shape}, got shape {self.shape!r}")
            if self.colour is not None:
                raise ValueError(f"look {self.look!r} has its own colours; colour must be None, got {self.colour!r}")
        if self.texture is not None:
            pattern, *pair = self.texture
            if pattern not in PATTERNS or len(pair) != 2 or not set(pair) <= set(COLOURS) or pair[0] == pair[1]:
                raise ValueError(f"texture must be (pattern, colour, other colour) with a pattern in "
                                 f"{', '.join(PATTERNS)} and two colour names, got {self.texture!r}")
            if tuple(self.texture) in CONCEPT_TEXTURES:
                raise ValueError(f"texture {self.texture!r} is a concept's look; generic textures must differ")
            if self.look != "plain" or self.colour is not None:
                raise ValueError(f"a textured object has no colour and the plain look, got colour "
                                 f"{self.colour!r}, look {self.look!r}")
        if not 0.05 <= self.size <= 0.6:
            raise ValueError(f"object size {self.size!r} is outside [0.05, 0.6] (fraction of the image side)")

    @classmethod
    def concept(cls, name: str, position: str | None = None, **geometry) -> "SceneObject":
        """The concept `name` (a key of CONCEPTS) as an object."""
        if name not in CONCEPTS:
            raise ValueError(f"unknown concept {name!r}; expected one of {', '.join(CONCEPTS)}")
        return cls(CONCEPTS[name].shape, None, position, name, **geometry)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.objects) > 2:
            raise ValueError(f"a scene holds at most 2 objects, got {len(self.objects)}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {', '.join(BACKGROUNDS)}")
        given = [o.position for o in self.objects if o.position is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"two objects share the position {given[0]!r}")


# ----------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def describe(obj: SceneObject, noun: str | None = None) -> str:
    """'on the left a red circle', 'a red and green striped star'; `noun` replaces the look and shape
    words (e.g. a concept's placeholder). The noun comes last: in a causal text encoder a word sees
    only the words before it, so only a noun named last can know its object's position."""
    if noun is None:
        if obj.look != "plain":
            noun = CONCEPTS[obj.look].phrase
        elif obj.texture is not None:
            noun = _textured_noun(*obj.texture, obj.shape)
        else:
            noun = f"{obj.colour} {obj.shape}" if obj.colour is not None else obj.shape
    words = f"{_article(noun)} {noun}"
    return words if obj.position is None else f"{POSITION_PHRASES[obj.position]} {words}"


def _textured_noun(pattern: str, a: str, b: str, shape: str) -> str:
    return f"{a} and {b} {PATTERN_WORDS[pattern]} {shape}"


def look_words(name: str) -> str:
    """A concept's look in the words of pretraining captions ('yellow and blue striped star'): a
    combination no pretraining caption names, so the base model can only compose it. A solid
    concept's colour has no word: its nearest colour word ('purple square'), the closest words can come."""
    c = CONCEPTS[name]
    if c.pattern == "solid":
        nearest = min(COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(COLOURS[n], c.colours[0])))
        return f"{nearest} {c.shape}"
    return _textured_noun(c.pattern, *(_COLOUR_NAME[rgb] for rgb in c.colours), c.shape)


def caption(scene: Scene, nouns: Sequence[str | None] | None = None) -> str:
    """The caption of `scene`, background first and each object's noun last ('on a gray background,
    at the top a star'); unset fields are left out. `nouns[i]` overrides object i's noun."""
    if not scene.objects:
        raise ValueError("an empty scene has no caption")
    nouns = list(nouns) if nouns is not None else [None] * len(scene.objects)
    if len(nouns) != len(scene.objects):
        raise ValueError(f"got {len(nouns)} nouns for {len(scene.objects)} objects")
    text = " and ".join(describe(o, n) for o, n in zip(scene.objects, nouns))
    return text if scene.background is None else f"on a {scene.background} background, {text}"


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Geometry:
    """Ranges of object size and centre jitter (fractions of the image side)."""
    size: tuple[float, float] = (0.35, 0.43)
    jitter: float = 0.03


WORLD_GEOMETRY = Geometry()


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def sample_positions(rng: np.random.Generator, count: int) -> tuple[str, ...]:
    if count == 1:
        return (_pick(rng, tuple(POSITIONS)),)
    pair = _pick(rng, PAIRED_POSITIONS)
    return pair if rng.random() < 0.5 else pair[::-1]


def _sample_geometry(rng: np.random.Generator, geometry: Geometry) -> dict:
    """size and offset of one object (drawn in this order)."""
    size = float(rng.uniform(*geometry.size))
    jitter = geometry.jitter
    return {"size": size, "offset": (float(rng.uniform(-jitter, jitter)), float(rng.uniform(-jitter, jitter)))}


def sample_object(rng: np.random.Generator, position: str, combos: str = "train", look: str = "plain",
                  geometry: Geometry = WORLD_GEOMETRY) -> SceneObject:
    """An object at `position`; `combos` restricts (colour, shape): 'train' (not HELD_OUT),
    'heldout' (only HELD_OUT) or 'all'. A concept `look` ignores `combos`."""
    placed = _sample_geometry(rng, geometry)
    if look != "plain":
        return SceneObject.concept(look, position, **placed)
    pairs = {"train": _TRAIN_PAIRS, "heldout": _HELD_OUT_PAIRS, "all": _ALL_PAIRS}.get(combos)
    if pairs is None:
        raise ValueError(f"combos must be 'train', 'heldout' or 'all', got {combos!r}")
    colour, shape = _pick(rng, pairs)
    return SceneObject(shape, colour, position, **placed)


def sample_textured(rng: np.random.Generator, position: str, geometry: Geometry = WORLD_GEOMETRY) -> SceneObject:
    """An object of any shape with a generic texture: a pattern in two colours that is never a concept's."""
    placed = _sample_geometry(rng, geometry)
    return SceneObject(_pick(rng, SHAPES), None, position, texture=_pick(rng, _TEXTURES), **placed)


_ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_TEXTURES = tuple((p, a, b) for p in PATTERNS for a in COLOURS for b in COLOURS
                  if a != b and (p, a, b) not in CONCEPT_TEXTURES)
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT)
_HELD_OUT_PAIRS = tuple(sorted(HELD_OUT))


def sample_scene(rng: np.random.Generator, split: str = "train", p_two: float = 0.6, p_textured: float = 0.0) -> Scene:
    """A scene of the pretraining world ('train': no HELD_OUT pair, no concept) or a held-out
    scene ('heldout': at least one object is a HELD_OUT pair, the other a training pair).
    In 'train', each object is a generic textured one (`sample_textured`) with probability `p_textured`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    positions = sample_positions(rng, 2 if rng.random() < p_two else 1)
    special = int(rng.integers(len(positions))) if split == "heldout" else -1
    objects = tuple(
        sample_textured(rng, p) if split == "train" and p_textured and rng.random() < p_textured
        else sample_object(rng, p, "heldout" if i == special else "train") for i, p in enumerate(positions))
    return Scene(objects, _pick(rng, BACKGROUNDS))


def held_out_scenes() -> list[Scene]:
    """A fixed evaluation set: 4 scenes per HELD_OUT pair (2 alone, 2 beside a training pair),
    default size, no jitter, all positions and backgrounds used."""
    rng = np.random.default_rng(20240607)
    scenes = []
    positions, backgrounds = tuple(POSITIONS), BACKGROUNDS
    for k, (colour, shape) in enumerate(sorted(HELD_OUT)):
        for j in range(2):
            position = positions[(2 * k + j) % len(positions)]
            scenes.append(Scene((SceneObject(shape, colour, position),), backgrounds[(k + j) % len(backgrounds)]))
        for j, pair in enumerate(PAIRED_POSITIONS):
            other_colour, other_shape = _pick(rng, _TRAIN_PAIRS)
            held = SceneObject(shape, colour, pair[(k + j) % 2])
            other = SceneObject(other_shape, other_colour, pair[1 - (k + j) % 2])
            objects = (held, other) if k % 2 == 0 else (other, held)
            scenes.append(Scene(objects, backgrounds[(k + j + 2) % len(backgrounds)]))
    return scenes


def held_out_prompts() -> list[str]:
    """Captions of `held_out_scenes()`, in the same order."""
    return [caption(s) for s in held_out_scenes()]


def contains_held_out(scene: Scene) -> bool:
    return any((o.colour, o.shape) in HELD_OUT for o in scene.objects)


def contains_concept(scene: Scene) -> bool:
    return any(o.look != "plain" for o in scene.objects)


def as_request(scene: Scene, drop_colour: Sequence[bool] = (), drop_position: Sequence[bool] = (),
               drop_background: bool = False) -> Scene:
    """The scene with the flagged fields set to None: what a less specific caption asks for
    (dropping the colour of a textured object drops its texture words too: "a star")."""
    objects = tuple(
        replace(o, **({"colour": None, "texture": None} if i < len(drop_colour) and drop_colour[i] else {}),
                position=None if i < len(drop_position) and drop_position[i] else o.position)
        for i, o in enumerate(scene.objects))
    return Scene(objects, None if drop_background else scene.background)


def vocabulary() -> dict[str, list[str]]:
    """The world's word lists, in the order a classifier indexes them."""
    return {"shapes": list(SHAPES), "colours": list(COLOURS), "positions": list(POSITIONS),
            "looks": list(LOOKS), "backgrounds": list(BACKGROUNDS)}
