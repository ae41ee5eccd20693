"""Diagonal Gaussian posterior q(z|x) produced by the KL autoencoder."""
from __future__ import annotations

import math

import torch

from ldm.errors import UserError

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # clamp range of the original LDM implementation


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) per latent element.

    `parameters` is (B, 2C, ...): the first C channels are the mean, the last C the log-variance.
    Reductions (`kl`, `nll`) sum over every non-batch dimension and return one value per batch element.
    """

    def __init__(self, parameters: torch.Tensor):
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise UserError(
                f"DiagonalGaussianDistribution expects parameters of shape (B, 2C, ...); got {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def _reduce_dims(self) -> list[int]:
        return list(range(1, self.mean.dim()))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps, eps ~ N(0, I) (Kingma & Welling 2014, Sec. 2.4)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar) (Kingma & Welling 2014, App. B)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=self._reduce_dims())

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-density of `x`: 1/2 sum(log(2 pi) + logvar + (x - mean)^2 / var)."""
        if x.shape != self.mean.shape:
            raise ValueError(f"nll expects x of shape {tuple(self.mean.shape)}; got {tuple(x.shape)}")
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var, dim=self._reduce_dims()
        )
