"""Config loading and model construction shared by main.py and the scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ldm.checkpoint import load_model
from ldm.errors import UserError
from ldm.util import REPO_ROOT, instantiate_from_config

# `${repo:ckpt/toy/x.safetensors}` in a config: a path inside this repository, whatever the working directory.
OmegaConf.register_resolver("repo", lambda path: str(REPO_ROOT / path), replace=True)


class ConfigError(UserError):
    """A configuration that cannot be used; the message is one line naming the file or field."""


def load_config(paths: Sequence[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge YAML files left to right, then `key=value` overrides (OmegaConf dot-list syntax).

    A file's `base:` key (a file name or a list, relative to the file) names the configs it is an
    overlay on: they are merged first, so a setting lives in one file."""
    if not paths:
        raise ConfigError("no config given (pass at least one YAML file)")
    configs = [_load_overlay(Path(path)) for path in paths]
    overrides = list(overrides)
    _check_overrides(overrides, OmegaConf.merge(*configs))
    try:
        merged = OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot merge configs {[str(p) for p in paths]}: {str(err).splitlines()[0]}")
    if "model" not in merged:
        raise ConfigError(f"{paths[-1]}: config has no 'model' section")
    return merged


def _check_overrides(overrides: Sequence[str], base: DictConfig) -> None:
    """Refuse overrides that set nothing: not key=value, a section other than model/data/lightning,
    or an empty value for a key the configs do not have (a typo would otherwise pass silently)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lightning.trainer.max_steps=2)")
        key, _, value = item.partition("=")
        section = key.split(".")[0]
        if section not in ("model", "data", "lightning"):
            raise ConfigError(f"override {item!r}: {section!r} is not a config section (model, data, lightning)")
        if value.strip() == "" and OmegaConf.select(base, key, default="<missing>") == "<missing>":
            raise ConfigError(f"override {item!r}: {key} is not in the config and the value is empty")


def _load_overlay(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """One config file, merged over the files its `base:` key names."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: the base: keys form a loop ({' -> '.join(p.name for p in seen)} -> {path.name})")
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, YAMLError, ValueError) as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}")
    if not isinstance(config, DictConfig):
        raise ConfigError(f"{path}: expected sections (model:, data:, lightning:) at the top level, got a "
                          f"{type(config).__name__.removesuffix('Config').lower()}")
    bases = config.pop("base", None)
    if bases is None:
        return config
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, (list, ListConfig)) or not bases or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base must be a config file name or a list of them, relative to {path.parent}")
    return OmegaConf.merge(*(_load_overlay(path.parent / b, seen + (path.resolve(),)) for b in bases), config)


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


def build_perfusion(config_path: str | Path, ckpt: str | Path | None = None, use_ema: bool = False,
                    device: str = "cpu"):
    """The Perfusion model of a training config, for sampling and evaluation: (model, ckpt used,
    weights seed). Without a checkpoint the weights are random, seeded with lightning.seed as in training."""
    import sys

    from ldm.perfusion.model import PerfusionLatentDiffusion
    from ldm.util import get_obj_from_str

    config = load_config([config_path])
    target = config.model.get("target", "")
    cls = get_obj_from_str(target)
    if not (isinstance(cls, type) and issubclass(cls, PerfusionLatentDiffusion)):
        raise ConfigError(f"{config_path}: model.target is {target}, not a Perfusion model; pass the config the "
                          "concepts were trained with (e.g. configs/perfusion_teddy.yaml)")
    ckpt = ckpt or config.model.get("ckpt")
    seed = int(config.get("lightning", {}).get("seed", 23))
    if ckpt is None:
        print(f"note: no --ckpt and no model.ckpt: {config_path} runs with random weights seeded with {seed} "
              "(lightning.seed, as in training)", file=sys.stderr)
    return build_model(config, ckpt, use_ema=use_ema, device=device, seed=seed), ckpt, seed


@torch.no_grad()
def randomize_zero_weights(module: torch.nn.Module) -> int:
    """Give every all-zero weight matrix/kernel a small random init (std 0.02); returns how many."""
    count = 0
    for p in module.parameters():
        if p.dim() >= 2 and not p.is_meta and not p.any():
            p.normal_(0.0, 0.02)
            count += 1
    return count
