"""gated_rank1_edit (Eq. 3, Appendix B) against direct computations, and the patched projections."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.perfusion.edit import ConceptBank, Rank1EditLinear, concept_gates, gated_rank1_edit, patch_cross_attention
from ldm.perfusion.gate_settings import GateSettings

D_IN, D_OUT = 12, 7


def _spd(seed: int, d: int = D_IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d) + 0.05 * torch.eye(d, dtype=torch.float64)


def _setup(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C_inv = torch.linalg.inv(_spd(seed + 1))
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    I = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    O = torch.randn(n, D_OUT, generator=g, dtype=torch.float64)
    e = torch.randn(2, 5, D_IN, generator=g, dtype=torch.float64)
    return e, W, I, O, C_inv


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def test_orthogonal_input_gives_base_output_plus_gate_leak():
    e, W, I, O, C_inv = _setup(1)
    i = I[0]
    sim = (e @ C_inv @ i) / (i @ C_inv @ i)
    e_orth = e - sim[..., None] * i                          # C^-1-orthogonal to i*
    beta, tau = 0.7, 0.1
    out = gated_rank1_edit(e_orth, W, I, O, C_inv, beta, tau)
    expected = e_orth @ W.T + _sigmoid(torch.tensor(-beta / tau, dtype=torch.float64)) * O[0]
    assert torch.allclose(out, expected, atol=1e-10)


def test_target_input_gives_gated_target_output():
    _, W, I, O, C_inv = _setup(1)
    beta, tau = 0.6, 0.15
    out = gated_rank1_edit(I[None, None], W, I, O, C_inv, beta, tau)
    expected = _sigmoid(torch.tensor((1 - beta) / tau, dtype=torch.float64)) * O[0]
    assert torch.allclose(out[0, 0], expected, atol=1e-10)


def test_eq3_on_random_inputs_and_scale_of_C_cancels():
    e, W, I, O, C_inv = _setup(1, seed=3)
    i, o = I[0], O[0]
    sim = (e @ C_inv @ i) / (i @ C_inv @ i)
    expected = (e - sim[..., None] * i) @ W.T + _sigmoid((sim - 0.75) / 0.1)[..., None] * o
    assert torch.allclose(gated_rank1_edit(e, W, I, O, C_inv, 0.75, 0.1), expected, atol=1e-10)
    assert torch.allclose(gated_rank1_edit(e, W, I, O, 1e3 * C_inv, 0.75, 0.1), expected, atol=1e-9)


@pytest.mark.parametrize("n", [2, 3])
def test_exact_multi_concept_is_appendix_b(n):
    e, W, I, O, C_inv = _setup(n, seed=5)
    betas, taus = torch.linspace(0.5, 0.8, n, dtype=torch.float64), torch.linspace(0.1, 0.2, n, dtype=torch.float64)
    # Direct: remove the C^-1-orthogonal projection of e onto span{i*_n}: P = I^T (I C^-1 I^T)^-1 I C^-1.
    It = I.T
    G_inv = torch.linalg.inv(I @ C_inv @ It)
    P = It @ G_inv @ I @ C_inv
    e_perp = e - e @ P.T
    # Appendix B as written: each gate from its own concept's Eq. 3 sim.
    sims = (e @ C_inv @ It) / torch.einsum("nd,de,ne->n", I, C_inv, I)
    separate = gated_rank1_edit(e, W, I, O, C_inv, betas, taus, multi="separate")
    assert torch.allclose(separate, e_perp @ W.T + _sigmoid((sims - betas) / taus) @ O, atol=1e-9)
    # Joint gates: the gates read the projection's coordinates in the basis i*_n.
    coords = e @ C_inv @ It @ G_inv
    assert torch.allclose(coords @ I, e @ P.T, atol=1e-9)
    joint = gated_rank1_edit(e, W, I, O, C_inv, betas, taus, multi="joint")
    assert torch.allclose(joint, e_perp @ W.T + _sigmoid((coords - betas) / taus) @ O, atol=1e-9)
    # e_perp is C^-1-orthogonal to every i*_n.
    assert torch.allclose(e_perp @ C_inv @ It, torch.zeros(2, 5, n, dtype=torch.float64), atol=1e-9)


def test_joint_gates_open_only_for_their_own_concept():
    """i*_1 and i*_2 far from C^-1-orthogonal: fed i*_1, Appendix B's separate sims open both gates,
    the joint coordinates open the first alone."""
    _, W, I, O, C_inv = _setup(2, seed=3)
    I[1] = I[0] + 0.3 * I[1]
    own = I[0].reshape(1, 1, -1)
    sim, gate = concept_gates(own, I, C_inv, 0.7, 0.15)
    assert sim[0, 0, 1] > 0.7 and gate[0, 0, 1] > 0.5
    sim, gate = concept_gates(own, I, C_inv, 0.7, 0.15, joint=True)
    assert torch.allclose(sim[0, 0], torch.tensor([1.0, 0.0], dtype=sim.dtype), atol=1e-6)
    out = gated_rank1_edit(own, W, I, O, C_inv, 0.7, 0.15, multi="joint")
    assert torch.allclose(out[0, 0], _sigmoid(torch.tensor(0.3 / 0.15)) * O[0] + _sigmoid(torch.tensor(-0.7 / 0.15)) * O[1],
                          atol=1e-6)


def test_named_rule_edits_each_placeholder_as_its_concept_alone():
    """At concept n's placeholder the named rule is Eq. 3 for concept n alone (the other concept's gate
    shut); at every other token it is Appendix B as written."""
    e, W, I, O, C_inv = _setup(2, seed=11)
    I[1] = I[0] + 0.2 * I[1]                       # nearly the same i*, as two concepts of one superclass
    e[0, 1], e[1, 3] = I[0] + 0.05 * e[0, 1], I[1] + 0.05 * e[1, 3]
    positions = torch.zeros(2, 5, 2, dtype=torch.bool)
    positions[0, 1, 0] = positions[1, 3, 1] = True
    betas, taus = [0.6, 0.7], [0.15, 0.1]
    named = gated_rank1_edit(e, W, I, O, C_inv, betas, taus, positions=positions)
    separate = gated_rank1_edit(e, W, I, O, C_inv, betas, taus, multi="separate")
    others = ~positions.any(-1)
    assert torch.allclose(named[others], separate[others], atol=1e-12)
    for (b, t), n in (((0, 1), 0), ((1, 3), 1)):
        alone = gated_rank1_edit(e[b:b + 1, t:t + 1], W, I[n:n + 1], O[n:n + 1], C_inv, betas[n], taus[n])
        assert torch.allclose(named[b, t], alone[0, 0], atol=1e-12)
        # Appendix B as written opens the other concept's gate at this token too
        _, gate = concept_gates(e[b:b + 1, t:t + 1], I, C_inv, betas, taus)
        assert gate[0, 0, 1 - n] > 0.5


def test_approximate_multi_concept():
    e, W, I, O, C_inv = _setup(2, seed=7)
    sims = (e @ C_inv @ I.T) / torch.einsum("nd,de,ne->n", I, C_inv, I)
    expected = e @ W.T - sims @ (I @ W.T) + _sigmoid((sims - 0.7) / 0.15) @ O
    assert torch.allclose(gated_rank1_edit(e, W, I, O, C_inv, 0.7, 0.15, multi="approx"), expected, atol=1e-10)
    # With C^-1-orthogonal targets the approximation is exact.
    I2 = I.clone()
    I2[1] = I[1] - (I[1] @ C_inv @ I[0]) / (I[0] @ C_inv @ I[0]) * I[0]
    exact = gated_rank1_edit(e, W, I2, O, C_inv, 0.7, 0.15, multi="separate")
    approx = gated_rank1_edit(e, W, I2, O, C_inv, 0.7, 0.15, multi="approx")
    assert torch.allclose(exact, approx, atol=1e-9)


def test_half_precision_inputs_are_computed_in_float32():
    e, W, I, O, C_inv = _setup(2, seed=9)
    ref = gated_rank1_edit(e, W, I, O, C_inv, 0.7, 0.1, multi="separate")
    out = gated_rank1_edit(e.half(), W.half(), I.float(), O.float(), C_inv.float(), 0.7, 0.1, multi="separate")
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=5e-2, rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = gated_rank1_edit(e.float(), W.float(), I.float(), O.float(), C_inv.float(), 0.7, 0.1, multi="separate")
    assert auto.dtype == torch.float32 and torch.allclose(auto.double(), ref, atol=1e-4)


def test_bad_beta_tau():
    e, W, I, O, C_inv = _setup(2)
    with pytest.raises(ValueError, match="beta needs 1 or 2 values"):
        gated_rank1_edit(e, W, I, O, C_inv, [0.5, 0.6, 0.7], 0.1, multi="separate")
    with pytest.raises(ValueError, match="same concepts"):
        gated_rank1_edit(e, W, I, O[:1], C_inv, 0.5, 0.1)
    with pytest.raises(ValueError, match="multi-concept rule must be one of named, separate, joint, approx"):
        gated_rank1_edit(e, W, I, O, C_inv, 0.5, 0.1, multi="exact")
    with pytest.raises(ValueError, match="needs the placeholder positions"):
        gated_rank1_edit(e, W, I, O, C_inv, 0.5, 0.1)   # the named rule, several concepts


@pytest.mark.parametrize("beta, tau, message", [
    (0.5, [0.1, 0.0], "tau must be > 0"), (float("nan"), 0.1, "finite"), ([0.5, 0.6, 0.7], 0.1, "beta has 3 values"),
    (True, 0.1, "must be a number"), ("0.5", 0.1, "must be a number")])
def test_gate_settings_are_checked_once_where_they_enter(beta, tau, message):
    with pytest.raises(ValueError, match=message):
        GateSettings.of(beta, tau, 2)


def test_gate_settings_take_numpy_and_tensor_numbers():
    import numpy as np

    gates = GateSettings.of(np.float32(0.5), torch.tensor(0.15), 2)
    assert gates.betas == (0.5, 0.5) and gates.taus == pytest.approx((0.15, 0.15))
    assert gates.beta.dtype == torch.float32 and gates.beta.shape == (2,)


def test_the_edit_forward_never_reads_a_tensor_on_the_host(monkeypatch):
    """What would wait for the device on a GPU (a tensor read as a Python bool or number) is refused
    during the forward pass of the edited layers: one concept (training) and two under each rule."""
    e, W, I, O, C_inv = _setup(2, seed=13)
    positions = torch.zeros(2, 5, 2, dtype=torch.bool)
    positions[0, 1, 0] = positions[1, 3, 1] = True
    gates = GateSettings.of([0.6, 0.7], 0.15, 2)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host inside the forward pass")

    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    one = GateSettings.of(0.6, 0.15, 1)
    gated_rank1_edit(e, W, I[:1], O[:1], C_inv, one.beta, one.tau)
    for multi in ("named", "separate", "joint", "approx"):
        gated_rank1_edit(e, W, I, O, C_inv, gates.beta, gates.tau, multi, positions)
    monkeypatch.undo()
    if torch.cuda.is_available():   # on a GPU: CUDA's own check of synchronising calls
        cuda = [t.cuda() for t in (e, W, I, O, C_inv, positions)]
        gates = gates.to("cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for multi in ("named", "separate", "joint", "approx"):
                gated_rank1_edit(*cuda[:5], gates.beta, gates.tau, multi, cuda[5])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(AssertionError, match="read on the host"):   # the guard itself works
        monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
        bool(torch.ones(1))


def test_unpatched_and_inactive_projection_is_bit_identical():
    base = nn.Linear(D_IN, D_OUT, bias=False)
    layer = Rank1EditLinear(base, "value", 0)
    assert layer.weight is base.weight
    x = torch.randn(3, 77, D_IN)
    assert torch.equal(layer(x), base(x))
    bank = ConceptBank([(Rank1EditLinear(nn.Linear(D_IN, D_OUT, bias=False), "key", 0), layer)], C_inv=torch.eye(D_IN))
    assert not bank.active and torch.equal(layer(x), base(x))


def test_patching_keeps_parameter_names(tiny_v1):
    import copy

    unet = copy.deepcopy(tiny_v1.model.diffusion_model)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    pairs = patch_cross_attention(unet)
    assert len(pairs) == 7
    after = unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    c = torch.randn(1, 77, 64)
    with torch.no_grad():
        assert torch.equal(unet(x, timesteps=t, context=c), tiny_v1.model.diffusion_model(x, timesteps=t, context=c))


@pytest.mark.parametrize("gate_at", ["all", "all_detached", "concept"])
def test_training_computes_every_layer_as_gated_rank1_edit_does(gate_at):
    """In training the bank computes Eq. 3's rank-1 part of all layers in one product when it packs the
    context; each layer's output and every gradient equal `gated_rank1_edit` layer by layer."""
    from ldm.perfusion.edit import ConceptState

    torch.manual_seed(0)
    pairs = [(Rank1EditLinear(nn.Linear(D_IN, d, bias=False), "key", i),
              Rank1EditLinear(nn.Linear(D_IN, d, bias=False), "value", i)) for i, d in enumerate((4, 6, 8))]
    for pair in pairs:   # frozen, as the U-Net's
        for layer in pair:
            layer.weight.requires_grad_(False)
    bank = ConceptBank(pairs, C_inv=torch.linalg.inv(_spd(3)).float())
    i_star, i_super = torch.randn(1, D_IN), torch.randn(1, D_IN)
    o_value = [torch.randn(1, v.out_features, requires_grad=True) for _, v in pairs]
    bank.state = ConceptState(**bank.targets(i_star, i_super, o_value, GateSettings.of(0.6, 0.2, 1)), gate_at=gate_at)
    e = (i_star * torch.rand(2, 5, 1) + 0.3 * torch.randn(2, 5, D_IN)).requires_grad_()
    positions = torch.zeros(2, 5, 1, dtype=torch.bool)
    positions[:, 2] = True

    def outputs_and_grads(fast: bool):
        e.grad = None
        for o in o_value:
            o.grad = None
        flags = None if gate_at == "all" else positions
        if fast:
            context = bank.pack(e, None, flags)
            outs = [layer(context) for pair in pairs for layer in pair]
        else:
            targets = {"key": bank.o_key, "value": bank.o_value}
            outs = [gated_rank1_edit(e, layer.weight, i_star, targets[layer.role][layer.index], bank.C_inv,
                                     bank.gates.beta, bank.gates.tau, positions=flags, gate_at=gate_at)
                    for pair in pairs for layer in pair]
        sum((out * torch.arange(out.numel()).view_as(out).sin()).sum() for out in outs).backward()
        return outs, e.grad.clone(), [o.grad.clone() for o in o_value]

    fast, slow = outputs_and_grads(True), outputs_and_grads(False)
    assert bank._packed is not None   # the fast path ran
    for a, b in zip(fast[0], slow[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(fast[2], slow[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fast[1].abs().sum() > 0 and all(g.abs().sum() > 0 for g in fast[2])
