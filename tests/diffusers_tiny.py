"""Tiny random diffusers pipelines shaped like configs/tiny/v1-tiny.yaml and v2-tiny.yaml (test-only).

diffusers builds the U-Net and VAE, transformers the CLIP text model and the tokenizer, whose
vocabulary and merges are written from the BPE file open_clip ships (nothing is downloaded).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def clip_tokenizer(folder: Path, version: int):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer(default_bpe(), context_length=None)
    folder.mkdir(parents=True, exist_ok=True)
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({specials.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # SD 1.x pads with the end token, SD 2.x with "!" (id 0), as the released tokenizers do
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>" if version == 1 else "!")


def tiny_pipeline(version: int, workdir: Path, seed: int = 0):
    """A StableDiffusionPipeline with random weights that fit the tiny config of SD `version` (1 or 2)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    v2 = version == 2
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=(2, 4) if v2 else 2,   # SD2: 16 channels per head
        use_linear_projection=v2, upcast_attention=v2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, sample_size=32, scaling_factor=1.0)
    # SD 2.x folders hold the OpenCLIP tower as a CLIPTextModel without the block it skips (3 -> 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if v2 else "quick_gelu"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              prediction_type="v_prediction" if v2 else "epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(workdir / "tok", version),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_folder(version: int, workdir: Path, seed: int = 0) -> Path:
    """The pipeline of `tiny_pipeline`, saved as a diffusers folder (safetensors)."""
    folder = workdir / f"sd{version}-diffusers"
    if not (folder / "model_index.json").is_file():
        tiny_pipeline(version, workdir, seed).save_pretrained(folder)
    return folder
