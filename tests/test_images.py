"""ldm.data.images: every common image flavour loads as upright 8-bit RGB; bad input names the file."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.data.images import list_images, load_rgb


def test_rgb_jpeg(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(path, quality=95)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert abs(int(np.asarray(img)[10, 15, 0]) - 200) <= 3


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255            # red ...
    arr[:, :2, 3] = 0            # ... fully transparent on the left,
    arr[:, 2:, 3] = 128          # half transparent on the right
    path = tmp_path / "sticker.png"
    Image.fromarray(arr, "RGBA").save(path)
    out = np.asarray(load_rgb(path)).astype(int)
    assert (out[:, :2] == 255).all()                               # white background shows through
    assert (out[:, 2:, 0] == 255).all() and (abs(out[:, 2:, 1] - 127) <= 1).all()


def test_grayscale_8_and_16_bit(tmp_path):
    Image.fromarray(np.full((5, 6), 100, np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(np.full((5, 6), 65535 // 2, np.uint16)).save(tmp_path / "g16.png")
    g8, g16 = (np.asarray(load_rgb(tmp_path / n)) for n in ("g8.png", "g16.png"))
    assert g8.shape == (5, 6, 3) and (g8 == 100).all()
    assert g16.shape == (5, 6, 3) and (abs(g16.astype(int) - 127) <= 1).all()


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0         # palette entry 0 (blue) is transparent
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    out = np.asarray(load_rgb(path))
    assert tuple(out[0, 0]) == (0, 255, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255                    # white left half, black right half (landscape as stored)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6                     # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    out = np.asarray(load_rgb(path))
    assert out.shape == (40, 20, 3)      # displayed as portrait
    assert out[5, 10].mean() > 200 and out[35, 10].mean() < 50  # the white half is now on top


def test_unreadable_and_missing_files_name_the_path(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_rgb(bad)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        load_rgb(truncated)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_rgb(tmp_path / "nothere.png")


def test_list_images_sorts_and_skips(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp"]:
        Image.new("RGB", (2, 2)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "mask").mkdir()
    Image.new("L", (2, 2)).save(tmp_path / "mask" / "a.png")
    with pytest.warns(UserWarning, match="notes.txt"):
        found = list_images(tmp_path)
    assert [p.name for p in found] == ["a.JPG", "b.png", "c.webp"]


def test_list_images_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        list_images(tmp_path / "file.png")


def test_unreadable_links_are_skipped_with_the_warning(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")      # a link to itself
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")   # a broken link
    with pytest.warns(UserWarning, match="skipped 2 file"):
        found = list_images(tmp_path)
    assert [p.name for p in found] == ["a.png"]
