"""Building blocks shared by the denoising U-Net: timestep embedding, normalisation, checkpointing."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps as (N, dim) float32, laid out [cos | sin].

    Frequencies are max_period^(-i/half) for i = 0..half-1 (Transformer positional encoding,
    Vaswani et al. 2017, Sec. 3.5), with the cosine half first as in the CompVis U-Net.
    An odd `dim` gets one trailing zero column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (N,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` in place and return it (residual branches start as identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The U-Net's standard norm layer: 32 groups, affine."""
    return GroupNorm32(32, channels, eps=eps)


def checkpoint(fn, *args, enabled: bool):
    """Call fn(*args), recomputing its activations in backward when `enabled` and grads are on.

    Uses non-reentrant torch.utils.checkpoint, so parameters reached inside `fn` get gradients
    without being listed as inputs.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
