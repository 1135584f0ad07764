"""Persistent Triton kernel of the one-pass MADE inversion (MAF sampling, IAF density).

One program owns a tile of ``BLOCK_B`` samples and runs the whole degree loop for it: for each
dimension k it computes the two outputs of degree k + 1 (raw scale, shift) from the last hidden
layer's units of degree <= k, solves ``u_k = (y_k - t) * exp(-log s)``, then the units of degree
k + 1 of every hidden layer (a slice of rows fed by a prefix of the layer below). Activations
live feature-major in a scratch buffer ``[D + sum H, B]`` (fp32); the program's own stores are made
visible to its later loads with ``tl.debug_barrier()``. Every staircase weight is read once per
tile, so the arithmetic is that of one masked pass and there is one launch instead of D passes of
several kernels.

Weights of all layers are packed into one fp32 buffer (row-major, per-layer offsets) so any number
of hidden layers runs through one kernel. Math uses only exp/log/where (interpreter-safe). No
autograd: callers needing gradients use the sliced PyTorch path.
"""
from __future__ import annotations

import torch

SCALE_IDS = {"exp": 0, "softclamp": 1, "sigmoid": 2}
BLOCK_B, BLOCK_R, BLOCK_K = 32, 16, 16
_kernel = None


def _load():
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def solve_kernel(Y, W, Bias, WOFF, BOFF, LDW, HOFF, ENDS, S, U, LD, B, D, L, n_cols,
                     ACT: tl.constexpr, SCALE: tl.constexpr, clamp, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = rb < B
        rb64 = rb.to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        ld = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for k in range(0, D):
            # --- outputs of dimension k: rows 2k, 2k + 1 of the last layer
            w_off = tl.load(WOFF + L)
            b_off = tl.load(BOFF + L)
            ldw = tl.load(LDW + L)
            src = tl.load(HOFF + L)
            K = tl.load(ENDS + L * (D + 1) + k)
            r_mask = rr < 2
            acc = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_mask = kk < K
                w = tl.load(W + w_off + (2 * k + rr)[:, None].to(tl.int64) * ldw + kk[None, :],
                            mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                h = tl.load(S + (src + kk)[:, None].to(tl.int64) * n_cols + rb64[None, :],
                            mask=k_mask[:, None] & b_mask[None, :], other=0.0)
                acc += tl.dot(w, h, input_precision="ieee")
            acc += tl.load(Bias + b_off + 2 * k + rr, mask=r_mask, other=0.0)[:, None]
            raw = tl.sum(tl.where(rr[:, None] == 0, acc, 0.0), axis=0)
            shift = tl.sum(tl.where(rr[:, None] == 1, acc, 0.0), axis=0)
            if SCALE == 0:
                log_s = raw
            elif SCALE == 1:
                log_s = clamp * (1.0 - 2.0 / (tl.exp(2.0 * raw / clamp) + 1.0))  # clamp * tanh(raw / clamp)
            else:
                uu = raw + 2.0
                log_s = tl.minimum(uu, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(uu)))
            y = tl.load(Y + rb64 * D + k, mask=b_mask, other=0.0).to(tl.float32)
            u = (y - shift) * tl.exp(-log_s)
            ld += log_s
            tl.store(S + k * n_cols + rb64, u, mask=b_mask)
            tl.store(U + rb64 * D + k, u.to(U.dtype.element_ty), mask=b_mask)
            tl.debug_barrier()
            # --- hidden units of degree k + 1, layer by layer
            for l in range(0, L):
                a = tl.load(ENDS + (l + 1) * (D + 1) + k)
                e = tl.load(ENDS + (l + 1) * (D + 1) + k + 1)
                w_off = tl.load(WOFF + l)
                b_off = tl.load(BOFF + l)
                ldw = tl.load(LDW + l)
                src = tl.load(HOFF + l)
                dst = tl.load(HOFF + l + 1)
                K = tl.load(ENDS + l * (D + 1) + k + 1)
                for r0 in range(a, e, BLOCK_R):
                    rows = r0 + rr
                    r_mask = rows < e
                    acc = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        kk = k0 + tl.arange(0, BLOCK_K)
                        k_mask = kk < K
                        w = tl.load(W + w_off + rows[:, None].to(tl.int64) * ldw + kk[None, :],
                                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                        h = tl.load(S + (src + kk)[:, None].to(tl.int64) * n_cols + rb64[None, :],
                                    mask=k_mask[:, None] & b_mask[None, :], other=0.0)
                        acc += tl.dot(w, h, input_precision="ieee")
                    acc += tl.load(Bias + b_off + rows, mask=r_mask, other=0.0)[:, None]
                    if ACT == 0:
                        acc = tl.maximum(acc, 0.0)
                    else:
                        acc = 1.0 - 2.0 / (tl.exp(2.0 * acc) + 1.0)  # tanh without tl.tanh
                    tl.store(S + (dst + rows)[:, None].to(tl.int64) * n_cols + rb64[None, :], acc,
                             mask=r_mask[:, None] & b_mask[None, :])
                tl.debug_barrier()
        tl.store(LD + rb64, (-ld).to(LD.dtype.element_ty), mask=b_mask)

    _kernel = solve_kernel
    return _kernel


def made_solve(y, weights, biases, ends, activation, scale, clamp):
    """``(u, logabsdet)`` solving ``y = u * s(raw(u)) + t(u)``; arguments as ``flowops::made_solve``
    (``ends``: per hidden layer, the number of units of degree <= k for k = 0..D)."""
    kernel = _load()
    b, d = y.shape
    dev = y.device
    n_layers = len(weights) - 1
    wflat = torch.cat([w.reshape(-1).float() for w in weights])
    bflat = torch.cat([bb.reshape(-1).float() for bb in biases])
    # scratch rows: the inputs u (row 0 of the tables) then each hidden layer; hoff[l] is the first row of
    # table entry l and ends row l counts its units of degree <= k (for the inputs: k)
    woff, boff, ldw, hoff = [], [], [], [0]
    ow = ob = 0
    row = d
    for i, w in enumerate(weights):
        woff.append(ow)
        boff.append(ob)
        ldw.append(w.shape[1])
        ow += w.numel()
        ob += w.shape[0]
        if i < n_layers:
            hoff.append(row)
            row += w.shape[0]
    as_i64 = dict(dtype=torch.int64, device=dev)
    ends_t = torch.tensor([list(range(d + 1))] + [list(e) for e in ends], **as_i64).reshape(-1)
    scratch = torch.empty((row, max(b, 1)), dtype=torch.float32, device=dev)
    u = torch.empty_like(y)
    logdet = torch.empty(b, dtype=y.dtype, device=dev)
    if b == 0:
        return u, logdet
    grid = (triton_cdiv(b, BLOCK_B),)
    kernel[grid](y.contiguous(), wflat, bflat, torch.tensor(woff, **as_i64), torch.tensor(boff, **as_i64),
                 torch.tensor(ldw, **as_i64), torch.tensor(hoff, **as_i64), ends_t, scratch, u, logdet,
                 b, d, n_layers, scratch.shape[1], ACT=0 if activation == "relu" else 1, SCALE=SCALE_IDS[scale],
                 clamp=float(clamp), BLOCK_B=BLOCK_B, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return u, logdet


def triton_cdiv(a, b):
    return (a + b - 1) // b
