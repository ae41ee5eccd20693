"""Shared fixtures: the tiny configs and models built from them (real modules, random weights)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.build import build_model, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_V1 = ROOT / "configs/tiny/v1-tiny.yaml"
TINY_V2 = ROOT / "configs/tiny/v2-tiny.yaml"


@pytest.fixture(scope="session")
def sd_shapes() -> dict:
    return json.loads((ROOT / "tests/fixtures/sd_state_dict_shapes.json").read_text())


@pytest.fixture(scope="session")
def tiny_v1():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return build_model(load_config([TINY_V1]), seed=0)


@pytest.fixture(scope="session")
def tiny_v2():
    return build_model(load_config([TINY_V2]), seed=0)

TINY_PERFUSION = ROOT / "configs/tiny/perfusion-tiny.yaml"


def tiny_perfusion_model(*overrides: str):
    """A fresh tiny Perfusion model (random seeded weights, C from 300 shipped captions)."""
    config = load_config([TINY_PERFUSION], ["model.params.covariance_max_captions=300", *overrides])
    return build_model(config, seed=0)


def perfusion_batch(model, n: int = 2, seed: int = 0):
    from ldm.data.templates import TEMPLATES, fill

    g = torch.Generator().manual_seed(seed)
    side = model.image_size * model.first_stage_model.downsample_factor
    templates = [TEMPLATES[(seed + i) % len(TEMPLATES)] for i in range(n)]
    return {
        "image": torch.rand(n, 3, side, side, generator=g) * 2 - 1,
        "mask": torch.rand(n, 1, side, side, generator=g),
        "caption": [fill(t, model.placeholder) for t in templates],
        "caption_super": [fill(t, model.superclass) for t in templates],
    }


def train_one_step(model, seed: int = 0):
    """One optimizer step of a Perfusion model on `perfusion_batch(model, 2, seed)`; the model stays in train mode."""
    model.train()
    opt = model.configure_optimizers()
    torch.manual_seed(seed)
    loss = model.shared_step(perfusion_batch(model, n=2, seed=seed))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return model
