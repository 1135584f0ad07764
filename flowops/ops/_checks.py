"""Argument checks shared by the public ops: every message names the op and the argument."""
from __future__ import annotations

import torch


def check_tensors(name: str, **args) -> None:
    """Each argument must be a ``torch.Tensor`` (TypeError)."""
    for arg, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")


def check_like(name: str, ref_name: str, ref: torch.Tensor, **args) -> None:
    """Each argument must have ``ref``'s dtype (TypeError) and be on its device (ValueError)."""
    for arg, t in args.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: {arg} dtype must match {ref_name} ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: {arg} must be on {ref_name}'s device ({ref.device}), got {t.device}")
