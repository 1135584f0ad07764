"""Flow(base, transforms): density evaluation and sampling."""
from __future__ import annotations

import math

import torch
from torch import nn

from .distributions import StandardNormal
from .nn.base import Compose, Transform


class Flow(nn.Module):
    """A normalizing flow: ``transforms`` map data to the latent space of ``base``.

    ``base`` is a module with ``log_prob``/``sample`` (such as :class:`StandardNormal`) or a
    ``torch.distributions.Distribution``.
    """

    def __init__(self, base, transforms):
        super().__init__()
        if isinstance(transforms, (list, tuple)):
            transforms = Compose(*transforms)
        if not isinstance(transforms, Transform):
            raise TypeError(f"Flow: transforms must be a Transform or a list of them, got {type(transforms).__name__}")
        self.base = base
        self.transform = transforms

    def forward(self, x):
        """Data -> latent: ``(z, logabsdet)``."""
        return self.transform(x)

    def inverse(self, z):
        """Latent -> data: ``(x, logabsdet)``."""
        return self.transform.inverse(z)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self.transform(x)
        return self.base.log_prob(z) + logdet

    def _base_sample(self, n, **kw):
        if isinstance(self.base, StandardNormal):
            return self.base.sample(n, **kw)
        return self.base.sample((n,))

    def sample(self, n: int, **kw) -> torch.Tensor:
        if int(n) < 0:
            raise ValueError(f"Flow.sample: n must be non-negative, got {n}")
        x, _ = self.transform.inverse(self._base_sample(int(n), **kw))
        return x

    def sample_and_log_prob(self, n: int, **kw):
        z = self._base_sample(int(n), **kw)
        x, logdet = self.transform.inverse(z)
        return x, self.base.log_prob(z) - logdet

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood in bits per dimension (continuous data)."""
        d = math.prod(x.shape[1:])
        return -self.log_prob(x).mean() / (d * math.log(2.0))
