"""Which subjects a DreamBench run trains: their folders, class words and kinds (object or live).

Three layouts are read, the first that fits:

- the DreamBooth dataset: `prompts_and_classes.txt` in DIR or DIR/dataset, whose `subject_name,class`
  list names the subject folders beside it;
- a toy concept set: `concepts.json` (format "toy-concepts", data/toy/) with each concept's superclass;
- any folder of subject folders, each with a `class.txt` holding its class word ("teddy", "stuffed animal").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ldm.errors import MissingFileError, NotAFolderError, UserError

CLASSES_FILE = "prompts_and_classes.txt"
CLASS_FILE = "class.txt"
TOY_CONCEPTS = "concepts.json"
LIVE_CLASSES = ("dog", "cat")   # DreamBooth's live subjects: its dogs and cats get the live prompts
KINDS = ("object", "live")


@dataclass(frozen=True)
class Subject:
    name: str
    folder: Path
    superclass: str
    kind: str   # "object" or "live": which prompt list it is rendered with


def read_classes(path: Path) -> dict[str, str]:
    """subject -> class from the `subject_name,class` block of DreamBooth's prompts_and_classes.txt
    (it ends at the first blank line; the prompt lists after it are in data/prompts/)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if "subject_name,class" not in lines:
        raise UserError(f"{path}: no 'subject_name,class' line; expected DreamBooth's prompts_and_classes.txt")
    classes: dict[str, str] = {}
    for line in lines[lines.index("subject_name,class") + 1:]:
        if not line:
            break
        name, _, word = (part.strip() for part in line.partition(","))
        if not name or not word:
            raise UserError(f"{path}: line {line!r} is not 'subject_name,class'")
        if name in classes:
            raise UserError(f"{path}: subject {name!r} is listed twice")
        classes[name] = word
    if not classes:
        raise UserError(f"{path}: the 'subject_name,class' list is empty")
    return classes


def _dreambooth(root: Path) -> list[tuple[str, Path, str]] | None:
    for folder in (root, root / "dataset"):
        if (folder / CLASSES_FILE).is_file():
            classes = read_classes(folder / CLASSES_FILE)
            return [(name, folder / name, word) for name, word in classes.items()]
    return None


def _toy(root: Path) -> list[tuple[str, Path, str]] | None:
    path = root / TOY_CONCEPTS
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
        return [(c["name"], root / c["name"], c["superclass"]) for c in table["concepts"]]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a toy concepts file (concepts: [{{name, superclass}}, ...]): {err!r}") from None


def _class_files(root: Path) -> list[tuple[str, Path, str]]:
    from ldm.data.images import list_images

    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not list_images(folder):
            continue
        if not (folder / CLASS_FILE).is_file():
            raise UserError(f"{folder}: no {CLASS_FILE}; put the subject's class word in it (e.g. 'dog'), or give "
                            f"DIR a DreamBooth {CLASSES_FILE}")
        word = (folder / CLASS_FILE).read_text(encoding="utf-8").strip()
        if not word or "\n" in word:
            raise UserError(f"{folder / CLASS_FILE}: expected one class word or phrase on one line, got {word!r}")
        found.append((folder.name, folder, word))
    return found


def discover(root: str | Path, live_classes: Sequence[str] = LIVE_CLASSES) -> list[Subject]:
    """Every subject under `root`, sorted by name (the order shards take them in); a subject whose
    class is in `live_classes` is live, the others objects."""
    from ldm.data.images import list_images

    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"--subjects {root}: no such folder")
    if not root.is_dir():
        raise NotAFolderError(f"--subjects {root}: not a folder of subject folders")
    found = _dreambooth(root) or _toy(root) or _class_files(root)
    if not found:
        raise UserError(f"--subjects {root}: no subjects (expected a DreamBooth {CLASSES_FILE}, a toy {TOY_CONCEPTS}, "
                        f"or subject folders of images with a {CLASS_FILE} each)")
    subjects = []
    for name, folder, word in sorted(found):
        if not folder.is_dir():
            raise MissingFileError(f"--subjects {root}: subject {name!r} has no folder {folder}")
        if not list_images(folder):
            raise UserError(f"{folder}: no images (expected files such as .jpg, .png) for subject {name!r}")
        subjects.append(Subject(name, folder, word, "live" if word in live_classes else "object"))
    return subjects


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n)."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} must be INDEX/COUNT, e.g. 0/4 (the first of 4 shards)") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r}: INDEX runs from 0 to COUNT - 1 and COUNT is at least 1")
    return index, count


def shard(subjects: Sequence[Subject], index: int, count: int) -> list[Subject]:
    """Every count-th subject from `index`: the shards of one COUNT cover every subject exactly once."""
    return list(subjects[index::count])


def reference_images(folder: Path) -> list[torch.Tensor]:
    """A subject's photos as (3, H, W) tensors in [0, 1], the references of CLIP-I and DINO."""
    import numpy as np

    from ldm.data.images import list_images, load_rgb

    return [torch.from_numpy(np.asarray(load_rgb(f)).copy()).permute(2, 0, 1).float() / 255
            for f in list_images(folder)]


def has_masks(folder: Path) -> bool:
    """Whether every photo has its mask in folder/mask (data/soft_segment.py's layout)."""
    from ldm.data.images import list_images

    return all((folder / "mask" / f"{p.stem}.png").is_file() for p in list_images(folder))
