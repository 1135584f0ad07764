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


def glow_coupling_reverse(y, grad_y, grad_logdet, w1, b1, w2, b2, w3, b3, pass_start, pass_len, trans_start,
                          trans_len, scale, clamp):
    """The reversible walk's step for one Glow coupling (``torch.ops.flowops.glow_coupling_reverse`` with a plain
    recomputation), written with autograd: the conditioner :func:`conv_net` on ``y``'s pass-through channels, the
    transformed channels rebuilt through the coupling's inverse, then the gradients of the coupling's forward at
    the rebuilt input for the upstream ``(grad_y, grad_logdet)``. Returns ``(x, grad_x, grad_w1, grad_b1, grad_w2,
    grad_b2, grad_w3, grad_b3)``."""
    from .affine_coupling import additive_coupling, affine_coupling

    def couple(x, cond, inverse):
        if scale == "additive":
            return additive_coupling(x, cond, inverse=inverse)
        return affine_coupling(x, cond, scale=scale, clamp=clamp, inverse=inverse)

    pass_first = pass_start < trans_start
    yp = y[:, pass_start:pass_start + pass_len].detach()
    yt = y[:, trans_start:trans_start + trans_len].detach()
    with torch.enable_grad():
        xp = yp.clone().requires_grad_()
        ws = [w.detach().requires_grad_() for w in (w1, b1, w2, b2, w3, b3)]
        cond = conv_net(xp, *ws)
        with torch.no_grad():
            xt = couple(yt, cond, True)[0]
        xt.requires_grad_()
        out, logdet = couple(xt, cond, False)
        gyt = grad_y[:, trans_start:trans_start + trans_len]
        terms = [(out * gyt).sum()] + ([(logdet * grad_logdet).sum()] if logdet.requires_grad else [])
        gxp, gxt, *gw = torch.autograd.grad(sum(terms), [xp, xt, *ws])
    gp = grad_y[:, pass_start:pass_start + pass_len] + gxp
    x = torch.cat((yp, xt.detach()) if pass_first else (xt.detach(), yp), 1)
    gx = torch.cat((gp, gxt) if pass_first else (gxt, gp), 1)
    return (x, gx, *gw)
