"""MADE, and the masked autoregressive flows built on it: MAF and its dual IAF.

MADE (Germain et al., 2015) is an MLP whose weights are masked so that output ``d`` depends only on
the inputs that come before feature ``d`` in a chosen order. flowops never builds the mask: every
layer is :func:`flowops.ops.masked_linear` with degrees, and all units are kept sorted by degree
(inputs are gathered into order first), so each mask is a staircase whose zero tiles are skipped.

MAF (Papamakarios et al., 2017): ``z = x * s(raw(x)) + t(x)`` with ``(raw, t) = MADE(x)``; the density
direction ``forward`` is one MADE pass plus the fused coupling op; sampling (``inverse``) solves the
autoregression with :func:`flowops.ops.made_inverse` in one pass's arithmetic instead of D passes.
IAF (Kingma et al., 2016) is the same map the other way round: ``inverse(z) = z * s(raw(z)) + t(z)``
is one pass (fast sampling), ``forward`` (density of arbitrary points) is the autoregressive solve.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..ops.masked_linear import masked_linear_unchecked
from ..reference import made as ref
from .base import Transform

ORDERS = ("natural", "reversed", "random")
SCALES = ("exp", "softclamp", "sigmoid")


def make_order(features: int, order="natural", generator: torch.Generator | None = None) -> torch.Tensor:
    """``order[j]`` = position (0-based) of feature j in the autoregressive order."""
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(features)
        if order == "reversed":
            return torch.arange(features - 1, -1, -1)
        if order == "random":
            return torch.randperm(features, generator=generator)
        raise ValueError(f"MADE: order must be one of {ORDERS} or a permutation of 0..{features - 1}, got {order!r}")
    try:
        perm = torch.as_tensor(order)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"MADE: order must be a string or a sequence of ints, got {type(order).__name__}") from exc
    if perm.dtype.is_floating_point or perm.dtype == torch.bool or perm.dtype.is_complex:
        raise TypeError(f"MADE: order must hold integers, got dtype {perm.dtype}")
    perm = perm.long().cpu()
    if perm.dim() != 1 or perm.numel() != features or not torch.equal(torch.sort(perm).values,
                                                                       torch.arange(features)):
        raise ValueError(f"MADE: order must be a permutation of 0..{features - 1} (one entry per feature), got "
                         f"{perm.tolist()}")
    return perm


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation.

    Args:
        features: D, the number of input features (>= 1).
        hidden: widths of the hidden layers; each must be at least D - 1 so that every degree
            1..D-1 has a unit (otherwise some outputs could not see all their predecessors).
        params_per_feature: outputs per feature (2 for an affine transform: raw scale, shift).
        activation: ``"relu"`` or ``"tanh"``.
        order: ``"natural"``, ``"reversed"``, ``"random"`` or a permutation (``order[j]`` is the
            0-based position of feature j); ``generator`` seeds ``"random"``.

    ``forward(x)`` returns ``[B, params_per_feature * D]``: parameter p of feature j in column
    ``p * D + j`` (for an affine flow: all raw scales, then all shifts, as the coupling op wants).
    Output ``p * D + j`` depends only on the features that precede j in the order. The output layer
    starts at zero (an untrained MAF is the identity).
    """

    def __init__(self, features: int, hidden=(64, 64), params_per_feature: int = 2, activation: str = "relu",
                 order="natural", generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"MADE: features must be a positive int, got {features!r}")
        if isinstance(hidden, int):
            hidden = (hidden,)
        hidden = tuple(hidden)
        for h in hidden:
            if isinstance(h, bool) or not isinstance(h, int) or h < max(features - 1, 1):
                raise ValueError(f"MADE: every hidden width must be an int >= features - 1 = {features - 1} (and >= 1) "
                                 f"so that each degree 1..{features - 1} has a unit; got hidden={hidden}")
        if not isinstance(params_per_feature, int) or params_per_feature < 1:
            raise ValueError(f"MADE: params_per_feature must be a positive int, got {params_per_feature!r}")
        if activation not in ref.ACTIVATIONS:
            raise ValueError(f"MADE: activation must be one of {ref.ACTIVATIONS}, got {activation!r}")
        self.features, self.hidden, self.activation = features, hidden, activation
        self.params_per_feature = params_per_feature
        order_t = make_order(features, order, generator)
        perm = torch.argsort(order_t)  # sorted position -> feature
        self.register_buffer("order", order_t)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", order_t.clone())  # feature -> sorted position
        p = params_per_feature
        # user column p * D + j  <-  sorted column order[j] * P + p
        out_index = (order_t.reshape(1, -1) * p + torch.arange(p).reshape(-1, 1)).reshape(-1)
        self.register_buffer("out_index", out_index)
        degs = [torch.arange(1, features + 1)] + [ref.hidden_degrees(features, h) for h in hidden]
        degs.append(torch.arange(1, features + 1).repeat_interleave(p))
        for i, dg in enumerate(degs):
            self.register_buffer(f"degrees_{i}", dg)
        sizes = [features, *hidden, features * p]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i in range(len(sizes) - 1):
            w = torch.empty(sizes[i + 1], sizes[i])
            b = torch.empty(sizes[i + 1])
            last = i == len(sizes) - 2
            if last:
                nn.init.zeros_(w)
                nn.init.zeros_(b)
            else:
                # fan-in of a unit = its number of connections; use the average over the layer
                mask = ref.degree_mask(degs[i], degs[i + 1], False)
                fan_in = max(float(mask.sum(1).float().mean()), 1.0)
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound * math.sqrt(3.0), bound * math.sqrt(3.0))
                nn.init.uniform_(b, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    @property
    def degrees(self):
        return [getattr(self, f"degrees_{i}") for i in range(len(self.weights) + 1)]

    @property
    def hidden_degrees(self):
        return self.degrees[1:-1]

    def check_input(self, x: torch.Tensor, name: str = "x", who: str = "MADE"):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"{who}: {name} must be [batch, {self.features}], got shape {tuple(x.shape)}")
        w = self.weights[0]
        if x.dtype != w.dtype:
            raise TypeError(f"{who}: {name} dtype must match the parameters ({w.dtype}), got {x.dtype}")
        if x.device != w.device:
            raise ValueError(f"{who}: {name} must be on the parameters' device ({w.device}), got {x.device}")

    def forward_sorted(self, x_sorted: torch.Tensor) -> torch.Tensor:
        """The MADE pass in the sorted layout: ``[B, D]`` (degree order) -> ``[B, P * D]`` degree-major."""
        degs = self.degrees
        h = x_sorted
        n = len(self.weights)
        for i in range(n):
            h = masked_linear_unchecked(h, self.weights[i], self.biases[i], degs[i], degs[i + 1], i == n - 1)
            if i < n - 1:
                h = torch.relu(h) if self.activation == "relu" else torch.tanh(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        out = self.forward_sorted(x.index_select(1, self.perm))
        return out.index_select(1, self.out_index)

    def extra_repr(self):
        return (f"features={self.features}, hidden={self.hidden}, params_per_feature={self.params_per_feature}, "
                f"activation={self.activation!r}")


class _MaskedAffine(Transform):
    def __init__(self, features: int, hidden=(64, 64), activation: str = "relu", order="natural",
                 scale: str = "softclamp", clamp: float = 2.0, generator: torch.Generator | None = None):
        super().__init__()
        name = type(self).__name__
        if scale not in SCALES:
            raise ValueError(f"{name}: scale must be one of {SCALES}, got {scale!r}")
        clamp = float(clamp)
        if not clamp > 0 or math.isinf(clamp):
            raise ValueError(f"{name}: clamp must be a positive finite number, got {clamp}")
        self.made = MADE(features, hidden, 2, activation, order, generator)
        self.features, self.scale, self.clamp = features, scale, clamp

    def _one_pass(self, u):
        """``y = u * s + t`` with ``(raw, t) = MADE(u)``; log|det| = sum log s."""
        self.made.check_input(u, who=type(self).__name__)
        return ops.affine_coupling(u, self.made(u), self.scale, self.clamp)

    def _solve(self, y, method="auto"):
        """The u with ``y = u * s(u) + t(u)``, in one pass's work; log|det| = -sum log s."""
        m = self.made
        m.check_input(y, who=type(self).__name__)
        u_sorted, logdet = ops.made_inverse(y.index_select(1, m.perm), list(m.weights), list(m.biases),
                                            m.hidden_degrees, m.activation, self.scale, self.clamp, method=method)
        return u_sorted.index_select(1, m.inv_perm), logdet


class MAF(_MaskedAffine):
    """Masked autoregressive flow layer: ``z = x * s(raw(x)) + t(x)``, ``(raw, t) = MADE(x)``.

    ``forward(x) -> (z, logabsdet)`` (density) is one MADE pass and the fused coupling op;
    ``inverse(z) -> (x, logabsdet)`` (sampling) is autoregressive and runs degree by degree with
    one pass's arithmetic (:func:`flowops.ops.made_inverse`); gradients flow through it.
    Arguments as in :class:`MADE`; ``scale``/``clamp`` as in :func:`flowops.ops.affine_coupling`.
    """

    def forward(self, x):
        return self._one_pass(x)

    def inverse(self, z, method: str = "auto"):
        return self._solve(z, method)


class IAF(_MaskedAffine):
    """Inverse autoregressive flow layer, the dual of :class:`MAF`: ``x = z * s(raw(z)) + t(z)``.

    ``inverse(z) -> (x, logabsdet)`` (sampling) is one MADE pass; ``forward(x) -> (z, logabsdet)``
    (density of arbitrary points) is the autoregressive solve in one pass's arithmetic.
    """

    def forward(self, x, method: str = "auto"):
        return self._solve(x, method)

    def inverse(self, z):
        return self._one_pass(z)


__all__ = ["MADE", "MAF", "IAF", "make_order", "ORDERS"]
