"""Training data counted in optimizer steps: one DataLoader "epoch" is the whole run.

A personalisation set has a handful of images and a run a few hundred steps, so instead of
repeating the dataset over thousands of epochs the sampler draws exactly
`max_steps * batch_size * accumulate_grad_batches` indices per process.
"""
from __future__ import annotations

from typing import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.errors import UserError


def derive_seed(*numbers: int) -> int:
    """A 63-bit seed mixing `numbers` (run seed, rank, start step) with NumPy's SeedSequence."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint64)[0] >> 1)


class ShuffledPassSampler(Sampler[int]):
    """`num_samples` indices of a dataset of `num_items`: concatenated random permutations.

    Every image is seen once per pass over the set, so even a batch drawn from a few images is
    balanced (unlike sampling with replacement). Already rank-aware through `seed`, so it is used
    with `Trainer(use_distributed_sampler=False)`.
    """

    def __init__(self, num_items: int, num_samples: int, seed: int):
        if num_items < 1 or num_samples < 1:
            raise UserError(f"need at least one item and one sample, got {num_items} items, {num_samples} samples")
        self.num_items, self.num_samples, self.seed = num_items, num_samples, seed
        self._iterations = 0  # a second pass (e.g. with limit_train_batches) gets a new order

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self._iterations))
        self._iterations += 1
        passes = -(-self.num_samples // self.num_items)
        order = torch.cat([torch.randperm(self.num_items, generator=generator) for _ in range(passes)])
        return iter(order[: self.num_samples].tolist())


class StepDataModule(pl.LightningDataModule):
    """Wraps a map-style dataset; the loader is built once the trainer knows rank, step and max_steps."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed

    def samples_per_process(self) -> int:
        trainer = self.trainer
        return trainer.max_steps * self.batch_size * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # The start step enters the seeds so that a resumed run does not replay the first run's order.
        rank, step = trainer.global_rank, trainer.global_step
        sampler = ShuffledPassSampler(len(self.dataset), self.samples_per_process(), derive_seed(self.seed, rank, step))
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=trainer.strategy.root_device.type == "cuda",
            # Seeds the workers (base seed + worker id), hence the dataset's flips and templates in them.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, rank, step, 1)),
        )
