"""DDIM sampling (Song et al., ICLR 2021, Eq. 12), with eta interpolating to DDPM-like noise."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ldm.errors import UserError
from ldm.models.diffusion.guidance import GuidedDenoiser, initial_noise


def ddim_timesteps(num_train_steps: int, steps: int) -> torch.Tensor:
    """Uniformly spaced training timesteps, the LDM 'uniform' rule (1, 1 + c, 1 + 2c, ...)."""
    if not 1 <= steps <= num_train_steps:
        raise UserError(f"steps must be in [1, {num_train_steps}], got {steps}")
    return torch.arange(0, num_train_steps, num_train_steps // steps)[:steps] + 1


class DDIMSampler:
    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def sample(self, cond, shape, steps=50, uncond=None, scale=1.0, eta=0.0, x_T=None, generator=None,
               progress=False):
        model = self.model
        denoise = GuidedDenoiser(model, cond, uncond, scale)
        device = denoise.device
        timesteps = ddim_timesteps(model.num_timesteps, steps).clamp_max(model.num_timesteps - 1)
        alphas = model.host_alphas_cumprod
        x = initial_noise(shape, device, generator) if x_T is None else x_T.to(device)
        order = list(reversed(range(len(timesteps))))
        for i in tqdm(order, desc="DDIM", disable=not progress, leave=False):
            t = torch.full((shape[0],), int(timesteps[i]), device=device, dtype=torch.long)
            a_t = alphas[timesteps[i]]
            a_prev = alphas[timesteps[i - 1]] if i > 0 else alphas[0]
            eps, x0 = model.predict_eps_and_x0(x, t, denoise(x, t).float())
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if eta > 0:
                x = x + sigma * initial_noise(shape, device, generator)
            x = x.float()
        return x
