"""The fused planar-flow stack: K planar maps and their summed log-det in one pass.

``planar_stack(z, w, u_hat, b)`` applies, for ``k = 0 .. K-1``,
``z <- z + u_hat[k] * tanh(w[k] . z + b[k])`` and returns ``(z_K, sum_k log|1 + (1 - t_k^2) w_k . u_hat_k|)``.
This is the cheap (generative) direction of :class:`flowops.nn.PlanarStack`; its oracle and eager
baseline is :func:`flowops.reference.planar_stack`, the loop of K eager planar steps.

Registration (torch.library): ``flowops::planar_stack_fwd`` / ``planar_stack_bwd`` with a fake
kernel each and a Python autograd formula (what torch.compile traces), plus, when the C++
extension is built, ``flowops::planar_stack`` whose autograd node lives in C++ (the eager CPU
fast path). Without the extension the schemas are defined here with the reference as the CPU
kernel. CUDA tensors run the Triton kernels (:mod:`flowops.kernels.planar`).
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference
from . import _library  # defines the flowops namespace first; shared registration
from ._checks import check_like, check_tensors

SCHEMAS = {
    "planar_stack_fwd": "(Tensor z, Tensor w, Tensor u_hat, Tensor b) -> (Tensor, Tensor)",
    "planar_stack_bwd": "(Tensor grad_z, Tensor grad_logdet, Tensor z, Tensor w, Tensor u_hat, Tensor b) "
                        "-> (Tensor, Tensor, Tensor, Tensor)",
}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_libs = []


# ------------------------------------------------------------------------------------------
# kernels behind the registered operators


def _ref_fwd(z, w, u, b):
    out, ld = reference.planar_stack(z, w, u, b)
    return out.contiguous(), ld


def _ref_bwd(grad_z, grad_logdet, z, w, u, b):
    """Closed-form backward in plain torch ops (recompute the forward, walk the layers back)."""
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    zc, wc, uc, bc = z.to(ct), w.to(ct), u.to(ct), b.to(ct)
    K = w.shape[0]
    c = (wc * uc).sum(1)
    zs, ts = [], []
    for k in range(K):
        zs.append(zc)
        t = torch.tanh(zc @ wc[k] + bc[k])
        ts.append(t)
        zc = zc + t[:, None] * uc[k]
    g = grad_z.to(ct).reshape(z.shape)
    gl = grad_logdet.to(ct).reshape(z.shape[0])
    gw, gu, gb = torch.zeros_like(wc), torch.zeros_like(uc), torch.zeros_like(bc)
    for k in reversed(range(K)):
        t = ts[k]
        s1 = 1.0 - t * t
        glD = gl / (1.0 + s1 * c[k])
        s = (g @ uc[k] - 2.0 * glD * t * c[k]) * s1
        r = (glD * s1).sum()
        gu[k] = g.t() @ t + r * wc[k]
        gw[k] = zs[k].t() @ s + r * uc[k]
        gb[k] = s.sum()
        g = g + s[:, None] * wc[k]
    return g.to(z.dtype).contiguous(), gw.to(w.dtype), gu.to(u.dtype), gb.to(b.dtype)


def _cuda_fwd(z, w, u, b):
    if _backend.has_triton():
        from ..kernels import planar as k

        return k.planar_stack_fwd(z, w, u, b)
    return _ref_fwd(z, w, u, b)


def _cuda_bwd(grad_z, grad_logdet, z, w, u, b):
    if _backend.has_triton():
        from ..kernels import planar as k

        return k.planar_stack_bwd(grad_z, grad_logdet, z, w, u, b)
    return _ref_bwd(grad_z, grad_logdet, z, w, u, b)


def _fake_fwd(z, w, u, b):
    return z.new_empty(z.shape), z.new_empty((z.shape[0],), dtype=_library.logdet_dtype(z))


def _fake_bwd(grad_z, grad_logdet, z, w, u, b):
    return z.new_empty(z.shape), w.new_empty(w.shape), u.new_empty(u.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_z, grad_logdet):
    if torch.is_grad_enabled():
        raise RuntimeError("flowops.planar_stack: higher-order gradients (backward with create_graph=True) are not "
                           "supported by the fused kernels; run the model under flowops.use_backend('reference') for "
                           "them")
    z, w, u, b = ctx.saved_tensors
    return torch.ops.flowops.planar_stack_bwd(grad_z, grad_logdet, z, w, u, b)


def register() -> bool:
    """Define (if the extension did not) and wire up the planar operators; True when C++ backs them."""
    return _library.register_fused("planar_stack", SCHEMAS, _libs, cpu_fwd=_ref_fwd, cpu_bwd=_ref_bwd,
                                   cuda_fwd=_cuda_fwd, cuda_bwd=_cuda_bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd,
                                   backward=_backward, setup_context=_setup_context)


HAS_CPP_OPS = register()


# ------------------------------------------------------------------------------------------
# Triton on CPU tensors (TRITON_INTERPRET=1): the test suite's path to the GPU kernels


class _TritonPlanar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, u, b):
        from ..kernels import planar as k

        ctx.save_for_backward(z, w, u, b)
        return k.planar_stack_fwd(z, w, u, b)

    @staticmethod
    def backward(ctx, grad_z, grad_logdet):
        if torch.is_grad_enabled():
            raise RuntimeError("flowops.planar_stack: higher-order gradients are not supported by the fused kernels")
        from ..kernels import planar as k

        return k.planar_stack_bwd(grad_z, grad_logdet, *ctx.saved_tensors)


# ------------------------------------------------------------------------------------------
# the public op


def _check(z, w, u_hat, b):
    name = "planar_stack"
    check_tensors(name, z=z, w=w, u_hat=u_hat, b=b)
    if z.dtype not in _FLOATS:
        raise TypeError(f"{name}: z must be a floating tensor (float16, bfloat16, float32, float64), got {z.dtype}")
    check_like(name, "z", z, w=w, u_hat=u_hat, b=b)
    if z.dim() != 2:
        raise ValueError(f"{name}: z must be [batch, features], got shape {tuple(z.shape)}")
    d = z.shape[1]
    if w.dim() != 2 or w.shape[1] != d:
        raise ValueError(f"{name}: w must be [K, {d}] (one row per layer), got shape {tuple(w.shape)}")
    if tuple(u_hat.shape) != tuple(w.shape):
        raise ValueError(f"{name}: u_hat must have w's shape {tuple(w.shape)}, got {tuple(u_hat.shape)}")
    if tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{name}: b must have shape ({w.shape[0]},), got {tuple(b.shape)}")


def planar_stack(z: torch.Tensor, w: torch.Tensor, u_hat: torch.Tensor, b: torch.Tensor):
    """K planar maps ``z <- z + u_hat[k] tanh(w[k] . z + b[k])``, ``k = 0 .. K-1``, fused.

    Args:
        z: ``[B, d]`` float16/bfloat16/float32/float64.
        w: ``[K, d]``; u_hat: ``[K, d]``, already reparameterized (see
            :func:`flowops.reference.planar_u_hat`; the layers do it); b: ``[K]``. z's dtype and device.

    Returns:
        ``(z_K, logdet)``: ``z_K`` like z; ``logdet [B]`` (float32 for half inputs) is
        ``sum_k log|1 + (1 - t_k^2) (w_k . u_hat_k)|``.

    The op does not check ``w_k . u_hat_k >= -1`` (that would cost a device sync): with
    ``w_k . u_hat_k < -1`` the map is not invertible and the log-det is that of ``|det|``
    (``-inf`` where the Jacobian is singular). NaN or Inf in a sample propagate to that sample's
    outputs and log-det (and, as in eager PyTorch, to the parameter gradients). An empty batch
    returns empty outputs; ``K = 0`` is the identity. Gradients are first order only.
    """
    _check(z, w, u_hat, b)
    backend = _backend.select(z.device)
    if backend == "cpp" and z.dtype not in (torch.float32, torch.float64):
        backend = "reference"
    if backend == "reference":
        return reference.planar_stack(z, w, u_hat, b)
    if backend == "triton" and z.device.type == "cpu":
        return _TritonPlanar.apply(z, w, u_hat, b)
    if backend == "cpp" and HAS_CPP_OPS and not torch.compiler.is_compiling():
        return torch.ops.flowops.planar_stack(z, w, u_hat, b)
    return torch.ops.flowops.planar_stack_fwd(z, w, u_hat, b)


__all__ = ["planar_stack"]
