"""Convolutional encoder and decoder of the KL autoencoder (the LDM first stage).

Layer names follow the CompVis checkpoints (`down.{i}.block.{j}`, `mid.attn_1`, `up.{i}.upsample`, ...)
so that Stable Diffusion 1.x / 2.x `first_stage_model.*` weights load with a strict check.
Architecture: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
CVPR 2022, Sec. 3.1 and App. G.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError

NUM_GROUPS = 32  # GroupNorm groups used by every normalisation layer of the original model


def _check_group_norm_channels(ch: int, ch_mult: Sequence[int]) -> None:
    bad = [ch * m for m in ch_mult if (ch * m) % NUM_GROUPS]
    if ch % NUM_GROUPS or bad:
        raise UserError(
            f"autoencoder channel counts must be multiples of {NUM_GROUPS} (GroupNorm groups); "
            f"got ch={ch}, ch_mult={list(ch_mult)}"
        )


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NUM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a residual; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(b, 1, c, h * w).transpose(2, 3)

        # softmax(q k^T / sqrt(C)) v (Vaswani et al. 2017, Eq. 1); SDPA's default scale is 1/sqrt(C).
        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one pixel, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks (`block`), optional attention per block (`attn`), resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """Res block, self-attention, res block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, 2*z_channels or z_channels, H/f, W/f), f = 2**(len(ch_mult)-1).

    `out_ch` is part of the shared ddconfig and only used by the Decoder.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        _check_group_norm_channels(ch, ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)

        self.down = nn.ModuleList()
        block_in = ch
        res = resolution
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            last = i == len(ch_mult) - 1
            level.downsample = None if last else Downsample(block_in)
            if not last:
                res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f), f = 2**(len(ch_mult)-1).

    `in_channels` and `double_z` are part of the shared ddconfig and only used by the Encoder.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        _check_group_norm_channels(ch, ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Mid(block_in, dropout)

        # Built from the lowest resolution upwards, stored so that up[i] mirrors encoder down[i].
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            level.upsample = None if i == 0 else Upsample(block_in)
            if i != 0:
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
