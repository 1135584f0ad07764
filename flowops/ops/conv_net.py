"""Glow's conditioner as one op: ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3`` (stride 1, zero padding 1).

``conv_net(x, w1, b1, w2, b2, w3, b3)`` equals
``conv2d(relu(conv2d(relu(conv2d(x, w1, b1, padding=1)), w2, b2)), w3, b3, padding=1)``
(:func:`flowops.reference.conv_net.conv_net`, imported here as ``conv_net_reference``) with
``w1 [K, C, 3, 3]``, ``w2 [K, K, 1, 1]``, ``w3 [O, K, 3, 3]``.

On the CPU with the C++ extension (float32 and float64) it runs ``flowops::conv_net``
(``csrc/conv_net.cpp``): the three convolutions as GEMMs over the pixels in channels-last rows, the first
through im2col (few input channels: one GEMM with 9C rows of weights), the last as one GEMM against all
nine taps' weights followed by a shift-add (few output channels), float32 products on oneDNN's brgemm
micro-kernel; one C++ autograd node saves x and the two hidden activations. Elsewhere (CUDA, other dtypes,
under torch.compile, the ``reference`` backend, no extension) it is the reference composition.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _backend
from . import _library
from ..reference.conv_net import conv_net as conv_net_reference

def _cpp_op() -> bool:
    return _library.has_cpp_ops("conv_net")


def fast_path(x: torch.Tensor) -> bool:
    """True when ``conv_net`` on ``x`` runs the registered C++ op (which checks its arguments itself)."""
    return x.dim() == 4 and _backend.cpp_eager(x) and _cpp_op()


def conv_net(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
             w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3`` of ``x [N, C, H, W]``; returns ``[N, O, H, W]``
    (contiguous NCHW on the fused path). Shapes, dtypes and devices are checked (``ValueError``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"conv_net: x must be a 4-d tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    k, c, o = w1.shape[0], x.shape[1], w3.shape[0]
    for name, t, shape in (("w1", w1, (k, c, 3, 3)), ("b1", b1, (k,)), ("w2", w2, (k, k, 1, 1)), ("b2", b2, (k,)),
                           ("w3", w3, (o, k, 3, 3)), ("b3", b3, (o,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"conv_net: {name} must have shape {shape} for x with {c} channels, got "
                             f"{tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"conv_net: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if fast_path(x):
        return torch.ops.flowops.conv_net(x, w1, b1, w2, b2, w3, b3)
    return conv_net_reference(x, w1, b1, w2, b2, w3, b3)


def _plain_conv(m, kernel: int, padding: int) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (kernel, kernel) and m.stride == (1, 1)
            and m.padding == (padding, padding) and m.dilation == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros" and m.bias is not None)


def conv_net_params(module: nn.Module):
    """``(w1, b1, w2, b2, w3, b3)`` when ``module`` is exactly the conditioner :func:`conv_net` computes (an
    ``nn.Sequential`` of Conv2d 3x3 / ReLU / Conv2d 1x1 / ReLU / Conv2d 3x3, stride 1, zero padding 1, biases,
    no hooks), else ``None``."""
    if type(module) is not nn.Sequential or len(module) != 5:
        return None
    mods = list(module)
    kinds = [_plain_conv(mods[0], 3, 1), type(mods[1]) is nn.ReLU, _plain_conv(mods[2], 1, 0),
             type(mods[3]) is nn.ReLU, _plain_conv(mods[4], 3, 1)]
    if not all(kinds) or any(m._forward_hooks or m._forward_pre_hooks for m in (module, *mods)):
        return None
    if mods[2].in_channels != mods[0].out_channels or mods[4].in_channels != mods[2].out_channels:
        return None
    return (mods[0].weight, mods[0].bias, mods[2].weight, mods[2].bias, mods[4].weight, mods[4].bias)


def cached_bytes() -> int:
    """Bytes of freed activation buffers the C++ op keeps for reuse (0 without the extension).

    The hidden activations that ``conv_net`` saves for its backward (buffers of 256 KB and more) come from a
    process-wide pool of freed buffers of the same size: a fresh multi-MB buffer faults its pages in on first
    touch, and a training step frees and reallocates the same sizes every time. The pool keeps at most
    ``FLOWOPS_POOL_MB`` MB (read when the extension is first used; default 256, ``0`` turns the pool off)."""
    return int(torch.ops.flowops.conv_net_cached_bytes()) if _cpp_op() else 0


def empty_cache() -> int:
    """Free the buffers the op's pool keeps (see :func:`cached_bytes`); returns how many bytes were freed.
    Per-thread scratch buffers of the op (a few MB, reused by every call on that thread) stay."""
    return int(torch.ops.flowops.conv_net_empty_cache()) if _cpp_op() else 0
