"""What the app renders with: one model and its concepts, loaded once; every render re-dials beta and tau
on the loaded concepts (set_gates) and draws from the given seed, under one lock."""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ldm.errors import UserError
from ldm.perfusion.gates import GateTable, gate_tables, leaks


@dataclass(frozen=True)
class Defaults:
    """The page's starting values, from the model's config: its first validation prompt, the steps and
    guidance scale its training logs sample with, and its native image size."""
    template: str
    steps: int
    scale: float
    side: int
    sampler: str = "ddim"
    seed: int = 42


def default_template(templates: Sequence[str], n: int) -> str:
    """The first of the config's one-concept templates ("a photo of a {}"); with several concepts its `{}`
    names them all ("a photo of a {1} and a {2}"), a sentence both SD and the toy grammar read."""
    template = next((t for t in templates if t.count("{}") == 1), "a photo of a {}")
    return template if n == 1 else template.replace("{}", " and a ".join(f"{{{k + 1}}}" for k in range(n)))


def model_defaults(model, config_path: str | Path, n: int) -> Defaults:
    from ldm.build import load_config
    from ldm.perfusion.model import PerfusionLatentDiffusion

    params = load_config([config_path]).model.get("params", {})
    templates = params.get("validation_prompts") or \
        inspect.signature(PerfusionLatentDiffusion.__init__).parameters["validation_prompts"].default
    side = model.image_size * model.first_stage_model.downsample_factor
    return Defaults(default_template(list(templates), n), model.log_sample_steps, model.log_guidance_scale, side)


class Session:
    """The loaded model (`model`), its concepts (`loaded`, LoadedConcepts), where each concept's starting
    gates came from (`sources`, as choose_gates says) and the page's `defaults`."""

    def __init__(self, model, loaded, sources: list[dict], defaults: Defaults):
        self.model, self.loaded, self.sources, self.defaults = model, loaded, sources, defaults
        self.lock = threading.Lock()   # set_gates changes the one model every request shares

    @classmethod
    def open(cls, config: str | Path, paths: Sequence[str], ckpt: str | None = None, device: str = "cpu",
             multi: str = "named") -> "Session":
        """Build the model and load the concepts, each at its stored recommendation (else the defaults)."""
        from ldm.build import build_perfusion
        from ldm.perfusion.concepts import load_concept
        from ldm.perfusion.gate_settings import choose_gates
        from ldm.perfusion.inference import load_concepts

        concepts = [load_concept(p) for p in paths]
        betas, taus, sources = choose_gates(concepts, None, None, False, list(paths))
        model, _, _ = build_perfusion(config, ckpt, device=device)
        loaded = load_concepts(model, concepts, betas, taus, multi=multi, names=list(paths))
        return cls(model, loaded, sources, model_defaults(model, config, len(paths)))

    def render(self, template: str, betas: Sequence[float], taus: Sequence[float], sampler: str = "ddim",
               steps: int = 20, scale: float = 6.0, seed: int = 42, height: int | None = None,
               width: int | None = None) -> tuple[np.ndarray, GateTable | None]:
        """One image (H x W x 3, uint8) of `template` at these gates, and its gate table (None for
        textual-inversion concepts, which have no gate)."""
        from ldm.perfusion.inference import set_gates
        from ldm.perfusion.prompts import prepare_prompt
        from ldm.sample import generate
        from ldm.sampling_cli import MAX_PIXELS

        height, width = int(height or self.defaults.side), int(width or self.defaults.side)
        if height * width > MAX_PIXELS:
            raise UserError(f"{height} x {width} is over {MAX_PIXELS:,} pixels")
        if not 0 <= int(seed) < 2**63:
            raise UserError(f"seed must be a whole number in [0, 2^63), got {seed}")
        with self.lock:
            prompt = prepare_prompt(self.model.cond_stage_model.tokenizer, template, self.loaded)
            set_gates(self.model, self.loaded, list(betas), list(taus))
            images = generate(self.model, [prompt], "", sampler, int(steps), float(scale), 0.0, height, width,
                              int(seed))
            table = gate_tables(self.model, [prompt])[0] if self.model.bank.active else None
        return (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), table


def gate_rows(table: GateTable, threshold: float = 0.5) -> tuple[list[str], list[list]]:
    """The gate table as the page shows it: position, token, sim and gate per concept (3 decimals) and a
    note naming the concept a token belongs to or leaks into; padding only where a gate opens."""
    n = len(table.sim[0])
    leaked = {(t, c) for t, _, c, _, _ in leaks(table, threshold)}
    headers = ["pos", "token", *[f"{kind} {{{c + 1}}}" for c in range(n) for kind in ("sim", "gate")], "note"]
    rows = []
    for t, label in enumerate(table.tokens):
        note = ", ".join([f"{{{c + 1}}}" for c in range(n) if table.own[t][c]]
                         + [f"leak {{{c + 1}}}" for c in range(n) if (t, c) in leaked])
        if label == "<pad>" and not note:
            continue
        cells = [round(v, 3) for c in range(n) for v in (table.sim[t][c], table.gate[t][c])]
        rows.append([t, label, *cells, note])
    return headers, rows
