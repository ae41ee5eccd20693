"""Reading Stable Diffusion checkpoints safely and loading them with a strict, readable check.

Original CompVis-format `.ckpt` files (a pickle, optionally wrapped in `{"state_dict": ...}`),
`.safetensors` files and diffusers-format folders (their names mapped onto the original ones,
`ldm.interop.diffusers_folder`) are accepted. Pickles are opened with `weights_only=True`, so a
file that would import or call code is refused instead of executed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from ldm.interop.diffusers_folder import is_diffusers_folder, read_diffusers_folder, read_vae_folder, scheduler_config
from ldm.weights_file import CheckpointError, read_weights_file

# Buffers of LatentDiffusion that the schedule recomputes from the config; checkpoints carry them.
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "scale_factor",
}
_CONTEXT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a `.ckpt`/`.pt`/`.pth` or `.safetensors` file, or of a diffusers
    folder (a whole pipeline, or one AutoencoderKL), under the original names, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (expected a .ckpt or .safetensors checkpoint)")
    if path.is_dir():
        if is_diffusers_folder(path):
            return read_diffusers_folder(path)
        if (path / "config.json").is_file() and (vae := read_vae_folder(path)) is not None:
            return vae
        raise CheckpointError(f"{path}: is a directory without model_index.json, expected a .ckpt or "
                              ".safetensors checkpoint file or a diffusers-format folder")
    return read_weights_file(path)


def normalize_keys(state: Mapping[str, torch.Tensor], ema_names: Iterable[str] = (),
                   use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Map the naming variants of real checkpoints onto this project's names.

    - `cond_stage_model.transformer.text_model.*` (the CompVis releases, transformers 4.x names) -> `cond_stage_model.transformer.*`
    - SDXL's `conditioner.*` -> `cond_stage_model.*` (and its CLIP's `text_model.` dropped likewise)
    - `*.position_ids` and the diffusion-schedule buffers are dropped (recomputed from the config).
    - `model_ema.*` copies are dropped, or with `use_ema` replace the U-Net weights; LitEma stores
      them with the dots removed, so `ema_names` (the model's `model.*` parameter names) resolve them.
    """
    out, ema = {}, {}
    for key, value in state.items():
        if key.startswith("model_ema."):
            ema[key[len("model_ema."):]] = value
            continue
        if key.endswith(".position_ids") or key in SCHEDULE_BUFFERS:
            continue
        if key.startswith("conditioner."):   # SDXL: sgm's name for the text conditioning
            key = "cond_stage_model." + key[len("conditioner."):]
        for text_model in ("cond_stage_model.transformer.text_model.", "cond_stage_model.embedders.0.transformer.text_model."):
            key = key.replace(text_model, text_model[:-len("text_model.")])
        out[key] = value
    if use_ema:
        by_flat = {name[len("model."):].replace(".", ""): name for name in ema_names if name.startswith("model.")}
        found = {by_flat[k]: v for k, v in ema.items() if k in by_flat}
        if not found:
            raise CheckpointError("use_ema was asked for, but the checkpoint holds no model_ema.* weights")
        out.update(found)
    return out


def original_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's names -> those of the published checkpoints (the inverse of `normalize_keys`'s
    renaming): CLIP's `text_model.` back in, and SDXL's text conditioning under `conditioner.`."""
    out = {}
    for key, value in state.items():
        for clip in ("cond_stage_model.transformer.", "cond_stage_model.embedders.0.transformer."):
            if key.startswith(clip):
                key = clip + "text_model." + key[len(clip):]
        if key.startswith("cond_stage_model.embedders."):
            key = "conditioner." + key[len("cond_stage_model."):]
        out[key] = value
    return out


def sd_version(state: Mapping[str, torch.Tensor]) -> str | None:
    """'SD 1.x', 'SD 2.x' or 'SDXL' from the text encoder's names (or the context width), None if unknown."""
    if any(k.startswith("cond_stage_model.embedders.") for k in state):
        return "SDXL"
    if any(k.startswith("cond_stage_model.model.") for k in state):
        return "SD 2.x"
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        return "SD 1.x"
    w = state.get(_CONTEXT_KEY)
    return None if w is None else {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(int(w.shape[1]))


def check_compatible(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str,
                     ignore_missing: Iterable[str] = ()) -> None:
    """Raise a one-line CheckpointError unless `found` has exactly the names and shapes of `expected`.

    `ignore_missing` lists keys the model has but a base checkpoint is not expected to carry
    (for example Perfusion's concept parameters).
    """
    ignore = set(ignore_missing)
    missing = [k for k in expected if k not in found and k not in ignore]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {list(found[k].shape)} in file, "
                     f"{list(expected[k].shape)} in model)")
    file_version, model_version = sd_version(found), sd_version(expected)
    hint = ""
    if file_version and model_version and file_version != model_version:
        hint = f"; hint: this looks like an {file_version} checkpoint but the config is {model_version}"
    raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}{hint}")


def load_model(model: torch.nn.Module, path: str | Path, use_ema: bool = False,
               ignore_missing: Iterable[str] = ()) -> None:
    """Load a whole LatentDiffusion checkpoint into `model` after a strict name/shape check."""
    raw = read_state_dict(path)
    expected = model.state_dict()
    state = normalize_keys(raw, ema_names=expected.keys(), use_ema=use_ema)
    encoder = getattr(model, "cond_stage_model", None)
    unused = [f"cond_stage_model.{k}" for k in encoder.unused_keys()] if hasattr(encoder, "unused_keys") else []
    check_compatible(expected, state, str(path), [*ignore_missing, *unused])
    _check_schedule(model, raw, path)
    model.load_state_dict(state, strict=False)


def load_into(module: torch.nn.Module, source: str | Path | Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Load the keys under `prefix` (e.g. 'cond_stage_model.') of a checkpoint into a submodule."""
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    raw = source if isinstance(source, Mapping) else read_state_dict(source)
    state = {k[len(prefix):]: v for k, v in normalize_keys(raw).items() if k.startswith(prefix)}
    if not state:
        version = sd_version(raw)
        raise CheckpointError(f"{name}: no weights under '{prefix}'" + (f" (file looks like {version})" if version else ""))
    unused = module.unused_keys() if hasattr(module, "unused_keys") else ()
    check_compatible(module.state_dict(), state, f"{name} [{prefix}*]", unused)
    module.load_state_dict(state, strict=False)


_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


def _check_schedule(model: torch.nn.Module, raw: Mapping[str, torch.Tensor], path) -> None:
    scheduler = scheduler_config(path) if is_diffusers_folder(path) else None
    mine = getattr(model, "parameterization", None)
    if scheduler and mine and _PREDICTION.get(scheduler.get("prediction_type", "epsilon")) != mine:
        raise CheckpointError(f"{path}: the scheduler predicts {scheduler.get('prediction_type', 'epsilon')} but "
                              f"the config's parameterization is {mine!r}")
    betas = raw.get("betas")
    mine = getattr(model, "betas", None)
    if betas is None or mine is None:
        return
    if betas.shape != mine.shape or not torch.allclose(betas.double(), mine.double().cpu(), rtol=1e-4, atol=1e-7):
        raise CheckpointError(f"{path}: the checkpoint's noise schedule (betas) differs from the config's "
                              f"(timesteps/linear_start/linear_end)")
