"""Lightning callbacks and plugins of `main.py`: concept files, resume checkpoints, image logging,
per-rank seeds and a progress bar counted in optimizer steps.

Everything that fires "every N steps" counts optimizer steps (`trainer.global_step`), so gradient
accumulation does not change when things happen.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, TQDMProgressBar, WeightAveraging
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torchvision.utils import make_grid

from ldm.checkpoint import CheckpointError
from ldm.errors import UserError
from ldm.outputs import save_png, to_pil
from ldm.sample import generate
from ldm.util import fingerprint_tensors

# Ctrl-C, and SIGTERM as Lightning raises it: both save the concept and the resume checkpoint
INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


class _EveryNSteps(Callback):
    """Fires `_fire(trainer, pl_module, batch)` once after every `every_n_steps`-th optimizer step."""

    def __init__(self, every_n_steps: int):
        if every_n_steps < 0:
            raise UserError(f"every_n_steps must be 0 (off) or positive, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run does not repeat the step it resumed at

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at one global step; fire once.
        if self.every_n_steps and step != self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            self._fire(trainer, pl_module, batch)

    def _fire(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        raise NotImplementedError


class ConceptCheckpoint(_EveryNSteps):
    """Writes `pl_module.save_concept(path)` to `<dirpath>/step_XXXXXX.safetensors` every N steps (0: never)
    and to `<dirpath>/last.safetensors` at the end of training and on Ctrl-C; global rank 0 only.

    Does nothing (with a warning) for a module without `save_concept`.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 100):
        super().__init__(every_n_steps)
        self.dirpath = Path(dirpath)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "save_concept"):
            rank_zero_warn(f"{type(pl_module).__name__} has no save_concept(); no concept files will be written")

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        if trainer.is_global_zero and hasattr(pl_module, "save_concept"):
            path = self.dirpath / name
            path.parent.mkdir(parents=True, exist_ok=True)
            pl_module.save_concept(path)

    def _fire(self, trainer, pl_module, batch) -> None:
        self._save(trainer, pl_module, f"step_{trainer.global_step:06d}.safetensors")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "last.safetensors")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning reports Ctrl-C (and SIGTERM, what `kill` and cluster pre-emption send) here before it exits.
        if isinstance(exception, INTERRUPTS) and trainer.global_step > 0:
            self._save(trainer, pl_module, "last.safetensors")
            if hasattr(pl_module, "save_concept"):
                rank_zero_info(f"interrupted at step {trainer.global_step}: concept saved to "
                               f"{self.dirpath / 'last.safetensors'}")


class ResumeCheckpoint(_EveryNSteps):
    """Lightning checkpoint `<dirpath>/last.ckpt` (overwritten) every N steps, at the end of training and,
    in single-process runs, on Ctrl-C; `every_n_steps=0` turns it off. With `FrozenWeightsCheckpointIO`
    it holds only the learned state.

    Not a `lightning.pytorch.callbacks.Checkpoint` subclass, so that `Trainer(enable_checkpointing=False)`
    can turn off Lightning's own per-epoch checkpoint.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 100):
        super().__init__(every_n_steps)
        self.path = Path(dirpath) / "last.ckpt"

    def _fire(self, trainer, pl_module, batch) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        self._last_step = trainer.global_step
        trainer.save_checkpoint(self.path, weights_only=False)  # collective call; only rank 0 writes

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps and trainer.global_step != self._last_step:
            self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Saving is a collective call; after Ctrl-C in a multi-process run other ranks may be gone.
        if (self.every_n_steps and isinstance(exception, INTERRUPTS) and trainer.world_size == 1
                and trainer.global_step not in (0, self._last_step)):
            self._save(trainer)


class FrozenWeightsCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints without the frozen parameters (requires_grad False) of `module`, except
    those it names in `non_base_keys()`.

    The frozen weights come from the base checkpoint (`model.ckpt`) or the seeded initialisation,
    both rebuilt by `main.py` when resuming; a fingerprint saved with the checkpoint makes sure
    they are the same weights. Loading fills them back in, so the strict state-dict check of
    Lightning still applies to everything else.
    """

    KEY = "frozen_parameters"

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        # Taken now, from the freshly built model, so that a later precision cast does not change it.
        self.fingerprint = fingerprint_tensors(self._frozen())

    def _frozen(self) -> dict[str, torch.Tensor]:
        learned = set(self.module.non_base_keys()) if hasattr(self.module, "non_base_keys") else set()
        return {name: p.detach() for name, p in self.module.named_parameters()
                if not p.requires_grad and name not in learned}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        frozen = self._frozen()
        checkpoint = dict(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint[self.KEY] = {"omitted": len(frozen), "fingerprint": self.fingerprint}
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        info = checkpoint.get(self.KEY)
        if info is None:
            return checkpoint  # a full checkpoint
        if info["fingerprint"] != self.fingerprint:
            raise CheckpointError(
                f"{path}: saved on top of different frozen weights (fingerprint {info['fingerprint']}, now "
                f"{self.fingerprint}); resume with the run's own model.ckpt, config and seed")
        checkpoint["state_dict"] = {**self._frozen(), **checkpoint["state_dict"]}
        return checkpoint


class ImageLogger(_EveryNSteps):
    """Every N steps on global rank 0: `pl_module.log_images(batch, sample=generate)` -> {name: (B, 3, H, W)
    in [0, 1]} (`generate` of ldm.sample, so that a model does not reach up to the sampler),
    each written as one grid to TensorBoard (`<split>/<name>`) and to `<dirpath>/<name>_step_XXXXXX.png`.

    The module runs in eval mode without gradients and goes back to its previous mode afterwards.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 100, max_images: int = 4, split: str = "train"):
        super().__init__(every_n_steps)
        if max_images < 1:
            raise UserError(f"max_images must be at least 1, got {max_images}")
        self.dirpath, self.max_images, self.split = Path(dirpath), max_images, split

    def _fire(self, trainer, pl_module, batch) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "log_images"):
            return
        batch = {k: v[: self.max_images] for k, v in batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = pl_module.log_images(batch, sample=generate)
        finally:
            pl_module.train(was_training)
        step = trainer.global_step
        tensorboard = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        for name, value in images.items():
            value = value.detach().float().cpu().clamp(0, 1)
            grid = make_grid(value, nrow=value.shape[0], padding=2, pad_value=1.0)
            if tensorboard is not None:
                tensorboard.add_image(f"{self.split}/{name}", grid, global_step=step)
            save_png(to_pil(grid), self.dirpath / f"{name.replace('/', '_')}_step_{step:06d}.png")


class EMA(WeightAveraging):
    """An exponential moving average of the weights, swapped into the module when training ends
    (Lightning's WeightAveraging; `last.ckpt` keeps the raw weights beside it). The average is
    updated with one foreach lerp over all tensors (`get_ema_multi_avg_fn`), about 4x faster on the
    CPU than the per-tensor update of Lightning's EMAWeightAveraging (the same numbers up to rounding;
    `python scripts/benchmark.py ema`)."""

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int = 0):
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.update_every_n_steps, self.update_starting_at_step = update_every_n_steps, update_starting_at_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return (step_idx is not None and step_idx >= self.update_starting_at_step
                and step_idx % self.update_every_n_steps == 0)


class SeedPerRank(Callback):
    """In multi-process runs, reseed each rank with `seed + global_rank` once the ranks are known.

    All ranks build the model from the same seed; afterwards each must draw its own noise,
    timesteps and data augmentation. Single-process runs keep the seed stream of `--seed`.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            pl.seed_everything(self.seed + trainer.global_rank, verbose=False)


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps up to `max_steps` (from the resumed step, if any).

    On a terminal it is redrawn every `refresh_rate` steps (Lightning's meaning; `TQDM_MINITERS`
    raises it). When stdout is not a terminal (CI logs, files), where every redraw becomes a line,
    it is redrawn at most every `log_interval_s` seconds, and once finished.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, log_interval_s: float = 10.0):
        super().__init__(refresh_rate=refresh_rate)
        if log_interval_s < 0:
            raise UserError(f"log_interval_s must be 0 or more seconds, got {log_interval_s}")
        self.log_interval_s = log_interval_s
        self._interactive = True
        self._last_redraw = 0.0

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        isatty = getattr(sys.stdout, "isatty", None)
        self._interactive = bool(isatty and isatty())
        self._last_redraw = time.monotonic()  # tqdm draws the bar when it is made
        return Tqdm(desc="train", total=trainer.max_steps if trainer.max_steps > 0 else None,
                    initial=trainer.global_step, unit="step", position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar, total = self.train_progress_bar, trainer.max_steps if trainer.max_steps > 0 else None
        if bar.total != total or bar.n != trainer.global_step:  # already right when made by init_train_tqdm
            bar.reset(total=total)
            bar.initial = bar.n = trainer.global_step
            bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        bar, step = self._train_progress_bar, trainer.global_step
        if bar is None or bar.disable or bar.n == step or not self._should_update(step, bar.total):
            return
        if self._interactive or step == bar.total or time.monotonic() - self._last_redraw >= self.log_interval_s:
            self._redraw(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable and bar.n != trainer.global_step:  # usually drawn already
            self._redraw(trainer, pl_module)

    def _redraw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self._train_progress_bar
        self._last_redraw = time.monotonic()
        bar.n = trainer.global_step
        # Off a terminal the finished bar is drawn once, by close() at the end of training.
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=self._interactive or bar.n != bar.total)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
