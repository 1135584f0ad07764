"""Reference planar and radial flows (Rezende & Mohamed 2015), written for clarity.

Planar map (the cheap, generative direction)::

    z' = z + u_hat * tanh(w . z + b)
    log|det dz'/dz| = log|1 + (1 - tanh(w . z + b)^2) * (w . u_hat)|     (matrix determinant lemma)

The map is invertible when ``w . u_hat >= -1``; :func:`planar_u_hat` reparameterizes a raw ``u``
so that ``w . u_hat = -1 + softplus(w . u) > -1`` always holds.

Radial map (generative direction)::

    z' = z + beta * h(r) * (z - z0),   r = |z - z0|,   h(r) = 1 / (alpha + r)
    log|det| = (d - 1) * log(1 + beta h) + log(1 + beta h + beta h'(r) r)

invertible when ``alpha > 0`` and ``beta >= -alpha``; :func:`radial_params` maps raw parameters there.

Both inverses are computed here too: radial in closed form through the radius, planar through
the scalar equation along ``w`` (:func:`planar_solve_alpha`, a safeguarded Newton iteration).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def planar_u_hat(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u_hat = u + (m(w.u) - w.u) w / |w|^2`` with ``m(x) = -1 + softplus(x)``, so ``w . u_hat > -1``.

    Works row-wise on ``[..., d]`` (one layer per row). ``|w|^2`` is floored at the smallest
    normal number, so ``w = 0`` gives ``u_hat = u`` instead of NaN.
    """
    wu = (w * u).sum(-1, keepdim=True)
    wn = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return u + (F.softplus(wu) - 1.0 - wu) * w / wn


def planar_step(z: torch.Tensor, w: torch.Tensor, u_hat: torch.Tensor, b: torch.Tensor):
    """One planar map ``z + u_hat tanh(w.z + b)`` on ``z [B, d]`` with its log|det| ``[B]``."""
    a = z @ w + b
    t = torch.tanh(a)
    c = (w * u_hat).sum()
    z = z + t[:, None] * u_hat
    logdet = torch.log(torch.abs(1.0 + (1.0 - t * t) * c))
    return z, logdet


def planar_stack(z: torch.Tensor, w: torch.Tensor, u_hat: torch.Tensor, b: torch.Tensor):
    """K planar maps applied in order ``k = 0 .. K-1``: ``(z_K, sum_k log|det_k|)``.

    ``z [B, d]``, ``w [K, d]``, ``u_hat [K, d]`` (already reparameterized), ``b [K]``.
    This is the oracle (and the eager baseline) of :func:`flowops.ops.planar_stack`.
    """
    logdet = z.new_zeros(z.shape[0])
    for k in range(w.shape[0]):
        z, ld = planar_step(z, w[k], u_hat[k], b[k])
        logdet = logdet + ld
    return z, logdet


def planar_solve_alpha(y: torch.Tensor, c: torch.Tensor, b: torch.Tensor, tol: float = 1e-12,
                       max_iter: int = 100) -> torch.Tensor:
    """Solves ``alpha + c * tanh(alpha + b) = y`` for alpha, elementwise (any broadcastable shapes).

    With ``c >= -1`` the left side is non-decreasing in alpha and its root lies in
    ``[y - |c|, y + |c|]`` (``|tanh| <= 1``). Newton steps that leave the current bracket are
    replaced by bisection, and the bracket shrinks with the sign of the residual, so the iteration
    converges even at the boundary ``c = -1`` where the derivative vanishes at the root. Runs in
    float64 (no gradients); stops when every bracket is narrower than ``tol * (1 + |alpha|)``.
    """
    with torch.no_grad():
        y64, c64, b64 = (t.detach().to(torch.float64) for t in (y, c, b))
        y64, c64, b64 = torch.broadcast_tensors(y64, c64, b64)
        lo = y64 - c64.abs()
        hi = y64 + c64.abs()
        alpha = y64.clone()
        finite = torch.isfinite(alpha)
        for _ in range(max_iter):
            t = torch.tanh(alpha + b64)
            f = alpha + c64 * t - y64
            lo = torch.where(f < 0, alpha, lo)
            hi = torch.where(f > 0, alpha, hi)
            df = 1.0 + c64 * (1.0 - t * t)
            newton = alpha - f / df
            ok = (newton > lo) & (newton < hi) & torch.isfinite(newton)
            step_small = ok & ((newton - alpha).abs() <= tol * (1.0 + alpha.abs()))
            alpha = torch.where(f == 0, alpha, torch.where(ok, newton, 0.5 * (lo + hi)))
            done = ((hi - lo).abs() <= tol * (1.0 + alpha.abs())) | (f == 0) | step_small
            if bool((done | ~finite).all()):
                break
        return alpha.to(y.dtype)


def planar_inverse_step(x: torch.Tensor, w: torch.Tensor, u_hat: torch.Tensor, b: torch.Tensor):
    """Inverse of :func:`planar_step`: the z with ``z + u_hat tanh(w.z + b) = x``, and ``-log|det|``.

    The map moves z along ``u_hat`` only, so ``alpha = w . z`` solves the scalar equation
    ``alpha + (w.u_hat) tanh(alpha + b) = w . x``; then ``z = x - u_hat tanh(alpha + b)``.
    Gradients: the root is found without autograd, then one differentiable Newton step from it
    gives the exact first-order gradients (implicit function theorem).
    """
    c = (w * u_hat).sum()
    y = x @ w
    alpha0 = planar_solve_alpha(y, c, b)
    t0 = torch.tanh(alpha0 + b)
    alpha = alpha0 - (alpha0 + c * t0 - y) / (1.0 + c * (1.0 - t0 * t0))
    t = torch.tanh(alpha + b)
    z = x - t[:, None] * u_hat
    logdet = -torch.log(torch.abs(1.0 + (1.0 - t * t) * c))
    return z, logdet


def planar_stack_inverse(x: torch.Tensor, w: torch.Tensor, u_hat: torch.Tensor, b: torch.Tensor):
    """Inverse of :func:`planar_stack` (layers undone from ``K-1`` down to 0)."""
    logdet = x.new_zeros(x.shape[0])
    for k in reversed(range(w.shape[0])):
        x, ld = planar_inverse_step(x, w[k], u_hat[k], b[k])
        logdet = logdet + ld
    return x, logdet


def radial_params(alpha_raw: torch.Tensor, beta_raw: torch.Tensor):
    """``alpha = softplus(alpha_raw) > 0`` and ``beta = -alpha + softplus(beta_raw) > -alpha``."""
    alpha = F.softplus(alpha_raw)
    return alpha, -alpha + F.softplus(beta_raw)


def radial(z: torch.Tensor, z0: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """The radial map ``z + beta/(alpha + r) (z - z0)`` on ``z [B, d]`` and its log|det| ``[B]``."""
    d = z.shape[1]
    diff = z - z0
    r = diff.norm(dim=1)
    h = 1.0 / (alpha + r)
    bh = beta * h
    out = z + bh[:, None] * diff
    # 1 + beta h + beta h'(r) r  with h' = -h^2:  1 + beta h (1 - h r) = 1 + beta h^2 alpha
    logdet = (d - 1) * torch.log1p(bh) + torch.log1p(bh * h * alpha)
    return out, logdet


def radial_inverse(x: torch.Tensor, z0: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """Closed-form inverse of :func:`radial` through the radius, and ``-log|det|``.

    With ``r' = |x - z0|`` the original radius solves ``r (1 + beta/(alpha + r)) = r'``, i.e.
    ``r^2 + (alpha + beta - r') r - alpha r' = 0``; its non-negative root is taken in the form
    that does not cancel. Then ``z = z0 + (x - z0) / (1 + beta/(alpha + r))``.
    """
    diff = x - z0
    rp = diff.norm(dim=1)
    p = alpha + beta - rp
    q = torch.sqrt(p * p + 4.0 * alpha * rp)
    r = torch.where(p >= 0, 2.0 * alpha * rp / torch.where(p + q > 0, p + q, 1.0), 0.5 * (q - p))
    h = 1.0 / (alpha + r)
    bh = beta * h
    z = z0 + diff / (1.0 + bh)[:, None]
    d = x.shape[1]
    logdet = -((d - 1) * torch.log1p(bh) + torch.log1p(bh * h * alpha))
    return z, logdet


__all__ = ["planar_u_hat", "planar_step", "planar_stack", "planar_solve_alpha", "planar_inverse_step",
           "planar_stack_inverse", "radial_params", "radial", "radial_inverse"]
