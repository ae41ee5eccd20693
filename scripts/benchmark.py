"""Measurements quoted in the README; rerun them on your machine.

    python scripts/benchmark.py concept-size --config configs/perfusion_teddy.yaml --out /tmp/concept.safetensors
    python scripts/benchmark.py train-step   --config configs/tiny/perfusion-tiny.yaml
    python scripts/benchmark.py train-memory --config configs/perfusion_teddy.yaml model.params.covariance_path=null
    python scripts/benchmark.py sample       --config configs/tiny/perfusion-tiny.yaml [--concepts 2]
    python scripts/benchmark.py ema          --config configs/toy/ldm.yaml
    python scripts/benchmark.py eval-overhead --config configs/tiny/perfusion-tiny.yaml
    python scripts/benchmark.py gpu-report   [--models sd15,sd21,sdxl] --out gpu-report.md   (CUDA; 8 min on an H100)

Timings are ratios of two variants measured alternately in one process (these machines are
noisy); each figure is the median over --repeats rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.build import build_model, load_config
from ldm.cli import run_cli
from ldm.data.templates import TEMPLATES, fill
from ldm.util import count_params, instantiate_from_config


def _prompts(model, n):
    templates = [TEMPLATES[i % len(TEMPLATES)] for i in range(n)]
    return [fill(t, model.placeholder) for t in templates], [fill(t, model.superclass) for t in templates]


def concept_size(args) -> int:
    """Build the config's model with random weights, initialise a concept from one batch, save it."""
    config = load_config([args.config], args.overrides)
    config.model.params.covariance_path = None
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = instantiate_from_config(config.model).eval()
    built = time.perf_counter() - t0
    captions, supers = _prompts(model, 4)
    with torch.no_grad():
        model.update_targets(captions, supers)
    path = model.save_concept(args.out)
    trainable = count_params(model, trainable_only=True)
    size = path.stat().st_size
    print(f"model: {args.config} (random weights, built in {built:.1f} s); "
          f"cross-attention layers: {len(model.o_star_v)}")
    print(f"trainable parameters: {trainable} (embedding {model.embedding.numel()}, "
          f"o*_V {sum(p.numel() for p in model.o_star_v)})")
    print(f"concept file: {path} {size} bytes ({size / 1024:.1f} KiB)")
    return 0


def _time(fn, warmup: int = 1) -> float:
    """Seconds of one call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _batch(model, n, side):
    g = torch.Generator().manual_seed(0)
    captions, supers = _prompts(model, n)
    return {
        "image": torch.rand(n, 3, side, side, generator=g) * 2 - 1,
        "mask": torch.rand(n, 1, side, side, generator=g),
        "caption": captions,
        "caption_super": supers,
    }


def train_step(args) -> int:
    """Perfusion step (latents cached, as in a fit) vs (a) the same step with the edit off, (b) the frozen
    base model's step (edit off and no targets: the same embedding trained through the unedited model, the
    physical limit), (c) plain LatentDiffusion fine-tuning and (d) the step encoding its images every step."""
    config = load_config([args.config], args.overrides)
    perfusion = build_model(config, seed=0).train()
    side = perfusion.image_size * perfusion.first_stage_model.downsample_factor
    batch = _batch(perfusion, args.batch_size, side)
    perfusion.on_fit_start()   # what a Trainer calls: the covariance, the run's host-side state
    opt_p = perfusion.configure_optimizers()

    def step(model, opt, cached=True, edit=True, targets=True):
        def run():
            model.cache_latents = cached
            with _EditOff(model, targets) if not edit else nullcontext():
                torch.manual_seed(0)
                loss = model.shared_step(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run

    variants = {"perfusion": step(perfusion, opt_p), "edit_off": step(perfusion, opt_p, edit=False),
                "frozen_base": step(perfusion, opt_p, edit=False, targets=False),
                "uncached": step(perfusion, opt_p, cached=False)}
    if args.plain:   # a second model, whose whole U-Net trains (on SD: many GB of optimizer state)
        plain = build_model(_base_config(config), seed=0).train()
        variants["plain"] = step(plain, plain.configure_optimizers())
    times = {k: [] for k in variants}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):   # alternate the order
            times[name].append(_time(variants[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"config: {args.config}, {side} px, batch {args.batch_size}, {args.repeats} rounds, device cpu, "
          f"{torch.get_num_threads()} threads")
    print("median step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
    print(f"ratio perfusion / edit switched off      = {med['perfusion'] / med['edit_off']:.3f} "
          f"(fastest rounds: {low['perfusion'] / low['edit_off']:.3f})")
    print(f"ratio perfusion / frozen base model step = {med['perfusion'] / med['frozen_base']:.3f} "
          f"(fastest rounds: {low['perfusion'] / low['frozen_base']:.3f}; edit off, no targets: the embedding "
          "through the unedited model)")
    if args.plain:
        print(f"ratio perfusion / plain LatentDiffusion  = {med['perfusion'] / med['plain']:.3f} (whole U-Net trained)")
    print(f"ratio perfusion / before latent caching  = {med['perfusion'] / med['uncached']:.3f}")
    print(f"peak memory: {_peak_memory()}")
    return 0


def train_memory(args) -> int:
    """Peak memory of Perfusion training steps alone (the frozen model, its activations, the concept's
    optimizer state), with the config's gradient checkpointing; on the CPU the process's peak RSS."""
    config = load_config([args.config], args.overrides)
    model = build_model(config, seed=0).train()
    model.ensure_covariance()
    built = _peak_memory()
    side = model.image_size * model.first_stage_model.downsample_factor
    batch, opt = _batch(model, args.batch_size, side), model.configure_optimizers()
    for _ in range(args.steps):
        loss = model.shared_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    checkpointing = OmegaConf.select(config, "model.params.unet_config.params.use_checkpoint", default=False)
    print(f"config: {args.config}, {side} px, batch {args.batch_size}, {args.steps} steps, "
          f"gradient checkpointing {'on' if checkpointing else 'off'}")
    print(f"peak memory after building: {built}; after the training steps: {_peak_memory()}")
    return 0


def _base_config(config):
    """The plain LatentDiffusion (SDXL: SDXLLatentDiffusion) of a Perfusion config: same networks, no
    concept machinery."""
    from ldm.perfusion.model import PerfusionLatentDiffusion
    from ldm.util import get_obj_from_str

    base = next(c for c in get_obj_from_str(config.model.target).__mro__ if not issubclass(c, PerfusionLatentDiffusion))
    base_config = config.copy()
    base_config.model.target = f"{base.__module__}.{base.__qualname__}"
    base_config.model.params = {k: v for k, v in config.model.params.items()
                                if k in ("unet_config", "first_stage_config", "cond_stage_config", "timesteps",
                                         "linear_start", "linear_end", "parameterization", "scale_factor",
                                         "image_size", "channels")}
    return base_config


def sample(args) -> int:
    """Perfusion sampling with --concepts concepts vs the base model's: same weights, prompt, seed and steps.

    Also with the per-prompt cache of the edited keys/values switched off (recomputed every step).
    """
    import tempfile

    from ldm.perfusion.inference import load_concepts
    from ldm.perfusion.prompts import format_prompt
    from ldm.sample import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config([args.config], args.overrides)
    perfusion = build_model(config, seed=0)
    base = build_model(_base_config(config), seed=0)
    skip = set(perfusion.non_base_keys())
    base.load_state_dict({k: v for k, v in perfusion.state_dict().items() if k not in skip})
    perfusion.ensure_covariance()
    side = perfusion.image_size * perfusion.first_stage_model.downsample_factor
    settings = dict(steps=args.steps, scale=args.scale, height=side, width=side, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k in range(args.concepts):
            # a concept initialised from one batch (its own templates): at sampling it costs what a trained one does
            templates = [TEMPLATES[(4 * k + i) % len(TEMPLATES)] for i in range(4)]
            captions = [fill(t, perfusion.placeholder) for t in templates]
            supers = [fill(t, perfusion.superclass) for t in templates]
            perfusion.initialized.fill_(False)
            with torch.no_grad():
                perfusion.update_targets(captions, supers)
            files.append(perfusion.save_concept(Path(tmp) / f"concept{k}.safetensors"))
        loaded = load_concepts(perfusion, files, 0.7, 0.15)
    names = " and ".join(f"a {{{k + 1}}}" for k in range(args.concepts))
    prompts = [format_prompt(f"a photo of {names} on the beach", loaded.tokens)] * args.batch_size

    def timed(model, cache=True):
        perfusion.bank.cache = cache
        t0 = time.perf_counter()
        images = generate(model, prompts, **settings)
        elapsed = time.perf_counter() - t0
        perfusion.bank.cache = True
        return elapsed, images

    _, base_images = timed(base)
    _, concept_images = timed(perfusion)
    _, uncached_images = timed(perfusion, cache=False)
    variants = {"base": (base, True), "perfusion": (perfusion, True), "uncached": (perfusion, False)}
    times = {k: [] for k in variants}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):   # alternate the order
            times[name].append(timed(*variants[name])[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"config: {args.config}, {args.batch_size} images of {side}x{side}, DDIM {args.steps} steps, guidance "
          f"{args.scale}, {args.repeats} rounds, device cpu, {torch.get_num_threads()} threads")
    print(f"base model: {med['base']:.3f} s; Perfusion, {args.concepts} concept(s): {med['perfusion']:.3f} s; "
          f"Perfusion without the per-prompt cache: {med['uncached']:.3f} s")
    low = {k: min(v) for k, v in times.items()}
    print(f"ratio Perfusion / base = {med['perfusion'] / med['base']:.3f} (medians; fastest rounds: "
          f"{low['perfusion'] / low['base']:.3f})")
    print(f"ratio Perfusion without cache / base = {med['uncached'] / med['base']:.3f} (fastest rounds: "
          f"{low['uncached'] / low['base']:.3f})")
    print(f"cached == uncached images: {torch.equal(concept_images, uncached_images)}; "
          f"concept changes the images: {not torch.equal(concept_images, base_images)}")
    return 0


class _EditOff:
    """Within the block, the cross-attention projections run unedited (bank inactive); with
    `targets=False` the targets' EMA is not updated either."""

    def __init__(self, model, targets: bool = True):
        self.model, self.targets = model, targets

    def __enter__(self):
        self.model.activate_training_concept = self.model.bank.clear
        if not self.targets:
            self.model.update_targets = lambda *args, **kwargs: None
        self.model.bank.clear()

    def __exit__(self, *exc):
        for name in ("activate_training_concept", "update_targets"):
            self.model.__dict__.pop(name, None)   # the class's methods again


def ema(args) -> int:
    """One EMA update of a model's weights: per tensor (Lightning's EMAWeightAveraging) against one
    foreach lerp over all tensors (ldm.callbacks.EMA), and the largest difference between the two."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

    config = load_config([args.config], args.overrides)
    model = instantiate_from_config(config.model)
    decay = 0.999
    per_tensor = AveragedModel(model, avg_fn=get_ema_avg_fn(decay))
    foreach = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    times = {"per_tensor": [], "foreach": []}
    for _ in range(args.repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)   # a training step's change
        times["per_tensor"].append(_time(lambda: per_tensor.update_parameters(model), warmup=0))
        times["foreach"].append(_time(lambda: foreach.update_parameters(model), warmup=0))
    diff = max((a - b).abs().max().item() for a, b in zip(per_tensor.parameters(), foreach.parameters()))
    t = {k: statistics.median(v[1:]) for k, v in times.items()}   # the first update only copies
    print(f"{count_params(model) / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors, "
          f"{torch.get_num_threads()} threads: per-tensor EMA update {t['per_tensor'] * 1e3:.1f} ms, foreach "
          f"{t['foreach'] * 1e3:.1f} ms, ratio {t['per_tensor'] / t['foreach']:.1f}x; largest difference {diff:.1e}")
    return 0


def eval_overhead(args) -> int:
    """scripts/evaluate_concept.py's metric time against its sampling time, on the config's model
    (random weights, a concept initialised from one batch) with tiny random CLIP and DINO models."""
    import tempfile

    from ldm.evaluation.concept_eval import Judge, evaluate
    from ldm.evaluation.harness import Sampling
    from ldm.evaluation.metrics import ClipMetric, DinoMetric
    from ldm.evaluation.tiny import write_tiny_metric_models
    from ldm.perfusion.concepts import load_concept
    from ldm.perfusion.inference import read_prompt_file

    config = load_config([args.config], args.overrides)
    model = build_model(config, seed=0)
    model.ensure_covariance()
    side = model.image_size * model.first_stage_model.downsample_factor
    captions, supers = _prompts(model, 4)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.update_targets(captions, supers)
        concept = load_concept(model.save_concept(Path(tmp) / "concept.safetensors"))
        clip_config, clip_ckpt, dino = write_tiny_metric_models(tmp)
        judge = Judge(ClipMetric(str(clip_config), clip_ckpt), DinoMetric(dino))
    references = [torch.rand(3, side, side, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    templates = read_prompt_file(Path(__file__).resolve().parents[1] / "data/prompts/dreambooth-object.txt",
                                 "prompts")[:args.prompts]
    sampling = Sampling(args.steps, 6.0, "ddim", side, side, batch=8)
    results = evaluate(model, [concept], ["concept"], [references], templates, judge, list(range(args.seeds)),
                       sampling, [(0.7, 0.15)], log=lambda m: None)
    t = results["timing"]
    print(f"{len(templates)} prompts x {args.seeds} seeds, {args.steps} sampling steps, concept and superclass rows: "
          f"sampling {t['sampling_s']:.2f} s, metrics {t['metrics_s']:.2f} s; metrics / sampling = "
          f"{t['metrics_over_sampling']:.3f}")
    return 0


def gpu_report(args) -> int:
    """ldm/gpu_report.py's table for --models on --device (default: CUDA; the CPU only with tiny models)."""
    from ldm import gpu_report as report
    from ldm.cli import parse_device
    from ldm.errors import UserError
    from ldm.util import atomic_path

    device = parse_device(args.device)
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in report.MODELS]
    if unknown:
        raise UserError(f"--models: unknown {unknown[0]!r}; choose from {', '.join(report.MODELS)}")
    if device.type != "cuda" and any(not m.startswith("tiny") for m in models):
        raise UserError(f"gpu-report measures SD-sized models on a CUDA GPU; this machine has {device.type} "
                        "(--models tiny,tiny-sdxl --device cpu tries the command)")
    precisions = [p.strip() for p in args.precisions.split(",")]
    if not precisions or any(p not in ("fp16", "bf16") for p in precisions):
        raise UserError(f"--precisions must list fp16 and/or bf16, got {args.precisions!r}")
    table = report.report(models, device, precisions, args.repeats, args.sample_steps)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(table)
    print(table)
    print(f"written: {args.out}")
    return 0


def _peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA, all variants so far)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process RSS, all variants so far)"


def _at_least(least: int):
    """An argparse type: a whole number >= `least` (rounds for a median, images in a batch, threads)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("concept-size", help="size of a concept file for a model config")
    s.add_argument("--config", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=concept_size)
    s = sub.add_parser("train-step", help="time of a Perfusion training step relative to plain fine-tuning")
    s.add_argument("--config", required=True)
    s.add_argument("--batch_size", type=_at_least(1), default=4)
    s.add_argument("--repeats", type=_at_least(1), default=7)
    s.add_argument("--no_plain", dest="plain", action="store_false",
                   help="leave out plain LatentDiffusion fine-tuning (a second model and its optimizer state)")
    s.set_defaults(func=train_step)
    s = sub.add_parser("train-memory", help="peak memory of Perfusion training steps")
    s.add_argument("--config", required=True)
    s.add_argument("--batch_size", type=_at_least(1), default=1)
    s.add_argument("--steps", type=_at_least(1), default=2)
    s.set_defaults(func=train_memory)
    s = sub.add_parser("sample", help="time of Perfusion sampling relative to the base model's")
    s.add_argument("--config", required=True)
    s.add_argument("--batch_size", type=_at_least(1), default=2)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--scale", type=float, default=6.0)
    s.add_argument("--repeats", type=_at_least(1), default=9)
    s.add_argument("--concepts", type=int, default=1, help="how many concepts are loaded (Appendix B, exact)")
    s.add_argument("--threads", type=_at_least(0), default=0, help="CPU threads (default: torch's); 1 is steadier on a busy machine")
    s.set_defaults(func=sample)
    s = sub.add_parser("gpu-report", help="training step, memory and sampling of SD 1.5 / 2.1 / XL on a GPU, as markdown")
    s.add_argument("--models", default="sd15,sd21,sdxl", help="comma-separated: sd15, sd21, sdxl (tiny, tiny-sdxl: "
                   "CPU stand-ins); default: %(default)s")
    s.add_argument("--precisions", default="fp16,bf16", help="autocast precisions (default: %(default)s)")
    s.add_argument("--device", default=None, help="default: cuda")
    s.add_argument("--repeats", type=_at_least(1), default=5, help="timed training steps per variant")
    s.add_argument("--sample_steps", type=_at_least(1), default=50)
    s.add_argument("--out", default="gpu-report.md", help="the markdown table (default: %(default)s)")
    s.set_defaults(func=gpu_report)
    s = sub.add_parser("ema", help="time of an EMA weight update, per tensor against foreach")
    s.add_argument("--config", required=True)
    s.add_argument("--repeats", type=_at_least(2), default=15, help="the first update only copies; the rest are timed")
    s.set_defaults(func=ema)
    s = sub.add_parser("eval-overhead", help="metric time of the concept evaluation relative to its sampling time")
    s.add_argument("--config", required=True)
    s.add_argument("--prompts", type=_at_least(1), default=8)
    s.add_argument("--seeds", type=_at_least(1), default=4)
    s.add_argument("--steps", type=_at_least(1), default=50)
    s.set_defaults(func=eval_overhead)
    for s in sub.choices.values():
        s.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
