"""One evaluation path for every judge: render prompts with concepts loaded at given gates, sweep
beta and tau, and pick the recommended setting. `scripts/evaluate_concept.py` judges with CLIP and
DINO, the toy benchmark with its scorer; both render and choose through these functions.

Image (prompt p, seed s) always starts from the noise of seed s alone, so neither the batch size
nor the other prompts of a run change it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ldm.errors import UserError

MAX_SWEEP = 1000
DEFAULT_FRACTION = 0.95   # the recommended setting keeps this share of the baseline's alignment


@dataclass(frozen=True)
class Sampling:
    steps: int = 50
    scale: float = 6.0
    sampler: str = "ddim"
    height: int = 512
    width: int = 512
    batch: int = 8
    progress: bool = False


def render(model, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling) -> torch.Tensor:
    """Images (len(prompts) * len(seeds), 3, H, W) in [0, 1], prompt-major: prompt p, seed s at p * len(seeds) + s."""
    from tqdm import tqdm

    from ldm.models.diffusion.guidance import initial_noise, make_generator
    from ldm.sample import generate, latent_shape

    items = [(p, s) for p in prompts for s in seeds]
    shape = latent_shape(model, 1, sampling.height, sampling.width)
    out = []
    chunks = range(0, len(items), sampling.batch)
    for i in tqdm(chunks, desc="sampling", unit="batch", disable=not sampling.progress, leave=False):
        chunk = items[i:i + sampling.batch]
        x_T = torch.cat([initial_noise(shape, model.device, make_generator(s, model.device)) for _, s in chunk])
        out.append(generate(model, [p for p, _ in chunk], sampler=sampling.sampler, steps=sampling.steps,
                            scale=sampling.scale, height=sampling.height, width=sampling.width, x_T=x_T, seed=None))
    return torch.cat(out)


@contextmanager
def concepts_loaded(model, concepts: Sequence, betas, taus, **options) -> Iterator:
    """`load_concepts` for the block, the base model again after it."""
    from ldm.perfusion.inference import load_concepts, unload_concepts

    loaded = load_concepts(model, list(concepts), betas, taus, **options)
    try:
        yield loaded
    finally:
        unload_concepts(model)


def render_concepts(model, concepts: Sequence, templates: Sequence[str], seeds: Sequence[int], sampling: Sampling,
                    betas, taus, **options) -> torch.Tensor:
    """Render `templates` ('{}' or '{1}', '{2}', ... name the concepts) with the concepts loaded."""
    from ldm.perfusion.prompts import prepare_prompt

    with concepts_loaded(model, concepts, betas, taus, **options) as loaded:
        tokenizer = model.cond_stage_model.tokenizer
        return render(model, [prepare_prompt(tokenizer, t, loaded) for t in templates], seeds, sampling)


def sweep(settings: Sequence[tuple[float, float]], measure: Callable[[float, float], dict]) -> list[dict]:
    """One point per (beta, tau): {"beta", "tau", **measure(beta, tau)}."""
    return [{"beta": beta, "tau": tau, **measure(beta, tau)} for beta, tau in settings]


def recommend(points: Sequence[dict], baseline_alignment: float, fraction: float = DEFAULT_FRACTION,
              fidelity: str = "fidelity", alignment: str = "alignment") -> dict | None:
    """The point with the highest fidelity whose alignment is at least `fraction` of the baseline's
    (ties: the higher alignment, then the higher beta); None when no point keeps that alignment."""
    if not 0 < fraction <= 1:
        raise UserError(f"the alignment fraction must be in (0, 1], got {fraction!r}")
    kept = [p for p in points if p[alignment] >= fraction * baseline_alignment]
    return max(kept, key=lambda p: (p[fidelity], p[alignment], p["beta"]), default=None)


def parse_sweep(text: str, flag: str = "--beta_sweep") -> list[float]:
    """'START:STOP:COUNT' -> COUNT evenly spaced values."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise UserError(f"{flag} {text!r} must be START:STOP:COUNT, e.g. 0.3:0.9:7") from None
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise UserError(f"{flag} {text!r}: START and STOP must be finite numbers")
    if not 2 <= count <= MAX_SWEEP:
        raise UserError(f"{flag} {text!r}: COUNT must be from 2 to {MAX_SWEEP} (each value renders every image "
                        "again); sweep in parts for more")
    return [round(v, 6) for v in torch.linspace(start, stop, count, dtype=torch.float64).tolist()]
