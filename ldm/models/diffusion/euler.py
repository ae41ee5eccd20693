"""Euler sampling on the Karras et al. (NeurIPS 2022, Eq. 5) sigma discretization.

The discrete-time model is used as a denoiser D(x; sigma) with x = x_0 + sigma * eps:
its input is x / sqrt(sigma^2 + 1) at the (fractional) timestep whose sigma matches.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.guidance import GuidedDenoiser, initial_noise


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


class EulerSampler:
    def __init__(self, model):
        self.model = model
        ac = model.host_alphas_cumprod
        self.log_sigmas = ((1 - ac) / ac).sqrt().log()

    def sigma_to_t(self, sigma: float) -> float:
        """Fractional training timestep whose log-sigma equals log(sigma) (linear interpolation)."""
        ls = self.log_sigmas
        s = torch.tensor(sigma, dtype=torch.float64).log().clamp(ls[0], ls[-1])
        hi = int(torch.searchsorted(ls, s).clamp(1, len(ls) - 1))
        w = (s - ls[hi - 1]) / (ls[hi] - ls[hi - 1])
        return float(hi - 1 + w)

    def denoised(self, denoise, x, sigma: float):
        t = torch.full((x.shape[0],), self.sigma_to_t(sigma), device=x.device)
        scale = 1.0 / (sigma ** 2 + 1) ** 0.5
        out = denoise(x * scale, t).float()
        if self.model.parameterization == "eps":
            return x - sigma * out
        return x / (sigma ** 2 + 1) - out * sigma * scale  # v: c_skip x + c_out v

    def start(self, cond, shape, steps, uncond, scale, x_T, generator):
        """(guided denoiser, the Karras sigmas, x at the first sigma) of a run."""
        denoise = GuidedDenoiser(self.model, cond, uncond, scale)
        sigmas = karras_sigmas(float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp()), steps)
        noise = initial_noise(shape, denoise.device, generator) if x_T is None else x_T.to(denoise.device)
        return denoise, sigmas, noise * float(sigmas[0])

    @torch.no_grad()
    def sample(self, cond, shape, steps=50, uncond=None, scale=1.0, x_T=None, generator=None, progress=False):
        denoise, sigmas, x = self.start(cond, shape, steps, uncond, scale, x_T, generator)
        for i in tqdm(range(steps), desc="Euler", disable=not progress, leave=False):
            sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
            d = (x - self.denoised(denoise, x, sigma)) / sigma
            x = x + d * (nxt - sigma)
        return x
