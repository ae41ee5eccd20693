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
