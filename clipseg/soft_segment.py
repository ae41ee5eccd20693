"""Zero-shot soft masks of a concept's images with CLIPSeg, for Perfusion's masked loss.

    python data/soft_segment.py --image_dir DIR --super_class WORD [--model_weight ckpt/clipseg-rd64-refined]

For every image DIR/NAME.EXT writes DIR/mask/NAME.png: CLIPSeg's probability for WORD, averaged
over the training prompt templates, at the image's size, 0..255. Also writes DIR/mask/preview.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from ldm.data.images import list_images, load_rgb
from ldm.cli import parse_device
from ldm.errors import UserError
from ldm.util import REPO_ROOT, atomic_path

DEFAULT_MODEL_DIR = REPO_ROOT / "ckpt" / "clipseg-rd64-refined"
PREVIEW_NAME = "preview.png"
PREVIEW_MAX_IMAGES = 60


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image_dir", required=True, help="folder of the concept's images (not searched recursively)")
    parser.add_argument("--super_class", required=True,
                        help='the concept\'s superclass word or phrase, e.g. "cat" or "teddy bear"')
    parser.add_argument("--model_weight", default=str(DEFAULT_MODEL_DIR),
                        help="local CLIPSeg folder in Hugging Face format (e.g. CIDAS/clipseg-rd64-refined)")
    parser.add_argument("--out_dir", default=None, help="where masks go (default: IMAGE_DIR/mask)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per CLIPSeg forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="recompute masks that already exist")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def mask_path(out_dir: Path, image: Path) -> Path:
    return out_dir / f"{image.stem}.png"


def check_unique_stems(images: list[Path]) -> None:
    """Two images with one stem (cat.jpg, cat.png) would share one mask file; "preview" is taken."""
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem == Path(PREVIEW_NAME).stem:
            raise UserError(f"{path}: its mask would overwrite the preview sheet {PREVIEW_NAME}; rename the image")
        if path.stem in seen:
            raise UserError(f"{path} and {seen[path.stem]} would both write mask {path.stem}.png; rename one of them")
        seen[path.stem] = path


MARK = "written-by"   # PNG text key on every mask and preview this command writes
MARK_VALUE = "data/soft_segment.py"


def _marked() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(MARK, MARK_VALUE)
    return info


def save_mask(mask: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(mask).save(tmp, format="PNG", pnginfo=_marked())


def is_ours(path: Path, size: tuple[int, int] | None = None) -> bool:
    """Whether `path` is a file this command may keep or replace: a PNG it wrote (marked), or a one-channel
    PNG of the image's `size` (a mask written before masks were marked)."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and (im.text.get(MARK) == MARK_VALUE or (im.mode == "L" and im.size == size))
    except (OSError, ValueError):
        return False


def check_outputs(images: list[Path], out_dir: Path) -> None:
    """Refuse, before any work, a mask or preview path that holds a file this command did not write (another
    folder's photos, say): it would be taken as a mask, or replaced."""
    for image in images:
        path = mask_path(out_dir, image)
        if path.exists() and not is_ours(path, Image.open(image).size):
            raise UserError(f"{path}: exists and is not a mask of {image.name} (not written by this command); "
                            "choose another --out_dir")
    preview = out_dir / PREVIEW_NAME
    if preview.exists() and not is_ours(preview):
        raise UserError(f"{preview}: exists and was not written by this command; choose another --out_dir")


def write_preview(images: list[Path], out_dir: Path) -> Path:
    from clipseg.preview import make_preview

    if len(images) > PREVIEW_MAX_IMAGES:
        print(f"preview shows the first {PREVIEW_MAX_IMAGES} of {len(images)} images")
        images = images[:PREVIEW_MAX_IMAGES]
    items = []
    for path in images:
        with Image.open(mask_path(out_dir, path)) as m:
            items.append((path.name, load_rgb(path), np.asarray(m.convert("L"))))
    target = out_dir / PREVIEW_NAME
    with atomic_path(target) as tmp:
        make_preview(items).save(tmp, format="PNG", pnginfo=_marked())
    return target


def check_superclass(word: str) -> None:
    """The superclass as training takes it (whole CLIP words), and short enough that every template with it
    fits CLIPSeg's 77 tokens (a longer prompt would lose its last words, the object's name among them)."""
    from ldm.data.templates import TEMPLATES, fill
    from ldm.modules.tokenizer import CLIPTokenizer
    from ldm.perfusion.prompts import superclass_token_ids

    tokenizer = CLIPTokenizer(pad_with_eot=True)
    superclass_token_ids(tokenizer, word)
    longest = max(len(tokenizer.encode(fill(t, word))) for t in TEMPLATES) + 2
    if longest > tokenizer.max_length:
        raise UserError(f"--super_class is too long: with the templates it takes {longest} tokens, CLIPSeg reads "
                        f"{tokenizer.max_length}; name the object in a few words")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = parse_device(args.device)   # checked before any work
    check_superclass(args.super_class)
    image_dir = Path(args.image_dir)
    out_dir = Path(args.out_dir) if args.out_dir else image_dir / "mask"
    images = list_images(image_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; expected a folder for the masks")
    if out_dir.resolve() == image_dir.resolve():
        raise UserError(f"--out_dir {out_dir} is the image folder itself; masks need a folder of their own")
    if not images:
        raise UserError(f"{image_dir}: no images found (expected files such as .jpg, .png, .webp)")
    check_unique_stems(images)
    check_outputs(images, out_dir)
    todo = [p for p in images if args.overwrite or not mask_path(out_dir, p).exists()]
    print(f"{len(images)} images in {image_dir}; {len(todo)} to segment, {len(images) - len(todo)} masks kept")

    if todo:
        from transformers.utils import logging as hf_logging

        from clipseg import SoftMasker, load_clipseg

        hf_logging.disable_progress_bar()
        model, processor = load_clipseg(args.model_weight, device=device)
        masker = SoftMasker(model, processor, args.super_class)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(todo), unit="img", desc=f"masks for '{args.super_class}'") as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start : start + args.batch_size]
                pictures = [load_rgb(p) for p in batch]
                for path, mask in zip(batch, masker.masks(pictures)):
                    save_mask(mask, mask_path(out_dir, path))
                bar.update(len(batch))

    preview = out_dir / PREVIEW_NAME
    if todo or not preview.exists():
        preview = write_preview(images, out_dir)
        print(f"preview: {preview}")
    print(f"masks: {out_dir}")
    return 0

