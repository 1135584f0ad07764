"""Toy data sets for the examples: 2-moons, generated locally (no download).

The points come from :func:`sklearn.datasets.make_moons`: two interlocking half circles of radius 1,
the upper centred at (0, 0) and the lower at (1, 0.5), with isotropic Gaussian noise. The cloud spans
roughly x in [-1, 2] and y in [-0.5, 1] for ``noise=0.05``.
"""
from __future__ import annotations

import numpy as np
import torch

from .nn.base import Transform

__all__ = ["moons", "MoonsSampler", "moons_streams", "Standardize", "digits", "DIGITS_LEVELS"]


def _rng(seed) -> np.random.RandomState:
    if isinstance(seed, np.random.RandomState):
        return seed
    return np.random.RandomState(None if seed is None else int(seed) % (2 ** 32))


def moons(n: int, noise: float = 0.05, seed: int | np.random.RandomState | None = None) -> torch.Tensor:
    """``n`` points of the 2-moons set as a float32 tensor ``[n, 2]`` (class labels dropped, order shuffled).

    ``seed`` is an int (reproducible), a ``numpy.random.RandomState`` (advanced in place) or None.
    """
    from sklearn.datasets import make_moons

    n = int(n)
    if n < 0:
        raise ValueError(f"moons: n must be non-negative, got {n}")
    if not float(noise) >= 0:
        raise ValueError(f"moons: noise must be non-negative, got {noise}")
    if n == 0:
        return torch.empty(0, 2)
    x, _ = make_moons(n_samples=n, noise=float(noise), shuffle=True, random_state=_rng(seed))
    return torch.from_numpy(x.astype(np.float32))


class MoonsSampler:
    """Fresh 2-moons batches on every call: ``sampler(batch) -> [batch, 2]``.

    Points are drawn from one seeded stream in chunks of ``chunk`` (a single ``make_moons`` call is
    much cheaper per point than one call per batch); the sequence of batches depends only on ``seed``
    and the sequence of requested sizes, so two runs with the same seed see the same data. Every
    batch is a fresh i.i.d. draw, never a repeat: there is no fixed training set to overfit.
    """

    def __init__(self, noise: float = 0.05, seed: int | None = 0, chunk: int = 65536,
                 device=None, dtype: torch.dtype = torch.float32):
        self.noise = float(noise)
        self.chunk = int(chunk)
        self.device, self.dtype = device, dtype
        self._rng = _rng(seed)
        self._buf = torch.empty(0, 2, dtype=dtype, device=device)
        self._pos = 0

    def __call__(self, n: int) -> torch.Tensor:
        n = int(n)
        parts, need = [], n
        while need > 0:
            if self._pos >= self._buf.shape[0]:
                self._buf = moons(max(self.chunk, need), self.noise, self._rng).to(self.device, self.dtype)
                self._pos = 0
            take = min(need, self._buf.shape[0] - self._pos)
            parts.append(self._buf[self._pos:self._pos + take])
            self._pos += take
            need -= take
        if not parts:
            return self._buf[:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def moons_streams(noise: float, heldout: int, seed: int = 0):
    """The 2-moons tasks' independent data streams: ``(reference, heldout, sampler)``.

    ``reference``: 10,000 points (standardization and the data panel of the figures; seed ``seed + 1``),
    ``heldout``: ``heldout`` points for the held-out NLL (seed ``seed + 2``), ``sampler``: the training
    batches (:class:`MoonsSampler`, seed ``seed``)."""
    return (moons(10000, noise, seed=seed + 1), moons(heldout, noise, seed=seed + 2),
            MoonsSampler(noise, seed=seed))


class Standardize(Transform):
    """A fixed affine map ``z = (x - mean) / std`` per feature, as a flow layer.

    Put it first in a flow to train the couplings on standardized data while ``log_prob`` stays in
    the original data units: its log-det, ``-sum(log std)`` per sample, is part of the flow's
    log-det, so densities and NLLs are those of the raw data (change of variables). Built from data
    with :meth:`fit`.
    """

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"Standardize: mean and std must have the same shape, got {tuple(mean.shape)} and "
                             f"{tuple(std.shape)}")
        if not torch.all(std > 0):
            raise ValueError(f"Standardize: std must be positive, got {std.tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 1e-6) -> "Standardize":
        x = x.detach().double()
        return cls(x.mean(0), x.std(0).clamp_min(eps))

    def _logdet(self, x, sign):
        value = -sign * float(torch.log(self.std.double()).sum())
        return x.new_full((x.shape[0],), value)

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype), self._logdet(x, 1.0)

    def inverse(self, z):
        return z * self.std.to(z.dtype) + self.mean.to(z.dtype), self._logdet(z, -1.0)



DIGITS_LEVELS = 17  # scikit-learn's 8x8 digits hold the gray levels 0..16


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits (1797 images, gray levels 0..16) as a train / held-out split.

    Returns ``(train, heldout)``, integer tensors (``torch.int64``) of shape ``[n, 1, 8, 8]`` (NCHW, one
    channel) holding the discrete levels ``0..16`` (:data:`DIGITS_LEVELS` = 17 of them); the rows are a
    seeded random permutation of the data set, the first ``round(test_fraction * 1797)`` held out. The
    split depends only on ``seed`` and ``test_fraction``. Ships with scikit-learn: no download.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency of the examples
        raise RuntimeError("the digits data set needs scikit-learn (pip install scikit-learn)") from exc
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    images = load_digits().images  # float64 [1797, 8, 8], whole numbers 0..16
    x = torch.from_numpy(np.rint(images).astype(np.int64)).unsqueeze(1)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    n_test = min(x.shape[0] - 1, max(1, int(round(test_fraction * x.shape[0]))))
    return x[perm[n_test:]].contiguous(), x[perm[:n_test]].contiguous()
