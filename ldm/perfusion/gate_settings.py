"""Eq. 3's gate settings, beta and tau: their defaults, the value that carries them (checked once,
where they enter), and the setting a concept file may store as its recommendation."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ldm.errors import UserError

DEFAULT_BETA = {False: 0.7, True: 0.5}   # public defaults: local key-locking 0.6-0.75, global 0.4-0.6
DEFAULT_TAU = 0.15


FLOAT32_TINY = 1.2e-38   # the smallest normal float32: a tau below it becomes 0 in the edit


def per_concept(value, n: int, name: str, flag: str | None = None) -> tuple[float, ...]:
    """`name` ("beta" or "tau") for `n` concepts: one number for all, or one per concept; finite, and
    tau > 0 (and above float32's smallest number). A float, an int, a list, a NumPy number or array, or
    a tensor. Errors name `flag` (the command-line flag) when given, else `name`."""
    label = flag or name
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    elif hasattr(value, "tolist"):   # a NumPy number or array
        value = value.tolist()
    values = [value] if isinstance(value, (int, float)) else value
    if isinstance(value, (str, bytes, bool)) or not isinstance(values, Sequence) or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{label} must be a number or a list of numbers (one per concept), got {value!r}")
    values = [float(v) for v in values] * (n if len(values) == 1 else 1)
    if len(values) != n:
        raise UserError(f"{label} has {len(values)} values for {n} concepts; give one value or one per concept")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{label} values must be finite numbers, got {values}")
    if name == "tau" and min(values) < FLOAT32_TINY:
        raise UserError(f"{label} must be > 0 (it divides the gate's input; at least {FLOAT32_TINY:g}, the smallest "
                        f"float32), got {values}")
    return tuple(values)


@dataclass(frozen=True)
class GateSettings:
    """beta and tau of N concepts, validated once (finite; tau > 0; one value or one per concept) and
    kept as Python numbers and as float32 tensors on the edit's device, so the edit reads them
    without a host-device synchronisation."""
    betas: tuple[float, ...]
    taus: tuple[float, ...]
    beta: torch.Tensor          # (N,)
    tau: torch.Tensor           # (N,)

    @classmethod
    def of(cls, betas, taus, n: int, device=None) -> "GateSettings":
        betas, taus = per_concept(betas, n, "beta"), per_concept(taus, n, "tau")
        return cls(betas, taus, torch.tensor(betas, device=device), torch.tensor(taus, device=device))

    def to(self, device) -> "GateSettings":
        return GateSettings(self.betas, self.taus, self.beta.to(device), self.tau.to(device))


RECOMMENDATION = "recommendation"   # key in the concept file's `extra` metadata


def check_writable(path: str | Path) -> Path:
    """The concept file a recommendation will be written into (a link's target), refused on one line
    when it cannot be written; checked before the work that chooses the recommendation."""
    import os

    from ldm.errors import MissingFileError

    target = Path(path).resolve()
    if not target.is_file():
        raise MissingFileError(f"{path}: no such concept file")
    if not os.access(target, os.W_OK) or not os.access(target.parent, os.W_OK):
        raise UserError(f"{path}: read-only; --write_recommendation needs to write it (make it writable, or "
                        "leave the flag out)")
    return target


def write_recommendation(path: str | Path, point: dict, rule: str) -> Path:
    """Store `point`'s beta and tau (and the rule that chose them) in the concept file's metadata: the file
    itself is replaced (atomically), keeping its mode; a symbolic link keeps pointing at it."""
    from dataclasses import replace

    from ldm.perfusion.concepts import load_concept, save_concept

    target = check_writable(path)
    mode = target.stat().st_mode & 0o7777
    concept = load_concept(target)
    entry = {"beta": point["beta"], "tau": point["tau"], "rule": rule}
    saved = save_concept(target, replace(concept, extra={**concept.extra, RECOMMENDATION: json.dumps(entry)}))
    saved.chmod(mode)
    return saved


def recommended_gates(concept, name: str = "the concept") -> dict | None:
    """{"beta", "tau", "rule"} stored by `write_recommendation`, or None; `name` (its file) names it in errors."""
    text = concept.extra.get(RECOMMENDATION)
    if text is None:
        return None
    try:
        entry = json.loads(text)
        beta, tau = entry["beta"], entry["tau"]
        per_concept(beta, 1, "beta"), per_concept(tau, 1, "tau")
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{name}: its stored recommendation {text!r} is not {{\"beta\": a number, \"tau\": a number > 0}}; "
                        "store a new one with scripts/evaluate_concept.py --write_recommendation") from None
    return {"beta": float(beta), "tau": float(tau), "rule": str(entry.get("rule", ""))}


def choose_gates(concepts: Sequence, betas: Sequence[float] | None, taus: Sequence[float] | None,
                 global_locking: bool = False, names: Sequence[str] | None = None
                 ) -> tuple[list[float], list[float], list[dict]]:
    """beta/tau not given (None) come from each concept's stored recommendation (measured with
    local key-locking, so not used with global locking), else the defaults. Returns the betas,
    the taus and, per concept, where each came from ("given", "recommendation" or "default")."""
    out_betas, out_taus, origins = [], [], []
    for n, concept in enumerate(concepts):
        stored = None if global_locking else recommended_gates(concept, names[n] if names else f"concept {n + 1}")
        fallback = stored or {"beta": DEFAULT_BETA[global_locking], "tau": DEFAULT_TAU}
        origin = {k: "given" if given else "recommendation" if stored else "default"
                  for k, given in (("beta", betas), ("tau", taus))}
        out_betas.append(betas[n] if betas else fallback["beta"])
        out_taus.append(taus[n] if taus else fallback["tau"])
        origins.append(origin)
    return out_betas, out_taus, origins
