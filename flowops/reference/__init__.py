"""Plain-PyTorch implementations of every flowops op: the test oracle and the benchmark baseline.

Written for clarity, not speed. Nothing here imports the rest of flowops.
"""
from .affine_coupling import additive_coupling, affine_coupling, scale_map

__all__ = ["affine_coupling", "additive_coupling", "scale_map"]
