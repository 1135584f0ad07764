"""RealNVP: a stack of affine couplings with alternating masks over a standard-normal base."""
from __future__ import annotations

from ..distributions import StandardNormal
from ..flow import Flow
from ..nn.base import Compose
from ..nn.coupling import AffineCoupling


class RealNVP(Flow):
    """``layers`` affine couplings on ``features``-dimensional vectors, alternating which half passes through.

    Each conditioner is an MLP with two hidden layers of ``hidden`` units whose last layer starts
    at zero, so the untrained flow is the identity.
    """

    def __init__(self, features: int, layers: int = 6, hidden: int = 64, scale: str = "softclamp",
                 clamp: float = 2.0, mask: str = "half"):
        if int(features) < 2:
            raise ValueError(f"RealNVP: features must be at least 2, got {features}")
        if int(layers) < 1:
            raise ValueError(f"RealNVP: layers must be at least 1, got {layers}")
        couplings = [AffineCoupling(int(features), mask=mask, hidden=hidden, scale=scale, clamp=clamp, flip=i % 2 == 1)
                     for i in range(int(layers))]
        super().__init__(StandardNormal(int(features)), Compose(*couplings))
        self.features, self.layers, self.hidden = int(features), int(layers), hidden
