"""Triton kernels of the fused Glow ``actnorm_invconv`` op (ActNorm folded into the 1x1 convolution).

The math is that of ``csrc/actnorm_invconv.cpp`` and :func:`flowops.reference.actnorm_invconv`: both
directions are ``y[n] = A x[n] + c`` on the ``[N, C, S]`` view of NCHW memory, with

    forward:  A = W diag(e),   c = W (e * b),   e = exp(log_scale)
    inverse:  A = diag(1/e) M, c = -b,          M = W^-1 (passed in by the caller)

One program computes a ``[BLOCK_C, BLOCK_S]`` output tile of one sample (all channels, a block of
positions): it reads its ``C x BLOCK_S`` input block once, row by row, accumulating rank-1 updates
``A[:, k] x[k, :]`` in fp32 (fp64 for fp64 inputs), and writes the tile once. The backward runs the
same kernel with ``A^T`` for ``grad_x`` and a second kernel for the parameter gradient: each program
holds its input tile and writes the per-program partial sums ``grad_A[i, :] = sum_s g[i, s] x[:, s]``
(``[programs, C, C]``) and ``grad_c = sum_s g[:, s]`` (``[programs, C]``), summed with torch afterwards
(no atomics, deterministic). The C x C folding and the chain rule back to log_scale, bias, weight and
w_logdet are :func:`flowops.reference.actnorm_invconv.fold` / ``param_grads`` (plain torch on tiny tensors).

Triton is imported on the first launch only and the kernels use loads, stores, multiply-adds and
sums, so they also run under the interpreter on CPU (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import math

import torch

from flowops.reference.actnorm_invconv import fold, param_grads

from . import _math

tl = None  # triton.language, bound by _load()
_state: dict = {}
TILE = 4096  # elements per output tile (BLOCK_C * BLOCK_S)


def _tile(C, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's tile of the [N, C, S] view: all channels of sample n, positions of block sb.
    Returns (n, sb, offs_c, offs_s, cmask, smask, base) with base the sample's first element."""
    n = tl.program_id(0)
    sb = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    return n, sb, offs_c, offs_s, offs_c < C, offs_s < S, n.to(tl.int64) * C * S


def _matmul_bias_kernel(x_ptr, a_ptr, c_ptr, y_ptr, C, S, TRANS: tl.constexpr, HAS_BIAS: tl.constexpr,
                        CT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, sb, offs_c, offs_s, cmask, smask, base = _tile(C, S, BLOCK_C, BLOCK_S)
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=CT)
    for k in range(C):
        xk = tl.load(x_ptr + base + k * S + offs_s, mask=smask, other=0.0).to(CT)
        if TRANS:  # column k of A^T is row k of A
            ak = tl.load(a_ptr + k * C + offs_c, mask=cmask, other=0.0).to(CT)
        else:
            ak = tl.load(a_ptr + offs_c * C + k, mask=cmask, other=0.0).to(CT)
        acc += ak[:, None] * xk[None, :]
    if HAS_BIAS:
        acc += tl.load(c_ptr + offs_c, mask=cmask, other=0.0).to(CT)[:, None]
    out = base + offs_c[:, None] * S + offs_s[None, :]
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=cmask[:, None] & smask[None, :])


def _param_grad_kernel(g_ptr, x_ptr, pa_ptr, pc_ptr, C, S, n_sblocks, CT: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    n, sb, offs_c, offs_s, cmask, smask, base = _tile(C, S, BLOCK_C, BLOCK_S)
    tile = base + offs_c[:, None] * S + offs_s[None, :]
    inb = cmask[:, None] & smask[None, :]
    x = tl.load(x_ptr + tile, mask=inb, other=0.0).to(CT)
    g = tl.load(g_ptr + tile, mask=inb, other=0.0).to(CT)
    prog = n.to(tl.int64) * n_sblocks + sb
    tl.store(pc_ptr + prog * C + offs_c, tl.sum(g, axis=1), mask=cmask)
    for i in range(C):
        gi = tl.load(g_ptr + base + i * S + offs_s, mask=smask, other=0.0).to(CT)
        tl.store(pa_ptr + prog * C * C + i * C + offs_c, tl.sum(x * gi[None, :], axis=1), mask=cmask)


def _load():
    """Import triton and compile-wrap the kernels (once). Returns (matmul, param_grad, tl)."""
    if not _state:
        import triton
        import triton.language as language

        globals()["tl"] = language
        globals()["_tile"] = triton.jit(_tile)
        _state["mm"] = triton.jit(_matmul_bias_kernel)
        _state["pg"] = triton.jit(_param_grad_kernel)
    return _state["mm"], _state["pg"], tl


def block_config(C: int, S: int):
    """(BLOCK_C, BLOCK_S, num_warps): all channels in one tile, positions filling up to ``TILE`` elements."""
    block_c = _math.next_pow2(max(C, 1))
    block_s = max(1, min(_math.next_pow2(max(S, 1)), TILE // block_c))
    warps = 4 if block_c * block_s >= 2048 else 2
    return block_c, block_s, warps


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ct(dtype, tl_):
    return tl_.float64 if dtype == torch.float64 else tl_.float32


def _guard(x):
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def _spatial(x):
    return math.prod(x.shape[2:])


def _launch_matmul(x, A, c, trans: bool):
    mm, _, tl_ = _load()
    N, C, S = x.shape[0], x.shape[1], _spatial(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0 or S == 0:
        return y
    block_c, block_s, warps = block_config(C, S)
    grid = (N, -(-S // block_s))
    with _guard(x):
        mm[grid](x, A, c if c is not None else A, y, C, S, TRANS=trans, HAS_BIAS=c is not None,
                 CT=_ct(x.dtype, tl_), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps)
    return y


def actnorm_invconv_fwd(x, log_scale, bias, weight, w_logdet, inverse: bool):
    """``(y, logdet)``; logdet float32 for half inputs."""
    xc = x.contiguous()
    A, c, _ = fold(log_scale, bias, weight, inverse)
    y = _launch_matmul(xc, A, c, trans=False)
    acc = _acc_dtype(x.dtype)
    total = (log_scale.to(acc).sum() + w_logdet.to(acc).reshape(())) * _spatial(x)
    logdet = (-total if inverse else total).expand(x.shape[0]).contiguous()
    if x.dtype not in (torch.float16, torch.bfloat16):
        logdet = logdet.to(x.dtype)
    return y, logdet


def actnorm_invconv_bwd(grad_y, grad_logdet, x, log_scale, bias, weight, w_logdet, inverse: bool):
    """``(grad_x, grad_log_scale, grad_bias, grad_weight, grad_w_logdet)``."""
    _, pg, tl_ = _load()
    xc, g = x.contiguous(), grad_y.to(x.dtype).contiguous()
    A, _, e = fold(log_scale, bias, weight, inverse)
    gx = _launch_matmul(g, A, None, trans=True)
    N, C, S = x.shape[0], x.shape[1], _spatial(x)
    acc = A.dtype
    block_c, block_s, warps = block_config(C, S)
    n_sblocks = -(-S // block_s) if S else 0
    programs = N * n_sblocks
    if programs == 0:
        gA = torch.zeros((C, C), dtype=acc, device=x.device)
        gc = torch.zeros(C, dtype=acc, device=x.device)
    else:
        pa = torch.empty((programs, C, C), dtype=acc, device=x.device)
        pc = torch.empty((programs, C), dtype=acc, device=x.device)
        with _guard(x):
            pg[(N, n_sblocks)](g, xc, pa, pc, C, S, n_sblocks, CT=_ct(x.dtype, tl_), BLOCK_C=block_c,
                               BLOCK_S=block_s, num_warps=warps)
        gA, gc = pa.sum(0), pc.sum(0)
    gsum = grad_logdet.to(acc).sum() * S
    gls, gb, gw, gwld = param_grads(gA, gc, gsum, log_scale, bias, weight, e, inverse)
    dt = log_scale.dtype
    return gx, gls.to(dt), gb.to(dt), gw.to(dt), gwld.to(dt).reshape(w_logdet.shape)


__all__ = ["actnorm_invconv_fwd", "actnorm_invconv_bwd", "fold", "param_grads", "block_config"]
