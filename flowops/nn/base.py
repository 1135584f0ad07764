"""Transform base classes: composition, inversion, permutations.

Convention: ``forward(x) -> (z, logabsdet)`` maps data to latent (the normalizing
direction used by ``log_prob``); ``inverse(z) -> (x, logabsdet)`` is the generative
direction used by ``sample``. Each returns the log|det| of its own Jacobian, one
value per sample, so the two log-dets of matching points sum to zero.
"""
from __future__ import annotations

import torch
from torch import nn


class Transform(nn.Module):
    """An invertible map with a tractable log|det J|."""

    def forward(self, x: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    @property
    def inv(self) -> "Transform":
        """This transform with its directions swapped."""
        return InverseTransform(self)


class InverseTransform(Transform):
    def __init__(self, base: Transform):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base.inverse(x)

    def inverse(self, z):
        return self.base.forward(z)


# Functions (transforms, x, inverse) -> (y, logdet) | None that run a whole run of layers as one fused
# call when they apply (registered by layer modules, e.g. MLP couplings on CPU); None means "not fusable".
STACK_FUSERS = []


class Compose(Transform):
    """Applies transforms in order; the log-dets add up."""

    def __init__(self, *transforms: Transform):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple, nn.ModuleList)):
            transforms = tuple(transforms[0])
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"Compose: transform {i} must be a flowops Transform, got {type(t).__name__}")
        self.transforms = nn.ModuleList(transforms)

    def __len__(self):
        return len(self.transforms)

    def __getitem__(self, i):
        return self.transforms[i]

    def _fused(self, x, inverse):
        for fuser in STACK_FUSERS:
            out = fuser(self.transforms, x, inverse)
            if out is not None:
                return out
        return None

    def forward(self, x):
        fused = self._fused(x, False)
        return fused if fused is not None else chain(self.transforms, x)

    def inverse(self, z):
        fused = self._fused(z, True)
        return fused if fused is not None else chain(self.transforms, z, inverse=True)


def chain(transforms, x, inverse: bool = False):
    """``x`` through ``transforms`` one by one (in reverse, each inverted, when ``inverse``); the log-dets add
    up (zeros for an empty chain)."""
    total = None
    for t in (reversed(transforms) if inverse else transforms):
        x, ld = t.inverse(x) if inverse else t(x)
        total = ld if total is None else total + ld
    if total is None:
        total = x.new_zeros(x.shape[0])
    return x, total


class Permutation(Transform):
    """Permutes dim 1 (features or channels); volume preserving."""

    def __init__(self, perm):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.dim() != 1 or not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
            raise ValueError(f"Permutation: perm must be a permutation of 0..n-1, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _check(self, x):
        if x.dim() < 2 or x.shape[1] != self.perm.numel():
            raise ValueError(f"{type(self).__name__}: expected {self.perm.numel()} features along dim 1, got shape "
                             f"{tuple(x.shape)}")

    def forward(self, x):
        self._check(x)
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, z):
        self._check(z)
        return z.index_select(1, self.inv_perm), z.new_zeros(z.shape[0])


class ReversePermutation(Permutation):
    def __init__(self, features: int):
        super().__init__(torch.arange(features - 1, -1, -1))


class RandomPermutation(Permutation):
    def __init__(self, features: int, generator: torch.Generator | None = None):
        super().__init__(torch.randperm(features, generator=generator))
