"""Reference Glow conditioner, written for clarity: ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3``
(stride 1, zero padding 1, biases) with ``F.conv2d``; the oracle and baseline of :func:`flowops.ops.conv_net`."""
import torch
import torch.nn.functional as F


def conv_net(x, w1, b1, w2, b2, w3, b3):
    """``x [N, C, H, W]``, ``w1 [K, C, 3, 3]``, ``w2 [K, K, 1, 1]``, ``w3 [O, K, 3, 3]`` -> ``[N, O, H, W]``."""
    h = F.relu(F.conv2d(x, w1, b1, padding=1))
    h = F.relu(F.conv2d(h, w2, b2))
    return F.conv2d(h, w3, b3, padding=1)


def conv_net_kinks_record(h, tol):
    """The ReLU-kink records of hidden activations ``h [P, K]`` (a ReLU's output), as
    ``torch.ops.flowops.conv_net_fwd_kinks`` keeps them: per row, the units with ``0 < h < 2 * tol * max(row)``,
    as (flat int32 indices in increasing order, their values)."""
    tau = tol * h.max(dim=1, keepdim=True).values if h.numel() else h.new_zeros(h.shape[0], 1)
    idx = ((h > 0) & (h < 2 * tau)).flatten().nonzero().flatten()
    return idx.to(torch.int32), h.flatten()[idx]


def conv_net_kinks_apply(h, tol, idx, vals):
    """``h`` (a recomputation's ReLU output, ``[P, K]``) with the records applied: the units with
    ``0 < h < tol * max(row)`` cleared, then the recorded values written back."""
    tau = tol * h.max(dim=1, keepdim=True).values if h.numel() else h.new_zeros(h.shape[0], 1)
    out = h.masked_fill((h > 0) & (h < tau), 0)
    out.view(-1)[idx.long()] = vals
    return out
