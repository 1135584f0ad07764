"""Autoregressive inversion of a MADE-conditioned affine transform in one masked pass's work.

Problem: given ``y``, find ``u`` with ``y = u * s(raw(u)) + t(u)`` where ``(raw, t) = MADE(u)``
(MAF sampling; IAF density evaluation). The textbook algorithm runs D full MADE passes, pass k
fixing dimension k. Here the network is evaluated degree by degree instead: once dimension k
(degree k) is known, exactly the hidden units of degree k are computed in each layer (with units
sorted by degree, a contiguous slice of rows, fed by a contiguous prefix of the layer below),
then the two outputs of dimension k + 1. Every weight of the staircase is used once, so the
arithmetic is that of one masked pass.

All functions work in MADE's sorted layout (see :mod:`flowops.reference.made`): column k of
``y`` has degree k + 1, ``weights``/``biases`` are the layers' parameters in that layout (hidden
units sorted by degree, output rows degree-major with the raw scale then the shift).

Implementations (chosen by :func:`made_inverse`):

- ``reference``: the D-pass algorithm (``flowops.reference.made_solve``), under the reference backend;
- ``sliced`` (autograd): the degree-by-degree loop in plain torch ops on growing prefixes; used
  whenever a gradient is needed (``rsample``, IAF in VI, training through samples), so gradients
  flow to y and every weight exactly as through the D-pass reference;
- ``cpp``: the same loop in C++ (``flowops::made_solve``) for CPU tensors without grad: activations
  are kept feature-major (``[units, batch]``) so each slice is written in place by one GEMM;
- ``triton``: a persistent Triton kernel (``flowops.kernels.made_inverse``), one launch, one program per
  tile of samples running the whole degree loop; fp32 CUDA tensors without grad (also runs on CPU
  under ``TRITON_INTERPRET=1``, which the tests use);
- ``sliced`` (no grad): the same in-place loop in Python, wherever none of the above applies.
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference
from ..reference.affine_coupling import scale_map

SCALES = ("exp", "softclamp", "sigmoid")


def degree_ends(hidden_degs, features: int):
    """Per hidden layer, ``ends[k]`` = number of units of degree <= k, k = 0..features (python ints)."""
    ks = torch.arange(features + 1)
    return [torch.searchsorted(d.detach().cpu().contiguous(), ks, right=True).tolist() for d in hidden_degs]


def _act_(h, activation):
    if activation == "relu":
        return h.relu_()
    return h.tanh_()


def _act(h, activation):
    return torch.relu(h) if activation == "relu" else torch.tanh(h)


def _solve_sliced_nograd(y, weights, biases, ends, activation, scale, clamp):
    b, d = y.shape
    yT = y.t()
    uT = y.new_empty((d, b))
    hT = [y.new_empty((w.shape[0], b)) for w in weights[:-1]]
    wo, bo = weights[-1], biases[-1]
    log_s_total = y.new_zeros(b)
    nl = len(hT)
    for k in range(d):
        src = hT[-1] if nl else uT
        pe = ends[-1][k] if nl else k
        if pe > 0:
            p = torch.addmm(bo[2 * k:2 * k + 2, None], wo[2 * k:2 * k + 2, :pe], src[:pe])
            raw, t = p[0], p[1]
        else:
            raw, t = bo[2 * k].expand(b), bo[2 * k + 1].expand(b)
        log_s = scale_map(raw, scale, clamp)
        torch.mul(yT[k] - t, torch.exp(-log_s), out=uT[k])
        log_s_total += log_s
        for li in range(nl):
            a, e = ends[li][k], ends[li][k + 1]
            if e > a:
                if li == 0:
                    below, pe = uT, k + 1
                else:
                    below, pe = hT[li - 1], ends[li - 1][k + 1]
                out = hT[li][a:e]
                torch.addmm(biases[li][a:e, None], weights[li][a:e, :pe], below[:pe], out=out)
                _act_(out, activation)
    return uT.t(), -log_s_total


def _solve_sliced_grad(y, weights, biases, ends, activation, scale, clamp):
    """Differentiable version: growing prefixes joined with torch.cat (no in-place writes)."""
    b, d = y.shape
    yT = y.t()
    u_rows, h_rows = [], [[] for _ in weights[:-1]]
    u_pre = y.new_zeros((0, b))
    h_pre = [y.new_zeros((0, b)) for _ in weights[:-1]]
    wo, bo = weights[-1], biases[-1]
    nl = len(h_pre)
    log_s_total = None
    for k in range(d):
        src = h_pre[-1] if nl else u_pre
        p = torch.addmm(bo[2 * k:2 * k + 2, None], wo[2 * k:2 * k + 2, :src.shape[0]], src) if src.shape[0] \
            else bo[2 * k:2 * k + 2, None].expand(2, b)
        log_s = scale_map(p[0], scale, clamp)
        u_k = (yT[k] - p[1]) * torch.exp(-log_s)
        log_s_total = log_s if log_s_total is None else log_s_total + log_s
        u_rows.append(u_k)
        u_pre = torch.stack(u_rows)
        for li in range(nl):
            a, e = ends[li][k], ends[li][k + 1]
            if e > a:
                below = u_pre if li == 0 else h_pre[li - 1]
                blk = _act(torch.addmm(biases[li][a:e, None], weights[li][a:e, :below.shape[0]], below), activation)
                h_rows[li].append(blk)
                h_pre[li] = torch.cat(h_rows[li]) if len(h_rows[li]) > 1 else blk
    if log_s_total is None:
        return y.clone(), y.new_zeros(b)
    return torch.stack(u_rows).t(), -log_s_total


def _needs_grad(y, weights, biases):
    if not torch.is_grad_enabled():
        return False
    return y.requires_grad or any(t.requires_grad for t in (*weights, *biases))


def _has_cpp_solve() -> bool:
    if not _backend.has_cpp():
        return False
    try:
        torch.ops.flowops.made_solve
    except (AttributeError, RuntimeError):
        return False
    return True


def made_inverse(y: torch.Tensor, weights, biases, hidden_degrees, activation: str = "relu",
                 scale: str = "exp", clamp: float = 2.0, method: str = "auto"):
    """Solve ``y = u * s(raw(u)) + t(u)``, ``(raw, t) = MADE(u)``, for ``u`` in one pass's work.

    Args:
        y: ``[B, D]`` in MADE's sorted layout (column k has degree k + 1).
        weights, biases: the MADE layers in sorted layout: hidden ``[H_l, H_{l-1}]`` (H_0 = D) and
            the output layer ``[2D, H_L]`` with rows ``2k`` (raw scale) and ``2k + 1`` (shift) for degree k + 1.
        hidden_degrees: the sorted degree tensor of each hidden layer.
        activation: ``"relu"`` or ``"tanh"``; scale/clamp: the scale map of :func:`affine_coupling`.
        method: ``"auto"``, ``"reference"`` (D passes), ``"sliced"``, ``"cpp"`` or ``"triton"``.

    Returns ``(u, logabsdet)`` with ``logabsdet = -sum_k log s_k``, the log|det| of ``y -> u``.
    Differentiable (with respect to y and all parameters) whenever grad mode is on.
    """
    if scale not in SCALES:
        raise ValueError(f"made_inverse: scale must be one of {SCALES}, got {scale!r}")
    if activation not in reference.made.ACTIVATIONS:
        raise ValueError(f"made_inverse: activation must be one of {reference.made.ACTIVATIONS}, got {activation!r}")
    if y.dim() != 2:
        raise ValueError(f"made_inverse: y must be [batch, features], got shape {tuple(y.shape)}")
    weights, biases, hidden_degrees = list(weights), list(biases), list(hidden_degrees)
    d = y.shape[1]
    if len(weights) != len(hidden_degrees) + 1 or len(biases) != len(weights):
        raise ValueError(f"made_inverse: expected {len(hidden_degrees) + 1} weights and biases, got "
                         f"{len(weights)} and {len(biases)}")
    if tuple(weights[-1].shape[:1]) != (2 * d,):
        raise ValueError(f"made_inverse: the output layer must have {2 * d} rows for y with {d} features, got "
                         f"{tuple(weights[-1].shape)}")
    if method == "auto":
        if _backend.get_backend() == "reference":
            method = "reference"
        elif _needs_grad(y, weights, biases):
            method = "sliced"
        elif y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64) and _has_cpp_solve() \
                and not torch.compiler.is_compiling():
            method = "cpp"
        elif y.device.type == "cuda" and y.dtype == torch.float32 and _backend.has_triton() \
                and not torch.compiler.is_compiling():
            method = "triton"
        else:
            method = "sliced"
    if method == "reference":
        return reference.made_solve(y, weights, biases, hidden_degrees, activation, scale, clamp)
    ends = degree_ends(hidden_degrees, d)
    if method == "cpp":
        if _needs_grad(y, weights, biases):
            raise RuntimeError("made_inverse: method 'cpp' has no backward; use 'sliced' (the default when a "
                               "gradient is needed)")
        ends_t = [torch.tensor(e, dtype=torch.int64) for e in ends]
        return torch.ops.flowops.made_solve(y.contiguous(), [w.contiguous() for w in weights],
                                            [bb.contiguous() for bb in biases], ends_t, activation, scale,
                                            float(clamp))
    if method == "triton":
        if _needs_grad(y, weights, biases):
            raise RuntimeError("made_inverse: method 'triton' has no backward; use 'sliced' (the default when a "
                               "gradient is needed)")
        if y.device.type == "cpu" and not _backend.triton_interpreted():
            raise RuntimeError("made_inverse: method 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        from ..kernels import made_inverse as k

        return k.made_solve(y, weights, biases, ends, activation, scale, float(clamp))
    if method != "sliced":
        raise ValueError(f"made_inverse: method must be 'auto', 'reference', 'sliced', 'cpp' or 'triton', got "
                         f"{method!r}")
    if _needs_grad(y, weights, biases):
        return _solve_sliced_grad(y, weights, biases, ends, activation, scale, clamp)
    return _solve_sliced_nograd(y, weights, biases, ends, activation, scale, clamp)


def _register_fake():
    if _has_cpp_solve():
        def fake(y, weights, biases, ends, activation, scale, clamp):
            return y.new_empty(y.shape), y.new_empty((y.shape[0],))

        torch.library.register_fake("flowops::made_solve", fake)


_register_fake()

__all__ = ["made_inverse", "degree_ends"]
