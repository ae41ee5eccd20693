"""LatentDiffusion built from the shipped configs: names/shapes vs the real SD checkpoints, schedule, losses."""
from __future__ import annotations

import pytest
import torch

from ldm.build import ConfigError, load_config
from ldm.util import instantiate_from_config
from tests.conftest import ROOT

SD_CONFIGS = {
    "v1-inference.yaml": "sd15",
    "v2-inference.yaml": "sd21",
    "v2-inference-v.yaml": "sd21",
}


@pytest.mark.parametrize("name", sorted(SD_CONFIGS))
def test_config_matches_checkpoint_names_and_shapes(name, sd_shapes):
    config = load_config([ROOT / "configs/stable-diffusion" / name])
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = sd_shapes[SD_CONFIGS[name]]
    assert sorted(set(expected) - set(mine)) == []
    assert sorted(set(mine) - set(expected)) == []
    assert {k: v for k, v in mine.items() if v != expected[k]} == {}


def test_v_config_is_v_prediction():
    assert load_config([ROOT / "configs/stable-diffusion/v2-inference-v.yaml"]).model.params.parameterization == "v"


def test_schedule_is_scaled_linear(tiny_v1):
    betas = tiny_v1.betas.double()
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999), atol=1e-7)
    assert torch.allclose(tiny_v1.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)


def test_q_sample_and_v_target(tiny_v2):
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    a = tiny_v2.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(tiny_v2.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    v = tiny_v2.get_v(x0, noise, t)
    eps, x0_hat = tiny_v2.predict_eps_and_x0(tiny_v2.q_sample(x0, t, noise), t, v)
    assert torch.allclose(eps, noise, atol=1e-4) and torch.allclose(x0_hat, x0, atol=1e-4)


def test_mask_weighted_loss_ignores_zero_weight_pixels(tiny_v1):
    z = torch.randn(1, 4, 16, 16)
    cond = tiny_v1.get_learned_conditioning(["a photo of a cat"])
    t, noise = torch.tensor([500]), torch.randn_like(z)
    weight = torch.zeros(1, 1, 16, 16)
    weight[..., :8, :] = 1.0
    loss = tiny_v1.p_losses(z, cond, t, noise, weight)
    pred = tiny_v1.apply_model(tiny_v1.q_sample(z, t, noise), t, cond)
    assert loss.item() == pytest.approx(((pred - noise)[..., :8, :] ** 2).mean().item(), rel=1e-5)


def test_first_stage_round_trip_shapes(tiny_v1):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = tiny_v1.encode_first_stage(x)
    assert z.shape == (2, 4, 16, 16)
    assert tiny_v1.decode_first_stage(z).shape == x.shape


def test_only_unet_trains_in_plain_fine_tuning(tiny_v1):
    trainable = {n.split(".")[0] for n, p in tiny_v1.named_parameters() if p.requires_grad}
    assert trainable == {"model"}
    tiny_v1.train()
    assert not tiny_v1.first_stage_model.training and not tiny_v1.cond_stage_model.training
    tiny_v1.eval()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([ROOT / "configs/tiny/v1-tiny.yaml"], ["lightning.trainer.max_steps"])
    merged = load_config([ROOT / "configs/tiny/v1-tiny.yaml"], ["model.params.learning_rate=0.5"])
    assert merged.model.params.learning_rate == 0.5


def test_cached_latents_encode_each_image_once_and_sample_the_same_posterior():
    from tests.conftest import tiny_perfusion_model

    model = tiny_perfusion_model("model.params.cache_latents=true")
    calls = []
    model.first_stage_model.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    flipped = images.flip(-1)
    torch.manual_seed(1)
    first = model.training_latents(images)
    torch.manual_seed(1)
    again = model.training_latents(images)
    model.training_latents(torch.cat([flipped[:1], images[1:]]))   # one new image: a flip
    assert calls == [3, 1]
    assert torch.equal(first, again)
    torch.manual_seed(1)
    model.cache_latents = False
    assert torch.allclose(model.training_latents(images), first, atol=1e-5)   # the same posterior and noise
