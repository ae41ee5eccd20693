"""diffusers interop on tiny random models: diffusers folders load as checkpoints do, and concepts
applied to a StableDiffusionPipeline draw what scripts/perfusion_txt2img.py draws."""
from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace

import diffusers
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from ldm.build import build_model, load_config
from ldm.checkpoint import CheckpointError
from ldm.errors import UserError
from ldm.interop.diffusers import apply_concepts, cross_attention_names, remove_concepts
from ldm.interop.diffusers_folder import DiffusersFolderError
from ldm.models.diffusion.guidance import initial_noise, make_generator
from ldm.perfusion.concepts import ConceptError, load_concept, save_concept
from ldm.perfusion.covariance import estimate_covariance, save_covariance
from tests.conftest import ROOT, TINY_PERFUSION, TINY_V1, TINY_V2, train_one_step
from tests.diffusers_tiny import tiny_folder

CONFIGS = {1: TINY_V1, 2: TINY_V2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("diffusers")


@pytest.fixture(scope="module")
def folders(work):
    return {v: tiny_folder(v, work, seed=v) for v in (1, 2)}


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", [1, 2])
def test_folder_loads_and_agrees_with_diffusers(folders, version):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[version])
    model = build_model(load_config([CONFIGS[version]]), ckpt=folders[version])
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([3, 871])
    prompts = ["a photo of a cat", "a red circle on the left"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel(pipe.unet(x, t, encoder_hidden_states=context).sample,
                   model.model.diffusion_model(x, timesteps=t, context=context)) <= 1e-4
        assert rel(pipe.vae.decode(x).sample, model.first_stage_model.decode(x)) <= 1e-4
        assert torch.equal(ids, model.cond_stage_model.tokenize(prompts))
        assert rel(pipe.text_encoder(ids).last_hidden_state, model.cond_stage_model.encode(prompts)) <= 1e-4


def test_lone_vae_folder_loads_into_the_autoencoder(folders, tmp_path):
    from ldm.checkpoint import load_into

    vae = diffusers.AutoencoderKL.from_pretrained(folders[1] / "vae")
    model = build_model(load_config([TINY_V1]))
    load_into(model.first_stage_model, folders[1] / "vae")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(vae.decode(x).sample, model.first_stage_model.decode(x)) <= 1e-4


def test_folder_samples_as_its_original_layout_file(folders, tmp_path):
    model = build_model(load_config([TINY_V1]), ckpt=folders[1])
    original = tmp_path / "tiny-v1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(original))
    txt2img, pixels = script("txt2img"), []
    for ckpt in (folders[1], original):
        out = tmp_path / f"out-{ckpt.name}"
        assert txt2img.main(["--config", str(TINY_V1), "--ckpt", str(ckpt), "--steps", "4", "--n_samples", "1",
                             "--seed", "5", "--outdir", str(out)]) == 0
        pixels.append(np.asarray(Image.open(out / "samples/00000.png")))
    assert np.array_equal(*pixels)


def test_folder_that_does_not_fit_gets_one_line(folders, tmp_path):
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*hint: this looks like an SD 2.x") as err:
        build_model(load_config([TINY_V1]), ckpt=folders[2])
    assert "\n" not in str(err.value)
    v_folder = tmp_path / "v-prediction"
    shutil.copytree(folders[1], v_folder)
    scheduler = v_folder / "scheduler/scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match="predicts v_prediction but the config's parameterization is 'eps'"):
        build_model(load_config([TINY_V1]), ckpt=v_folder)
    with pytest.raises(CheckpointError, match="directory without model_index.json"):
        build_model(load_config([TINY_V1]), ckpt=tmp_path)
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "model_index.json").write_text("{}")
    with pytest.raises(DiffusersFolderError, match=r"broken/unet: no weights found"):
        build_model(load_config([TINY_V1]), ckpt=broken)


def test_covariance_estimate_reads_the_folder(folders, tmp_path):
    from ldm.perfusion.covariance import load_covariance
    from ldm.perfusion.estimate_covariance import main

    out = tmp_path / "cov.safetensors"
    assert main(["--config", str(TINY_V2), "--ckpt", str(folders[2]), "--out", str(out), "--max_captions", "50"]) == 0
    model = build_model(load_config([TINY_V2]), ckpt=folders[2])
    _, _, meta = load_covariance(out)
    assert meta["text_encoder_fingerprint"] == model.cond_stage_model.fingerprint()


def test_unet_layers_map_in_the_projects_order(folders):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[1])
    assert cross_attention_names(pipe.unet) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2", "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]


@pytest.fixture(scope="module")
def concept_run(folders, work):
    """A concept trained 1 step on the v1 folder's weights, its covariance and a Perfusion config."""
    config = load_config([TINY_PERFUSION])
    model = build_model(config, ckpt=folders[1], seed=0)
    encoder = model.cond_stage_model
    covariance = save_covariance(work / "cov.safetensors", estimate_covariance(encoder, ROOT / "data/captions.txt", 300),
                                 {"text_encoder_fingerprint": encoder.fingerprint()})
    model.covariance_path = str(covariance)
    model.ensure_covariance()
    concept = save_concept(work / "cat.safetensors", train_one_step(model).concept())
    config_file = work / "perfusion.yaml"
    OmegaConf.save(load_config([TINY_PERFUSION], [f"model.params.covariance_path={covariance}",
                                                  f"model.ckpt={folders[1]}"]), config_file)
    return {"concept": concept, "covariance": covariance, "config": config_file}


def test_pipeline_with_concept_draws_what_the_script_draws(folders, concept_run, tmp_path):
    out = tmp_path / "script"
    assert script("perfusion_txt2img").main([
        "--config", str(concept_run["config"]), "--personalized_ckpt", str(concept_run["concept"]),
        "--prompt", "a photo of a {} on the beach", "--beta", "0.6", "--tau", "0.15", "--sampler", "ddim",
        "--steps", "5", "--scale", "4", "--n_samples", "1", "--seed", "3", "--outdir", str(out)]) == 0
    expected = np.asarray(Image.open(out / "samples/00000.png")).astype(np.float64)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[1])
    pipe.set_progress_bar_config(disable=True)
    latents = initial_noise((1, 4, 16, 16), torch.device("cpu"), make_generator(3, torch.device("cpu")))
    run = dict(num_inference_steps=5, guidance_scale=4.0, height=32, width=32, output_type="np")
    before = pipe("a photo of a cat", latents=latents.clone(), **run).images[0]
    state = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    applied = apply_concepts(pipe, [concept_run["concept"]], concept_run["covariance"], betas=0.6, taus=0.15)
    assert applied.tokens == ["<cat>"]
    image = pipe(f"a photo of a {applied.tokens[0]} on the beach", latents=latents.clone(), **run).images[0]
    assert np.abs(image * 255 - expected).max() <= 1.0   # the script's PNG is rounded to 8 bits
    remove_concepts(pipe)
    assert pipe.text_encoder.state_dict().keys() == state.keys()
    assert [k for k, v in pipe.text_encoder.state_dict().items() if not torch.equal(v, state[k])] == []
    assert "<cat>" not in pipe.tokenizer.get_vocab()
    assert np.array_equal(pipe("a photo of a cat", latents=latents.clone(), **run).images[0], before)


def test_pipeline_refuses_a_concept_of_other_weights(folders, concept_run, work):
    other = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder(1, work / "other", seed=7))
    with pytest.raises(ConceptError, match="trained with unet fingerprint .* the pipeline's is"):
        apply_concepts(other, [concept_run["concept"]], concept_run["covariance"])
    assert not any("Perfusion" in type(p).__name__ for p in other.unet.attn_processors.values())


@pytest.fixture(scope="module")
def second_concept(concept_run, work):
    """Another concept of the same weights: the cat's, moved (i*, embedding, o*_V) and called a dog."""
    cat = load_concept(concept_run["concept"])
    g = torch.Generator().manual_seed(1)
    noise = lambda t: torch.randn(t.shape, generator=g) * t.std()   # noqa: E731
    dog = replace(cat, superclass="dog", i_star=cat.i_star + 0.5 * noise(cat.i_star),
                  embedding=cat.embedding + noise(cat.embedding), o_star_v=[v + noise(v) for v in cat.o_star_v])
    return save_concept(work / "dog.safetensors", dog)


@pytest.mark.parametrize("multi", ["named", "separate"])
def test_pipeline_with_two_concepts_draws_what_the_script_draws(folders, concept_run, second_concept, tmp_path, multi):
    """Two concepts under each rule; the named rule reads where each token sits from the wrapped encode_prompt."""
    out = tmp_path / "script"
    assert script("perfusion_txt2img").main([
        "--config", str(concept_run["config"]), "--personalized_ckpt", f"{concept_run['concept']},{second_concept}",
        "--prompt", "a {1} next to a {2}", "--beta", "0.6", "--tau", "0.15", "--multi", multi, "--steps", "5",
        "--scale", "4", "--n_samples", "2", "--seed", "3", "--outdir", str(out)]) == 0
    expected = [np.asarray(Image.open(out / f"samples/0000{i}.png")).astype(np.float64) for i in (0, 1)]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[1])
    pipe.set_progress_bar_config(disable=True)
    latents = initial_noise((2, 4, 16, 16), torch.device("cpu"), make_generator(3, torch.device("cpu")))
    applied = apply_concepts(pipe, [concept_run["concept"], second_concept], concept_run["covariance"], betas=0.6,
                             taus=0.15, multi=multi)
    prompt = f"a {applied.tokens[0]} next to a {applied.tokens[1]}"
    images = pipe(prompt, latents=latents, num_images_per_prompt=2, num_inference_steps=5, guidance_scale=4.0,
                  height=32, width=32, output_type="np").images
    for image, reference in zip(images, expected):
        assert np.abs(image * 255 - reference).max() <= 1.0
    if multi == "named":   # encodings made elsewhere do not say where the concepts are
        with pytest.raises(UserError, match="do not mark the concepts' tokens"):
            pipe(prompt_embeds=torch.zeros(1, 77, pipe.text_encoder.config.hidden_size), num_inference_steps=1,
                 height=32, width=32)
    remove_concepts(pipe)
    assert "encode_prompt" not in pipe.__dict__


def test_a_refused_concept_list_leaves_the_pipeline_as_it_was(folders, concept_run):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[1])
    tokenizer, processors = pipe.tokenizer, dict(pipe.unet.attn_processors)
    embeddings = pipe.text_encoder.get_input_embeddings()
    with pytest.raises(UserError, match="at least one concept"):
        apply_concepts(pipe, [], concept_run["covariance"])
    with pytest.raises(ConceptError, match="the same concept loaded twice"):
        apply_concepts(pipe, [concept_run["concept"]] * 2, concept_run["covariance"], tokens=["<a>", "<b>"])
    for tokens in ([""], [" <a>"], ["two words"]):
        with pytest.raises(UserError, match="tokens must be single words without spaces"):
            apply_concepts(pipe, [concept_run["concept"]], concept_run["covariance"], tokens=tokens)
    with pytest.raises(UserError, match="multi-concept rule must be one of"):
        apply_concepts(pipe, [concept_run["concept"]], concept_run["covariance"], multi="exact")
    assert pipe.tokenizer is tokenizer and "<cat>" not in tokenizer.get_vocab()
    assert pipe.text_encoder.get_input_embeddings() is embeddings and dict(pipe.unet.attn_processors) == processors
    assert getattr(pipe, "_perfusion", None) is None and "encode_prompt" not in pipe.__dict__


def test_concepts_go_into_a_pipeline_that_already_has_a_textual_inversion(folders, concept_run):
    """A token added by diffusers' load_textual_inversion is not part of the base weights' fingerprint, and
    the concept's token gets the row after it."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[1])
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    pipe.load_textual_inversion({"<ti>": torch.randn(width)}, token="<ti>")
    applied = apply_concepts(pipe, [concept_run["concept"]], concept_run["covariance"], betas=0.6, taus=0.15)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<ti>", applied.tokens[0]])
    assert ids[1] == ids[0] + 1 == pipe.text_encoder.get_input_embeddings().num_embeddings - 1
    remove_concepts(pipe)
    assert "<ti>" in pipe.tokenizer.get_vocab() and applied.tokens[0] not in pipe.tokenizer.get_vocab()
