"""Tiny random CLIP and DINO models in their public formats, for tests and smoke runs of the
evaluation (no download): an open_clip model config .json with its safetensors checkpoint, and a
transformers ViT folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def write_tiny_metric_models(folder: str | Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """(open_clip config .json, its checkpoint, DINO folder) under `folder`, random weights from `seed`."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    clip = open_clip.create_model("tiny-clip")
    checkpoint = folder / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(checkpoint))
    vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                             image_size=64, patch_size=16), add_pooling_layer=False)
    dino = folder / "tiny-dino"
    vit.save_pretrained(dino)
    (dino / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 64, "width": 64}, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return config, checkpoint, dino
