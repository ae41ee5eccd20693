"""Concept files: the ~60 KB a trained Perfusion concept consists of, as safetensors.

Tensors: `embedding` (the placeholder's word embedding), `i_star` and `i_super` (target
inputs: concept and superclass encodings), `o_star_v.<l>` (one learned value output per
cross-attention layer). Key outputs are not stored: key-locking makes them W_K i_super.
The covariance is referenced by fingerprint, never copied in.

Metadata `method` says how the concept was trained (the paper's ablations, for comparison):
"perfusion" (locked keys), "trained_keys" (adds `o_star_k.<l>`, learned key outputs) or
"embedding" (textual inversion: only the word embedding is used; the rank-1 edit is off).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.util import atomic_path

FORMAT = "perfusion-concept"
VERSION = 1
METHODS = ("perfusion", "trained_keys", "embedding")


class ConceptError(UserError):
    """A concept file that cannot be used; the message is one line naming the file."""


@dataclass
class Concept:
    embedding: torch.Tensor            # (d_token,)
    i_star: torch.Tensor               # (d_ctx,)
    i_super: torch.Tensor              # (d_ctx,)
    o_star_v: list[torch.Tensor]       # one (d_out_l,) per cross-attention layer
    placeholder: str
    superclass: str
    train_beta: float
    train_tau: float
    fingerprints: dict[str, str] = field(default_factory=dict)  # unet, text_encoder, covariance
    extra: dict[str, str] = field(default_factory=dict)
    method: str = "perfusion"          # one of METHODS
    o_star_k: list[torch.Tensor] | None = None   # "trained_keys" only: one learned key output per layer

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"embedding": self.embedding, "i_star": self.i_star, "i_super": self.i_super}
        out.update({f"o_star_v.{i}": v for i, v in enumerate(self.o_star_v)})
        out.update({f"o_star_k.{i}": k for i, k in enumerate(self.o_star_k or [])})
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_concept(path: str | Path, concept: Concept) -> Path:
    """Write atomically; refuses non-finite values so a NaN never reaches a saved concept."""
    from safetensors.torch import save_file

    tensors = concept.tensors()
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ConceptError(f"{path}: not saved, the concept has NaN/inf values in {', '.join(bad[:3])}")
    metadata = {
        "format": FORMAT, "version": str(VERSION),
        "placeholder": concept.placeholder, "superclass": concept.superclass,
        "train_beta": repr(float(concept.train_beta)), "train_tau": repr(float(concept.train_tau)),
        "fingerprints": json.dumps(concept.fingerprints, sort_keys=True),
        "extra": json.dumps(concept.extra, sort_keys=True), "method": concept.method,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_concept(path: str | Path) -> Concept:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"{path}: no such concept file" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        with open(path, "rb") as f:
            head = f.read(2)
        if head in (b"PK", b"\x80\x02"):   # a zip or pickle: a PyTorch/Lightning checkpoint
            raise ConceptError(f"{path}: a PyTorch checkpoint, not a concept file (a run's concept is "
                               "concepts/last.safetensors; checkpoints/last.ckpt is its resume state)") from None
        raise ConceptError(f"{path}: not a readable safetensors concept file (truncated or corrupt?): {err}")
    if meta.get("format") != FORMAT:
        raise ConceptError(f"{path}: not a Perfusion concept (metadata format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise ConceptError(f"{path}: concept format version {meta.get('version')!r}, this code reads {VERSION}")
    missing = [k for k in ("embedding", "i_star", "i_super", "o_star_v.0") if k not in tensors]
    if missing:
        raise ConceptError(f"{path}: missing tensors {', '.join(missing)}")
    unknown = sorted(k for k in tensors if k not in ("embedding", "i_star", "i_super")
                     and not re.fullmatch(r"o_star_[vk]\.\d+", k))
    if unknown:
        raise ConceptError(f"{path}: unknown tensor {unknown[0]!r}; a concept holds embedding, i_star, i_super, "
                           "o_star_v.<layer> (and o_star_k.<layer>)")
    not_float = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if not_float:
        raise ConceptError(f"{path}: tensor {not_float[0]} is {tensors[not_float[0]].dtype}; expected floating point")
    layers = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("o_star_v."))
    if layers != list(range(len(layers))):
        raise ConceptError(f"{path}: o_star_v layers are not numbered 0..{len(layers) - 1}")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ConceptError(f"{path}: NaN/inf values in {', '.join(bad[:3])}")
    method = meta.get("method", "perfusion")
    if method not in METHODS:
        raise ConceptError(f"{path}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    keys = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("o_star_k."))
    if (method == "trained_keys") != bool(keys) or (keys and keys != layers):
        raise ConceptError(f"{path}: method {method!r} needs o_star_k.0..{len(layers) - 1} exactly when its keys "
                           f"are trained, found {len(keys)} o_star_k tensors")
    try:
        fingerprints, extra = json.loads(meta.get("fingerprints", "{}")), json.loads(meta.get("extra", "{}"))
    except ValueError as err:
        raise ConceptError(f"{path}: metadata 'fingerprints' or 'extra' is not JSON ({err})")
    for key, value in (("fingerprints", fingerprints), ("extra", extra)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConceptError(f"{path}: metadata {key!r} must be a JSON object of text values, got {value!r}")
    try:
        return Concept(
            embedding=tensors["embedding"], i_star=tensors["i_star"], i_super=tensors["i_super"],
            o_star_v=[tensors[f"o_star_v.{i}"] for i in layers],
            placeholder=meta["placeholder"], superclass=meta["superclass"],
            train_beta=float(meta["train_beta"]), train_tau=float(meta["train_tau"]),
            fingerprints=fingerprints, extra=extra,
            method=method, o_star_k=[tensors[f"o_star_k.{i}"] for i in keys] or None,
        )
    except (KeyError, ValueError) as err:
        raise ConceptError(f"{path}: bad concept metadata ({err})")
