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

With several concepts under the "named" rule the edit must know where each concept's token sits:
the pipeline's `encode_prompt` is wrapped to append one channel per concept to the encodings (1 at
its token), the layout of `ConceptBank.pack`, which only the Perfusion processors read.

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

from ldm.errors import UserError
from ldm.interop.diffusers_folder import text_encoder_names, unet_names
from ldm.perfusion.concepts import Concept, ConceptError
from ldm.perfusion.covariance import load_covariance
from ldm.perfusion.edit import check_multi, gated_rank1_edit, needs_positions
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

    def __init__(self, i_star, o_key, o_value, C_inv, beta, tau, multi: str):
        self.targets = {i_star.device: (i_star, o_key, o_value, C_inv)}
        self.beta, self.tau, self.multi = beta, tau, multi
        self.marked = needs_positions(i_star.shape[0], "all", multi)   # encodings carry the tokens' positions
        self._seen: tuple | None = None   # (encodings, their version, K, V)

    def edited_key_value(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        version = None if context.is_inference() else context._version
        if self._seen is not None and self._seen[0] is context and self._seen[1] == version:
            return self._seen[2], self._seen[3]
        if context.device not in self.targets:
            self.targets[context.device] = tuple(t.to(context.device) for t in next(iter(self.targets.values())))
        i_star, o_key, o_value, C_inv = self.targets[context.device]
        d_in = attn.to_k.in_features
        e, positions = context[..., :d_in], None
        if self.marked:
            if context.shape[-1] != d_in + i_star.shape[0]:
                raise UserError("the prompt encodings do not mark the concepts' tokens, which the 'named' rule "
                                "needs: pass the prompt as text (or make prompt_embeds with pipe.encode_prompt after "
                                "apply_concepts), or apply the concepts with multi='separate'")
            positions = context[..., d_in:] > 0.5
        edit = dict(i_star=i_star, C_inv=C_inv, beta=self.beta, tau=self.tau, multi=self.multi, positions=positions)
        key = gated_rank1_edit(e, attn.to_k.weight, o_star=o_key, **edit).to(e.dtype)
        value = gated_rank1_edit(e, attn.to_v.weight, o_star=o_value, **edit).to(e.dtype)
        self._seen = (context, version, key, value)
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
    for i, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers(pipe))):
        state = dict(encoder.state_dict())
        rows = next(k for k in state if k.endswith("token_embedding.weight"))
        state[rows] = state[rows][:tokenizer.vocab_size]   # rows a textual inversion added are not the base model's
        text.update(text_encoder_names(state, encoder.config.to_dict(), f"embedders.{i}." if len(encoders) == 2 else ""))
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
                   tokens: Sequence[str] | None = None, multi: str = "named") -> AppliedConcepts:
    """Put concepts into `pipe` (local key-locking, Eq. 3 at every token); returns their prompt words.

    `betas`/`taus`: one value or one per concept; None takes each concept's stored recommendation
    (scripts/evaluate_concept.py), else the defaults. `tokens`: the new words (default `<file stem>`).
    `covariance`: the file the concepts were trained with (its fingerprint is checked). `multi`: the
    rule for several concepts, as `load_concepts` takes it. Everything is checked before the pipeline
    is changed: a refused list leaves it as it was.
    """
    from ldm.perfusion.gate_settings import choose_gates, per_concept
    from ldm.perfusion.inference import check_independent, compare_fingerprints, read_concepts

    if getattr(pipe, "_perfusion", None) is not None:
        raise UserError("this pipeline already has Perfusion concepts; remove_concepts(pipe) first")
    check_multi(multi)
    files = [files] if isinstance(files, (str, Path, Concept)) else list(files)
    if not files:
        raise UserError("apply_concepts needs at least one concept file")
    concepts, names = read_concepts(files)
    n = len(concepts)
    if tokens is None:
        tokens = [f"<{Path(f).stem}>" if not isinstance(f, Concept) else f"<concept-{i + 1}>" for i, f in enumerate(files)]
    if len(tokens) != n or len(set(tokens)) != n:
        raise UserError(f"tokens needs {n} different words, one per concept, got {list(tokens)}")
    if any(not isinstance(t, str) or not t or t != t.strip() or len(t.split()) != 1 for t in tokens):
        raise UserError(f"tokens must be single words without spaces (e.g. '<my-teddy>'), got {list(tokens)}")
    if any(c.method != "perfusion" for c in concepts):
        raise UserError("only Perfusion concepts with locked keys (method 'perfusion') go into a pipeline")
    betas = None if betas is None else per_concept(betas, n, "beta")
    taus = None if taus is None else per_concept(taus, n, "tau")
    betas, taus, _ = choose_gates(concepts, betas, taus, names=names)

    C, C_inv, _ = load_covariance(covariance)
    compare_fingerprints(pipeline_fingerprints(pipe) | {"covariance": fingerprint_tensors({"C": C})}, concepts, names,
                         "the pipeline's", _HINTS)
    if n > 1:
        check_independent(concepts, names, C_inv, multi)
    layers = cross_attention_names(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    if any(len(c.o_star_v) != len(layers) for c in concepts):
        raise ConceptError(f"the concepts have {[len(c.o_star_v) for c in concepts]} value outputs, the U-Net "
                           f"{len(layers)} cross-attention layers")
    encoders = text_encoders(pipe)
    widths = [e.get_input_embeddings().embedding_dim for e in encoders]
    if any(c.embedding.numel() != sum(widths) for c in concepts):
        raise ConceptError(f"the concepts' embeddings have {[c.embedding.numel() for c in concepts]} values, the "
                           f"pipeline's text encoders take {' + '.join(map(str, widths))}")
    extended, ids = _extended_tokenizers(pipe, encoders, list(tokens))

    # every check passed: change the pipeline
    applied = AppliedConcepts(list(tokens), betas, taus, tokenizers(pipe),
                              [e.get_input_embeddings() for e in encoders], [e.config.vocab_size for e in encoders],
                              dict(pipe.unet.attn_processors))
    rows = torch.stack([c.embedding for c in concepts]).split(widths, dim=1)   # SDXL: 768 + 1280
    for name, tokenizer, encoder, old, part in zip(("tokenizer", "tokenizer_2"), extended, encoders,
                                                   applied.embeddings, rows):
        setattr(pipe, name, tokenizer)
        # a new embedding module, so that the old one (restored by remove_concepts) is never touched
        weight = torch.cat([old.weight.detach(), part.to(old.weight)])
        encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight, freeze=True))
        encoder.config.vocab_size = len(tokenizer)
    marked = needs_positions(n, "all", multi)
    if len(encoders) == 2 or marked:
        words = dict(zip(tokens, (c.superclass for c in concepts)))
        pipe.encode_prompt = _concept_encode_prompt(pipe.encode_prompt, words, len(encoders) == 2, extended,
                                                    ids if marked else None)

    device = pipe.unet.device
    i_star = torch.stack([c.i_star for c in concepts]).float().to(device)
    i_super = torch.stack([c.i_super for c in concepts]).float().to(device)
    processors = dict(applied.processors)
    for index, name in enumerate(layers):
        attn = modules[name]
        o_key = i_super @ attn.to_k.weight.float().T          # key-locking: o*_K = W_K i_super
        o_value = torch.stack([c.o_star_v[index] for c in concepts]).float().to(device)
        processors[f"{name}.processor"] = PerfusionAttnProcessor(i_star, o_key, o_value, C_inv.to(device),
                                                                 betas, taus, multi)
    pipe.unet.set_attn_processor(processors)
    pipe._perfusion = applied
    return applied


def _extended_tokenizers(pipe, encoders, tokens: list[str]) -> tuple[list, list[list[int]]]:
    """Copies of the pipeline's tokenizers with `tokens` added, each read as one word and given the rows
    after its text encoder's, and their ids; refuses (the pipeline unchanged) where that cannot be."""
    extended, ids = [], []
    for tokenizer, encoder in zip(tokenizers(pipe), encoders):
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken:
            raise UserError(f"{taken[0]!r} is already a word of the pipeline's tokenizer; choose other tokens")
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(tokens)
        rows = encoder.get_input_embeddings().num_embeddings
        found = tokenizer.convert_tokens_to_ids(tokens)
        if found != list(range(rows, rows + len(tokens))):
            raise UserError(f"{type(tokenizer).__name__} gave the new tokens ids {found}, not the rows after the "
                            f"text encoder's {rows}")
        split = [t for t, i in zip(tokens, found) if tokenizer.encode(f"a {t} b", add_special_tokens=False).count(i) != 1]
        if split:
            raise UserError(f"{type(tokenizer).__name__} does not read {split[0]!r} as one word; choose other tokens")
        extended.append(tokenizer)
        ids.append(found)
    return extended, ids


def _concept_encode_prompt(encode_prompt, words: dict[str, str], sdxl: bool, tokenizers_: list, ids: list | None):
    """`encode_prompt` of a pipeline with concepts. SDXL: the pooled embedding is the superclass prompt's
    (each concept token replaced by its superclass word; the encodings stay the concept prompt's).
    `ids` (per tokenizer, the concepts' token ids): the encodings and negative encodings get one more
    channel per concept, 1 where its token sits in the prompt (SDXL: in `prompt` or `prompt_2`)."""
    signature = inspect.signature(encode_prompt)
    pattern = re.compile("|".join(re.escape(t) for t in words))

    def to_super(text):
        if text is None:
            return None
        return pattern.sub(lambda m: words[m.group(0)], text) if isinstance(text, str) else [to_super(t) for t in text]

    def marks(texts: list, like: torch.Tensor) -> torch.Tensor:
        found = False
        for tokenizer, concept_ids, text in zip(tokenizers_, ids, texts):
            tokens = tokenizer(text, padding="max_length", max_length=like.shape[1], truncation=True,
                               return_tensors="pt").input_ids
            found = found | (tokens[..., None] == torch.tensor(concept_ids))
        # encode_prompt repeats each prompt's rows num_images_per_prompt times
        return found.to(like.device, like.dtype).repeat_interleave(like.shape[0] // found.shape[0], dim=0)

    def as_list(text, count: int) -> list[str]:
        text = text or ""
        return [text] * count if isinstance(text, str) else list(text)

    def wrapped(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        out = list(encode_prompt(*call.args, **call.kwargs))
        given = dict(call.arguments)
        if given.get("prompt") is None:   # the caller gave the embeddings
            return tuple(out)
        if sdxl:
            call.arguments.update(prompt=to_super(given["prompt"]), prompt_2=to_super(given.get("prompt_2")))
            out[2] = encode_prompt(*call.args, **call.kwargs)[2]
        if ids is not None:
            prompt = as_list(given["prompt"], 1)
            out[0] = torch.cat([out[0], marks([prompt, as_list(given.get("prompt_2"), 0) or prompt], out[0])], -1)
            if out[1] is not None:
                negative = as_list(given.get("negative_prompt"), len(prompt))
                negative_2 = as_list(given.get("negative_prompt_2"), 0) or negative
                out[1] = torch.cat([out[1], marks([negative, negative_2], out[1])], -1)
        return tuple(out)

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
