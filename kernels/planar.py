"""Triton kernels of the fused planar-flow stack, forward and backward.

The math is that of ``csrc/planar.cpp`` and :func:`flowops.reference.planar_stack`::

    for k in 0 .. K-1:  a_k = w_k . z_k + b_k,  t_k = tanh(a_k),  z_{k+1} = z_k + u_k t_k
    logdet = sum_k log|1 + (1 - t_k^2) c_k|,    c_k = w_k . u_k

One program handles a block of ``ROWS`` samples as a ``[ROWS, BLOCK_D]`` tile held in
registers (``BLOCK_D`` = d rounded up to a power of two) and loops over the K layers: the
input is read once and the output written once. Loads upcast to fp32 (fp64 for fp64 inputs),
stores cast back; the log-det is fp32 for half inputs.

Backward, one program per block as well: a first loop recomputes the forward and writes the
K tanh values of each sample to a ``[B, K]`` scratch buffer (the only thing stored beyond the
inputs), ending at z_K; a second loop walks the layers from K-1 down to 0, reconstructing each
layer's input as ``z_k = z_{k+1} - u_k t_k`` and carrying the gradient of z. Parameter
gradients are written as per-program partial sums ``[programs, K, 2d + 2]`` (grad w without its
c term, grad u without its c term, grad b, and the coefficient of the c terms) and summed with
torch afterwards: no atomics, deterministic.

Triton is imported on the first launch only, and the kernels use nothing beyond ``exp``,
``log``, ``abs`` and ``where`` (``tanh`` is built from ``exp``), so they run under the
interpreter on CPU.
"""
from __future__ import annotations

import torch

from . import _math

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TILE = 2048  # elements per program tile (ROWS * BLOCK_D)

tl = None  # triton.language, bound by _load()
_state: dict = {}


_tanh = None  # the shared device tanh (kernels/_math.py), bound by _load()


def _planar_fwd_kernel(z_ptr, w_ptr, u_ptr, b_ptr, c_ptr, out_ptr, ld_ptr, B, D, K,
                       CT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < B
    cmask = cols < D
    inb = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * D + cols[None, :]
    z = tl.load(z_ptr + off, mask=inb, other=0.0).to(CT)
    ld = tl.zeros([ROWS], dtype=CT)
    for k in range(K):
        w = tl.load(w_ptr + k * D + cols, mask=cmask, other=0.0).to(CT)
        u = tl.load(u_ptr + k * D + cols, mask=cmask, other=0.0).to(CT)
        bk = tl.load(b_ptr + k).to(CT)
        ck = tl.load(c_ptr + k).to(CT)
        a = tl.sum(z * w[None, :], axis=1) + bk
        t = _tanh(a)
        z = z + t[:, None] * u[None, :]
        ld = ld + tl.log(tl.abs(1.0 + (1.0 - t * t) * ck))
    tl.store(out_ptr + off, z.to(out_ptr.dtype.element_ty), mask=inb)
    tl.store(ld_ptr + rows, ld.to(ld_ptr.dtype.element_ty), mask=rmask)


def _planar_bwd_kernel(gz_ptr, gld_ptr, z_ptr, w_ptr, u_ptr, b_ptr, c_ptr, t_ptr, gx_ptr, part_ptr, B, D, K,
                       CT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < B
    cmask = cols < D
    inb = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * D + cols[None, :]
    z = tl.load(z_ptr + off, mask=inb, other=0.0).to(CT)
    for k in range(K):  # recompute the forward, keeping tanh per layer
        w = tl.load(w_ptr + k * D + cols, mask=cmask, other=0.0).to(CT)
        u = tl.load(u_ptr + k * D + cols, mask=cmask, other=0.0).to(CT)
        bk = tl.load(b_ptr + k).to(CT)
        t = _tanh(tl.sum(z * w[None, :], axis=1) + bk)
        t = tl.where(rmask, t, 0.0)
        tl.store(t_ptr + rows * K + k, t, mask=rmask)
        z = z + t[:, None] * u[None, :]
    g = tl.load(gz_ptr + off, mask=inb, other=0.0).to(CT)
    gl = tl.load(gld_ptr + rows, mask=rmask, other=0.0).to(CT)
    P = 2 * D + 2
    base = part_ptr + pid.to(tl.int64) * K * P
    for i in range(K):
        k = K - 1 - i
        w = tl.load(w_ptr + k * D + cols, mask=cmask, other=0.0).to(CT)
        u = tl.load(u_ptr + k * D + cols, mask=cmask, other=0.0).to(CT)
        ck = tl.load(c_ptr + k).to(CT)
        t = tl.load(t_ptr + rows * K + k, mask=rmask, other=0.0)
        z = z - t[:, None] * u[None, :]
        s1 = 1.0 - t * t
        glD = gl / (1.0 + s1 * ck)
        gdot = tl.sum(g * u[None, :], axis=1)
        s = (gdot - 2.0 * glD * t * ck) * s1
        pw = tl.sum(s[:, None] * z, axis=0)
        pu = tl.sum(g * t[:, None], axis=0)
        tl.store(base + k * P + cols, pw.to(part_ptr.dtype.element_ty), mask=cmask)
        tl.store(base + k * P + D + cols, pu.to(part_ptr.dtype.element_ty), mask=cmask)
        tl.store(base + k * P + 2 * D, tl.sum(s, axis=0).to(part_ptr.dtype.element_ty))
        tl.store(base + k * P + 2 * D + 1, tl.sum(glD * s1, axis=0).to(part_ptr.dtype.element_ty))
        g = g + s[:, None] * w[None, :]
    tl.store(gx_ptr + off, g.to(gx_ptr.dtype.element_ty), mask=inb)


def _load():
    """Import triton and compile-wrap the kernels (once). Returns (fwd, bwd, tl)."""
    if not _state:
        import triton
        import triton.language as language

        g = globals()
        g["tl"] = language
        g["_tanh"] = _math.jitted_tanh()
        _state["fwd"] = triton.jit(_planar_fwd_kernel)
        _state["bwd"] = triton.jit(_planar_bwd_kernel)
    return _state["fwd"], _state["bwd"], tl


def block_config(B: int, d: int):
    """(ROWS, BLOCK_D, num_warps): a [ROWS, BLOCK_D] tile of about TILE elements."""
    block_d = _math.next_pow2(max(d, 1))
    rows = max(1, min(max(TILE // block_d, 1), _math.next_pow2(max(B, 1))))
    warps = max(1, min(8, (rows * block_d) // 256))
    return rows, block_d, warps


def _check(z, w, u, b):
    for name, t in (("z", z), ("w", w), ("u_hat", u), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"planar_stack (triton): {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != z.dtype:
            raise TypeError(f"planar_stack (triton): {name} must have z's dtype {z.dtype}, got {t.dtype}")
        if t.device != z.device:
            raise ValueError(f"planar_stack (triton): {name} must be on z's device {z.device}, got {t.device}")
    if z.dtype not in _FLOATS:
        raise TypeError(f"planar_stack (triton): z must be a floating tensor, got {z.dtype}")
    if z.dim() != 2 or w.dim() != 2 or w.shape[1] != z.shape[1] or u.shape != w.shape or tuple(b.shape) != (
            w.shape[0],):
        raise ValueError(f"planar_stack (triton): expected z [B, d], w and u_hat [K, d], b [K]; got z "
                         f"{tuple(z.shape)}, w {tuple(w.shape)}, u_hat {tuple(u.shape)}, b {tuple(b.shape)}")
    return z.shape[0], z.shape[1], w.shape[0]


def _ct(dtype, tl_):
    return tl_.float64 if dtype == torch.float64 else tl_.float32


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _guard(x):
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def planar_stack_fwd(z, w, u_hat, b):
    """``(z_K, logdet)`` of the K planar maps (log-det in float32 for half inputs)."""
    B, d, K = _check(z, w, u_hat, b)
    out = torch.empty((B, d), dtype=z.dtype, device=z.device)
    acc = _acc_dtype(z.dtype)
    logdet = torch.zeros(B, dtype=acc, device=z.device)
    if B == 0:
        return out, logdet
    if d == 0 or K == 0:
        out.copy_(z)
        return out, logdet
    fwd, _, tl_ = _load()
    zc, wc, uc, bc = z.contiguous(), w.contiguous(), u_hat.contiguous(), b.contiguous()
    c = (wc.to(acc) * uc.to(acc)).sum(1).contiguous()
    rows, block_d, warps = block_config(B, d)
    grid = (-(-B // rows),)
    with _guard(z):
        fwd[grid](zc, wc, uc, bc, c, out, logdet, B, d, K, CT=_ct(z.dtype, tl_), ROWS=rows, BLOCK_D=block_d,
                  num_warps=warps)
    return out, logdet


def planar_stack_bwd(grad_z, grad_logdet, z, w, u_hat, b):
    """``(grad_z0, grad_w, grad_u_hat, grad_b)`` of :func:`planar_stack_fwd`."""
    B, d, K = _check(z, w, u_hat, b)
    acc = _acc_dtype(z.dtype)
    if B == 0 or d == 0 or K == 0:
        return (grad_z.to(z.dtype).clone().reshape(z.shape), torch.zeros_like(w), torch.zeros_like(u_hat),
                torch.zeros_like(b))
    _, bwd, tl_ = _load()
    zc, wc, uc, bc = z.contiguous(), w.contiguous(), u_hat.contiguous(), b.contiguous()
    gz = grad_z.contiguous()
    gld = grad_logdet.reshape(B).contiguous()
    c = (wc.to(acc) * uc.to(acc)).sum(1).contiguous()
    rows, block_d, warps = block_config(B, d)
    n_prog = -(-B // rows)
    scratch = torch.empty((B, K), dtype=acc, device=z.device)
    gx = torch.empty((B, d), dtype=z.dtype, device=z.device)
    part = torch.empty((n_prog, K, 2 * d + 2), dtype=acc, device=z.device)
    with _guard(z):
        bwd[(n_prog,)](gz, gld, zc, wc, uc, bc, c, scratch, gx, part, B, d, K, CT=_ct(z.dtype, tl_), ROWS=rows,
                       BLOCK_D=block_d, num_warps=warps)
    total = part.sum(0)
    R = total[:, 2 * d + 1:2 * d + 2]
    gw = total[:, :d] + R * uc.to(acc)
    gu = total[:, d:2 * d] + R * wc.to(acc)
    gb = total[:, 2 * d]
    return gx, gw.to(w.dtype), gu.to(u_hat.dtype), gb.to(b.dtype)


__all__ = ["planar_stack_fwd", "planar_stack_bwd", "block_config"]
