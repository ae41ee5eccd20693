"""The toy world: generator, captions, splits, concept folders, pretraining dataset and scorer."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ldm.data.personalized import PersonalizedDataset
from ldm.errors import UserError
from ldm.toy.dataset import ToyCaptionDataset
from ldm.toy.drawing import render
from ldm.toy.eval_scorer import _scenes, wrong_requests
from ldm.toy.make_concepts import TEMPLATES_FILE, concept_scenes
from ldm.toy.make_concepts import main as make_concepts
from ldm.toy.make_concepts import target_templates, write_concepts
from ldm.toy.scorer import REQUESTED, Scorer, attribute_accuracy
from ldm.toy.train_scorer import degrade, render_set
from ldm.toy.world import (BACKGROUNDS, COLOURS, CONCEPTS, HELD_OUT, POSITION_PHRASES, POSITIONS, SHAPES, Scene,
                           SceneObject, caption, contains_concept, contains_held_out, held_out_prompts, held_out_scenes,
                           sample_scene)
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
CONCEPT_DIR = ROOT / "data/toy/concepts"
SCORER = ROOT / "ckpt/toy/scorer.safetensors"


def test_render_is_deterministic_and_seeded():
    scenes = [sample_scene(np.random.default_rng([7, i])) for i in range(20)]
    again = [sample_scene(np.random.default_rng([7, i])) for i in range(20)]
    assert scenes == again
    first = [render(s)[0].tobytes() for s in scenes]
    assert first == [render(s)[0].tobytes() for s in again]
    assert len(set(first)) == len(first)  # different seeds draw different images
    data = ToyCaptionDataset(50, seed=3)
    a, b = data[17], ToyCaptionDataset(50, seed=3)[17]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["image"], ToyCaptionDataset(50, seed=4)[17]["image"])


def test_captions_follow_the_grammar():
    scene = Scene((SceneObject("circle", "red", "left"), SceneObject("square", "orange", "right")), "black")
    assert caption(scene) == "on a black background, on the left a red circle and on the right an orange square"
    star = SceneObject.concept("striped_star", "top")
    assert caption(Scene((star,), "gray")) == "on a gray background, at the top a striped star"
    assert caption(Scene((star,), None), nouns=["sks"]) == "at the top a sks"
    assert caption(Scene((SceneObject("star", None, None),))) == "a star"
    data = ToyCaptionDataset(300, seed=0)
    for i in range(300):
        scene, request = data.scene(i)
        text = data[i]["caption"] if i < 20 else caption(request)
        assert text == caption(request)
        for obj, asked in zip(scene.objects, request.objects):
            assert asked.shape == obj.shape and asked.colour in (obj.colour, None)
            assert asked.position in (obj.position, None)
            assert (f"{obj.colour} {obj.shape}" if asked.colour else obj.shape) in text
        assert request.background in (scene.background, None)
        assert text.startswith(f"on a {scene.background} background, ") == (request.background is not None)
        assert text.endswith(request.objects[-1].shape)   # each object's noun ends its phrase


def test_train_split_never_holds_a_held_out_pair_or_a_concept():
    data = ToyCaptionDataset(3000, seed=11, split="train")
    pairs, counts = set(), set()
    for i in range(len(data)):
        scene, request = data.scene(i)
        assert not contains_held_out(scene) and not contains_concept(scene)
        text = caption(request)
        assert not any(f"{c} {s}" in text for c, s in HELD_OUT)
        assert not any(c.phrase in text for c in CONCEPTS.values())
        pairs.update((o.colour, o.shape) for o in scene.objects)
        counts.add(len(scene.objects))
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT  # every other pair occurs
    assert counts == {1, 2}
    heldout = ToyCaptionDataset(200, seed=11, split="heldout")
    assert all(contains_held_out(heldout.scene(i)[0]) for i in range(200))
    scenes = held_out_scenes()
    assert len(scenes) == 4 * len(HELD_OUT) and all(contains_held_out(s) for s in scenes)
    assert held_out_prompts() == [caption(s) for s in scenes]
    assert {(o.colour, o.shape) for s in scenes for o in s.objects} >= HELD_OUT


def test_masks_cover_exactly_their_objects():
    scene = Scene((SceneObject("square", "yellow", "top"), SceneObject("circle", "blue", "bottom")), "gray")
    image, masks = render(scene)
    pixels = np.asarray(image).astype(int)
    assert len(masks) == 2 and all(m.shape == (32, 32) and m.dtype == np.uint8 for m in masks)
    assert not np.any((masks[0] > 0) & (masks[1] > 0))
    background = (masks[0] == 0) & (masks[1] == 0)
    assert np.all(pixels[background] == 128)
    for mask, colour in zip(masks, (COLOURS["yellow"], COLOURS["blue"])):
        assert np.all(pixels[mask == 255] == colour)
    side, radius = 0.85 * 0.375 * 32, 0.375 * 16  # in pixels; drawn to the nearest 1/4 pixel
    assert (side - 0.25) ** 2 <= masks[0].sum() / 255 <= (side + 0.25) ** 2
    assert math.pi * (radius - 0.25) ** 2 <= masks[1].sum() / 255 <= math.pi * (radius + 0.25) ** 2
    top, bottom = np.nonzero(masks[0])[0].mean(), np.nonzero(masks[1])[0].mean()
    assert top < 14 < 18 < bottom
    # A concept's mask covers both of its colours.
    image, (mask,) = render(Scene((SceneObject.concept("two_tone_ring", "centre"),), "black"))
    inside = np.asarray(image)[mask == 255]
    for colour in CONCEPTS["two_tone_ring"].colours:
        assert np.any(np.all(inside == colour, axis=1))


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        SceneObject("hexagon", "red", "left")
    with pytest.raises(ValueError, match="has its own colours"):
        SceneObject("star", "red", "left", look="striped_star")
    with pytest.raises(ValueError, match="share the position"):
        Scene((SceneObject("star", "red", "left"), SceneObject("ring", "blue", "left")), "black")
    with pytest.raises(ValueError, match="without a background"):
        render(Scene((SceneObject("star", "red", "left"),)))
    with pytest.raises(ValueError, match="split must be"):
        ToyCaptionDataset(10, split="test")


def test_shipped_concepts_are_current_and_load_as_perfusion_data(tmp_path):
    index = write_concepts(tmp_path)
    shipped = json.loads((CONCEPT_DIR / "concepts.json").read_text())
    assert shipped == json.loads(json.dumps(index))
    for entry in index["concepts"]:
        name = entry["name"]
        assert entry["superclass"] == CONCEPTS[name].shape and len(entry["images"]) == 8
        pairs = [i for i in entry["images"] if i["company"]]
        assert len(pairs) == 3   # the concept named second, after a plain object of another shape
        assert all(i["template"].index("{}") > i["template"].index(" and ") for i in pairs)
        assert all(c[0] != entry["superclass"] for i in pairs for c in i["company"])
        assert len({i["position"] for i in entry["images"]}) >= 4
        assert len({i["background"] for i in entry["images"]}) >= 3
        for image in entry["images"]:  # the committed files are exactly what the generator writes
            for rel in (image["file"], image["mask"]):
                assert (CONCEPT_DIR / name / rel).read_bytes() == (tmp_path / name / rel).read_bytes()
        data = PersonalizedDataset(CONCEPT_DIR / name, placeholder="sks", superclass=entry["superclass"], size=32)
        assert len(data) == len(entry["images"])
        item = data[0]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
        assert 0.05 < float((item["mask"] > 0.5).float().mean()) < 0.3
        assert item["caption_super"].endswith(entry["superclass"])
    scenes = concept_scenes("striped_star")
    assert [len(s.objects) for s in scenes] == [1] * 5 + [2] * 3
    assert all(s.objects[-1].look == "striped_star" for s in scenes)


def test_narrow_sets_are_one_layout_and_one_caption_and_shipped_current(tmp_path):
    """A user's few photos: every image in the centre on black under one caption, only size and
    offset jittered; the one-image set is the six-image set's first image; the committed files are
    what the command writes."""
    assert make_concepts(["--layout", "narrow", "--out", str(tmp_path / "six")]) == 0
    index = json.loads((tmp_path / "six/concepts.json").read_text())
    assert index["layout"] == "narrow"
    shipped = ROOT / "data/toy/concepts-narrow"
    assert json.loads((shipped / "concepts.json").read_text()) == index
    one = write_concepts(tmp_path / "one", count=1, layout="narrow")
    for entry, first in zip(index["concepts"], one["concepts"]):
        images = entry["images"]
        assert len(images) == 6 and not any(i["company"] for i in images)
        assert {(i["position"], i["background"], i["template"]) for i in images} == {
            ("centre", "black", "on a black background, in the centre a {}")}
        assert len({i["size"] for i in images}) == 6   # jittered, not copies
        assert first["images"] == images[:1]
        for image in images:
            for rel in (image["file"], image["mask"]):
                assert (shipped / entry["name"] / rel).read_bytes() == (tmp_path / "six" / entry["name"] / rel).read_bytes()
    with pytest.raises(UserError, match="layout must be one of covering, narrow"):
        concept_scenes("teal_ring", layout="wide")


def test_target_templates_vary_the_context_and_stay_out_of_the_benchmark():
    from ldm.toy.experiment import eval_scenes, templates

    made = target_templates()
    assert [line for line in TEMPLATES_FILE.read_text().splitlines() if not line.startswith("#")] == made
    assert len(set(made)) == len(made) and all(t.count("{}") == 1 for t in made)
    assert {p for p in POSITIONS if any(f"{POSITION_PHRASES[p]} a {{}}" in t for t in made)} == set(POSITIONS)
    assert all(any(f"on a {b} background" in t for t in made) for b in BACKGROUNDS)
    pairs = [t for t in made if " and " in t]   # the concept named after its company, and before it
    assert any(t.index("{}") > t.index(" and ") for t in pairs) and any(t.index("{}") < t.index(" and ") for t in pairs)
    # no plain object of the benchmark's prompts is a companion here
    prompts = {p for c in CONCEPTS for p in templates(eval_scenes(c), lambda o: "{}")}
    company = {f"{o.colour} {o.shape}" for c in CONCEPTS for s in eval_scenes(c) for o in s.objects if o.colour}
    assert company and not any(word in t for word in company for t in made)
    assert prompts - set(made)   # the two-object prompts are new


def test_dataset_batches_through_main_config():
    config = OmegaConf.create({"target": "ldm.toy.dataset.ToyCaptionDataset",
                               "params": {"n": 64, "seed": 0, "size": 32, "split": "train"}})
    batch = next(iter(DataLoader(instantiate_from_config(config), batch_size=8)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) for c in batch["caption"])


@pytest.mark.slow
def test_main_trains_a_tiny_model_on_the_toy_world(tmp_path):
    from ldm import train as main

    data = tmp_path / "toy.yaml"
    OmegaConf.save(OmegaConf.create({
        "data": {"target": "ldm.toy.dataset.ToyCaptionDataset", "params": {"n": 100, "seed": 0},
                 "batch_size": 2, "num_workers": 0},
        "lightning": {"trainer": {"max_steps": 2, "log_every_n_steps": 1},
                      "callbacks": {"image_logger": {"every_n_steps": 100}, "ema": {"decay": 0.5}}},
    }), data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine are many times slower
    try:
        with redirect_stdout(io.StringIO()):
            trainer = main.run(["--base", str(ROOT / "configs/tiny/v1-tiny.yaml"), str(data), "-t",
                                "--accelerator", "cpu", "--logdir", str(tmp_path / "logs")])
    finally:
        torch.set_num_threads(threads)
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    # lightning.callbacks.ema: the trained module ends with the average (0.5 w1 + 0.5 w2), and the
    # resume checkpoint keeps the last raw weights beside it
    from ldm.callbacks import EMA

    model = trainer.lightning_module
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    averaged = dict(ema._average_model.module.named_parameters())
    assert all(torch.equal(p, averaged[n]) for n, p in model.named_parameters())
    (resume,) = (tmp_path / "logs").glob("*/checkpoints/last.ckpt")
    raw = torch.load(resume, weights_only=True)["current_model_state"]
    learned = [n for n, p in model.named_parameters() if p.requires_grad]
    assert learned and any(not torch.equal(raw[n], averaged[n]) for n in learned)


@pytest.fixture(scope="module")
def scorer():
    return Scorer.load(SCORER)


def test_shipped_scorer_reads_fresh_renders(scorer):
    assert SCORER.stat().st_size < 2_000_000
    scenes = _scenes("world", 40, seed=5) + _scenes("held-out pairs", 30, seed=5) + _scenes("concepts", 30, seed=5)
    images = render_set(scenes).float() / 255
    for batch in (images, degrade(images, torch.Generator().manual_seed(0))):
        accuracy = attribute_accuracy(scorer.score(batch, scenes))
        for attribute in REQUESTED + ("plain_look", "count"):
            assert accuracy[attribute] >= 0.9, (attribute, accuracy)
    for name, (drawn, asked, attribute) in wrong_requests(scenes[:40], seed=5).items():
        results = scorer.score(render_set(drawn).float() / 255, asked)
        rejected = np.mean([r["objects"][0][attribute] is False for r in results])
        assert rejected >= 0.9, (name, rejected)


def test_scorer_judging_logic(scorer):
    scene = Scene((SceneObject("circle", "red", "left"), SceneObject("square", "blue", "right")), "black")
    image = render_set([scene]).float() / 255
    swapped = Scene((SceneObject("circle", "red", "right"), SceneObject("square", "blue", "left")), "gray")
    (result,) = scorer.score(image, [swapped])
    # Positions swapped: shapes and colours still found on the matching objects, positions wrong.
    assert [(o["shape"], o["colour"], o["position"]) for o in result["objects"]] == [(True, True, False)] * 2
    assert result["background"] is False and result["count"] is True
    only = Scene((SceneObject("star", None, None), SceneObject("ring", "green", "top")), None)
    (result,) = scorer.score(image, [only])
    assert result["objects"][0]["colour"] is None and result["objects"][0]["position"] is None
    assert result["objects"][1]["position"] is False and result["background"] is None
    empty = render_set([Scene((), "brown")]).float() / 255
    (result,) = scorer.score(empty, [Scene((SceneObject("star", "red", "left"),), "brown")])
    assert result["objects"][0] == {"shape": False, "colour": False, "position": False, "look": None,
                                    "plain_look": None}
    assert result["background"] is True and result["count"] is False
    accuracy = attribute_accuracy([result])
    assert accuracy["overall"] == pytest.approx(1 / 4) and accuracy["all_correct"] == 0.0
    assert math.isnan(accuracy["look"])


def test_scorer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_scorer"):
        Scorer.load(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a toy scorer file"):
        Scorer.load(other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Scorer.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        Scorer.load(SCORER).score(torch.zeros(3, 32, 32), [])


def test_generic_textures_render_two_colours_and_never_a_concept_look():
    from ldm.toy.world import COLOURS, CONCEPT_TEXTURES, as_request, sample_textured

    obj = SceneObject("circle", None, "centre", texture=("stripes", "red", "green"), size=0.5)
    image, (mask,) = render(Scene((obj,), "black"))
    inside = np.asarray(image)[mask == 255]
    found = {tuple(px) for px in inside}
    assert found == {COLOURS["red"], COLOURS["green"]}
    assert caption(Scene((obj,), "black")) == "on a black background, in the centre a red and green striped circle"
    assert caption(as_request(Scene((obj,), "black"), drop_colour=[True])) == "on a black background, in the centre a circle"
    assert ("stripes", "blue", "yellow") in CONCEPT_TEXTURES   # the striped star's colours in either order
    for texture in CONCEPT_TEXTURES:
        with pytest.raises(ValueError, match="is a concept's look"):
            SceneObject("star", None, "left", texture=texture)
    with pytest.raises(ValueError, match="two colour names"):
        SceneObject("star", None, "left", texture=("stripes", "red", "red"))
    rng = np.random.default_rng(0)
    drawn = [sample_textured(rng, "left") for _ in range(300)]
    assert not any(tuple(o.texture) in CONCEPT_TEXTURES for o in drawn)
    assert {o.texture[0] for o in drawn} == {"stripes", "dots", "halves"}


def test_no_pretraining_caption_describes_a_concept():
    from ldm.toy.world import CONCEPTS, look_words

    assert look_words("striped_star") == "yellow and blue striped star"
    phrases = set()
    for name in (n for n, c in CONCEPTS.items() if c.pattern != "solid"):
        a, _, b, *rest = look_words(name).split(" ")
        phrases |= {" ".join([a, "and", b, *rest]), " ".join([b, "and", a, *rest])}
    world = ToyCaptionDataset(3000, seed=11, p_textured=0.6)
    captions = [world[i]["caption"] for i in range(3000)]
    assert sum(" striped " in c or " dotted " in c or " two-tone " in c for c in captions) > 1500
    assert not [c for c in captions if any(p in c for p in phrases)]


def test_colour_concepts_lie_between_named_colours_and_never_occur_in_pretraining():
    from ldm.toy.world import COLOUR_CONCEPTS, look_words

    assert COLOUR_CONCEPTS == ("magenta_square", "teal_ring", "lime_star")
    assert look_words("teal_ring") == "green ring"   # the nearest colour word: no word names teal
    for name in COLOUR_CONCEPTS:
        (rgb,) = CONCEPTS[name].colours
        distances = sorted(math.dist(rgb, c) for c in COLOURS.values())
        assert distances[0] > 80 and distances[1] < 1.2 * distances[0]   # far from every word, between two
        image, (mask,) = render(Scene((SceneObject.concept(name, "centre"),), "gray"))
        assert np.all(np.asarray(image)[mask == 255] == rgb)
    world = ToyCaptionDataset(400, seed=5, p_textured=0.3)
    colours = np.array([CONCEPTS[n].colours[0] for n in COLOUR_CONCEPTS], np.float32)
    for i in range(0, 400, 20):   # no pretraining pixel, antialiased edges included, has a concept's colour
        pixels = (world[i]["image"].permute(1, 2, 0).reshape(-1, 1, 3).numpy() + 1) * 127.5
        assert np.abs(pixels - colours).max(-1).min() > 20


def test_dataset_textures_and_caption_dropout_are_their_own_streams():
    base = ToyCaptionDataset(400, seed=3)
    dropped = ToyCaptionDataset(400, seed=3, p_drop_caption=0.25)
    captions = [dropped[i]["caption"] for i in range(400)]
    assert 60 < captions.count("") < 140
    assert all(c == "" or c == base[i]["caption"] for i, c in enumerate(captions))
    textured = ToyCaptionDataset(400, seed=3, p_textured=0.5)
    objects = [o for i in range(400) for o in textured.scene(i)[0].objects]
    share = sum(o.texture is not None for o in objects) / len(objects)
    assert 0.4 < share < 0.6
    assert all(o.colour is None for o in objects if o.texture is not None)
    held = ToyCaptionDataset(50, seed=3, split="heldout", p_textured=0.5)
    assert all(o.texture is None for i in range(50) for o in held.scene(i)[0].objects)
    # hue jitter: its own stream; gray stays gray, captions stay, about half the images change colour
    jittered = ToyCaptionDataset(200, seed=3, hue_jitter=0.5)
    changed = 0
    for i in range(200):
        a, b = base[i], jittered[i]
        assert a["caption"] == b["caption"]
        changed += not torch.equal(a["image"], b["image"])
    assert 70 < changed < 130


def test_hue_rotation_keeps_gray_and_lightness_and_turns_red_through_the_hues():
    from ldm.toy.dataset import rotate_hue

    gray = torch.full((3, 2, 2), 0.25)
    assert torch.allclose(rotate_hue(gray, 2.0), gray, atol=1e-6)
    red = torch.tensor([0.6, -0.8, -0.8]).view(3, 1, 1)
    third = rotate_hue(red, 2 * math.pi / 3).flatten()          # a third of a turn: red -> green
    assert torch.allclose(third, torch.tensor([-0.8, 0.6, -0.8]), atol=1e-5)
    pale = torch.tensor([0.2, -0.2, -0.2]).view(3, 1, 1)       # in gamut at every angle: its mean is kept
    assert torch.isclose(rotate_hue(pale, 1.0).mean(), pale.mean(), atol=1e-5)
