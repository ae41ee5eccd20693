"""Attention layers of the Stable Diffusion U-Net (CompVis parameter names)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, normalization, zero_module

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input projection and 4x hidden width."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, Nq, query_dim) over context (B, Nk, context_dim).

    Without a context it is self-attention. `upcast` computes the attention in float32 when
    the queries are fp16/bf16. Set `attention_probs_hook` to a callable hook(module, probs)
    to receive softmax(q k^T * scale) as (B, heads, Nq, Nk) float32; the output is unaffected.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.attention_probs_hook = None

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(context)
        q, k, v = (self._split_heads(t) for t in (q, k, v))

        if self.attention_probs_hook is not None:
            with torch.autocast(device_type=q.device.type, enabled=False):
                scores = q.float() @ k.float().transpose(-1, -2) * self.scale
                self.attention_probs_hook(self, scores.softmax(dim=-1))

        # Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V  (Vaswani et al. 2017, Eq. 1)
        if self.upcast and q.dtype in _LOW_PRECISION:
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=self.scale)
            out = out.to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)

        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention (attn1), cross-attention to the context (attn2), GEGLU MLP."""

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int, dropout: float = 0.0,
                 use_checkpoint: bool = False, upcast_attention: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    upcast=upcast_attention)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout, upcast=upcast_attention)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, context, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a (B, C, H, W) feature map, added back as a residual.

    proj_in/proj_out are 1x1 convolutions (SD1) or Linear layers on the flattened tokens
    (SD2, `use_linear`). proj_out starts at zero.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, context_dim: int, depth: int = 1,
                 dropout: float = 0.0, use_linear: bool = False, use_checkpoint: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, dropout=dropout,
                                  use_checkpoint=use_checkpoint, upcast_attention=upcast_attention)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, CrossAttention]]:
    """The text cross-attention layers (`attn2`) of `unet`, as (qualified name, module) in module order."""
    return [(name, m) for name, m in unet.named_modules()
            if isinstance(m, CrossAttention) and name.rsplit(".", 1)[-1] == "attn2"]
