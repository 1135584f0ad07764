"""Reference affine and additive coupling (RealNVP / NICE / Glow scale maps)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCALES = ("exp", "softclamp", "sigmoid")


def scale_map(raw: torch.Tensor, scale: str = "exp", clamp: float = 2.0) -> torch.Tensor:
    """Return log s for the raw scale output of a conditioner.

    ``exp``: s = exp(raw); ``softclamp``: s = exp(clamp * tanh(raw / clamp));
    ``sigmoid`` (Glow): s = sigmoid(raw + 2).
    """
    if scale == "exp":
        return raw
    if scale == "softclamp":
        return clamp * torch.tanh(raw / clamp)
    if scale == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def _logdet_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def affine_coupling(x, params, scale="exp", clamp=2.0, inverse=False, mask=None):
    """y = x * s + t (or x = (y - t) / s with ``inverse``) and the per-sample log|det|.

    ``params`` is ``[B, 2C, *]`` for ``x`` of shape ``[B, C, *]``: the raw scale in the
    first C channels, the shift in the last C. Positions where ``mask`` is nonzero
    pass through unchanged and add nothing to the log-det.
    """
    c = x.shape[1]
    raw, shift = params[:, :c], params[:, c:]
    keep = None if mask is None else mask.to(torch.bool)
    if keep is not None:  # pass-through positions ignore their params (and get zero gradient there)
        raw, shift = raw.masked_fill(keep, 0.0), shift.masked_fill(keep, 0.0)
    log_s = scale_map(raw.float() if raw.dtype in (torch.float16, torch.bfloat16) else raw, scale, clamp)
    xc = x.to(log_s.dtype)
    shift = shift.to(log_s.dtype)
    if inverse:
        y = (xc - shift) * torch.exp(-log_s)
        ld = -log_s
    else:
        y = xc * torch.exp(log_s) + shift
        ld = log_s
    if keep is not None:
        y = torch.where(keep, xc, y)
        ld = ld.masked_fill(keep, 0.0)
    logdet = ld.flatten(1).sum(1).to(_logdet_dtype(x))
    return y.to(x.dtype), logdet


def additive_coupling(x, shift, inverse=False, mask=None):
    """NICE coupling: y = x + t (x = y - t with ``inverse``); the log-det is zero."""
    if mask is not None:
        keep = mask.to(torch.bool)
        shift = shift.masked_fill(keep, 0.0)
    y = x - shift if inverse else x + shift
    return y, x.new_zeros(x.shape[0], dtype=_logdet_dtype(x))
