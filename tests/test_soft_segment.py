"""CLIPSeg soft masks: a tiny random CLIPSeg saved in Hugging Face format, real skimage photographs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipseg import SoftMasker, load_clipseg, probability_to_uint8, soft_segment
from clipseg.tiny import save_tiny_clipseg
from clipseg.tokenizer_files import build_tokenizer, clip_vocabulary, write_tokenizer_files
from ldm.data.templates import TEMPLATES, fill

REPO = Path(__file__).resolve().parents[1]

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg-tiny"))


@pytest.fixture
def image_dir(tmp_path):
    """Real photographs in several flavours: a JPEG cat, a PNG cup, a grayscale cup, plus a non-image."""
    d = tmp_path / "concept"
    d.mkdir()
    Image.fromarray(skdata.chelsea()).save(d / "cat.jpg", quality=90)           # 451 x 300
    Image.fromarray(skdata.coffee()).save(d / "cup.png")                         # 600 x 400
    Image.fromarray(skdata.coffee()).convert("L").resize((150, 100)).save(d / "cup_gray.png")
    (d / "readme.txt").write_text("not an image")
    return d


def run(image_dir, model_dir, *extra):
    return soft_segment.main(["--image_dir", str(image_dir), "--super_class", "cat", "--model_weight", str(model_dir),
                              "--device", "cpu", "--batch_size", "2", *extra])


def test_masks_have_each_image_size_and_a_preview(image_dir, model_dir):
    with pytest.warns(UserWarning, match="readme.txt"):
        assert run(image_dir, model_dir) == 0
    mask_dir = image_dir / "mask"
    for name in ["cat.jpg", "cup.png", "cup_gray.png"]:
        path = mask_dir / (Path(name).stem + ".png")
        with Image.open(path) as m:
            m.verify()                                   # a structurally valid PNG
        with Image.open(path) as m, Image.open(image_dir / name) as img:
            assert m.format == "PNG" and m.mode == "L" and m.size == img.size
            values = np.asarray(m)
        assert values.dtype == np.uint8 and values.max() > values.min()   # in [0, 255], not constant
    assert not (mask_dir / "readme.png").exists()
    with Image.open(mask_dir / "preview.png") as preview:
        assert preview.mode == "RGB" and preview.width > 3 * 2 * 100   # 3 images, each beside its overlay


def test_second_run_keeps_everything_and_overwrite_recomputes(image_dir, model_dir):
    with pytest.warns(UserWarning):
        run(image_dir, model_dir)
    files = sorted((image_dir / "mask").iterdir())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    with pytest.warns(UserWarning):
        run(image_dir, model_dir)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    with pytest.warns(UserWarning):
        run(image_dir, model_dir, "--overwrite")
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert all(after[n][0] != before[n][0] for n in before)                          # rewritten ...
    assert all(after[n][1] == before[n][1] for n in before if n != "preview.png")     # ... identically


def test_out_dir_of_other_photos_is_never_taken_or_replaced(image_dir, model_dir, tmp_path):
    """--out_dir naming a folder of other photos whose names match: refused before any work, with or
    without --overwrite, and every photo there left as it was; the same for a foreign preview.png."""
    other = tmp_path / "holiday"
    other.mkdir()
    for stem, picture in (("cat", skdata.astronaut()), ("cup", skdata.chelsea())):
        Image.fromarray(picture).save(other / f"{stem}.png")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    for extra in ((), ("--overwrite",)):
        with pytest.raises(ValueError, match=r"holiday/cat.png: exists and is not a mask of cat.jpg"):
            run(image_dir, model_dir, "--out_dir", str(other), *extra)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    for path in other.iterdir():
        path.unlink()
    Image.fromarray(skdata.coffee()).save(other / "preview.png")
    with pytest.raises(ValueError, match="preview.png: exists and was not written by this command"):
        run(image_dir, model_dir, "--out_dir", str(other), "--overwrite")


def test_ensemble_equals_model_forward_averaged_over_templates(model_dir):
    model, processor = load_clipseg(model_dir)
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())]
    masker = SoftMasker(model, processor, "teddy bear", templates=TEMPLATES[:4])
    assert masker.prompts[0] == fill(TEMPLATES[0], "teddy bear")
    probs = masker.probabilities(images)
    expected = []
    with torch.no_grad():
        for prompt in masker.prompts:
            inputs = processor(text=[prompt] * 2, images=images, padding=True, return_tensors="pt")
            expected.append(torch.sigmoid(model(**inputs).logits))
    torch.testing.assert_close(probs, torch.stack(expected).mean(0), atol=1e-5, rtol=1e-5)
    single = SoftMasker(model, processor, "teddy bear", templates=TEMPLATES[:1]).probabilities(images)
    assert not torch.allclose(single, probs)             # the average really spans the templates


def test_probability_resize_and_quantisation():
    prob = torch.zeros(8, 8)
    prob[:, 4:] = 1.0
    out = probability_to_uint8(prob, (30, 20))           # PIL size order: width, height
    assert out.shape == (20, 30) and out.dtype == np.uint8
    assert out[:, :10].max() == 0 and out[:, -10:].min() == 255
    assert (probability_to_uint8(torch.full((4, 4), 0.5), (3, 5)) == 128).all()


def test_tokenizer_files_match_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert (vocab["!"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 49406, 49407)
    write_tokenizer_files(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    text = "A photo of a teddy-bear, on the beach!"
    ids = SimpleTokenizer().encode(text)
    assert tok(text)["input_ids"] == [49406, *ids, 49407] == build_tokenizer()(text)["input_ids"]


def test_model_folder_without_tokenizer_files_still_loads(tmp_path, model_dir):
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, copy)
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]:
        (copy / name).unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        model, processor = load_clipseg(copy)
    assert processor.tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_clear_errors(tmp_path, image_dir, model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        run(empty, model_dir)
    with pytest.raises(FileNotFoundError, match="not-downloaded"):
        with pytest.warns(UserWarning):
            run(image_dir, tmp_path / "not-downloaded")
    (image_dir / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="zz_broken.png"):
        with pytest.warns(UserWarning):
            run(image_dir, model_dir)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="--out_dir .*a-file is a file"):
        run(image_dir, model_dir, "--out_dir", str(tmp_path / "a-file"))
    for word, message in (("cat " * 100, "--super_class is too long"), ("{}", "must be words, without"),
                          ("ꙮꙮ", "not a known word")):
        with pytest.raises(ValueError, match=message):
            soft_segment.main(["--image_dir", str(image_dir), "--super_class", word, "--device", "cpu"])
    with pytest.raises(ValueError, match="--device mps: no Apple GPU"):   # run() passes --device cpu; the last wins
        soft_segment.main(["--image_dir", str(image_dir), "--super_class", "cat", "--device", "mps"])
    tampered = tmp_path / "tampered"   # weights that would run code when unpickled, and truncated ones
    shutil.copytree(model_dir, tampered)
    (tampered / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo never run",))

    torch.save({"x": Payload()}, tampered / "pytorch_model.bin")
    with pytest.raises(ValueError, match="tampered: cannot load the CLIPSeg model: .+"):
        load_clipseg(tampered)
    (tampered / "pytorch_model.bin").unlink()
    (tampered / "model.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(ValueError, match="tampered: cannot load the CLIPSeg model: .+"):
        load_clipseg(tampered)
    not_clipseg = tmp_path / "other-model"
    not_clipseg.mkdir()
    (not_clipseg / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="expected 'clipseg'"):
        load_clipseg(not_clipseg)


def test_cli_reports_one_line_error(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(REPO / "data" / "soft_segment.py"), "--image_dir", str(tmp_path),
                             "--super_class", "cat"], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 2
    message = f"error: {tmp_path}: no images found (expected files such as .jpg, .png, .webp)"
    assert result.stderr.strip().splitlines() == [message]
