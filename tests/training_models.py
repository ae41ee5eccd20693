"""A LatentDiffusion with the hooks main.py's callbacks call, for the training tests (config target
`tests.training_models.ConceptLDM`): a masked loss at latent size, `save_concept`, `log_images`, and
a Ctrl-C (KeyboardInterrupt) at a chosen step."""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import atomic_path


class ConceptLDM(LatentDiffusion):
    def __init__(self, *args, interrupt_at_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.interrupt_at_step = interrupt_at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.interrupt_at_step:
            raise KeyboardInterrupt  # what Ctrl-C raises in the training loop
        return super().training_step(batch, batch_idx)

    def shared_step(self, batch):
        z = self.encode_first_stage(batch[self.first_stage_key])
        cond = self.get_learned_conditioning(batch[self.cond_stage_key])
        weight = F.interpolate(batch["mask"].float(), size=z.shape[-2:], mode="area")
        return self.p_losses(z, cond, self.sample_timesteps(z.shape[0]), weight=weight)

    def save_concept(self, path) -> Path:
        """All trainable tensors (here: the U-Net), written atomically."""
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters() if p.requires_grad}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"step": str(self.global_step)})
        return Path(path)

    def log_images(self, batch):
        """Inputs, their autoencoder reconstructions and the masks, in [0, 1]; records the module's mode."""
        self.logged_in_training_mode = self.training
        x = batch[self.first_stage_key]
        reconstruction = self.decode_first_stage(self.encode_first_stage(x, sample=False))
        return {
            "inputs": (x + 1) / 2,
            "reconstruction": ((reconstruction + 1) / 2).clamp(0, 1),
            "mask": batch["mask"].expand(-1, 3, -1, -1),
        }
