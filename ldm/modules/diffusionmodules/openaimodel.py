"""The Stable Diffusion denoising U-Net, with the CompVis checkpoint parameter names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (added after the first convolution)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour) followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Text-conditioned denoising U-Net of Stable Diffusion 1.x / 2.x / XL.

    attention_resolutions lists the downsampling factors (1, 2, 4, ...) at which a
    SpatialTransformer follows each ResBlock. Exactly one of num_heads / num_head_channels
    is given (the other stays -1). `transformer_depth` is one depth or one per level (SDXL:
    0, 2, 10); the middle block takes the last level's. `adm_in_channels` (SDXL: 2816) adds
    `label_emb`, an MLP of the vector `y` added to the timestep embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, model_channels: int, attention_resolutions,
                 num_res_blocks: int, channel_mult, context_dim: int, num_heads: int = -1,
                 num_head_channels: int = -1, transformer_depth=1, dropout: float = 0.0,
                 use_linear_in_transformer: bool = False, use_checkpoint: bool = False,
                 upcast_attention: bool = False, adm_in_channels: int | None = None):
        super().__init__()
        if (num_heads == -1) == (num_head_channels == -1):
            raise UserError(f"set exactly one of num_heads ({num_heads}) and num_head_channels "
                             f"({num_head_channels}); the other must be -1")
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = {int(r) for r in attention_resolutions}
        if not channel_mult or num_res_blocks < 1:
            raise UserError(f"channel_mult must be non-empty and num_res_blocks >= 1, got "
                             f"{channel_mult} and {num_res_blocks}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_levels = len(channel_mult)
        depths = [int(transformer_depth)] * len(channel_mult) if isinstance(transformer_depth, int) \
            else [int(d) for d in transformer_depth]
        if len(depths) != len(channel_mult) or min(depths) < 0:
            raise UserError(f"transformer_depth must be one depth or one per level ({len(channel_mult)}), "
                            f"each >= 0, got {transformer_depth}")

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            if num_head_channels == -1:
                heads, d_head = num_heads, ch // num_heads
            else:
                heads, d_head = ch // num_head_channels, num_head_channels
            return SpatialTransformer(ch, heads, d_head, context_dim, depth=depth,
                                      dropout=dropout, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint, upcast_attention=upcast_attention)

        def resblock(ch: int, out_ch: int) -> ResBlock:
            return ResBlock(ch, time_embed_dim, out_ch, dropout=dropout, use_checkpoint=use_checkpoint)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        self.adm_in_channels = adm_in_channels
        if adm_in_channels:   # nested as in the checkpoints: label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and depths[level]:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), transformer(ch, depths[-1]), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and depths[level]:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from noisy latents x (B, in_channels, H, W) at `timesteps` (B,) given context
        (B, N, context_dim) and, with `adm_in_channels`, the vector y (B, adm_in_channels)."""
        if timesteps is None or context is None:
            raise UserError("UNetModel.forward needs both timesteps and context")
        if (y is None) != (not self.adm_in_channels):
            raise ValueError(f"y must be given exactly when adm_in_channels is set ({self.adm_in_channels})")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x height and width must be multiples of {factor}, got {tuple(x.shape[2:])}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])

        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
