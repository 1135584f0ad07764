"""Planar and radial flows (Rezende & Mohamed 2015), with inverses.

Both maps are naturally written generatively, ``z -> z'``. In flowops ``forward(x)`` is the
normalizing direction (data -> latent, used by ``log_prob``) and ``inverse(z)`` the generative
one (used by ``sample`` and ``sample_and_log_prob``), so for these layers:

* ``inverse(z)`` applies the closed-form map (planar: ``z + u_hat tanh(w.z + b)``; radial:
  ``z + beta/(alpha + r) (z - z0)``) with ``+log|det|``. This is the cheap direction, the one
  variational inference uses (sample from q and score the samples in one pass).
* ``forward(x)`` undoes it with ``-log|det|``: radial in closed form through the radius, planar by
  solving the scalar equation along ``w`` with a safeguarded Newton iteration (bisection fallback,
  float64, batched; see :func:`flowops.reference.planar_solve_alpha`). This is what
  ``log_prob`` of arbitrary points needs. Near the boundary ``w . u_hat = -1`` a planar layer is
  nearly flat at one point (slope ``1 + w . u_hat``) and its inverse correspondingly steep, and
  through a stack those slopes multiply: recovering z there is ill-conditioned (the recovered z still
  maps back onto x to rounding).

The parameters are stored raw and mapped so that every layer is invertible for any values:
planar ``u_hat = u + (softplus(w.u) - 1 - w.u) w / |w|^2`` (so ``w . u_hat > -1``); radial
``alpha = softplus(alpha_raw) > 0``, ``beta = -alpha + softplus(beta_raw) > -alpha``.

:class:`PlanarStack` holds K planar layers as ``[K, d]`` tensors and runs its generative
direction through the fused op :func:`flowops.ops.planar_stack` (one pass, C++ on CPU, Triton on
GPU); a list of K :class:`Planar` layers computes the same map one eager step at a time.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops, reference
from .base import Transform


def _check_features(features, name):
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"{name}: features must be a positive int, got {features!r}")
    return features


def _check_input(x, features, name, arg="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: {arg} must be a floating tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"{name}: {arg} must be [batch, {features}], got shape {tuple(x.shape)}")


class PlanarStack(Transform):
    """K planar layers ``z <- z + u_hat_k tanh(w_k . z + b_k)``, ``k = 0 .. K-1``, as one fused op.

    ``inverse(z)`` (generative, used for sampling and VI) runs :func:`flowops.ops.planar_stack`;
    ``forward(x)`` (normalizing, used by ``log_prob``) undoes the layers from ``K-1`` down to 0 by
    Newton's method along each ``w_k``. Parameters: ``w``, ``u`` (raw) ``[K, d]`` and ``b [K]``,
    initialized ``w, u ~ U(-1/sqrt(d), 1/sqrt(d))``, ``b = 0``.
    """

    def __init__(self, features: int, layers: int = 1):
        super().__init__()
        self.features = _check_features(features, type(self).__name__)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise ValueError(f"{type(self).__name__}: layers must be a non-negative int, got {layers!r}")
        lim = 1.0 / math.sqrt(features)
        self.w = nn.Parameter(torch.empty(layers, features).uniform_(-lim, lim))
        self.u = nn.Parameter(torch.empty(layers, features).uniform_(-lim, lim))
        self.b = nn.Parameter(torch.zeros(layers))

    @property
    def layers(self) -> int:
        return self.w.shape[0]

    def u_hat(self) -> torch.Tensor:
        """The reparameterized ``u`` (``w_k . u_hat_k > -1`` for every layer)."""
        return reference.planar_u_hat(self.w, self.u)

    def _params(self, x):
        w, u, b = self.w, self.u_hat(), self.b
        if w.dtype != x.dtype:
            w, u, b = w.to(x.dtype), u.to(x.dtype), b.to(x.dtype)
        return w, u, b

    def inverse(self, z):
        _check_input(z, self.features, type(self).__name__, "z")
        return ops.planar_stack(z, *self._params(z))

    def forward(self, x):
        _check_input(x, self.features, type(self).__name__)
        return reference.planar_stack_inverse(x, *self._params(x))

    def extra_repr(self) -> str:
        return f"features={self.features}, layers={self.layers}"


class Planar(PlanarStack):
    """One planar layer ``z' = z + u_hat tanh(w . z + b)`` (``inverse``; ``forward`` solves it back).

    The same as ``PlanarStack(features, layers=1)``; its parameters ``w``, ``u`` are ``[1, d]``
    and ``b`` is ``[1]``.
    """

    def __init__(self, features: int):
        super().__init__(features, layers=1)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Radial(Transform):
    """Radial layer ``z' = z + beta / (alpha + r) (z - z0)``, ``r = |z - z0|`` (``inverse``).

    ``forward`` inverts it in closed form through the radius. Parameters: ``z0 [d]`` (initialized
    ``N(0, 1/d)``), ``alpha_raw`` and ``beta_raw`` (scalars; ``alpha = softplus(alpha_raw)``,
    ``beta = -alpha + softplus(beta_raw)``), initialized so that ``alpha = 1`` and ``beta`` is small.
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = _check_features(features, type(self).__name__)
        self.z0 = nn.Parameter(torch.randn(features) / math.sqrt(features))
        self.alpha_raw = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus -> 1
        self.beta_raw = nn.Parameter(torch.tensor(math.log(math.e - 1.0)) + 0.1 * torch.randn(()))

    def params(self):
        """``(alpha, beta)`` after the reparameterization."""
        return reference.radial_params(self.alpha_raw, self.beta_raw)

    def _args(self, x):
        alpha, beta = self.params()
        z0 = self.z0
        if z0.dtype != x.dtype:
            z0, alpha, beta = z0.to(x.dtype), alpha.to(x.dtype), beta.to(x.dtype)
        return z0, alpha, beta

    def inverse(self, z):
        _check_input(z, self.features, type(self).__name__, "z")
        return reference.radial(z, *self._args(z))

    def forward(self, x):
        _check_input(x, self.features, type(self).__name__)
        return reference.radial_inverse(x, *self._args(x))

    def extra_repr(self) -> str:
        return f"features={self.features}"


__all__ = ["Planar", "PlanarStack", "Radial"]
