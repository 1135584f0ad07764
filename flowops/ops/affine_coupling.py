"""The fused affine / additive coupling op: y = x * s(raw) + t with its log-det, in one pass."""
from __future__ import annotations

import torch

from .. import _backend
from .. import reference
from . import _library

SCALES = ("exp", "softclamp", "sigmoid")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x, params, mask, factor, name, pname="params"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"{name}: {pname} must be a torch.Tensor, got {type(params).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: x must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    if params.dtype != x.dtype:
        raise TypeError(f"{name}: {pname} dtype must match x ({x.dtype}), got {params.dtype}")
    if params.device != x.device:
        raise ValueError(f"{name}: {pname} must be on x's device ({x.device}), got {params.device}")
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be [batch, features] or [batch, channels, ...], got shape {tuple(x.shape)}")
    expected = (x.shape[0], factor * x.shape[1], *x.shape[2:])
    if tuple(params.shape) != expected:
        what = "the raw scale then the shift" if factor == 2 else "the shift"
        raise ValueError(f"{name}: {pname} must have shape {expected} ({what} along dim 1) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(params.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name}: mask must be a tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(x.shape[1:]):
            raise ValueError(f"{name}: mask must have the per-sample shape {tuple(x.shape[1:])}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"{name}: mask must be on x's device ({x.device}), got {mask.device}")


def _flat_mask(mask, x):
    if mask is None:
        return None
    if mask.dtype != x.dtype:
        mask = mask.to(x.dtype)
    return mask.reshape(-1).contiguous()


def _dispatch(x, params, mask, scale, clamp, inverse):
    backend = _backend.select(x.device)
    if backend == "cpp" and x.dtype not in (torch.float32, torch.float64):
        backend = "reference"  # half precision on CPU runs on the reference
    if backend == "reference":
        if scale == "additive":
            return reference.additive_coupling(x, params, inverse, mask)
        return reference.affine_coupling(x, params, scale, clamp, inverse, mask)
    m = _flat_mask(mask, x)
    if backend == "triton" and x.device.type == "cpu":
        from ._triton_cpu import TritonCoupling

        return TritonCoupling.apply(x, params, m, scale, clamp, inverse)
    if backend == "cpp" and not torch.compiler.is_compiling():
        return torch.ops.flowops.affine_coupling(x, params, m, scale, clamp, inverse)
    return torch.ops.flowops.affine_coupling_fwd(x, params, m, scale, clamp, inverse)


def affine_coupling(x: torch.Tensor, params: torch.Tensor, scale: str = "exp", clamp: float = 2.0,
                    inverse: bool = False, mask: torch.Tensor | None = None):
    """Fused affine coupling transform of ``x`` with its per-sample log|det|.

    Args:
        x: ``[B, C]`` or ``[B, C, *spatial]`` (NCHW for images), float16/bfloat16/float32/float64.
        params: ``[B, 2C, *spatial]``: the conditioner's raw scale in channels ``[0, C)`` and the
            shift in ``[C, 2C)``.
        scale: ``"exp"`` (s = exp(raw)), ``"softclamp"`` (s = exp(clamp * tanh(raw / clamp))) or
            ``"sigmoid"`` (Glow: s = sigmoid(raw + 2)).
        clamp: the bound of ``softclamp`` (ignored otherwise); must be positive.
        inverse: apply the inverse x = (y - t) / s instead.
        mask: optional tensor of x's per-sample shape; positions where it is nonzero pass
            through unchanged and add nothing to the log-det (their params are ignored).

    Returns:
        ``(y, logabsdet)``: y like x; logabsdet of shape ``[B]`` (float32 for half inputs),
        the log|det| of the Jacobian of the direction applied (so forward and inverse cancel).

    NaN or Inf in ``x`` or ``params`` propagate to the outputs of the affected samples, as in
    eager PyTorch; an empty batch returns empty outputs.
    """
    _check(x, params, mask, 2, "affine_coupling")
    if scale not in SCALES:
        raise ValueError(f"affine_coupling: scale must be one of {SCALES}, got {scale!r}")
    clamp = float(clamp)
    if not clamp > 0 or clamp == float("inf"):
        raise ValueError(f"affine_coupling: clamp must be a positive finite number, got {clamp}")
    return _dispatch(x, params, mask, scale, clamp, bool(inverse))


def additive_coupling(x: torch.Tensor, shift: torch.Tensor, inverse: bool = False,
                      mask: torch.Tensor | None = None):
    """NICE coupling y = x + t (x = y - t with ``inverse``); the log-det is zero.

    ``shift`` has x's shape; ``mask`` as in :func:`affine_coupling`.
    """
    _check(x, shift, mask, 1, "additive_coupling", "shift")
    return _dispatch(x, shift, mask, "additive", 1.0, bool(inverse))


__all__ = ["affine_coupling", "additive_coupling", "SCALES"]
_ = _library  # the import registers the operators
