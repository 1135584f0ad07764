"""flowops: fused kernels for normalizing flows in PyTorch.

Importing flowops never requires CUDA, Triton or the compiled extension: every op falls
back to its plain-PyTorch reference (see :mod:`flowops._backend`).
"""
from . import ops, reference
from ._backend import get_backend, info, set_backend, use_backend
from .distributions import StandardNormal
from .flow import Flow
from . import nn, models
from . import reversible
from .reversible import ReversibleSequential

__version__ = "0.1.0"
__all__ = ["ops", "reference", "nn", "models", "Flow", "StandardNormal", "set_backend", "get_backend",
           "use_backend", "info", "__version__", "reversible", "ReversibleSequential"]
