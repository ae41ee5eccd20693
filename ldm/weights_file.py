"""Reading one weights file safely: a `.ckpt`/`.pt`/`.pth` pickle (opened with `weights_only=True`, so a
file that would import or call code is refused instead of executed) or a `.safetensors` file."""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from ldm.errors import UserError


# this project's other safetensors files, named when one is given where model weights are expected
NOT_WEIGHTS = {"perfusion-concept": "a Perfusion concept, not model weights (sampling takes it with "
                                    "--personalized_ckpt, the base model with --ckpt)",
               "perfusion-covariance": "a covariance file, not model weights (model.params.covariance_path takes it)"}


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line that names the file."""


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one `.ckpt`/`.pt`/`.pth` or `.safetensors` file, on the CPU (a pickle's
    `{"state_dict": ...}` wrapper unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                              "is it a text or HTML file?")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses globals it does not know: the file wants to build objects or run code.
        what = re.search(r"GLOBAL (\S+)", str(err))
        culprit = f" ({what.group(1)})" if what else ""
        raise CheckpointError(f"{path}: refused to unpickle: the file asks to import or call code{culprit}, "
                              "and only plain tensors are loaded; convert it to .safetensors with a trusted tool")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {first}")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            kind = (f.metadata() or {}).get("format")
        tensors = None if kind in NOT_WEIGHTS else load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {err}")
    if tensors is None:
        raise CheckpointError(f"{path}: {NOT_WEIGHTS[kind]}")
    return tensors
