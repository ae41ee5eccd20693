"""Small helpers shared across the package: config-driven construction and atomic file writes."""
from __future__ import annotations

import glob
import importlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from ldm.errors import UserError


def get_obj_from_str(path: str):
    """Import `package.module.Name` and return `Name`."""
    module, _, name = path.rpartition(".")
    if not module:
        raise UserError(f"target {path!r} is not a dotted path such as 'ldm.models.autoencoder.AutoencoderKL'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"config target {path!r} cannot be imported: {err}") from err


def instantiate_from_config(config, **extra):
    """Build `config.target(**config.params, **extra)`; the LDM convention for YAML-built modules."""
    if "target" not in config:
        raise KeyError(f"config has no 'target' field (keys: {sorted(config.keys())})")
    params = dict(config.get("params", None) or {})
    params.update(extra)
    return get_obj_from_str(config["target"])(**params)


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | os.PathLike) -> Path:
    """`path` as given if it exists (or is absolute), else relative to the repository root, so that
    the files the project ships (e.g. data/captions.txt) are found from any working directory."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def count_params(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):   # left by a writer that was killed
            stale.unlink(missing_ok=True)
    except OSError as err:
        if err.filename in (None, tmp, Path(tmp)):   # name the file the user asked for, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except SafetensorError as err:
        # safetensors reports an operating-system failure (a full disk) as "... (os error N)", not an OSError
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fingerprint_tensors(tensors, samples_per_tensor: int = 4096) -> str:
    """A short, stable identity for a set of named tensors (a module's weights).

    Hashes every name, shape and dtype, and up to `samples_per_tensor` evenly spaced values
    of each tensor, so that fingerprinting a 1 B-parameter U-Net takes well under a second
    while any real change of checkpoint changes the result.
    """
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=8)
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel() > samples_per_tensor:
            idx = torch.arange(samples_per_tensor, device=flat.device) * (flat.numel() - 1) // (samples_per_tensor - 1)
            flat = flat[idx]
        # + 0.0 turns -0.0 into 0.0: the same weights, whatever arithmetic last wrote their zeros
        h.update((flat.to(device="cpu", dtype=torch.float64) + 0.0).numpy().tobytes())
    return h.hexdigest()


def to_device(tensor, device):
    """A host tensor on `device` without waiting for the device: on CUDA through pinned memory,
    asynchronously (a plain copy from pageable memory synchronises the stream)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
