"""Triton kernels of the fused affine / additive coupling, forward and backward.

The math is that of the C++ CPU kernels (``csrc/cpu/affine_coupling.cpp``)::

    forward : y = x * s + t                 logdet =  sum log s
    inverse : y = (x - t) / s               logdet = -sum log s
    log s   : exp -> r;  softclamp -> c * tanh(r / c);  sigmoid -> logsigmoid(r + 2)
    additive: y = x +- t (params is the shift alone), logdet = 0

where ``x`` is the op's input in both directions and ``params`` holds, per sample, the raw
scale ``r`` in channels ``[0, C)`` and the shift ``t`` in ``[C, 2C)``. Positions where the
flat mask is nonzero pass through (y = x) and add nothing to the log-det.

Layout: a sample is one row of ``N = C * prod(spatial)`` elements. The inner dimensions
must be contiguous (they are copied otherwise); the batch stride is free, so a channel
slice ``x[:, k:]`` of a contiguous NCHW tensor or the first half of a conditioner output
runs without a copy. One program handles a ``[ROWS, COLS]`` tile: COLS columns of ROWS
rows (ROWS > 1 only when rows are short, as in low-dimensional flows). It loads, upcasts
to fp32 (fp64 for fp64 inputs), computes and casts on store. The log-det is written as one
partial sum per (row, column block) and summed afterwards with torch: no atomics, so the
result is deterministic.

Backward is one pass: it reads grad_y, x and the raw scale (the shift too for the inverse)
and writes grad_x and grad_params (raw-scale gradient and shift gradient).

Triton is imported on the first launch only (:func:`_load`), so importing this module
needs neither Triton nor a GPU. The kernels use nothing beyond ``exp``, ``log``, ``abs``,
``minimum``/``maximum`` and ``where`` (``tanh`` and ``log1p`` are built from them), which
every Triton 3.x release and the interpreter provide.
"""
from __future__ import annotations

import torch

from . import _math

SCALE_IDS = {"exp": 0, "softclamp": 1, "sigmoid": 2, "additive": 3}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

TILE = 1024          # elements per program (ROWS * COLS) for rows up to TILE long
MAX_GRID_Y = 65535   # CUDA limit of the second grid dimension (column blocks of a row)
_FP32_MAX = float(torch.finfo(torch.float32).max)

tl = None  # triton.language, bound by _load()
_state: dict = {}


# ---------------------------------------------------------------------------------------
# Device functions and kernels. They stay plain functions until _load() wraps them with
# triton.jit (and rebinds the module names, through which the kernels call the helpers).
# ---------------------------------------------------------------------------------------

_tanh = None  # the shared device tanh (kernels/_math.py), bound by _load()


def _log1p_unit(w):
    # log(1 + w) for w in [0, 1], accurate for small w: log(v) * w / (v - 1) with v = 1 + w
    # cancels the rounding of v (Goldberg); v == 1 means w is below half an ulp of 1.
    v = 1.0 + w
    d = v - 1.0
    is_one = d == 0.0
    return tl.where(is_one, w, tl.log(v) * (w / tl.where(is_one, 1.0, d)))


def _log_scale(r, c, SCALE: tl.constexpr):
    # log s of the raw scale r and its derivative d(log s)/dr (unused for exp, where it is 1).
    if SCALE == 1:  # softclamp: c * tanh(r / c)
        th = _tanh(r / c)
        logs = th * c
        g = 1.0 - th * th
    elif SCALE == 2:  # sigmoid: log sigmoid(u) = min(u, 0) - log1p(exp(-|u|)), u = r + 2
        u = r + 2.0
        l1p = _log1p_unit(tl.exp(-tl.abs(u)))
        logs = tl.minimum(u, 0.0) - l1p
        g = tl.exp(-tl.maximum(u, 0.0) - l1p)  # 1 - sigmoid(u) = sigmoid(-u), no cancellation
    else:  # exp
        logs = r
        g = r
    return logs, g


def _coupling_fwd_kernel(x_ptr, p_ptr, m_ptr, y_ptr, part_ptr,
                         B, N, sx, sp, n_blocks, clamp_hi, clamp_lo,
                         SCALE: tl.constexpr, INVERSE: tl.constexpr, HAS_MASK: tl.constexpr,
                         CT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = pid_c * COLS + tl.arange(0, COLS)
    rmask = rows < B
    cmask = cols < N
    inb = rmask[:, None] & cmask[None, :]
    x_off = rows[:, None] * sx + cols[None, :]
    p_off = rows[:, None] * sp + cols[None, :]
    y_off = rows[:, None] * N + cols[None, :]

    x = tl.load(x_ptr + x_off, mask=inb, other=0.0).to(CT)
    if HAS_MASK:
        keep = tl.load(m_ptr + cols, mask=cmask, other=0) != 0
        keep2 = keep[None, :] & inb
    if SCALE == 3:  # additive: params is the shift alone
        t = tl.load(p_ptr + p_off, mask=inb, other=0.0).to(CT)
        if INVERSE:
            out = x - t
        else:
            out = x + t
        if HAS_MASK:
            out = tl.where(keep2, x, out)
        tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=inb)
    else:
        c = tl.cast(clamp_hi, CT) + tl.cast(clamp_lo, CT)
        r = tl.load(p_ptr + p_off, mask=inb, other=0.0).to(CT)
        t = tl.load(p_ptr + p_off + N, mask=inb, other=0.0).to(CT)
        logs, g = _log_scale(r, c, SCALE)
        if INVERSE:
            out = (x - t) * tl.exp(-logs)
        else:
            out = x * tl.exp(logs) + t
        if HAS_MASK:
            out = tl.where(keep2, x, out)
            logs = tl.where(keep2, 0.0, logs)
        tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=inb)
        logs = tl.where(inb, logs, 0.0)
        s = tl.sum(logs, axis=1)
        if INVERSE:
            s = -s
        tl.store(part_ptr + rows * n_blocks + pid_c, s.to(part_ptr.dtype.element_ty), mask=rmask)


def _coupling_bwd_kernel(gy_ptr, gld_ptr, x_ptr, p_ptr, m_ptr, gx_ptr, gp_ptr,
                         B, N, sgy, sgld, sx, sp, clamp_hi, clamp_lo,
                         SCALE: tl.constexpr, INVERSE: tl.constexpr, HAS_MASK: tl.constexpr,
                         CT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = pid_c * COLS + tl.arange(0, COLS)
    rmask = rows < B
    cmask = cols < N
    inb = rmask[:, None] & cmask[None, :]
    gy_off = rows[:, None] * sgy + cols[None, :]
    gx_off = rows[:, None] * N + cols[None, :]
    p_off = rows[:, None] * sp + cols[None, :]

    go = tl.load(gy_ptr + gy_off, mask=inb, other=0.0).to(CT)
    if HAS_MASK:
        keep = tl.load(m_ptr + cols, mask=cmask, other=0) != 0
        keep2 = keep[None, :] & inb
    if SCALE == 3:  # additive: grad_params is the shift gradient alone, [B, N]
        if INVERSE:
            gt = -go
        else:
            gt = go
        if HAS_MASK:
            gt = tl.where(keep2, 0.0, gt)
        tl.store(gx_ptr + gx_off, go.to(gx_ptr.dtype.element_ty), mask=inb)
        tl.store(gp_ptr + gx_off, gt.to(gp_ptr.dtype.element_ty), mask=inb)
    else:
        c = tl.cast(clamp_hi, CT) + tl.cast(clamp_lo, CT)
        x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=inb, other=0.0).to(CT)
        r = tl.load(p_ptr + p_off, mask=inb, other=0.0).to(CT)
        gl = tl.load(gld_ptr + rows * sgld, mask=rmask, other=0.0).to(CT)[:, None]
        logs, g = _log_scale(r, c, SCALE)
        if INVERSE:
            t = tl.load(p_ptr + p_off + N, mask=inb, other=0.0).to(CT)
            inv_s = tl.exp(-logs)
            gx = go * inv_s
            gt = -gx
            gr = -(go * ((x - t) * inv_s) + gl)
        else:
            gx = go * tl.exp(logs)
            gt = go
            gr = gx * x + gl
        if SCALE != 0:
            gr = gr * g
        if HAS_MASK:
            gx = tl.where(keep2, go, gx)
            gt = tl.where(keep2, 0.0, gt)
            gr = tl.where(keep2, 0.0, gr)
        gp_off = rows[:, None] * (2 * N) + cols[None, :]
        tl.store(gx_ptr + gx_off, gx.to(gx_ptr.dtype.element_ty), mask=inb)
        tl.store(gp_ptr + gp_off, gr.to(gp_ptr.dtype.element_ty), mask=inb)
        tl.store(gp_ptr + gp_off + N, gt.to(gp_ptr.dtype.element_ty), mask=inb)


def _load():
    """Import triton and compile-wrap the kernels (once). Returns (fwd, bwd, tl)."""
    if not _state:
        import triton
        import triton.language as language

        g = globals()
        g["tl"] = language
        g["_tanh"] = _math.jitted_tanh()
        for name in ("_log1p_unit", "_log_scale"):
            g[name] = triton.jit(g[name])
        _state["fwd"] = triton.jit(_coupling_fwd_kernel)
        _state["bwd"] = triton.jit(_coupling_bwd_kernel)
        _state["cdiv"] = triton.cdiv
    return _state["fwd"], _state["bwd"], tl


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def block_config(B: int, N: int):
    """(ROWS, COLS, num_warps) for B rows of N elements: tiles of about TILE elements.

    Rows up to TILE long are covered by one power-of-two block of COLS >= N columns, with
    ROWS rows per program so short rows (2-D flows have N = 1) still fill a tile; longer
    rows are split into blocks of TILE columns (more if the row would need over 65535).
    """
    cols = min(_math.next_pow2(N), TILE)
    if -(-N // cols) > MAX_GRID_Y:
        cols = _math.next_pow2(-(-N // MAX_GRID_Y))
    rows = max(1, min(TILE // cols, _math.next_pow2(B)))
    warps = max(1, min(16, (rows * cols) // 256))
    return rows, cols, warps


def _rows(t: torch.Tensor):
    """``t`` viewed as [B, N] rows: (tensor, batch stride). Copies only if the inner dims are not contiguous."""
    expected = 1
    for d in range(t.dim() - 1, 0, -1):
        if t.size(d) != 1 and t.stride(d) != expected:
            t = t.contiguous()
            expected = t[0].numel() if t.size(0) else 0
            break
        expected *= t.size(d)
    stride = t.stride(0) if t.size(0) > 1 else expected
    return t, stride


def _compute_dtype(dtype, tl_):
    return tl_.float64 if dtype == torch.float64 else tl_.float32


def _logdet_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _split_clamp(clamp: float):
    # Triton passes Python floats as fp32; hi + lo carries a double clamp to the fp64 kernels.
    clamp = min(max(float(clamp), -_FP32_MAX), _FP32_MAX)  # beyond fp32 range a clamp is infinite anyway
    hi = float(torch.tensor(clamp, dtype=torch.float32))
    return hi, clamp - hi


def _check(x, params, mask, scale):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"affine_coupling_fwd: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"affine_coupling_fwd: params must be a torch.Tensor, got {type(params).__name__}")
    if scale not in SCALE_IDS:
        raise ValueError(f"affine_coupling (triton): scale must be one of {tuple(SCALE_IDS)}, got {scale!r}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"affine_coupling (triton): x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if params.dtype != x.dtype:
        raise TypeError(f"affine_coupling (triton): params dtype {params.dtype} does not match x dtype {x.dtype}")
    if params.device != x.device:
        raise ValueError(f"affine_coupling (triton): params must be on x's device ({x.device}), got {params.device}")
    if x.dim() < 2:
        raise ValueError(f"affine_coupling (triton): x must have a batch and a channel dimension, got shape "
                         f"{tuple(x.shape)}")
    factor = 1 if scale == "additive" else 2
    expected = (x.shape[0], factor * x.shape[1], *x.shape[2:])
    if tuple(params.shape) != expected:
        raise ValueError(f"affine_coupling (triton): params must have shape {expected} for x of shape "
                         f"{tuple(x.shape)} and scale {scale!r}, got {tuple(params.shape)}")
    B = x.shape[0]
    N = x[0].numel() if B else 0
    if 2 * N >= 2 ** 31:
        raise ValueError(f"affine_coupling (triton): a sample of x must hold under 2**30 elements, got {N}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"affine_coupling (triton): mask must be a tensor or None, got {type(mask).__name__}")
        if mask.device != x.device:
            raise ValueError(f"affine_coupling (triton): mask must be on x's device ({x.device}), got {mask.device}")
        if B and mask.numel() != N:
            raise ValueError(f"affine_coupling (triton): mask must hold one value per position of a sample ({N}), "
                             f"got {mask.numel()}")
    return B, N


def _flat_mask(mask):
    if mask is None:
        return None
    m = mask.reshape(-1)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return m.contiguous()


def _on_device(x):
    # Triton launches on the current CUDA device; follow the tensor's.
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return None


def affine_coupling_fwd(x, params, mask=None, scale="exp", clamp=2.0, inverse=False):
    """Fused coupling forward: ``(y, logdet)``.

    Args:
        x: ``[B, C, *spatial]`` (or ``[B, C]``), float16/bfloat16/float32/float64; inner dims
            contiguous (any batch stride).
        params: ``[B, 2C, *spatial]`` raw scale then shift, or ``[B, C, *spatial]`` shift for
            ``scale="additive"``; x's dtype and device.
        mask: None or a tensor of ``C * prod(spatial)`` elements, nonzero = pass-through.
        scale: ``"exp"``, ``"softclamp"``, ``"sigmoid"`` or ``"additive"``.
        clamp: the softclamp bound.
        inverse: apply ``(x - t) / s`` with log-det ``-sum log s``.

    Returns:
        ``y`` (contiguous, x's shape and dtype) and ``logdet`` ``[B]`` (float32 for half
        inputs, else x's dtype).
    """
    B, N = _check(x, params, mask, scale)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ld_dtype = _logdet_dtype(x.dtype)
    if B == 0 or N == 0 or scale == "additive":
        logdet = torch.zeros(B, dtype=ld_dtype, device=x.device)
        if B == 0 or N == 0:
            return y, logdet
    fwd, _, tl_ = _load()
    xr, sx = _rows(x)
    pr, sp = _rows(params)
    m = _flat_mask(mask)
    rows, cols, warps = block_config(B, N)
    grid = (-(-B // rows), -(-N // cols))
    n_blocks = grid[1]
    part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = y if scale == "additive" else torch.empty((B, n_blocks), dtype=part_dtype, device=x.device)
    hi, lo = _split_clamp(clamp)
    guard = _on_device(x)
    if guard is not None:
        with guard:
            fwd[grid](xr, pr, m, y, part, B, N, sx, sp, n_blocks, hi, lo,
                      SCALE=SCALE_IDS[scale], INVERSE=bool(inverse), HAS_MASK=m is not None,
                      CT=_compute_dtype(x.dtype, tl_), ROWS=rows, COLS=cols, num_warps=warps)
    else:
        fwd[grid](xr, pr, m, y, part, B, N, sx, sp, n_blocks, hi, lo,
                  SCALE=SCALE_IDS[scale], INVERSE=bool(inverse), HAS_MASK=m is not None,
                  CT=_compute_dtype(x.dtype, tl_), ROWS=rows, COLS=cols, num_warps=warps)
    if scale != "additive":
        logdet = part.view(B) if n_blocks == 1 else part.sum(1)
        if logdet.dtype != ld_dtype:
            logdet = logdet.to(ld_dtype)
    return y, logdet


def affine_coupling_bwd(grad_y, grad_logdet, x, params, mask=None, scale="exp", clamp=2.0, inverse=False):
    """One-pass backward of :func:`affine_coupling_fwd`: ``(grad_x, grad_params)``.

    ``x`` is the forward's input (in both directions); the scale is recomputed from ``params``.
    ``grad_y`` (x's shape) and ``grad_logdet`` (``[B]``) may be None (zero), expanded or strided.
    """
    B, N = _check(x, params, mask, scale)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gp = torch.empty(params.shape, dtype=params.dtype, device=params.device)
    if B == 0 or N == 0:
        return gx, gp
    _, bwd, tl_ = _load()
    if grad_y is None:
        grad_y = torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"affine_coupling_bwd: grad_y must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(grad_y.shape)}")
    if grad_logdet is None:
        grad_logdet = torch.zeros((), dtype=_logdet_dtype(x.dtype), device=x.device).expand(B)
    if grad_logdet.numel() != B:
        raise ValueError(f"affine_coupling_bwd: grad_logdet must have shape ({B},), got {tuple(grad_logdet.shape)}")
    grad_logdet = grad_logdet.reshape(B)
    sgld = grad_logdet.stride(0) if B > 1 else 1
    gyr, sgy = _rows(grad_y)
    xr, sx = _rows(x)
    pr, sp = _rows(params)
    m = _flat_mask(mask)
    rows, cols, warps = block_config(B, N)
    grid = (-(-B // rows), -(-N // cols))
    hi, lo = _split_clamp(clamp)
    args = (gyr, grad_logdet, xr, pr, m, gx, gp, B, N, sgy, sgld, sx, sp, hi, lo)
    meta = dict(SCALE=SCALE_IDS[scale], INVERSE=bool(inverse), HAS_MASK=m is not None,
                CT=_compute_dtype(x.dtype, tl_), ROWS=rows, COLS=cols, num_warps=warps)
    guard = _on_device(x)
    if guard is not None:
        with guard:
            bwd[grid](*args, **meta)
    else:
        bwd[grid](*args, **meta)
    return gx, gp


__all__ = ["affine_coupling_fwd", "affine_coupling_bwd", "block_config", "SCALE_IDS"]
