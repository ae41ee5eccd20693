"""The evaluation path: CLIP-T / CLIP-I / DINO against direct computations, the recommendation
rule, and scripts/evaluate_concept.py end to end on the tiny config with tiny random metric models."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.evaluation.harness import recommend
from ldm.evaluation.metrics import ClipMetric, DinoMetric, preprocess
from ldm.evaluation.tiny import write_tiny_metric_models
from ldm.perfusion.gate_settings import recommended_gates, write_recommendation
from tests.concept_files import cli_config, concept_file, trained_concept
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def metric_files(tmp_path_factory):
    return write_tiny_metric_models(tmp_path_factory.mktemp("metrics"))


@pytest.fixture(scope="module")
def clip(metric_files):
    config, checkpoint, _ = metric_files
    return ClipMetric(str(config), checkpoint)


@pytest.fixture(scope="module")
def photos():
    """Real photographs at different sizes, in [0, 1]."""
    from skimage import data

    return [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255
            for im in (data.chelsea(), data.coffee(), data.astronaut()[::4, ::4])]


def batch(photos, side=96):
    return torch.stack([F.interpolate(p[None], size=(side, side), mode="bilinear", antialias=True)[0] for p in photos])


def test_clip_scores_equal_open_clips_own_cosines(clip, photos):
    import open_clip

    images = batch(photos)
    assert torch.allclose(clip.image_similarity(images[:1], images[:1]), torch.ones(1), atol=1e-5)   # itself: 1
    prompts = ["a photo of a cat", "a cup of coffee", "an astronaut"]
    with torch.no_grad():
        x = preprocess(images, clip.size, clip.mean, clip.std)
        image = F.normalize(clip.model.encode_image(x), dim=-1)
        text = F.normalize(clip.model.encode_text(open_clip.get_tokenizer("tiny-clip")(prompts)), dim=-1)
    assert torch.allclose(clip.text_similarity(images, prompts), (image * text).sum(-1), atol=1e-5)
    assert torch.allclose(clip.image_similarity(images, images), (image @ image.T).mean(-1), atol=1e-5)
    # the preprocessing is open_clip's own (resize the shorter side, centre crop, its mean and std)
    transform = open_clip.image_transform(clip.size, is_train=False, mean=clip.mean, std=clip.std)
    ours = preprocess(photos[0][None], clip.size, clip.mean, clip.std)[0]
    theirs = transform(Image.fromarray((photos[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
    assert (ours - theirs).abs().mean() < 0.02


def test_batch_size_does_not_change_the_scores(clip, metric_files, photos):
    dino = DinoMetric(metric_files[2])
    images, refs = batch(photos), photos   # references keep their own sizes
    scores = {}
    for size in (1, 32):
        clip.batch = dino.batch = size
        scores[size] = (clip.image_similarity(images, refs), clip.text_similarity(images, ["a"] * 3),
                        dino.image_similarity(images, refs))
    clip.batch = dino.batch = 32
    for a, b in zip(scores[1], scores[32]):
        assert torch.allclose(a, b, atol=1e-5)


def test_dino_uses_the_cls_token(metric_files, photos):
    from transformers import ViTModel

    dino = DinoMetric(metric_files[2])
    images = batch(photos, 64)
    vit = ViTModel.from_pretrained(metric_files[2], add_pooling_layer=False).eval()
    x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = vit(pixel_values=x).last_hidden_state
    cls, mean_tokens = F.normalize(hidden[:, 0], dim=-1), F.normalize(hidden.mean(1), dim=-1)
    got = dino.image_similarity(images, images[:1])
    assert torch.allclose(got, cls @ cls[0], atol=1e-5)
    assert not torch.allclose(got, mean_tokens @ mean_tokens[0], atol=1e-3)


def test_recommendation_rule_on_a_hand_made_curve():
    curve = [{"beta": 0.3, "tau": 0.1, "fidelity": 0.90, "alignment": 0.20},    # most fidelity, text lost
             {"beta": 0.5, "tau": 0.1, "fidelity": 0.80, "alignment": 0.29},
             {"beta": 0.6, "tau": 0.1, "fidelity": 0.80, "alignment": 0.30},    # tie on fidelity: more alignment
             {"beta": 0.7, "tau": 0.1, "fidelity": 0.70, "alignment": 0.31},
             {"beta": 0.9, "tau": 0.1, "fidelity": 0.50, "alignment": 0.32}]
    assert recommend(curve, baseline_alignment=0.31)["beta"] == 0.6        # 0.95 x 0.31 = 0.2945
    assert recommend(curve, baseline_alignment=0.31, fraction=1.0)["beta"] == 0.7
    assert recommend(curve, baseline_alignment=0.40, fraction=1.0) is None
    assert recommend(curve, baseline_alignment=0.2)["beta"] == 0.3


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(ROOT / "scripts"))
    loaded = {}
    for name in ("evaluate_concept", "perfusion_txt2img"):
        spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/{name}.py")
        loaded[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded[name])
    return loaded


@pytest.fixture(scope="module")
def training_images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("cat-images")
    for i, photo in enumerate(photos):
        Image.fromarray((photo.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_evaluate_concept_end_to_end_and_the_stored_recommendation(scripts, metric_files, training_images,
                                                                 tmp_path, capsys):
    import shutil

    clip_config, clip_ckpt, dino = metric_files
    cat, dog = tmp_path / "cat.safetensors", tmp_path / "dog.safetensors"
    shutil.copy(concept_file("cat", 0), cat)
    shutil.copy(concept_file("dog", 1), dog)
    out = tmp_path / "eval"
    argv = ["--config", str(cli_config()), "--concepts", f"{cat},{dog}",
            "--images", f"{training_images},{training_images}", "--prompts", "dreambooth-live", "--max_prompts", "3",
            "--clip_model", str(clip_config), "--clip_ckpt", str(clip_ckpt), "--dino", str(dino),
            "--seeds", "2", "--steps", "2", "--batch", "4", "--beta_sweep", "0.3:0.9:3", "--tau_sweep", "0.1,0.15",
            "--write_recommendation", "--out", str(out), "--device", "cpu"]
    assert scripts["evaluate_concept"].main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    cat_entry = results["concepts"][0]
    assert [r["prompt"] for r in cat_entry["per_prompt"]] == ["a {} in the jungle", "a {} in the snow",
                                                              "a {} on the beach"]
    assert set(cat_entry["mean"]) == {"clip_t", "clip_i", "dino"} and len(cat_entry["sweep"]) == 6
    assert {(p["beta"], p["tau"]) for p in cat_entry["sweep"]} == {(b, t) for b in (0.3, 0.6, 0.9) for t in (0.1, 0.15)}
    assert all(-1 <= v <= 1 for v in cat_entry["mean"].values())
    assert len(results["pairs"]["mean"]["clip_i"]) == 2                 # each concept against its own images
    for name in ("report.md", "tradeoff.png", "per_prompt_1.png", "per_prompt_2.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| a {} in the jungle |" in report and "of the sampling time" in report
    # the recommendation is the rule's pick on the measured sweep, stored in the concept file
    from ldm.perfusion.concepts import load_concept

    rec = recommend(cat_entry["sweep"], cat_entry["baseline"]["mean"]["clip_t"], 0.95, "clip_i", "clip_t")
    assert cat_entry["recommendation"] == rec
    stored = recommended_gates(load_concept(cat)) if rec else None
    if rec:
        assert (stored["beta"], stored["tau"]) == (rec["beta"], rec["tau"])
    # perfusion_txt2img uses it when no --beta/--tau is given, says so, and records it in the PNGs
    write_recommendation(cat, {"beta": 0.55, "tau": 0.12}, "hand-written for the test")
    capsys.readouterr()
    assert scripts["perfusion_txt2img"].main(["--config", str(cli_config()), "--personalized_ckpt", str(cat),
                                              "--prompt", "a photo of a {}", "--steps", "2", "--n_samples", "1",
                                              "--outdir", str(tmp_path / "samples"), "--device", "cpu"]) == 0
    assert "beta from its stored recommendation, tau from its stored recommendation" in capsys.readouterr().err
    with Image.open(next((tmp_path / "samples/samples").glob("*.png"))) as im:
        meta = json.loads(im.text["settings"])
    assert meta["concepts"][0]["beta"] == 0.55 and meta["concepts"][0]["tau"] == 0.12
    assert meta["concepts"][0]["gates_from"] == {"beta": "recommendation", "tau": "recommendation"}


@pytest.mark.parametrize("change, expected", [
    ({"--clip_ckpt": "missing.bin"}, "--clip_ckpt missing.bin: no such file; download an open_clip checkpoint"),
    ({"--dino": "nowhere"}, "--dino nowhere: no config.json there; download the folder facebook/dino-vits16"),
    ({"--clip_model": "ViT-Nonsense"}, "--clip_model 'ViT-Nonsense' is not an open_clip architecture"),
    ({"--prompts": "nothing.txt"}, "--prompts nothing.txt: no such file"),
    ({"--images": "a,b"}, "--images names 2 folder(s) for 1 concept(s)"),
    ({"--write_recommendation": None}, "--write_recommendation needs --beta_sweep"),
    ({"--tau_sweep": "0.1"}, "--tau_sweep needs --beta_sweep"),
    ({"--fraction": "nan"}, "--fraction nan: must be in (0, 1]"),
    ({"--prompts": "NOSLOT"}, "template 'a photo of a cat' does not name the concept with {}"),
    ({"--beta_sweep": "nan:1:3"}, "--beta_sweep 'nan:1:3': START and STOP must be finite numbers"),
    ({"--beta_sweep": "0.3:0.9:1000000"}, "COUNT must be from 2 to 1000"),
    ({"--beta_sweep": "0.3:0.9:3", "--tau_sweep": "0.1,0"}, "--tau_sweep must be > 0"),
    ({"--tau": "1e-300"}, "--tau must be > 0 (it divides the gate's input; at least 1.2e-38"),
    ({"--concepts": "OTHER"}, "other.safetensors: trained with unet fingerprint 0123456789abcdef"),
    ({"--seeds": str(10**12)}, "at most 1000 seeds per prompt"),
])
def test_bad_input_is_one_line(scripts, metric_files, training_images, tmp_path, capsys, change, expected):
    from ldm.cli import run_cli

    clip_config, clip_ckpt, dino = metric_files
    args = {"--config": str(cli_config()), "--concepts": str(concept_file("cat", 0)), "--images": str(training_images),
            "--clip_model": str(clip_config), "--clip_ckpt": str(clip_ckpt), "--dino": str(dino),
            "--out": str(tmp_path / "eval"), "--device": "cpu", **change}
    if args["--concepts"] == "OTHER":   # a concept of another base model: refused before any sampling
        from dataclasses import replace

        from ldm.perfusion.concepts import save_concept
        cat = trained_concept("cat", 0)
        args["--concepts"] = str(save_concept(tmp_path / "other.safetensors", replace(
            cat, fingerprints={**cat.fingerprints, "unet": "0123456789abcdef"})))
    if args.get("--prompts") == "NOSLOT":
        args["--prompts"] = str(tmp_path / "noslot.txt")
        (tmp_path / "noslot.txt").write_text("a photo of a cat\n")
    argv = [x for k, v in args.items() for x in ([k] if v is None else [k, v])]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: scripts["evaluate_concept"].main(argv))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert exit_info.value.code == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("stored", ['{"beta": true, "tau": true}', '{"beta": 0.6}', '{"beta": 0.6, "tau": 0}',
                                    '{"beta": 1e999, "tau": 0.1}', '[0.7, 0.15]', 'null', '{beta: 0.7'])
def test_a_tampered_recommendation_names_the_concept_file(stored):
    from dataclasses import replace

    from ldm.perfusion.gate_settings import RECOMMENDATION, choose_gates

    concept = replace(trained_concept("cat", 0), extra={RECOMMENDATION: stored})
    with pytest.raises(ValueError, match=r"teddy.safetensors: its stored recommendation .* is not \{\"beta\": a number"):
        choose_gates([concept], None, None, names=["teddy.safetensors"])


def test_a_stored_recommendation_keeps_the_file_mode_and_links(tmp_path):
    """--write_recommendation writes into a linked file's target (the link stays a link), keeps the mode, and
    refuses a read-only concept before any work."""
    import os
    import stat

    from ldm.perfusion.concepts import load_concept, save_concept
    from ldm.perfusion.gate_settings import check_writable, write_recommendation

    target = save_concept(tmp_path / "cat.safetensors", trained_concept("cat", 0))
    target.chmod(0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    write_recommendation(link, {"beta": 0.6, "tau": 0.1}, "a test")
    assert link.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert recommended_gates(load_concept(link))["beta"] == 0.6
    target.chmod(0o444)
    if os.access(target, os.W_OK):   # root writes a read-only file: it stays read-only
        write_recommendation(link, {"beta": 0.5, "tau": 0.1}, "a test")
        assert stat.S_IMODE(target.stat().st_mode) == 0o444
    else:
        with pytest.raises(ValueError, match="read-only; --write_recommendation needs to write it"):
            check_writable(link)


def test_broken_metric_model_files_are_one_line(metric_files, tmp_path):
    """Truncated, tampered or mismatched CLIP and DINO files: one line naming the flag and file."""
    import shutil

    from ldm.evaluation.metrics import ClipMetric, DinoMetric

    clip_config, clip_ckpt, dino = metric_files
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(clip_ckpt.read_bytes()[:100])
    bad_json = tmp_path / "bad-clip.json"
    bad_json.write_text('{"embed_dim": 32,\n')
    class Payload:
        def __reduce__(self):
            return (print, ("never run",))

    evil = tmp_path / "evil.bin"
    torch.save({"state_dict": Payload()}, evil)
    cases = [(lambda: ClipMetric(str(clip_config), truncated), "--clip_ckpt .*truncated.safetensors: cannot be loaded"),
             (lambda: ClipMetric(str(clip_config), evil), "--clip_ckpt .*evil.bin: cannot be loaded as tiny-clip .+"),
             (lambda: ClipMetric(str(bad_json), clip_ckpt), "--clip_model .*bad-clip.json: not a valid open_clip")]
    for name, change in (("no-weights", lambda d: [p.unlink() for p in d.glob("model.safetensors")]),
                         ("bad-config", lambda d: (d / "config.json").write_text("{ not json")),
                         ("bad-preprocessor", lambda d: (d / "preprocessor_config.json").write_text("{ no")),
                         ("truncated", lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00")),
                         ("other-model", lambda d: (d / "config.json").write_text('{"model_type": "clipseg"}'))):
        folder = tmp_path / name
        shutil.copytree(dino, folder)
        change(folder)
        cases.append((lambda folder=folder: DinoMetric(folder), f"--dino .*{name}: "))
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
