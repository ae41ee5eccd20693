"""Latent diffusion (Rombach et al., CVPR 2022) as the Stable Diffusion checkpoints define it.

Only what Stable Diffusion inference and fine-tuning use: a scaled-linear beta schedule,
eps- or v-prediction, a frozen KL autoencoder as first stage and a text encoder as
conditioning. Parameter names match the CompVis checkpoints:
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`.
"""
from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import load_into
from ldm.errors import UserError
from ldm.util import instantiate_from_config


class DiffusionWrapper(nn.Module):
    """Holds the U-Net as `diffusion_model`, the name the checkpoints use."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, context, y=None):
        return self.diffusion_model(x, timesteps=t, context=context, y=y)


def scaled_linear_betas(timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """SD's schedule: betas linear in sqrt space, then squared (float64)."""
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2


class LatentDiffusion(pl.LightningModule):
    def __init__(
        self,
        unet_config,
        first_stage_config,
        cond_stage_config,
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.0120,
        parameterization: str = "eps",
        scale_factor: float = 0.18215,
        image_size: int = 64,
        channels: int = 4,
        first_stage_key: str = "image",
        cond_stage_key: str = "caption",
        learning_rate: float = 1.0e-4,
        mask_floor: float = 0.0,
        cond_stage_trainable: bool = False,
        first_stage_ckpt: str | None = None,
        cond_stage_ckpt: str | None = None,
        cache_latents: bool = False,
    ):
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise UserError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        self.parameterization = parameterization
        self.scale_factor = scale_factor
        self.image_size = image_size
        self.channels = channels
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.learning_rate = learning_rate
        self.num_timesteps = timesteps
        if not 0.0 <= mask_floor <= 1.0:
            raise UserError(f"mask_floor must be in [0, 1], got {mask_floor}")
        self.mask_floor = mask_floor
        # With cache_latents, each distinct training image (a flip is another image) is encoded once
        # per run: its posterior's mean and std are kept, and only the sampling repeats every step.
        self.cache_latents = cache_latents
        self._latents: dict[str | bytes, tuple[torch.Tensor, torch.Tensor]] = {}

        self.model = DiffusionWrapper(instantiate_from_config(unet_config))
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if first_stage_ckpt:   # a separately trained autoencoder (the toy world's)
            load_into(self.first_stage_model, first_stage_ckpt)
        if cond_stage_ckpt:    # a separately pretrained text encoder (the toy world's): its `cond_stage_model.*`
            load_into(self.cond_stage_model, cond_stage_ckpt, prefix="cond_stage_model.")
        self.cond_stage_trainable = cond_stage_trainable
        for frozen in (self.first_stage_model, self.cond_stage_model):
            frozen.eval()
            frozen.requires_grad_(False)
        if cond_stage_trainable:   # pretraining a text encoder from scratch together with the U-Net
            self.cond_stage_model.requires_grad_(True)

        betas = scaled_linear_betas(timesteps, linear_start, linear_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Recomputed from the config, so not part of the state dict (checkpoint.py drops them).
        for name, value in {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        # the samplers' schedules come from this host copy (the same float32 values): no read of the device
        self.host_alphas_cumprod = alphas_cumprod.float().double()

    # ----------------------------------------------------------------- frozen parts
    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        return self

    # ----------------------------------------------------------------- conditioning / first stage
    def get_learned_conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text encodings (B, 77, d): the `context` every cross-attention layer receives."""
        return self.cond_stage_model.encode(list(prompts))

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (posterior sample, or its mean with sample=False)."""
        posterior = self.first_stage_model.encode(x)
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return self.scale_factor * z

    @torch.no_grad()
    def training_latents(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """Scaled posterior samples of training images, as `encode_first_stage`; with `cache_latents`
        the autoencoder sees each distinct image once, known by the dataset's `keys` (one per image, a
        flip another key); without keys, by a hash of its bytes (a copy to the host, every step)."""
        if not self.cache_latents:
            return self.encode_first_stage(x)
        if keys is None:
            import hashlib

            keys = [hashlib.blake2b(img.cpu().numpy().tobytes(), digest_size=16).digest() for img in x]
        new = [i for i, key in enumerate(keys) if key not in self._latents]
        if new:
            posterior = self.first_stage_model.encode(x[new])
            for j, i in enumerate(new):
                self._latents[keys[i]] = (posterior.mean[j], posterior.std[j])
        mean = torch.stack([self._latents[k][0] for k in keys])
        std = torch.stack([self._latents[k][1] for k in keys])
        return self.scale_factor * (mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype))

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    # ----------------------------------------------------------------- diffusion
    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return values.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise (DDPM, Ho et al. 2020, Eq. 4)."""
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start + \
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def get_v(self, x_start, noise, t):
        """v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 (Salimans & Ho 2022)."""
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * noise - \
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start

    def apply_model(self, x_noisy, t, cond):
        return self.model(x_noisy, t, cond)

    @torch.no_grad()
    def cross_attention_probs(self, prompt: str, t: int = 500, seed: int = 0,
                              x_t: torch.Tensor | None = None) -> list[torch.Tensor]:
        """softmax(q k^T) of every text cross-attention layer, (heads, Nq, Nk) float32 each, for
        `prompt` on the latent x_t (1, C, h, w) at timestep t, by default one seeded noise latent
        (what the network attends to, not a sample)."""
        from ldm.modules.attention import cross_attention_layers

        probs = []
        layers = [attn for _, attn in cross_attention_layers(self.model.diffusion_model)]
        for attn in layers:
            attn.attention_probs_hook = lambda module, p: probs.append(p[0])
        try:
            cond = self.get_learned_conditioning([prompt])
            if x_t is None:
                g = torch.Generator(device=self.device.type).manual_seed(seed)
                x_t = torch.randn(1, self.channels, self.image_size, self.image_size, generator=g, device=self.device)
            self.apply_model(x_t, torch.tensor([t], device=self.device), cond)
        finally:
            for attn in layers:
                attn.attention_probs_hook = None
        return probs

    def p_losses(self, x_start, cond, t, noise=None, weight=None):
        """Mean squared error of the network's eps (or v) prediction.

        `weight` (B, 1, h, w), optional, weighs latent pixels (a soft mask); the loss is then the
        weighted mean over pixels and channels.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        prediction = self.apply_model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else self.get_v(x_start, noise, t)
        error = (prediction.float() - target.float()) ** 2
        if weight is None:
            return error.mean()
        weight = weight.float().expand_as(error)
        return (weight * error).sum() / weight.sum().clamp_min(1e-8)

    def latent_mask(self, mask: torch.Tensor | None, size) -> torch.Tensor | None:
        """Soft mask (B, 1, H, W) -> loss weight at latent size: area-resized, divided by its
        maximum, plus `mask_floor` so the background keeps some weight."""
        if mask is None:
            return None
        m = F.interpolate(mask.float(), size=tuple(size), mode="area")
        m = m / m.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return self.mask_floor + (1 - self.mask_floor) * m

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), device=self.device)

    # ----------------------------------------------------------------- training (plain fine-tuning)
    def shared_step(self, batch):
        z = self.training_latents(batch[self.first_stage_key], batch.get("key"))
        cond = self.get_learned_conditioning(batch[self.cond_stage_key])
        weight = self.latent_mask(batch.get("mask"), z.shape[-2:])
        return self.p_losses(z, cond, self.sample_timesteps(z.shape[0]), weight=weight)

    def training_step(self, batch, batch_idx):
        loss = self.shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch[self.cond_stage_key]))
        return loss

    def configure_optimizers(self):
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return torch.optim.AdamW(params, lr=self.learning_rate)

    # ----------------------------------------------------------------- helpers for samplers
    def predict_eps_and_x0(self, x_t, t, output):
        """Turn the network output at timestep(s) t into (eps, x_0) for either parameterization."""
        a = self._at(self.sqrt_alphas_cumprod, t, x_t)
        s = self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.parameterization == "eps":
            return output, (x_t - s * output) / a
        return a * output + s * x_t, a * x_t - s * output
