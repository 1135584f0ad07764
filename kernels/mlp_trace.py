"""Triton kernels of the fused CNF trace op: the activation passes of the primal and tangent streams.

The GEMMs of :func:`flowops.ops.mlp_trace` stay ``torch.mm`` (cuBLAS on a GPU); what these kernels
fuse is everything between them. A layer's pre-activations are one stacked ``[(1 + m) B, H]``
matrix: ``B`` primal rows ``a`` followed by ``m`` blocks of ``B`` tangent rows ``a_dot_k``.

* forward: ``X[:B] = sigma(a)``, ``X[B + k B:] = sigma'(a) * a_dot_k``;
* backward (given ``gX = G_next @ W``): ``G[:B] = gX[:B] sigma'(a) + sigma''(a) sum_k gX_k a_dot_k``,
  ``G_k = gX_k sigma'(a)``, and ``X`` recomputed for the weight gradient, in the same pass.

One program handles ``BLOCK`` consecutive elements of the primal ``[B, H]`` block and loops over the
``m`` tangent blocks, so ``sigma``, ``sigma'`` and ``sigma''`` are evaluated once per primal element
(not once per probe). Loads upcast to fp32 (fp64 stays fp64), 64-bit offsets. Activations: tanh (built
from ``exp``, see ``kernels/_math.py``), softplus and SiLU (sigmoid from ``exp``); no ``tl.tanh`` or
``log1p``, so the kernels run under the Triton interpreter on CPU.
"""
from __future__ import annotations

import torch

from . import _math

tl = None  # triton.language, bound by _load()
_tanh = None  # the shared device tanh, bound by _load()
_state: dict = {}
BLOCK = 1024
ACT_CODES = {"tanh": 0, "softplus": 1, "silu": 2}


def _derivs(a, ACT: tl.constexpr):
    if ACT == 0:
        h = _tanh(a)
        s1 = 1.0 - h * h
        s2 = -2.0 * h * s1
    else:
        e = tl.exp(-tl.abs(a))
        inv = 1.0 / (1.0 + e)
        sg = tl.where(a >= 0.0, inv, e * inv)  # sigmoid without overflow
        ds = sg * (1.0 - sg)
        if ACT == 1:
            # softplus = max(a, 0) + log(1 + e); log(1 + e) ~ e - e^2/2 for tiny e (no log1p in the interpreter)
            lg = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
            h = tl.maximum(a, 0.0) + lg
            s1 = sg
            s2 = ds
        else:
            h = a * sg
            s1 = sg + a * ds
            s2 = ds * (2.0 + a * (1.0 - 2.0 * sg))
    return h, s1, s2


def _primal_rows(p_ptr, x_ptr, N, ACT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of primal rows: stores h = act(a) and returns (offs, msk, s1, s2)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    msk = offs < N
    a = tl.load(p_ptr + offs, mask=msk, other=0.0).to(CT)
    h, s1, s2 = _derivs(a, ACT)
    tl.store(x_ptr + offs, h.to(x_ptr.dtype.element_ty), mask=msk)
    return offs, msk, s1, s2


def _act_fwd_kernel(p_ptr, x_ptr, N, M, ACT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    offs, msk, s1, s2 = _primal_rows(p_ptr, x_ptr, N, ACT, CT, BLOCK)
    for k in range(M):
        o = offs + (k + 1) * N
        ad = tl.load(p_ptr + o, mask=msk, other=0.0).to(CT)
        tl.store(x_ptr + o, (s1 * ad).to(x_ptr.dtype.element_ty), mask=msk)


def _act_bwd_kernel(gx_ptr, p_ptr, x_ptr, g_ptr, N, M, ACT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    offs, msk, s1, s2 = _primal_rows(p_ptr, x_ptr, N, ACT, CT, BLOCK)
    acc = tl.load(gx_ptr + offs, mask=msk, other=0.0).to(CT) * s1
    cross = tl.zeros([BLOCK], dtype=CT)
    for k in range(M):
        o = offs + (k + 1) * N
        ad = tl.load(p_ptr + o, mask=msk, other=0.0).to(CT)
        gh = tl.load(gx_ptr + o, mask=msk, other=0.0).to(CT)
        tl.store(x_ptr + o, (s1 * ad).to(x_ptr.dtype.element_ty), mask=msk)
        tl.store(g_ptr + o, (s1 * gh).to(g_ptr.dtype.element_ty), mask=msk)
        cross += gh * ad
    tl.store(g_ptr + offs, (acc + s2 * cross).to(g_ptr.dtype.element_ty), mask=msk)


def _load():
    if not _state:
        import triton
        import triton.language as language

        g = globals()
        g["tl"] = language
        g["_tanh"] = _math.jitted_tanh()
        g["_derivs"] = triton.jit(_derivs)
        g["_primal_rows"] = triton.jit(_primal_rows)
        _state["fwd"] = triton.jit(_act_fwd_kernel)
        _state["bwd"] = triton.jit(_act_bwd_kernel)
    return _state["fwd"], _state["bwd"], tl


def _prep(P, B, activation):
    if activation not in ACT_CODES:
        raise ValueError(f"activation must be one of {tuple(ACT_CODES)}, got {activation!r}")
    if P.dim() != 2 or B < 1 or P.shape[0] % B != 0:
        raise ValueError(f"stacked pre-activations must be [(1 + m) * {B}, H], got shape {tuple(P.shape)}")
    return P.contiguous(), B * P.shape[1], P.shape[0] // B - 1


def act_fwd(P: torch.Tensor, B: int, activation: str) -> torch.Tensor:
    """``[sigma(a); sigma'(a) a_dot_k]`` of the stacked pre-activations ``P [(1 + m) B, H]``."""
    P, N, M = _prep(P, B, activation)
    fwd, _, tl_ = _load()
    X = torch.empty_like(P)
    if N:
        ct = tl_.float64 if P.dtype == torch.float64 else tl_.float32
        fwd[(-(-N // BLOCK),)](P, X, N, M, ACT=ACT_CODES[activation], CT=ct, BLOCK=BLOCK)
    return X


def act_bwd(gX: torch.Tensor, P: torch.Tensor, B: int, activation: str):
    """``(X, G)``: the recomputed activations and the gradient of the stacked pre-activations."""
    P, N, M = _prep(P, B, activation)
    if gX.shape != P.shape:
        raise ValueError(f"gX must have the pre-activations' shape {tuple(P.shape)}, got {tuple(gX.shape)}")
    _, bwd, tl_ = _load()
    gX = gX.contiguous()
    X = torch.empty_like(P)
    G = torch.empty_like(P)
    if N:
        ct = tl_.float64 if P.dtype == torch.float64 else tl_.float32
        bwd[(-(-N // BLOCK),)](gX, P, X, G, N, M, ACT=ACT_CODES[activation], CT=ct, BLOCK=BLOCK)
    return X, G


__all__ = ["act_fwd", "act_bwd", "ACT_CODES"]
