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
from .glow import ActNorm, GlowAdditiveCoupling, GlowAffineCoupling, GlowStep, InvConv1x1, Split, Squeeze  # noqa: E402
from .preprocess import LogitTransform, bits_per_dim, dequantize, discrete_bits_per_dim  # noqa: E402

__all__ += ["ActNorm", "InvConv1x1", "Squeeze", "Split", "GlowStep", "GlowAffineCoupling", "GlowAdditiveCoupling",
            "LogitTransform", "dequantize", "bits_per_dim", "discrete_bits_per_dim"]
from .cnf import CNF, MLPVectorField  # noqa: E402

__all__ += ["CNF", "MLPVectorField"]
