"""Reference Glow conditioner, written for clarity: ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3``
(stride 1, zero padding 1, biases) with ``F.conv2d``; the oracle and baseline of :func:`flowops.ops.conv_net`."""
import torch.nn.functional as F


def conv_net(x, w1, b1, w2, b2, w3, b3):
    """``x [N, C, H, W]``, ``w1 [K, C, 3, 3]``, ``w2 [K, K, 1, 1]``, ``w3 [O, K, 3, 3]`` -> ``[N, O, H, W]``."""
    h = F.relu(F.conv2d(x, w1, b1, padding=1))
    h = F.relu(F.conv2d(h, w2, b2))
    return F.conv2d(h, w3, b3, padding=1)
