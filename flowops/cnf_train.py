"""``flowops train ffjord``: an FFJORD continuous flow fitted to 2-moons, with the demo's diagnostics.

The recipe (defaults, sized to finish in a few minutes on a 2-core CPU): one CNF block whose vector field
is an MLP ``[z, t] -> 64 -> 64 -> 64 -> 2`` with tanh (:class:`flowops.nn.MLPVectorField`), the exact trace
(d = 2: two basis probes riding in the same GEMMs as the state, through :func:`flowops.ops.mlp_trace`),
integrated over ``t in [0, 1]`` with fixed-step RK4 (``--solver rk4``, ``--step-size 0.125``: 8 steps, 32
evaluations per solve); Adam at lr 3e-3 annealed by a cosine to 0, batch 256, gradient-norm clipping at 5,
1500 steps. Data, standardization, held-out sample (20,000 points from another seed) and NLL units (nats
per point, raw data) are those of ``flowops train moons`` (see :mod:`flowops.train`). The held-out NLL is
evaluated with the exact trace and the adaptive dopri5 solver (``--eval-tol``), so the discretization of the
training solver does not flatter it.

``--compare`` trains a twin (same initial weights, same batches) whose trace runs through FFJORD's
reference formulation (``torch.autograd.grad(..., create_graph=True)`` per dimension, a double backward in
training) under ``flowops.use_backend("reference")``, in lockstep with the fused run, and reports the time
per iteration and the function evaluations per solve of both. ``--compare-steps N`` trains the twin for the
first N steps only (a shorter timing run; its NLL is then not comparable).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from typing import Sequence

import torch

from . import _backend


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowops train ffjord",
        description="Fit an FFJORD continuous normalizing flow to 2-moons by maximum likelihood; report the "
                    "held-out NLL in nats, time per iteration and function evaluations per solve, and save the "
                    "diagnostics figure of the demo.")
    p.add_argument("--steps", type=int, default=1500, help="optimization steps (default 1500)")
    p.add_argument("--batch", type=int, default=256, help="fresh 2-moons points per step (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--schedule", default="cosine", choices=("constant", "cosine"),
                   help="learning-rate schedule (default cosine to 0)")
    p.add_argument("--hidden", type=int, default=64, help="hidden units per layer of the vector field (default 64)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers of the vector field (default 3)")
    p.add_argument("--activation", default="tanh", choices=("tanh", "softplus", "silu"),
                   help="activation of the vector field (default tanh)")
    p.add_argument("--trace", default="exact", choices=("exact", "hutchinson"),
                   help="trace estimator in training (default exact; the held-out NLL always uses exact)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per solve (default 1)")
    p.add_argument("--solver", default="rk4", help="torchdiffeq method in training (default rk4; e.g. dopri5)")
    p.add_argument("--step-size", type=float, default=0.125, help="step of fixed-step solvers (default 0.125)")
    p.add_argument("--atol", type=float, default=1e-4, help="adaptive solvers' atol in training (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-4, help="adaptive solvers' rtol in training (default 1e-4)")
    p.add_argument("--eval-tol", type=float, default=1e-5,
                   help="dopri5 atol = rtol for the held-out NLL and the figure (default 1e-5)")
    p.add_argument("--adjoint", action="store_true", help="backpropagate with the adjoint method")
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping threshold, 0 = off (default 5)")
    p.add_argument("--noise", type=float, default=0.05, help="2-moons noise level (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data streams (default 0)")
    p.add_argument("--heldout", type=int, default=20000, help="held-out points for the NLL (default 20000)")
    p.add_argument("--backend", default="auto", choices=_backend.BACKENDS,
                   help="backend of the main run (default auto: the fused op)")
    p.add_argument("--compare", action="store_true",
                   help="also train the reference-trace twin in lockstep (time per iteration, NFE)")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="with --compare: train the twin for the first N steps only (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", default="flowops-ffjord.png", help="figure path (default ./flowops-ffjord.png)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the figure")
    p.add_argument("--plot-grid", type=int, default=120, help="density-heatmap resolution (default 120)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the metrics as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def build_model(args, standardize=None):
    from .flow import Flow
    from .models import FFJORD

    model = FFJORD(2, hidden=(args.hidden,) * args.depth, activation=args.activation, trace=args.trace,
                   probes=args.probes, solver=args.solver, atol=args.atol, rtol=args.rtol, adjoint=args.adjoint,
                   step_size=args.step_size)
    if standardize is None:
        return model
    flow = Flow(model.base, [standardize, *model.cnfs])
    return flow


def _cnfs(model):
    from .nn.cnf import CNF

    return [m for m in model.modules() if isinstance(m, CNF)]


class _EvalSolver:
    """Inside: exact trace and dopri5 at ``tol`` for every CNF of ``model``."""

    def __init__(self, model, tol):
        self.cnfs, self.tol = _cnfs(model), tol

    def __enter__(self):
        self.saved = [(c.trace, c.solver, c.atol, c.rtol) for c in self.cnfs]
        for c in self.cnfs:
            c.trace, c.solver, c.atol, c.rtol = "exact", "dopri5", self.tol, self.tol
        return self

    def __exit__(self, *exc):
        for c, (tr, so, a, r) in zip(self.cnfs, self.saved):
            c.trace, c.solver, c.atol, c.rtol = tr, so, a, r


def _check_args(args) -> bool:
    ints = {"steps": (args.steps, 0), "batch": (args.batch, 1), "hidden": (args.hidden, 1),
            "depth": (args.depth, 1), "probes": (args.probes, 1), "heldout": (args.heldout, 1),
            "threads": (args.threads, 1), "plot-grid": (args.plot_grid, 2)}
    for name, (value, lo) in ints.items():
        if value < lo:
            print(f"flowops train ffjord: --{name} must be >= {lo}, got {value}", file=sys.stderr)
            return False
    for name in ("lr", "step_size", "atol", "rtol", "eval_tol"):
        if not getattr(args, name) > 0:
            print(f"flowops train ffjord: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}",
                  file=sys.stderr)
            return False
    if args.compare_steps is not None and args.compare_steps < 1:
        print(f"flowops train ffjord: --compare-steps must be positive, got {args.compare_steps}", file=sys.stderr)
        return False
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        print("flowops train ffjord: needs torchdiffeq (pip install torchdiffeq)", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if not _check_args(args):
        return 2
    from . import data
    from .train import History, _finish, evaluate_nll, lr_factor, make_optimizer, num_threads, time_ratios

    clip = args.clip if args.clip > 0 else None
    with num_threads(args.threads):
        seed = args.seed
        train_x, heldout_x, sampler = data.moons_streams(args.noise, args.heldout, seed)
        std = data.Standardize.fit(train_x)
        torch.manual_seed(seed)
        model = build_model(args, std)
        runs = [(model, args.backend, args.steps)]
        if args.compare:
            twin_steps = args.steps if args.compare_steps is None else min(args.steps, args.compare_steps)
            runs.append((copy.deepcopy(model), "reference", twin_steps))
        fused_name = "reference" if args.backend == "reference" else "fused"
        fixed = args.solver in ("rk4", "euler", "midpoint", "explicit_adams", "implicit_adams")
        solver_opts = f" step {args.step_size:g}" if fixed else f" tol {args.atol:g}/{args.rtol:g}"
        print(f"FFJORD(features=2, hidden={args.hidden}x{args.depth}, {args.activation}) on 2-moons "
              f"(noise {args.noise}): trace {args.trace}, solver {args.solver}{solver_opts}"
              f"{', adjoint' if args.adjoint else ''}; batch {args.batch}, {args.steps} steps, lr {args.lr:g} "
              f"({args.schedule}), clip {clip}, {args.threads} thread(s), seed {seed}")
        states = []
        for m, backend, steps in runs:
            params = [p for p in m.parameters() if p.requires_grad]
            opt, opt_name = make_optimizer(params, args.lr)
            hist = History(backend=fused_name if backend != "reference" else "reference", optimizer=opt_name)
            states.append((m, backend, steps, params, opt, hist, []))
            for c in _cnfs(m):
                c.nfe_history.clear()
        bar = None
        if not args.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=args.steps, desc="ffjord", unit="step", mininterval=0.5, dynamic_ncols=True,
                       file=sys.stderr)
        for m in (r[0] for r in runs):
            m.train()
        torch.manual_seed(seed)
        try:
            for step in range(args.steps):
                x = sampler(args.batch)
                for m, backend, steps, params, opt, hist, nfes in states:
                    if step >= steps:
                        continue
                    for group in opt.param_groups:
                        group["lr"] = args.lr * lr_factor(args.schedule, step, args.steps)
                    t0 = time.perf_counter()
                    with _backend.use_backend(backend):
                        loss = -m.log_prob(x).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None
                                else torch.zeros(()))
                        opt.step()
                    hist.step_time.append(time.perf_counter() - t0)
                    hist.nll.append(float(loss.detach()))
                    hist.grad_norm.append(float(norm.detach()))
                    nfes.append(sum(c.last_nfe for c in _cnfs(m)))
                if bar is not None:
                    bar.set_postfix({"nll": f"{statistics.fmean(states[0][5].nll[-20:]):.3f}",
                                     "nfe": states[0][6][-1]}, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        t_eval = time.perf_counter()
        for m, backend, steps, params, opt, hist, nfes in states:
            with _backend.use_backend(backend if backend == "reference" else args.backend), \
                    _EvalSolver(m, args.eval_tol):
                hist.heldout_nll = evaluate_nll(m, heldout_x, batch=5000)
        eval_s = time.perf_counter() - t_eval
        fused, nfe_f = states[0][5], states[0][6]
        ok = math.isfinite(fused.heldout_nll)
        metrics = {"task": "ffjord", "steps": args.steps, "batch": args.batch, "lr": args.lr,
                   "schedule": args.schedule, "hidden": args.hidden, "depth": args.depth,
                   "activation": args.activation, "trace": args.trace, "probes": args.probes,
                   "solver": args.solver, "step_size": args.step_size, "atol": args.atol, "rtol": args.rtol,
                   "eval_tol": args.eval_tol, "adjoint": args.adjoint, "clip": clip, "noise": args.noise,
                   "seed": seed, "threads": args.threads, "heldout_points": args.heldout,
                   "torch": torch.__version__, "fused": fused.summary(),
                   "fused_nfe_per_solve_mean": statistics.fmean(nfe_f) if nfe_f else None,
                   "heldout_eval_s": eval_s}
        print(f"{fused.backend:<9}: train {fused.train_time:7.2f} s ({1e3 * fused.median_step:.1f} ms/iteration "
              f"median), NFE per solve {statistics.fmean(nfe_f) if nfe_f else float('nan'):.1f} (mean), held-out "
              f"NLL {fused.heldout_nll:.4f} nats (exact trace, dopri5 tol {args.eval_tol:g}; "
              f"last-100-step train NLL {fused.final_nll():.4f})")
        if args.compare:
            ref, nfe_r = states[1][5], states[1][6]
            n = min(len(ref.step_time), len(fused.step_time))
            ratio = time_ratios(fused, ref)[1]
            print(f"{'reference':<9}: train {ref.train_time:7.2f} s ({1e3 * ref.median_step:.1f} ms/iteration "
                  f"median over {ref.steps} steps), NFE per solve {statistics.fmean(nfe_r):.1f} (mean), held-out "
                  f"NLL {ref.heldout_nll:.4f} nats")
            print(f"time per iteration reference/fused: {ratio:.2f}x (median of per-step ratios over the "
                  f"{n} lockstep steps)")
            metrics.update(reference=ref.summary(), reference_nfe_per_solve_mean=statistics.fmean(nfe_r),
                           step_time_ratio=ratio, compare_steps=ref.steps)
            ok = ok and math.isfinite(ref.heldout_nll)
        if args.plot:
            from .plots import moons_figure

            path = os.path.abspath(args.out)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            title = (f"FFJORD(hidden {args.hidden}x{args.depth}, {args.activation}, {args.trace} trace, "
                     f"{args.solver}) on 2-moons, {args.steps} steps of {args.batch}: held-out NLL "
                     f"{fused.heldout_nll:.3f} nats, training {fused.train_time:.0f} s")
            t0 = time.perf_counter()
            with _backend.use_backend(args.backend), _EvalSolver(model, args.eval_tol), torch.no_grad():
                moons_figure(model, train_x, heldout_x, [s[5] for s in states], path, title=title,
                             grid=args.plot_grid, n_samples=3000)
            metrics["figure"] = path
            metrics["figure_s"] = time.perf_counter() - t0
            print(f"figure: {path}")
        return _finish(args.json, metrics, ok)


__all__ = ["main", "build_model"]
