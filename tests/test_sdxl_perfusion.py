"""Perfusion on the SDXL-shaped model: a concept row split between the two text encoders, the pooled
embedding from the superclass prompt, the covariance over the 2048-d (here 80-d) context, training
through main.py, and concepts in a diffusers StableDiffusionXLPipeline drawing what the script draws."""
from __future__ import annotations

import importlib.util

import diffusers
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import train as main
from ldm.build import build_model, load_config
from ldm.checkpoint import original_names
from ldm.interop.diffusers import apply_concepts, remove_concepts
from ldm.models.diffusion.guidance import initial_noise, make_generator
from ldm.perfusion.concepts import load_concept, save_concept
from ldm.perfusion.covariance import estimate_covariance, load_covariance, save_covariance
from ldm.perfusion.inference import load_concepts
from ldm.perfusion.prompts import prepare_prompt
from ldm.sample import generate
from ldm.util import instantiate_from_config
from tests.conftest import ROOT, perfusion_batch, train_one_step
from tests.test_evaluation import metric_files, photos, training_images  # noqa: F401 (fixtures)
from tests.test_sdxl import TINY_XL, diffusers_text_encoders, diffusers_unet, diffusers_vae

PERFUSION_XL = ROOT / "configs/tiny/perfusion-sdxl-tiny.yaml"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl-perfusion")


@pytest.fixture(scope="module")
def trained():
    """The tiny PerfusionSDXL (random weights, C estimated from data/captions.txt) after one step."""
    return train_one_step(build_model(load_config([PERFUSION_XL]), seed=0)).eval()


def test_the_sdxl_config_makes_a_2048_d_concept_with_70_value_outputs():
    config = load_config([ROOT / "configs/perfusion_teddy_sdxl.yaml"])
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert type(model).__name__ == "PerfusionSDXL"
    assert (model.embedding.numel(), model.i_star.numel(), len(model.o_star_v)) == (2048, 2048, 70)
    assert sorted({v.numel() for v in model.o_star_v}) == [640, 1280]
    assert config.data.params.size == 1024 and config.model.params.unet_config.params.use_checkpoint


def test_the_joint_encoding_is_both_encoders_side_by_side(trained):
    conditioner = trained.cond_stage_model
    clip, openclip = conditioner.embedders
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    tokens = conditioner.tokenize(prompts)
    with torch.no_grad():
        joint = conditioner.encode_embeddings(tokens, conditioner.token_embedding(tokens))
        second = openclip.tokenize(prompts)   # zero padding, as OpenCLIP's own tokenizer pads
        expected = torch.cat([clip.encode(prompts), openclip.encode_embeddings(second, openclip.token_embedding(second))], -1)
    assert torch.equal(joint, expected)


def test_each_half_of_the_concept_row_reaches_its_own_encoder(trained):
    width = trained.cond_stage_model.embedders[0].width
    tokens = trained.cond_stage_model.tokenize(["a photo of a *"])
    row = trained.embedding.detach()

    def context(r):
        with torch.no_grad():
            return trained.cond_stage_model.encode_embeddings(tokens, trained.embed_tokens(tokens, {trained.placeholder_id: r}))

    base = context(row)
    first = context(torch.cat([row[:width] + 0.5, row[width:]]))
    second = context(torch.cat([row[:width], row[width:] + 0.5]))
    assert torch.equal(first[..., width:], base[..., width:]) and not torch.allclose(first[..., :width], base[..., :width])
    assert torch.equal(second[..., :width], base[..., :width]) and not torch.allclose(second[..., width:], base[..., width:])
    assert trained.embedding.grad is not None and (trained.embedding.grad[:width] != 0).any() and \
        (trained.embedding.grad[width:] != 0).any()   # both halves learn


def test_the_pooled_embedding_is_the_superclass_prompts(trained, tmp_path):
    conditioner = trained.cond_stage_model
    # in training: what the U-Net receives for a batch
    seen = []
    apply_model = trained.apply_model
    trained.apply_model = lambda x, t, cond: seen.append(cond) or apply_model(x, t, cond)
    try:
        batch = perfusion_batch(trained, n=2, seed=1)
        with torch.no_grad():
            trained.shared_step(batch)
    finally:
        del trained.apply_model
    with torch.no_grad():
        assert torch.equal(seen[0]["pooled"], conditioner.pooled(batch["caption_super"]))
    # in sampling, whatever the concept's embedding is
    concept = load_concept(trained.save_concept(tmp_path / "cat.safetensors"))
    pooled = []
    for shift in (0.0, 1.0):
        concept.embedding = concept.embedding + shift
        loaded = load_concepts(trained, [concept], 0.7, 0.15)
        prompt = prepare_prompt(conditioner.tokenizer, "a photo of a {} on the beach", loaded)
        with torch.no_grad():
            cond = trained.get_learned_conditioning([prompt, ""])
        pooled.append(cond["pooled"])
    assert torch.equal(pooled[0], pooled[1])
    torch.testing.assert_close(pooled[0][0], conditioner.pooled(["a photo of a cat on the beach"])[0])
    assert cond["pooled"][1].abs().max() == 0 and cond["crossattn"][1].abs().max() == 0   # empty prompt: zeros


def test_two_concepts_and_global_locking_sample(trained, tmp_path):
    from ldm.perfusion.gates import gate_tables

    other = train_one_step(build_model(load_config([PERFUSION_XL]), seed=0), seed=5).eval()
    files = [trained.save_concept(tmp_path / "a.safetensors"), other.save_concept(tmp_path / "b.safetensors")]
    loaded = load_concepts(trained, files, [0.7, 0.6], 0.15)
    prompt = prepare_prompt(trained.cond_stage_model.tokenizer, "a {1} beside a {2}", loaded)
    table = gate_tables(trained, [prompt])[0]
    (first,), (second,) = table.owned(0), table.owned(1)
    assert table.tokens[first] == "sks" and table.tokens[second] == "ohwx"
    images = generate(trained, [prompt], steps=2, scale=4.0, height=32, width=32, seed=0)
    loaded = load_concepts(trained, files[:1], 0.5, 0.15, global_locking=True)
    single = prepare_prompt(trained.cond_stage_model.tokenizer, "a photo of a {}", loaded)
    images = torch.cat([images, generate(trained, [single], steps=2, scale=4.0, height=32, width=32, seed=0)])
    assert torch.isfinite(images).all()


def test_covariance_script_reads_the_concatenated_context(tmp_path):
    from ldm.perfusion import estimate_covariance as cli
    from tests.test_covariance import first_captions

    out = tmp_path / "cov.safetensors"
    assert cli.main(["--config", str(TINY_XL), "--out", str(out), "--max_captions", "40", "--ridge", "0",
                     "--device", "cpu"]) == 0
    c, _, meta = load_covariance(out)
    encoder = cli.build_text_encoder(str(TINY_XL), None, seed=0)
    with torch.no_grad():   # every position of the U-Net's context counts (token rule "all")
        context = encoder.encode(first_captions(40))["crossattn"].double().reshape(-1, 80)
    assert c.shape == (80, 80)
    torch.testing.assert_close(c, context.T @ context / context.shape[0], rtol=1e-6, atol=1e-9)
    assert meta["text_encoder_fingerprint"] == encoder.fingerprint()


@pytest.fixture(scope="module")
def sdxl_folder(work):
    """A diffusers StableDiffusionXLPipeline folder holding the tiny SDXL model's random weights."""
    from tests.diffusers_tiny import clip_tokenizer

    published = original_names(build_model(load_config([TINY_XL]), seed=0).state_dict())
    clip, big = diffusers_text_encoders(published)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers_vae(published), text_encoder=clip, text_encoder_2=big, unet=diffusers_unet(published),
        tokenizer=clip_tokenizer(work / "tok", 1), tokenizer_2=clip_tokenizer(work / "tok2", 2), scheduler=scheduler)
    pipe.save_pretrained(work / "sdxl")
    return work / "sdxl"


@pytest.mark.slow
def test_training_through_main_writes_an_sdxl_concept(sdxl_folder, work):
    trainer = main.run(["--base", str(PERFUSION_XL), "-t", "--name", "xl", "--logdir", str(work / "logs"),
                        "--accelerator", "cpu", f"model.ckpt={sdxl_folder}", "lightning.trainer.max_steps=2",
                        "lightning.callbacks.image_logger.every_n_steps=2"])
    assert trainer.global_step == 2
    (run_dir,) = (work / "logs").iterdir()
    concept = load_concept(run_dir / "concepts" / "last.safetensors")
    assert (concept.embedding.numel(), concept.i_star.numel(), len(concept.o_star_v)) == (80, 80, 28)


@pytest.fixture(scope="module")
def concept_run(sdxl_folder, work):
    """A concept trained one step on the folder's weights, its covariance file and its config."""
    model = train_one_step(build_model(load_config([PERFUSION_XL]), ckpt=sdxl_folder, seed=0)).eval()
    encoder = model.cond_stage_model
    covariance = save_covariance(work / "cov.safetensors", estimate_covariance(encoder, ROOT / "data/captions.txt", 300),
                                 {"text_encoder_fingerprint": encoder.fingerprint()})
    model.covariance_path, model.bank.C_inv = str(covariance), None
    model.ensure_covariance()
    model._fingerprints = model.fingerprints()
    moved = model.concept()   # an embedding far from the superclass word's, so the pooled vectors differ
    moved.embedding = moved.embedding + torch.randn(moved.embedding.shape, generator=torch.Generator().manual_seed(1))
    config = work / "perfusion-xl.yaml"
    OmegaConf.save(load_config([PERFUSION_XL], [f"model.params.covariance_path={covariance}",
                                                f"model.ckpt={sdxl_folder}"]), config)
    return dict(model=model, concept=save_concept(work / "cat.safetensors", moved), covariance=covariance, config=config)


def test_sdxl_pipeline_with_concept_draws_what_the_script_draws(sdxl_folder, concept_run, tmp_path):
    model, concept, covariance = concept_run["model"], concept_run["concept"], concept_run["covariance"]
    out = tmp_path / "script"
    assert script("perfusion_txt2img").main([
        "--config", str(concept_run["config"]), "--personalized_ckpt", str(concept), "--prompt",
        "a photo of a {} on the beach", "--beta", "0.6", "--tau", "0.15", "--sampler", "ddim", "--steps", "5",
        "--scale", "4", "--n_samples", "1", "--seed", "3", "--outdir", str(out)]) == 0
    expected = np.asarray(Image.open(out / "samples/00000.png")).astype(np.float64)

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_noise((1, 4, 16, 16), torch.device("cpu"), make_generator(3, torch.device("cpu")))
    run = dict(num_inference_steps=5, guidance_scale=4.0, height=32, width=32, output_type="np")
    before = pipe("a photo of a cat", latents=latents.clone(), **run).images[0]
    applied = apply_concepts(pipe, [concept], covariance, betas=0.6, taus=0.15)
    seen = []   # what the pipeline's U-Net receives: [negative, prompt] rows
    hook = pipe.unet.register_forward_pre_hook(lambda unet, args, kwargs: seen.append(
        (args[2] if len(args) > 2 else kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]["text_embeds"])),
        with_kwargs=True)
    image = pipe(f"a photo of a {applied.tokens[0]} on the beach", latents=latents.clone(), **run).images[0]
    hook.remove()
    assert np.abs(image * 255 - expected).max() <= 1.0   # the script's PNG is rounded to 8 bits
    # the context and the pooled vector (the superclass prompt's) are those PerfusionSDXL gives the U-Net
    loaded = load_concepts(model, [concept], 0.6, 0.15)
    with torch.no_grad():
        ours = model.get_learned_conditioning([prepare_prompt(model.cond_stage_model.tokenizer,
                                                              "a photo of a {} on the beach", loaded)])
    torch.testing.assert_close(seen[0][0][1], ours["crossattn"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0][1][1], ours["pooled"][0], rtol=1e-5, atol=1e-5)
    remove_concepts(pipe)
    assert "<cat>" not in pipe.tokenizer.get_vocab() and "<cat>" not in pipe.tokenizer_2.get_vocab()
    assert "encode_prompt" not in pipe.__dict__
    assert np.array_equal(pipe("a photo of a cat", latents=latents.clone(), **run).images[0], before)


def test_an_sdxl_pipeline_whose_second_tokenizer_refuses_is_left_as_it_was(sdxl_folder, concept_run):
    """The second tokenizer already has a word the second text encoder has no row for: the token cannot get
    the row after the encoder's, which is found before either encoder or tokenizer is touched."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.tokenizer_2.add_tokens(["<stray>"])
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    embeddings = [e.get_input_embeddings() for e in encoders]
    vocab = [len(t) for t in tokenizers]
    with pytest.raises(ValueError, match="gave the new tokens ids"):
        apply_concepts(pipe, [concept_run["concept"]], concept_run["covariance"])
    assert (pipe.tokenizer, pipe.tokenizer_2) == tokenizers and [len(t) for t in tokenizers] == vocab
    assert [e.get_input_embeddings() for e in encoders] == embeddings and "encode_prompt" not in pipe.__dict__
    assert getattr(pipe, "_perfusion", None) is None


def test_evaluate_concept_runs_on_an_sdxl_concept(concept_run, metric_files, training_images, tmp_path):
    import json

    clip_config, clip_ckpt, dino = metric_files
    out = tmp_path / "eval"
    assert script("evaluate_concept").main([
        "--config", str(concept_run["config"]), "--concepts", str(concept_run["concept"]),
        "--images", str(training_images), "--prompts", "dreambooth-live", "--max_prompts", "2",
        "--clip_model", str(clip_config), "--clip_ckpt", str(clip_ckpt), "--dino", str(dino), "--seeds", "1",
        "--steps", "2", "--batch", "2", "--beta_sweep", "0.5:0.9:2", "--out", str(out), "--device", "cpu"]) == 0
    entry = json.loads((out / "results.json").read_text())["concepts"][0]
    assert len(entry["sweep"]) == 2 and all(-1 <= v <= 1 for v in entry["mean"].values())
