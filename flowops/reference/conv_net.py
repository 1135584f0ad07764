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


def _rows(h):
    """``[N, K, H, W]`` -> ``[N * H * W, K]``: one row per pixel, as the C++ op lays out hidden activations."""
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])


def _images(rows, n, height, width):
    return rows.view(n, height, width, rows.shape[1]).permute(0, 3, 1, 2)


def conv_net_kinks(x, w1, b1, w2, b2, w3, b3, tol, records=None):
    """:func:`conv_net` with ReLU-kink records, as ``torch.ops.flowops.conv_net_fwd_kinks`` computes it.

    ``records=None`` (recording): ``(y, [idx1, val1, idx2, val2])``, the records of both hidden layers
    (:func:`conv_net_kinks_record`). With ``records`` (the recomputation): each hidden layer has them applied
    (:func:`conv_net_kinks_apply`) before the next layer runs; returns ``(y, h1, h2)``, the hidden activations
    as ``[N * H * W, K]`` rows."""
    n, _, height, width = x.shape
    h1 = _rows(F.relu(F.conv2d(x, w1, b1, padding=1)))
    rec = []
    if records is None:
        rec += conv_net_kinks_record(h1, tol)
    else:
        h1 = conv_net_kinks_apply(h1, tol, records[0], records[1])
    h2 = _rows(F.relu(F.conv2d(_images(h1, n, height, width), w2, b2)))
    if records is None:
        rec += conv_net_kinks_record(h2, tol)
    else:
        h2 = conv_net_kinks_apply(h2, tol, records[2], records[3])
    y = F.conv2d(_images(h2, n, height, width), w3, b3, padding=1)
    return (y, rec) if records is None else (y, h1, h2)
