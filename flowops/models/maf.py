"""MAF: a stack of masked autoregressive transforms over a standard-normal base."""
from __future__ import annotations

import torch

from ..distributions import StandardNormal
from ..flow import Flow
from ..nn.base import Compose
from ..nn.made import MAF as MAFLayer

PERMUTATIONS = ("reverse", "random", "none")


class MAF(Flow):
    """``transforms`` MAF layers on ``features``-dimensional vectors.

    The autoregressive order changes between layers inside each MADE (no permutation layers):
    ``permutation="reverse"`` alternates the natural and reversed orders, ``"random"`` draws a
    random order per layer (seeded by ``seed``), ``"none"`` keeps the natural order.
    ``hidden`` is the MADE hidden widths (an int means two layers of that width).
    ``log_prob`` is one MADE pass per layer; ``sample`` runs each layer's inverse in one pass's work.
    """

    def __init__(self, features: int, transforms: int = 5, hidden=(64, 64), activation: str = "relu",
                 scale: str = "softclamp", clamp: float = 2.0, permutation: str = "reverse", seed: int = 0):
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"MAF: features must be a positive int, got {features!r}")
        if isinstance(transforms, bool) or not isinstance(transforms, int) or transforms < 1:
            raise ValueError(f"MAF: transforms must be a positive int, got {transforms!r}")
        if permutation not in PERMUTATIONS:
            raise ValueError(f"MAF: permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        if isinstance(hidden, int):
            hidden = (hidden, hidden)
        gen = torch.Generator().manual_seed(int(seed))
        layers = []
        for i in range(transforms):
            if permutation == "reverse":
                order = "reversed" if i % 2 else "natural"
            elif permutation == "random":
                order = "random"
            else:
                order = "natural"
            layers.append(MAFLayer(features, hidden, activation, order, scale, clamp, generator=gen))
        super().__init__(StandardNormal(features), Compose(*layers))
        self.features, self.transforms, self.hidden = features, transforms, tuple(hidden)
