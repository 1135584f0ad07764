"""MADE's masked linear layer without a mask tensor: ``y = x @ (W * M)^T + b`` where the
connectivity ``M[o, i] = in_degrees[i] < out_degrees[o]`` (``strict``) or ``<=`` is implied by
the degrees.

When both degree vectors are sorted (non-decreasing), ``M`` is a staircase: output row ``o``
sees a prefix of the inputs, and the prefix grows with ``o``. The CPU/fallback kernel never reads,
multiplies or writes the all-zero tiles to the right of the staircase, forward and backward. The
forward covers the staircase with disjoint rectangles (:func:`_rect_cover`): the lower half of an
output range is fully connected to the input prefix its first row sees (one large product), then
each half recursively, down to leaves of ``FWD_LEAF`` rows where only the thin band at the stair
edge is masked (built from the degrees of that band). grad_x runs by blocks of ``BLOCK`` input
columns over the output rows that see them (fully connected rows straight from the weight, band
rows from a small masked copy); grad_weight by blocks of ``GW_BLOCK`` input columns, only inside
the staircase, and is zero outside the connectivity by construction. The products are
``addmm_`` on strided views (BLAS with leading dimensions, no copies of x or of the outputs).

On CUDA the Triton kernels in ``flowops.kernels.masked_linear`` do the same with per-tile
bounds on the reduction loop (as causal attention does). Degrees that are not sorted run the
reference (a dense mask). ``FLOWOPS_BACKEND=reference`` forces the reference everywhere.

The op is registered as ``flowops::masked_linear`` (with a fake kernel and a Python autograd
formula), so it traces under ``torch.compile(fullgraph=True)``. Its backward is first-order
only (a second backward raises; use the reference backend for higher derivatives).
"""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference
from ._checks import check_tensors

BLOCK = 128  # output rows per staircase block on CPU (forward), input columns per grad_x block
GW_BLOCK = 256  # input columns per grad_weight block on CPU
FWD_LEAF = 64  # output rows per masked leaf of the forward's rectangle cover
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _is_sorted(d: torch.Tensor) -> bool:
    return d.numel() < 2 or bool((d[1:] >= d[:-1]).all())


def staircase_plan(in_degrees: torch.Tensor, out_degrees: torch.Tensor, strict: bool, block: int | None = None):
    """``[(o0, o1, p0, p1)]``: output block, fully connected input prefix, connected prefix (sorted degrees)."""
    n_out = out_degrees.numel()
    if n_out == 0:
        return []
    block = BLOCK if block is None else int(block)
    starts = torch.arange(0, n_out, block, device=out_degrees.device)
    ends = torch.clamp(starts + block, max=n_out) - 1
    lo, hi = out_degrees[starts].contiguous(), out_degrees[ends].contiguous()
    ind = in_degrees.contiguous()
    right = not strict  # strict: count in < d (left); otherwise in <= d (right)
    p0 = torch.searchsorted(ind, lo, right=right)
    p1 = torch.searchsorted(ind, hi, right=right)
    rows = torch.stack((starts, ends + 1, p0, p1)).t().tolist()
    return [tuple(r) for r in rows]


def _col_plan(in_degrees, out_degrees, strict, block_in, is_sorted):
    """``[(c0, c1, o_first, o_full)]`` per input-column block, with the masks of the band rows."""
    cols, bands = [], []
    n_in = in_degrees.numel()
    if is_sorted and n_in and out_degrees.numel():
        c_starts = torch.arange(0, n_in, block_in, device=in_degrees.device)
        c_last = torch.clamp(c_starts + block_in, max=n_in) - 1
        od = out_degrees.contiguous()
        o_first = torch.searchsorted(od, in_degrees[c_starts].contiguous(), right=bool(strict))
        o_full = torch.searchsorted(od, in_degrees[c_last].contiguous(), right=bool(strict))
        for c0, c1, of, ofu in torch.stack((c_starts, c_last + 1, o_first, o_full)).t().tolist():
            cols.append((c0, c1, of, ofu))
            bands.append(reference.degree_mask(in_degrees[c0:c1], out_degrees[of:ofu], strict) if ofu > of else None)
    return cols, bands


def _rect_cover(pre, leaf):
    """Cover the staircase ``M[o, :pre[o]]`` (``pre`` non-decreasing) with disjoint rectangles
    ``(o0, o1, c0, c1, masked)``: recursively, rows ``[m, b)`` of ``[a, b)`` (``m`` the middle) are
    fully connected to the columns ``[c, pre[m])`` (one large product); the two halves cover the
    rest, down to leaves of ``leaf`` rows that multiply their band ``[c, pre[b - 1])`` masked.
    Same area as blocks of ``leaf`` rows, with most of it in a few large products."""
    out = []
    stack = [(0, len(pre), 0)]
    while stack:
        a, b, c = stack.pop()
        if b - a <= leaf:
            if pre[b - 1] > c:
                out.append((a, b, c, pre[b - 1], True))
            continue
        m = a + ((b - a) // 2 + leaf - 1) // leaf * leaf
        if pre[m] > c:
            out.append((m, b, c, pre[m], False))
        stack.append((m, b, max(c, pre[m])))
        stack.append((a, m, c))
    return out


class _Plan:
    """The staircase of one (in_degrees, out_degrees, strict) triple, with the band masks."""

    def __init__(self, in_degrees, out_degrees, strict, block_in=None):
        block_in = BLOCK if block_in is None else int(block_in)
        self.sorted = _is_sorted(in_degrees) and _is_sorted(out_degrees)
        self.blocks = staircase_plan(in_degrees, out_degrees, strict) if self.sorted else []
        # grad_x (blocks of block_in columns) and grad_weight (blocks of GW_BLOCK columns) by
        # input-column blocks [c0, c1): rows [o_full, out) see the whole block, rows [o_first, o_full)
        # a part of it (masked band), rows before o_first nothing
        self.cols, self.col_bands = _col_plan(in_degrees, out_degrees, strict, block_in, self.sorted)
        self.wcols, self.wcol_bands = _col_plan(in_degrees, out_degrees, strict, GW_BLOCK, self.sorted)
        # forward: a rectangle cover of the staircase (large fully connected products + masked leaves)
        self.rects = []
        if self.sorted and in_degrees.numel() and out_degrees.numel():
            pre = torch.searchsorted(in_degrees.contiguous(), out_degrees.contiguous(), right=not strict).tolist()
            for o0, o1, c0, c1, masked in _rect_cover(pre, FWD_LEAF):
                band = reference.degree_mask(in_degrees[c0:c1], out_degrees[o0:o1], strict) if masked else None
                self.rects.append((o0, o1, c0, c1, band))
        # one block (small layers): the whole connected prefix [0, p1) with its mask, in one product
        self.single = None
        if len(self.blocks) == 1:
            p1 = self.blocks[0][3]
            self.single = (p1, reference.degree_mask(in_degrees[:p1], out_degrees, strict))


_PLANS: dict = {}
_MAX_PLANS = 512


def _plan(in_degrees, out_degrees, strict) -> _Plan:
    # The cache entry holds the degree tensors themselves, so their storage (and data_ptr) cannot be
    # reused by another tensor while the entry lives; in-place edits bump the version in the key.
    key = (in_degrees.data_ptr(), out_degrees.data_ptr(), in_degrees._version, out_degrees._version,
           in_degrees.numel(), out_degrees.numel(), in_degrees.device, bool(strict))
    hit = _PLANS.get(key)
    if hit is not None:
        return hit[0]
    plan = _Plan(in_degrees, out_degrees, strict)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (plan, in_degrees, out_degrees)
    return plan


def _fwd_blocked(x, weight, bias, plan):
    n, n_out = x.shape[0], weight.shape[0]
    if plan.single is not None and n > 0:
        p1, m = plan.single
        w = weight[:, :p1] * m
        return torch.addmm(bias, x[:, :p1], w.t()) if bias is not None else torch.mm(x[:, :p1], w.t())
    if bias is not None:
        y = x.new_empty((n, n_out))
        y.copy_(bias.expand(n, n_out))
    else:
        y = x.new_zeros((n, n_out))
    if n == 0:
        return y
    for o0, o1, c0, c1, band in plan.rects:
        w = weight[o0:o1, c0:c1]
        if band is not None:  # a leaf: a small masked copy of its band
            w = w * band
        y[:, o0:o1].addmm_(x[:, c0:c1], w.t())  # a strided view: BLAS writes it in place (leading dimension n_out)
    return y


def _bwd_blocked(grad, x, weight, plan, need_x, need_w, need_b):
    if plan.single is not None and x.shape[0] > 0:
        p1, m = plan.single
        n_in = x.shape[1]
        gx = gw = None
        if need_x:
            gx = grad.mm(weight[:, :p1] * m)
            if p1 < n_in:
                gx = torch.nn.functional.pad(gx, (0, n_in - p1))
        if need_w:
            gw = grad.t().mm(x[:, :p1]).mul_(m)
            if p1 < n_in:
                gw = torch.nn.functional.pad(gw, (0, n_in - p1))
        return gx, gw, (grad.sum(0) if need_b else None)
    if x.shape[0] == 0:
        return (x.new_zeros(x.shape) if need_x else None, weight.new_zeros(weight.shape) if need_w else None,
                grad.sum(0) if need_b else None)
    n_out = grad.shape[1]
    # Every element of gx and gw is written exactly once (products with beta=0 into strided views,
    # or zero_ where nothing connects), so the buffers start uninitialized.
    gx = gw = None
    if need_x:
        gx = x.new_empty(x.shape)
        for (c0, c1, of, ofu), band in zip(plan.cols, plan.col_bands):
            out = gx[:, c0:c1]
            if of >= n_out:  # no output sees these inputs
                out.zero_()
                continue
            # rows [ofu, out) see the whole column block: straight from weight, no copy
            if ofu < n_out:
                out.addmm_(grad[:, ofu:], weight[ofu:, c0:c1], beta=0)
            else:
                out.zero_()
            if band is not None:  # rows [of, ofu): a small masked copy of the band
                out.addmm_(grad[:, of:ofu], weight[of:ofu, c0:c1] * band)
    if need_w:
        gw = weight.new_empty(weight.shape)
        for (c0, c1, of, ofu), band in zip(plan.wcols, plan.wcol_bands):
            if of > 0:
                gw[:of, c0:c1].zero_()  # outside the connectivity
            if of >= n_out:
                continue
            blk = gw[of:, c0:c1]
            blk.addmm_(grad[:, of:].t(), x[:, c0:c1], beta=0)
            if band is not None:
                blk[:ofu - of].mul_(band)
    gb = grad.sum(0) if need_b else None
    return gx, gw, gb


def _use_triton(x):
    forced = _backend.get_backend()
    if forced == "reference":
        return False
    if x.device.type == "cuda":
        return _backend.has_triton()
    return forced == "triton" and _backend.select(x.device) == "triton"


def _impl_fwd(x, weight, bias, in_degrees, out_degrees, strict):
    plan = _plan(in_degrees, out_degrees, strict)
    if _backend.get_backend() == "reference" or not plan.sorted:
        return reference.masked_linear(x, weight, bias, in_degrees, out_degrees, strict).contiguous()
    if _use_triton(x):
        from ..kernels import masked_linear as k

        return k.masked_linear_fwd(x, weight, bias, in_degrees, out_degrees, strict)
    return _fwd_blocked(x, weight, bias, plan)


def _impl_bwd(grad, x, weight, in_degrees, out_degrees, strict, need_x, need_w, need_b):
    plan = _plan(in_degrees, out_degrees, strict)
    if _backend.get_backend() == "reference" or not plan.sorted:
        m = reference.degree_mask(in_degrees, out_degrees, strict).to(weight.dtype)
        wm = weight * m
        gx = grad @ wm if need_x else None
        gw = (grad.t() @ x) * m if need_w else None
        gb = grad.sum(0) if need_b else None
    elif _use_triton(x):
        from ..kernels import masked_linear as k

        gx, gw, gb = k.masked_linear_bwd(grad.contiguous(), x, weight, in_degrees, out_degrees, strict,
                                         need_x, need_w, need_b)
    else:
        gx, gw, gb = _bwd_blocked(grad, x, weight, plan, need_x, need_w, need_b)
    # custom ops return tensors, never None
    gx = x.new_zeros(0) if gx is None else gx
    gw = weight.new_zeros(0) if gw is None else gw
    gb = weight.new_zeros(0) if gb is None else gb
    return gx, gw, gb


@torch.library.custom_op("flowops::masked_linear", mutates_args=())
def _op_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_degrees: torch.Tensor,
            out_degrees: torch.Tensor, strict: bool) -> torch.Tensor:
    return _impl_fwd(x, weight, bias, in_degrees, out_degrees, strict)


@torch.library.custom_op("flowops::masked_linear_bwd", mutates_args=())
def _op_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, in_degrees: torch.Tensor,
            out_degrees: torch.Tensor, strict: bool, need_x: bool, need_w: bool,
            need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl_bwd(grad, x, weight, in_degrees, out_degrees, strict, need_x, need_w, need_b)


@_op_fwd.register_fake
def _(x, weight, bias, in_degrees, out_degrees, strict):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_op_bwd.register_fake
def _(grad, x, weight, in_degrees, out_degrees, strict, need_x, need_w, need_b):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty((weight.shape[0],) if need_b else (0,)))


def _setup(ctx, inputs, output):
    x, weight, bias, in_degrees, out_degrees, strict = inputs
    ctx.save_for_backward(x, weight, in_degrees, out_degrees)
    ctx.strict = strict
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    if torch.is_grad_enabled():
        raise RuntimeError("flowops.masked_linear: higher-order gradients (backward with create_graph=True) are not "
                           "supported by the fused kernels; run the model under flowops.use_backend('reference')")
    x, weight, in_degrees, out_degrees = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    gx, gw, gb = torch.ops.flowops.masked_linear_bwd(grad, x, weight, in_degrees, out_degrees, ctx.strict,
                                                     nx, nw, nb and ctx.has_bias)
    return (gx if nx else None, gw if nw else None, gb if (nb and ctx.has_bias) else None, None, None, None)


_op_fwd.register_autograd(_backward, setup_context=_setup)


class _MaskedLinearEager(torch.autograd.Function):
    """The eager CPU path without the custom-op dispatch overhead (torch.compile uses the op)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        ctx.save_for_backward(x, weight)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        return _fwd_blocked(x, weight, bias, plan)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("flowops.masked_linear: higher-order gradients (backward with create_graph=True) are "
                               "not supported by the fused kernels; run the model under "
                               "flowops.use_backend('reference')")
        x, weight = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        gx, gw, gb = _bwd_blocked(grad, x, weight, ctx.plan, nx, nw, nb and ctx.has_bias)
        return gx, gw, gb, None


def _check(x, weight, bias, in_degrees, out_degrees):
    name = "masked_linear"
    check_tensors(name, x=x, weight=weight, in_degrees=in_degrees, out_degrees=out_degrees)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: x must be a floating tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: weight dtype must match x ({x.dtype}), got {weight.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [batch, in_features], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: weight must be [out_features, {x.shape[1]}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    for arg, deg, n in (("in_degrees", in_degrees, weight.shape[1]), ("out_degrees", out_degrees, weight.shape[0])):
        if deg.dtype not in _INTS:
            raise TypeError(f"{name}: {arg} must be an integer tensor, got {deg.dtype}")
        if tuple(deg.shape) != (n,):
            raise ValueError(f"{name}: {arg} must have shape ({n},), got {tuple(deg.shape)}")
        if deg.device != x.device:
            raise ValueError(f"{name}: {arg} must be on x's device ({x.device}), got {deg.device}")
    if weight.device != x.device:
        raise ValueError(f"{name}: weight must be on x's device ({x.device}), got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"{name}: bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_degrees: torch.Tensor,
                  out_degrees: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """``F.linear(x, weight * M, bias)`` with ``M[o, i] = in_degrees[i] < out_degrees[o]`` if ``strict``
    (MADE's output layer) else ``<=`` (hidden layers); no mask tensor is built or multiplied.

    Args:
        x: ``[B, in]``; weight: ``[out, in]``; bias: ``[out]`` or None (same dtype and device).
        in_degrees, out_degrees: integer tensors ``[in]`` and ``[out]``. Sorted (non-decreasing)
            degrees take the staircase kernels that skip the zero tiles; unsorted ones run the
            reference (correct, dense).

    Returns ``[B, out]``. Gradients reach x, weight (zero outside the connectivity) and bias.
    """
    _check(x, weight, bias, in_degrees, out_degrees)
    if in_degrees.dtype != torch.int64:
        in_degrees = in_degrees.long()
    if out_degrees.dtype != torch.int64:
        out_degrees = out_degrees.long()
    if _backend.get_backend() == "reference":
        return reference.masked_linear(x, weight, bias, in_degrees, out_degrees, bool(strict))
    if not torch.compiler.is_compiling() and not _use_triton(x):
        plan = _plan(in_degrees, out_degrees, bool(strict))
        if plan.sorted:
            return _MaskedLinearEager.apply(x, weight, bias, plan)
    return torch.ops.flowops.masked_linear(x, weight, bias, in_degrees, out_degrees, bool(strict))


def masked_linear_unchecked(x, weight, bias, in_degrees, out_degrees, strict: bool):
    """:func:`masked_linear` without argument validation, for layers that validated their input
    already (int64 degree buffers, matching shapes). Same dispatch and results."""
    if _backend.get_backend() == "reference":
        return reference.masked_linear(x, weight, bias, in_degrees, out_degrees, strict)
    if not torch.compiler.is_compiling() and x.device.type == "cpu" and _backend.get_backend() != "triton":
        plan = _plan(in_degrees, out_degrees, strict)
        if plan.sorted:
            return _MaskedLinearEager.apply(x, weight, bias, plan)
    return torch.ops.flowops.masked_linear(x, weight, bias, in_degrees, out_degrees, strict)


__all__ = ["masked_linear", "staircase_plan"]
