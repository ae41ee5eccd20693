"""scripts/perfusion_txt2img.py end to end on the tiny config: PNGs with metadata, grids, one-line errors."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.build import load_config
from ldm.perfusion.concepts import save_concept
from tests.concept_files import cli_config, concept_file, trained_concept
from tests.conftest import ROOT, TINY_V1


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("perfusion_txt2img", ROOT / "scripts/perfusion_txt2img.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files():
    return {"config": str(cli_config()), "cat": str(concept_file("cat", 0)), "dog": str(concept_file("dog", 1))}


def run(script, capsys, argv):
    """The script's command line as the shell runs it: returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        script.run_cli(lambda: script.main([str(a) for a in argv]))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def _meta(path):
    with Image.open(path) as im:
        return im.size, json.loads(im.text["settings"])


FAST = ["--steps", 2, "--scale", 4, "--H", 32, "--W", 32]


def test_two_concepts_from_file_with_global_locking(script, capsys, files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {1} and a {2}\n\na {2} next to a {1} on the beach\n")
    code, out, err = run(script, capsys, [
        "--config", files["config"], "--personalized_ckpt", f"{files['cat']},{files['dog']}",
        "--from-file", prompts, "--beta", "0.7,0.6", "--tau", "0.15", "--global_locking", "--approx_multi",
        "--n_samples", 2, "--n_iter", 1, "--seed", 7, "--sampler", "euler", "--outdir", tmp_path / "out", *FAST])
    assert code == 0, err
    samples = sorted((tmp_path / "out/samples").glob("*.png"))
    grids = sorted((tmp_path / "out").glob("grid-*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [p.name for p in grids] == ["grid-00000.png", "grid-00002.png"]
    assert str(tmp_path / "out/samples") in out and "grid-00002.png" in out
    size, meta = _meta(samples[3])
    assert size == (32, 32)
    assert meta["prompt_template"] == "a {2} next to a {1} on the beach"
    assert meta["prompt"] == "a ohwx next to a sks on the beach"
    assert meta["global_locking"] is True and meta["multi_concept"] == "approx" and meta["sampler"] == "euler"
    assert meta["seed"] == 8 and meta["steps"] == 2 and meta["index_in_batch"] == 1
    assert [(c["file"], c["token"], c["superclass"], c["beta"], c["tau"]) for c in meta["concepts"]] == [
        (files["cat"], "sks", "cat", 0.7, 0.15), (files["dog"], "ohwx", "dog", 0.6, 0.15)]
    size, meta = _meta(grids[0])
    assert size == (2 * 34 + 2, 34 + 2) and meta["seeds"] == [7]


def test_single_concept_fixed_code_and_ddim_eta(script, capsys, files, tmp_path):
    code, out, err = run(script, capsys, [
        "--config", files["config"], "--personalized_ckpt", files["cat"], "--prompt", "a photo of a {}",
        "--n_samples", 1, "--n_iter", 2, "--fixed_code", "--ddim_eta", 0.5, "--negative_prompt", "blurry",
        "--outdir", tmp_path, *FAST])
    assert code == 0, err
    (grid,) = tmp_path.glob("grid-*.png")
    size, meta = _meta(grid)
    assert size == (34 + 2, 2 * 34 + 2) and meta["seeds"] == [42, 43]
    _, meta = _meta(tmp_path / "samples/00001.png")
    assert meta["fixed_code"] is True and meta["ddim_eta"] == 0.5 and meta["negative_prompt"] == "blurry"
    assert meta["concepts"][0]["beta"] == 0.7 and meta["random_weights_seed"] == 0


def test_beta_sweep_grid(script, capsys, files, tmp_path):
    code, out, err = run(script, capsys, [
        "--config", files["config"], "--personalized_ckpt", files["cat"], "--prompt", "a photo of a {}",
        "--beta_sweep", "0.4:0.8:3", "--n_samples", 2, "--outdir", tmp_path, *FAST])
    assert code == 0, err
    (grid,) = tmp_path.glob("beta-sweep-*.png")
    size, meta = _meta(grid)
    assert size[0] == 3 * 34 + 2 and size[1] > 2 * 34 + 2        # 3 columns, 2 rows, a label margin
    assert meta["beta_sweep"] == [0.4, 0.6, 0.8] and meta["concepts"][0]["beta"] == [0.4, 0.6, 0.8]
    betas = [_meta(p)[1]["concepts"][0]["beta"] for p in sorted((tmp_path / "samples").glob("*.png"))]
    assert betas == [0.4, 0.4, 0.6, 0.6, 0.8, 0.8]
    with Image.open(grid) as im:   # the label margin has dark text pixels above each column
        margin = np.asarray(im.convert("L"))[: size[1] - (2 * 34 + 2)]
    assert all(margin[:, 2 + i * 34: 2 + (i + 1) * 34].min() < 128 for i in range(3))


def _with_fingerprint(tmp_path, part):
    path = tmp_path / f"other-{part}.safetensors"
    cat = trained_concept("cat", 0)
    save_concept(path, replace(cat, fingerprints={**cat.fingerprints, part: "0123456789abcdef"}))
    return path


@pytest.mark.parametrize("case,expected", [
    ("slot", r"names {3} but 2 concepts are loaded"),
    ("beta_length", "beta has 3 values for 2 concepts"),
    ("tau_zero", "tau must be > 0"),
    ("tau_negative", "tau must be > 0"),
    ("missing", "missing.safetensors: no such concept file"),
    ("corrupt", "corrupt.safetensors: not a readable safetensors concept file"),
    ("unet", "trained with unet fingerprint 0123456789abcdef, but this model's is"),
    ("covariance", "trained with covariance fingerprint"),
    ("plain_config", "not a Perfusion model"),
    ("beta_text", "--beta '0.7,x' is not a number"),
    ("sweep", "must be START:STOP:COUNT"),
    ("no_prompt", "no prompt"),
    ("merged", "merges with the characters next to it"),
    ("comma", "uses '{}' but 2 concepts are loaded; name them {1}..{2} (--personalized_ckpt names 2: "),
    ("lightning_ckpt", "last.ckpt: a PyTorch checkpoint, not a concept file (a run's concept is concepts/last"),
    ("concept_as_ckpt", "cat-0.safetensors: a Perfusion concept, not model weights (sampling takes it with"),
])
def test_bad_input_is_one_line_error(script, capsys, files, tmp_path, case, expected):
    cat, dog, config = files["cat"], files["dog"], files["config"]
    args = {"--config": config, "--personalized_ckpt": f"{cat},{dog}", "--prompt": "a {1} and a {2}"}
    if case == "comma":   # a file name with a comma is read as two files
        args["--prompt"] = "a {}"
    elif case == "lightning_ckpt":
        import torch
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "last.ckpt")
        args["--personalized_ckpt"] = str(tmp_path / "last.ckpt")
        args["--prompt"] = "a {}"
    elif case == "concept_as_ckpt":
        args["--ckpt"] = cat
    if case == "slot":
        args["--prompt"] = "a {1} and a {3}"
    elif case == "beta_length":
        args["--beta"] = "0.5,0.6,0.7"
    elif case in ("tau_zero", "tau_negative"):
        args["--tau"] = "0.1,0" if case == "tau_zero" else "-0.2"
    elif case == "missing":
        args["--personalized_ckpt"] = f"{cat},{tmp_path / 'missing.safetensors'}"
    elif case == "corrupt":
        bad = tmp_path / "corrupt.safetensors"
        bad.write_bytes(b"\x00" * 64)
        args["--personalized_ckpt"] = f"{bad},{dog}"
    elif case == "unet":
        args["--personalized_ckpt"] = f"{cat},{_with_fingerprint(tmp_path, 'unet')}"
    elif case == "covariance":   # a real mismatch: C estimated from other captions than the concepts used
        other = tmp_path / "other-covariance.yaml"
        OmegaConf.save(load_config([config], ["model.params.covariance_path=null",
                                              "model.params.covariance_max_captions=100",
                                              f"model.params.covariance_captions={ROOT / 'data/captions.txt'}"]), other)
        args["--config"] = other
    elif case == "plain_config":
        args["--config"] = TINY_V1
    elif case == "beta_text":
        args["--beta"] = "0.7,x"
    elif case == "sweep":
        args["--beta_sweep"] = "0.4:0.8"
    elif case == "no_prompt":
        del args["--prompt"]
    elif case == "merged":
        args["--prompt"] = "a {1}s and a {2}"
    argv = [x for kv in args.items() for x in kv] + ["--outdir", tmp_path / "out", *FAST]
    code, out, err = run(script, capsys, argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert expected in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,expected", [
    (["--H=-8"], "--H must be at least 1"),
    (["--W", "0"], "--W must be at least 1"),
    (["--scale", "nan"], "--scale must be a finite number"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--sampler", "euler", "--ddim_eta", "0.5"], "--ddim_eta 0.5: only --sampler ddim has an eta"),
    (["--n_iter", "0"], "--n_iter must be at least 1"),
    (["--device", "mps"], "--device mps: no Apple GPU (MPS) is available"),
    (["--outdir", "FILE/sub"], "is a file; expected a folder"),
    (["--n_samples", "1000000000"], "at most 1024 images in one batch; ask for more batches with --n_iter"),
    (["--H", "18"], "--H 18 and --W 32 must be multiples of 4 (the autoencoder's factor times the U-Net's"),
    (["--H", "200000", "--W", "200000"], "over --max_pixels 16,777,216 (a typo?); pass a larger --max_pixels"),
    (["--seed", "99999999999999999999999"], "--seed must be a whole number"),
    (["--from-file", "IMAGE"], "not a UTF-8 text file"),
])
def test_bad_sampling_flags_name_the_flag(script, capsys, files, tmp_path, flags, expected):
    if "IMAGE" in flags:
        from PIL import Image

        image = tmp_path / "image.jpg"
        Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
        flags = [str(image) if f == "IMAGE" else f for f in flags]
    (tmp_path / "FILE").write_text("not a folder")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    argv = ["--config", files["config"], "--personalized_ckpt", files["cat"], "--outdir", tmp_path / "out", *FAST, *flags]
    if "--from-file" not in flags:
        argv += ["--prompt", "a {}"]
    code, out, err = run(script, capsys, argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / "out").exists()


def test_both_sampling_scripts_share_flags_defaults_seeds_and_grids(script, capsys, files, tmp_path):
    """scripts/txt2img.py takes perfusion_txt2img.py's flags (less the concepts) with the same defaults; the
    same tiny model, prompt and seeds give the same grid layout, and the PNGs carry AUTOMATIC1111's text."""
    spec = importlib.util.spec_from_file_location("txt2img", ROOT / "scripts/txt2img.py")
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    shared = {"--prompt", "--from-file", "--negative_prompt", "--sampler", "--steps", "--ddim_steps", "--scale", "--H",
              "--W", "--ddim_eta", "--n_samples", "--n_iter", "--seed", "--fixed_code", "--skip_grid", "--precision",
              "--device", "--outdir"}
    options = {p: {o: a.default for a in p._actions for o in a.option_strings} for p in (base.parser(), script.parser())}
    assert all(shared <= set(o) for o in options.values())
    for flag in shared - {"--outdir", "--prompt"}:
        assert list(options.values())[0][flag] == list(options.values())[1][flag], flag
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na cat on a beach\n")
    argv = ["--from-file", prompts, "--ddim_steps", 2, "--scale", 4, "--H", 32, "--W", 32, "--n_samples", 2,
            "--n_iter", 2, "--seed", 11, "--negative_prompt", "blurry"]
    with pytest.raises(SystemExit) as exit_info:
        base.run_cli(lambda: base.main([str(a) for a in ["--config", TINY_V1, "--outdir", tmp_path / "base", *argv]]))
    assert exit_info.value.code == 0
    code, out, err = run(script, capsys, ["--config", files["config"], "--personalized_ckpt", files["cat"],
                                          "--outdir", tmp_path / "concept", *argv])
    assert code == 0, err
    for folder in ("base", "concept"):
        grids = sorted((tmp_path / folder).glob("grid-*.png"))
        assert [g.name for g in grids] == ["grid-00000.png", "grid-00004.png"]   # a grid per prompt
        size, meta = _meta(grids[1])
        assert size == (2 * 34 + 2, 2 * 34 + 2) and meta["seeds"] == [13, 14]    # batch k: seed + k
        with Image.open(tmp_path / folder / "samples/00005.png") as im:
            text = im.text["parameters"]
        lines = text.splitlines()
        assert lines[0] == "a cat on a beach" and lines[1] == "Negative prompt: blurry"
        assert lines[2].startswith("Steps: 2, Sampler: DDIM, CFG scale: 4.0, Seed: 13, Size: 32x32")
        assert "Batch size: 2, Batch pos: 1" in lines[2]
    # paths inside the repository as configs name them, not as absolute local paths
    assert _meta(tmp_path / "base/samples/00000.png")[1]["config"] == "configs/tiny/v1-tiny.yaml"
    code, out, err = run(script, capsys, ["--config", files["config"], "--personalized_ckpt", files["cat"],
                                          "--prompt", "a {}", "--skip_grid", "--outdir", tmp_path / "nogrid", *FAST])
    assert code == 0 and not list((tmp_path / "nogrid").glob("grid-*.png")) and " grid" not in out
