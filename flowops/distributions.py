"""Base distributions as modules (their parameters move with ``.to(device)``)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, Normal


class StandardNormal(nn.Module):
    """N(0, I) over an event of ``shape``, built on ``torch.distributions``."""

    def __init__(self, shape):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.shape = shape
        self.register_buffer("loc", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    @property
    def dist(self) -> Independent:
        return Independent(Normal(self.loc, self.scale, validate_args=False), len(self.shape))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"StandardNormal: expected samples of shape [batch, {self.shape}], got {tuple(z.shape)}")
        # Closed form (same value as self.dist.log_prob, without building distribution objects per call).
        d = math.prod(self.shape)
        return -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn((n, *self.shape), device=self.loc.device, dtype=self.loc.dtype, generator=generator)
        return z * temperature if temperature != 1.0 else z
