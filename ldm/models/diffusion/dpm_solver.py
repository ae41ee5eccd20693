"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) on the Karras sigmas.

The multistep second-order solver of the probability-flow ODE in its data-prediction form:
with lambda = -log(sigma) and h = lambda_next - lambda, one step is
    x_next = (sigma_next / sigma) x - expm1(-h) D,
where D is the denoised estimate, corrected from the second step on with the previous one:
D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h. The last step (sigma_next = 0) returns x0.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.euler import EulerSampler


class DPMSolverSampler(EulerSampler):
    """The same denoiser and sigma grid as EulerSampler; only the update differs."""

    @torch.no_grad()
    def sample(self, cond, shape, steps=50, uncond=None, scale=1.0, x_T=None, generator=None, progress=False):
        denoise, sigmas, x = self.start(cond, shape, steps, uncond, scale, x_T, generator)
        x0_prev, h_prev = None, None
        for i in tqdm(range(steps), desc="DPM-Solver++", disable=not progress, leave=False):
            sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x0 = self.denoised(denoise, x, sigma)
            if nxt == 0:
                return x0
            h = math.log(sigma / nxt)
            d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
            x = (nxt / sigma) * x - math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        return x
