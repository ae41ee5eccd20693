"""scripts/dreambench.py: DreamBooth's prompts_and_classes.txt, subject discovery, shards, bad input (exit 2
before any training), and real runs on the toy world (training, rendering, tiny CLIP/DINO, the toy scorer)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm.cli import run_cli
from ldm.errors import UserError
from ldm.evaluation.dreambench.cli import TOY_PROMPTS, main
from ldm.evaluation.dreambench.runner import PRESETS
from ldm.evaluation.dreambench.subjects import discover, parse_shard, read_classes, shard
from ldm.evaluation.dreambench.toy import toy_request

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data/toy/concepts-narrow"
CONFIG = str(ROOT / "configs/toy/perfusion.yaml")
# the head of DreamBooth's dataset/prompts_and_classes.txt as it is written there (two subjects fewer)
CLASSES = """Classes

subject_name,class
backpack,backpack
bear_plushie,stuffed animal
cat,cat
dog2,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
]
"""


def photo(folder: Path, name: str = "00.jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 80, 20)).save(folder / name)


def dreambooth_dataset(root: Path, skip: str | None = None) -> Path:
    (root / "dataset").mkdir(parents=True)
    (root / "dataset/prompts_and_classes.txt").write_text(CLASSES)
    for name in ("backpack", "bear_plushie", "cat", "dog2"):
        if name != skip:
            photo(root / "dataset" / name)
    return root


def test_read_classes_real_format(tmp_path):
    (tmp_path / "p.txt").write_text(CLASSES)
    assert read_classes(tmp_path / "p.txt") == {"backpack": "backpack", "bear_plushie": "stuffed animal",
                                                "cat": "cat", "dog2": "dog"}
    (tmp_path / "q.txt").write_text("Prompts\n\na {} in the snow\n")
    with pytest.raises(UserError, match="subject_name,class"):
        read_classes(tmp_path / "q.txt")


def test_discover_dreambooth_layout(tmp_path):
    root = dreambooth_dataset(tmp_path)
    for where in (root, root / "dataset"):   # the repository or its dataset/ folder
        subjects = discover(where)
        assert [(s.name, s.superclass, s.kind) for s in subjects] == [
            ("backpack", "backpack", "object"), ("bear_plushie", "stuffed animal", "object"), ("cat", "cat", "live"),
            ("dog2", "dog", "live")]
        assert subjects[0].folder == root / "dataset/backpack"
    assert [s.kind for s in discover(root, live_classes=["dog"])] == ["object", "object", "object", "live"]


def test_discover_class_files_and_toy(tmp_path):
    for name, word in (("teddy", "teddy"), ("rex", "dog")):
        photo(tmp_path / name)
        (tmp_path / name / "class.txt").write_text(word + "\n")
    (tmp_path / "notes").mkdir()   # no images: not a subject
    assert [(s.name, s.superclass, s.kind) for s in discover(tmp_path)] == [("rex", "dog", "live"),
                                                                           ("teddy", "teddy", "object")]
    toy = json.loads((TOY / "concepts.json").read_text())["concepts"]
    assert [(s.name, s.superclass) for s in discover(TOY)] == sorted((c["name"], c["superclass"]) for c in toy)


def test_shards_cover_every_subject_once():
    subjects = discover(TOY)
    for count in (1, 2, 4, 7):
        parts = [shard(subjects, i, count) for i in range(count)]
        assert sorted(s.name for p in parts for s in p) == [s.name for s in subjects]
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_toy_prompts_are_toy_grammar():
    templates = [t for t in TOY_PROMPTS.read_text().splitlines() if t]
    assert len(templates) == 25
    scene = toy_request("on a gray background, on the left a blue circle and on the right a {}", "teal_ring")
    assert scene.background == "gray" and [(o.shape, o.colour, o.position, o.look) for o in scene.objects] == [
        ("circle", "blue", "left", "plain"), ("ring", None, "right", "teal_ring")]
    assert all(toy_request(t, "lime_star") for t in templates)
    # no other object of a concept's shape: a second star would compete for the concept's verdict
    assert not [t for t in templates if {"ring", "square", "star"} & set(t.split())]
    with pytest.raises(UserError, match="toy grammar"):
        toy_request("a {} in the jungle", "lime_star")


def test_dreambooth_preset_is_quick_gelu():
    import open_clip

    assert open_clip.get_model_config(PRESETS["dreambooth"])["quick_gelu"] is True


def run_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main([str(a) for a in argv]))
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["no folder", "listed folder missing", "no class", "class unknown to the model",
                                  "bad shard", "no metric weights", "metric file missing", "no masks, no clipseg",
                                  "prompt names the class word"])
def test_bad_input_one_line_exit_2_before_training(case, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--subjects", TOY, "--config", CONFIG, "--metrics", "tiny", "--out", out]
    expect = {"no folder": "no such folder", "listed folder missing": "has no folder", "no class": "no class.txt",
              "class unknown to the model": "'qwzxv' is unknown", "bad shard": "--shard",
              "no metric weights": "needs --clip_ckpt", "metric file missing": "no such file",
              "no masks, no clipseg": "--clipseg", "prompt names the class word": "contains 'star'"}[case]
    if case == "no folder":
        args[1] = tmp_path / "nowhere"
    elif case == "listed folder missing":
        args[1] = dreambooth_dataset(tmp_path / "db", skip="cat")
    elif case in ("no class", "class unknown to the model", "no masks, no clipseg"):
        photo(tmp_path / "s" / "thing")
        if case == "class unknown to the model":
            photo(tmp_path / "s/thing/mask", "00.png")
        if case != "no class":
            (tmp_path / "s/thing/class.txt").write_text("qwzxv" if case != "no masks, no clipseg" else "ring")
        args[1] = tmp_path / "s"
    elif case == "prompt names the class word":
        (tmp_path / "p.txt").write_text("on the left a {}\non the left a {} and on the right a white star\n")
        args += ["--prompts", tmp_path / "p.txt"]
    elif case == "bad shard":
        args += ["--shard", "2/2"]
    elif case == "no metric weights":
        args[5] = "dreambooth"
    else:
        args[5:6] = ["dreambooth", "--clip_ckpt", tmp_path / "clip.bin", "--dino", tmp_path / "dino"]
    code, err = run_main(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not (out / "runs").exists() or not any(p.name != "tiny-metrics" for p in (out / "runs").iterdir())


# ----------------------------------------------------------------------------- real runs on the toy world
FAST = ["--metrics", "tiny", "--max_prompts", "2", "--seeds", "1", "--steps", "2", "--beta_sweep", "0.5:0.9:2",
        "lightning.trainer.max_steps=3"]


@pytest.fixture(scope="module")
def two_toy_subjects(tmp_path_factory):
    """teal_ring and lime_star of the narrow toy set, in a concepts.json set of their own."""
    root = tmp_path_factory.mktemp("toy2")
    table = json.loads((TOY / "concepts.json").read_text())
    table["concepts"] = [c for c in table["concepts"] if c["name"] in ("teal_ring", "lime_star")]
    (root / "concepts.json").write_text(json.dumps(table))
    for c in table["concepts"]:
        shutil.copytree(TOY / c["name"], root / c["name"])
    return root


@pytest.fixture(scope="module")
def unsharded(two_toy_subjects, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded")
    result = subprocess.run([sys.executable, "scripts/dreambench.py", "--subjects", str(two_toy_subjects), "--config",
                             CONFIG, "--out", str(out), *FAST], cwd=ROOT, capture_output=True, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_toy_run_writes_the_table(unsharded):
    results = json.loads((unsharded / "results.json").read_text())
    assert [r["subject"] for r in results["subjects"]] == ["lime_star", "teal_ring"]
    overall = results["summary"]["overall"]
    assert overall["subjects"] == 2 and set(overall["mean"]) == {"dino", "clip_i", "clip_t", "shown", "asked"}
    for r in results["subjects"]:
        assert len(r["per_prompt"]) == 2 and [p["beta"] for p in r["sweep"]] == [0.5, 0.9]
        assert all(-1 <= v <= 1 for v in r["mean"].values()) and 0 <= r["mean"]["shown"] <= 1
    assert overall["mean"]["dino"] == pytest.approx(sum(r["mean"]["dino"] for r in results["subjects"]) / 2)
    report = (unsharded / "report.md").read_text()
    assert "| **Perfusion, all subjects** | 2 |" in report and "DreamBooth (published, SD" in report
    assert "not comparable with this run's --metrics tiny" in report
    assert Image.open(unsharded / "tradeoff.png").size[0] > 100
    assert sorted(p.name for p in (unsharded / "runs").iterdir()) == ["lime_star", "teal_ring", "tiny-metrics"]


@pytest.mark.slow
def test_shards_merge_to_the_unsharded_table(unsharded, two_toy_subjects, tmp_path, capsys):
    for part in ("0/2", "1/2"):
        assert run_main(["--subjects", two_toy_subjects, "--config", CONFIG, "--out", tmp_path, "--shard", part,
                         *FAST], capsys)[0] == 0
        assert not (tmp_path / "report.md").exists()   # shards write per-subject results only
    assert sorted(p.name for p in (tmp_path / "subjects").iterdir()) == ["lime_star.json", "teal_ring.json"]
    assert run_main(["--merge", "--out", tmp_path], capsys)[0] == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    whole = json.loads((unsharded / "results.json").read_text())
    for a, b in zip(merged["subjects"], whole["subjects"]):
        assert a["subject"] == b["subject"] and a["mean"] == pytest.approx(b["mean"], abs=1e-5)
    assert merged["summary"]["overall"]["mean"] == pytest.approx(whole["summary"]["overall"]["mean"], abs=1e-5)


@pytest.mark.slow
def test_resume_skips_finished_subjects(unsharded, two_toy_subjects, capsys):
    done = unsharded / "subjects/lime_star.json"
    before = done.stat().st_mtime_ns
    redo = unsharded / "subjects/teal_ring.json"
    expected = json.loads(redo.read_text())["mean"]
    redo.write_text(redo.read_text()[:100])   # cut short: measured again, from the concept trained before
    runs = sorted((unsharded / "runs/teal_ring/runs").iterdir())
    code, err = run_main(["--subjects", two_toy_subjects, "--config", CONFIG, "--out", unsharded, *FAST], capsys)
    assert code == 0 and "lime_star: finished before" in err and "teal_ring: trained before" in err
    assert done.stat().st_mtime_ns == before and sorted((unsharded / "runs/teal_ring/runs").iterdir()) == runs
    assert json.loads(redo.read_text())["mean"] == pytest.approx(expected, abs=1e-6)
    code, err = run_main(["--subjects", two_toy_subjects, "--config", CONFIG, "--out", unsharded, *FAST[:-1],
                          "lightning.trainer.max_steps=4"], capsys)
    assert code == 2 and "made with other settings (overrides)" in err


@pytest.mark.slow
def test_masks_made_with_clipseg_when_missing(tmp_path, capsys):
    from clipseg.tiny import save_tiny_clipseg

    subject = tmp_path / "subjects/ring"
    shutil.copytree(TOY / "teal_ring", subject, ignore=shutil.ignore_patterns("mask"))
    (subject / "class.txt").write_text("ring")
    clipseg = save_tiny_clipseg(tmp_path / "clipseg")
    code, err = run_main(["--subjects", tmp_path / "subjects", "--config", CONFIG, "--out", tmp_path / "out",
                          "--clipseg", clipseg, "--prompts", TOY_PROMPTS, *FAST], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "out/runs/ring/mask").glob("teal_ring_*.png"))) == 6
    assert not (subject / "mask").exists()   # the dataset folder is left as it was
    assert (tmp_path / "out/subjects/ring.json").is_file()
