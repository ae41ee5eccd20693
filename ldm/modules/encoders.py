"""Frozen text encoders that turn prompts into the cross-attention context of Stable Diffusion.

`FrozenCLIPEmbedder` (SD 1.x): the CLIP ViT-L/14 text transformer, via `transformers`.
`FrozenOpenCLIPEmbedder` (SD 2.x): the OpenCLIP ViT-H/14 text tower, via `open_clip`.
Both are built from their configuration only (weights come from an SD checkpoint) and keep the
parameter names of the original CompVis checkpoints. `encode_embeddings` runs the transformer from
token embeddings supplied by the caller, which is where Perfusion injects its learned concept
embedding; it is differentiable with respect to those embeddings.
"""
from __future__ import annotations

from typing import Sequence

import open_clip
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.errors import UserError
from ldm.modules.tokenizer import CLIPTokenizer
from ldm.util import fingerprint_tensors, to_device


def fingerprint_used(module: nn.Module) -> str:
    """The fingerprint of a text encoder's weights, leaving out the `unused_keys()` it never reads."""
    unused = set(module.unused_keys())
    return fingerprint_tensors({k: v for k, v in module.state_dict().items() if k not in unused})


class _FrozenTextEncoder(nn.Module):
    """Shared behaviour: tokenizing, freezing, eval-only mode and input checks.

    Subclasses set `self.tokenizer`, `self.max_length`, `self.width`, `self.output_dim`, build their
    transformer, call `self._freeze()`, and implement `token_embedding` and `encode_embeddings`.
    """

    tokenizer: CLIPTokenizer
    max_length: int
    width: int
    output_dim: int

    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def encode_embeddings(self, tokens: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        """Always stays in eval mode, so a parent's `.train()` never enables dropout here."""
        return super().train(False)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length) on this module's device."""
        return to_device(self.tokenizer(texts), self.token_embedding.weight.device)

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Context (B, max_length, output_dim) for a batch of prompts."""
        tokens = self.tokenize(texts)
        return self.encode_embeddings(tokens, self.token_embedding(tokens))

    def forward(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.encode(texts)

    def unused_keys(self) -> list[str]:
        """State-dict names the encoding never reads (a diffusers folder need not carry them)."""
        return []

    def fingerprint(self) -> str:
        return fingerprint_used(self)

    def _check_inputs(self, tokens: torch.Tensor, embeds: torch.Tensor) -> None:
        # a prefix of the tokens (T < max_length) is allowed: the encoders are causal, so its encodings are
        # the full prompt's at those positions (Perfusion's targets read one position and stop there)
        if tokens.dim() != 2 or not 0 < tokens.shape[1] <= self.max_length:
            raise ValueError(f"tokens must have shape (B, T <= {self.max_length}), got {tuple(tokens.shape)}")
        expected = (*tokens.shape, self.width)
        if tuple(embeds.shape) != expected:
            raise ValueError(f"token embeddings must have shape {expected}, got {tuple(embeds.shape)}")


class FrozenCLIPEmbedder(_FrozenTextEncoder):
    """SD 1.x text encoder: CLIP text transformer, output = last hidden state after the final LayerNorm;
    `layer="penultimate"` (SDXL's first encoder) is the output of the next-to-last layer, no LayerNorm.

    Defaults are CLIP ViT-L/14's text model. `self.transformer` is a `transformers.CLIPTextModel`,
    whose parameters are named `embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`, matching
    `cond_stage_model.transformer.*` in SD 1.x checkpoints. Prompts are padded with the end token.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "quick_gelu",
        max_length: int = 77,
        layer: str = "last",
    ):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise UserError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        self.layer = layer
        self.tokenizer = CLIPTokenizer(max_length, pad_with_eot=True)
        if vocab_size < self.tokenizer.vocab_size:
            raise UserError(f"vocab_size {vocab_size} is smaller than the CLIP tokenizer's {self.tokenizer.vocab_size}")
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_length,
            hidden_act=hidden_act,
            bos_token_id=self.tokenizer.sot_token_id,
            eos_token_id=self.tokenizer.eot_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            attn_implementation="sdpa",
        )
        self.transformer = CLIPTextModel(config)
        self.max_length = max_length
        self.width = width
        self.output_dim = width
        self._freeze()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.embeddings.token_embedding

    def unused_keys(self) -> list[str]:
        """With `penultimate`, the last layer and the final LayerNorm."""
        if self.layer == "last":
            return []
        last = f"transformer.encoder.layers.{self.transformer.config.num_hidden_layers - 1}."
        return [k for k in self.state_dict() if k.startswith((last, "transformer.final_layer_norm."))]

    def encode_embeddings(self, tokens: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Causal transformer over `embeds` + position embeddings, then the final LayerNorm."""
        self._check_inputs(tokens, embeds)
        # Position ids are made here rather than read from the non-persistent `position_ids`
        # buffer, which is left uninitialised when the module is built on the meta device.
        positions = torch.arange(tokens.shape[1], device=embeds.device)[None]
        hidden = self.transformer.embeddings(inputs_embeds=embeds, position_ids=positions)
        # The causal mask is made here, additive, so no transformers masking helper (whose
        # arguments change between releases) is involved.
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min, device=hidden.device, dtype=hidden.dtype).triu(1)
        if self.layer == "last":
            hidden = self.transformer.encoder(inputs_embeds=hidden, attention_mask=mask[None, None]).last_hidden_state
            return self.transformer.final_layer_norm(hidden)
        # The next-to-last layer's output, read by a hook (transformers' hidden-state outputs and
        # layer signatures change between releases; a layer's output is a tensor or a tuple).
        seen = []
        hook = self.transformer.encoder.layers[-2].register_forward_hook(
            lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
        try:
            self.transformer.encoder(inputs_embeds=hidden, attention_mask=mask[None, None])
        finally:
            hook.remove()
        return seen[0]


class FrozenOpenCLIPEmbedder(_FrozenTextEncoder):
    """SD 2.x text encoder: OpenCLIP text tower, output = one residual block's output after `ln_final`.

    Defaults are OpenCLIP ViT-H/14's text tower. `self.model` is an `open_clip.model.CLIP` without its
    vision tower; its `text_projection` and `logit_scale` are unused but kept so that the state dict
    matches `cond_stage_model.model.*` in SD 2.x checkpoints. `layer="penultimate"` (SD 2.x) skips the
    last residual block; `layer="last"` runs all of them. Prompts are padded with 0. SDXL's second
    encoder (ViT-bigG/14) leaves out `ln_final` (`final_norm=False`) and also gives the pooled
    embedding (`encode_pooled`), which reads the projection head.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        vocab_size: int = 49408,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        max_length: int = 77,
        embed_dim: int = 1024,
        layer: str = "penultimate",
        final_norm: bool = True,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise UserError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "penultimate" and layers < 2:
            raise UserError(f"layer='penultimate' needs at least 2 transformer layers, got {layers}")
        self.tokenizer = CLIPTokenizer(max_length, pad_with_eot=False)
        if vocab_size < self.tokenizer.vocab_size:
            raise UserError(f"vocab_size {vocab_size} is smaller than the CLIP tokenizer's {self.tokenizer.vocab_size}")
        text_cfg = open_clip.model.CLIPTextCfg(
            context_length=max_length, vocab_size=vocab_size, width=width, heads=heads, layers=layers
        )
        # The vision tower is required by the constructor but deleted at once: build the smallest one.
        vision_cfg = open_clip.model.CLIPVisionCfg(layers=1, width=8, head_width=8, patch_size=1, image_size=1)
        self.model = open_clip.model.CLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
        del self.model.visual
        self.layer = layer
        self.final_norm = final_norm
        self.max_length = max_length
        self.width = width
        self.output_dim = width
        self._freeze()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def unused_keys(self) -> list[str]:
        """The contrastive head, and with `penultimate` the last block (diffusers' SD 2.x folders drop
        it); with `final_norm=False` (SDXL) the pooled embedding reads them all, so only `logit_scale`."""
        if not self.final_norm:
            return ["model.logit_scale"]
        keys = ["model.text_projection", "model.logit_scale"]
        if self.layer == "penultimate":
            last = f"model.transformer.resblocks.{len(self.model.transformer.resblocks) - 1}."
            keys += [k for k in self.state_dict() if k.startswith(last)]
        return keys

    def encode_embeddings(self, tokens: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Causal transformer over `embeds` + positional embedding, stopped at `self.layer`, then `ln_final`
        (unless `final_norm=False`)."""
        return self._run(tokens, embeds, pooled=False)[0]

    def encode_pooled(self, tokens: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encodings as `encode_embeddings`, pooled (B, embed_dim)): every block, `ln_final`, the end
        token's row (the highest id), through `text_projection`, as CLIP pools."""
        return self._run(tokens, embeds, pooled=True)

    def _run(self, tokens: torch.Tensor, embeds: torch.Tensor, pooled: bool):
        self._check_inputs(tokens, embeds)
        n = tokens.shape[1]
        x = embeds + self.model.positional_embedding[:n].to(embeds.dtype)
        # Causal mask built per call (not the non-persistent `attn_mask` buffer, which is left
        # uninitialised when the module is built on the meta device): -inf above the diagonal.
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        blocks = self.model.transformer.resblocks
        n_blocks = len(blocks) - 1 if self.layer == "penultimate" else len(blocks)
        for block in blocks[:n_blocks]:
            x = block(x, attn_mask=mask)
        context = self.model.ln_final(x) if self.final_norm else x
        if not pooled:
            return context, None
        for block in blocks[n_blocks:]:
            x = block(x, attn_mask=mask)
        end = self.model.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return context, end @ self.model.text_projection.to(end.dtype)
