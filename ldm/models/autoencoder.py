"""KL-regularised autoencoder: the first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1] <-> latent (B, embed_dim, H/f, W/f), f = 2**(len(ch_mult)-1).

    `ddconfig` holds the Encoder/Decoder arguments (double_z, z_channels, resolution, in_channels,
    out_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout). Carries no loss network.
    """

    def __init__(self, ddconfig: Mapping, embed_dim: int):
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z=True (the encoder predicts mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim
        self.in_channels = ddconfig["in_channels"]
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
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
