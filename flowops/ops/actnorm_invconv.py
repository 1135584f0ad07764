"""The fused Glow op: ActNorm folded into the invertible 1x1 convolution, both directions, one pass.

``actnorm_invconv(x, log_scale, bias, weight, w_logdet, inverse=False)`` computes

* forward: ``y = W ((x + bias) * exp(log_scale))`` with ``weight = W``;
* inverse: ``x = (M z) * exp(-log_scale) - bias`` with ``weight = M = W^-1``;

as one channel matmul per sample with a folded weight and bias, and the per-sample log-det
``+-S * (sum(log_scale) + w_logdet)`` (``S`` = number of spatial positions, ``w_logdet = log|det W|``).
Its oracle and eager baseline is :func:`flowops.reference.actnorm_invconv.actnorm_invconv`
(ActNorm then the 1x1 convolution).

Registration (torch.library): ``flowops::actnorm_invconv_fwd`` / ``actnorm_invconv_bwd`` with a fake
kernel each and a Python autograd formula (what torch.compile traces), plus, when the C++ extension is
built, ``flowops::actnorm_invconv`` whose autograd node lives in C++ (the eager CPU fast path). Without
the extension the schemas are defined here with a plain-torch CPU kernel. CUDA tensors run the Triton
kernels (:mod:`flowops.kernels.actnorm_invconv`).
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import actnorm_invconv as _ref
from . import _library  # defines the flowops namespace first; shared registration
from ._checks import check_like, check_tensors

SCHEMAS = {
    "actnorm_invconv_fwd": "(Tensor x, Tensor log_scale, Tensor bias, Tensor weight, Tensor w_logdet, bool inverse) "
                           "-> (Tensor, Tensor)",
    "actnorm_invconv_bwd": "(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor log_scale, Tensor bias, "
                           "Tensor weight, Tensor w_logdet, bool inverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_libs = []


# ------------------------------------------------------------------------------------------
# kernels behind the registered operators (plain torch: CPU without the extension, CUDA without Triton)


def _ref_fwd(x, log_scale, bias, weight, w_logdet, inverse):
    y, ld = _ref.actnorm_invconv(x, log_scale, bias, weight, w_logdet, inverse)
    return y.contiguous(), ld.contiguous()


def _ref_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet, inverse):
    """Closed-form backward in plain torch ops (the math of the C++ and Triton backward)."""
    A, _, e = _ref.fold(log_scale, bias, weight, inverse)
    acc = A.dtype
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    g3 = grad_y.to(acc).reshape(n, c, s)
    x3 = x.to(acc).reshape(n, c, s)
    gx = torch.matmul(A.t(), g3).reshape(x.shape).to(x.dtype)
    gA = torch.einsum("ncs,nds->cd", g3, x3)
    gc = g3.sum((0, 2))
    gsum = grad_logdet.to(acc).sum() * s
    gls, gb, gw, gwld = _ref.param_grads(gA, gc, gsum, log_scale, bias, weight, e, inverse)
    dt = log_scale.dtype
    return gx, gls.to(dt), gb.to(dt), gw.to(dt), gwld.to(dt).reshape(w_logdet.shape)


def _kernels():
    from ..kernels import actnorm_invconv as k

    return k


def _cuda_fwd(x, log_scale, bias, weight, w_logdet, inverse):
    if _backend.has_triton():
        _k = _kernels()
        return _k.actnorm_invconv_fwd(x, log_scale, bias, weight, w_logdet, inverse)
    return _ref_fwd(x, log_scale, bias, weight, w_logdet, inverse)


def _cuda_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet, inverse):
    if _backend.has_triton():
        _k = _kernels()
        return _k.actnorm_invconv_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet, inverse)
    return _ref_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet, inverse)


def _fake_fwd(x, log_scale, bias, weight, w_logdet, inverse):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=_library.logdet_dtype(x))


def _fake_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet, inverse):
    return (x.new_empty(x.shape), log_scale.new_empty(log_scale.shape), bias.new_empty(bias.shape),
            weight.new_empty(weight.shape), w_logdet.new_empty(w_logdet.shape))


def _setup_context(ctx, inputs, output):
    x, log_scale, bias, weight, w_logdet, inverse = inputs
    ctx.save_for_backward(x, log_scale, bias, weight, w_logdet)
    ctx.inverse = inverse


def _backward(ctx, grad_y, grad_logdet):
    if torch.is_grad_enabled():
        raise RuntimeError("flowops.actnorm_invconv: higher-order gradients (backward with create_graph=True) are "
                           "not supported by the fused kernels; run the model under flowops.use_backend('reference') "
                           "for them")
    x, log_scale, bias, weight, w_logdet = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    if grad_logdet is None:
        grad_logdet = x.new_zeros((x.shape[0],), dtype=_library.logdet_dtype(x))
    grads = torch.ops.flowops.actnorm_invconv_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet,
                                                  ctx.inverse)
    return (*grads, None)


def register() -> bool:
    """Define (if the extension did not) and wire up the operators; True when C++ backs them."""
    return _library.register_fused("actnorm_invconv", SCHEMAS, _libs, cpu_fwd=_ref_fwd, cpu_bwd=_ref_bwd,
                                   cuda_fwd=_cuda_fwd, cuda_bwd=_cuda_bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd,
                                   backward=_backward, setup_context=_setup_context)


HAS_CPP_OPS = register()
HAS_CPP_LU = _backend.has_cpp() and _library.defined("lu_weight")
if HAS_CPP_LU:
    torch.library.register_fake("flowops::lu_weight", lambda perm, lower, *rest: lower.new_empty(lower.shape),
                                lib=_libs[-1])


def lu_weight(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
              log_s: torch.Tensor) -> torch.Tensor:
    """Glow's ``W = P L (U + diag(sign * exp(log_s)))`` (strict triangles of ``lower`` / ``upper`` used).

    On CPU in eager mode with the C++ extension this is one autograd node (forward and backward are a
    few C x C matmuls) instead of a chain of small eager ops; otherwise, and under ``torch.compile``,
    it is :func:`flowops.reference.actnorm_invconv.lu_weight`. Gradients are first order only on
    the C++ path.
    """
    if (HAS_CPP_LU and not torch.compiler.is_compiling() and lower.dtype in (torch.float32, torch.float64)
            and _backend.select(lower.device) == "cpp"):
        return torch.ops.flowops.lu_weight(perm, lower, upper, sign, log_s)
    return _ref.lu_weight(perm, lower, upper, sign, log_s)


# ------------------------------------------------------------------------------------------
# Triton on CPU tensors (TRITON_INTERPRET=1): the test suite's path to the GPU kernels


class _TritonActnormInvconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_scale, bias, weight, w_logdet, inverse):
        ctx.save_for_backward(x, log_scale, bias, weight, w_logdet)
        ctx.inverse = inverse
        return _kernels().actnorm_invconv_fwd(x, log_scale, bias, weight, w_logdet, inverse)

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        if torch.is_grad_enabled():
            raise RuntimeError("flowops.actnorm_invconv: higher-order gradients are not supported by the fused "
                               "kernels")
        x, log_scale, bias, weight, w_logdet = ctx.saved_tensors
        return (*_kernels().actnorm_invconv_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet, ctx.inverse),
                None)


# ------------------------------------------------------------------------------------------
# the public op


def _check(x, log_scale, bias, weight, w_logdet):
    name = "actnorm_invconv"
    check_tensors(name, x=x, log_scale=log_scale, bias=bias, weight=weight)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: x must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be [batch, channels] or [batch, channels, *spatial], got shape "
                         f"{tuple(x.shape)}")
    c = x.shape[1]
    if c == 0:
        raise ValueError(f"{name}: x must have at least one channel, got shape {tuple(x.shape)}")
    tensors = [("log_scale", log_scale, (c,)), ("bias", bias, (c,)), ("weight", weight, (c, c))]
    if w_logdet is not None:
        if not isinstance(w_logdet, torch.Tensor):
            raise TypeError(f"{name}: w_logdet must be a torch.Tensor or None, got {type(w_logdet).__name__}")
        if w_logdet.numel() != 1:
            raise ValueError(f"{name}: w_logdet must hold one value (log|det W|), got shape {tuple(w_logdet.shape)}")
        tensors.append(("w_logdet", w_logdet, None))
    check_like(name, "x", x, **{arg: t for arg, t, _ in tensors})
    for arg, t, shape in tensors:
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: {arg} must have shape {shape} for x with {c} channels, got {tuple(t.shape)}")


def actnorm_invconv(x: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                    w_logdet: torch.Tensor | None = None, inverse: bool = False):
    """ActNorm then the invertible 1x1 convolution (Glow), fused, with its per-sample log|det|.

    Args:
        x: ``[B, C]`` or ``[B, C, *spatial]`` (NCHW for images), float16/bfloat16/float32/float64.
        log_scale, bias: ActNorm's ``[C]`` parameters: ``h = (x + bias) * exp(log_scale)``.
        weight: ``[C, C]``: the 1x1 convolution ``W`` for the forward, ``W^-1`` for the inverse
            (e.g. :meth:`flowops.nn.InvConv1x1.inverse_weight`, built by triangular solves and cached).
        w_logdet: ``log|det W|`` (one value, e.g. ``log_s.sum()`` for the LU parameterization),
            always of the forward ``W``. ``None`` computes it with ``torch.linalg.slogdet(weight)``.
        inverse: apply the inverse ``x = (W^-1 z) * exp(-log_scale) - bias``.

    Returns:
        ``(y, logabsdet)``: y like x; logabsdet ``[B]`` (float32 for half inputs) equal to
        ``S * (sum(log_scale) + w_logdet)`` forward and its negative inverse, ``S`` = prod(spatial).

    Gradients flow to every input (x, log_scale, bias, weight, w_logdet), so the LU factors behind
    ``weight`` get theirs through autograd; fused backward kernels are first order only. NaN or Inf
    propagate as in eager PyTorch (a non-finite parameter spreads to every sample); an empty batch
    returns empty outputs. The op does not check that ``weight`` is invertible.
    """
    _check(x, log_scale, bias, weight, w_logdet)
    inverse = bool(inverse)
    if w_logdet is None:
        w_logdet = torch.linalg.slogdet(weight if x.dtype in (torch.float32, torch.float64)
                                        else weight.float())[1].to(x.dtype)
        if inverse:
            w_logdet = -w_logdet
    backend = _backend.select(x.device)
    if backend == "cpp" and x.dtype not in (torch.float32, torch.float64):
        backend = "reference"
    if backend == "reference":
        return _ref.actnorm_invconv(x, log_scale, bias, weight, w_logdet, inverse)
    if backend == "triton" and x.device.type == "cpu":
        return _TritonActnormInvconv.apply(x, log_scale, bias, weight, w_logdet, inverse)
    if backend == "cpp" and HAS_CPP_OPS and not torch.compiler.is_compiling():
        return torch.ops.flowops.actnorm_invconv(x, log_scale, bias, weight, w_logdet, inverse)
    return torch.ops.flowops.actnorm_invconv_fwd(x, log_scale, bias, weight, w_logdet, inverse)


__all__ = ["actnorm_invconv", "lu_weight"]
