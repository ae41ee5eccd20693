"""Train a model described by YAML configs with PyTorch Lightning, counted in optimizer steps.

    python main.py --base configs/perfusion_teddy.yaml -t --gpus 0, [key=value ...]
    python main.py --resume logs/2024-01-01T10-00-00_perfusion_teddy -t [lightning.trainer.max_steps=600]

A run writes `<logdir>/<timestamp>_<name>/`: `configs/` (the merged config of each launch:
`001_<timestamp>-config.yaml`, then `002_...` for a resume), `concepts/` (concept files),
`checkpoints/last.ckpt` (resume state: learned weights, optimizer, step), `images/` and
`tensorboard/`. Without -t/--train the configs, data, model and trainer settings are only checked
and nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from ldm.build import ConfigError
from ldm.cli import USER_ERRNOS, exception_chain
from ldm.errors import MissingFileError, UserError

RUN_DIR_ENV = "LDM_RUN_DIR"  # passed by the launching process to the DDP processes Lightning starts
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "1", "y", "t"}, {"false", "no", "0", "n", "f"}
OWN_TRAINER_KEYS = ("callbacks", "logger", "plugins", "default_root_dir", "use_distributed_sampler",
                    "enable_checkpointing")
CALLBACK_KEYS = ("concept_checkpoint", "checkpoint", "image_logger", "ema")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing key=value arguments override any config field (OmegaConf dot-list), e.g. "
               "lightning.trainer.max_steps=400 model.ckpt=ckpt/v1-5-pruned.ckpt data.params.data_root=my_cat")
    parser.add_argument("-b", "--base", nargs="+", default=[], metavar="YAML",
                        help="config files, merged left to right")
    parser.add_argument("-t", "--train", action="store_true", help="train (otherwise only check the setup)")
    parser.add_argument("-n", "--name", default="", help="run name, the suffix of the run directory "
                                                          "(default: the last config's file name)")
    parser.add_argument("-l", "--logdir", default="logs", help="parent folder of run directories")
    parser.add_argument("-s", "--seed", type=int, default=None,
                        help="global seed (default: lightning.seed of the config, else 23)")
    parser.add_argument("-r", "--resume", default=None, metavar="RUN_DIR|CKPT",
                        help="continue a run: its directory (uses checkpoints/last.ckpt) or a .ckpt inside it")
    parser.add_argument("--gpus", default=None, help='GPU ids as in the original repo: "0," or "0,1"')
    parser.add_argument("--devices", default=None, help='number of devices, ids "0,1", or "auto"')
    parser.add_argument("--accelerator", default=None, help="cpu, gpu, cuda, mps or auto (default: auto)")
    parser.add_argument("--precision", default=None, help="32, 16-mixed, bf16-mixed, ...")
    parser.add_argument("--strategy", default=None,
                        help="auto (Lightning picks ddp for several devices), ddp, ...")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(_normalize_train_flag(argv if argv is not None else sys.argv[1:]))
    # `--base a.yaml key=value`: nargs="+" also swallows the overrides that follow it.
    moved = [item for item in args.base if "=" in item and not Path(item).is_file()]
    args.base = [item for item in args.base if item not in moved]
    args.overrides = moved + args.overrides
    return args


def _normalize_train_flag(argv: list[str]) -> list[str]:
    """Accept the original repo's `-t True` / `--train False` as well as the bare flag."""
    out, skip = [], False
    for i, item in enumerate(argv):
        if skip:
            skip = False
            continue
        word = argv[i + 1].lower() if i + 1 < len(argv) else ""
        if item in ("-t", "--train") and word in TRUE_WORDS | FALSE_WORDS:
            skip = True
            if word in FALSE_WORDS:
                continue
        out.append(item)
    return out


# ----------------------------------------------------------------------------- run directory
def resolve_resume(path: str) -> tuple[Path, Path, list[Path]]:
    """(run dir, checkpoint, the run's latest saved config) for `--resume`."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"--resume {path}: no such run directory or checkpoint")
    if path.is_dir():
        run_dir, ckpt = path, path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise MissingFileError(f"--resume {path}: {ckpt} not found (the run saved no checkpoint yet)")
    else:
        if path.parent.name != "checkpoints":
            raise UserError(f"--resume {path}: expected a checkpoint inside a run's checkpoints/ folder")
        run_dir, ckpt = path.parent.parent, path
    configs = sorted((run_dir / "configs").glob("*-config.yaml"))
    if not configs:
        raise MissingFileError(f"--resume {path}: {run_dir / 'configs'} holds no saved *-config.yaml")
    check_resume_checkpoint(ckpt)
    return run_dir, ckpt, [configs[-1]]


def check_resume_checkpoint(ckpt: Path) -> None:
    """Refuse a checkpoint that cannot be resumed from (empty, cut short, or asking to run code) before
    anything is written to the run."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:   # noqa: BLE001 - every reason it cannot be read is the same user error
        raise UserError(f"--resume: {ckpt} cannot be read as a resume checkpoint ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from err
    if not isinstance(state, dict) or "state_dict" not in state or "global_step" not in state:
        raise UserError(f"--resume: {ckpt} is not a checkpoint written by this training (no state_dict / global_step)")


# Settings a resumed run must keep: the concept file would otherwise name what it did not start from.
FIXED_ON_RESUME = ("model.target", "model.params.placeholder", "model.params.superclass", "model.params.method")


def check_resume_overrides(saved, config) -> None:
    for key in FIXED_ON_RESUME:
        before, after = OmegaConf.select(saved, key), OmegaConf.select(config, key)
        if before != after:
            raise ConfigError(f"--resume: {key} was {before!r} in the run, got {after!r}; a resumed run keeps it "
                              "(start a new run instead)")


MAX_NAME = 120   # with the time prefix and a counter, under the 255 bytes a file name may have


def check_run_name(name: str) -> str:
    """--name is the run folder's suffix: one plain name, not a path."""
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"--name {name!r}: a plain name for the run folder, without '/' or '\\' "
                          "(runs go under --logdir)")
    if len(name.encode()) > MAX_NAME:
        raise ConfigError(f"--name is {len(name.encode())} bytes; at most {MAX_NAME} fit a folder name with the time")
    return name


def new_run_dir(logdir: str, name: str, now: str, create: bool) -> Path:
    """`<logdir>/<now>_<name>`, with `_1`, `_2`, ... when taken. With `create` the folder is made here,
    exclusively: two runs started in the same second never share one."""
    base = Path(logdir) / f"{now}_{name}"
    if create:
        base.parent.mkdir(parents=True, exist_ok=True)
    run_dir, n = base, 1
    while True:
        try:
            if create:
                run_dir.mkdir()   # exclusive: fails if another run made it first
                return run_dir
            if not run_dir.exists():
                return run_dir
        except FileExistsError:
            pass
        run_dir, n = Path(f"{base}_{n}"), n + 1


# ----------------------------------------------------------------------------- trainer settings
def _parse_devices(value: str):
    value = value.strip()
    if value == "auto":
        return value
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        return int(value)
    except ValueError:
        raise ConfigError(f"--devices/--gpus {value!r}: expected a count (2), device ids (\"0,1\" or \"0,\") or auto")


def trainer_settings(config, args) -> dict:
    """`lightning.trainer` of the config with the command-line flags applied on top."""
    settings = OmegaConf.to_container(OmegaConf.select(config, "lightning.trainer") or OmegaConf.create({}), resolve=True)
    if not isinstance(settings, dict):
        raise ConfigError(f"lightning.trainer must be a section of Trainer settings, got {settings!r}")
    taken = [key for key in OWN_TRAINER_KEYS if key in settings]
    if taken:
        raise ConfigError(f"lightning.trainer.{taken[0]} is set by main.py and cannot be configured")
    if args.gpus is not None and args.devices is not None:
        raise ConfigError("give either --gpus or --devices, not both")
    if args.gpus is not None:
        if args.accelerator not in (None, "gpu", "cuda"):
            raise ConfigError(f"--gpus {args.gpus} conflicts with --accelerator {args.accelerator}")
        settings["accelerator"], settings["devices"] = "gpu", _parse_devices(args.gpus)
    if args.devices is not None:
        settings["devices"] = _parse_devices(args.devices)
    for key in ("accelerator", "precision", "strategy"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    max_steps = settings.get("max_steps")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"lightning.trainer.max_steps must be a positive number of optimizer steps, "
                          f"got {max_steps!r}")
    accumulate = settings.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"lightning.trainer.accumulate_grad_batches must be a positive integer, got {accumulate!r}")
    return settings


def data_settings(config) -> tuple[int, int]:
    if "data" not in config or "target" not in config.data:
        raise ConfigError("config has no 'data' section with a target "
                          "(data: {target, params, batch_size, num_workers})")
    batch_size, num_workers = config.data.get("batch_size", 1), config.data.get("num_workers", 0)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data.num_workers must be 0 or a positive integer, got {num_workers!r}")
    return batch_size, num_workers


def ema_settings(params: dict) -> dict:
    """Checked `lightning.callbacks.ema` settings (ldm.callbacks.EMA), each with a one-line error."""
    unknown = sorted(set(params) - {"decay", "update_every_n_steps", "update_starting_at_step"})
    if unknown:
        raise ConfigError(f"lightning.callbacks.ema.{unknown[0]} is unknown; known: decay, update_every_n_steps, "
                          "update_starting_at_step")
    decay = params.get("decay", 0.999)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ConfigError(f"lightning.callbacks.ema.decay must be a number in (0, 1), got {decay!r}")
    for key, least in (("update_every_n_steps", 1), ("update_starting_at_step", 0)):
        value = params.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"lightning.callbacks.ema.{key} must be a whole number >= {least}, got {value!r}")
    return params


def make_callbacks(config, run_dir: Path, seed: int) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ldm.callbacks import EMA, ConceptCheckpoint, ImageLogger, ResumeCheckpoint, SeedPerRank, StepProgressBar

    section = OmegaConf.select(config, "lightning.callbacks") or {}
    unknown = sorted(set(section) - set(CALLBACK_KEYS))
    if unknown:
        raise ConfigError(f"lightning.callbacks.{unknown[0]} is unknown; known callbacks: {', '.join(CALLBACK_KEYS)}")
    params = {key: dict(section.get(key) or {}) for key in CALLBACK_KEYS}

    def made(key: str, make):
        try:
            return make()
        except (TypeError, ValueError) as err:   # an unknown or bad setting, named with its callback
            raise ConfigError(f"lightning.callbacks.{key}: {err}") from err

    callbacks = [
        made("concept_checkpoint", lambda: ConceptCheckpoint(run_dir / "concepts", **params["concept_checkpoint"])),
        made("checkpoint", lambda: ResumeCheckpoint(run_dir / "checkpoints", **params["checkpoint"])),
        made("image_logger", lambda: ImageLogger(run_dir / "images", **params["image_logger"])),
        LearningRateMonitor(logging_interval="step"),
        SeedPerRank(seed),
        StepProgressBar(),
    ]
    if "ema" in section:   # an exponential moving average of the weights, swapped in when training ends
        callbacks.append(EMA(**ema_settings(params["ema"])))
    return callbacks


# ----------------------------------------------------------------------------- main
def run(argv: list[str] | None = None, extra_callbacks: Sequence = ()):
    """Parse `argv`, set up and (with -t) train; returns the Lightning Trainer, or None without -t.

    `extra_callbacks` (Lightning callbacks) run after main.py's own; for programs that call `run`,
    such as the tests. They reach only this process, not the DDP processes Lightning starts.
    """
    args = parse_args(argv)

    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from ldm.build import build_model, load_config
    from ldm.callbacks import FrozenWeightsCheckpointIO
    from ldm.data.loader import StepDataModule
    from ldm.util import atomic_path, count_params, instantiate_from_config

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # the dataset caches decoded images
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")  # frozen parts
    # A resumed run draws a new sample order, seeded with the step it resumes from (ldm/data/loader.py).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")

    ckpt_path = None
    if args.resume:
        if args.name:
            raise ConfigError("--name cannot be combined with --resume (a resumed run keeps its directory)")
        run_dir, ckpt_path, saved = resolve_resume(args.resume)
        config = load_config(saved + list(args.base), args.overrides)
        check_resume_overrides(load_config(saved), config)
    else:
        if not args.base:
            raise ConfigError("no config given: pass --base CONFIG.yaml [...] or --resume RUN_DIR")
        config = load_config(args.base, args.overrides)
        name = check_run_name(args.name) if args.name else Path(args.base[-1]).stem
        run_dir = None

    seed = args.seed if args.seed is not None else config.get("lightning", {}).get("seed", 23)
    settings = trainer_settings(config, args)
    batch_size, num_workers = data_settings(config)
    OmegaConf.update(config, "lightning.trainer", settings, merge=False)
    OmegaConf.update(config, "lightning.seed", seed)

    pl.seed_everything(seed, verbose=False)
    try:
        dataset = instantiate_from_config(config.data)
    except TypeError as err:
        raise ConfigError(f"data: cannot build {config.data.target}: {err}") from err
    ckpt = config.model.get("ckpt")
    if ckpt is None:
        print("note: model.ckpt is not set; the model starts from random weights seeded with "
              f"{seed} (fine for configs/tiny; set model.ckpt=PATH for Stable Diffusion)")
    try:
        model = build_model(config, ckpt=ckpt, seed=seed)
    except TypeError as err:
        raise ConfigError(f"model: cannot build {config.model.get('target')}: {err}") from err
    size, unet = getattr(dataset, "size", None), getattr(getattr(model, "model", None), "diffusion_model", None)
    if isinstance(size, int) and hasattr(model, "first_stage_model") and hasattr(unet, "num_levels"):
        factor = model.first_stage_model.downsample_factor * 2 ** (unet.num_levels - 1)
        if size % factor:   # before any step: the U-Net's skip connections need whole latent halvings
            raise ConfigError(f"data.params.size {size} is not a multiple of {factor} (the autoencoder's factor times "
                              f"the U-Net's downsampling); use {max(factor, size // factor * factor)}")

    steps, accumulate = settings["max_steps"], settings.get("accumulate_grad_batches", 1)
    print(f"data: {len(dataset)} items from {config.data.target}; batch {batch_size} x accumulate {accumulate} "
          f"per device; {steps} optimizer steps; {count_params(model, trainable_only=True):,} trainable parameters")
    created = run_dir is None and args.train and rank_zero_only.rank == 0
    if run_dir is None:
        inherited = os.environ.get(RUN_DIR_ENV) if rank_zero_only.rank > 0 else None
        run_dir = Path(inherited) if inherited else new_run_dir(args.logdir, name, time.strftime("%Y-%m-%dT%H-%M-%S"),
                                                                create=created)
    try:
        callbacks = make_callbacks(config, run_dir, seed) + list(extra_callbacks)
        trainer = pl.Trainer(
            **settings,
            default_root_dir=str(run_dir),
            logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
            callbacks=callbacks,
            plugins=[FrozenWeightsCheckpointIO(model)],
            enable_checkpointing=False,  # ResumeCheckpoint writes checkpoints/last.ckpt instead
            use_distributed_sampler=False,  # the step sampler is seeded per rank itself
        )
    except (TypeError, ValueError, MisconfigurationException) as err:
        if created and not any(run_dir.iterdir()):   # a run that could not start leaves no folder
            run_dir.rmdir()
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"lightning.trainer: {' '.join(str(err).split())}") from err
    if not args.train:
        print("setup checked; nothing trained (pass -t/--train to train)")
        return None
    if rank_zero_only.rank == 0:  # the Trainer exists, so the settings were accepted: now write the run
        for sub in ("configs", "concepts", "checkpoints"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        launch = len(list((run_dir / "configs").glob("*-config.yaml"))) + 1  # resumes add files, in order
        with atomic_path(run_dir / "configs" / f"{launch:03d}_{time.strftime('%Y-%m-%dT%H-%M-%S')}-config.yaml") as tmp:
            OmegaConf.save(config, tmp)
        world = trainer.num_devices * trainer.num_nodes
        print(f"run: {run_dir} (effective batch {batch_size * accumulate * world} = "
              f"{batch_size} x {accumulate} x {world} device(s))")

    model.train()  # Lightning 2.x keeps the mode it is given (build_model returns eval mode)
    datamodule = StepDataModule(dataset, batch_size=batch_size, num_workers=num_workers, seed=seed)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except SystemExit:
        if trainer.interrupted:   # Lightning turns Ctrl-C into exit(1) after its shutdown: keep it a Ctrl-C (130)
            raise KeyboardInterrupt from None
        raise
    except OSError as err:   # a full disk met by a writer that names no file (TensorBoard's): name the run
        if err.errno in USER_ERRNOS and not any(isinstance(e, OSError) and e.filename for e in exception_chain(err)):
            raise OSError(err.errno, err.strerror, str(run_dir)) from err
        raise
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    if trainer.is_global_zero:
        print(f"done at step {trainer.global_step}: {run_dir}")
    return trainer


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0

