"""Trained Perfusion concepts at inference time: loading several into one model, checked first
(fingerprints, shapes, distinct i*), with their gate settings.

Each loaded concept gets its own placeholder token, picked from `PLACEHOLDER_TOKENS` at load
time, so concepts trained with the same placeholder ("*") can be combined in one prompt
(ldm.perfusion.prompts). Several concepts use Appendix B of Tewel et al. (2023) under the rule
`multi` (see gated_rank1_edit).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ldm.errors import PerfusionWarning, UserError
from ldm.perfusion.concepts import Concept, ConceptError, load_concept
from ldm.perfusion.edit import ConceptState, check_multi, superclass_keys
from ldm.perfusion.gate_settings import GateSettings
from ldm.perfusion.prompts import PLACEHOLDER_TOKENS, placeholder_tokens

FINGERPRINT_HINTS = {
    "unet": "another base checkpoint? pass the --ckpt it was trained from",
    "text_encoder": "another text encoder or SD version",
    "covariance": "another covariance: set model.params.covariance_path to the file it was trained with",
}


@dataclass
class LoadedConcepts:
    """What `load_concepts` put into the model, in load order (concept n is `{n+1}` in prompts)."""

    names: list[str]
    concepts: list[Concept]
    tokens: list[str]              # the placeholder token assigned to each concept
    token_ids: list[int]
    gates: GateSettings
    global_locking: bool
    multi: str
    gate_at: str = "all"
    state: ConceptState | None = None   # what the model's bank applies while these are loaded

    betas = property(lambda self: list(self.gates.betas))
    taus = property(lambda self: list(self.gates.taus))

    def describe(self) -> list[dict]:
        """Per-concept settings, for image metadata."""
        return [{"file": name, "token": tok, "trained_placeholder": c.placeholder, "superclass": c.superclass,
                 "beta": b, "tau": t}
                for name, c, tok, b, t in zip(self.names, self.concepts, self.tokens, self.betas, self.taus)]


def read_concepts(concepts: Sequence[str | Path | Concept], names: Sequence[str] | None = None
                  ) -> tuple[list[Concept], list[str]]:
    """Concept files (or Concept objects) and the names errors give them: their paths, or 'concept n'."""
    if names is None:
        names = [str(c) if not isinstance(c, Concept) else f"concept {i + 1}" for i, c in enumerate(concepts)]
    return [c if isinstance(c, Concept) else load_concept(c) for c in concepts], list(names)


def compare_fingerprints(mine: dict[str, str], concepts: Sequence[Concept], names: Sequence[str],
                         whose: str = "this model's", hints: dict[str, str] = FINGERPRINT_HINTS) -> None:
    """Refuse concepts whose unet, text_encoder or covariance fingerprint is not in `mine`."""
    for name, concept in zip(names, concepts):
        for part, value in mine.items():
            theirs = concept.fingerprints.get(part) or "none"
            if theirs != value:
                raise ConceptError(f"{name}: trained with {part} fingerprint {theirs}, but {whose} is "
                                   f"{value} ({hints[part]})")


def check_fingerprints(model, concepts: Sequence[Concept], names: Sequence[str]) -> None:
    """Refuse concepts trained on another U-Net, text encoder or covariance than `model` has."""
    model.ensure_covariance()
    compare_fingerprints(model.fingerprints(), concepts, names)


def _check_shapes(model, concept: Concept, name: str) -> None:
    bank = model.bank
    width = model.cond_stage_model.token_embedding.embedding_dim
    d_ctx = bank.values[0].in_features
    outs = [v.out_features for v in bank.values]
    found = (concept.embedding.shape, concept.i_star.shape, concept.i_super.shape,
             [tuple(v.shape) for v in concept.o_star_v])
    if found != ((width,), (d_ctx,), (d_ctx,), [(d,) for d in outs]):
        raise ConceptError(f"{name}: tensor shapes do not fit this model (embedding {tuple(found[0])}, i* "
                           f"{tuple(found[1])}, {len(found[3])} value outputs; expected ({width},), ({d_ctx},), "
                           f"{len(outs)})")
    if concept.o_star_k is not None and [tuple(k.shape) for k in concept.o_star_k] != [(k.out_features,) for k in bank.keys]:
        raise ConceptError(f"{name}: its {len(concept.o_star_k)} trained key outputs do not fit this model's "
                           f"{len(bank.keys)} cross-attention layers")


# The joint rule inverts G = I C^-1 I^T. With G at unit diagonal, the toy world's pairs of different
# superclasses have cond(G) 1.4-1.9 and work; its pairs of one superclass, 75-131, misplace looks
# (reports/toy-pairs). Above this, the joint rule warns.
JOINT_COND_LIMIT = 10.0


def i_star_correlations(concepts: Sequence[Concept], C_inv: torch.Tensor) -> torch.Tensor:
    """The i*'s correlations in C^-1's inner product: G = I C^-1 I^T at unit diagonal (N x N, float64)."""
    I = torch.stack([c.i_star for c in concepts]).double()
    G = I @ C_inv.double().cpu() @ I.T
    d = G.diagonal().sqrt()
    return G / (d[:, None] * d[None, :])


def check_independent(concepts: Sequence[Concept], names: Sequence[str], C_inv: torch.Tensor,
                      multi: str = "named") -> None:
    """Appendix B's projection needs linearly independent i*: refuse (near-)duplicates. The joint rule
    also warns (PerfusionWarning) where G is ill-conditioned (JOINT_COND_LIMIT)."""
    corr = i_star_correlations(concepts, C_inv)
    pairs = [(a, b) for a in range(len(concepts)) for b in range(a + 1, len(concepts))]
    for a, b in pairs:
        if corr[a, b].abs() > 1 - 1e-6:
            raise ConceptError(f"{names[a]} and {names[b]} have the same target input i* "
                               "(the same concept loaded twice?); load each concept once")
    cond = float(torch.linalg.cond(corr))
    if multi == "joint" and cond > JOINT_COND_LIMIT:
        a, b = max(pairs, key=lambda p: float(corr[p].abs()))
        warnings.warn(f"{names[a]} and {names[b]}: their i* correlate at {float(corr[a, b]):.3f} (cond(G) {cond:.0f} > "
                      f"{JOINT_COND_LIMIT:g}); the joint rule's gates are unreliable for concepts this alike (one "
                      "superclass): use the default rule, named", PerfusionWarning, stacklevel=3)


def check_concepts(model, concepts: Sequence[Concept], names: Sequence[str], multi: str = "named") -> None:
    """Everything `load_concepts` checks of concepts for `model`, before anything is loaded or sampled:
    methods that combine, fingerprints, tensor shapes, distinct i* (each concept once)."""
    methods = {c.method for c in concepts}
    if "embedding" in methods and len(methods) > 1:
        raise UserError("textual-inversion concepts (method 'embedding') cannot be combined with edited ones "
                         f"in one model: {', '.join(f'{nm}: {c.method}' for nm, c in zip(names, concepts))}")
    check_fingerprints(model, concepts, names)
    for concept, name in zip(concepts, names):
        _check_shapes(model, concept, name)
    if len(concepts) > 1:
        check_independent(concepts, names, model.bank.C_inv, multi)


def load_concepts(model, concepts: Sequence[str | Path | Concept], betas=0.7, taus=0.15,
                  global_locking: bool = False, multi: str = "named", names: Sequence[str] | None = None,
                  gate_at: str = "all") -> LoadedConcepts:
    """Load concept files (or Concept objects; one or a list) into a PerfusionLatentDiffusion for sampling.

    Replaces whatever was loaded before. `betas`/`taus`: one value or one per concept.
    `global_locking`: keys see the prompt with each concept's superclass word (Sec. 4 of the paper).
    `multi`: the rule for several concepts (`MULTI`, see gated_rank1_edit): "named" (the default: at each
    placeholder only its own concept edits; elsewhere Appendix B), "separate" (Appendix B as written),
    "joint" (gates from the exact projection's coordinates) or "approx" (the authors' approximation).
    `gate_at`: "all" (Eq. 3 at every token, the paper's rule) or "concept" (the gated edit only at
    each concept's own placeholder token; every other token gets the base projection).
    """
    if isinstance(concepts, (str, Path, Concept)):   # one concept
        concepts = [concepts]
    if gate_at not in ("all", "concept"):
        raise UserError(f"gate_at must be 'all' or 'concept', got {gate_at!r}")
    check_multi(multi)
    if not hasattr(model, "bank"):
        raise UserError(f"{type(model).__name__} cannot take Perfusion concepts; use a config whose model.target "
                         "is ldm.perfusion.model.PerfusionLatentDiffusion")
    n = len(concepts)
    if not 1 <= n <= len(PLACEHOLDER_TOKENS):
        raise UserError(f"{n} concepts given; load 1 to {len(PLACEHOLDER_TOKENS)} at once")
    gates = GateSettings.of(betas, taus, n, model.device)
    loaded, names = read_concepts(concepts, names)
    check_concepts(model, loaded, names, multi)
    methods = {c.method for c in loaded}
    tokens, ids = placeholder_tokens(model.cond_stage_model.tokenizer, n)

    device = model.bank.C_inv.device
    bank = model.bank
    state = dict(rows={i: c.embedding.to(device, model.embedding.dtype) for i, c in zip(ids, loaded)},
                 words={i: (tok, c.superclass) for i, tok, c in zip(ids, tokens, loaded)}, multi=multi)
    edited = methods != {"embedding"}   # textual inversion: only the placeholder rows change
    if edited:
        i_star = torch.stack([c.i_star for c in loaded]).to(device, torch.float32)
        i_super = torch.stack([c.i_super for c in loaded]).to(device, torch.float32)
        o_value = [torch.stack([c.o_star_v[layer] for c in loaded]).to(device, torch.float32)
                   for layer in range(len(bank.values))]
        o_key = None
        if "trained_keys" in methods:   # the ablation's learned keys; locked ones stay W_K i_super
            locked = superclass_keys(bank.keys, i_super)
            o_key = [torch.stack([c.o_star_k[layer].to(device, torch.float32) if c.method == "trained_keys"
                                  else locked[layer][j] for j, c in enumerate(loaded)])
                     for layer in range(len(bank.keys))]
        state.update(bank.targets(i_star, i_super, o_value, gates, o_key=o_key),
                     global_locking=global_locking, gate_at=gate_at)
    bank.state = ConceptState(**state)   # one assignment: what was loaded before is replaced whole
    return LoadedConcepts(list(names), loaded, tokens, ids, gates, global_locking and edited, multi,
                          gate_at if edited else "all", bank.state)


def set_gates(model, loaded: LoadedConcepts, betas, taus) -> None:
    """Change beta/tau of the loaded concepts (no reloading)."""
    if model.bank.state is not loaded.state:
        raise UserError("these concepts are no longer loaded in the model (unloaded, or replaced by another "
                        "load_concepts); load them again")
    gates = GateSettings.of(betas, taus, len(loaded.concepts), model.device)
    if model.bank.active:   # textual-inversion concepts have no gates
        model.bank.set_gates(gates)
    loaded.gates, loaded.state = gates, model.bank.state


def unload_concepts(model) -> None:
    """Back to the base model: outputs are then bit-identical to a plain LatentDiffusion's."""
    model.bank.state = ConceptState(unloaded=frozenset(word for word, _ in model.bank.state.words.values()))


def parse_numbers(text: str, flag: str) -> list[float]:
    """'0.7' or '0.7,0.6' from a command-line flag; one line naming the flag otherwise."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a number or a comma-separated list of numbers (e.g. 0.7,0.6)") from None


def read_prompt_file(path: str | Path, flag: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file of prompts (or templates), one per line."""
    from ldm.errors import MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{flag} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: not a UTF-8 text file (expected one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{flag} {path}: no prompts in it (one per line)")
    return prompts
