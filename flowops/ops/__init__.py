"""Fused, autograd-aware flow ops registered with torch.library (see flowops._backend for dispatch)."""
from .affine_coupling import additive_coupling, affine_coupling

__all__ = ["affine_coupling", "additive_coupling"]
from .planar import planar_stack  # noqa: E402

__all__ += ["planar_stack"]

from .made_inverse import made_inverse  # noqa: E402
from .masked_linear import masked_linear  # noqa: E402

__all__ += ["masked_linear", "made_inverse"]
from .actnorm_invconv import actnorm_invconv  # noqa: E402
__all__ += ["actnorm_invconv"]
from .mlp_trace import mlp_trace  # noqa: E402

__all__ += ["mlp_trace"]
from .conv_net import conv_net  # noqa: E402

__all__ += ["conv_net"]
