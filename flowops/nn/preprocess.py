"""Preprocessing for discrete data (images): uniform dequantization, the logit transform, bits/dim.

The pipeline for pixels with ``n_levels`` discrete values ``k in {0, ..., n_levels - 1}``:

1. :func:`dequantize`: ``v = (k + u) / n_levels`` with ``u ~ U[0, 1)``, so ``v in [0, 1)``; each discrete
   value owns a bin of width ``1 / n_levels`` on this scale.
2. :class:`LogitTransform`: ``y = logit(alpha + (1 - 2 alpha) v)`` (a Transform; its log-det is counted).
3. A flow models ``y``; ``log p(v) = log p_flow(y) + logdet_logit(v)``.
4. :func:`bits_per_dim`: ``-(log p(v) - D log n_levels) / (D log 2)`` converts the density of ``v`` to
   bits per discrete dimension (the ``D log n_levels`` term is the bin width). Averaged over ``u`` this is
   an upper bound on the model's discrete code length (Jensen); :func:`discrete_bits_per_dim` does
   steps 1-4.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Transform


def _check_levels(name: str, n_levels) -> int:
    if isinstance(n_levels, bool) or not isinstance(n_levels, int):
        raise TypeError(f"{name}: n_levels must be an int, got {type(n_levels).__name__}")
    if n_levels < 2:
        raise ValueError(f"{name}: n_levels must be at least 2, got {n_levels}")
    return n_levels


def dequantize(x: torch.Tensor, n_levels: int = 256, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform dequantization of integer values ``x in {0, ..., n_levels - 1}`` to ``(x + u) / n_levels``.

    ``x`` may be an integer tensor or a floating tensor holding whole numbers. The result is floating
    (``dtype``, else ``x``'s floating dtype, else the default dtype) and lies in ``[0, 1)``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dequantize: x must be a torch.Tensor, got {type(x).__name__}")
    n = _check_levels("dequantize", n_levels)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"dequantize: x must be an integer or floating tensor, got {x.dtype}")
    if x.numel():
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("dequantize: x contains NaN or inf")
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > n - 1:
            raise ValueError(f"dequantize: x must lie in [0, {n - 1}] for n_levels={n}, got values in [{lo}, {hi}]")
        if x.is_floating_point() and not bool((x == torch.round(x)).all()):
            raise ValueError("dequantize: x must hold whole numbers (discrete levels)")
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    xf = x.to(dtype)
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    # Keep v < 1 even where rounding of (n - 1 + u) / n would reach 1.
    return ((xf + u) / n).clamp_max(1.0 - torch.finfo(dtype).eps)


class LogitTransform(Transform):
    """``y = logit(alpha + (1 - 2 alpha) x)`` for ``x in [0, 1]`` (data -> latent), elementwise.

    log|det| per sample = ``sum(log(1 - 2 alpha) - log p - log(1 - p))`` with ``p = alpha + (1 - 2 alpha) x``.
    ``forward`` raises ValueError for ``x`` outside ``[0, 1]`` (or NaN); ``inverse`` maps any real ``y``
    back into ``[0, 1]`` (values with ``sigmoid(y)`` outside ``[alpha, 1 - alpha]`` land outside
    ``[0, 1]``, as the exact inverse must). With ``alpha=0`` the end points 0 and 1 are rejected too.
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        alpha = float(alpha)
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"LogitTransform: alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def _check(self, t, arg):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"LogitTransform: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"LogitTransform: {arg} must be a floating tensor, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"LogitTransform: {arg} must have a batch dimension, got a scalar")

    def forward(self, x):
        self._check(x, "x")
        if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
            bad = x[~((x >= 0) & (x <= 1))]
            raise ValueError(f"LogitTransform: x must lie in [0, 1] (dequantized data scaled to the unit "
                             f"interval), got {bad.numel()} values outside it, e.g. {bad.flatten()[0].item()}")
        a = self.alpha
        if a == 0.0 and x.numel() and bool(((x == 0) | (x == 1)).any()):
            raise ValueError("LogitTransform: with alpha=0, x must lie in the open interval (0, 1)")
        p = a + (1.0 - 2.0 * a) * x
        y = torch.log(p) - torch.log1p(-p)
        ld = math.log1p(-2.0 * a) - torch.log(p) - torch.log1p(-p)
        return y, ld.flatten(1).sum(1) if x.dim() > 1 else ld

    def inverse(self, y):
        self._check(y, "y")
        a = self.alpha
        x = (torch.sigmoid(y) - a) / (1.0 - 2.0 * a)
        ld = F.logsigmoid(y) + F.logsigmoid(-y) - math.log1p(-2.0 * a)
        return x, ld.flatten(1).sum(1) if y.dim() > 1 else ld


def bits_per_dim(log_prob: torch.Tensor, dims: int, n_levels: int = 256) -> torch.Tensor:
    """Per-sample bits/dim of discrete data from ``log_prob``, the log-density of the dequantized ``v in [0, 1)^D``.

    ``log_prob`` must include every Jacobian between ``v`` and the flow's latent (the logit transform
    included). The density of ``v`` has bins of volume ``n_levels^-D``, so the discrete log-probability is
    ``log_prob - D log n_levels`` and ``bpd = -(log_prob - D log n_levels) / (D log 2)``; the uniform
    density (``log_prob = 0``) gives ``log2(n_levels)``. Take ``.mean()`` for a data set figure.
    """
    if not isinstance(log_prob, torch.Tensor):
        raise TypeError(f"bits_per_dim: log_prob must be a torch.Tensor, got {type(log_prob).__name__}")
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ValueError(f"bits_per_dim: dims must be a positive int, got {dims!r}")
    n = _check_levels("bits_per_dim", n_levels)
    return -(log_prob - dims * math.log(n)) / (dims * math.log(2.0))


def discrete_bits_per_dim(model, x: torch.Tensor, n_levels: int = 256, alpha: float | None = 0.05,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample bits/dim of discrete ``x`` (values in ``{0..n_levels-1}``) under ``model``.

    Dequantizes once (``generator`` for the noise), applies :class:`LogitTransform` (``alpha=None``: none,
    the model sees ``v`` directly), evaluates ``model.log_prob`` and adds the logit log-det.
    """
    v = dequantize(x, n_levels, generator=generator)
    if alpha is None:
        lp = model.log_prob(v)
    else:
        y, ld = LogitTransform(alpha)(v)
        lp = model.log_prob(y) + ld
    return bits_per_dim(lp, math.prod(x.shape[1:]), n_levels)
