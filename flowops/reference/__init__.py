"""Plain-PyTorch implementations of every flowops op: the test oracle and the benchmark baseline.

Written for clarity, not speed. Nothing here imports the rest of flowops.
"""
from .affine_coupling import additive_coupling, affine_coupling, scale_map

from .made import degree_mask, made_forward, made_solve, masked_linear

__all__ = ["affine_coupling", "additive_coupling", "scale_map", "masked_linear", "degree_mask", "made_forward",
           "made_solve"]
from .planar import (planar_inverse_step, planar_solve_alpha, planar_stack, planar_stack_inverse,  # noqa: E402
                     planar_step, planar_u_hat, radial, radial_inverse, radial_params)

__all__ += ["planar_u_hat", "planar_step", "planar_stack", "planar_solve_alpha", "planar_inverse_step",
            "planar_stack_inverse", "radial_params", "radial", "radial_inverse"]
