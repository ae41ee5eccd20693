"""KL-regularised autoencoder: the first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1)."""
from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution


class AutoencoderKL(pl.LightningModule):
    """Image (B, in_channels, H, W) in [-1, 1] <-> latent (B, embed_dim, H/f, W/f), f = 2**(len(ch_mult)-1).

    `ddconfig` holds the Encoder/Decoder arguments (double_z, z_channels, resolution, in_channels,
    out_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout). Carries no loss network.
    Trainable on its own with main.py (the toy world's first stage): L1 reconstruction plus
    `kl_weight` times the KL to N(0, I) (no perceptual or adversarial loss). `train_decoder_only`
    freezes the encoder, so the latent space (and any diffusion model trained in it) stays as it
    is while the decoder improves (as SD's fine-tuned VAE decoders were made).
    """

    def __init__(self, ddconfig: Mapping, embed_dim: int, learning_rate: float = 1e-3,
                 kl_weight: float = 1e-6, image_key: str = "image", train_decoder_only: bool = False):
        super().__init__()
        self.learning_rate, self.kl_weight, self.image_key = learning_rate, kl_weight, image_key
        self.train_decoder_only = train_decoder_only
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise UserError("AutoencoderKL needs ddconfig double_z=True (the encoder predicts mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim
        self.in_channels = ddconfig["in_channels"]
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        if train_decoder_only:
            self.encoder.requires_grad_(False)
            self.quant_conv.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.train_decoder_only:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise UserError(
                f"AutoencoderKL.encode expects images (B, {self.in_channels}, H, W) with H and W multiples of {f}; "
                f"got {tuple(x.shape)}"
            )
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"AutoencoderKL.decode expects latents (B, {self.embed_dim}, h, w); got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def training_step(self, batch, batch_idx):
        x = batch[self.image_key]
        reconstruction, posterior = self(x)
        rec = F.l1_loss(reconstruction, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + self.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/l1": rec, "train/kl": kl}, prog_bar=True, batch_size=len(x))
        return loss

    @torch.no_grad()
    def log_images(self, batch, max_images: int = 8, sample=None) -> dict[str, torch.Tensor]:
        x = batch[self.image_key][:max_images]
        return {"inputs": (x + 1) / 2, "reconstructions": ((self(x, sample_posterior=False)[0] + 1) / 2).clamp(0, 1)}

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.learning_rate, weight_decay=0.0)
