"""KL autoencoder: checkpoint-compatible parameter names, shapes, posterior maths, attention."""
import json
import math
from pathlib import Path

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.distributions import DiagonalGaussianDistribution

FIXTURE = Path(__file__).parent / "fixtures" / "sd_state_dict_shapes.json"

SD_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
TINY_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)


@pytest.mark.parametrize("version", ["sd15", "sd21"])
def test_state_dict_matches_compvis_checkpoint(version):
    prefix = "first_stage_model."
    expected = {
        name[len(prefix):]: list(shape)
        for name, shape in json.loads(FIXTURE.read_text())[version].items()
        if name.startswith(prefix)
    }
    assert expected, f"fixture has no {prefix}* entries for {version}"
    with torch.device("meta"):
        model = AutoencoderKL(SD_DDCONFIG, embed_dim=4)
    got = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    mismatched = {n: (got[n], expected[n]) for n in expected if got[n] != expected[n]}
    assert mismatched == {}


def test_tiny_autoencoder_round_trip_shapes_and_grad():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY_DDCONFIG, embed_dim=4)
    # attn_resolutions=[16] puts attention in the 16x16 level of both encoder and decoder.
    assert len(model.encoder.down[1].attn) == 1 and len(model.encoder.down[0].attn) == 0
    assert len(model.decoder.up[1].attn) == 2 and len(model.decoder.up[0].attn) == 0
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 4, 16, 16)
    z = posterior.sample(torch.Generator().manual_seed(1))
    assert z.shape == (2, 4, 16, 16)
    assert model.decode(z).shape == (2, 3, 32, 32)

    rec_mode, post = model(x, sample_posterior=False)
    assert torch.allclose(rec_mode, model.decode(post.mode()))
    rec, post = model(x, generator=torch.Generator().manual_seed(1))
    assert rec.shape == (2, 3, 32, 32) and torch.isfinite(rec).all()
    assert not torch.allclose(rec, rec_mode)

    ((rec - x).pow(2).mean() + post.kl().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_inputs_raise_clear_errors():
    model = AutoencoderKL(TINY_DDCONFIG, embed_dim=4)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 32"):
        AutoencoderKL({**TINY_DDCONFIG, "ch": 48}, embed_dim=4)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**TINY_DDCONFIG, "double_z": False}, embed_dim=4)


def test_diagonal_gaussian_kl_sample_mode_nll():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    logvar[0, 0, 0, 0] = 50.0  # beyond the clamp
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert dist.logvar.max().item() == 20.0

    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, per element, summed over C, H, W.
    s = torch.exp(0.5 * logvar.clamp(-30, 20))
    kl_ref = (torch.log(1 / s) + (s**2 + mean**2) / 2 - 0.5).flatten(1).sum(1)
    assert dist.kl().shape == (3,)
    torch.testing.assert_close(dist.kl(), kl_ref)

    # Zero mean, unit variance has zero KL.
    assert torch.all(DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3)).kl() == 0)

    assert torch.equal(dist.mode(), mean)
    a = dist.sample(torch.Generator().manual_seed(7))
    b = dist.sample(torch.Generator().manual_seed(7))
    c = dist.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)

    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    nll_ref = -torch.distributions.Normal(mean, s).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(dist.nll(x), nll_ref)

    with pytest.raises(ValueError, match="2C"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def test_sample_statistics_match_mean_and_std():
    mean = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(1, 2, 100, 100)
    logvar = torch.tensor([math.log(0.25), math.log(4.0)]).view(1, 2, 1, 1).expand(1, 2, 100, 100)
    z = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.tensor([1.5, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)


def test_attention_block_matches_direct_softmax():
    torch.manual_seed(0)
    c, h, w = 64, 5, 7
    attn = AttnBlock(c).double()
    with torch.no_grad():  # non-trivial norm affine so the reference exercises it
        attn.norm.weight.uniform_(0.5, 1.5)
        attn.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, c, h, w, dtype=torch.float64)

    # Reference: GroupNorm(32, eps=1e-6), 1x1 projections as matrices, softmax(q k^T / sqrt(c)) v.
    groups = x.reshape(2, 32, -1)
    normed = (groups - groups.mean(-1, keepdim=True)) / torch.sqrt(groups.var(-1, unbiased=False, keepdim=True) + 1e-6)
    normed = normed.reshape(2, c, h * w) * attn.norm.weight.view(1, c, 1) + attn.norm.bias.view(1, c, 1)

    def project(conv, t):  # (B, C, N) -> (B, C, N)
        return torch.einsum("oc,bcn->bon", conv.weight[:, :, 0, 0], t) + conv.bias.view(1, c, 1)

    q, k, v = (project(m, normed) for m in (attn.q, attn.k, attn.v))
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
    out = torch.einsum("bij,bcj->bci", weights, v)
    ref = x + project(attn.proj_out, out).reshape(2, c, h, w)

    with torch.no_grad():
        got = attn(x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_decoder_only_training_keeps_the_latent_space():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY_DDCONFIG, embed_dim=4, train_decoder_only=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latent = model.encode(x).mode().detach()
    opt = model.configure_optimizers()
    model.train()
    assert not model.encoder.training and model.decoder.training
    for _ in range(2):
        loss = model.training_step({"image": x}, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"decoder", "post_quant_conv"}
    assert torch.equal(model.encode(x).mode(), latent)
