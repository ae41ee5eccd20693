"""Config loading and model construction shared by main.py and the scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ldm.checkpoint import load_model
from ldm.util import instantiate_from_config


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line naming the file or field."""


def load_config(paths: Sequence[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge YAML files left to right, then `key=value` overrides (OmegaConf dot-list syntax)."""
    if not paths:
        raise ConfigError("no config given (pass at least one YAML file)")
    configs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            configs.append(OmegaConf.load(path))
        except (OmegaConfBaseException, YAMLError, ValueError) as err:
            first = " ".join(str(err).split())
            raise ConfigError(f"{path}: not valid YAML: {first}")
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lightning.trainer.max_steps=2)")
    try:
        merged = OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot merge configs {[str(p) for p in paths]}: {str(err).splitlines()[0]}")
    if "model" not in merged:
        raise ConfigError(f"{paths[-1]}: config has no 'model' section")
    return merged


def build_model(config: DictConfig, ckpt: str | Path | None = None, use_ema: bool = False,
                device: str | torch.device = "cpu", seed: int = 0):
    """Instantiate `config.model`; load `ckpt` if given, else keep seeded random weights.

    Random weights are "project-made": the layers SD initialises to zero (each block's output
    projection, the U-Net's last conv) get random values too, otherwise the untrained network
    would ignore its text conditioning and nothing downstream of it could be tested.
    """
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    if ckpt is None:
        randomize_zero_weights(model)
    else:
        ignore = model.non_base_keys() if hasattr(model, "non_base_keys") else ()
        load_model(model, ckpt, use_ema=use_ema, ignore_missing=ignore)
    return model.to(device).eval()


@torch.no_grad()
def randomize_zero_weights(module: torch.nn.Module) -> int:
    """Give every all-zero weight matrix/kernel a small random init (std 0.02); returns how many."""
    count = 0
    for p in module.parameters():
        if p.dim() >= 2 and not p.is_meta and not p.any():
            p.normal_(0.0, 0.02)
            count += 1
    return count
