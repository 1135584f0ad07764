"""Plain-PyTorch MADE pieces: degree masks, the masked linear layer, the MADE pass and the
D-pass autoregressive inversion. The oracle of flowops.ops.masked_linear / made_inverse.

Degrees (Germain et al., 2015): input feature ``j`` has degree ``order[j] + 1`` in ``1..D``; a
hidden unit of degree ``k`` may see inputs (or units below) of degree ``<= k``; an output of
degree ``d`` may see units of degree ``< d`` (``strict``). Then output ``d`` depends only on the
inputs of degree ``< d``: the Jacobian is strictly triangular in the chosen order.

The "sorted" layout used by flowops (and by the functions below): the input columns are sorted
by degree (column ``k`` has degree ``k + 1``), hidden units are sorted by degree, and the output
rows are grouped per input degree, ``params_per_feature`` consecutive rows per degree. In this
layout every connectivity mask is a staircase.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .affine_coupling import scale_map

ACTIVATIONS = ("relu", "tanh")


def degree_mask(in_degrees: torch.Tensor, out_degrees: torch.Tensor, strict: bool) -> torch.Tensor:
    """``[out, in]`` 0/1 mask: 1 where ``in_degree < out_degree`` (strict) or ``<=``."""
    i = in_degrees.reshape(1, -1)
    o = out_degrees.reshape(-1, 1)
    return (i < o) if strict else (i <= o)


def masked_linear(x, weight, bias, in_degrees, out_degrees, strict: bool):
    """``F.linear(x, weight * mask, bias)`` with the mask of :func:`degree_mask`."""
    mask = degree_mask(in_degrees, out_degrees, strict).to(weight.dtype)
    return F.linear(x, weight * mask, bias)


def hidden_degrees(features: int, width: int, device=None) -> torch.Tensor:
    """Sorted degrees of ``width`` hidden units spread evenly over ``1..features-1``."""
    k = torch.arange(width, device=device)
    return 1 + (k * (features - 1)) // width


def activate(h, activation: str):
    if activation == "relu":
        return torch.relu(h)
    if activation == "tanh":
        return torch.tanh(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def layer_degrees(features: int, hidden_degs, params_per_feature: int):
    """(in, out, strict) degree triples of every layer of a MADE in the sorted layout."""
    dev = hidden_degs[0].device if hidden_degs else None
    ins = torch.arange(1, features + 1, device=dev)
    out_last = torch.arange(1, features + 1, device=dev).repeat_interleave(params_per_feature)
    degs = [ins, *hidden_degs, out_last]
    return [(degs[i], degs[i + 1], i == len(degs) - 2) for i in range(len(degs) - 1)]


def made_forward(x_sorted, weights, biases, hidden_degs, activation: str, params_per_feature: int = 2):
    """One MADE pass in the sorted layout: ``[B, D] -> [B, D * params_per_feature]`` (degree-major rows)."""
    d = x_sorted.shape[1]
    h = x_sorted
    layers = layer_degrees(d, hidden_degs, params_per_feature)
    for i, ((din, dout, strict), w, b) in enumerate(zip(layers, weights, biases)):
        h = masked_linear(h, w, b, din, dout, strict)
        if i < len(layers) - 1:
            h = activate(h, activation)
    return h


def split_params(out_sorted, features: int):
    """Degree-major ``[B, 2D]`` (raw, shift per degree) -> ``[B, 2D]`` (all raws, then all shifts)."""
    o = out_sorted.reshape(out_sorted.shape[0], features, 2)
    return torch.cat((o[..., 0], o[..., 1]), dim=1)


def made_solve(y_sorted, weights, biases, hidden_degs, activation: str, scale: str = "exp", clamp: float = 2.0):
    """Solve ``y = u * s(raw(u)) + t(u)`` for ``u`` with D full MADE passes (the textbook algorithm).

    ``(raw, t) = MADE(u)`` is autoregressive, so pass ``k`` fixes column ``k`` exactly. Returns
    ``(u, logabsdet)`` with ``logabsdet = -sum log s``: the log|det| of ``y -> u`` (MAF sampling,
    IAF density evaluation). Differentiable by autograd.
    """
    d = y_sorted.shape[1]
    u = torch.zeros_like(y_sorted)
    log_s = None
    for k in range(d):
        params = split_params(made_forward(u, weights, biases, hidden_degs, activation), d)
        raw, t = params[:, :d], params[:, d:]
        log_s = scale_map(raw, scale, clamp)
        new = (y_sorted - t) * torch.exp(-log_s)
        keep = torch.arange(d, device=u.device) == k
        u = torch.where(keep, new, u)
    if log_s is None:
        return u, y_sorted.new_zeros(y_sorted.shape[0])
    return u, -log_s.sum(dim=1)
