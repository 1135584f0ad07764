"""Fused, autograd-aware flow ops registered with torch.library (see flowops._backend for dispatch)."""
from .affine_coupling import additive_coupling, affine_coupling

__all__ = ["affine_coupling", "additive_coupling"]
