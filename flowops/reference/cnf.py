"""Reference trace terms of continuous normalizing flows (FFJORD), in plain PyTorch autograd.

A CNF integrates ``dz/dt = f(z, t)`` together with ``d log|det dz(t)/dz(0)| / dt = tr(df/dz)``.
This module computes that trace the way the FFJORD paper's code does:

* :func:`divergence_hutchinson`: Hutchinson's estimator ``eps^T (df/dz) eps`` with one
  ``torch.autograd.grad(f, z, eps, create_graph=True)`` per probe (averaged over the probes);
* :func:`divergence_exact`: the exact trace as a loop over the ``d`` dimensions, one
  ``autograd.grad(f[:, i].sum(), z, create_graph=True)`` each.

``create_graph=True`` keeps the trace differentiable, so training backpropagates through a
double backward. :func:`mlp_vector_field` is the MLP ``f(z, t)`` (time as an extra input
column) and :func:`mlp_trace` the oracle of :func:`flowops.ops.mlp_trace`. Nothing here imports the
rest of flowops.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("tanh", "softplus", "silu")


def activation_fn(name: str):
    if name == "tanh":
        return torch.tanh
    if name == "softplus":
        return F.softplus
    if name == "silu":
        return F.silu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def mlp_vector_field(z: torch.Tensor, t: torch.Tensor, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor], activation: str = "tanh") -> torch.Tensor:
    """``f(z, t)``: linear layers on ``[z, t]`` with ``activation`` between them (none after the last).

    ``z [B, d]``; ``t`` a scalar tensor or ``[B]``; ``weights[0]`` is ``[H1, d + 1]`` (its last column
    multiplies t), ``weights[-1]`` is ``[d, H]``.
    """
    act = activation_fn(activation)
    tcol = t.to(z.dtype).reshape(-1, 1).expand(z.shape[0], 1)
    h = torch.cat([z, tcol], dim=1)
    n = len(weights)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w, b)
        if i + 1 < n:
            h = act(h)
    return h


def divergence_hutchinson(f: torch.Tensor, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate of ``tr(df/dz)`` per sample, averaged over the probes ``eps [m, B, d]``.

    ``f`` must have been computed from ``z`` with grad enabled.
    """
    total = 0.0
    for k in range(eps.shape[0]):
        (vjp,) = torch.autograd.grad(f, z, eps[k], create_graph=True)
        total = total + (vjp * eps[k]).sum(dim=1)
    return total / eps.shape[0]


def divergence_exact(f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The exact ``tr(df/dz)`` per sample: one backward per dimension (FFJORD's loop)."""
    total = 0.0
    for i in range(z.shape[1]):
        (g,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=True)
        total = total + g[:, i]
    return total


def trace_term(fn, z: torch.Tensor, eps: torch.Tensor | None = None):
    """``(f, tr)`` for any ``fn(z) -> f``: exact when ``eps`` is None, else Hutchinson with ``eps [m, B, d]``.

    Runs with grad enabled (also inside ``torch.no_grad()``); when ``z`` does not require grad a
    detached copy does, and the result then carries no graph back to ``z``.
    """
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        f = fn(zz)
        tr = divergence_exact(f, zz) if eps is None else divergence_hutchinson(f, zz, eps)
    if not torch.is_grad_enabled():
        f, tr = f.detach(), tr.detach()
    return f, tr


def mlp_trace(z: torch.Tensor, t: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
              activation: str = "tanh", eps: torch.Tensor | None = None):
    """Reference of :func:`flowops.ops.mlp_trace`: ``(f(z, t), tr)`` through autograd (see :func:`trace_term`)."""
    return trace_term(lambda zz: mlp_vector_field(zz, t, weights, biases, activation), z, eps)


__all__ = ["ACTIVATIONS", "activation_fn", "mlp_vector_field", "divergence_hutchinson", "divergence_exact",
           "trace_term", "mlp_trace"]
