"""The fused CNF trace op: an MLP vector field and its Jacobian trace in one pass.

``mlp_trace(z, t, weights, biases, activation, eps)`` returns ``(f, tr)`` with
``f = f(z, t)`` the MLP (linear layers on ``[z, t]``, ``activation`` between them) and ``tr`` the
per-sample trace of ``df/dz``: exact when ``eps`` is None (the ``d`` basis probes), else Hutchinson's
estimate ``mean_k eps_k^T (df/dz) eps_k`` for the probes ``eps [m, B, d]``.

How: forward-mode tangents ride along the primal through the same matrix products. For every layer
the ``B`` primal rows and the ``m * B`` tangent rows are stacked into one ``[(1 + m) B, H]`` matrix
and multiplied by the layer's weight in ONE GEMM (the bias is added to the primal rows only); the
activation then maps the primal rows to ``sigma(a)`` and the tangent rows to ``sigma'(a) * a_dot``
in one elementwise pass. At the output, ``tr = scale * sum(eps * f_dot)``. The backward is analytic
(first order through both streams: ``sigma''`` appears in closed form), again one stacked GEMM per
layer for the input gradient and one for the weight gradient; no double backward. The forward saves
only the stacked pre-activations of the hidden layers (the op's third output, ``acts``; its size is fixed by
the shapes, its layout belongs to the backend that wrote it: the C++ kernel stores it chunk-major, with
``tanh(a)`` in place of ``a`` in the primal rows for tanh). For the exact trace the first layer's tangent
rows are not stored: they are the columns of its weight, the same for every sample.

Registration (torch.library): ``flowops::mlp_trace_fwd`` / ``mlp_trace_bwd`` with fake kernels and a
Python autograd formula (what torch.compile traces) and, when the C++ extension is built,
``flowops::mlp_trace`` whose autograd node lives in C++ (the eager CPU fast path). Without the extension
the CPU kernels are the plain-torch version of the same algorithm below. CUDA tensors run the GEMMs
with torch and the elementwise passes with Triton (:mod:`flowops.kernels.mlp_trace`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _backend
from ..reference import cnf as _ref
from . import _library  # defines the flowops namespace first; shared registration
from ._checks import check_like, check_tensors

ACTIVATIONS = ("tanh", "softplus", "silu")
SCHEMAS = {
    "mlp_trace_fwd": "(Tensor z, Tensor t, Tensor[] weights, Tensor[] biases, Tensor? eps, str activation) "
                     "-> (Tensor, Tensor, Tensor)",
    "mlp_trace_bwd": "(Tensor grad_f, Tensor grad_trace, Tensor z, Tensor t, Tensor[] weights, Tensor[] biases, "
                     "Tensor? eps, Tensor acts, str activation) -> (Tensor, Tensor, Tensor[], Tensor[])",
}
_libs = []


# ------------------------------------------------------------------------------------------
# activation, its first and second derivative (closed form)


def act_derivs(a: torch.Tensor, activation: str):
    """``(sigma(a), sigma'(a), sigma''(a))``."""
    if activation == "tanh":
        h = torch.tanh(a)
        s1 = 1.0 - h * h
        return h, s1, -2.0 * h * s1
    sg = torch.sigmoid(a)
    ds = sg * (1.0 - sg)
    if activation == "softplus":
        return torch.nn.functional.softplus(a), sg, ds
    if activation == "silu":
        return a * sg, sg + a * ds, ds * (2.0 + a * (1.0 - 2.0 * sg))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _act_fwd_torch(P: torch.Tensor, B: int, activation: str) -> torch.Tensor:
    """Stacked pre-activations ``[a; a_dot]`` -> ``[sigma(a); sigma'(a) a_dot]``."""
    H = P.shape[1]
    a = P[:B]
    h, s1, _ = act_derivs(a, activation)
    X = torch.empty_like(P)
    X[:B] = h
    X[B:].view(-1, B, H).copy_(P[B:].view(-1, B, H) * s1)
    return X


def _act_bwd_torch(gX: torch.Tensor, P: torch.Tensor, B: int, activation: str):
    """``(X, G)``: the recomputed ``[sigma(a); sigma'(a) a_dot]`` and the pre-activation gradients."""
    H = P.shape[1]
    a = P[:B]
    h, s1, s2 = act_derivs(a, activation)
    Ad = P[B:].view(-1, B, H)
    gHd = gX[B:].view(-1, B, H)
    X = torch.empty_like(P)
    X[:B] = h
    X[B:].view(-1, B, H).copy_(Ad * s1)
    G = torch.empty_like(gX)
    G[:B] = gX[:B] * s1 + (gHd * Ad).sum(0) * s2
    G[B:].view(-1, B, H).copy_(gHd * s1)
    return X, G


# ------------------------------------------------------------------------------------------
# the algorithm in plain torch ops (CPU kernel without the extension; CUDA with Triton elementwise)


def _scale(eps, d):
    return 1.0 if eps is None else 1.0 / eps.shape[0]


def _probes(eps, B, d):
    return d if eps is None else eps.shape[0]


def _stored_rows(i: int, m: int, eps) -> int:
    """Rows per sample kept for hidden layer ``i``: exact-trace first layer: the primal only."""
    return 1 if i == 0 and eps is None else 1 + m


def acts_numel(B: int, d: int, weights, eps) -> int:
    m = _probes(eps, B, d)
    return sum(_stored_rows(i, m, eps) * B * w.shape[0] for i, w in enumerate(weights[:-1]))


def fused_fwd(z, t, weights, biases, eps, activation, act_fwd=None):
    """``(f, tr, acts)``; ``acts`` is the flat buffer of the stacked hidden pre-activations."""
    act_fwd = act_fwd or _act_fwd_torch
    B, d = z.shape
    m = _probes(eps, B, d)
    L = len(weights)
    acts = z.new_empty(acts_numel(B, d, weights, eps))
    off = 0
    X = None
    F = None
    for i, (w, b) in enumerate(zip(weights, biases)):
        H = w.shape[0]
        if i == 0 and eps is None and L > 1:  # the tangent rows are built here and not kept
            P = z.new_empty(((1 + m) * B, H))
        elif i + 1 < L:
            P = acts[off:off + (1 + m) * B * H].view((1 + m) * B, H)
            off += (1 + m) * B * H
        else:
            P = z.new_empty(((1 + m) * B, H))
        if i == 0:
            wz = w[:, :d]
            torch.addmm(b, z, wz.t(), out=P[:B])
            P[:B].addr_(t, w[:, d])
            if eps is None:  # basis probes: a_dot_i = W[:, i] for every sample
                P[B:].view(d, B, H).copy_(wz.t()[:, None, :])
            else:
                torch.mm(eps.reshape(m * B, d), wz.t(), out=P[B:])
        else:
            torch.mm(X, w.t(), out=P)
            P[:B] += b
        if i + 1 < L:
            X = act_fwd(P, B, activation)
            if i == 0 and eps is None:
                acts[:B * H].view(B, H).copy_(P[:B])
                off += B * H
        else:
            F = P
    f = F[:B]
    Fd = F[B:].view(m, B, d)
    if eps is None:
        tr = torch.diagonal(Fd, dim1=0, dim2=2).sum(1)
    else:
        tr = (Fd * eps).sum((0, 2)) * _scale(eps, d)
    return f, tr, acts


def fused_bwd(grad_f, grad_trace, z, t, weights, biases, eps, acts, activation, act_bwd=None):
    act_bwd = act_bwd or _act_bwd_torch
    B, d = z.shape
    m = _probes(eps, B, d)
    L = len(weights)
    gtr = grad_trace.to(z.dtype).reshape(B)
    G = z.new_empty(((1 + m) * B, d))
    G[:B] = grad_f
    if eps is None:
        Gd = G[B:].view(d, B, d)
        Gd.zero_()
        torch.diagonal(Gd, dim1=0, dim2=2).copy_(gtr[:, None].expand(B, d))
    else:
        G[B:].view(m, B, d).copy_(eps * (gtr * _scale(eps, d))[None, :, None])
    offs = [0]
    for i, w in enumerate(weights[:-1]):
        offs.append(offs[-1] + _stored_rows(i, m, eps) * B * w.shape[0])
    gws: list = [None] * L
    gbs: list = [None] * L
    for i in range(L - 1, 0, -1):
        w = weights[i]
        Hp = weights[i - 1].shape[0]
        if i == 1 and eps is None:  # rebuild the first layer's tangent rows: W's columns in every row
            P = torch.cat((acts[:B * Hp].view(B, Hp),
                           weights[0][:, :d].t()[:, None, :].expand(d, B, Hp).reshape(d * B, Hp)))
        else:
            P = acts[offs[i - 1]:offs[i]].view((1 + m) * B, Hp)
        gX = torch.mm(G, w)
        X, Gn = act_bwd(gX, P, B, activation)
        gws[i] = torch.mm(G.t(), X)
        gbs[i] = G[:B].sum(0)
        G = Gn
    w = weights[0]
    wz = w[:, :d]
    ga = G[:B]
    gAd = G[B:]
    gw0 = w.new_empty(w.shape)
    torch.mm(ga.t(), z, out=gw0[:, :d])
    if eps is None:
        gw0[:, :d] += gAd.view(d, B, -1).sum(1).t()
    else:
        gw0[:, :d].addmm_(gAd.t(), eps.reshape(m * B, d))
    torch.mv(ga.t(), t, out=gw0[:, d])
    gws[0] = gw0
    gbs[0] = ga.sum(0)
    gz = torch.mm(ga, wz)
    gt = torch.mv(ga, w[:, d])
    return gz, gt, gws, gbs


# ------------------------------------------------------------------------------------------
# kernels behind the registered operators


def _cpu_fwd(z, t, weights, biases, eps, activation):
    f, tr, acts = fused_fwd(z, t, weights, biases, eps, activation)
    return f.clone(), tr, acts


def _cpu_bwd(grad_f, grad_trace, z, t, weights, biases, eps, acts, activation):
    return fused_bwd(grad_f, grad_trace, z, t, weights, biases, eps, acts, activation)


def _triton_elementwise():
    from ..kernels import mlp_trace as k

    return k.act_fwd, k.act_bwd


def _cuda_fwd(z, t, weights, biases, eps, activation):
    af = _triton_elementwise()[0] if _backend.has_triton() else None
    f, tr, acts = fused_fwd(z, t, weights, biases, eps, activation, act_fwd=af)
    return f.clone(), tr, acts


def _cuda_bwd(grad_f, grad_trace, z, t, weights, biases, eps, acts, activation):
    ab = _triton_elementwise()[1] if _backend.has_triton() else None
    return fused_bwd(grad_f, grad_trace, z, t, weights, biases, eps, acts, activation, act_bwd=ab)


def _fake_fwd(z, t, weights, biases, eps, activation):
    B, d = z.shape
    return (z.new_empty((B, d)), z.new_empty((B,)), z.new_empty((acts_numel(B, d, weights, eps),)))


def _fake_bwd(grad_f, grad_trace, z, t, weights, biases, eps, acts, activation):
    return (z.new_empty(z.shape), t.new_empty(t.shape), [w.new_empty(w.shape) for w in weights],
            [b.new_empty(b.shape) for b in biases])


def _setup_context(ctx, inputs, output):
    z, t, weights, biases, eps, activation = inputs
    ctx.save_for_backward(z, t, eps, output[2], *weights, *biases)
    ctx.layers = len(weights)
    ctx.activation = activation


def _first_order_error():
    return RuntimeError("flowops.mlp_trace: higher-order gradients (backward with create_graph=True) are not "
                        "supported by the fused kernels; run the model under flowops.use_backend('reference') for them")


def _backward(ctx, grad_f, grad_trace, grad_acts):
    if torch.is_grad_enabled():
        raise _first_order_error()
    z, t, eps, acts, *params = ctx.saved_tensors
    L = ctx.layers
    if grad_f is None:
        grad_f = torch.zeros_like(z)
    if grad_trace is None:
        grad_trace = z.new_zeros(z.shape[0])
    gz, gt, gws, gbs = torch.ops.flowops.mlp_trace_bwd(grad_f, grad_trace, z, t, params[:L], params[L:], eps, acts,
                                                       ctx.activation)
    return gz, gt, list(gws), list(gbs), None, None


def register() -> bool:
    """Define (if the extension did not) and wire up the mlp_trace operators; True when C++ backs them."""
    return _library.register_fused("mlp_trace", SCHEMAS, _libs, cpu_fwd=_cpu_fwd, cpu_bwd=_cpu_bwd,
                                   cuda_fwd=_cuda_fwd, cuda_bwd=_cuda_bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd,
                                   backward=_backward, setup_context=_setup_context,
                                   fused_fake=lambda *a: _fake_fwd(*a)[:2])


HAS_CPP_OPS = register()


# ------------------------------------------------------------------------------------------
# Triton on CPU tensors (TRITON_INTERPRET=1): the test suite's path to the GPU kernels


class _TritonMLPTrace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, t, activation, eps, n, *params):
        af, _ = _triton_elementwise()
        weights, biases = list(params[:n]), list(params[n:])
        f, tr, acts = fused_fwd(z, t, weights, biases, eps, activation, act_fwd=af)
        ctx.save_for_backward(z, t, eps, acts, *params)
        ctx.n, ctx.activation = n, activation
        return f.clone(), tr

    @staticmethod
    def backward(ctx, grad_f, grad_trace):
        if torch.is_grad_enabled():
            raise _first_order_error()
        _, ab = _triton_elementwise()
        z, t, eps, acts, *params = ctx.saved_tensors
        n = ctx.n
        gz, gt, gws, gbs = fused_bwd(grad_f, grad_trace, z, t, params[:n], params[n:], eps, acts, ctx.activation,
                                     act_bwd=ab)
        return (gz, gt, None, None, None, *gws, *gbs)


# ------------------------------------------------------------------------------------------
# the public op

_FLOATS = (torch.float32, torch.float64)


def _check(z, t, weights, biases, activation, eps):
    name = "mlp_trace"
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name}: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in _FLOATS:
        raise TypeError(f"{name}: z must be float32 or float64, got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"{name}: z must be [batch, features], got shape {tuple(z.shape)}")
    B, d = z.shape
    if d < 1:
        raise ValueError(f"{name}: z needs at least one feature, got shape {tuple(z.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: t must be a torch.Tensor (scalar or [batch]), got {type(t).__name__}")
    if not (t.numel() == 1 and t.dim() <= 1) and tuple(t.shape) not in ((B,), (B, 1)):
        raise ValueError(f"{name}: t must be a scalar, [1], [{B}] or [{B}, 1], got shape {tuple(t.shape)}")
    if t.device != z.device:
        raise ValueError(f"{name}: t must be on z's device ({z.device}), got {t.device}")
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError(f"{name}: weights and biases must be lists of tensors")
    if len(weights) < 1 or len(weights) != len(biases):
        raise ValueError(f"{name}: need one bias per weight and at least one layer, got {len(weights)} weights and "
                         f"{len(biases)} biases")
    width = d + 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        layer = {f"weights[{i}]": w, f"biases[{i}]": b}
        check_tensors(name, **layer)
        check_like(name, "z", z, **layer)
        if w.dim() != 2 or w.shape[1] != width:
            raise ValueError(f"{name}: weights[{i}] must be [out, {width}]"
                             f"{' (the features plus the time column)' if i == 0 else ''}, got {tuple(w.shape)}")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name}: biases[{i}] must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        width = w.shape[0]
    if width != d:
        raise ValueError(f"{name}: the last layer must output {d} values (z's features), got {width}")
    if eps is not None:
        if not isinstance(eps, torch.Tensor):
            raise TypeError(f"{name}: eps must be a torch.Tensor [probes, batch, features] or None, got "
                            f"{type(eps).__name__}")
        if eps.dim() != 3 or eps.shape[1:] != z.shape or eps.shape[0] < 1:
            raise ValueError(f"{name}: eps must be [probes >= 1, {B}, {d}], got shape {tuple(eps.shape)}")
        if eps.dtype != z.dtype:
            raise TypeError(f"{name}: eps dtype must match z ({z.dtype}), got {eps.dtype}")
        if eps.device != z.device:
            raise ValueError(f"{name}: eps must be on z's device ({z.device}), got {eps.device}")


def mlp_trace(z: torch.Tensor, t, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
              activation: str = "tanh", eps: torch.Tensor | None = None):
    """An MLP vector field ``f(z, t)`` and the trace of its Jacobian ``df/dz``, fused.

    Args:
        z: ``[B, d]`` float32/float64.
        t: the time, a scalar (float or tensor), ``[B]`` or ``[B, 1]``.
        weights, biases: the layers; ``weights[0]`` is ``[H1, d + 1]`` (the last column multiplies t),
            ``weights[-1]`` is ``[d, H]``; ``activation`` (``tanh``, ``softplus``, ``silu``) follows every layer
            but the last.
        eps: None for the exact trace (``d`` basis probes), or Hutchinson probes ``[m, B, d]`` (Rademacher or
            Gaussian, the caller draws them); the estimate is the mean over the m probes. The probes are
            constants: no gradient flows to them.

    Backends: C++ on CPU when the extension is built, else the same algorithm in plain torch ops (still one
    stacked GEMM per layer, and compilable); Triton elementwise kernels on CUDA; the autograd reference only
    when forced (``flowops.use_backend("reference")``, which also allows double backward).

    Returns:
        ``(f [B, d], tr [B])``. Gradients (to z, t and every weight and bias) are first order only. An
        empty batch gives empty outputs; NaN in a sample propagates to that sample's outputs (and, as in
        eager PyTorch, to the weight gradients).
    """
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"mlp_trace: t must be a number or a tensor, got {type(t).__name__}")
        t = torch.tensor(float(t), dtype=getattr(z, "dtype", torch.float32), device=getattr(z, "device", "cpu"))
    _check(z, t, weights, biases, activation, eps)
    weights, biases = list(weights), list(biases)
    if eps is not None:
        eps = eps.detach()
    B = z.shape[0]
    backend = _backend.select(z.device)
    if backend == "reference" and _backend.get_backend() == "reference":
        return _ref.mlp_trace(z, t, weights, biases, activation, eps)
    # not forced: without the extension (or Triton) the registered op runs the fused algorithm in torch ops
    tv = t.to(z.dtype).reshape(-1).expand(B)
    if B == 0:
        f = _ref.mlp_vector_field(z, tv, weights, biases, activation)
        return f, f.sum(1)
    tv = tv.contiguous()
    if eps is not None:
        eps = eps.contiguous()
    if backend == "triton" and z.device.type == "cpu":
        return _TritonMLPTrace.apply(z, tv, activation, eps, len(weights), *weights, *biases)
    if backend == "cpp" and HAS_CPP_OPS and not torch.compiler.is_compiling():
        return torch.ops.flowops.mlp_trace(z, tv, weights, biases, eps, activation)
    f, tr, _ = torch.ops.flowops.mlp_trace_fwd(z, tv, weights, biases, eps, activation)
    return f, tr


__all__ = ["mlp_trace", "act_derivs", "fused_fwd", "fused_bwd", "ACTIVATIONS"]
