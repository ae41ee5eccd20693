"""A reference for the toy benchmark, not a method of this project: fine-tune the base model's
whole U-Net on a concept's images, DreamBooth-style (the captions name the superclass word, no
placeholder, no prior preservation), with Lightning on the concept's masked images.

It answers one question: how much of a concept's look can the toy base model draw when every
U-Net weight may move, where Perfusion moves only the concept's values in cross-attention?
`python -m ldm.toy.benchmark` measures it as its "whole U-Net fine-tuned" row.
"""
from __future__ import annotations

import time
from pathlib import Path
from ldm.util import REPO_ROOT as ROOT

LDM_CONFIG = ROOT / "configs/toy/ldm.yaml"
LDM_CKPT = ROOT / "ckpt/toy/toy-ldm.safetensors"
STEPS, LEARNING_RATE, BATCH_SIZE = 600, 3.0e-4, 4


def finetune(data_root: Path, superclass: str, steps: int = STEPS, learning_rate: float = LEARNING_RATE,
             seed: int = 5):
    """The toy LatentDiffusion with its U-Net trained for `steps` on the images under `data_root`
    (their captions.json, `{}` filled with `superclass`; loss weighted by the masks).
    Returns (model in eval mode, wall seconds of training)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ldm.build import build_model, load_config
    from ldm.data.personalized import PersonalizedDataset

    config = load_config([LDM_CONFIG], [f"model.params.learning_rate={learning_rate}",
                                        "model.params.cond_stage_trainable=false",
                                        "model.params.cond_stage_key=caption_super"])
    model = build_model(config, ckpt=LDM_CKPT)
    data = PersonalizedDataset(data_root, placeholder="*", superclass=superclass, size=32, flip_p=0.0,
                               captions="captions.json", use_masks=True)
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(data, batch_size=min(BATCH_SIZE, len(data)), shuffle=True, drop_last=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return model.eval(), time.perf_counter() - start
