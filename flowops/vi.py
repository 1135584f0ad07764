"""Flow-based variational inference: fit a flow q to an unnormalized target by maximizing the ELBO.

For a target density ``p(z) = p~(z) / Z`` known up to its normalizer, and a flow q whose samples
are ``x = f(z0)``, ``z0 ~ N(0, I)`` (the generative direction, :meth:`flowops.Flow.inverse`)::

    ELBO = E_q[log p~(x) - log q(x)] = log Z - KL(q || p) <= log Z
    log q(x) = log N(z0) - log|det df/dz0|

so ``-E_q[log q] = H[N] + E[log|det df/dz0|]``: the entropy of q is the base entropy PLUS the
expected log-det of the generative map. This is the sign flip against density evaluation, where
the log-det of the same map enters ``log q`` with a minus sign. Both come out of
:meth:`flowops.Flow.sample_and_log_prob` in one pass (sample, and score the samples through the
log-det of the generative direction); nothing ever needs ``Z`` or the normalizing direction,
which is why planar flows (whose generative direction is closed form and whose normalizing
direction needs Newton's method) are natural VI families. The gradient uses reparameterized
samples; maximizing the ELBO minimizes the reverse KL divergence ``KL(q || p)``.

Targets (:data:`TARGETS`): ``banana`` (a twisted Gaussian: ``z1 ~ N(0, a^2)``,
``z2 | z1 ~ N(b (z1^2 - a^2), 1)``, whose normalizer ``log Z = log(2 pi a)`` is known because the
twist is volume preserving), ``gaussian`` (a diagonal Gaussian with known ``log Z``) and the four
2-D energies ``U1 .. U4`` of Rezende & Mohamed (2015, table 1) with ``p~ = exp(-U)`` (``U2 .. U4``
with a soft wall outside ``|z1| <= 4`` that makes them normalizable, see :func:`energy`).

Any flowops flow with ``sample_and_log_prob`` can be the variational family: :func:`build_vi_flow`
makes a fused planar stack, a list of eager planar layers, radial layers or a RealNVP.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

__all__ = ["Target", "TARGETS", "banana", "gaussian", "energy", "make_target", "elbo", "estimate_elbo",
           "VIHistory", "fit_vi", "build_vi_flow", "FLOWS", "vi_figure", "main"]


# ------------------------------------------------------------------------------------------
# targets


@dataclass
class Target:
    """An unnormalized target: ``log_prob(z)`` is ``log p~(z)`` (``[n, dim]`` -> ``[n]``).

    ``log_z`` is ``log of the integral of p~`` where it is known in closed form (else None);
    ``extent`` ``(x0, x1, y0, y1)`` frames 2-D plots.
    """

    name: str
    dim: int
    log_density: Callable[[torch.Tensor], torch.Tensor]
    log_z: float | None = None
    extent: tuple = (-4.0, 4.0, -4.0, 4.0)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"target {self.name}: z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"target {self.name}: z must be [n, {self.dim}], got shape {tuple(z.shape)}")
        return self.log_density(z)


def banana(a: float = 1.5, b: float = 0.5) -> Target:
    """``log p~ = -z1^2 / (2 a^2) - (z2 - b (z1^2 - a^2))^2 / 2``; ``log Z = log(2 pi a)``."""
    a, b = float(a), float(b)
    if not a > 0:
        raise ValueError(f"banana: a must be positive, got {a}")

    def log_density(z):
        z1, z2 = z[:, 0], z[:, 1]
        return -0.5 * (z1 / a) ** 2 - 0.5 * (z2 - b * (z1 * z1 - a * a)) ** 2

    top = b * (6.25 * a * a - a * a) if b >= 0 else 3.0
    bottom = -b * a * a - 3.5 if b >= 0 else b * 8 * a * a
    return Target("banana", 2, log_density, math.log(2 * math.pi * a),
                  (-3.5 * a, 3.5 * a, min(bottom, -3.5), max(top, 3.5)))


def gaussian(mean: Sequence[float] = (1.0, -0.5), scale: Sequence[float] = (0.7, 1.6)) -> Target:
    """A diagonal Gaussian without its normalizer: ``log Z = d/2 log(2 pi) + sum log scale``."""
    mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    scale_t = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    if mean_t.shape != scale_t.shape:
        raise ValueError(f"gaussian: mean and scale must have the same length, got {mean_t.numel()} and "
                         f"{scale_t.numel()}")
    if not bool((scale_t > 0).all()):
        raise ValueError(f"gaussian: scale must be positive, got {scale_t.tolist()}")
    d = mean_t.numel()

    def log_density(z):
        m, s = mean_t.to(z), scale_t.to(z)
        return -0.5 * (((z - m) / s) ** 2).sum(1)

    log_z = 0.5 * d * math.log(2 * math.pi) + float(scale_t.log().sum())
    lo, hi = mean_t - 4 * scale_t, mean_t + 4 * scale_t
    extent = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])) if d >= 2 else (-4.0, 4.0, -4.0, 4.0)
    return Target("gaussian", d, log_density, log_z, extent)


def _w1(z1):
    return torch.sin(2 * math.pi * z1 / 4)


def _u1(z):
    z1 = z[:, 0]
    r = z.norm(dim=1)
    lse = torch.logsumexp(torch.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2]), 0)
    return 0.5 * ((r - 2) / 0.4) ** 2 - lse


def _wall(z1):
    # U2..U4 have no term confining z1, so exp(-U) has infinite mass on R^2 (an ELBO against it grows
    # without bound by spreading along z1). A soft wall outside the paper's [-4, 4] frame makes them proper
    # and leaves them unchanged inside it.
    return 0.5 * (torch.relu(z1.abs() - 4.0) / 0.2) ** 2


def _u2(z):
    return 0.5 * ((z[:, 1] - _w1(z[:, 0])) / 0.4) ** 2 + _wall(z[:, 0])


def _u3(z):
    z1, z2 = z[:, 0], z[:, 1]
    w1 = _w1(z1)
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    return -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2]),
                            0) + _wall(z1)


def _u4(z):
    z1, z2 = z[:, 0], z[:, 1]
    w1 = _w1(z1)
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    return -torch.logsumexp(torch.stack([-0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2]),
                            0) + _wall(z1)


_ENERGIES = {"U1": _u1, "U2": _u2, "U3": _u3, "U4": _u4}


def energy(name: str) -> Target:
    """The Rezende-Mohamed potential ``U1``..``U4``: ``log p~ = -U(z)`` (normalizer unknown).

    ``U2``..``U4`` as published do not confine ``z1`` (``exp(-U)`` has infinite mass); here they carry a soft
    wall ``0.5 (max(|z1| - 4, 0) / 0.2)^2``, zero inside the paper's ``[-4, 4]`` frame, so they are proper.
    """
    key = str(name).upper()
    if key not in _ENERGIES:
        raise ValueError(f"energy: name must be one of {tuple(_ENERGIES)}, got {name!r}")
    fn = _ENERGIES[key]
    return Target(key, 2, lambda z: -fn(z), None, (-4.0, 4.0, -4.0, 4.0))


TARGETS = ("banana", "gaussian", "U1", "U2", "U3", "U4")


def make_target(name: str) -> Target:
    """A target by name: one of :data:`TARGETS` (``u1`` works for ``U1``)."""
    if name == "banana":
        return banana()
    if name == "gaussian":
        return gaussian()
    if isinstance(name, str) and name.upper() in _ENERGIES:
        return energy(name)
    raise ValueError(f"target must be one of {TARGETS}, got {name!r}")


# ------------------------------------------------------------------------------------------
# the ELBO


def _check_flow(flow):
    if not hasattr(flow, "sample_and_log_prob"):
        raise TypeError(f"the variational family must have sample_and_log_prob (a flowops.Flow), got "
                        f"{type(flow).__name__}")


def elbo(flow, target: Target, n: int, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterized ELBO estimate from ``n`` samples of ``flow``: ``(objective, terms)``.

    ``terms[i] = log p~(x_i) - log q(x_i)`` (its mean is the ELBO estimate, differentiable in the
    flow's parameters); ``objective = mean(beta * log p~ - log q)``, the annealed ELBO (``beta = 1``:
    the ELBO itself).
    """
    _check_flow(flow)
    n = int(n)
    if n < 1:
        raise ValueError(f"elbo: n must be positive, got {n}")
    x, log_q = flow.sample_and_log_prob(n)
    log_p = target.log_prob(x)
    terms = log_p - log_q
    objective = terms.mean() if beta == 1.0 else (beta * log_p - log_q).mean()
    return objective, terms


@torch.no_grad()
def estimate_elbo(flow, target: Target, n: int = 20000, batch: int = 8192) -> tuple[float, float]:
    """ELBO estimate and its Monte Carlo standard error from ``n`` fresh samples (no gradients)."""
    terms = []
    left = int(n)
    while left > 0:
        m = min(batch, left)
        terms.append(elbo(flow, target, m)[1].double())
        left -= m
    t = torch.cat(terms)
    t = t[torch.isfinite(t)] if not bool(torch.isfinite(t).all()) else t
    if t.numel() == 0:
        return float("nan"), float("nan")
    se = float(t.std() / math.sqrt(t.numel())) if t.numel() > 1 else float("nan")
    return float(t.mean()), se


@dataclass
class VIHistory:
    """Per-step batch ELBO (at beta = 1), gradient norm and step time (s), and the final estimate."""

    elbo: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    step_time: list = field(default_factory=list)
    final_elbo: float | None = None
    final_stderr: float | None = None
    log_z: float | None = None

    @property
    def steps(self) -> int:
        return len(self.elbo)

    def summary(self) -> dict:
        return {"steps": self.steps, "train_time_s": float(sum(self.step_time)),
                "final_elbo": self.final_elbo, "final_stderr": self.final_stderr, "log_z": self.log_z,
                "gap": None if self.log_z is None or self.final_elbo is None else self.log_z - self.final_elbo}


def fit_vi(flow, target: Target, steps: int = 2000, batch: int = 256, lr: float = 5e-3, schedule: str = "cosine",
           anneal: int = 0, clip: float | None = 10.0, seed: int | None = None, progress: bool = True,
           eval_samples: int = 20000, desc: str = "vi") -> VIHistory:
    """Fits ``flow`` to ``target`` by maximizing the ELBO with reparameterized samples.

    Adam (foreach) at ``lr`` (``schedule`` ``"constant"`` or ``"cosine"`` to 0), ``batch`` fresh samples per
    step, gradient-norm clipping at ``clip`` (None: off). ``anneal > 0`` raises the weight of
    ``log p~`` linearly from 0.01 to 1 over the first ``anneal`` steps (Rezende & Mohamed's
    annealing, helpful for the multimodal energies). Finally the ELBO is estimated from
    ``eval_samples`` fresh samples (``final_elbo``, ``final_stderr``; 0 skips it).
    """
    from .train import lr_factor

    _check_flow(flow)
    if not isinstance(target, Target):
        raise TypeError(f"fit_vi: target must be a flowops.vi.Target, got {type(target).__name__}")
    steps, batch, anneal = int(steps), int(batch), int(anneal)
    if steps < 0:
        raise ValueError(f"fit_vi: steps must be non-negative, got {steps}")
    if batch < 1:
        raise ValueError(f"fit_vi: batch must be positive, got {batch}")
    if not lr > 0:
        raise ValueError(f"fit_vi: lr must be positive, got {lr}")
    lr_factor(schedule, 0, steps)
    if seed is not None:
        torch.manual_seed(int(seed))
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit_vi: the flow has no trainable parameters")
    # The multi-tensor (foreach) Adam: VI families are small, and on a shared CPU the fused step's
    # parallel region costs more than the arithmetic (waiting on a descheduled thread).
    opt = torch.optim.Adam(params, lr=lr, foreach=True)
    hist = VIHistory(log_z=target.log_z)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", mininterval=0.5, dynamic_ncols=True, file=sys.stderr)
    values, norms = [], []
    every = max(1, min(50, steps // 100 or 1))
    ema = None
    was = flow.training
    flow.train()
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(schedule, step, steps)
            beta = min(1.0, 0.01 + step / anneal) if anneal > 0 else 1.0
            objective, terms = elbo(flow, target, batch, beta)
            opt.zero_grad(set_to_none=True)
            (-objective).backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None else torch.zeros(())
            opt.step()
            hist.step_time.append(time.perf_counter() - t0)
            values.append(terms.detach().mean())
            norms.append(norm.detach())
            if bar is not None and (step % every == every - 1 or step == steps - 1):
                recent = float(torch.stack(values[-every:]).mean())
                ema = recent if ema is None else 0.8 * ema + 0.2 * recent
                post = {"elbo": f"{ema:.3f}"}
                if target.log_z is not None:
                    post["log Z"] = f"{target.log_z:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(step + 1 - bar.n)
    finally:
        if bar is not None:
            bar.close()
        flow.train(was)
    if values:
        hist.elbo = torch.stack(values).double().tolist()
        hist.grad_norm = torch.stack(norms).double().tolist()
    if eval_samples:
        hist.final_elbo, hist.final_stderr = estimate_elbo(flow, target, eval_samples)
    return hist


# ------------------------------------------------------------------------------------------
# variational families


FLOWS = ("planar", "planar-eager", "radial", "realnvp", "iaf")


def build_vi_flow(kind: str = "planar", dim: int = 2, layers: int = 32, hidden: int = 64):
    """A flow over ``dim`` features with a standard-normal base, for VI.

    ``planar``: one fused :class:`~flowops.nn.PlanarStack` of ``layers`` layers; ``planar-eager``:
    ``layers`` separate :class:`~flowops.nn.Planar` layers (the same family, one op per layer);
    ``radial``: ``layers`` :class:`~flowops.nn.Radial` layers; ``realnvp``: a RealNVP with
    ``layers`` affine couplings of ``hidden`` units; ``iaf``: ``layers`` IAF layers (MADE with two
    hidden layers of ``hidden`` units, alternating natural and reversed orders), whose generative
    direction is one MADE pass.
    """
    from .distributions import StandardNormal
    from .flow import Flow
    from .models import RealNVP
    from .nn import Planar, PlanarStack, Radial

    dim, layers = int(dim), int(layers)
    if layers < 1:
        raise ValueError(f"build_vi_flow: layers must be positive, got {layers}")
    if kind == "planar":
        return Flow(StandardNormal(dim), [PlanarStack(dim, layers)])
    if kind == "planar-eager":
        return Flow(StandardNormal(dim), [Planar(dim) for _ in range(layers)])
    if kind == "radial":
        return Flow(StandardNormal(dim), [Radial(dim) for _ in range(layers)])
    if kind == "realnvp":
        return RealNVP(dim, layers=layers, hidden=hidden)
    if kind == "iaf":
        from .nn import IAF

        return Flow(StandardNormal(dim), [IAF(dim, (hidden, hidden), order="natural" if i % 2 == 0 else "reversed")
                                          for i in range(layers)])
    raise ValueError(f"build_vi_flow: kind must be one of {FLOWS}, got {kind!r}")


# ------------------------------------------------------------------------------------------
# figure


def vi_figure(flow, target: Target, history: VIHistory | Sequence[float] | None, path: str,
              n_samples: int = 20000, grid: int = 200, title: str | None = None) -> str:
    """One PNG: the target density, a 2-D histogram of q's samples on the same frame, and the ELBO
    curve (with ``log Z`` where known). Returns ``path``."""
    import numpy as np
    from matplotlib.figure import Figure

    if target.dim != 2:
        raise ValueError(f"vi_figure: needs a 2-D target, got dim {target.dim}")
    x0, x1, y0, y1 = target.extent
    gx = torch.linspace(x0, x1, grid, dtype=torch.float64)
    gy = torch.linspace(y0, y1, grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    lp = target.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).reshape(grid, grid)
    dens = (lp - lp.max()).exp().numpy()
    with torch.no_grad():
        samples = flow.sample(int(n_samples)).double().cpu().numpy()

    fig = Figure(figsize=(16, 5), dpi=100, layout="constrained")
    a_t, a_q, a_e = (fig.add_subplot(1, 3, i + 1) for i in range(3))
    a_t.imshow(dens, origin="lower", extent=(x0, x1, y0, y1), aspect="auto", cmap="viridis")
    a_t.set_title(f"target {target.name}: exp(log p~) (unnormalized)")
    a_q.hist2d(samples[:, 0], samples[:, 1], bins=grid // 2, range=[[x0, x1], [y0, y1]], cmap="viridis")
    a_q.set_title(f"q: {len(samples)} samples of the fitted flow")
    for ax in (a_t, a_q):
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
    values = list(getattr(history, "elbo", history) or [])
    if values:
        v = np.asarray(values, dtype=np.float64)
        a_e.plot(np.arange(1, len(v) + 1), v, lw=0.5, alpha=0.4, color="#1f77b4", label="batch ELBO")
        w = max(1, len(v) // 50)
        if len(v) >= w > 1:
            smooth = np.convolve(v, np.ones(w) / w, mode="valid")
            a_e.plot(np.arange(w, len(v) + 1), smooth, color="#1f77b4", label=f"moving average ({w})")
        finite = v[np.isfinite(v)]
        if finite.size:
            lo = np.percentile(finite, 5)
            hi = finite.max() if target.log_z is None else max(finite.max(), target.log_z)
            a_e.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    if target.log_z is not None:
        a_e.axhline(target.log_z, color="k", ls="--", lw=1, label=f"log Z = {target.log_z:.3f}")
    final = getattr(history, "final_elbo", None)
    if final is not None:
        se = getattr(history, "final_stderr", None) or 0.0
        a_e.set_title(f"ELBO (final estimate {final:.3f} +- {se:.3f})")
    else:
        a_e.set_title("ELBO")
    a_e.set_xlabel("step")
    a_e.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------
# command line: flowops train vi


def _parser(prog: str = "flowops train vi") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Fit a flow to an unnormalized 2-D target by maximizing the "
                                "ELBO (reverse KL) with reparameterized samples; write the target density beside "
                                "the fitted q's samples and the ELBO curve to a PNG.")
    p.add_argument("--target", default="banana", choices=list(TARGETS), help="target density (default banana)")
    p.add_argument("--flow", default="planar", choices=list(FLOWS),
                   help="variational family (default planar: the fused planar stack)")
    p.add_argument("--layers", type=int, default=32, help="flow layers (default 32)")
    p.add_argument("--hidden", type=int, default=64, help="RealNVP hidden units (default 64)")
    p.add_argument("--steps", type=int, default=3000, help="optimization steps (default 3000)")
    p.add_argument("--batch", type=int, default=256, help="samples of q per step (default 256)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="learning-rate schedule")
    p.add_argument("--anneal", type=int, default=None,
                   help="steps of linear annealing of log p~ from 0.01 to 1 (default: 0 for banana and gaussian, "
                        "steps/4 for U1..U4)")
    p.add_argument("--eval-samples", type=int, default=20000, help="samples for the final ELBO estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="figure path (default ./flowops-vi-<target>.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--json", metavar="PATH", help="write the run summary and ELBO curve here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``flowops train vi [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    for name in ("layers", "steps", "batch"):
        v = getattr(args, name)
        if v < (0 if name == "steps" else 1):
            print(f"flowops train vi: --{name} must be {'non-negative' if name == 'steps' else 'positive'}, "
                  f"got {v}", file=sys.stderr)
            return 2
    if not args.lr > 0:
        print(f"flowops train vi: --lr must be positive, got {args.lr}", file=sys.stderr)
        return 2
    from .train import num_threads

    with num_threads(args.threads):
        torch.manual_seed(args.seed)
        target = make_target(args.target)
        flow = build_vi_flow(args.flow, target.dim, args.layers, args.hidden)
        anneal = args.anneal if args.anneal is not None else (args.steps // 4 if target.name.startswith("U") else 0)
        what = f"{args.flow} flow ({args.layers} layers)"
        print(f"VI: {what} -> target {target.name}" + (f" (log Z = {target.log_z:.4f})" if target.log_z is not None
                                                      else " (log Z unknown)"))
        hist = fit_vi(flow, target, args.steps, args.batch, args.lr, args.schedule, anneal, seed=args.seed,
                      progress=not args.quiet, eval_samples=args.eval_samples, desc=f"vi {target.name}")
        s = hist.summary()
        line = f"final ELBO {s['final_elbo']:.4f} +- {s['final_stderr']:.4f} (MC standard error, " \
               f"{args.eval_samples} samples)" if s["final_elbo"] is not None else "no final estimate"
        print(line)
        if s["gap"] is not None:
            print(f"log Z - ELBO = KL(q || p) estimate: {s['gap']:.4f} nats")
        print(f"training time {s['train_time_s']:.1f} s ({args.steps} steps, batch {args.batch})")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"config": vars(args), "summary": s, "history": asdict(hist)}, fh, indent=1)
            print(f"wrote {args.json}")
        if not args.no_plot and target.dim == 2:
            path = args.out or f"flowops-vi-{target.name}.png"
            vi_figure(flow, target, hist, path, title=f"{what} fitted to {target.name} by maximizing the ELBO, "
                      f"{args.steps} steps")
            print(f"wrote {path}")
        if s["final_elbo"] is not None and not math.isfinite(s["final_elbo"]):
            print("error: the final ELBO is not finite (training diverged)", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
