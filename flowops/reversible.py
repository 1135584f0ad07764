"""Reversible recomputation: train stacks of exactly invertible transforms without storing activations.

Ordinary backprop keeps every intermediate tensor of every layer alive until the backward pass, so the
memory of a training step grows linearly with depth. An invertible layer does not need its input stored:
it can be rebuilt from the output. :class:`ReversibleSequential` (and ``Glow(..., reversible=True)``)
runs the forward pass with grad mode off, keeping only the final outputs and log-dets (plus the input,
which the drift check compares against). The backward pass walks the stack from the top: for each layer
it rebuilds the layer's input from its output, re-runs that one layer with grad mode on and
backpropagates through it, then frees it and moves on, so at most one layer's activations are alive at
a time.

Couplings (:class:`~flowops.nn.AffineCoupling`, :class:`~flowops.nn.AdditiveCoupling` and subclasses)
are handled without a separate inverse pass: their pass-through part is identical on both sides, so the
conditioner runs once in the backward on the output's pass-through part and its parameters serve both
the reconstruction of the transformed part (an elementwise inverse) and the local gradient.

Rules and options:

* Every layer must have an exact inverse: couplings, ActNorm, InvConv1x1, Squeeze, permutations, MAF/IAF
  layers, Glow's Split, ``Compose`` (walked child by child, ``GlowStep`` included) and nested
  ``ReversibleSequential``. Another :class:`~flowops.nn.Transform` can declare ``exact_inverse = True``
  (class or instance attribute); anything else raises ``TypeError`` at construction.
* Parameters receive ``.grad`` through ordinary autograd accumulation (they are inputs of the autograd
  node), so gradient hooks (DDP's included) fire, frozen parameters (``requires_grad=False``) are left
  alone and parameters shared between layers accumulate the sum.
* ActNorm's data-dependent initialization happens inside the (grad-free) forward exactly as in an
  ordinary forward: the first training-mode batch initializes each ActNorm from its own input, so the
  first step's gradients equal ordinary backprop's.
* With grad mode off (``torch.no_grad()``, evaluation), when nothing needs a gradient, or under
  ``torch.compile`` the stack runs as an ordinary ``Compose`` (no custom autograd node).
* The backward is first order (``create_graph=True`` raises). A second backward through the same graph
  raises a clear error unless the first one passed ``retain_graph=True`` (then the stack is rebuilt
  again, as ``gradcheck`` and ``torch.autograd.functional.jacobian`` need); a backward after the
  parameters were changed in place since the forward raises too (the rebuilt inputs would be wrong).
* Drift: rebuilt inputs accumulate rounding error. At every stored input (the bottom of the stack, and
  every ``checkpoint_every`` layers when set) the reconstruction is compared with the stored tensor; if
  ``max|x_rebuilt - x| / max(max|x|, 1)`` exceeds ``drift_tol`` a :class:`ReversibleDriftWarning` is
  issued (``on_drift="warn"``) or a :class:`ReversibleDriftError` raised (``on_drift="error"``), naming
  the layer, the layers inverted since the last stored input, and the layer whose own round trip is
  worst. ``checkpoint_every=k`` stores the input of every k-th layer (memory grows as depth / k), so the
  reconstruction restarts from an exact tensor every k layers: use it for very deep or badly conditioned
  stacks. ``checkpoints=c`` stores the inputs of ``c`` evenly spaced layers (the bottom one included), whatever
  the depth: memory that does not grow with depth, reconstruction restarting every ``depth / c`` layers (float32
  gradients of a deep Glow then as close to the float64 ones as ordinary backprop's, where a rebuild through the
  whole stack is 3 - 10x further off; ``Glow`` uses 32 by default). With both options the stored inputs are the
  union. ``drift_tol=None`` uses a dtype default (:data:`DEFAULT_DRIFT_TOL`); ``check_drift=False`` turns the
  check off.
* ``bit_exact=True`` makes every rebuild exact: the forward also inverts each layer's output the way the
  backward will and keeps the difference to the true input as a compact record (the integer differences of the
  values' ordered bit patterns: one int8 per value, plus the rare positions where that does not fit), and the
  backward adds it back before taking the layer's gradients. Inputs are then rebuilt bit for bit and the
  gradients equal ordinary backprop's up to summation order, in any precision and at any conditioning, for
  about one byte per transformed value per layer (memory that grows with depth, far slower than ordinary
  backprop's) and the forward's extra inverses. It cannot be combined with ``micro_batch`` (``ValueError``).
* ``kink_tol=t`` (default None, off, here; ``Glow`` turns it on with ``1e-4``) keeps the conditioner's ReLUs on
  the forward's side in the backward. A recomputation from a rebuilt input (a few ulps off) can move a hidden
  unit whose pre-activation is within rounding of zero across the kink, and those few flips, not the smooth part
  of the drift, are what move float32 gradients (3 - 4 flips make the 1e-4-level difference of a K = 32 Glow with
  stored inputs; without them 8e-7). The forward records, per hidden row, the units active within ``2 t`` of the
  row's largest value (index and value, about 2 KB per coupling at ``t = 1e-4`` on the bench's largest layers);
  the recomputation clears the units within ``t`` and writes the recorded ones back. A coupling whose output
  the backward has exactly (the stack's top, a stored input) needs none, and with records on, a stored input
  that would fall on a coupling moves up one layer to sit on the coupling's output. It costs about 1 - 2 % of a
  reversible step (bench/RESULTS.md). Glow's own conditioner on the C++ path only (``conv_net_fwd_kinks``); off
  with ``micro_batch`` and unnecessary with ``bit_exact``.
* Layers whose conditioner activations are small next to the largest layer's (Glow's conditioner on the C++
  path, at most 1/8 of it: in Glow the top level) keep them from the forward instead of recomputing them, laid out
  in one buffer of the largest layer's hidden size taken from conv_net's activation pool, which goes back to the
  pool before the large layers' turn: neither the peak of kept activations nor the resident memory grows, and the
  amount is fixed (6 layers of the bench's K = 32 Glow). Not with ``bit_exact`` or ``micro_batch``; with
  ``kink_tol`` the kept layers need no records.
* ``micro_batch=m`` runs each layer's recomputation and local backward on slices of ``m`` samples (the
  layers act on samples independently once ActNorm is initialized), which lowers the transient memory of
  the one live layer for a small cost in speed; gradients are unchanged up to summation order.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors

from .nn.base import Compose, InverseTransform, Permutation, Transform, chain

__all__ = ["ReversibleSequential", "ReversibleDriftWarning", "ReversibleDriftError", "DEFAULT_DRIFT_TOL",
           "reversible_blocks", "SavedTensorMeter"]

DEFAULT_DRIFT_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
ON_DRIFT = ("warn", "error")


class ReversibleDriftWarning(UserWarning):
    """The rebuilt input of a layer differs from the stored one by more than the tolerance."""


class ReversibleDriftError(RuntimeError):
    """Raised instead of :class:`ReversibleDriftWarning` with ``on_drift="error"``."""


# ----------------------------------------------------------------------------------------------------------
# Blocks: one invertible unit each, as seen by the reversible engine.
# A block maps h -> (h_out, extras, logdet); extras are extra outputs (Glow's factored-out latents).
# ----------------------------------------------------------------------------------------------------------

class _Block:
    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self._all_params = None  # blocks live for one forward/backward: the module walk is done once

    def label(self) -> str:
        return f"{self.name} ({type(self.module).__name__})"

    def _parameters(self):
        return _module_params(self.module)

    def all_params(self):
        """Every parameter of the block (trainable or not), walked once."""
        if self._all_params is None:
            self._all_params = self._parameters()
        return self._all_params

    def params(self):
        return [p for p in self.all_params() if p.requires_grad]

    def forward(self, h):
        y, ld = self.module(h)
        return y, (), ld

    def inverse(self, y, extras):
        return self.module.inverse(y)[0]

    def forward_exact(self, h):
        """:meth:`forward` and the record (:func:`_encode`) that turns :meth:`backprop`'s rebuild of ``h`` into
        ``h`` bit for bit (None when the rebuild is exact already)."""
        y, ex, ld = self.forward(h)
        if isinstance(self.module, _lossless_kinds()):
            return y, ex, ld, None
        return y, ex, ld, _encode(h, self.inverse(y, ex))

    def backprop(self, y, extras, gy, gextras, gld, params, need_input_grad, fix=None):
        """Rebuild the input from ``y`` (corrected by ``fix``, a :meth:`forward_exact` record) and backpropagate
        through this block alone.

        Returns ``(x, grad_x or None, [grad per param or None])``.
        """
        with torch.no_grad():
            x = _decode(self.inverse(y, extras), fix)
        return (x,) + self._local_grad(x, gy, gextras, gld, params, need_input_grad)

    def _local_grad(self, x, gy, gextras, gld, params, need_input_grad):
        with torch.enable_grad():
            xl = x.detach().requires_grad_(need_input_grad)
            y, ex, ld = self.forward(xl)
            return _grad([y, *ex, ld], [gy, *gextras, gld], xl if need_input_grad else None, params)


def _autograd(outs, gouts, inputs):
    """``autograd.grad`` of the outputs that have a gradient and are part of the graph, with respect to
    ``inputs`` (None for an unused input); None when no output or no input takes part."""
    pairs = [(o, g) for o, g in zip(outs, gouts) if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    if not pairs or not inputs:
        return None
    # Backpropagated as the scalar sum of <o, g>: the gradient reaching each o is g exactly (1 * g), and
    # torch.autograd.grad with grad_outputs would import torch's symbolic-shape machinery (sympy, about 33 MB of
    # resident memory) on its first call in a process - memory that ordinary backprop never spends.
    total = None
    with torch.enable_grad():  # the backward of a custom Function runs with grad mode off
        for o, g in pairs:
            term = (o * g.to(o.dtype)).sum()
            total = term if total is None else total + term
    return list(torch.autograd.grad(total, inputs, allow_unused=True))


def _grad(outs, gouts, x_leaf, params):
    inputs = ([x_leaf] if x_leaf is not None else []) + list(params)
    grads = _autograd(outs, gouts, inputs)
    if grads is None:
        return None, [None] * len(params)
    if x_leaf is not None:
        gx, gp = grads[0], list(grads[1:])
        if gx is None:
            gx = torch.zeros_like(x_leaf)
        return gx, gp
    return None, list(grads)


def _has_ops(*names) -> bool:
    from .ops._library import has_cpp_ops
    return has_cpp_ops(*names)


def _direct(x) -> bool:
    """True when a block's local backward may call the C++ kernels directly, without autograd (the conditions
    under which the ordinary forward runs them)."""
    from . import _backend
    return _backend.cpp_eager(x)


def _zeros_ld(gld, x):
    if gld is None:
        return x.new_zeros(x.shape[0])
    return gld if gld.dtype == x.dtype else gld.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Bit-exact rebuilds: the rounding difference between a layer's input and its rebuild from the output, kept
# exactly. A float's bits, read as a signed integer with the magnitude bits flipped for negative values, order
# like the floats themselves (-0 and +0 adjacent), so neighbouring floats have neighbouring keys and a rebuild a
# few ulps off differs by a small integer. Differences are taken in the key's own width (wrapping), so adding
# them back restores every bit pattern exactly (NaN payloads, infinities, signed zeros included).
# ----------------------------------------------------------------------------------------------------------

_KEYS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63), torch.float16: (torch.int16, 15),
         torch.bfloat16: (torch.int16, 15)}


def _keys(x):
    itype, top = _KEYS[x.dtype]
    i = x.contiguous().view(itype)
    return i ^ ((i >> top) & ((1 << top) - 1))


def _from_keys(k, dtype):
    itype, top = _KEYS[dtype]
    return (k ^ ((k >> top) & ((1 << top) - 1))).view(dtype)


def _encode(x, rebuilt):
    """``None`` when ``rebuilt`` equals ``x`` bit for bit, else ``(small, idx, vals)``: the key differences as
    int8 (clamped) and, for the flat positions where they do not fit, the exact differences. On CPU one C++
    pass (``torch.ops.flowops.rebuild_record``); elsewhere these torch ops."""
    if x.dtype not in _KEYS:
        raise TypeError(f"reversible: bit_exact supports float16, bfloat16, float32 and float64, got {x.dtype}")
    if x.device.type == "cpu" and _has_ops("rebuild_record"):
        small, idx, vals = torch.ops.flowops.rebuild_record(x, rebuilt)
        return (small, idx, vals) if small.numel() else None
    d = _keys(x) - _keys(rebuilt)
    if not bool(d.any()):
        return None
    small = d.clamp(-127, 127).to(torch.int8)
    idx = (d != small).flatten().nonzero().squeeze(1)
    return small, idx, d.flatten()[idx]


def _decode(rebuilt, fix):
    """``rebuilt`` corrected by :func:`_encode`'s record: the original tensor, bit for bit."""
    if fix is None:
        return rebuilt
    small, idx, vals = fix
    if rebuilt.device.type == "cpu" and _has_ops("rebuild_apply"):
        return torch.ops.flowops.rebuild_apply(rebuilt, small, idx, vals)
    d = small.to(_KEYS[rebuilt.dtype][0])
    if idx.numel():
        d.view(-1)[idx] = vals
    return _from_keys(_keys(rebuilt) + d, rebuilt.dtype)


class _ActNormInvConvBlock(_Block):
    """A GlowStep's ActNorm and 1x1 convolution as one block, through :meth:`GlowStep.norm_conv` and
    :meth:`GlowStep.norm_conv_inverse` (the fused op outside the reference backend, as the ordinary
    GlowStep runs it), both for the reconstruction and for the local gradients."""

    def label(self) -> str:
        return f"{self.name}.transforms.0-1 (ActNorm + InvConv1x1)"

    _plan = None  # (op arguments, position of each parameter's gradient) or False: found on the first backprop

    def _parameters(self):  # once each, also when ActNorm and the 1x1 conv share one
        ts = self.module.transforms
        return _unique(p for m in (ts[0], ts[1]) for p in _module_params(m))

    def forward(self, h):
        y, ld = self.module.norm_conv(h)
        return y, (), ld

    def inverse(self, y, extras):
        return self.module.norm_conv_inverse(y)[0]

    def backprop(self, y, extras, gy, gextras, gld, params, need_input_grad, fix=None):
        """On the C++ path one call (``actnorm_invconv_reverse``) rebuilds the input and takes the local gradients
        (the fused op's backward and the LU weight's backward; for up to 64 channels as plain loops, one pass per
        product), without re-running the forward or consulting the layer's weight caches."""
        plan = self._plan
        if plan is None:  # the five parameters distinct and the block's only ones, the C++ path (found once)
            an, ic = self.module.transforms[0], self.module.transforms[1]
            own = (an.log_scale, an.bias, ic.lower, ic.upper, ic.log_s)
            ok = (len({id(p) for p in own}) == len(own) and {id(p) for p in self.all_params()} == set(map(id, own))
                  and _direct(y) and _has_ops("actnorm_invconv_reverse", "rebuild_apply"))
            plan = self._plan = ((an.log_scale, an.bias, ic.perm, ic.lower, ic.upper, ic.sign, ic.log_s),
                                 {id(p): j for j, p in enumerate(own)}) if ok else False
        if not plan:
            return super().backprop(y, extras, gy, gextras, gld, params, need_input_grad, fix)
        args, where = plan
        if gy.dtype != y.dtype:
            gy = gy.to(y.dtype)
        # the inverse (corrected by a bit-exact record), the fused op's backward and the LU weight's backward; a
        # plain call (no autograd kernel), made by the walk with grad mode off
        x, gx, *g = torch.ops.flowops.actnorm_invconv_reverse(y, gy, _zeros_ld(gld, y), *args,
                                                              *(fix if fix is not None else ()))
        return x, (gx if need_input_grad else None), [g[where[id(p)]] for p in params]


class _SplitBlock(_Block):
    """Glow's Split: ``h -> kept`` with the standardized factored latent as an extra output."""

    def forward(self, h):
        kept, eps, ld = self.module(h)
        return kept, (eps,), ld

    def inverse(self, y, extras):
        return self.module.inverse(y, extras[0])[0]


class _CouplingBlock(_Block):
    """Coupling layers: the conditioner runs once, on the output's pass-through part.

    Split-mask affine and additive couplings on the C++ path call the coupling kernels directly: the inverse
    rebuilds the transformed part and the coupling's backward kernel gives the gradients of that part and of the
    conditioner's output, with no second coupling forward and no autograd graph around it. Glow's own
    conditioner (:func:`flowops.nn.conv_net`) then runs as two plain calls as well (``conv_net_fwd`` keeps its
    hidden activations for ``conv_net_bwd``); any other conditioner is backpropagated by autograd."""

    _plan = None  # (kernel, conv_net weights, plain forward) found once per block (it lives one forward/backward)

    def _direct_plan(self, y):
        """``(kernel, w, plain)``: :meth:`_coupling_kernel`, with it :meth:`_conv_net`'s weights (else None), and
        whether the module's own forward is plain (:func:`_plain_forward`: no hooks, no override), found on the
        first call (the forward's or the backward's input: same dtype and device) and kept."""
        plan = self._plan
        if plan is None:
            kernel = self._coupling_kernel(y)
            w = self._conv_net(y[:, self.module._pass]) if kernel is not None else None
            plan = self._plan = (kernel, w, _plain_forward(self.module))
        return plan

    def _forward_direct(self, h, run):
        """The coupling's forward from its C++ ops: ``run(xp) -> (cond, extra)`` gives the conditioner's output
        (and what the caller keeps), then the coupling op; ``(y, (), logdet, extra)``."""
        t = self.module
        kernel = self._plan[0]
        t._check(h)
        xp, xt = h[:, t._pass], h[:, t._trans]
        cond, extra = run(xp)
        _check_cond(t, cond)
        yt, ld = torch.ops.flowops.affine_coupling(xt, cond, None, kernel[0], kernel[1], False)
        return t._join(xp, yt), (), ld, extra

    def forward(self, h):
        """The layer's forward; on the direct path with Glow's conditioner the two C++ ops the module's own forward
        reaches (``conv_net``, then the coupling op), called without the module machinery in between (same values,
        bit for bit), when the layer has no hooks and does not override its forward."""
        _, w, plain = self._direct_plan(h)
        if w is None or not plain:
            return super().forward(h)
        return self._forward_direct(h, lambda xp: (torch.ops.flowops.conv_net(xp, *w), None))[:3]

    def forward_keep(self, h, keep):
        """:meth:`forward` (same values) keeping the conditioner's output and hidden activations for the backward,
        which then skips this layer's recomputation, in space :class:`_Kept` lays out: ``(y, (), logdet, act)``,
        or None when the layer is not on that path, its activations are not small enough or there is no space
        left. ``keep.wants`` sees every such layer's hidden bytes (what the backward walk holds while it takes
        the layer's gradients), so it learns the largest."""
        t = self.module
        _, w, plain = self._direct_plan(h)
        if w is None or not plain:
            return None
        pixels = h.shape[0] * math.prod(h.shape[2:])
        hidden = (pixels, w[0].shape[0])
        if not keep.wants(2 * math.prod(hidden) * h.element_size()):
            return None
        act = keep.alloc(((h.shape[0], t.cond_out, *h.shape[2:]), hidden, hidden), h.dtype)
        if act is None:
            return None

        def run(xp):
            torch.ops.flowops.conv_net_fwd_into(xp, *w, *act)
            return act[0], act

        return self._forward_direct(h, run)

    def _coupling_kernel(self, y):
        """``(scale, clamp)`` of the coupling op when the direct path applies, else None."""
        from .nn.coupling import AdditiveCoupling, AffineCoupling
        t = self.module
        if t.mask is not None or not _direct(y) or not _has_ops("affine_coupling", "affine_coupling_bwd"):
            return None
        couple = type(t)._couple
        if couple is AffineCoupling._couple:
            return t.scale, t.clamp
        if couple is AdditiveCoupling._couple:
            return "additive", 1.0
        return None

    def _conv_net(self, yp):
        """The conditioner's ``(w1, b1, w2, b2, w3, b3)`` when it is Glow's conv_net run by the C++ op and the
        block has no other parameters, else None."""
        from .nn.glow import _AnySpatial
        from .ops.conv_net import conv_net_params, fast_path
        t = self.module
        if type(t)._params is not _AnySpatial._params or not _has_ops("conv_net_fwd", "conv_net_bwd"):
            return None
        w = conv_net_params(t.conditioner)
        if w is None or not fast_path(yp) or {id(p) for p in self.all_params()} - set(map(id, w)):
            return None
        return w

    def forward_exact(self, h):
        """The coupling's forward through its conditioner and coupling op, and the record of its rebuild (the
        transformed part only: the pass-through part is rebuilt exactly)."""
        t = self.module
        if t.mask is None:
            xp, xt = h[:, t._pass], h[:, t._trans]
            cond = t._params(xp)
            yt, ld = t._couple(xt, cond, False, None)
            return t._join(xp, yt), (), ld, _encode(xt, t._couple(yt, cond, True, None)[0])
        m = t.mask.to(h.dtype)
        cond = t._params(h * m)
        y, ld = t._couple(h, cond, False, m)
        return y, (), ld, _encode(h, t._couple(y, cond, True, m)[0])

    def forward_kinks(self, h, tol):
        """:meth:`forward` and, on the direct path with Glow's conditioner, the ReLU-kink records of its two hidden
        layers (``conv_net_fwd_kinks``: the units within ``2 * tol`` of their row's largest value above the kink),
        else None."""
        _, w, plain = self._direct_plan(h)
        if w is None or not plain or not _has_ops("conv_net_fwd_kinks"):
            return (*self.forward(h), None)

        def run(xp):
            cond, _, _, rec = torch.ops.flowops.conv_net_fwd_kinks(xp, *w, tol, [])  # recording keeps no activations
            return cond, tuple(rec)

        return self._forward_direct(h, run)

    def _backprop_direct(self, kernel, y, gy, gld, params, need_input_grad, fix, kinks=None, into=None, kept=None):
        t = self.module
        ops = torch.ops.flowops
        scale, clamp = kernel
        w = self._direct_plan(y)[1]
        if gy.dtype != y.dtype:
            gy = gy.to(y.dtype)
        # Glow's conditioner writes its weight gradients straight into the engine's buffer when its slots are free
        # (else, e.g. a conditioner shared with a layer walked already, they are returned for accumulation)
        dst = into(w) if w is not None and into is not None and _has_ops("conv_net_bwd_into") else None
        if (dst is not None and fix is None and not _METERS and w[4].shape[0] == t.cond_out
                and _has_ops("glow_coupling_reverse")):  # the whole step in one call (same kernels and values)
            x, gx = ops.glow_coupling_reverse(
                y, gy, _zeros_ld(gld, y), *w, t._pass.start, t._pass.stop - t._pass.start, t._trans.start,
                t._trans.stop - t._trans.start, scale, clamp, kinks[0] if kinks is not None else 0.0,
                list(kinks[1]) if kinks is not None else [], list(kept) if kept is not None else [], False,
                need_input_grad, dst)
            return x, (gx if need_input_grad else None), [None] * len(params)
        yp, yt = y[:, t._pass], y[:, t._trans]
        gyt = gy[:, t._trans]
        with torch.no_grad():
            if w is not None:
                if kept is not None:  # the forward's own activations (forward_keep): no recomputation
                    cond, h1, h2 = kept
                elif kinks is not None:
                    cond, h1, h2, _ = ops.conv_net_fwd_kinks(yp, *w, kinks[0], list(kinks[1]))
                else:
                    cond, h1, h2 = ops.conv_net_fwd(yp, *w)
            else:
                with torch.enable_grad():
                    xp = yp.detach().requires_grad_(need_input_grad)
                    cond_g = t._params(xp)
                cond = cond_g.detach()
            _check_cond(t, cond)
            xt = _decode(ops.affine_coupling(yt, cond, None, scale, clamp, True)[0], fix)  # C++ op: no redispatch
            gxt, gcond = ops.affine_coupling_bwd(gyt, _zeros_ld(gld, y), xt, cond, None, scale, clamp, False)
            if w is not None:
                held = _meter_hold(h1, h2)  # what autograd would have saved for the conditioner's backward
                if dst is not None:  # straight into the engine's gradient buffer: reported as None here
                    gxp_c = ops.conv_net_bwd_into(gcond, yp, h1, h2, w[0], w[1], w[2], w[3], w[4], w[5],
                                                  need_input_grad, dst)
                    gp = [None] * len(params)
                else:
                    g = ops.conv_net_bwd(gcond, yp, h1, h2, w[0], w[1], w[2], w[3], w[4], w[5], need_input_grad)
                    by_id = dict(zip(map(id, w), g[1:]))
                    gp = [by_id[id(p)] for p in params]
                    gxp_c = g[0]
                del h1, h2, held
                gxp_c = gxp_c if need_input_grad else None
        if w is None:
            inputs = ([xp] if need_input_grad else []) + list(params)
            grads = _autograd((cond_g,), (gcond,), inputs) or [None] * len(inputs)
            gxp_c = grads[0] if need_input_grad else None
            gp = list(grads[1:] if need_input_grad else grads)
        x = t._join(yp, xt)
        if not need_input_grad:
            return x, None, gp
        gxp = gy[:, t._pass] if gxp_c is None else gy[:, t._pass] + gxp_c
        gx = t._join(gxp, gxt)
        return x, gx, gp

    def backprop(self, y, extras, gy, gextras, gld, params, need_input_grad, fix=None, kinks=None, into=None,
                 kept=None):
        """``into`` (the walk's :meth:`_GradSlots.take`): Glow's conditioner on the direct path writes its parameter
        gradients straight into the slots it hands out, and reports None for them. ``kept``: the activations
        :meth:`forward_keep` kept (used instead of a recomputation)."""
        t = self.module
        y = y.detach()
        kernel = self._direct_plan(y)[0]
        if kernel is not None:
            return self._backprop_direct(kernel, y, gy, gld, params, need_input_grad, fix, kinks, into, kept)
        if t.mask is None:
            yp, yt = y[:, t._pass], y[:, t._trans]
            with torch.enable_grad():
                xp = yp.detach().requires_grad_(need_input_grad)
                cond = t._params(xp)
            with torch.no_grad():
                xt = _decode(t._couple(yt, cond.detach(), True, None)[0], fix)
            with torch.enable_grad():
                xt = xt.requires_grad_(need_input_grad)
                yt2, ld = t._couple(xt, cond, False, None)
                inputs = ([xp, xt] if need_input_grad else []) + list(params)
                grads = _autograd((yt2, ld), (gy[:, t._trans], gld), inputs) or [None] * len(inputs)
            x = t._join(yp, xt.detach())
            if not need_input_grad:
                return x, None, list(grads)
            gxp = gy[:, t._pass] if grads[0] is None else gy[:, t._pass] + grads[0]
            gxt = grads[1] if grads[1] is not None else torch.zeros_like(xt)
            gx = t._join(gxp, gxt)
            return x, gx, list(grads[2:])
        m = t.mask.to(y.dtype)
        with torch.enable_grad():
            yc = y.detach().requires_grad_(need_input_grad)
            cond = t._params(yc * m)  # x * m == y * m: the pass-through positions are unchanged
        with torch.no_grad():
            x = _decode(t._couple(y, cond.detach(), True, m)[0], fix)
        with torch.enable_grad():
            xl = x.requires_grad_(need_input_grad)
            y2, ld = t._couple(xl, cond, False, m)
            inputs = ([yc, xl] if need_input_grad else []) + list(params)
            grads = _autograd((y2, ld), (gy, gld), inputs) or [None] * len(inputs)
        if not need_input_grad:
            return x.detach(), None, list(grads)
        gx = grads[1] if grads[1] is not None else torch.zeros_like(x)
        if grads[0] is not None:
            gx = gx + grads[0]
        return x.detach(), gx, list(grads[2:])


def _check_cond(t, cond):
    """The coupling ``t``'s conditioner output has the channels the coupling op expects (as ``_params`` checks)."""
    if cond.shape[1] != t.cond_out:
        raise ValueError(f"{type(t).__name__}: conditioner returned {cond.shape[1]} channels along dim 1, "
                         f"expected {t.cond_out}")


def _plain_forward(module) -> bool:
    """True when calling the coupling ``module`` runs :class:`~flowops.nn.coupling._Coupling`'s own forward and
    nothing else: no module hooks (its own or global) and no override of ``forward`` / ``_run``."""
    from torch.nn.modules import module as mod
    from .nn.coupling import AffineCoupling, _Coupling
    if type(module).forward is not _Coupling.forward or type(module)._run not in (_Coupling._run, AffineCoupling._run):
        return False
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return not (any(getattr(module, h, None) for h in hooks) or any(getattr(mod, "_global" + h, None) for h in hooks))


def _exact_kinds():
    from .nn.coupling import _Coupling
    from .nn.glow import ActNorm, InvConv1x1, Split, Squeeze
    from .nn.made import _MaskedAffine
    return _Coupling, (Permutation, ActNorm, InvConv1x1, Squeeze, _MaskedAffine), Split


def _lossless_kinds():
    """Layers whose inverse rebuilds the input bit for bit (they only move values)."""
    from .nn.glow import Squeeze
    return Permutation, Squeeze


def reversible_blocks(modules, prefix: str = ""):
    """Flatten transforms into reversible blocks (``Compose`` walked child by child); raises ``TypeError``
    for a layer without an exact inverse. ``modules``: transforms, or ``(name, transform)`` pairs."""
    coupling, exact, split = _exact_kinds()
    from .nn.glow import GlowStep as glow_step
    blocks = []

    def walk(m, name):
        if isinstance(m, ReversibleSequential):
            for i, c in enumerate(m.transforms):
                walk(c, f"{name}.transforms.{i}" if name else f"transforms.{i}")
        elif isinstance(m, glow_step) and type(m).forward is glow_step.forward and len(m.transforms) == 3:
            blocks.append(_ActNormInvConvBlock(m, name))
            walk(m.transforms[2], f"{name}.transforms.2" if name else "transforms.2")
        elif isinstance(m, Compose):
            for i, c in enumerate(m.transforms):
                walk(c, f"{name}.transforms.{i}" if name else f"transforms.{i}")
        elif isinstance(m, split):
            blocks.append(_SplitBlock(m, name))
        elif isinstance(m, coupling) and getattr(m, "exact_inverse", True):
            blocks.append(_CouplingBlock(m, name))
        elif getattr(m, "exact_inverse", None) is True or (
                isinstance(m, exact) and getattr(m, "exact_inverse", True)):
            blocks.append(_Block(m, name))
        elif isinstance(m, InverseTransform) and _is_exact(m.base):
            blocks.append(_Block(m, name))
        else:
            raise TypeError(f"reversible: layer {name or '0'} ({type(m).__name__}) has no exact inverse, so its "
                            f"input cannot be rebuilt from its output; keep it outside the reversible stack, or "
                            f"set `exact_inverse = True` on it if its inverse is exact")

    for i, m in enumerate(modules):
        if isinstance(m, tuple):
            walk(m[1], f"{prefix}{m[0]}")
        else:
            walk(m, f"{prefix}{i}")
    return blocks


def _is_exact(m) -> bool:
    try:
        reversible_blocks([m])
        return True
    except TypeError:
        return False


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------

def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _module_params(module):
    """``list(module.parameters())``: the same parameters in the same order (each module once, pre-order, its own
    parameters in registration order, each parameter once), by a plain walk of ``_modules`` / ``_parameters``
    without ``named_parameters``' name bookkeeping (the engine collects every layer's parameters each step)."""
    out, seen_p, seen_m = [], set(), set()

    def walk(m):
        seen_m.add(id(m))
        for q in m._parameters.values():
            if q is not None and id(q) not in seen_p:
                seen_p.add(id(q))
                out.append(q)
        for c in m._modules.values():
            if c is not None and id(c) not in seen_m:
                walk(c)

    walk(module)
    return out


class _Engine:
    """Runs a list of blocks as one autograd node (not an nn.Module: it only references the layers)."""

    def __init__(self, blocks, checkpoint_every=None, drift_tol=None, on_drift="warn", check_drift=True,
                 micro_batch=None, bit_exact=False, checkpoints=None, kink_tol=None):
        if bit_exact and micro_batch:
            raise ValueError("reversible: bit_exact=True cannot be combined with micro_batch: the rebuild of a slice "
                             "of the batch does not reproduce the whole batch's bit for bit (batch-size dependent "
                             "kernels), so the records would not apply")
        self.blocks = blocks
        self.micro_batch = micro_batch
        self.bit_exact = bool(bit_exact)
        self.checkpoint_every = checkpoint_every
        self.checkpoints = checkpoints
        # kink records index the whole batch's hidden units; bit-exact rebuilds need none
        self.kink_tol = None if micro_batch or bit_exact else kink_tol
        self.drift_tol = drift_tol
        self.on_drift = on_drift
        self.check_drift = check_drift

    def keeps(self) -> bool:
        """Whether the forward keeps small layers' conditioner activations (:class:`_Kept`): not with bit-exact
        rebuilds (exact already) or micro-batches (slices recompute); with kink records, kept layers need none."""
        return KEEP_SMALL and not (self.bit_exact or self.micro_batch) and _has_ops(
            "conv_net_fwd_into", "conv_net_pooled")

    def plain(self, x):
        total, extras = None, []
        for b in self.blocks:
            x, ex, ld = b.forward(x)
            extras.extend(ex)
            total = ld if total is None else total + ld
        if total is None:
            total = x.new_zeros(x.shape[0])
        return x, total, extras

    def run(self, x):
        """``(h, logdet, extras)``; reversible when a gradient is needed, else an ordinary forward."""
        params = _unique(p for b in self.blocks for p in b.params())
        if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not (x.requires_grad or params)):
            return self.plain(x)
        n_extra = sum(isinstance(b, _SplitBlock) for b in self.blocks)
        outs = _ReversibleFunction.apply(self, n_extra, x, *params)
        return outs[0], outs[1], list(outs[2:])

    def tolerance(self, dtype):
        if self.drift_tol is not None:
            return float(self.drift_tol)
        return DEFAULT_DRIFT_TOL.get(dtype, 1e-3)

    def checkpoint_indices(self):
        k = self.checkpoint_every
        idx = {0} if self.check_drift else set()
        if k:
            idx.update(range(k, len(self.blocks), k))
        n, c = len(self.blocks), self.checkpoints
        if c and n:  # c evenly spaced layers (all of them when c >= n), the bottom one first
            m = min(c, n)
            pos = [(j * n) // m for j in range(m)]
            if self.kink_tol and m < n:
                # with kink records, a stored input just above a coupling spares that coupling its records (its
                # conditioner is recomputed from exact values): a position on a coupling moves up by one
                taken = set(pos)
                for k, p in enumerate(pos):
                    if (p and p + 1 < n and p + 1 not in taken and isinstance(self.blocks[p], _CouplingBlock)
                            and not isinstance(self.blocks[p - 1], _CouplingBlock)):
                        taken.discard(p)
                        taken.add(p + 1)
                        pos[k] = p + 1
            idx.update(pos)
        return idx

    def exact_output(self, i, ckpt) -> bool:
        """Whether the backward walk has block ``i``'s output exactly (the stack's output, or a stored input)."""
        return i + 1 == len(self.blocks) or i + 1 in ckpt

    # -- drift ---------------------------------------------------------------------------------------------
    def _worst_round_trip(self, x, lo, hi):
        """Forward from the stored input through blocks lo..hi-1, inverting each output again."""
        worst, where = -1.0, lo
        with torch.no_grad():
            h = x
            for i in range(lo, hi):
                y, ex, _ = self.blocks[i].forward(h)
                back = self.blocks[i].inverse(y, ex)
                err = _rel_err(back, h)
                if not err <= worst:  # NaN counts as worst
                    worst, where = err, i
                    if math.isnan(err):
                        break
                h = y
        return where, worst

    def report_drift(self, i, hi, rebuilt, stored):
        err = _rel_err(rebuilt, stored)
        tol = self.tolerance(stored.dtype)
        if err <= tol:
            return err
        where, worst = self._worst_round_trip(stored, i, hi)
        b = self.blocks[i]
        msg = (f"reversible: the rebuilt input of layer {b.label()} differs from the stored input by {err:.3g} "
               f"(max abs error relative to max(max|x|, 1); drift_tol {tol:.3g}) after inverting layers "
               f"{i}..{hi - 1}; the worst single-layer round trip is layer {self.blocks[where].label()} "
               f"({worst:.3g}). The gradients may be inaccurate: use checkpoints=c or checkpoint_every=k, a higher "
               f"precision, or keep that layer out of the reversible stack.")
        if self.on_drift == "error":
            raise ReversibleDriftError(msg)
        warnings.warn(msg, ReversibleDriftWarning, stacklevel=2)
        return err


# The forward keeps the conditioner activations of layers whose hidden activations are at most 1/KEEP_FRACTION of
# the largest layer's, in buffers of the activation pool, up to (1 - 1/KEEP_FRACTION) of the largest layer's in
# total (see _Kept).
KEEP_SMALL = True
KEEP_FRACTION = 8
_ALIGN = 16  # elements: each kept tensor starts on a 64-byte boundary (float32)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Kept:
    """Conditioner activations the forward keeps for the backward, so that those layers skip their recomputation.

    The backward walk holds one layer's hidden activations at a time, so its peak is set by the largest layer
    (Glow's first level), whose two hidden buffers come from conv_net's activation pool. Layers whose activations
    are small next to that (at most 1/KEEP_FRACTION of the largest seen) keep theirs (output and hidden pair) from
    the forward, laid out in buffers of the largest layer's hidden size taken from that pool, as many whole
    buffers as fit in 1 - 1/KEEP_FRACTION of the largest layer's hidden bytes (one, for Glow); the rest is left for
    what else is alive at the end of the forward (the stack's outputs, what the layers after it save). The walk
    meets the kept layers before the large ones, and once their last view is dropped the buffer goes back to the
    pool, where the large layer's recomputation takes it again: neither the peak of kept activations nor the
    resident memory grows, and the amount is fixed, not growing with depth. In Glow this keeps the first steps of
    the top level."""

    def __init__(self):
        self.acts = {}  # layer index -> ((output, h1, h2), meter handles)
        self.largest = 0  # hidden bytes of the largest layer seen
        self.chunks = []  # [flat buffer, elements used]

    def wants(self, nbytes: int) -> bool:
        if nbytes <= 0:
            return False
        self.largest = max(self.largest, nbytes)
        return nbytes * KEEP_FRACTION <= self.largest

    def alloc(self, shapes, dtype):
        """Views of the given shapes laid out in a pool buffer, or None when they do not fit the budget."""
        sizes = [math.prod(sh) for sh in shapes]
        need = sum(map(_aligned, sizes))
        item = dtype.itemsize
        chunk = self.largest // 2 // item  # one hidden buffer of the largest layer
        budget = self.largest - self.largest // KEEP_FRACTION
        last = self.chunks[-1] if self.chunks else None
        if last is None or last[0].dtype != dtype or last[1] + need > last[0].numel():
            if need > chunk or (len(self.chunks) + 1) * chunk * item > budget:
                return None
            self.chunks.append([torch.ops.flowops.conv_net_pooled(1, chunk, dtype).view(-1), 0])
        flat, used = self.chunks[-1]
        views = []
        for sh, n in zip(shapes, sizes):
            views.append(flat[used:used + n].view(sh))
            used += _aligned(n)
        self.chunks[-1][1] = used
        return tuple(views)


def _rel_err(a, b) -> float:
    """max|a - b| / max(max|b|, 1), computed in a's precision (float32 for half types: no overflow), one sync."""
    if not a.numel():
        return 0.0
    a, b = a.detach(), b.detach()
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    d, scale = torch.stack([torch.sub(a, b).abs_().amax(), b.abs().amax()]).tolist()
    return d / max(scale, 1.0)


def _backprop_chunked(b, h, ex, gh, gex, gld, params, need_x, micro_batch, fix=None, kinks=None, into=None,
                      kept=None):
    """``b.backprop`` over slices of ``micro_batch`` samples (layers act on each sample independently); ``fix``
    (a bit-exact record), ``kinks`` (a coupling's ReLU-kink records), ``into`` (gradients written into the
    walk's buffer) and ``kept`` (activations kept by the forward) only without slices (the engine does not
    combine records or kept activations with micro_batch)."""
    n = h.shape[0]
    if not micro_batch or n <= micro_batch:
        if isinstance(b, _CouplingBlock):
            return b.backprop(h, ex, gh, gex, gld, params, need_x, fix, kinks, into, kept)
        return b.backprop(h, ex, gh, gex, gld, params, need_x, fix)
    xs, gxs, gps = [], [], [None] * len(params)
    for s in range(0, n, micro_batch):
        sl = slice(s, s + micro_batch)
        x, gx, gp = b.backprop(h[sl], [e[sl] for e in ex], gh[sl], [g[sl] for g in gex], gld[sl], params, need_x)
        xs.append(x)
        gxs.append(gx)
        gps = [g if a is None else (a if g is None else a + g) for a, g in zip(gps, gp)]
    return torch.cat(xs), (torch.cat(gxs) if need_x else None), gps


def _versions(params):
    return tuple(p._version for p in params)


class _GradSlots:
    """The parameter gradients of a reversible backward, written into one flat buffer per dtype/device.

    The walk produces each block's parameter gradients while that block's activations are alive; kept as
    separate tensors they land between the transient buffers on the allocator's heap and pin its pages
    (about 10 MB of resident memory for Glow K=32). One buffer allocated before the walk keeps them apart;
    what the node returns are views of it. The views are cut in one call, and a block's gradients are written
    with one ``_foreach_copy_`` / ``_foreach_add_`` each (a Glow K=32 step writes about a thousand)."""

    def __init__(self, params, needed):
        self.index = {id(p): j for j, p in enumerate(params)}
        self.views = [None] * len(params)
        self.written = [False] * len(params)
        groups: dict = {}
        for j, (p, need) in enumerate(zip(params, needed)):
            if need:
                groups.setdefault((p.dtype, p.device), []).append(j)
        for (dtype, device), idx in groups.items():
            flat = torch.empty(sum(params[j].numel() for j in idx), dtype=dtype, device=device)
            views = _unflatten_dense_tensors(flat, [params[j] for j in idx])
            for j, v in zip(idx, views):
                self.views[j] = v

    def add(self, pairs):
        """Write (first time) or accumulate ``(slot index, gradient)`` pairs, one batched call each; a block's
        parameters are distinct (:meth:`_Block.all_params`), so no slot comes twice in one call."""
        copy_dst, copy_src, add_dst, add_src = [], [], [], []
        for j, g in pairs:
            v = self.views[j]
            if v is None:
                continue
            if self.written[j]:
                add_dst.append(v)
                add_src.append(g)
            else:
                copy_dst.append(v)
                copy_src.append(g)
                self.written[j] = True
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        if add_dst:
            torch._foreach_add_(add_dst, add_src)

    def take(self, ps):
        """The slots of the distinct parameters ``ps`` to be written in place (marked written), or None when one
        is not an input of the node, needs no gradient or was written already (then the caller's gradients go
        through :meth:`add`)."""
        idx = [self.index.get(id(p)) for p in ps]
        if None in idx or len(set(idx)) != len(idx):
            return None
        views = [self.views[j] for j in idx]
        if any(v is None for v in views) or any(self.written[j] for j in idx):
            return None
        for j in idx:
            self.written[j] = True
        return views

    def result(self):
        return [v if w else None for v, w in zip(self.views, self.written)]


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, engine, n_extra, x, *params):
        ckpt = engine.checkpoint_indices()
        stored, fixes, kinks = {}, {}, {}
        h, total, extras = x, None, []
        keep = _Kept() if engine.keeps() else None
        with torch.no_grad():
            for i, b in enumerate(engine.blocks):
                if i in ckpt:
                    stored[i] = h
                kept = b.forward_keep(h, keep) if keep is not None and isinstance(b, _CouplingBlock) else None
                if kept is not None:  # the forward's own activations: no recomputation, no kink records needed
                    h, ex, ld, act = kept
                    keep.acts[i] = (act, _meter_hold(*act))
                elif engine.bit_exact:  # stored inputs too: the block's own gradients are taken at its rebuild
                    h, ex, ld, fix = b.forward_exact(h)
                    if fix is not None:
                        fixes[i] = fix
                elif engine.kink_tol and isinstance(b, _CouplingBlock) and not engine.exact_output(i, ckpt):
                    h, ex, ld, rec = b.forward_kinks(h, engine.kink_tol)
                    if rec is not None:
                        kinks[i] = rec
                else:
                    h, ex, ld = b.forward(h)
                extras.extend(ex)
                total = ld if total is None else total + ld
        if total is None:
            total = h.new_zeros(h.shape[0])
        # Outputs may alias inputs (an empty stack, a permutation of nothing): hand back fresh tensors then.
        if h.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            h = h.clone()
        ctx.engine, ctx.n_extra = engine, n_extra
        ctx.params = params
        ctx.versions = _versions(params)  # after the forward: ActNorm may have initialized itself in it
        ctx.stored_idx = sorted(stored)
        ctx.fix_idx = sorted(fixes)
        ctx.kink_idx = sorted(kinks)
        ctx.kept = keep.acts if keep is not None else {}  # popped by the backward as it uses them
        ctx.x_requires_grad = ctx.needs_input_grad[2]
        ctx.save_for_backward(h, *extras, *(stored[i] for i in ctx.stored_idx),
                              *(t for i in ctx.fix_idx for t in fixes[i]),
                              *(t for i in ctx.kink_idx for t in kinks[i]))
        return (h, total, *extras)

    @staticmethod
    def backward(ctx, gh, gtotal, *gextras):
        if torch.is_grad_enabled():
            raise RuntimeError("reversible: the backward of a reversible stack is first order only; "
                               "create_graph=True (double backward) is not supported")
        try:
            saved = ctx.saved_tensors
        except RuntimeError as exc:
            raise RuntimeError("reversible: backward ran a second time through the same graph of a reversible "
                               "stack, whose stored outputs were freed by the first backward; pass "
                               "retain_graph=True to the first backward, or run the forward again") from exc
        engine, params = ctx.engine, ctx.params
        if _versions(params) != ctx.versions:
            raise RuntimeError("reversible: parameters were modified in place between the forward and the "
                               "backward of a reversible stack (an optimizer step?), so the activations cannot be "
                               "rebuilt; run the forward again")
        n_extra, n_stored = ctx.n_extra, len(ctx.stored_idx)
        h = saved[0]
        extras = list(saved[1:1 + n_extra])
        stored = dict(zip(ctx.stored_idx, saved[1 + n_extra:1 + n_extra + n_stored]))
        rest = saved[1 + n_extra + n_stored:]
        fixes = {i: tuple(rest[3 * k:3 * k + 3]) for k, i in enumerate(ctx.fix_idx)}
        rest = rest[3 * len(ctx.fix_idx):]
        kinks = {i: (engine.kink_tol, tuple(rest[4 * k:4 * k + 4])) for k, i in enumerate(ctx.kink_idx)}
        slots = _GradSlots(params, ctx.needs_input_grad[3:])
        index = slots.index
        gh = gh if gh is not None else torch.zeros_like(h)
        gextras = list(gextras)
        blocks = engine.blocks
        ex_end = n_extra
        seg_top = len(blocks)
        for i in range(len(blocks) - 1, -1, -1):
            b = blocks[i]
            if isinstance(b, _SplitBlock):
                ex, gex = extras[ex_end - 1:ex_end], gextras[ex_end - 1:ex_end]
                ex_end -= 1
            else:
                ex, gex = (), ()
            bp = b.params()
            need_x = i > 0 or ctx.x_requires_grad
            kept = ctx.kept.pop(i, None)
            x, gx, gp = _backprop_chunked(b, h, ex, gh, gex, gtotal, bp, need_x, engine.micro_batch, fixes.get(i),
                                          kinks.get(i), slots.take, None if kept is None else kept[0])
            del kept
            # a parameter that became trainable after the forward was not an input of this node: skipped
            slots.add([(index[id(p)], g) for p, g in zip(bp, gp) if g is not None and id(p) in index])
            if i in stored:
                engine.report_drift(i, seg_top, x, stored[i])
                x = stored[i]
                seg_top = i
            h, gh = x.detach(), gx
        return (None, None, gh if ctx.x_requires_grad else None, *slots.result())


class ReversibleSequential(Transform):
    """A stack of exactly invertible transforms trained by reversible recomputation.

    ``forward(x) -> (z, logabsdet)`` and ``inverse(z) -> (x, logabsdet)`` behave like
    :class:`~flowops.nn.Compose` of the same transforms (same outputs, same gradients, same state_dict
    layout ``transforms.<i>...``); only the memory of the training step differs. See the module docs for
    the options ``checkpoint_every``, ``checkpoints``, ``drift_tol``, ``on_drift``, ``check_drift``,
    ``micro_batch`` and ``bit_exact``, and the rules.
    ``enabled=False`` (or setting ``.enabled``) runs the ordinary backprop path, for comparison.
    """

    def __init__(self, *transforms: Transform, checkpoint_every: int | None = None, drift_tol: float | None = None,
                 on_drift: str = "warn", check_drift: bool = True, enabled: bool = True,
                 micro_batch: int | None = None, bit_exact: bool = False, checkpoints: int | None = None,
                 kink_tol: float | None = None):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple, nn.ModuleList)):
            transforms = tuple(transforms[0])
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"ReversibleSequential: transform {i} must be a flowops Transform, got "
                                f"{type(t).__name__}")
        self.transforms = nn.ModuleList(transforms)
        self.checkpoint_every = _check_options(checkpoint_every, drift_tol, on_drift)
        self.checkpoints = _check_checkpoints(checkpoints)
        self.kink_tol = _check_kink_tol(kink_tol)
        self.drift_tol = None if drift_tol is None else float(drift_tol)
        self.on_drift, self.check_drift, self.enabled = on_drift, bool(check_drift), bool(enabled)
        self.micro_batch = _check_micro_batch(micro_batch)
        self.bit_exact = _check_bit_exact(bit_exact)
        reversible_blocks(self.transforms, "transforms.")  # raises early for a layer without an exact inverse

    def __len__(self):
        return len(self.transforms)

    def __getitem__(self, i):
        return self.transforms[i]

    def engine(self) -> _Engine:
        return _Engine(reversible_blocks(self.transforms, "transforms."), self.checkpoint_every, self.drift_tol,
                       self.on_drift, self.check_drift, self.micro_batch, _check_bit_exact(self.bit_exact),
                       _check_checkpoints(self.checkpoints), _check_kink_tol(self.kink_tol))

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ReversibleSequential: x must be a torch.Tensor, got {type(x).__name__}")
        if not self.enabled:
            return Compose.forward(self, x)
        h, total, extras = self.engine().run(x)
        if extras:  # only Glow's Split produces extras; it belongs inside GlowTransform
            raise TypeError("ReversibleSequential: a Split layer has two outputs; use Glow(..., reversible=True)")
        return h, total

    def inverse(self, z):
        return chain(self.transforms, z, inverse=True)

    _fused = Compose._fused  # used by Compose.forward when enabled=False

    def extra_repr(self):
        return (f"checkpoint_every={self.checkpoint_every}, checkpoints={self.checkpoints}, kink_tol={self.kink_tol}, "
                f"drift_tol={self.drift_tol}, on_drift={self.on_drift!r}, enabled={self.enabled}, "
                f"bit_exact={self.bit_exact}")


def _check_bit_exact(bit_exact):
    if not isinstance(bit_exact, bool):
        raise TypeError(f"reversible: bit_exact must be a bool, got {type(bit_exact).__name__}")
    return bit_exact


def _optional_positive_int(name, value):
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"reversible: {name} must be an int or None, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"reversible: {name} must be at least 1, got {value}")
    return value


def _check_micro_batch(micro_batch):
    return _optional_positive_int("micro_batch", micro_batch)


def _check_kink_tol(kink_tol):
    if kink_tol is not None:
        if isinstance(kink_tol, bool) or not isinstance(kink_tol, (int, float)):
            raise TypeError(f"reversible: kink_tol must be a number or None, got {type(kink_tol).__name__}")
        if not 0 < kink_tol < 0.5:
            raise ValueError(f"reversible: kink_tol must be in (0, 0.5), got {kink_tol}")
        kink_tol = float(kink_tol)
    return kink_tol


def _check_checkpoints(checkpoints):
    return _optional_positive_int("checkpoints", checkpoints)


def _check_options(checkpoint_every, drift_tol, on_drift):
    _optional_positive_int("checkpoint_every", checkpoint_every)
    if drift_tol is not None and not float(drift_tol) >= 0:
        raise ValueError(f"reversible: drift_tol must be a non-negative number or None, got {drift_tol}")
    if on_drift not in ON_DRIFT:
        raise ValueError(f"reversible: on_drift must be one of {ON_DRIFT}, got {on_drift!r}")
    return checkpoint_every


_METERS: list = []  # the SavedTensorMeters now active


def _meter_hold(*tensors):
    """Count ``tensors`` in every active :class:`SavedTensorMeter` while the returned handles live: activations
    the reversible walk keeps for a backward computation outside autograd (the direct kernel path)."""
    return [m._pack(t) for m in _METERS for t in tensors] if _METERS else None


class SavedTensorMeter:
    """Context manager measuring the bytes kept for backward computations (live and peak).

    Counts the tensors autograd saves for backward, and the activations the reversible walk keeps between a
    layer's recomputation and its local backward when it calls the kernels directly (outside autograd); each
    storage once while any reference to it is held. Tensors in ``exclude`` (e.g. the model's parameters) are not
    counted. ``peak`` is the high-water mark in bytes over the context, including saved tensors of graphs built
    during a backward run inside it.
    """

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs = {}
        self.live = 0
        self.peak = 0
        self._ctx = None

    def _pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self._exclude or t.device.type == "meta":
            return t
        n = self._refs.get(key)
        if n is None:
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
            self._refs[key] = [1, t.untyped_storage().nbytes()]
        else:
            n[0] += 1
        return _Handle(self, key, t)

    def _release(self, key):
        n = self._refs.get(key)
        if n is None:
            return
        n[0] -= 1
        if n[0] == 0:
            self.live -= n[1]
            del self._refs[key]

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Handle) else h

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        _METERS.append(self)
        return self

    def __exit__(self, *exc):
        _METERS.remove(self)
        self._ctx.__exit__(*exc)
        return False


class _Handle:
    __slots__ = ("meter", "key", "t")

    def __init__(self, meter, key, t):
        self.meter, self.key, self.t = meter, key, t

    def __del__(self):
        self.meter._release(self.key)
