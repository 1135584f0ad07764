"""Composed flows."""
from .realnvp import RealNVP

__all__ = ["RealNVP"]

from .maf import MAF  # noqa: E402

__all__ += ["MAF"]
from .glow import Glow, GlowTransform  # noqa: E402

__all__ += ["Glow", "GlowTransform"]
from .ffjord import FFJORD  # noqa: E402

__all__ += ["FFJORD"]
