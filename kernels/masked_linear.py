"""Triton kernels of MADE's masked linear layer: ``y = x @ (W * M)^T + b`` with the mask
``M[n, k] = in_deg[k] < out_deg[n]`` (strict) or ``<=`` computed from the degrees in registers.

Both degree vectors are sorted, so the mask is a staircase and every kernel bounds its
reduction loop per tile, as causal attention does:

- forward, tile (rows m, outputs n): the loop over inputs stops at ``k_end[n tile]``, the number
  of inputs the tile's last output can see (precomputed with ``torch.searchsorted``, no sync);
- grad_x, tile (rows m, inputs k): the loop over outputs starts at ``n_start[k tile]``, the first
  output that sees the tile's first input;
- grad_W, tile (outputs n, inputs k): a tile the staircase does not touch writes zeros and runs
  no loop; the others reduce over the batch and mask the band.

Inside a touched tile the mask is applied with ``tl.where`` on the weight tile (no mask tensor
in memory). fp32 accumulation with ``input_precision="ieee"`` (results match torch's fp32
matmul, not TF32). Triton is imported on the first launch only.
"""
from __future__ import annotations

import torch

BM, BN, BK = 32, 32, 32
_kernels = None


def _load():
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(X, W, Bias, DI, DO, KEND, Y, M, N, K, sxm, sxk, swn, swk, sym, syn,
                   HAS_BIAS: tl.constexpr, STRICT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        dout = tl.load(DO + rn, mask=mn, other=0)
        k_end = tl.load(KEND + pid_n)
        rm64 = rm.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            din = tl.load(DI + rk, mask=mk, other=0)
            x = tl.load(X + rm64[:, None] * sxm + rk[None, :] * sxk, mask=mm[:, None] & mk[None, :], other=0.0)
            w = tl.load(W + rn[None, :] * swn + rk[:, None] * swk, mask=mn[None, :] & mk[:, None], other=0.0)
            if STRICT:
                conn = din[:, None] < dout[None, :]
            else:
                conn = din[:, None] <= dout[None, :]
            w = tl.where(conn & mk[:, None], w.to(tl.float32), 0.0)
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm64[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])

    @triton.jit
    def bwd_x_kernel(G, W, DI, DO, NSTART, GX, M, N, K, sgm, sgn, swn, swk, sxm, sxk,
                     STRICT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mm = rm < M
        mk = rk < K
        rm64 = rm.to(tl.int64)
        din = tl.load(DI + rk, mask=mk, other=0)
        n_start = tl.load(NSTART + pid_k)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(n_start, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mn = rn < N
            dout = tl.load(DO + rn, mask=mn, other=0)
            g = tl.load(G + rm64[:, None] * sgm + rn[None, :] * sgn, mask=mm[:, None] & mn[None, :], other=0.0)
            w = tl.load(W + rn[:, None] * swn + rk[None, :] * swk, mask=mn[:, None] & mk[None, :], other=0.0)
            if STRICT:
                conn = din[None, :] < dout[:, None]
            else:
                conn = din[None, :] <= dout[:, None]
            w = tl.where(conn & mn[:, None], w.to(tl.float32), 0.0)
            acc += tl.dot(g.to(tl.float32), w, input_precision="ieee")
        tl.store(GX + rm64[:, None] * sxm + rk[None, :] * sxk, acc.to(GX.dtype.element_ty),
                 mask=mm[:, None] & mk[None, :])

    @triton.jit
    def bwd_w_kernel(G, X, DI, DO, GW, M, N, K, sgm, sgn, sxm, sxk, swn, swk,
                     STRICT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mn = rn < N
        mk = rk < K
        dout = tl.load(DO + rn, mask=mn, other=0)
        din = tl.load(DI + rk, mask=mk, other=0)
        # sorted degrees: the tile is touched iff its first input connects to its last output
        d_last = tl.max(tl.where(mn, dout, -1), axis=0)
        d_first = tl.load(DI + pid_k * BLOCK_K)
        if STRICT:
            touched = d_first < d_last
        else:
            touched = d_first <= d_last
        m_end = tl.where(touched, M, 0)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mm = rm < M
            rm64 = rm.to(tl.int64)
            gt = tl.load(G + rm64[None, :] * sgm + rn[:, None] * sgn, mask=mm[None, :] & mn[:, None], other=0.0)
            x = tl.load(X + rm64[:, None] * sxm + rk[None, :] * sxk, mask=mm[:, None] & mk[None, :], other=0.0)
            acc += tl.dot(gt.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        if STRICT:
            conn = din[None, :] < dout[:, None]
        else:
            conn = din[None, :] <= dout[:, None]
        acc = tl.where(conn, acc, 0.0)
        tl.store(GW + rn[:, None] * swn + rk[None, :] * swk, acc.to(GW.dtype.element_ty),
                 mask=mn[:, None] & mk[None, :])

    _kernels = (triton, fwd_kernel, bwd_x_kernel, bwd_w_kernel)
    return _kernels


def _cdiv(a, b):
    return (a + b - 1) // b


def masked_linear_fwd(x, weight, bias, in_degrees, out_degrees, strict):
    triton, fwd_kernel, _, _ = _load()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    di = in_degrees.contiguous()
    do = out_degrees.contiguous()
    n_tiles = _cdiv(n, BN)
    last = torch.clamp(torch.arange(n_tiles, device=x.device) * BN + BN - 1, max=n - 1)
    k_end = torch.searchsorted(di, do[last], right=not strict).to(torch.int32)
    b = bias if bias is not None else y
    fwd_kernel[(_cdiv(m, BM), n_tiles)](x, weight, b, di, do, k_end, y, m, n, k, x.stride(0), x.stride(1),
                                        weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
                                        HAS_BIAS=bias is not None, STRICT=bool(strict), BLOCK_M=BM, BLOCK_N=BN,
                                        BLOCK_K=BK)
    return y


def masked_linear_bwd(grad, x, weight, in_degrees, out_degrees, strict, need_x=True, need_w=True, need_b=True):
    triton, _, bwd_x_kernel, bwd_w_kernel = _load()
    m, k = x.shape
    n = weight.shape[0]
    di = in_degrees.contiguous()
    do = out_degrees.contiguous()
    gx = gw = gb = None
    if need_x:
        gx = torch.empty_like(x, memory_format=torch.contiguous_format)
        if m and k:
            k_tiles = _cdiv(k, BK)
            first = torch.arange(k_tiles, device=x.device) * BK
            n_start = torch.searchsorted(do, di[first], right=bool(strict)).to(torch.int32)
            bwd_x_kernel[(_cdiv(m, BM), k_tiles)](grad, weight, di, do, n_start, gx, m, n, k, grad.stride(0),
                                                  grad.stride(1), weight.stride(0), weight.stride(1), gx.stride(0),
                                                  gx.stride(1), STRICT=bool(strict), BLOCK_M=BM, BLOCK_N=BN,
                                                  BLOCK_K=BK)
        else:
            gx.zero_()
    if need_w:
        gw = torch.empty_like(weight, memory_format=torch.contiguous_format)
        if n and k:
            bwd_w_kernel[(_cdiv(n, BN), _cdiv(k, BK))](grad, x, di, do, gw, m, n, k, grad.stride(0), grad.stride(1),
                                                       x.stride(0), x.stride(1), gw.stride(0), gw.stride(1),
                                                       STRICT=bool(strict), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    if need_b:
        gb = grad.sum(0, dtype=torch.float32).to(weight.dtype) if grad.dtype in (torch.float16, torch.bfloat16) \
            else grad.sum(0)
    return gx, gw, gb
