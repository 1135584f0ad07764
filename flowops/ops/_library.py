"""Registers the flowops operators with torch.library.

The schemas come from the C++ extension when it loads (csrc/ops.cpp) and are
defined here otherwise, with the reference as the CPU kernel. Either way this
module adds the fake (meta) kernels that torch.compile traces with, the Python
autograd formula of ``affine_coupling_fwd`` (the path torch.compile uses), and
the CUDA kernels, which launch Triton (or fall back to the reference).
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference

SCHEMAS = {
    "affine_coupling_fwd": "(Tensor x, Tensor params, Tensor? mask, str scale, float clamp, bool inverse) "
                           "-> (Tensor, Tensor)",
    "affine_coupling_bwd": "(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor params, Tensor? mask, str scale, "
                           "float clamp, bool inverse) -> (Tensor, Tensor)",
}

_libs = []  # keep Library objects alive


def _ref_fwd(x, params, mask, scale, clamp, inverse):
    if scale == "additive":
        y, ld = reference.additive_coupling(x, params, inverse, _unflat(mask, x))
    else:
        y, ld = reference.affine_coupling(x, params, scale, clamp, inverse, _unflat(mask, x))
    return y.contiguous(), ld


def _unflat(mask, x):
    return None if mask is None else mask.reshape(x.shape[1:])


def _ref_bwd(grad_y, grad_logdet, x, params, mask, scale, clamp, inverse):
    """Closed-form backward in plain torch ops (no autograd inside a kernel)."""
    gy = grad_y.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    ct = gy.dtype
    bshape = (-1,) + (1,) * (x.dim() - 1)
    gl = grad_logdet.to(ct).reshape(bshape)
    keep = None if mask is None else _unflat(mask, x).to(torch.bool)
    xc = x.to(ct)
    if scale == "additive":
        gx = gy
        gt = -gy if inverse else gy
        if keep is not None:
            gt = gt.masked_fill(keep, 0.0)
        return gx.to(x.dtype), gt.to(params.dtype)
    c = x.shape[1]
    raw, shift = params[:, :c].to(ct), params[:, c:].to(ct)
    if scale == "exp":
        log_s, g = raw, torch.ones_like(raw)
    elif scale == "softclamp":
        th = torch.tanh(raw / clamp)
        log_s, g = clamp * th, 1.0 - th * th
    else:
        u = raw + 2.0
        log_s = torch.nn.functional.logsigmoid(u)
        g = torch.sigmoid(-u)
    if inverse:
        inv_s = torch.exp(-log_s)
        xo = (xc - shift) * inv_s
        gx = gy * inv_s
        gt = -gx
        graw = -(gy * xo + gl) * g
    else:
        gx = gy * torch.exp(log_s)
        gt = gy
        graw = (gx * xc + gl) * g
    if keep is not None:
        gx = torch.where(keep, gy, gx)
        gt = gt.masked_fill(keep, 0.0)
        graw = graw.masked_fill(keep, 0.0)
    return gx.to(x.dtype), torch.cat((graw, gt), dim=1).to(params.dtype)


def _cuda_fwd(x, params, mask, scale, clamp, inverse):
    if _backend.has_triton():
        from ..kernels import affine_coupling as k

        return k.affine_coupling_fwd(x, params, mask, scale, clamp, inverse)
    return _ref_fwd(x, params, mask, scale, clamp, inverse)


def _cuda_bwd(grad_y, grad_logdet, x, params, mask, scale, clamp, inverse):
    if _backend.has_triton():
        from ..kernels import affine_coupling as k

        return k.affine_coupling_bwd(grad_y, grad_logdet, x, params, mask, scale, clamp, inverse)
    return _ref_bwd(grad_y, grad_logdet, x, params, mask, scale, clamp, inverse)


def logdet_dtype(x):
    """The log-det's dtype for input ``x``: float32 for half-precision inputs (shared by the ops' fake kernels)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _fake_fwd(x, params, mask, scale, clamp, inverse):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=logdet_dtype(x))


def _fake_bwd(grad_y, grad_logdet, x, params, mask, scale, clamp, inverse):
    return x.new_empty(x.shape), params.new_empty(params.shape)


def _setup_context(ctx, inputs, output):
    x, params, mask, scale, clamp, inverse = inputs
    ctx.save_for_backward(x, params, mask)
    ctx.cfg = (scale, clamp, inverse)


def _backward(ctx, grad_y, grad_logdet):
    if torch.is_grad_enabled():
        raise RuntimeError("flowops.affine_coupling: higher-order gradients (backward with create_graph=True) are not "
                           "supported by the fused kernels; run the model under flowops.use_backend('reference') for them")
    x, params, mask = ctx.saved_tensors
    scale, clamp, inverse = ctx.cfg
    if scale == "additive" and mask is None:  # y = x +- t: the gradients are grad_y itself
        return grad_y, (-grad_y if inverse else grad_y), None, None, None, None
    gx, gp = torch.ops.flowops.affine_coupling_bwd(grad_y, grad_logdet, x, params, mask, scale, clamp, inverse)
    return gx, gp, None, None, None, None


def register() -> bool:
    """Define (if needed) and wire up the operators. Returns True when C++ kernels back them."""
    cpp = _backend.has_cpp()
    if not cpp:
        lib = torch.library.Library("flowops", "DEF")
        _libs.append(lib)
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
        lib.impl("affine_coupling_fwd", _ref_fwd, "CPU")
        lib.impl("affine_coupling_bwd", _ref_bwd, "CPU")
    impl = torch.library.Library("flowops", "IMPL")
    _libs.append(impl)
    impl.impl("affine_coupling_fwd", _cuda_fwd, "CUDA")
    impl.impl("affine_coupling_bwd", _cuda_bwd, "CUDA")
    torch.library.register_fake("flowops::affine_coupling_fwd", _fake_fwd, lib=impl)
    torch.library.register_fake("flowops::affine_coupling_bwd", _fake_bwd, lib=impl)
    if cpp:
        torch.library.register_fake("flowops::affine_coupling", _fake_fwd, lib=impl)
    torch.library.register_autograd("flowops::affine_coupling_fwd", _backward, setup_context=_setup_context,
                                    lib=impl)
    return cpp


HAS_CPP_OPS = register()


def defined(name: str) -> bool:
    """True when ``torch.ops.flowops.<name>`` exists (defined by the extension or by Python)."""
    try:
        getattr(torch.ops.flowops, name)
        return True
    except (AttributeError, RuntimeError):
        return False


_CPP_OPS: dict = {}


def has_cpp_ops(*names: str) -> bool:
    """True when the compiled extension loads and defines every ``torch.ops.flowops.<name>`` (checked once per
    set of names)."""
    v = _CPP_OPS.get(names)
    if v is None:
        v = _CPP_OPS[names] = _backend.has_cpp() and all(defined(n) for n in names)
    return v


def register_fused(prefix: str, schemas: dict, libs: list, *, cpu_fwd, cpu_bwd, cuda_fwd, cuda_bwd, fake_fwd,
                   fake_bwd, backward, setup_context, fused_fake=None) -> bool:
    """Wire up one fused op family the way every op after the first is registered.

    ``<prefix>_fwd`` / ``<prefix>_bwd`` (and, with the extension, the C++ autograd op ``<prefix>``): the
    schemas in ``schemas`` are defined here with the plain-torch CPU kernels when the extension does not
    provide them; CUDA kernels, fake kernels for torch.compile (``fused_fake`` for ``<prefix>``, default
    ``fake_fwd``) and the Python autograd formula of ``<prefix>_fwd`` are registered either way. The
    Library objects are appended to ``libs`` (kept alive by the caller). Returns True when C++ backs the op.
    """
    fwd, bwd = f"{prefix}_fwd", f"{prefix}_bwd"
    cpp = _backend.has_cpp() and defined(fwd) and defined(prefix)
    if not cpp:
        lib = torch.library.Library("flowops", "FRAGMENT")
        libs.append(lib)
        for name, schema in schemas.items():
            if not defined(name):
                lib.define(name + schema)
        lib.impl(fwd, cpu_fwd, "CPU")
        lib.impl(bwd, cpu_bwd, "CPU")
    impl = torch.library.Library("flowops", "IMPL")
    libs.append(impl)
    impl.impl(fwd, cuda_fwd, "CUDA")
    impl.impl(bwd, cuda_bwd, "CUDA")
    torch.library.register_fake(f"flowops::{fwd}", fake_fwd, lib=impl)
    torch.library.register_fake(f"flowops::{bwd}", fake_bwd, lib=impl)
    if cpp:
        torch.library.register_fake(f"flowops::{prefix}", fused_fake or fake_fwd, lib=impl)
    torch.library.register_autograd(f"flowops::{fwd}", backward, setup_context=setup_context, lib=impl)
    return cpp
