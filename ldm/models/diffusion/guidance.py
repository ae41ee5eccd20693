"""Classifier-free guidance (Ho & Salimans 2022): out = u + s (c - u)."""
from __future__ import annotations

import torch


class GuidedDenoiser:
    """Calls the latent-diffusion network on `cond` (and `uncond`) and mixes with guidance scale `scale`.
    A conditioning is a tensor of encodings, or (SDXL) a dict of them.

    The conditional and unconditional halves run as one batch. Their context [uncond; cond] is
    built once, so every step hands the network the same tensor (Perfusion caches its edited
    keys and values per context tensor). Returns the network's own output type (eps or v);
    the mixing is linear, so it is valid for both.
    """

    def __init__(self, model, cond, uncond=None, scale: float = 1.0):
        self.model, self.scale, self.guided = model, float(scale), uncond is not None
        self.context = concat_conditioning(uncond, cond) if self.guided else cond
        self.device = first_tensor(cond).device

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.model.apply_model(x, t, self.context)
        out_u, out_c = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), self.context).chunk(2)
        return out_u + self.scale * (out_c - out_u)


def first_tensor(cond) -> torch.Tensor:
    return next(iter(cond.values())) if isinstance(cond, dict) else cond


def concat_conditioning(a, b):
    """[a; b] along the batch, for a tensor or a dict of tensors (same keys and shapes)."""
    if isinstance(a, dict) != isinstance(b, dict) or (isinstance(a, dict) and a.keys() != b.keys()):
        raise ValueError("the unconditional and conditional encodings are of different kinds")
    if isinstance(a, dict):
        return {k: concat_conditioning(a[k], b[k]) for k in a}
    if a.shape != b.shape:
        raise ValueError(f"unconditional encodings {tuple(a.shape)} differ from conditional {tuple(b.shape)}")
    return torch.cat([a, b])


def make_generator(seed: int | None, device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=torch.device(device).type).manual_seed(int(seed))


def initial_noise(shape, device, generator: torch.Generator | None, dtype=torch.float32) -> torch.Tensor:
    """Seeded noise drawn on the generator's device (so a seed gives the same code on CPU every run)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
