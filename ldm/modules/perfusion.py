"""Perfusion's gated rank-1 edit of the cross-attention K and V projections.

Tewel, Gal, Chechik, Atzmon, "Key-Locked Rank One Editing for Text-to-Image Personalization",
SIGGRAPH 2023 (arXiv 2305.01644): Eq. 3 for one concept, Appendix B for several.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _per_concept(value, n: int, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} needs 1 or {n} values (one per concept), got {t.numel()}")
    return t


def gated_rank1_edit(e: torch.Tensor, weight: torch.Tensor, i_star: torch.Tensor, o_star: torch.Tensor,
                     C_inv: torch.Tensor, beta, tau, exact: bool = True) -> torch.Tensor:
    """W'(e) for encodings e (B, T, d_in): returns (B, T, d_out) in float32 or wider.

    N = 1 (Eq. 3):
        sim(e)  = i*^T C^-1 e / (i*^T C^-1 i*)
        W'(e)   = W (e - sim(e) i*) + sigmoid((sim(e) - beta) / tau) o*
    N > 1 (Appendix B): the gates add up, and e loses its C^-1-projection onto span{i*_n}:
        exact:  C^-1 = L L^T, Q R = L^T [i*_1 .. i*_N], u_n = L^-T q_n,
                e_perp = e - sum_n u_n (u_n^T C^-1 e)
        approx: W e_perp ~ W e - sum_n sim_n(e) W i*_n   (the authors' cheaper form)
    `weight` (d_out, d_in), `i_star` (N, d_in), `o_star` (N, d_out), `C_inv` (d_in, d_in);
    `beta`, `tau`: a float or N values.
    """
    if i_star.dim() != 2 or o_star.dim() != 2 or i_star.shape[0] != o_star.shape[0]:
        raise ValueError(f"i_star (N, d_in) and o_star (N, d_out) must list the same concepts, "
                         f"got {tuple(i_star.shape)} and {tuple(o_star.shape)}")
    n = i_star.shape[0]
    dtype = torch.promote_types(e.dtype, torch.float32)
    # The per-concept quantities involve C^-1, which can be ill-conditioned: form them in float64
    # (tiny: N x d_in), then apply them to the encodings in float32 or wider.
    wide = torch.float32 if e.device.type == "mps" else torch.float64
    I, C_inv = i_star.to(e.device, wide), C_inv.to(e.device, wide)
    beta = _per_concept(beta, n, "beta", e.device).to(dtype)
    tau = _per_concept(tau, n, "tau", e.device).to(dtype)
    if (tau <= 0).any():
        raise ValueError(f"tau must be positive, got {tau.tolist()}")

    with torch.autocast(e.device.type, enabled=False):
        e, W, O = e.to(dtype), weight.to(dtype), o_star.to(dtype)
        CI = I @ C_inv                                                # rows i*_n^T C^-1
        probe = (CI / (CI * I).sum(-1, keepdim=True)).to(dtype)       # sim_n(e) = probe_n . e
        sim = e @ probe.T                                             # (B, T, N)
        gate = torch.sigmoid((sim - beta) / tau)                      # (B, T, N)
        if n == 1 or not exact:
            # N = 1 the exact projection reduces to sim(e) i*; N > 1 this is the approximation.
            out = e @ W.T - sim @ (I.to(dtype) @ W.T)
        else:
            L = torch.linalg.cholesky(C_inv)
            Q, _ = torch.linalg.qr(L.T @ I.T)                         # (d_in, N), orthonormal columns
            U = torch.linalg.solve_triangular(L.T, Q, upper=True)     # u_n = L^-T q_n
            coeff = e @ (C_inv @ U).to(dtype)                         # (B, T, N): u_n^T C^-1 e
            out = (e - coeff @ U.to(dtype).T) @ W.T
        return out + gate @ O


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
        raise ValueError("the U-Net has no cross-attention layers to edit")
    return pairs


def superclass_keys(layers: Sequence[Rank1EditLinear], i_super: torch.Tensor) -> list[torch.Tensor]:
    """Key-locking targets o*_K = W_K i_super, one (N, d_out) tensor per layer."""
    return [i_super.to(layer.weight.dtype) @ layer.weight.T for layer in layers]


class ConceptBank:
    """The edit targets that every Rank1EditLinear of one U-Net reads.

    Holds C^-1 and, for N active concepts, i* (N, d_in), per-layer key targets
    o*_K = W_K i_super and value targets o*_V, and per-concept beta/tau. With
    `global_locking` the context is [value encodings ; key encodings] along the token axis
    (2T tokens): keys see the superclass prompt, values the concept prompt.

    With gradients disabled (sampling), each layer's output is cached for the last context
    tensor it saw: the encodings of a prompt do not change across denoising steps, so the
    edited keys and values are computed once per prompt. The samplers pass the same context
    tensor at every step; `cache = False` recomputes every call (same results, slower).
    Change the targets or gates through `set` / `set_gates`, which empty the cache.
    """

    def __init__(self, pairs: Sequence[tuple[Rank1EditLinear, Rank1EditLinear]], C_inv: torch.Tensor,
                 exact: bool = True):
        self.keys = [k for k, _ in pairs]
        self.values = [v for _, v in pairs]
        for layer in self.keys + self.values:
            layer.bank = self
        self.C_inv = C_inv
        self.exact = exact
        self.global_locking = False
        self.i_star = None
        self.o_key: list[torch.Tensor] = []
        self.o_value: list[torch.Tensor] = []
        self.beta = self.tau = None
        self.cache = True
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, int, torch.Tensor]] = {}

    @property
    def active(self) -> bool:
        return self.i_star is not None

    def set(self, i_star: torch.Tensor, i_super: torch.Tensor, o_value: Sequence[torch.Tensor], beta, tau,
            o_key: Sequence[torch.Tensor] | None = None):
        """Activate N concepts: i_star, i_super (N, d_in); o_value[l] (N, d_out_l); beta/tau float or N.
        Keys are locked (o*_K = W_K i_super) unless `o_key` gives them (the trained-keys ablation)."""
        if len(o_value) != len(self.values):
            raise ValueError(f"concept has {len(o_value)} value outputs, the U-Net has {len(self.values)} "
                             "cross-attention layers (trained on another base model?)")
        self._check_gates(beta, tau, i_star.shape[0])
        self.i_star = i_star
        if o_key is not None and len(o_key) != len(self.keys):
            raise ValueError(f"{len(o_key)} key outputs given, the U-Net has {len(self.keys)} cross-attention layers")
        self.o_key = superclass_keys(self.keys, i_super) if o_key is None else list(o_key)
        self.o_value = list(o_value)
        self.beta, self.tau = beta, tau
        self._cache.clear()

    def set_gates(self, beta, tau):
        """New inference-time beta/tau (float or one per active concept) for the same concepts."""
        if not self.active:
            raise ValueError("no concepts are active; set them before their gates")
        self._check_gates(beta, tau, self.i_star.shape[0])
        self.beta, self.tau = beta, tau
        self._cache.clear()

    @staticmethod
    def _check_gates(beta, tau, n: int):
        for name, v in (("beta", beta), ("tau", tau)):
            t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
            if t.numel() not in (1, n):
                raise ValueError(f"{name} needs 1 or {n} values (one per concept), got {t.numel()}")
            if name == "tau" and (t <= 0).any():
                raise ValueError(f"tau must be positive, got {t.tolist()}")

    def clear(self):
        self.i_star = None
        self.o_key, self.o_value = [], []
        self._cache.clear()

    def edit(self, layer: Rank1EditLinear, e: torch.Tensor) -> torch.Tensor:
        use_cache = self.cache and not torch.is_grad_enabled()
        slot = (layer.role, layer.index)
        # inference-mode tensors keep no version counter: their identity alone is the key
        version = None if e.is_inference() else e._version
        if use_cache and slot in self._cache:
            seen, seen_version, out = self._cache[slot]
            if seen is e and seen_version == version:
                return out
        x = e
        if self.global_locking:
            value_e, key_e = e.chunk(2, dim=1)
            x = key_e if layer.role == "key" else value_e
        targets = self.o_key if layer.role == "key" else self.o_value
        out = gated_rank1_edit(x, layer.weight, self.i_star, targets[layer.index], self.C_inv,
                               self.beta, self.tau, self.exact).to(e.dtype)
        if use_cache:
            self._cache[slot] = (e, version, out)
        return out
