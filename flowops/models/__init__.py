"""Composed flows."""
from .realnvp import RealNVP

__all__ = ["RealNVP"]
