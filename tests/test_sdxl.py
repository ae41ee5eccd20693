"""The SDXL-shaped model against diffusers on identical random weights: the project's state dict,
in the published names, goes through diffusers' single-file converters (the ones that read
sd_xl_base_1.0.safetensors) into diffusers models, which must then compute what this project does."""
from __future__ import annotations

import shutil

import diffusers
import pytest
import torch
from diffusers.loaders import single_file_utils as single_file
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.build import build_model, load_config
from ldm.checkpoint import normalize_keys, original_names, sd_version
from ldm.modules.sdxl_conditioner import size_vector
from tests.conftest import ROOT

TINY_XL = ROOT / "configs/tiny/sdxl-tiny.yaml"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def model():
    """The tiny SDXL-shaped model with project-made random weights (build_model's)."""
    return build_model(load_config([TINY_XL]), seed=0)


def strict_load(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    own = set(module.state_dict())
    if not own & set(state):   # transformers releases differ on a text_model. prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    return module.eval()


@pytest.fixture(scope="module")
def published(model):
    return original_names(model.state_dict())


def diffusers_unet(state) -> diffusers.UNet2DConditionModel:
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 4), cross_attention_dim=80,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1584)
    return strict_load(unet, single_file.convert_ldm_unet_checkpoint(state, unet.config))


def test_names_are_the_published_ones(published):
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in published)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in published)
    assert "model.diffusion_model.label_emb.0.0.weight" in published
    assert sd_version(normalize_keys(published)) == "SDXL"


def test_unet_with_added_conditioning_agrees_with_diffusers(model, published):
    unet = diffusers_unet(published)
    g = torch.Generator().manual_seed(2)
    x, context, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 80, generator=g), \
        torch.randn(2, 48, generator=g)
    t = torch.tensor([7, 913])
    sizes = torch.tensor([[1024.0, 768.0, 16.0, 0.0, 1024.0, 1024.0]] * 2)
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        ours = model.model.diffusion_model(x, timesteps=t, context=context,
                                           y=size_vector(pooled, (1024, 768), (16, 0), (1024, 1024)))
    assert rel(theirs, ours) <= 1e-4


def diffusers_text_encoders(state) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    clip = strict_load(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu")),
        single_file.convert_ldm_clip_checkpoint(state, "conditioner.embedders.0.transformer."))
    big = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=48))
    return clip, strict_load(big, single_file.convert_open_clip_checkpoint(big, state, "conditioner.embedders.1.model."))


def diffusers_vae(state) -> diffusers.AutoencoderKL:
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, sample_size=32, scaling_factor=1.0)
    return strict_load(vae, single_file.convert_ldm_vae_checkpoint(state, vae.config))


def test_both_text_encoders_agree_with_transformers(model, published):
    clip, big = diffusers_text_encoders(published)
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    first, second = model.cond_stage_model.embedders
    ids1, ids2 = first.tokenize(prompts), second.tokenize(prompts)
    assert ids1[0, 7] == first.tokenizer.eot_token_id and ids2[0, 7] == 0   # end-token vs zero padding
    with torch.no_grad():
        ours = model.cond_stage_model.encode(prompts)
        out1 = clip(ids1, output_hidden_states=True)
        out2 = big(ids2, output_hidden_states=True)
    assert rel(torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1), ours["crossattn"]) <= 1e-4
    assert rel(out2.text_embeds, ours["pooled"]) <= 1e-4


def test_vae_agrees_with_diffusers(model, published):
    vae = diffusers_vae(published)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(vae.decode(z).sample, model.first_stage_model.decode(z)) <= 1e-4


def test_published_layout_file_loads_back(model, published, tmp_path):
    path = tmp_path / "sdxl-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in published.items()}, str(path))
    loaded = build_model(load_config([TINY_XL]), ckpt=path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_diffusers_sdxl_folder_loads_as_the_same_weights(model, published, tmp_path):
    from tests.diffusers_tiny import clip_tokenizer

    clip, big = diffusers_text_encoders(published)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers_vae(published), text_encoder=clip, text_encoder_2=big, unet=diffusers_unet(published),
        tokenizer=clip_tokenizer(tmp_path / "tok", 1), tokenizer_2=clip_tokenizer(tmp_path / "tok2", 2),
        scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "sdxl")
    loaded = build_model(load_config([TINY_XL]), ckpt=tmp_path / "sdxl")
    for key, value in model.state_dict().items():
        assert torch.allclose(loaded.state_dict()[key], value), key
    shutil.rmtree(tmp_path / "sdxl/text_encoder_2")   # a folder copied in part
    with pytest.raises(ValueError, match="lists text_encoder_2 but the folder has no text_encoder_2/"):
        build_model(load_config([TINY_XL]), ckpt=tmp_path / "sdxl")


def test_empty_prompt_is_zero_and_sampling_is_finite(model):
    from ldm.sample import generate

    cond = model.get_learned_conditioning(["a cat", ""])
    assert cond["crossattn"][1].abs().max() == 0 and cond["pooled"][1].abs().max() == 0
    assert cond["crossattn"][0].abs().max() > 0
    images = generate(model, ["a cat"], steps=2, scale=5.0, height=32, width=32, seed=0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("override", ["model.params.original_size=[-1,5]", "model.params.crop=[0,0,0]",
                                      "model.params.crop=a", "model.params.original_size=[512,'x']"])
def test_size_conditioning_settings_are_two_whole_numbers(override):
    with pytest.raises(ValueError, match=r"model.params.(original_size|crop) must be two whole numbers"):
        build_model(load_config([TINY_XL], [override]))
