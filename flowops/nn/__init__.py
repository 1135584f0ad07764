"""Flow layers (nn.Module transforms)."""
from .base import Compose, InverseTransform, Permutation, RandomPermutation, ReversePermutation, Transform
from .conditioners import conv_net, mlp
from .coupling import MASKS, AdditiveCoupling, AffineCoupling, make_mask

__all__ = ["Transform", "Compose", "InverseTransform", "Permutation", "ReversePermutation", "RandomPermutation",
           "AffineCoupling", "AdditiveCoupling", "make_mask", "MASKS", "mlp", "conv_net"]

from .made import IAF, MADE, MAF  # noqa: E402

__all__ += ["MADE", "MAF", "IAF"]
from .planar import Planar, PlanarStack, Radial  # noqa: E402

__all__ += ["Planar", "PlanarStack", "Radial"]
