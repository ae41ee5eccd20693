"""Perfusion's gated rank-1 edit of the cross-attention K and V projections.

Tewel, Gal, Chechik, Atzmon, "Key-Locked Rank One Editing for Text-to-Image Personalization",
SIGGRAPH 2023 (arXiv 2305.01644): Eq. 3 for one concept, Appendix B for several.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.perfusion.gate_settings import GateSettings


def _per_concept(value, n: int, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise UserError(f"{name} needs 1 or {n} values (one per concept), got {t.numel()}")
    return t


GATE_AT = ("all", "all_detached", "concept")   # where the gated edit applies (see gated_rank1_edit)
# Several concepts (Appendix B): what each gate reads and what e loses (see gated_rank1_edit)
MULTI = ("named", "separate", "joint", "approx")


def check_multi(multi: str) -> str:
    if multi not in MULTI:
        raise UserError(f"the multi-concept rule must be one of {', '.join(MULTI)}, got {multi!r}")
    return multi


def sim_probes(i_star: torch.Tensor, C_inv: torch.Tensor, device, dtype, joint: bool = False) -> torch.Tensor:
    """Rows p_n with sim_n(e) = p_n . e. Separate (Eq. 3 for each concept): p_n = C^-1 i*_n / (i*_n^T C^-1 i*_n).
    Joint: the rows of G^-1 I C^-1 with G = I C^-1 I^T, the coordinates in the basis i*_1..i*_N of e's
    C^-1-projection onto their span, so that sim_n(i*_m) is 1 for n = m and 0 otherwise (for N = 1 the
    two agree). Formed in float64 (C^-1 can be ill-conditioned; the result is tiny, N x d_in), returned
    in `dtype`."""
    wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
    I, C_inv = i_star.to(device, wide), C_inv.to(device, wide)
    CI = I @ C_inv                                                    # rows i*_n^T C^-1
    # solve_ex: no check of the result on the host (a synchronisation); the i* are checked at load time
    probes = torch.linalg.solve_ex(CI @ I.T, CI)[0] if joint else CI / (CI * I).sum(-1, keepdim=True)
    return probes.to(dtype)


def concept_gates(e: torch.Tensor, i_star: torch.Tensor, C_inv: torch.Tensor, beta, tau, joint: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim, gate), each (B, T, N) in float32 or wider: Eq. 3's sim_n(e) (`joint`: see sim_probes) and
    sigmoid((sim - beta) / tau) at every token, for each of the N concepts. beta and tau (a number or
    N; tensors on e's device are used as they are) are checked where they enter (GateSettings), not
    here: this runs in every edited layer, and a check of tensor values would wait for the device."""
    n = i_star.shape[0]
    dtype = torch.promote_types(e.dtype, torch.float32)
    beta = _per_concept(beta, n, "beta", e.device).to(dtype)
    tau = _per_concept(tau, n, "tau", e.device).to(dtype)
    with torch.autocast(e.device.type, enabled=False):
        sim = e.to(dtype) @ sim_probes(i_star, C_inv, e.device, dtype, joint).T
        return sim, torch.sigmoid((sim - beta) / tau)


def shared_tokens(n: int, gate_at: str) -> bool:
    """Whether a token can be edited by more than one concept (the case Appendix B and `multi` decide)."""
    return n > 1 and gate_at != "concept"


def needs_positions(n: int, gate_at: str, multi: str) -> bool:
    """Whether the edit must know where each concept's placeholder sits."""
    return gate_at != "all" or (shared_tokens(n, gate_at) and multi == "named")


def rule_gates(e: torch.Tensor, i_star: torch.Tensor, C_inv: torch.Tensor, beta, tau, multi: str = "named",
               positions: torch.Tensor | None = None, gate_at: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """(sim, gate) (B, T, N): `concept_gates` at every token as the `multi` rule reads them where a token
    can be edited by several concepts (`shared_tokens`; see gated_rank1_edit); `positions` (B, T, N) bool,
    where concept n's placeholder sits, for "named"."""
    shared = shared_tokens(i_star.shape[0], gate_at)
    sim, gate = concept_gates(e, i_star, C_inv, beta, tau, joint=shared and check_multi(multi) == "joint")
    if shared and multi == "named":   # a placeholder's token is its own concept's alone
        own = positions.any(-1, keepdim=True)
        return torch.where(own, sim * positions, sim), torch.where(own, gate * positions, gate)
    return sim, gate


def _exact_projection(e: torch.Tensor, i_star: torch.Tensor, C_inv: torch.Tensor) -> torch.Tensor:
    """Appendix B's e_perp: e less its C^-1-projection onto span{i*_n}, via C^-1 = L L^T, Q R = L^T I^T,
    u_n = L^-T q_n, e_perp = e - sum_n u_n (u_n^T C^-1 e). Factorised in float64 (float32 on mps)."""
    wide = torch.float32 if e.device.type == "mps" else torch.float64
    I, C_inv = i_star.to(e.device, wide), C_inv.to(e.device, wide)
    L = torch.linalg.cholesky_ex(C_inv)[0]                    # C^-1 is checked positive definite when loaded
    Q, _ = torch.linalg.qr(L.T @ I.T)                         # (d_in, N), orthonormal columns
    U = torch.linalg.solve_triangular(L.T, Q, upper=True)     # u_n = L^-T q_n
    return e - (e @ (C_inv @ U).to(e.dtype)) @ U.to(e.dtype).T


def gated_rank1_edit(e: torch.Tensor, weight: torch.Tensor, i_star: torch.Tensor, o_star: torch.Tensor,
                     C_inv: torch.Tensor, beta, tau, multi: str = "named", positions: torch.Tensor | None = None,
                     gate_at: str = "all") -> torch.Tensor:
    """W'(e) for encodings e (B, T, d_in): returns (B, T, d_out) in float32 or wider.

    N = 1 (Eq. 3):
        sim(e)  = i*^T C^-1 e / (i*^T C^-1 i*)
        W'(e)   = W (e - sim(e) i*) + sigmoid((sim(e) - beta) / tau) o*
    N > 1 (Appendix B): W'(e) = W e_perp + sum_n gate_n(e) o*_n, where `multi` says what e_perp and the
    gates are:
        separate: Appendix B as written. e_perp = e less its C^-1-projection onto span{i*_n} (exact,
                  Cholesky/QR), each gate from its own concept's Eq. 3 sim_n. Where the i* are far from
                  C^-1-orthogonal (two concepts of one superclass) one concept's token opens the other's
                  gate too.
        named:    the default, and not in the paper: at concept n's placeholder only concept n edits, as if
                  it were loaded alone (Eq. 3); every other token is edited as by `separate`. Needs
                  `positions`.
        joint:    not in the paper: the gates read the coordinates of the exact projection in the basis
                  i*_n (`sim_probes`), so e_perp = e - sum_n sim_n(e) i*_n. Unbounded when the i* nearly
                  coincide (G = I C^-1 I^T ill-conditioned).
        approx:   the authors' cheaper form W e_perp ~ W e - sum_n sim_n(e) W i*_n, separate gates.
    `weight` (d_out, d_in), `i_star` (N, d_in), `o_star` (N, d_out), `C_inv` (d_in, d_in);
    `beta`, `tau`: a float or N values.

    `gate_at`: "all" is Eq. 3 at every token (the paper's rule, the default); with `positions`
    (B, T, N) bool, where concept n's placeholder sits, "all_detached" is the same forward but sim
    is a constant for autograd away from the placeholder (training cannot shape the gate at other
    tokens), and "concept" edits only the placeholder's own tokens (W e elsewhere).
    """
    if i_star.dim() != 2 or o_star.dim() != 2 or i_star.shape[0] != o_star.shape[0]:
        raise ValueError(f"i_star (N, d_in) and o_star (N, d_out) must list the same concepts, "
                         f"got {tuple(i_star.shape)} and {tuple(o_star.shape)}")
    if gate_at not in GATE_AT:
        raise UserError(f"gate_at must be one of {', '.join(GATE_AT)}, got {gate_at!r}")
    if needs_positions(i_star.shape[0], gate_at, check_multi(multi)) and positions is None:
        raise ValueError(f"gate_at={gate_at!r} with multi={multi!r} needs the placeholder positions")
    shared = shared_tokens(i_star.shape[0], gate_at)
    sim, gate = placed_gates(e, i_star, C_inv, beta, tau, multi, positions, gate_at)
    dtype = sim.dtype
    with torch.autocast(e.device.type, enabled=False):
        e, W = e.to(dtype), weight.to(dtype)
        own = None
        if not shared or multi != "separate":
            # W (e - sum_n sim_n i*_n) + sum_n gate_n o*_n, its rank-1 terms as one product: Eq. 3 for one concept
            # (and at a placeholder under "named"), the exact projection with joint coordinates, "approx"
            own = F.linear(e, W) + coefficients(sim, gate) @ rank1_terms(i_star, W, o_star)
            if not shared or multi in ("joint", "approx"):
                return own
        out = F.linear(_exact_projection(e, i_star, C_inv), W) + gate @ o_star.to(dtype)
        return out if own is None else torch.where(positions.any(-1, keepdim=True), own, out)


def placed_gates(e: torch.Tensor, i_star: torch.Tensor, C_inv: torch.Tensor, beta, tau, multi: str = "named",
                 positions: torch.Tensor | None = None, gate_at: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """(sim, gate) as the edit applies them: `rule_gates`, then `gate_at` (see gated_rank1_edit)."""
    sim, gate = rule_gates(e, i_star, C_inv, beta, tau, multi, positions, gate_at)
    if gate_at == "all_detached":
        return torch.where(positions, sim, sim.detach()), torch.where(positions, gate, gate.detach())
    if gate_at == "concept":
        return sim * positions, gate * positions
    return sim, gate


def coefficients(sim: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(B, T, 2N) [-sim(e), gate(e)], the rank-1 terms' coefficients (see rank1_terms)."""
    return torch.cat([-sim, gate], -1)


def rank1_terms(i_star: torch.Tensor, weight: torch.Tensor, o_star: torch.Tensor) -> torch.Tensor:
    """(2N, d_out) [W i*_n; o*_n] in `weight`'s dtype: Eq. 3 is W e + [-sim(e), gate(e)] @ these."""
    with torch.autocast(weight.device.type, enabled=False):
        return torch.cat([i_star.to(weight) @ weight.T, o_star.to(weight.dtype)])


def rank1_parts(e: torch.Tensor, i_star: torch.Tensor, C_inv: torch.Tensor, beta, tau,
                layers: Sequence[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor | None = None,
                gate_at: str = "all") -> tuple[torch.Tensor, ...]:
    """Eq. 3's rank-1 part, `gated_rank1_edit(e, weight, ...) - W e`, of every (weight, o_star) in `layers` at
    once, for concepts that never share a token (one concept, or gate_at "concept"): the context is the same
    for every layer, so it is one product [-sim, gate] @ [W_1 i*; o*_1 | W_2 i*; o*_2 | ...], split by layer."""
    sim, gate = placed_gates(e, i_star, C_inv, beta, tau, "named", positions, gate_at)
    with torch.autocast(e.device.type, enabled=False):
        terms = [rank1_terms(i_star, weight.to(sim.dtype), o_star) for weight, o_star in layers]
        return (coefficients(sim, gate) @ torch.cat(terms, dim=1)).split([t.shape[1] for t in terms], dim=-1)


def _version(t: torch.Tensor) -> int | None:
    """In-place changes seen by `t` (inference-mode tensors keep no counter: their identity alone is the key)."""
    return None if t.is_inference() else t._version


class Rank1EditLinear(nn.Linear):
    """A bias-free cross-attention projection (to_k or to_v) that Perfusion can edit.

    Keeps the base layer's `weight` (same parameter, same state-dict name). Without concepts
    it is exactly `F.linear(e, weight)`. With concepts it applies `gated_rank1_edit` with
    targets supplied by the shared `ConceptBank` for this layer index and role.
    """

    def __init__(self, base: nn.Linear, role: str, index: int):
        if base.bias is not None:
            raise ValueError("Perfusion edits bias-free projections (SD's to_k/to_v have no bias)")
        if role not in ("key", "value"):
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.role, self.index = role, index
        self.bank = None  # set by ConceptBank.attach; not a child module (no state-dict entries)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        if bank is None or not bank.active:
            return F.linear(e, self.weight)
        return bank.edit(self, e)


def patch_cross_attention(unet: nn.Module) -> list[tuple[Rank1EditLinear, Rank1EditLinear]]:
    """Replace to_k / to_v of every cross-attention layer (attn2) by Rank1EditLinear, in module order."""
    from ldm.modules.attention import cross_attention_layers

    pairs = []
    for index, (_, attn) in enumerate(cross_attention_layers(unet)):
        if not isinstance(attn.to_k, Rank1EditLinear):
            attn.to_k = Rank1EditLinear(attn.to_k, "key", index)
            attn.to_v = Rank1EditLinear(attn.to_v, "value", index)
        pairs.append((attn.to_k, attn.to_v))
    if not pairs:
        raise UserError("the U-Net has no cross-attention layers to edit")
    return pairs


def superclass_keys(layers: Sequence[Rank1EditLinear], i_super: torch.Tensor) -> list[torch.Tensor]:
    """Key-locking targets o*_K = W_K i_super, one (N, d_out) tensor per layer."""
    return [i_super.to(layer.weight.dtype) @ layer.weight.T for layer in layers]


@dataclass(frozen=True)
class ConceptState:
    """Everything the active concepts put into a model, as one value. The bank applies
    `ConceptBank.state`; loading, unloading and image logging replace it whole (or swap it
    for a while with `ConceptBank.use`), so no half of a state can stay behind."""

    rows: Mapping[int, torch.Tensor] = field(default_factory=dict)      # placeholder token id -> its embedding
    words: Mapping[int, tuple[str, str]] = field(default_factory=dict)  # token id -> (placeholder, superclass word)
    i_star: torch.Tensor | None = None          # (N, d_in); None: no edit (base model, textual inversion)
    o_key: tuple[torch.Tensor, ...] = ()        # per layer (N, d_out): W_K i_super, or trained keys
    o_value: tuple[torch.Tensor, ...] = ()      # per layer (N, d_out): o*_V
    gates: GateSettings | None = None           # beta and tau of the N concepts
    global_locking: bool = False
    multi: str = "named"                        # the rule for several concepts (gated_rank1_edit)
    gate_at: str = "all"
    unloaded: frozenset[str] = frozenset()      # placeholder words of concepts just unloaded (prompts must not use them)

    def __post_init__(self):
        if self.gate_at not in GATE_AT:
            raise UserError(f"gate_at must be one of {', '.join(GATE_AT)}, got {self.gate_at!r}")
        check_multi(self.multi)


class ConceptBank:
    """The edit targets that every Rank1EditLinear of one U-Net reads: C^-1 and `state`, a
    ConceptState holding, for N active concepts, i* (N, d_in), per-layer key targets
    o*_K = W_K i_super and value targets o*_V, and per-concept beta/tau.

    It also owns the layout of the context the edited layers receive (`pack` / `unpack`): the
    concept prompt's encodings, then, with `global_locking`, the superclass prompt's along the
    token axis (keys are its plain projections, W_K e_sup: the paper's global key-locking), and,
    when the edit needs them (`needs_positions`: `gate_at` other than "all", or several concepts under
    the "named" rule), the placeholder positions as N extra feature channels.

    With gradients disabled (sampling), each layer's output is cached for the last context
    tensor it saw: the encodings of a prompt do not change across denoising steps, so the
    edited keys and values are computed once per prompt. The samplers pass the same context
    tensor at every step; `cache = False` recomputes every call (same results, slower).
    A new state (`state = ...`, `set_gates`, `clear`, `use`) empties the cache.
    """

    def __init__(self, pairs: Sequence[tuple[Rank1EditLinear, Rank1EditLinear]], C_inv: torch.Tensor):
        self.keys = [k for k, _ in pairs]
        self.values = [v for _, v in pairs]
        for layer in self.keys + self.values:
            layer.bank = self
        self.C_inv = C_inv
        self.cache = True
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._packed: tuple | None = None   # (context, its version, rank-1 parts by layer) of the last training `pack`
        self.state = ConceptState()

    @property
    def state(self) -> ConceptState:
        return self._state

    @state.setter
    def state(self, state: ConceptState):
        self._state = state
        self._cache.clear()
        self._packed = None

    @contextmanager
    def use(self, state: ConceptState):
        """Apply `state` inside the block, then restore the one before (also after an error)."""
        previous, self.state = self.state, state
        try:
            yield state
        finally:
            self.state = previous

    # read-only views of the state
    i_star = property(lambda self: self._state.i_star)
    o_key = property(lambda self: self._state.o_key)
    o_value = property(lambda self: self._state.o_value)
    gates = property(lambda self: self._state.gates)
    global_locking = property(lambda self: self._state.global_locking)
    multi = property(lambda self: self._state.multi)
    gate_at = property(lambda self: self._state.gate_at)

    @property
    def active(self) -> bool:
        return self.i_star is not None

    @property
    def needs_positions(self) -> bool:
        return self.active and needs_positions(self.i_star.shape[0], self.gate_at, self.multi)

    def targets(self, i_star: torch.Tensor, i_super: torch.Tensor, o_value: Sequence[torch.Tensor],
                gates: GateSettings, o_key: Sequence[torch.Tensor] | None = None) -> dict:
        """The ConceptState fields of N concepts: i_star, i_super (N, d_in); o_value[l] (N, d_out_l);
        `gates` of N concepts. Keys are locked (o*_K = W_K i_super) unless `o_key` gives them (the
        trained-keys ablation)."""
        if len(o_value) != len(self.values):
            raise UserError(f"concept has {len(o_value)} value outputs, the U-Net has {len(self.values)} "
                             "cross-attention layers (trained on another base model?)")
        if len(gates.betas) != i_star.shape[0]:
            raise ValueError(f"gate settings for {len(gates.betas)} concepts, targets for {i_star.shape[0]}")
        if o_key is not None and len(o_key) != len(self.keys):
            raise UserError(f"{len(o_key)} key outputs given, the U-Net has {len(self.keys)} cross-attention layers")
        o_key = superclass_keys(self.keys, i_super) if o_key is None else o_key
        return dict(i_star=i_star, o_key=tuple(o_key), o_value=tuple(o_value), gates=gates.to(i_star.device))

    def set_gates(self, gates: GateSettings):
        """New inference-time beta/tau for the same concepts."""
        if not self.active:
            raise UserError("no concepts are active; set them before their gates")
        if len(gates.betas) != self.i_star.shape[0]:
            raise ValueError(f"gate settings for {len(gates.betas)} concepts, {self.i_star.shape[0]} are active")
        self.state = replace(self.state, gates=gates.to(self.i_star.device))

    def clear(self):
        """No edit (the projections are the base model's); the other state fields stay."""
        self.state = replace(self.state, i_star=None, o_key=(), o_value=(), gates=None)

    # ----------------------------------------------------------------- context layout
    def pack(self, e: torch.Tensor, e_super: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        """The context for the edited layers: e (B, T, d); with global locking the superclass prompt's
        encodings e_super (B, T, d), aligned to e token by token; positions (B, T, N) bool if needed."""
        if self.global_locking != (e_super is not None):
            raise ValueError("global key-locking needs the superclass prompt's encodings, and only then")
        if self.needs_positions != (positions is not None):
            raise ValueError(f"gate_at={self.gate_at!r}, multi={self.multi!r}: placeholder positions are "
                             f"{'needed' if self.needs_positions else 'not used'}")
        context = e if e_super is None else torch.cat([e, e_super], dim=1)
        if positions is not None:
            flags = positions.to(e.dtype)
            context = torch.cat([context, flags if e_super is None else torch.cat([flags, flags], 1)], dim=2)
        if self.active and torch.is_grad_enabled() and not shared_tokens(self.i_star.shape[0], self.gate_at):
            # training: Eq. 3's rank-1 part of every layer in one product, here, outside the U-Net's
            # checkpointed blocks (whose recomputation must repeat their own work); sampling caches per layer
            slots = [(r, layer) for r, layers in (("key", self.keys), ("value", self.values)) for layer in layers
                     if not (r == "key" and e_super is not None)]   # global key-locking: plain keys
            targets = {"key": self.o_key, "value": self.o_value}
            parts = rank1_parts(e, self.i_star, self.C_inv, self.gates.beta, self.gates.tau,
                                [(layer.weight, targets[r][layer.index]) for r, layer in slots], positions, self.gate_at)
            self._packed = (context, _version(context),
                            {(r, layer.index): part for (r, layer), part in zip(slots, parts)})
        return context

    def unpack(self, context: torch.Tensor, d_in: int):
        """(e, e_super or None, positions or None) from a context made by `pack`."""
        e, positions = context[..., :d_in], None
        if context.shape[-1] > d_in:
            positions = context[..., d_in:] > 0.5
        e_super = None
        if self.global_locking:
            e, e_super = e.chunk(2, dim=1)
            positions = None if positions is None else positions.chunk(2, dim=1)[0]
        return e, e_super, positions

    def edit(self, layer: Rank1EditLinear, context: torch.Tensor) -> torch.Tensor:
        use_cache = self.cache and not torch.is_grad_enabled()
        slot = (layer.role, layer.index)
        version = _version(context)
        if use_cache and slot in self._cache:
            seen, seen_version, out = self._cache[slot]
            if seen is context and seen_version == version:
                return out
        e, e_super, positions = self.unpack(context, layer.in_features)
        if e_super is not None and layer.role == "key":
            out = F.linear(e_super, layer.weight)      # global key-locking: K = W_K e_sup
        else:
            packed = self._packed
            if packed is not None and packed[0] is context and packed[1] == version:   # the packed training context
                part = packed[2][layer.role, layer.index]
                with torch.autocast(e.device.type, enabled=False):
                    return (F.linear(e.to(part.dtype), layer.weight.to(part.dtype)) + part).to(e.dtype)
            targets = self.o_key if layer.role == "key" else self.o_value
            out = gated_rank1_edit(e, layer.weight, self.i_star, targets[layer.index], self.C_inv,
                                   self.gates.beta, self.gates.tau, self.multi, positions,
                                   self.gate_at).to(e.dtype)
        if use_cache:
            self._cache[slot] = (context, version, out)
        return out
