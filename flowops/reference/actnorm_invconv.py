"""Reference Glow ActNorm followed by the invertible 1x1 convolution, written for clarity.

Forward (data -> latent)::

    h = (x + bias) * exp(log_scale)          # ActNorm, per channel
    y = W h                                  # 1x1 convolution: y[:, i] = sum_j W[i, j] h[:, j]
    log|det| = S * (sum(log_scale) + log|det W|)     per sample, S = prod(spatial)

Inverse (latent -> data), given ``weight`` = ``W^-1``::

    h = W^-1 z
    x = h * exp(-log_scale) - bias
    log|det| = -S * (sum(log_scale) + log|det W|)

``w_logdet`` is ``log|det W|`` of the *forward* matrix in both directions (for Glow's LU
parameterization it is ``sum(log_s)``). Inputs are ``[N, C]`` or ``[N, C, *spatial]`` (NCHW);
parameters ``log_scale``, ``bias`` ``[C]``, ``weight`` ``[C, C]``, ``w_logdet`` one value.

Also here: :func:`fold` / :func:`param_grads`, the closed-form C x C algebra of the fused op (both
directions are ``y = A x + c`` with a folded ``A`` and ``c``; the backward maps the gradients of ``A`` and
``c`` back to the four parameters), shared by the Triton launchers and the plain-torch registered
kernels; and :func:`lu_weight` / :func:`lu_inverse_weight_by_inv`, Glow's LU weight and the naive inverse
(rebuild ``W``, call ``torch.linalg.inv``) that the InvConv1x1 inverse is benchmarked against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _view(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.view(1, -1, *([1] * (x.dim() - 2)))


def channel_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``y[:, i] = sum_j weight[i, j] x[:, j]`` at every position (a 1x1 convolution)."""
    c = weight.shape[0]
    if x.dim() == 2:
        return F.linear(x, weight)
    if x.dim() == 4:
        return F.conv2d(x, weight.view(c, c, 1, 1))
    return torch.matmul(weight, x.reshape(x.shape[0], c, -1)).reshape(x.shape)


def actnorm_invconv(x: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                    w_logdet: torch.Tensor, inverse: bool = False):
    """ActNorm then the 1x1 convolution (or the inverse of both); returns ``(y, logabsdet)``."""
    s = math.prod(x.shape[2:])
    total = s * (log_scale.sum() + w_logdet.reshape(()))
    if x.dtype in (torch.float16, torch.bfloat16):
        total = total.float()
    if not inverse:
        h = (x + _view(bias, x)) * _view(torch.exp(log_scale), x)
        return channel_matmul(h, weight), total.expand(x.shape[0])
    h = channel_matmul(x, weight)
    return h * _view(torch.exp(-log_scale), x) - _view(bias, x), (-total).expand(x.shape[0])


def fold(log_scale, bias, weight, inverse: bool):
    """``(A, c, e)`` of the folded map in the accumulation dtype; ``e = exp(+-log_scale)``."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    ls, b, w = log_scale.to(acc), bias.to(acc), weight.to(acc)
    if not inverse:
        e = torch.exp(ls)
        return (w * e[None, :]).contiguous(), (w @ (e * b)).contiguous(), e
    e = torch.exp(-ls)
    return (w * e[:, None]).contiguous(), (-b).contiguous(), e


def param_grads(gA, gc, gsum, log_scale, bias, weight, e, inverse: bool):
    """Chain rule from the folded ``(A, c)`` gradients to ``(log_scale, bias, weight, w_logdet)``.

    ``gsum`` is ``S * sum(grad_logdet)``; ``e`` the third output of :func:`fold`.
    """
    acc = gA.dtype
    b, w = bias.to(acc), weight.to(acc)
    if not inverse:
        wtgc = w.t() @ gc
        gw = gA * e[None, :] + torch.outer(gc, e * b)
        gls = ((gA * w).sum(0) + wtgc * b) * e + gsum
        return gls, wtgc * e, gw, gsum
    gls = -(e * (gA * w).sum(1)) - gsum
    return gls, -gc, gA * e[:, None], -gsum


def lu_weight(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
              log_s: torch.Tensor) -> torch.Tensor:
    """Glow's ``W = P L (U + diag(sign * exp(log_s)))`` (strict triangles of ``lower``/``upper`` used)."""
    c = perm.shape[0]
    eye = torch.eye(c, dtype=lower.dtype, device=lower.device)
    lo = torch.tril(lower, -1) + eye
    up = torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s))
    return perm @ lo @ up


def lu_inverse_weight_by_inv(perm, lower, upper, sign, log_s) -> torch.Tensor:
    """``W^-1`` the naive way: rebuild ``W`` and call a general matrix inverse (the bench baseline)."""
    return torch.linalg.inv(lu_weight(perm, lower, upper, sign, log_s))


__all__ = ["actnorm_invconv", "channel_matmul", "fold", "param_grads", "lu_weight", "lu_inverse_weight_by_inv"]
