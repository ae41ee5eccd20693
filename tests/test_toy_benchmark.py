"""The toy-world benchmark (reduced: --quick) and the showcase, on the shipped toy weights."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ldm.toy import fewshot
from ldm.toy.benchmark import main as benchmark
from ldm.toy.experiment import (GATE_ROWS, METHODS, NARROW_METHODS, SUPERCLASS, VARIANTS, eval_scenes, judge, p_above,
                                pair_scenes, templates)
from ldm.toy.showcase import main as showcase
from ldm.toy.world import CONCEPTS, Scene, SceneObject
from tests.conftest import ROOT


def test_eval_prompts_name_the_concept_once_and_are_not_training_captions():
    scenes = eval_scenes("striped_star")
    prompts = templates(scenes, lambda o: "{}")
    assert all(p.count("{}") == 1 for p in prompts) and len(set(prompts)) == len(prompts)
    trained = {t for name in ("striped_star", "polka_dot_square", "two_tone_ring")
               for t in json.loads((ROOT / "data/toy/concepts" / name / "captions.json").read_text()).values()}
    assert not trained & set(prompts)   # never a training caption
    assert "on the left a green circle and on the right a {}" in prompts
    # nor is the company: no plain object of the prompts is beside the concept in training
    company = {(o.colour, o.shape) for s in scenes for o in s.objects if o.look == "plain"}
    index = json.loads((ROOT / "data/toy/concepts/concepts.json").read_text())
    assert company and not company & {(c[1], c[0]) for e in index["concepts"] for i in e["images"] for c in i["company"]}


def test_judge_separates_the_look_from_the_rest():
    scene = Scene((SceneObject.concept("striped_star", "left"), SceneObject("circle", "green", "right")), "gray")
    result = {"objects": [{"shape": True, "colour": None, "position": True, "look": False, "plain_look": None},
                          {"shape": True, "colour": False, "position": True, "look": None, "plain_look": True}],
              "background": True, "count": True, "slots": ["left", "right"]}
    scores = judge([result], [scene])
    assert scores["fidelity"] == 0.0 and scores["both"] == 0.0
    assert scores["alignment"] == pytest.approx(4 / 5)   # concept position, circle shape/colour/position, background
    assert scores["looks"] == 1


@pytest.mark.parametrize("table", [(10, 96, 0, 96), (3, 32, 1, 32), (0, 20, 5, 20), (7, 9, 2, 11)])
def test_p_above_is_fishers_exact_test(table):
    from scipy.stats import fisher_exact  # scipy comes with scikit-image

    hits, n, floor_hits, floor_n = table
    _, expected = fisher_exact([[hits, n - hits], [floor_hits, floor_n - floor_hits]], alternative="greater")
    assert p_above(*table) == pytest.approx(expected, rel=1e-9)
    assert p_above(1, 1, 0, 1) == 0.5   # one success, either group equally likely


@pytest.mark.slow
def test_quick_benchmark_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench"
    assert benchmark(["--out", str(out), "--quick", "--concepts", "two_tone_ring,striped_star"]) == 0
    results = json.loads((out / "results.json").read_text())
    trained = {v.key for v in VARIANTS}   # without --gate_study
    assert list(results["methods"]) == [label for label, key, *_ in METHODS if key in trained or key in (
        "words", "superclass", "full_unet")]
    assert 0 <= results["base_model"]["overall"] <= 1 and results["base_model"]["noun_localization"] > 0
    for per in results["gates"].values():
        assert set(per) == {"two_tone_ring", "striped_star"}
        assert all(0 <= g["median_max_other_gate"] <= 1 and g["others_open"] >= 0 for g in per.values())
    assert set(results["gates"]) == {label for label, key in GATE_ROWS if key in ("init", "perfusion")}
    for per in results["methods"].values():
        assert set(per) == {"two_tone_ring", "striped_star"}
        assert all(0 <= r["fidelity"] <= 1 and 0 <= r["alignment"] <= 1 and r["images"] == 3 for r in per.values())
    assert set(results["beta_curve"]) == {"concept", "0.1", "0.15"} and len(results["beta_curve"]["0.1"]) == 2
    assert list(results["pairs"]) == ["two_tone_ring + striped_star"]
    pair_seeds = results["settings"]["pair_seeds"]   # as many images per pair as per concept, at least one seed
    pair_prompts = len(pair_scenes("two_tone_ring", "striped_star"))
    assert pair_seeds == max(1, 3 * 1 // pair_prompts)
    assert all(r["images"] == pair_prompts * pair_seeds for r in results["pairs"].values())
    assert set(results["looks"]) == set(CONCEPTS)   # every look, trained in this run or not
    assert all(0 <= r["ceiling"] <= 1 and r["words"]["images"] == 3 for r in results["looks"].values())
    # the recommendation is the evaluation harness's rule on the curve, against the superclass word's alignment
    from ldm.evaluation.harness import recommend

    points = results["beta_curve"]["0.1"] + results["beta_curve"]["0.15"]
    floor = results["methods"][SUPERCLASS]["two_tone_ring"]["alignment"]
    assert results["recommendation"] == recommend(points, floor)
    assert "Recommended (the highest fidelity" in (out / "report.md").read_text()
    sizes = {k: v["bytes"] for k, v in results["training"]["striped_star"].items()}
    assert sizes["trained_keys"] > sizes["perfusion"] + 1000 and abs(sizes["embedding"] - sizes["perfusion"]) < 64
    assert sizes["perfusion"] < 20_000
    assert sizes["full_unet"] > 1000 * sizes["perfusion"]   # the reference stores a whole U-Net
    report = (out / "report.md").read_text()
    for heading in ("## Methods", "## Beta curve", "## Two concepts in one prompt", "## Concept size and training time"):
        assert heading in report
    assert "Perfusion's fidelity" in report and "Fisher exact p" in report
    for heading in ("## Checks", "## Gates", "## Base model", "## Every concept's look, untrained"):
        assert heading in report
    assert report.count("| yes |") + report.count("| **no** |") == 12 + 4   # every check has its verdict
    # the few-shot regime: every curve of Fig. 9's panels over the narrow betas, the methods table from them
    narrow = results["narrow"]
    assert list(narrow["methods"]) == [label for label, _ in NARROW_METHODS]
    assert set(narrow["curves"]) == {fewshot.curve_key(c) for c in fewshot.curves()}
    for points in narrow["curves"].values():
        assert [p["beta"] for p in points] == [0.5, 0.7]
        for p in points:
            low, high = p["fidelity_ci"]
            assert low <= p["fidelity"] <= high and set(p["per_concept"]) == {"two_tone_ring", "striped_star"}
    assert all(r["images"] == 3 for per in narrow["methods"].values() for r in per.values())
    assert "## Few photos of one layout (main table)" in report and "### The paper's ablations (Fig. 9)" in report
    one_image = out / "runs/narrow-1/two_tone_ring"
    assert len(list(one_image.glob("*.png"))) == 1 and "narrow one_image" in results["training"]["two_tone_ring"]
    for png in ("methods.png", "beta_curve.png", "samples.png", "fig9.png"):
        with Image.open(out / png) as im:
            im.verify()


@pytest.mark.parametrize("hits,n", [(0, 96), (13, 96), (48, 96), (96, 96), (7, 10)])
def test_intervals_are_wilson_score_intervals(hits, n):
    from scipy.stats import binomtest

    expected = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert fewshot.wilson(hits, n) == pytest.approx((expected.low, expected.high), abs=1e-6)


def test_pooled_counts_every_look_and_attribute_once():
    per = {"a": {"fidelity": 0.5, "looks": 10, "alignment": 1.0, "attributes": 30},
           "b": {"fidelity": 1.0, "looks": 30, "alignment": 0.5, "attributes": 10}}
    pooled = fewshot.pooled(per)
    assert pooled["fidelity"] == pytest.approx(35 / 40) and pooled["alignment"] == pytest.approx(35 / 40)
    assert pooled["fidelity_ci"] == pytest.approx(fewshot.wilson(35, 40))
    assert fewshot.best_at_bar([{"beta": 0.3, "fidelity": 0.9, "alignment": 0.8},
                                {"beta": 0.7, "fidelity": 0.6, "alignment": 0.95}], bar=0.9)["beta"] == 0.7


def test_autoencoder_ceiling_reads_reconstructed_renders():
    from ldm.toy.runner import Bench

    bench = Bench(seeds=1, steps=1)
    scenes = eval_scenes("striped_star")
    # the shipped autoencoder keeps the 4-pixel stripes; a freshly initialised one keeps no look
    assert bench.autoencoder_ceiling(scenes)["fidelity"] >= 0.85
    torch.manual_seed(0)
    for module in bench.model.first_stage_model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert bench.autoencoder_ceiling(scenes)["fidelity"] <= 0.25


def test_showcase_renders_three_grids(tmp_path):
    concept = ROOT / "ckpt/toy/concepts/two_tone_ring.safetensors"
    assert showcase(["--concept", str(concept), "--out", str(tmp_path), "--seeds", "1", "--steps", "2",
                     "--betas", "0.5,0.9"]) == 0
    sizes = {}
    for name in ("contexts.png", "two_concepts.png", "beta_sweep.png"):
        with Image.open(tmp_path / name) as im:
            sizes[name] = im.size
    assert sizes["beta_sweep.png"][0] < sizes["contexts.png"][0]   # 2 betas against 4 prompts


def test_attention_shares_cover_every_token_once():
    from ldm.build import build_model, load_config
    from ldm.toy.evaluate import attention_shares

    model = build_model(load_config([ROOT / "configs/toy/ldm.yaml"]), ckpt=ROOT / "ckpt/toy/toy-ldm.safetensors")
    shares = attention_shares(model, "on the left a yellow star")
    assert [w for w, _ in shares] == ["<start>", "on", "the", "left", "a", "yellow", "star", "<end>", "<padding>"]
    assert sum(v for _, v in shares) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="is 34 tokens with start and end; this text encoder reads 32"):
        attention_shares(model, "a star " * 16)


@pytest.mark.parametrize("run,argv,message", [
    (benchmark, ["--seeds", "0"], "--seeds must be a positive whole number, got 0"),
    (benchmark, ["--concepts", "teddy"], "--concepts 'teddy': expected names from"),
    (showcase, ["--concept", "x.safetensors", "--steps", "-1"], "--steps must be a positive whole number, got -1"),
    (showcase, ["--concept", "x.safetensors", "--betas", "0.5,high"], "--betas '0.5,high' is not"),
])
def test_bad_arguments_are_one_line_errors(run, argv, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run([*argv, "--out", str(tmp_path)])


def test_full_finetune_moves_only_the_unet():
    from ldm.build import build_model, load_config
    from ldm.toy.full_finetune import LDM_CKPT, LDM_CONFIG, finetune

    base = build_model(load_config([LDM_CONFIG]), ckpt=LDM_CKPT).state_dict()
    model, seconds = finetune(ROOT / "data/toy/concepts/two_tone_ring", "ring", steps=2)
    tuned = model.state_dict()
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"model"} and seconds > 0   # the U-Net moved; autoencoder and text encoder did not
    assert not model.training
