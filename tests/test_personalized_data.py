"""PersonalizedDataset and the step sampler on real photos (skimage's chelsea cat and coffee cup)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader

from ldm.data.loader import ShuffledPassSampler, derive_seed
from ldm.data.personalized import PersonalizedDataset

SIZE = 32
CAT = skdata.chelsea()  # (300, 451, 3): wider than tall
CUP = skdata.coffee()  # (400, 600, 3)


def save_mask(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def left_third_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 3] = 255
    return mask


@pytest.fixture
def concept_dir(tmp_path):
    """The cat as JPEG, the cup as PNG, the cat as RGBA PNG, as grayscale PNG and as an EXIF-rotated JPEG;
    masks as 8-bit PNGs of the upright image's size."""
    root = tmp_path / "concept"
    root.mkdir()
    Image.fromarray(CAT).save(root / "cat.jpg", quality=95)
    Image.fromarray(CUP).save(root / "cup.png")
    rgba = np.dstack([CAT, np.full(CAT.shape[:2], 255, np.uint8)])
    rgba[:, : CAT.shape[1] // 2, 3] = 0  # left half transparent
    Image.fromarray(rgba, mode="RGBA").save(root / "cat_rgba.png")
    Image.fromarray(CAT).convert("L").save(root / "cat_gray.png")
    # Stored rotated 90 degrees counter-clockwise; EXIF orientation 6 says "rotate clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(CAT).transpose(Image.Transpose.ROTATE_90).save(root / "cat_exif.jpg", quality=95, exif=exif)
    for stem, (h, w) in {"cat": CAT.shape[:2], "cup": CUP.shape[:2], "cat_rgba": CAT.shape[:2],
                         "cat_gray": CAT.shape[:2], "cat_exif": CAT.shape[:2]}.items():
        save_mask(root / "mask" / f"{stem}.png", left_third_mask(h, w))
    return root


def by_name(dataset: PersonalizedDataset, stem: str) -> int:
    return [p.stem for p in dataset.paths].index(stem)


def test_items_shapes_ranges_and_captions(concept_dir):
    ds = PersonalizedDataset(concept_dir, "sks", "teddy bear", size=SIZE, templates=["a photo of a {}", "a {} in snow"])
    assert len(ds) == 5
    torch.manual_seed(0)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["mask"].shape == (1, SIZE, SIZE) and 0.0 <= item["mask"].min() and item["mask"].max() <= 1.0
        assert item["caption"] in ("a photo of a sks", "a sks in snow")
        assert item["caption_super"] == item["caption"].replace("sks", "teddy bear")


def test_grayscale_rgba_and_exif_images_are_loaded_as_seen(concept_dir):
    ds = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, flip_p=0.0)
    cat = ds[by_name(ds, "cat")]["image"]
    gray = ds[by_name(ds, "cat_gray")]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert (gray[0] - cat.mean(0)).abs().mean() < 0.05  # same picture, luminance only
    # EXIF rotation applied: the rotated file gives the upright picture (up to JPEG noise).
    exif = ds[by_name(ds, "cat_exif")]["image"]
    assert (exif - cat).abs().mean() < 0.03
    assert (exif - cat.transpose(1, 2)).abs().mean() > 0.1
    # Transparent pixels are composited on white: the crop's left part is white, the rest is the cat.
    rgba = ds[by_name(ds, "cat_rgba")]["image"]
    assert torch.all(rgba[:, :, :10] > 0.99)
    assert (rgba[:, :, 20:] - cat[:, :, 20:]).abs().mean() < 0.03


def test_mask_follows_crop_and_flip(concept_dir):
    plain = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, flip_p=0.0)
    flipped = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, flip_p=1.0)
    i = by_name(plain, "cat")
    a, b = plain[i], flipped[i]
    # The mask covers the left third of the 451-px-wide photo; the centre 300x300 crop starts at
    # x=75, so after resizing to 32 px about the 8 leftmost columns are inside.
    mask = a["mask"][0]
    assert torch.all(mask[:, :6] > 0.99) and torch.all(mask[:, 10:] < 0.01)
    assert torch.equal(b["image"], torch.flip(a["image"], dims=[-1]))
    assert torch.equal(b["mask"], torch.flip(a["mask"], dims=[-1]))
    assert torch.all(b["mask"][0, :, -6:] > 0.99) and torch.all(b["mask"][0, :, :-10] < 0.01)
    # Without the centre crop the whole width is squeezed in: a third of 32 columns.
    squeezed = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, flip_p=0.0, center_crop=False)
    mask = squeezed[i]["mask"][0]
    assert torch.all(mask[:, :9] > 0.99) and torch.all(mask[:, 12:] < 0.01)


def test_soft_mask_values_and_16_bit_masks(concept_dir):
    h, w = CUP.shape[:2]
    save_mask(concept_dir / "mask" / "cup.png", np.full((h, w), 128))
    ds = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE)
    assert torch.allclose(ds[by_name(ds, "cup")]["mask"], torch.full((1, SIZE, SIZE), 128 / 255))
    Image.fromarray(np.full((h, w), 65535, np.uint16)).save(concept_dir / "mask" / "cup.png")
    ds = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE)
    assert torch.allclose(ds[by_name(ds, "cup")]["mask"], torch.ones(1, SIZE, SIZE))


def test_without_masks_the_mask_is_all_ones(concept_dir):
    for path in (concept_dir / "mask").iterdir():
        path.unlink()
    ds = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, use_masks=False)
    assert torch.equal(ds[0]["mask"], torch.ones(1, SIZE, SIZE))


def test_randomness_is_reproducible_from_the_seed(concept_dir):
    def draws(seed):
        torch.manual_seed(seed)
        ds = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE)
        items = [ds[i % len(ds)] for i in range(40)]
        return [it["caption"] for it in items], [bool(it["mask"][0, 0, 0] < 0.5) for it in items]  # flipped?

    captions, flips = draws(3)
    assert (captions, flips) == draws(3)
    assert (captions, flips) != draws(4)
    assert 5 < sum(flips) < 35 and len(set(captions)) > 5


def test_dataloader_workers_draw_reproducibly(concept_dir):
    ds = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE)

    def captions(seed):
        loader = DataLoader(ds, batch_size=5, num_workers=2, sampler=ShuffledPassSampler(len(ds), 20, seed=1),
                            generator=torch.Generator().manual_seed(seed))
        return [c for batch in loader for c in batch["caption"]]

    first = captions(7)
    assert first == captions(7) and first != captions(8)


def test_sampler_covers_each_item_once_per_pass_and_depends_on_rank():
    order = list(ShuffledPassSampler(5, 23, seed=derive_seed(23, 0, 0)))
    assert len(order) == 23
    for start in range(0, 20, 5):
        assert sorted(order[start:start + 5]) == list(range(5))
    other_rank = list(ShuffledPassSampler(5, 23, seed=derive_seed(23, 1, 0)))
    resumed = list(ShuffledPassSampler(5, 23, seed=derive_seed(23, 0, 100)))
    assert order != other_rank and order != resumed
    sampler = ShuffledPassSampler(5, 23, seed=derive_seed(23, 0, 0))
    assert order == list(sampler) and order != list(sampler)  # reproducible; a second pass is reshuffled


# ----------------------------------------------------------------------------- bad input
def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError) as err, pytest.warns(UserWarning):
        PersonalizedDataset(tmp_path, "sks", "cat")
    assert str(tmp_path) in one_line(err) and "no images" in one_line(err)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        PersonalizedDataset(tmp_path / "nope", "sks", "cat")
    assert "nope" in one_line(err)


def test_missing_masks_name_the_command(concept_dir):
    (concept_dir / "mask" / "cup.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE)
    message = one_line(err)
    assert "cup.png" in message and "1 of 5" in message
    assert f"python data/soft_segment.py --image_dir {concept_dir} --super_class cat" in message
    assert "use_masks: false" in message


def test_mask_of_the_wrong_size(concept_dir):
    h, w = CAT.shape[:2]
    save_mask(concept_dir / "mask" / "cat_exif.png", left_third_mask(w, h))  # the stored, unrotated size
    with pytest.raises(ValueError) as err:
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE)
    message = one_line(err)
    assert "cat_exif.png" in message and f"{h}x{w}" in message and f"{w}x{h}" in message


def test_template_without_placeholder(concept_dir):
    with pytest.raises(ValueError) as err:
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, templates=["a photo of a {}", "a photo of a cat"])
    assert "'a photo of a cat'" in one_line(err) and "{}" in one_line(err)


@pytest.mark.parametrize("kwargs, word", [({"size": 0}, "size"), ({"flip_p": 1.5}, "flip_p"),
                                          ({"placeholder": ""}, "placeholder"), ({"templates": []}, "templates")])
def test_bad_settings(concept_dir, kwargs, word):
    settings = {"placeholder": "sks", "superclass": "cat", **kwargs}
    with pytest.raises(ValueError) as err:
        PersonalizedDataset(concept_dir, **settings)
    assert word in one_line(err)


def test_per_image_captions_replace_the_templates(concept_dir):
    import json

    table = {name: f"a {{}} seen as {name.split('.')[0]}" for name in
             ("cat.jpg", "cup.png", "cat_rgba.png", "cat_gray.png", "cat_exif.jpg")}
    (concept_dir / "captions.json").write_text(json.dumps(table))
    ds = PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, captions="captions.json")
    for i, path in enumerate(ds.paths):
        assert ds[i]["caption"] == f"a sks seen as {path.stem}"
        assert ds[i]["caption_super"] == f"a cat seen as {path.stem}"
    del table["cup.png"]
    table["cat.jpg"] = "a cat"
    (concept_dir / "captions.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"captions.json: no caption for 1 image\(s\) \(cup.png\)"):
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, captions="captions.json")
    table["cup.png"] = "a cup"
    (concept_dir / "captions.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match="\\{\\}"):
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, captions="captions.json")
    (concept_dir / "captions.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="cannot read the captions file"):
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, captions="captions.json")


def test_a_caption_that_is_not_text_is_refused(concept_dir):
    import json

    names = ("cat.jpg", "cup.png", "cat_rgba.png", "cat_gray.png", "cat_exif.jpg")
    (concept_dir / "captions.json").write_text(json.dumps({**{n: "a {}" for n in names}, "cup.png": 5}))
    with pytest.raises(ValueError, match="captions.json: the caption of cup.png is 5; expected text"):
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE, captions="captions.json")


def test_all_black_masks_are_refused(concept_dir):
    for path in (concept_dir / "mask").iterdir():
        with Image.open(path) as m:
            size = m.size
        save_mask(path, np.zeros(size[::-1]))
    with pytest.raises(ValueError, match="every mask is black"):
        PersonalizedDataset(concept_dir, "sks", "cat", size=SIZE)
