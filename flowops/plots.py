"""Diagnostic figures for trained 2-D flows (matplotlib, Agg canvas: no display needed).

:func:`moons_figure` draws, in one PNG: the training data, the learned density, samples, the
deformation of a latent grid by the generative map, the latent scatter of held-out data with 1- and
2-sigma circles, the squared-norm QQ plot against chi-square(2), and the training NLL curve.
"""
from __future__ import annotations

import math
import numpy as np
import torch

__all__ = ["moons_figure", "chi2_2_quantiles", "image_grid", "sample_grid_figure"]

_DATA = "#1f4e79"
_SAMPLE = "#b5462f"
_CURVES = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def chi2_2_quantiles(p) -> np.ndarray:
    """Quantiles of the chi-square distribution with 2 degrees of freedom (an exponential of mean 2)."""
    p = np.asarray(p, dtype=np.float64)
    return -2.0 * np.log1p(-p)


def _histories(history):
    """Normalizes ``history`` to a list of (label, nll list, heldout or None)."""
    if history is None:
        return []
    if hasattr(history, "nll"):
        history = [history]
    history = list(history)
    if history and all(isinstance(v, (int, float)) for v in history):
        return [("train", [float(v) for v in history], None)]
    out = []
    for i, h in enumerate(history):
        label = getattr(h, "backend", f"run {i}")
        if i > 0 and label == out[0][0]:
            label = f"{label} ({i})"
        out.append((label, list(h.nll), getattr(h, "heldout_nll", None)))
    return out


def _moving_average(v: np.ndarray, window: int) -> np.ndarray:
    if len(v) < window or window < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    head = c[1:window] / np.arange(1, window)
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def _limits(x: np.ndarray, margin: float = 0.25):
    lo, hi = np.percentile(x, 0.2, axis=0), np.percentile(x, 99.8, axis=0)
    pad = margin * (hi - lo).max()
    return (lo[0] - pad, hi[0] + pad), (lo[1] - pad, hi[1] + pad)


@torch.no_grad()
def moons_figure(model, train_x: torch.Tensor, heldout_x: torch.Tensor, history, path: str,
                 n_samples: int = 5000, grid: int = 200, seed: int = 0, title: str | None = None) -> str:
    """Writes the diagnostics figure of a trained 2-D flow to ``path`` (PNG) and returns the path.

    Args:
        model: a :class:`flowops.Flow` on 2-D data (``log_prob``, ``sample``, ``forward``, ``inverse``).
        train_x: training points ``[n, 2]`` to show (a subsample is drawn).
        heldout_x: held-out points ``[m, 2]``, pushed to the latent space for the Gaussianity checks.
        history: a :class:`flowops.train.History`, a list of them (one curve each), or a list of
            per-step NLL values.
        path: the PNG to write.
        n_samples: points drawn from the flow for the sample panel.
        grid: resolution of the density heatmap (``grid x grid`` evaluations).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    was = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        to = dict(dtype=dtype, device=device)
        tx = train_x.detach().cpu().double().numpy()
        hx = heldout_x.to(**to)
        (x0, x1), (y0, y1) = _limits(tx)

        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        show = tx[torch.randperm(len(tx), generator=gen)[:n_samples].numpy()]

        gx = torch.linspace(x0, x1, grid, dtype=torch.float64)
        gy = torch.linspace(y0, y1, grid, dtype=torch.float64)
        yy, xx = torch.meshgrid(gy, gx, indexing="ij")
        pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(**to)
        density = model.log_prob(pts).double().exp().reshape(grid, grid).cpu().numpy()

        z0 = torch.randn(n_samples, 2, generator=gen, dtype=torch.float64).to(**to)
        samples = model.inverse(z0)[0].double().cpu().numpy()

        z = model.forward(hx)[0].double().cpu().numpy()
        r2 = np.sort((z ** 2).sum(1))

        fig = Figure(figsize=(21, 10), dpi=100, layout="constrained")
        gs = fig.add_gridspec(2, 4)
        axes = [fig.add_subplot(gs[0, i]) for i in range(4)] + [fig.add_subplot(gs[1, 0]),
                                                                 fig.add_subplot(gs[1, 1]),
                                                                 fig.add_subplot(gs[1, 2:])]
        a_data, a_dens, a_samp, a_grid, a_lat, a_qq, a_nll = axes

        def frame(ax, t):
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_aspect("equal")
            ax.set_title(t)
            ax.set_xlabel("$x_1$")
            ax.set_ylabel("$x_2$")

        a_data.scatter(show[:, 0], show[:, 1], s=2, c=_DATA, alpha=0.5, linewidths=0)
        frame(a_data, f"training data ({len(show)} of the points)")

        im = a_dens.imshow(density, origin="lower", extent=(x0, x1, y0, y1), cmap="viridis",
                           interpolation="bilinear", aspect="equal")
        fig.colorbar(im, ax=a_dens, shrink=0.75, label="$p(x)$")
        frame(a_dens, "learned density exp(log_prob)")

        a_samp.scatter(samples[:, 0], samples[:, 1], s=2, c=_SAMPLE, alpha=0.5, linewidths=0)
        frame(a_samp, f"{n_samples} samples from the flow")

        # A regular latent grid pushed through the generative map x = f^{-1}(z).
        a_grid.scatter(show[:, 0], show[:, 1], s=1, c="0.8", alpha=0.5, linewidths=0, zorder=0)
        levels = np.linspace(-3, 3, 13)
        line = torch.linspace(-3.5, 3.5, 400, dtype=torch.float64)
        for c in levels:
            for vertical, col in ((True, _CURVES[0]), (False, _CURVES[1])):
                zz = torch.stack([torch.full_like(line, c), line] if vertical else [line, torch.full_like(line, c)], 1)
                xl = model.inverse(zz.to(**to))[0].double().cpu().numpy()
                a_grid.plot(xl[:, 0], xl[:, 1], color=col, lw=2.0 if c == 0 else 0.8, alpha=0.85)
        frame(a_grid, "latent grid $z \\in [-3, 3]^2$ through the generative map")
        a_grid.text(0.02, 0.02, "blue: $z_1$ = const, red: $z_2$ = const (thick: 0), step 0.5",
                    transform=a_grid.transAxes, fontsize=8, color="0.3")

        lim = 4.0
        a_lat.scatter(z[:, 0], z[:, 1], s=1.5, c=_DATA, alpha=0.35, linewidths=0)
        lines = []
        for r, expect in ((1.0, 1 - math.exp(-0.5)), (2.0, 1 - math.exp(-2.0))):
            a_lat.add_patch(Circle((0, 0), r, fill=False, color="k", lw=1.2, ls="--"))
            inside = float((r2 <= r * r).mean()) if len(r2) else float("nan")
            lines.append(f"inside {int(r)}$\\sigma$: {inside:.1%} (N(0, I): {expect:.1%})")
        a_lat.text(0.03, 0.97, "\n".join(lines), transform=a_lat.transAxes, va="top", fontsize=9,
                   bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
        a_lat.set_xlim(-lim, lim)
        a_lat.set_ylim(-lim, lim)
        a_lat.set_aspect("equal")
        a_lat.set_title(f"held-out data in latent space ({len(z)} points)")
        a_lat.set_xlabel("$z_1$")
        a_lat.set_ylabel("$z_2$")

        n = len(r2)
        if n:
            p = (np.arange(n) + 0.5) / n
            theo = chi2_2_quantiles(p)
            keep = np.unique(np.concatenate([np.linspace(0, n - 1, min(n, 400)).astype(int),
                                            np.arange(max(0, n - 200), n)]))  # dense in the tail
            a_qq.plot(theo[keep], r2[keep], ".", ms=3, c=_DATA)
            top = 1.1 * theo[-1]
            a_qq.plot([0, top], [0, top], "k--", lw=1, label="y = x")
            a_qq.set_xlim(0, top)
            a_qq.set_ylim(0, top)
            a_qq.set_aspect("equal")
            beyond = int((r2 > top).sum())
            if beyond:
                a_qq.text(0.97, 0.03, f"{beyond} point(s) above {top:.0f} not shown", transform=a_qq.transAxes,
                          ha="right", fontsize=8, color="0.3")
            a_qq.legend(loc="upper left")
        a_qq.set_title("QQ: $\\|z\\|^2$ of held-out data vs $\\chi^2_2$")
        a_qq.set_xlabel("$\\chi^2_2$ quantile")
        a_qq.set_ylabel("empirical quantile of $\\|z\\|^2$")

        curves = _histories(history)
        lo_y = []
        for i, (label, nll, heldout) in enumerate(curves):
            col = _CURVES[i % len(_CURVES)]
            v = np.asarray(nll, dtype=np.float64)
            steps = np.arange(1, len(v) + 1)
            a_nll.plot(steps, v, color=col, alpha=0.2, lw=0.6)
            a_nll.plot(steps, _moving_average(v, 50), color=col, lw=1.6, ls="-" if i == 0 else "--",
                       label=f"{label}: batch NLL (50-step mean)")
            if heldout is not None and math.isfinite(heldout):
                a_nll.axhline(heldout, color=col, ls=":", lw=1.4, label=f"{label}: held-out NLL {heldout:.3f}")
            finite = v[np.isfinite(v)]
            if len(finite):
                lo_y.append(np.percentile(finite, 0.5))
        if lo_y:
            first = [np.asarray(c[1][:20], dtype=np.float64) for c in curves]
            hi = max(float(np.nanmax(f)) for f in first if len(f))
            lo = min(lo_y)
            a_nll.set_ylim(lo - 0.1 * (hi - lo), hi + 0.05 * (hi - lo))
            a_nll.legend(loc="upper right")
        a_nll.set_title("training NLL (nats per point)")
        a_nll.set_xlabel("step")
        a_nll.set_ylabel("NLL")
        a_nll.grid(alpha=0.3)

        if title:
            fig.suptitle(title)
        fig.savefig(path, dpi=100)
    finally:
        model.train(was)
    return path


def image_grid(images, cols: int | None = None, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tiles ``images`` (``[N, H, W]`` or ``[N, 1, H, W]``, values in [0, 1]) into one 2-D array.

    ``cols`` images per row (default: about ``sqrt(N)``), ``pad`` pixels of ``pad_value`` between and
    around them. Values are clipped to [0, 1].
    """
    a = images.detach().cpu().double().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, float)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise ValueError(f"image_grid: images must have one channel, got shape {a.shape}")
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"image_grid: images must have shape [N, H, W] or [N, 1, H, W], got {a.shape}")
    n, h, w = a.shape
    if n == 0:
        raise ValueError("image_grid: no images")
    cols = int(cols) if cols else int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), float(pad_value))
    for k in range(n):
        r, c = divmod(k, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a[k]
    return np.clip(out, 0.0, 1.0)


def sample_grid_figure(panels, path: str, cols: int = 8, title: str | None = None, invert: bool = True) -> str:
    """Writes a PNG of image grids side by side, one per ``(label, images)`` in ``panels``, and returns ``path``.

    ``images`` are ``[N, 1, H, W]`` (or ``[N, H, W]``) tensors with values in [0, 1] (0 = background);
    each panel tiles them ``cols`` per row under its label. ``invert`` draws dark strokes on white.
    Typical use: real images next to samples at two temperatures.
    """
    from matplotlib.figure import Figure

    panels = list(panels.items()) if isinstance(panels, dict) else list(panels)
    if not panels:
        raise ValueError("sample_grid_figure: panels must not be empty")
    grids = [(str(label), image_grid(images, cols, pad=1, pad_value=0.3)) for label, images in panels]
    aspect = max(g.shape[0] / g.shape[1] for _, g in grids)
    fig = Figure(figsize=(3.2 * len(grids) + 0.4, 3.2 * aspect + (0.9 if title else 0.6)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (label, grid) in zip(axes, grids):
        ax.imshow(1.0 - grid if invert else grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    return path
