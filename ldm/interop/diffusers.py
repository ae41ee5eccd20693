"""Perfusion concepts in a diffusers `StableDiffusionPipeline` (diffusers is an optional extra).

    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd-folder", torch_dtype=torch.float32)
    applied = apply_concepts(pipe, ["teddy.safetensors"], covariance="ckpt/covariance.safetensors")
    image = pipe(f"a photo of {applied.tokens[0]} on the beach").images[0]
    remove_concepts(pipe)

Each concept's embedding becomes a new token of the pipeline's tokenizer and text encoder, and
every cross-attention layer (attn2) gets a processor whose keys and values are Eq. 3's gated
rank-1 edit (`gated_rank1_edit`, Appendix B for several concepts) with locked keys
o*_K = W_K i_super. Fingerprints are those of the pipeline's float32 weights under this project's
names, so a concept is checked against the pipeline exactly as against a checkpoint.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.concepts import Concept, ConceptError
from ldm.covariance import load_covariance
from ldm.errors import UserError
from ldm.interop.diffusers_folder import text_encoder_names, unet_names
from ldm.modules.perfusion import gated_rank1_edit
from ldm.util import fingerprint_tensors

_SECTIONS = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
_HINTS = {"unet": "another base model, or weights not in float32 when the concepts were applied",
          "text_encoder": "another text encoder or SD version",
          "covariance": "another covariance file than the concepts were trained with"}


@dataclass
class AppliedConcepts:
    """What `apply_concepts` changed, so that `remove_concepts` can put it back exactly."""

    tokens: list[str]                # the prompt word of each concept, in file order
    betas: list[float]
    taus: list[float]
    tokenizer: object                # the pipeline's tokenizer before the tokens were added
    embeddings: torch.nn.Module      # the text encoder's input embeddings before
    vocab_size: int
    processors: dict                 # the U-Net's attention processors before


class PerfusionAttnProcessor:
    """Cross-attention whose K and V are Perfusion's edited projections of the text encodings.

    The pipeline hands every denoising step the same encodings tensor, so K and V are computed
    once per prompt (kept for the last tensor seen, as ConceptBank does), and the targets are
    moved once to the device the pipeline runs on."""

    def __init__(self, i_star, o_key, o_value, C_inv, beta, tau, exact: bool):
        self.targets = {i_star.device: (i_star, o_key, o_value, C_inv)}
        self.beta, self.tau, self.exact = beta, tau, exact
        self._seen: tuple | None = None   # (encodings, their version, K, V)

    def edited_key_value(self, attn, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        version = None if e.is_inference() else e._version
        if self._seen is not None and self._seen[0] is e and self._seen[1] == version:
            return self._seen[2], self._seen[3]
        if e.device not in self.targets:
            self.targets[e.device] = tuple(t.to(e.device) for t in next(iter(self.targets.values())))
        i_star, o_key, o_value, C_inv = self.targets[e.device]
        edit = dict(i_star=i_star, C_inv=C_inv, beta=self.beta, tau=self.tau, exact=self.exact)
        key = gated_rank1_edit(e, attn.to_k.weight, o_star=o_key, **edit).to(e.dtype)
        value = gated_rank1_edit(e, attn.to_v.weight, o_star=o_value, **edit).to(e.dtype)
        self._seen = (e, version, key, value)
        return key, value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or attn.norm_cross or attn.group_norm \
                or attn.spatial_norm:
            raise ValueError("PerfusionAttnProcessor serves SD's text cross-attention only")
        key, value = self.edited_key_value(attn, encoder_hidden_states)
        query = attn.to_q(hidden_states)
        b, heads = query.shape[0], attn.heads
        split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)   # noqa: E731
        q, k, v = split(query), split(key), split(value)
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, query.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def cross_attention_names(unet) -> list[str]:
    """The U-Net's attn2 modules, in the order of this project's layers (and of a concept's o*_V)."""
    state = unet.state_dict()
    layers = []
    for source, mapped in zip(state, unet_names(state)):   # the renaming keeps the order of the names
        if source.endswith(".attn2.to_k.weight"):
            section, index, block = re.match(r"model\.diffusion_model\.(\w+?)\.(\d+)\..*transformer_blocks\.(\d+)\.",
                                             mapped).groups()
            layers.append(((_SECTIONS[section], int(index), int(block)), source.removesuffix(".to_k.weight")))
    return [name for _, name in sorted(layers)]


def pipeline_fingerprints(pipe) -> dict[str, str]:
    """The unet and text_encoder fingerprints this project gives the same weights (float32)."""
    unet = {k.removeprefix("model.diffusion_model."): v.float() for k, v in unet_names(pipe.unet.state_dict()).items()}
    text = text_encoder_names(pipe.text_encoder.state_dict(), pipe.text_encoder.config.to_dict())
    text = {k.removeprefix("cond_stage_model."): v.float() for k, v in text.items()}
    return {"unet": fingerprint_tensors(unet), "text_encoder": fingerprint_tensors(text)}


def apply_concepts(pipe, files: Sequence[str | Path | Concept], covariance: str | Path, betas=None, taus=None,
                   tokens: Sequence[str] | None = None, exact: bool = True) -> AppliedConcepts:
    """Put concepts into `pipe` (local key-locking, Eq. 3 at every token); returns their prompt words.

    `betas`/`taus`: one value or one per concept; None takes each concept's stored recommendation
    (scripts/evaluate_concept.py), else the defaults. `tokens`: the new words (default `<file stem>`).
    `covariance`: the file the concepts were trained with (its fingerprint is checked).
    """
    from ldm.evaluation.harness import choose_gates
    from ldm.inference import compare_fingerprints, per_concept, read_concepts

    if getattr(pipe, "_perfusion", None) is not None:
        raise UserError("this pipeline already has Perfusion concepts; remove_concepts(pipe) first")
    files = [files] if isinstance(files, (str, Path, Concept)) else list(files)
    concepts, names = read_concepts(files)
    n = len(concepts)
    if tokens is None:
        tokens = [f"<{Path(f).stem}>" if not isinstance(f, Concept) else f"<concept-{i + 1}>" for i, f in enumerate(files)]
    if len(tokens) != n or len(set(tokens)) != n:
        raise UserError(f"tokens needs {n} different words, one per concept, got {list(tokens)}")
    if any(c.method != "perfusion" for c in concepts):
        raise UserError("only Perfusion concepts with locked keys (method 'perfusion') go into a pipeline")
    betas = None if betas is None else per_concept(betas, n, "beta")
    taus = None if taus is None else per_concept(taus, n, "tau")
    betas, taus, _ = choose_gates(concepts, betas, taus)

    C, C_inv, _ = load_covariance(covariance)
    compare_fingerprints(pipeline_fingerprints(pipe) | {"covariance": fingerprint_tensors({"C": C})}, concepts, names,
                         "the pipeline's", _HINTS)
    layers = cross_attention_names(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    if any(len(c.o_star_v) != len(layers) for c in concepts):
        raise ConceptError(f"the concepts have {[len(c.o_star_v) for c in concepts]} value outputs, the U-Net "
                           f"{len(layers)} cross-attention layers")
    taken = [t for t in tokens if t in pipe.tokenizer.get_vocab()]
    if taken:
        raise UserError(f"{taken[0]!r} is already a word of the pipeline's tokenizer; choose other tokens")

    encoder = pipe.text_encoder
    applied = AppliedConcepts(list(tokens), betas, taus, copy.deepcopy(pipe.tokenizer),
                              encoder.get_input_embeddings(), encoder.config.vocab_size, dict(pipe.unet.attn_processors))
    pipe.tokenizer.add_tokens(list(tokens))
    ids = pipe.tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(applied.embeddings.num_embeddings, applied.embeddings.num_embeddings + n)):
        raise UserError(f"the tokenizer gave the new tokens ids {ids}, not the rows after the text encoder's "
                        f"{applied.embeddings.num_embeddings}")
    # a new embedding module, so that the old one (restored by remove_concepts) is never touched
    old = applied.embeddings.weight
    rows = torch.stack([c.embedding for c in concepts]).to(old)
    encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.cat([old.detach(), rows]), freeze=True))
    encoder.config.vocab_size = len(pipe.tokenizer)

    device = pipe.unet.device
    i_star = torch.stack([c.i_star for c in concepts]).float().to(device)
    i_super = torch.stack([c.i_super for c in concepts]).float().to(device)
    processors = dict(applied.processors)
    for index, name in enumerate(layers):
        attn = modules[name]
        o_key = i_super @ attn.to_k.weight.float().T          # key-locking: o*_K = W_K i_super
        o_value = torch.stack([c.o_star_v[index] for c in concepts]).float().to(device)
        processors[f"{name}.processor"] = PerfusionAttnProcessor(i_star, o_key, o_value, C_inv.to(device),
                                                                 betas, taus, exact)
    pipe.unet.set_attn_processor(processors)
    pipe._perfusion = applied
    return applied


def remove_concepts(pipe) -> None:
    """Undo `apply_concepts`: the tokenizer, the text encoder's embeddings and the processors as before."""
    applied = getattr(pipe, "_perfusion", None)
    if applied is None:
        raise UserError("this pipeline has no Perfusion concepts to remove")
    pipe.tokenizer = applied.tokenizer
    pipe.text_encoder.set_input_embeddings(applied.embeddings)
    pipe.text_encoder.config.vocab_size = applied.vocab_size
    pipe.unet.set_attn_processor(applied.processors)
    pipe._perfusion = None
