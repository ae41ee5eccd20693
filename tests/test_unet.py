"""Tests of the denoising U-Net: checkpoint-name compatibility, attention maths, checkpointing, upcast."""
import json
import math
from pathlib import Path

import pytest
import torch

from ldm.modules.attention import CrossAttention, cross_attention_layers
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

FIXTURE = Path(__file__).parent / "fixtures" / "sd_state_dict_shapes.json"
PREFIX = "model.diffusion_model."

SD_COMMON = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], use_checkpoint=True)
SD_CONFIGS = {
    "sd15": dict(SD_COMMON, num_heads=8, context_dim=768),
    "sd21": dict(SD_COMMON, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True,
                 upcast_attention=True),
}


def tiny_unet(use_linear: bool = True, **overrides) -> UNetModel:
    params = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                  num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, context_dim=32,
                  use_linear_in_transformer=use_linear)
    params.update(overrides)
    return UNetModel(**params)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero-initialised output layers so every parameter influences the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_state_dict_matches_compvis_checkpoint(name):
    expected = {k[len(PREFIX):]: list(v) for k, v in json.loads(FIXTURE.read_text())[name].items()
                if k.startswith(PREFIX)}
    assert len(expected) == 686
    with torch.device("meta"):
        unet = UNetModel(**SD_CONFIGS[name])
    got = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    layers = cross_attention_layers(unet)
    assert len(layers) == 16
    assert layers[0][0] == "input_blocks.1.1.transformer_blocks.0.attn2"
    assert layers[-1][0] == "output_blocks.11.1.transformer_blocks.0.attn2"


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    half = 4
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    torch.testing.assert_close(emb[:, :half], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, half:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_head_arguments_are_exclusive():
    with pytest.raises(ValueError, match="exactly one"):
        tiny_unet(num_heads=2)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_unet(num_head_channels=-1)


@pytest.mark.parametrize("use_linear", [True, False])
def test_tiny_unet_forward(use_linear):
    torch.manual_seed(0)
    unet = randomize_(tiny_unet(use_linear=use_linear)).eval()
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = unet(x, timesteps=torch.tensor([1, 500]), context=ctx)
        out_other_t = unet(x, timesteps=torch.tensor([900, 500]), context=ctx)
        out_other_ctx = unet(x, timesteps=torch.tensor([1, 500]), context=ctx.flip(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # timestep and context both reach the output, per sample
    assert not torch.allclose(out[0], out_other_t[0]) and torch.allclose(out[1], out_other_t[1])
    assert not torch.allclose(out, out_other_ctx)

    layers = cross_attention_layers(unet)
    assert len(layers) == 7  # input 2 + middle 1 + output 4
    seen = []
    layers[0][1].attention_probs_hook = lambda m, p: seen.append(p.shape)
    with torch.no_grad():
        unet(x, timesteps=torch.tensor([1, 500]), context=ctx)
    assert seen == [(2, 2, 64, 5)]  # 32 channels / 16 per head, 8x8 pixels, 5 tokens

    with pytest.raises(ValueError, match="multiples of 2"):
        unet(torch.randn(1, 4, 7, 8), timesteps=torch.tensor([1]), context=ctx[:1])


def test_cross_attention_matches_reference_and_hook():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=12, context_dim=10, heads=3, dim_head=4).eval()
    x = torch.randn(2, 6, 12)
    ctx = torch.randn(2, 5, 10)
    out = attn(x, ctx)

    def heads(t):
        return t.view(2, -1, 3, 4).transpose(1, 2)

    a64 = {k: v.double() for k, v in attn.state_dict().items()}
    q = heads(x.double() @ a64["to_q.weight"].T)
    k = heads(ctx.double() @ a64["to_k.weight"].T)
    v = heads(ctx.double() @ a64["to_v.weight"].T)
    probs_ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    ref = (probs_ref @ v).transpose(1, 2).reshape(2, 6, 12) @ a64["to_out.0.weight"].T + a64["to_out.0.bias"]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)

    captured = []
    attn.attention_probs_hook = lambda module, p: captured.append((module, p))
    out_hooked = attn(x, ctx)
    assert len(captured) == 1 and captured[0][0] is attn
    probs = captured[0][1]
    assert probs.shape == (2, 3, 6, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 6))
    torch.testing.assert_close(probs.double(), probs_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_hooked, out, rtol=0, atol=0)

    # without context it attends over x itself
    attn.attention_probs_hook = None
    self_attn = CrossAttention(query_dim=12, heads=3, dim_head=4)
    assert self_attn(x).shape == x.shape


def test_gradient_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    plain = randomize_(tiny_unet(use_linear=False)).train()
    ckpt = tiny_unet(use_linear=False, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 32)
    t = torch.tensor([10, 700])

    calls = {"plain": 0, "ckpt": 0}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        model.input_blocks[1][0].in_layers.register_forward_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))

    grads = {}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        model.zero_grad()
        (model(x, timesteps=t, context=ctx) ** 2).mean().backward()
        grads[key] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block was recomputed in backward
    assert grads["plain"].keys() == grads["ckpt"].keys()
    for n in grads["plain"]:
        torch.testing.assert_close(grads["ckpt"][n], grads["plain"][n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for n, g in grads["plain"].items() if "attn2.to_k" in n)

    ckpt.eval()  # no recomputation outside training
    ckpt(x, timesteps=t, context=ctx).sum().backward()
    assert calls["ckpt"] == 3


def test_upcast_attention_under_bf16_autocast(monkeypatch):
    sdpa_dtypes = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        sdpa_dtypes.append(q.dtype)
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=32, context_dim=24, heads=2, dim_head=16, upcast=True).eval()
    x = torch.randn(2, 16, 32) * 3
    ctx = torch.randn(2, 7, 24) * 3
    with torch.no_grad():
        ref = attn(x, ctx)
        seen = []
        attn.attention_probs_hook = lambda m, p: seen.append(p.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x, ctx)
            attn.upcast = False
            attn(x, ctx)
    assert seen == [torch.float32, torch.float32]
    assert sdpa_dtypes == [torch.float32, torch.float32, torch.bfloat16]  # fp32 ref, upcast, plain bf16
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())

    unet = randomize_(tiny_unet(upcast_attention=True)).eval()
    xs, ctxs, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32), torch.tensor([250])
    with torch.no_grad():
        ref = unet(xs, timesteps=t, context=ctxs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = unet(xs, timesteps=t, context=ctxs)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
