"""Perfusion concepts in a diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline`
(diffusers is an optional extra).

    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd-folder", torch_dtype=torch.float32)
    applied = apply_concepts(pipe, ["teddy.safetensors"], covariance="ckpt/covariance.safetensors")
    image = pipe(f"a photo of {applied.tokens[0]} on the beach").images[0]
    remove_concepts(pipe)

Each concept's embedding becomes a new token of the pipeline's tokenizer and text encoder, and
every cross-attention layer (attn2) gets a processor whose keys and values are Eq. 3's gated
rank-1 edit (`gated_rank1_edit`, Appendix B for several concepts) with locked keys
o*_K = W_K i_super. Fingerprints are those of the pipeline's float32 weights under this project's
names, so a concept is checked against the pipeline exactly as against a checkpoint.

In an SDXL pipeline the concept's 2048-d row is split between the two text encoders (768 + 1280),
and the pooled embedding is the superclass prompt's (the word in place of each concept's token),
as PerfusionSDXL conditions: the pipeline's `encode_prompt` is wrapped to compute it.
"""
from __future__ import annotations

import copy
import inspect
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
    tokenizers: list                 # the pipeline's tokenizer(s) before the tokens were added
    embeddings: list                 # each text encoder's input embeddings before
    vocab_sizes: list[int]
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


def text_encoders(pipe) -> list:
    """The pipeline's text encoders: one (SD 1.x / 2.x) or two (SDXL)."""
    second = getattr(pipe, "text_encoder_2", None)
    return [pipe.text_encoder] + ([second] if second is not None else [])


def tokenizers(pipe) -> list:
    second = getattr(pipe, "tokenizer_2", None)
    return [pipe.tokenizer] + ([second] if second is not None else [])


def pipeline_fingerprints(pipe) -> dict[str, str]:
    """The unet and text_encoder fingerprints this project gives the same weights (float32)."""
    unet = {k.removeprefix("model.diffusion_model."): v.float() for k, v in unet_names(pipe.unet.state_dict()).items()}
    encoders = text_encoders(pipe)
    text = {}
    for i, encoder in enumerate(encoders):
        text.update(text_encoder_names(encoder.state_dict(), encoder.config.to_dict(),
                                       f"embedders.{i}." if len(encoders) == 2 else ""))
    if len(encoders) == 2:   # the weights SDXLConditioner never reads (CLIP's last layer) are left out
        unused = set(_sdxl_conditioner(*encoders).unused_keys())
        text = {k: v for k, v in text.items() if k not in unused}
    return {"unet": fingerprint_tensors(unet), "text_encoder": fingerprint_tensors({k: v.float() for k, v in text.items()})}


def _sdxl_conditioner(clip, big):
    """An SDXLConditioner of the two encoders' shapes, on the meta device (for its parameter names)."""
    from ldm.modules.sdxl_conditioner import SDXLConditioner

    a, b = clip.config, big.config
    with torch.device("meta"):
        return SDXLConditioner(
            clip=dict(width=a.hidden_size, layers=a.num_hidden_layers, heads=a.num_attention_heads,
                      intermediate_size=a.intermediate_size, max_length=a.max_position_embeddings),
            openclip=dict(width=b.hidden_size, layers=b.num_hidden_layers, heads=b.num_attention_heads,
                          embed_dim=b.projection_dim, max_length=b.max_position_embeddings))


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
    taken = [t for t in tokens if any(t in tok.get_vocab() for tok in tokenizers(pipe))]
    if taken:
        raise UserError(f"{taken[0]!r} is already a word of the pipeline's tokenizer; choose other tokens")

    encoders = text_encoders(pipe)
    widths = [e.get_input_embeddings().embedding_dim for e in encoders]
    if any(c.embedding.numel() != sum(widths) for c in concepts):
        raise ConceptError(f"the concepts' embeddings have {[c.embedding.numel() for c in concepts]} values, the "
                           f"pipeline's text encoders take {' + '.join(map(str, widths))}")
    applied = AppliedConcepts(list(tokens), betas, taus, [copy.deepcopy(t) for t in tokenizers(pipe)],
                              [e.get_input_embeddings() for e in encoders], [e.config.vocab_size for e in encoders],
                              dict(pipe.unet.attn_processors))
    rows = torch.stack([c.embedding for c in concepts]).split(widths, dim=1)   # SDXL: 768 + 1280
    for tokenizer, encoder, old, part in zip(tokenizers(pipe), encoders, applied.embeddings, rows):
        tokenizer.add_tokens(list(tokens))
        ids = tokenizer.convert_tokens_to_ids(list(tokens))
        if ids != list(range(old.num_embeddings, old.num_embeddings + n)):
            raise UserError(f"the tokenizer gave the new tokens ids {ids}, not the rows after the text encoder's "
                            f"{old.num_embeddings}")
        # a new embedding module, so that the old one (restored by remove_concepts) is never touched
        weight = torch.cat([old.weight.detach(), part.to(old.weight)])
        encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight, freeze=True))
        encoder.config.vocab_size = len(tokenizer)
    if len(encoders) == 2:
        pipe.encode_prompt = _superclass_pooled(pipe.encode_prompt, dict(zip(tokens, (c.superclass for c in concepts))))

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


def _superclass_pooled(encode_prompt, words: dict[str, str]):
    """`encode_prompt` of an SDXL pipeline, whose pooled embedding is the superclass prompt's: each
    concept token replaced by its superclass word (the encodings stay the concept prompt's)."""
    signature = inspect.signature(encode_prompt)
    pattern = re.compile("|".join(re.escape(t) for t in words))

    def to_super(text):
        if text is None:
            return None
        return pattern.sub(lambda m: words[m.group(0)], text) if isinstance(text, str) else [to_super(t) for t in text]

    def wrapped(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        out = encode_prompt(*call.args, **call.kwargs)
        prompt, prompt_2 = call.arguments.get("prompt"), call.arguments.get("prompt_2")
        if prompt is None:   # the caller gave the embeddings
            return out
        call.arguments.update(prompt=to_super(prompt), prompt_2=to_super(prompt_2))
        pooled = encode_prompt(*call.args, **call.kwargs)[2]
        return out[0], out[1], pooled, out[3]

    return wrapped


def remove_concepts(pipe) -> None:
    """Undo `apply_concepts`: the tokenizer, the text encoder's embeddings and the processors as before."""
    applied = getattr(pipe, "_perfusion", None)
    if applied is None:
        raise UserError("this pipeline has no Perfusion concepts to remove")
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), applied.tokenizers):
        setattr(pipe, name, tokenizer)
    for encoder, embeddings, vocab_size in zip(text_encoders(pipe), applied.embeddings, applied.vocab_sizes):
        encoder.set_input_embeddings(embeddings)
        encoder.config.vocab_size = vocab_size
    pipe.__dict__.pop("encode_prompt", None)   # SDXL: the pipeline's own again
    pipe.unet.set_attn_processor(applied.processors)
    pipe._perfusion = None
