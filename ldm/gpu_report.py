"""The GPU report (`python scripts/benchmark.py gpu-report`): Perfusion's training step and sampling on
SD 1.5-, SD 2.1 (768, v)- and SDXL-shaped models with random weights (nothing to download), in fp16 and
bf16 autocast with gradient checkpointing, as a markdown table.

Per model and precision: the median training step (batch 1, latents cached, as in a fit) and its peak
memory, 400 such steps (the median times 400: an estimate, not a run), and 50 DDIM steps of one image
with guidance, without concepts and with two. Weights stay float32 (Lightning's 16-mixed and bf16-mixed
keep them so); the gated edit runs in float32 whatever the precision.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.util import REPO_ROOT

# covariance from 200 of data/captions.txt (random encoders: only its cost and shape matter here)
OVERRIDES = ["model.params.covariance_path=null", "model.params.covariance_max_captions=200"]


@dataclass(frozen=True)
class Spec:
    name: str
    configs: tuple[str, ...]
    side: int


MODELS = {
    "sd15": Spec("SD 1.5", ("configs/perfusion_teddy.yaml",), 512),
    "sd21": Spec("SD 2.1 (768, v)", ("configs/stable-diffusion/v2-inference-v.yaml", "configs/perfusion/sd.yaml"), 768),
    "sdxl": Spec("SDXL", ("configs/perfusion_teddy_sdxl.yaml",), 1024),
    # the CPU's stand-ins, to try the command without a GPU
    "tiny": Spec("tiny SD 1.x", ("configs/tiny/perfusion-tiny.yaml",), 32),
    "tiny-sdxl": Spec("tiny SDXL", ("configs/tiny/perfusion-sdxl-tiny.yaml",), 32),
}


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _build(spec: Spec, device: torch.device):
    from ldm.build import load_config, randomize_zero_weights
    from ldm.util import instantiate_from_config

    config = load_config([REPO_ROOT / c for c in spec.configs], OVERRIDES)
    config.model.params.unet_config.params.use_checkpoint = True
    torch.manual_seed(0)
    with device:   # random weights made where they run (SDXL's 2.6 B in seconds, not minutes on the CPU)
        model = instantiate_from_config(config.model)
    randomize_zero_weights(model)
    model.train().on_fit_start()
    return model


def _batch(model, side: int, device: torch.device) -> dict:
    from ldm.data.templates import fill

    g = torch.Generator().manual_seed(0)
    template = "a photo of a {}"
    return {"image": (torch.rand(1, 3, side, side, generator=g) * 2 - 1).to(device),
            "mask": torch.rand(1, 1, side, side, generator=g).to(device), "key": ["0"],
            "caption": [fill(template, model.placeholder)], "caption_super": [fill(template, model.superclass)]}


def train_steps(model, batch: dict, dtype: torch.dtype, repeats: int) -> tuple[float, float | None]:
    """(median seconds of a training step, peak GiB) under autocast to `dtype`; fp16 with a GradScaler."""
    device = model.device
    opt = model.configure_optimizers()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(repeats + 2):   # two untimed: the first step sets the concept up, the second warms kernels
        _synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = model.shared_step(batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        model.on_before_optimizer_step(opt)
        scaler.step(opt)
        scaler.update()
        _synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), _peak_gib(device)


def sampling_seconds(model, side: int, precision: str, concepts: bool, steps: int) -> float:
    """Seconds of `steps` DDIM steps (guidance 6) of one image, with two concepts loaded or none."""
    from ldm.perfusion.inference import load_concepts, unload_concepts
    from ldm.perfusion.prompts import prepare_prompt
    from ldm.sample import generate

    model.eval()
    prompt = "a photo of a teddy on the beach"
    if concepts:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            # the concept being trained, and a copy with another i* (two concepts must differ): at sampling
            # they cost what two trained concepts do
            files = [model.save_concept(Path(tmp) / "a.safetensors")]
            i_star = model.i_star.clone()
            model.i_star.add_(torch.randn_like(i_star) * i_star.norm() * 0.1)
            files.append(model.save_concept(Path(tmp) / "b.safetensors"))
            model.i_star.copy_(i_star)
            loaded = load_concepts(model, files, 0.7, 0.15)
        prompt = prepare_prompt(model.cond_stage_model.tokenizer, "a photo of a {1} and a {2} on the beach", loaded)
    settings = dict(steps=steps, scale=6.0, height=side, width=side, seed=0, precision=precision)
    generate(model, [prompt], **dict(settings, steps=2))   # warm-up
    _synchronize(model.device)
    t0 = time.perf_counter()
    generate(model, [prompt], **settings)
    _synchronize(model.device)
    elapsed = time.perf_counter() - t0
    if concepts:
        unload_concepts(model)
    model.train()
    return elapsed


def report(models: list[str], device: torch.device, precisions: list[str], repeats: int = 5,
           sample_steps: int = 50, log=print) -> str:
    """The markdown table of `models` (keys of MODELS) on `device`."""
    from ldm.sample import PRECISIONS

    rows = []
    for key in models:
        spec = MODELS[key]
        model = _build(spec, device)
        batch = _batch(model, spec.side, device)
        for precision in precisions:
            step, peak = train_steps(model, batch, PRECISIONS[precision], repeats)
            plain = sampling_seconds(model, spec.side, precision, False, sample_steps)
            two = sampling_seconds(model, spec.side, precision, True, sample_steps)
            row = [spec.name, f"{spec.side} px", precision, f"{step * 1e3:.0f} ms",
                   "n/a (CPU)" if peak is None else f"{peak:.1f} GiB", f"{step * 400 / 60:.1f} min",
                   f"{plain:.2f} s", f"{two:.2f} s ({two / plain:.2f}x)"]
            log(" | ".join(row))
            rows.append(row)
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = ["model", "size", "precision", "training step (batch 1)", "peak memory", "400 steps (estimate)",
            f"sampling, {sample_steps} DDIM steps", "with two concepts"]
    lines = [f"Device: {name}; torch {torch.__version__}; random weights, gradient checkpointing, "
             f"median of {repeats} steps.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
