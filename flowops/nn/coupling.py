"""Coupling layers (RealNVP affine, NICE additive) on top of the fused coupling op."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import _backend, ops
from ..ops.affine_coupling import SCALES
from .base import STACK_FUSERS, Transform
from .conditioners import conv_net, mlp

MASKS = ("half", "alternating", "checkerboard", "channel")


def _shape_tuple(shape) -> tuple:
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


def make_mask(shape, kind: str, flip: bool = False) -> torch.Tensor:
    """A float mask of the per-sample ``shape``: 1 marks pass-through positions."""
    shape = _shape_tuple(shape)
    c = shape[0]
    if kind in ("half", "channel"):
        m = torch.zeros(shape)
        m[: c // 2] = 1.0
    elif kind == "alternating":
        idx = torch.arange(c).reshape(c, *([1] * (len(shape) - 1)))
        m = (idx % 2 == 0).float().expand(shape).clone()
    elif kind == "checkerboard":
        if len(shape) < 3:
            raise ValueError(f"mask 'checkerboard' needs image shape (C, H, W), got {shape}")
        h, w = shape[-2], shape[-1]
        board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0).float()
        m = board.expand(shape).clone()
    else:
        raise ValueError(f"mask must be one of {MASKS} or a tensor, got {kind!r}")
    return 1.0 - m if flip else m


class _Coupling(Transform):
    _factor = 2  # conditioner outputs per transformed position

    def __init__(self, shape, conditioner: nn.Module | Callable | None = None, mask="half", hidden=64,
                 flip: bool = False):
        super().__init__()
        self.shape = _shape_tuple(shape)
        c = self.shape[0]
        image = len(self.shape) > 1
        if isinstance(mask, torch.Tensor):
            m = mask.detach().float()
            if tuple(m.shape) != self.shape:
                raise ValueError(f"{type(self).__name__}: mask must have shape {self.shape}, got {tuple(m.shape)}")
            if not torch.all((m == 0) | (m == 1)):
                raise ValueError(f"{type(self).__name__}: mask must hold only 0 and 1")
            if flip:
                m = 1.0 - m
            kind = "explicit"
        else:
            if mask == "channel" and not image:
                raise ValueError(f"{type(self).__name__}: mask 'channel' needs image shape (C, H, W), got {self.shape}")
            if mask not in MASKS:
                raise ValueError(f"{type(self).__name__}: mask must be one of {MASKS} or a tensor, got {mask!r}")
            kind = mask
            m = None
        if c < 2 and kind in ("half", "channel"):
            raise ValueError(f"{type(self).__name__}: a split mask needs at least 2 channels/features, got {c}")
        self.mask_kind = kind
        self.flip = bool(flip)
        if kind in ("half", "channel"):
            # Split along dim 1 with no mask tensor: the conditioner sees the pass-through part only.
            k = c // 2
            if flip:
                self._trans, self._pass, self._pass_first = slice(0, c - k), slice(c - k, c), False
            else:
                self._pass, self._trans, self._pass_first = slice(0, k), slice(k, c), True
            cin, cout = k, self._factor * (c - k)
            self.register_buffer("mask", None)
        else:
            if m is None:
                m = make_mask(self.shape, kind, flip)
            if m.sum() == 0 or m.sum() == m.numel():
                raise ValueError(f"{type(self).__name__}: mask passes through everything or nothing")
            self.register_buffer("mask", m)
            cin, cout = c, self._factor * c
        if conditioner is None:
            conditioner = (lambda i, o: conv_net(i, o, hidden)) if image else (lambda i, o: mlp(i, o, hidden))
        if not isinstance(conditioner, nn.Module):
            conditioner = conditioner(cin, cout)
        if not isinstance(conditioner, nn.Module):
            raise TypeError(f"{type(self).__name__}: conditioner must be an nn.Module or a factory (in, out) -> "
                            f"nn.Module, got {type(conditioner).__name__}")
        self.conditioner = conditioner
        self.cond_in, self.cond_out = cin, cout

    def _check(self, x):
        if x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__}: expected input of shape [batch, {', '.join(map(str, self.shape))}]"
                             f", got {tuple(x.shape)}")

    def _params(self, h):
        p = self.conditioner(h)
        if p.shape[1] != self.cond_out:
            raise ValueError(f"{type(self).__name__}: conditioner returned {p.shape[1]} channels along dim 1, "
                             f"expected {self.cond_out}")
        return p

    def _join(self, p, t):
        """The full tensor from its pass-through part ``p`` and transformed part ``t`` (split masks)."""
        return torch.cat((p, t) if self._pass_first else (t, p), dim=1)

    def _run(self, x, inverse):
        self._check(x)
        if self.mask is None:
            xp, xt = x[:, self._pass], x[:, self._trans]
            yt, ld = self._couple(xt, self._params(xp), inverse, None)
            return self._join(xp, yt), ld
        m = self.mask.to(x.dtype)
        return self._couple(x, self._params(x * m), inverse, m)

    def forward(self, x):
        return self._run(x, False)

    def inverse(self, z):
        return self._run(z, True)


class AffineCoupling(_Coupling):
    """RealNVP affine coupling: transformed part * s(raw) + t, with (raw, t) = conditioner(pass-through part).

    Args:
        shape: ``features`` (int) for vectors, or ``(C, H, W)`` for images (NCHW).
        conditioner: an ``nn.Module`` mapping the pass-through part to the params, or a factory
            ``(in_channels, out_channels) -> nn.Module``; by default a zero-initialized MLP (vectors)
            or Glow's conv net (images) with ``hidden`` units.
        mask: ``"half"`` (first half passes through), ``"alternating"`` (even features/channels pass),
            ``"checkerboard"`` (images), ``"channel"`` (images, first half of channels), or a 0/1
            tensor of the per-sample shape with 1 marking pass-through positions.
        scale: ``"exp"``, ``"softclamp"`` (default) or ``"sigmoid"``; ``clamp`` bounds softclamp.
        flip: swap the pass-through and transformed parts.

    Split masks (half, channel) feed the conditioner the pass-through channels and expect
    ``2 * transformed`` output channels (raw scale first); dense masks (alternating,
    checkerboard, explicit) feed ``x * mask`` and expect ``2 * C`` channels.
    """

    def __init__(self, shape, conditioner=None, mask="half", hidden=64, scale: str = "softclamp",
                 clamp: float = 2.0, flip: bool = False):
        if scale not in SCALES:
            raise ValueError(f"AffineCoupling: scale must be one of ('exp', 'softclamp', 'sigmoid'), got {scale!r}")
        if not float(clamp) > 0:
            raise ValueError(f"AffineCoupling: clamp must be positive, got {clamp}")
        super().__init__(shape, conditioner, mask, hidden, flip)
        self.scale, self.clamp = scale, float(clamp)
        self._plan = self._mlp_plan()

    def _couple(self, x, params, inverse, mask):
        return ops.affine_coupling(x, params, self.scale, self.clamp, inverse, mask)

    def _mlp_plan(self):
        """(linears, activation) when the conditioner is a plain Linear/ReLU|Tanh MLP on a split mask."""
        if self.mask is not None or len(self.shape) != 1 or not isinstance(self.conditioner, nn.Sequential):
            return None
        mods = list(self.conditioner)
        if len(mods) % 2 == 0:
            return None
        linears = mods[0::2]
        acts = mods[1::2]
        if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
            return None
        kinds = {type(a) for a in acts}
        if kinds and kinds not in ({nn.ReLU}, {nn.Tanh}):
            return None
        return linears, ("tanh" if kinds == {nn.Tanh} else "relu")

    def _run(self, x, inverse):
        fused = _fused_mlp_stack((self,), x, inverse)
        return fused if fused is not None else super()._run(x, inverse)


def _fused_mlp_stack(transforms, x, inverse):
    """Whole-layer fusion on CPU for MLP-conditioned affine couplings with split masks.

    A run of such layers (split -> MLP -> coupling -> concat, each) becomes one C++ autograd node with
    a hand-written backward: for the small vector flows people train on CPU, per-op dispatch and
    autograd bookkeeping cost more than the arithmetic. Returns None when the layers or the input do
    not qualify, and the caller runs the layers one by one.
    """
    if (x.dim() != 2 or x.dtype not in (torch.float32, torch.float64) or not transforms
            or torch.compiler.is_compiling() or _backend.select(x.device) != "cpp"):
        return None
    first = transforms[0]
    if type(first) is not AffineCoupling or first._plan is None:
        return None
    act, scale, clamp, shape = first._plan[1], first.scale, first.clamp, first.shape
    weights, biases, offsets, pass_starts, pass_lens, trans_starts = [], [], [0], [], [], []
    for t in transforms:
        if (type(t) is not AffineCoupling or t._plan is None or t._plan[1] != act or t.scale != scale
                or t.clamp != clamp or t.shape != shape):
            return None
        for lin in t._plan[0]:
            weights.append(lin.weight)
            biases.append(lin.bias)
        offsets.append(len(weights))
        pass_starts.append(t._pass.start)
        pass_lens.append(t._pass.stop - t._pass.start)
        trans_starts.append(t._trans.start)
    first._check(x)
    return torch.ops.flowops.coupling_mlp_stack(x, weights, biases, offsets, pass_starts, pass_lens, trans_starts,
                                                act, scale, clamp, inverse)


STACK_FUSERS.append(_fused_mlp_stack)


class AdditiveCoupling(_Coupling):
    """NICE additive coupling: transformed part + t(pass-through part); volume preserving."""

    _factor = 1

    def _couple(self, x, params, inverse, mask):
        return ops.additive_coupling(x, params, inverse, mask)
