"""DDIM and Euler-Karras samplers: exactness on an analytic denoiser, seeding, guidance."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler, ddim_timesteps
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.euler import EulerSampler, karras_sigmas
from ldm.models.diffusion.guidance import GuidedDenoiser
from ldm.sample import generate


class _Oracle:
    """Knows the clean latent x0, so it predicts the exact eps (or v) of any x_t: the sampler's
    ODE then has x0 as its end point, whatever the schedule or step count."""

    def __init__(self, model, x0):
        self.model, self.x0 = model, x0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply_model(self, x_t, t, cond):
        t = t.float()
        ac = self.model.alphas_cumprod.double()
        lo = t.floor().long().clamp(0, len(ac) - 1)
        hi = (lo + 1).clamp_max(len(ac) - 1)
        # log-sigma interpolation matches EulerSampler.sigma_to_t for fractional t
        ls = ((1 - ac) / ac).sqrt().log()
        frac = (t - lo).double()
        sigma = (ls[lo] + frac * (ls[hi] - ls[lo])).exp()
        a = (1 / (1 + sigma ** 2)).float().view(-1, 1, 1, 1)
        x0 = self.x0.expand_as(x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        if self.model.parameterization == "eps":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("which", ["tiny_v1", "tiny_v2"])
@pytest.mark.parametrize("Sampler", [DDIMSampler, EulerSampler, DPMSolverSampler])
def test_sampler_recovers_x0_with_an_exact_denoiser(request, which, Sampler):
    model = request.getfixturevalue(which)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    oracle = _Oracle(model, x0)
    cond = torch.zeros(2, 77, 64)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = Sampler(oracle).sample(cond, (2, 4, 8, 8), steps=20, x_T=noise)
    expected = x0.expand_as(out)
    if Sampler is DDIMSampler:
        # DDIM ends at the schedule's first level a_0 (as the original does), on the ODE path of x_T.
        ac = model.alphas_cumprod.double()
        a_T, a_0 = ac[int(ddim_timesteps(1000, 20)[-1])], ac[0]
        eps = (noise - a_T.sqrt() * x0) / (1 - a_T).sqrt()
        expected = (a_0.sqrt() * x0 + (1 - a_0).sqrt() * eps).float()
    assert torch.allclose(out, expected, atol=2e-3), (out - expected).abs().max()


class _GaussianData(_Oracle):
    """The exact eps-denoiser of data x0 ~ N(0, s^2): D(x; sigma) = x s^2 / (s^2 + sigma^2). Its
    probability-flow ODE has a closed form, x(sigma) = x(sigma_max) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2))."""

    def __init__(self, model, s):
        super().__init__(model, None)
        self.s = s

    def apply_model(self, x_in, t, cond):
        ac = self.model.alphas_cumprod.double()
        lo = t.float().floor().long().clamp(0, len(ac) - 1)
        hi = (lo + 1).clamp_max(len(ac) - 1)
        ls = ((1 - ac) / ac).sqrt().log()
        sigma = (ls[lo] + (t.double() - lo) * (ls[hi] - ls[lo])).exp().view(-1, 1, 1, 1)
        x = x_in.double() * (1 + sigma ** 2).sqrt()        # back to x = x0 + sigma eps
        return (x * sigma / (self.s ** 2 + sigma ** 2)).float()


def test_dpm_solver_is_second_order_where_euler_is_first(tiny_v1):
    model = _GaussianData(tiny_v1, s=0.5)
    cond = torch.zeros(1, 77, 64)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    sigma_max = float(EulerSampler(tiny_v1).log_sigmas[-1].exp())
    exact = noise * sigma_max * 0.5 / (0.25 + sigma_max ** 2) ** 0.5
    errors = {}
    for Sampler in (EulerSampler, DPMSolverSampler):
        for steps in (16, 32):
            out = Sampler(model).sample(cond, (1, 4, 8, 8), steps=steps, x_T=noise)
            errors[Sampler.__name__, steps] = float((out - exact).abs().max() / exact.abs().max())
    assert errors["DPMSolverSampler", 32] < errors["EulerSampler", 32] / 10, errors
    # twice the steps: the error halves for Euler (first order) and falls at least 3.5x for
    # DPM-Solver++(2M) (measured 5.9x; second order, its first and last steps first order)
    assert errors["EulerSampler", 16] / errors["EulerSampler", 32] < 2.6
    assert errors["DPMSolverSampler", 16] / errors["DPMSolverSampler", 32] > 3.5, errors


def test_timestep_and_sigma_grids():
    assert ddim_timesteps(1000, 50)[:3].tolist() == [1, 21, 41]
    assert len(ddim_timesteps(1000, 30)) == 30
    with pytest.raises(ValueError, match="steps must be"):
        ddim_timesteps(1000, 0)
    s = karras_sigmas(0.03, 14.6, 10)
    assert s[0].item() == pytest.approx(14.6) and s[-2].item() == pytest.approx(0.03) and s[-1] == 0
    assert (s.diff() < 0).all()


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_seeded_sampling_is_deterministic(tiny_v1, sampler):
    kwargs = dict(sampler=sampler, steps=4, scale=3.0, height=32, width=32)
    a = generate(tiny_v1, ["a red cube", "a blue ball"], seed=7, **kwargs)
    b = generate(tiny_v1, ["a red cube", "a blue ball"], seed=7, **kwargs)
    c = generate(tiny_v1, ["a red cube", "a blue ball"], seed=8, **kwargs)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddim_eta_adds_seeded_noise(tiny_v1):
    kwargs = dict(steps=4, scale=1.0, height=32, width=32)
    eta0 = generate(tiny_v1, ["a cat"], seed=7, eta=0.0, **kwargs)
    eta1 = generate(tiny_v1, ["a cat"], seed=7, eta=1.0, **kwargs)
    assert not torch.equal(eta0, eta1)
    assert torch.equal(eta1, generate(tiny_v1, ["a cat"], seed=7, eta=1.0, **kwargs))


def test_guidance_scale_one_equals_conditional_prediction(tiny_v1):
    cond = tiny_v1.get_learned_conditioning(["a photo of a dog", "a cube"])
    uncond = tiny_v1.get_learned_conditioning(["", ""])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([100, 700])
    with torch.no_grad():
        guided = GuidedDenoiser(tiny_v1, cond, uncond, scale=1.0)(x, t)
        conditional = tiny_v1.apply_model(x, t, cond)
        unconditional = tiny_v1.apply_model(x, t, uncond)
        strong = GuidedDenoiser(tiny_v1, cond, uncond, scale=5.0)(x, t)
    assert torch.allclose(guided, conditional, atol=1e-5)
    assert torch.allclose(strong, unconditional + 5.0 * (conditional - unconditional), atol=1e-4)


def test_bad_sampling_arguments(tiny_v1):
    with pytest.raises(ValueError, match="sampler must be"):
        generate(tiny_v1, ["x"], sampler="plms", steps=2, height=32, width=32)
    with pytest.raises(ValueError, match="multiples"):
        generate(tiny_v1, ["x"], steps=2, height=33, width=32)
    with pytest.raises(ValueError, match="fp16 autocast needs a GPU"):
        generate(tiny_v1, ["x"], steps=2, height=32, width=32, precision="fp16")


def test_bf16_autocast_on_cpu_runs(tiny_v2):
    img = generate(tiny_v2, ["a cat"], steps=2, scale=2.0, height=32, width=32, precision="bf16")
    assert torch.isfinite(img).all()
