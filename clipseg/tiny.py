"""A miniature, randomly initialised CLIPSeg saved in Hugging Face format, for tests and demos.

Same architecture and file layout as CIDAS/clipseg-rd64-refined (config, safetensors weights,
CLIP tokenizer, image processor), at widths that run on a CPU in milliseconds. Its masks are
noise: it exercises the pipeline, not segmentation quality.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 64  # the processor resizes to this; the vision tower's native size matches it
# ImageNet statistics and bilinear resampling, as in the rd64-refined preprocessing config.
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def save_tiny_clipseg(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny model with `seed`, save model, tokenizer and processor into `directory`."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from clipseg.tokenizer_files import VOCAB_SIZE, build_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPSegConfig(
        text_config=dict(tower, vocab_size=VOCAB_SIZE, max_position_embeddings=77),
        vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=16),
        projection_dim=16,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    image_processor = ViTImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=2,
        do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
    )
    model.save_pretrained(directory)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=build_tokenizer()).save_pretrained(directory)
    return directory
