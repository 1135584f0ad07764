"""Flow layers (nn.Module transforms)."""
from .base import Compose, InverseTransform, Permutation, RandomPermutation, ReversePermutation, Transform
from .conditioners import conv_net, mlp
from .coupling import MASKS, AdditiveCoupling, AffineCoupling, make_mask

__all__ = ["Transform", "Compose", "InverseTransform", "Permutation", "ReversePermutation", "RandomPermutation",
           "AffineCoupling", "AdditiveCoupling", "make_mask", "MASKS", "mlp", "conv_net"]
