"""Training by maximum likelihood, and the 2-moons example end to end (``flowops train moons``).

The recipe (RealNVP on 2-moons): six affine couplings with two-hidden-layer MLPs of 64 units,
Adam at lr 1e-3 (the fused single-kernel step where torch supports it), batch 256, 3000 steps,
gradient-norm clipping at 5. The learning rate follows a cosine from 1e-3 down to 0 over the run
(``--schedule constant`` keeps it at 1e-3): with a constant rate the last iterate wanders, and its
held-out NLL moves by several hundredths of a nat from one step to the next; annealed, it settles,
and two runs from the same seed end within about 0.002 nats of each other.

Every step draws a fresh batch from the 2-moons distribution (``noise=0.05``), so there is no fixed
training set; the held-out NLL is measured on a separate sample of 20,000 points from another seed.
All NLLs are in nats per point, in the units of the raw data: the fixed standardization layer in
front of the couplings (fitted on 10,000 points of a third stream) contributes its log-det to
``log_prob`` (see :class:`flowops.data.Standardize`).

``--compare`` trains a second copy of the model (same initial weights, same batches in the same
order) with every op forced to the plain-PyTorch reference (``flowops.use_backend("reference")``).
The two runs advance in lockstep, one step each in turn, so both see the same machine load and the
time ratio is measured in one run; the training times count only the optimization steps (forward,
backward, clipping, Adam), not data generation, evaluation or plotting.

The functions :func:`train_flow`, :func:`train_flows` and :func:`evaluate_nll` are reusable for any
flow with ``log_prob``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from . import _backend

__all__ = ["History", "make_optimizer", "lr_factor", "train_flow", "train_flows", "evaluate_nll",
           "build_moons_model", "main"]


@dataclass
class History:
    """What one training run recorded: per-step batch NLL (nats), gradient norm and step time (s)."""

    backend: str
    optimizer: str = ""
    nll: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    step_time: list = field(default_factory=list)
    heldout_nll: float | None = None

    @property
    def steps(self) -> int:
        return len(self.nll)

    @property
    def train_time(self) -> float:
        """Seconds spent in optimization steps (forward, backward, clip, update)."""
        return float(sum(self.step_time))

    @property
    def median_step(self) -> float:
        return float(statistics.median(self.step_time)) if self.step_time else float("nan")

    def final_nll(self, last: int = 100) -> float:
        """Mean training-batch NLL over the last ``last`` steps."""
        tail = self.nll[-last:]
        return float(sum(tail) / len(tail)) if tail else float("nan")

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("nll", "grad_norm", "step_time"):
            d.pop(k)
        d.update(steps=self.steps, train_time_s=self.train_time, median_step_ms=1e3 * self.median_step,
                 final_train_nll=self.final_nll())
        return d


def make_optimizer(params, lr: float):
    """Adam with the fused single-kernel step when this torch/device supports it, else the default."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True), "Adam(fused)"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr), "Adam"


def _backend_name(backend: str | None, device) -> str:
    if backend is None:
        return _backend.select(torch.device(device))
    with _backend.use_backend(backend):
        return _backend.select(torch.device(device))


SCHEDULES = ("constant", "cosine")


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (unchanged for None or 0), then restore the count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning-rate multiplier at ``step`` of ``steps``: 1, or a cosine from 1 down to 0."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def train_flows(models: Sequence[torch.nn.Module], sampler: Callable[[int], torch.Tensor], steps: int,
                batch: int, lr: float = 1e-3, seed: int | None = None, clip: float | None = 5.0,
                backends: Sequence[str | None] | None = None, progress: bool = True,
                desc: str = "train", schedule: str = "constant") -> list[History]:
    """Trains several flows by maximum likelihood on the same batches, one step each in turn.

    Each step draws one batch ``sampler(batch)`` and applies it to every model in order, model ``i``
    under ``flowops.use_backend(backends[i])`` (``None``: the current backend). Lockstep training
    makes timing comparisons fair on a busy machine; with one model this is plain training.
    ``schedule`` is ``"constant"`` or ``"cosine"`` (``lr`` annealed to 0 at the last step). ``seed``
    seeds torch's global generator first (for stochastic layers). Returns one :class:`History` per
    model.
    """
    models = list(models)
    if not models:
        raise ValueError("train_flows: models must not be empty")
    backends = [None] * len(models) if backends is None else list(backends)
    if len(backends) != len(models):
        raise ValueError(f"train_flows: got {len(models)} models but {len(backends)} backends")
    steps, batch = int(steps), int(batch)
    if steps < 0:
        raise ValueError(f"train_flows: steps must be non-negative, got {steps}")
    if batch < 1:
        raise ValueError(f"train_flows: batch must be positive, got {batch}")
    lr_factor(schedule, 0, steps)  # validates the name
    if seed is not None:
        torch.manual_seed(int(seed))

    runs = []
    for model, backend in zip(models, backends):
        params = [p for p in model.parameters() if p.requires_grad]
        opt, opt_name = make_optimizer(params, lr)
        device = params[0].device if params else torch.device("cpu")
        runs.append((model, backend, params, opt,
                     History(backend=_backend_name(backend, device), optimizer=opt_name), [], []))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", mininterval=0.5, dynamic_ncols=True, file=sys.stderr)
    was_training = [m.training for m in models]
    for m in models:
        m.train()
    clock = time.perf_counter
    ema = [None] * len(runs)
    every = max(1, min(50, steps // 100 or 1))
    try:
        for step in range(steps):
            x = sampler(batch)
            step_lr = lr * lr_factor(schedule, step, steps)
            for i, (model, backend, params, opt, hist, losses, norms) in enumerate(runs):
                ctx = _backend.use_backend(backend) if backend is not None else contextlib.nullcontext()
                if schedule != "constant":
                    for group in opt.param_groups:
                        group["lr"] = step_lr
                t0 = clock()
                with ctx:
                    loss = -model.log_prob(x).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip is not None:
                        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
                    else:
                        norm = torch.zeros(())
                    opt.step()
                hist.step_time.append(clock() - t0)
                losses.append(loss.detach())
                norms.append(norm.detach())
            if bar is not None and (step % every == every - 1 or step == steps - 1):
                post = {}
                for i, run in enumerate(runs):
                    recent = float(torch.stack(run[5][-every:]).mean())
                    ema[i] = recent if ema[i] is None else 0.8 * ema[i] + 0.2 * recent
                    post[f"nll[{run[4].backend}]" if len(runs) > 1 else "nll"] = f"{ema[i]:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(step + 1 - bar.n)
    finally:
        if bar is not None:
            bar.close()
        for m, was in zip(models, was_training):
            m.train(was)
    out = []
    for model, backend, params, opt, hist, losses, norms in runs:
        if losses:
            hist.nll = torch.stack(losses).double().tolist()
            hist.grad_norm = torch.stack(norms).double().tolist()
        out.append(hist)
    return out


def train_flow(model: torch.nn.Module, sampler: Callable[[int], torch.Tensor], steps: int, batch: int,
               lr: float = 1e-3, seed: int | None = None, clip: float | None = 5.0, progress: bool = True,
               backend: str | None = None, desc: str = "train", schedule: str = "constant") -> History:
    """Trains ``model`` (anything with ``log_prob``) by minimizing the batch-mean NLL.

    Adam (fused where supported) at ``lr`` (``schedule`` "constant" or "cosine"), gradient-norm
    clipping at ``clip`` (None: off), a fresh batch ``sampler(batch)`` per step. Returns the
    :class:`History`.
    """
    return train_flows([model], sampler, steps, batch, lr, seed, clip, [backend], progress, desc, schedule)[0]


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, x: torch.Tensor, batch: int = 65536) -> float:
    """Mean negative log-likelihood of ``x`` under ``model`` in nats per point (no gradients, eval mode)."""
    was = model.training
    model.eval()
    try:
        total, n = 0.0, x.shape[0]
        for i in range(0, n, batch):
            total += float(model.log_prob(x[i:i + batch]).double().sum())
    finally:
        model.train(was)
    return -total / n if n else float("nan")


def build_moons_model(layers: int = 6, hidden: int = 64, standardize=None) -> torch.nn.Module:
    """RealNVP(features=2) with an optional fixed :class:`~flowops.data.Standardize` layer in front."""
    from .flow import Flow
    from .models import RealNVP

    flow = RealNVP(2, layers=layers, hidden=hidden)
    if standardize is None:
        return flow
    return Flow(flow.base, [standardize, flow.transform])


def _parser(prog: str, compare_default: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fit a RealNVP (affine couplings) to 2-moons by maximum likelihood; report the held-out NLL "
                    "in nats and training time, and save a diagnostics figure.")
    p.add_argument("--steps", type=int, default=3000, help="optimization steps (default 3000)")
    p.add_argument("--batch", type=int, default=256, help="fresh 2-moons points per step (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="learning-rate schedule: cosine from --lr to 0 (default), or constant")
    p.add_argument("--layers", type=int, default=6, help="affine coupling layers (default 6)")
    p.add_argument("--hidden", type=int, default=64, help="hidden units of each conditioner MLP (default 64)")
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping threshold, 0 = off (default 5)")
    p.add_argument("--noise", type=float, default=0.05, help="2-moons noise level (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data streams (default 0)")
    p.add_argument("--heldout", type=int, default=20000, help="held-out points for the NLL (default 20000)")
    p.add_argument("--backend", default="auto", choices=_backend.BACKENDS,
                   help="backend of the main run (default auto: the fused C++ op on CPU where built)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="train on raw coordinates instead of standardized ones (NLL units are the raw data's "
                        "either way)")
    p.add_argument("--compare", dest="compare", action="store_true",
                   help="also train the same model on the same batches with the plain-PyTorch reference ops"
                        + (" (default on)" if compare_default else ""))
    p.add_argument("--no-compare", dest="compare", action="store_false", help="train the fused model only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these matrices are too small to gain from more)")
    p.add_argument("--out", default="flowops-moons.png", help="figure path (default ./flowops-moons.png)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the figure")
    p.add_argument("--json", metavar="PATH", default=None, help="write the metrics as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(compare=compare_default)
    return p


def _valid_counts(task: str, counts: dict, lr: float) -> bool:
    """Prints a usage error for a negative step count, a non-positive count or learning rate."""
    for name, value in counts.items():
        if value < (0 if name == "steps" else 1):
            print(f"flowops train {task}: --{name} must be {'non-negative' if name == 'steps' else 'positive'}, "
                  f"got {value}", file=sys.stderr)
            return False
    if not lr > 0:
        print(f"flowops train {task}: --lr must be positive, got {lr}", file=sys.stderr)
        return False
    return True


def time_ratios(fused: History, ref: History) -> tuple:
    """``(reference / fused training time, median of the per-step ratios over the steps both ran)``."""
    ratio = ref.train_time / fused.train_time if fused.train_time > 0 else float("nan")
    steps = [r / f for r, f in zip(ref.step_time, fused.step_time) if f > 0]
    return ratio, (statistics.median(steps) if steps else float("nan"))


def _report_comparison(fused, ref, metrics: dict) -> bool:
    """Prints and records the reference twin's run against the fused one; False if its NLL is not finite."""
    diff = fused.heldout_nll - ref.heldout_nll
    ratio, step_ratio = time_ratios(fused, ref)
    print(f"{'reference':<9} ({ref.optimizer}): train {ref.train_time:6.2f} s "
          f"({1e3 * ref.median_step:.2f} ms/step median)  held-out NLL {ref.heldout_nll:.4f} nats  "
          f"(last-100-step train NLL {ref.final_nll():.4f})")
    print(f"held-out NLL difference ({fused.backend} - reference): {diff:+.4f} nats; "
          f"training-time ratio reference/{fused.backend}: {ratio:.2f}x "
          f"(median per-step ratio {step_ratio:.2f}x)")
    metrics.update(reference=ref.summary(), nll_diff=diff, time_ratio=ratio, step_time_ratio=step_ratio)
    return math.isfinite(ref.heldout_nll)


def _finish(json_path, metrics: dict, ok: bool, what: str = "held-out NLL") -> int:
    """Writes the metrics JSON (when asked) and turns a diverged run into exit status 1."""
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(metrics, fh, indent=2)
        print(f"metrics: {os.path.abspath(json_path)}")
    if not ok:
        print(f"error: the {what} is not finite (training diverged)", file=sys.stderr)
        return 1
    return 0


def _moons(args) -> int:
    from . import data

    if not _valid_counts("moons", {n: getattr(args, n) for n in ("steps", "batch", "layers", "hidden", "heldout",
                                                                 "threads")}, args.lr):
        return 2
    clip = args.clip if args.clip > 0 else None
    with num_threads(args.threads):
        # Independent streams: training batches, the reference sample (standardization + the data
        # panel of the figure), and the held-out sample.
        seed = args.seed
        train_x, heldout_x, sampler = data.moons_streams(args.noise, args.heldout, seed)
        std = data.Standardize.fit(train_x) if args.standardize else None
        torch.manual_seed(seed)
        model = build_moons_model(args.layers, args.hidden, std)
        models, backends = [model], [args.backend]
        if args.compare:
            models.append(copy.deepcopy(model))  # identical initial weights
            backends.append("reference")
        fused_name = _backend_name(args.backend, "cpu")
        print(f"RealNVP(features=2, layers={args.layers}, hidden={args.hidden}) on 2-moons (noise {args.noise}): "
              f"batch {args.batch}, {args.steps} steps, lr {args.lr:g} ({args.schedule}), clip {clip}, "
              f"{args.threads} thread(s), "
              f"seed {seed}, standardize {'on' if args.standardize else 'off'}")
        if args.compare:
            print(f"training the '{fused_name}' model and the 'reference' model in lockstep on the same batches")
            if fused_name == "reference":
                print("note: no fused backend is available here (flowops info), both runs use the reference ops")
        histories = train_flows(models, sampler, args.steps, args.batch, args.lr, seed=seed, clip=clip,
                                backends=backends, progress=not args.quiet, desc="moons", schedule=args.schedule)
        for m, h, b in zip(models, histories, backends):
            with _backend.use_backend(b):
                h.heldout_nll = evaluate_nll(m, heldout_x)
        fused = histories[0]
        metrics = {
            "task": "moons", "steps": args.steps, "batch": args.batch, "lr": args.lr, "schedule": args.schedule,
            "layers": args.layers,
            "hidden": args.hidden, "clip": clip, "noise": args.noise, "seed": seed, "threads": args.threads,
            "standardize": args.standardize, "heldout_points": args.heldout, "torch": torch.__version__,
            "fused": fused.summary(),
        }
        print(f"{fused.backend:<9} ({fused.optimizer}): train {fused.train_time:6.2f} s "
              f"({1e3 * fused.median_step:.2f} ms/step median)  held-out NLL {fused.heldout_nll:.4f} nats  "
              f"(last-100-step train NLL {fused.final_nll():.4f})")
        ok = math.isfinite(fused.heldout_nll)
        if args.compare:
            ref = histories[1]
            # The same trained weights under the other backend: isolates the op from the training path.
            with _backend.use_backend("reference"):
                cross = evaluate_nll(models[0], heldout_x)
            ok = _report_comparison(fused, ref, metrics) and ok
            print(f"the {fused.backend}-trained model evaluated with the reference ops: {cross:.6f} nats "
                  f"(|diff| {abs(cross - fused.heldout_nll):.1e})")
            metrics.update(fused_model_reference_eval_nll=cross)
        if args.plot:
            from .plots import moons_figure

            path = os.path.abspath(args.out)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            title = (f"RealNVP(features=2, layers={args.layers}, hidden={args.hidden}) on 2-moons, {args.steps} steps "
                     f"of {args.batch}: held-out NLL {fused.heldout_nll:.3f} nats ({fused.backend}), "
                     f"training {fused.train_time:.1f} s")
            moons_figure(models[0], train_x, heldout_x, histories, path, title=title)
            metrics["figure"] = path
            print(f"figure: {path}")
        if args.json:
            metrics["history"] = {key: {"nll": h.nll, "grad_norm": h.grad_norm}
                                  for key, h in zip(("fused", "reference"), histories)}
        return _finish(args.json, metrics, ok)


MAF_DATA = ("moons", "breast_cancer")


def _maf_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowops train maf",
        description="Fit a MAF (masked autoregressive flow) by maximum likelihood to 2-moons or to the "
                    "breast-cancer tabular data set shipped with scikit-learn (30 features, standardized, "
                    "held-out split); report the held-out NLL in nats, the training time and, with --compare, "
                    "the same model trained with the plain-PyTorch reference ops (dense masks) on the same batches.")
    p.add_argument("--data", default="moons", choices=MAF_DATA, help="data set (default moons)")
    p.add_argument("--steps", type=int, default=None, help="optimization steps (default 3000 moons, 1000 breast_cancer: "
                   "455 training points overfit beyond that)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 256 moons, 128 breast_cancer)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, cosine-annealed)")
    p.add_argument("--transforms", type=int, default=None, help="MAF transforms (default 5 moons, 3 breast_cancer)")
    p.add_argument("--hidden", type=int, default=None, help="MADE hidden width, two layers (default 64)")
    p.add_argument("--permutation", default="reverse", choices=("reverse", "random", "none"),
                   help="order change between transforms (default reverse)")
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping, 0 = off (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, split and batches (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of breast_cancer (default 0.2)")
    p.add_argument("--heldout", type=int, default=20000, help="held-out 2-moons points (default 20000)")
    p.add_argument("--backend", default="auto", choices=_backend.BACKENDS, help="backend of the main run")
    p.add_argument("--compare", action="store_true", help="also train the reference-op model in lockstep")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the metrics as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_breast_cancer_split(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's breast-cancer features (569 x 30) as float32, split into train / held-out rows and
    standardized with the training rows' mean and std. Returns ``(train, heldout)``."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency of the demo
        raise RuntimeError("--data breast_cancer needs scikit-learn (pip install scikit-learn)") from exc
    x = torch.as_tensor(load_breast_cancer().data, dtype=torch.float64)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * x.shape[0])))
    test, train = x[perm[:n_test]], x[perm[n_test:]]
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return ((train - mean) / std).float(), ((test - mean) / std).float()


def _maf(rest) -> int:
    from . import data
    from .models import MAF

    try:
        args = _maf_parser().parse_args(rest)
    except SystemExit as exc:
        return int(exc.code or 0)
    moons_data = args.data == "moons"
    steps = args.steps if args.steps is not None else (3000 if moons_data else 1000)
    args.transforms = args.transforms if args.transforms is not None else (5 if moons_data else 3)
    batch = args.batch if args.batch is not None else (256 if moons_data else 128)
    hidden = args.hidden if args.hidden is not None else 64
    if not _valid_counts("maf", {"steps": steps, "batch": batch, "transforms": args.transforms, "hidden": hidden,
                                 "threads": args.threads}, args.lr):
        return 2
    clip = args.clip if args.clip > 0 else None
    with num_threads(args.threads):
        seed = args.seed
        if moons_data:
            train_x, heldout_x, sampler = data.moons_streams(0.05, args.heldout, seed)
            std = data.Standardize.fit(train_x)
            units = "nats per point in the raw 2-moons coordinates"
        else:
            try:
                train_x, heldout_x = load_breast_cancer_split(args.test_fraction, seed)
            except (RuntimeError, ValueError) as exc:
                print(f"flowops train maf: {exc}", file=sys.stderr)
                return 2
            std = None
            gen = torch.Generator().manual_seed(seed + 3)

            def sampler(n, _x=train_x, _g=gen):
                return _x[torch.randint(0, _x.shape[0], (n,), generator=_g)]

            units = "nats per point in standardized units"
        d = train_x.shape[1]
        if hidden < d - 1:
            print(f"flowops train maf: --hidden must be at least features - 1 = {d - 1} for {args.data}, got {hidden}",
                  file=sys.stderr)
            return 2
        torch.manual_seed(seed)
        model = MAF(d, transforms=args.transforms, hidden=(hidden, hidden), permutation=args.permutation, seed=seed)
        if std is not None:
            from .flow import Flow

            model = Flow(model.base, [std, model.transform])
        models, backends = [model], [args.backend]
        if args.compare:
            models.append(copy.deepcopy(model))
            backends.append("reference")
        name = _backend_name(args.backend, "cpu")
        print(f"MAF(features={d}, transforms={args.transforms}, hidden=({hidden}, {hidden}), permutation "
              f"{args.permutation}) on {args.data} ({train_x.shape[0]} training points, {heldout_x.shape[0]} held "
              f"out): batch {batch}, {steps} steps, lr {args.lr:g} (cosine), clip {clip}, {args.threads} thread(s), "
              f"seed {seed}")
        if args.compare:
            print(f"training the '{name}' model and the 'reference' model (dense masks, D-pass sampling) in lockstep")
        histories = train_flows(models, sampler, steps, batch, args.lr, seed=seed, clip=clip, backends=backends,
                                progress=not args.quiet, desc=f"maf-{args.data}", schedule="cosine")
        for m, h, b in zip(models, histories, backends):
            with _backend.use_backend(b):
                h.heldout_nll = evaluate_nll(m, heldout_x)
        fused = histories[0]
        metrics = {"task": "maf", "data": args.data, "features": d, "steps": steps, "batch": batch, "lr": args.lr,
                   "transforms": args.transforms, "hidden": hidden, "permutation": args.permutation, "clip": clip,
                   "seed": seed, "threads": args.threads, "units": units, "torch": torch.__version__,
                   "fused": fused.summary()}
        print(f"{fused.backend:<9} ({fused.optimizer}): train {fused.train_time:6.2f} s "
              f"({1e3 * fused.median_step:.2f} ms/step median)  held-out NLL {fused.heldout_nll:.4f} ({units})")
        ok = math.isfinite(fused.heldout_nll)
        # sampling: the one-pass inversion against the D-pass reference on the same latents
        with torch.no_grad():
            z = torch.randn(1000, d, generator=torch.Generator().manual_seed(seed + 4))
            flow = models[0]
            t0 = time.perf_counter()
            xs, _ = flow.inverse(z)
            t_one = time.perf_counter() - t0
            with _backend.use_backend("reference"):
                t0 = time.perf_counter()
                xr, _ = flow.inverse(z)
                t_ref = time.perf_counter() - t0
        err = float((xs - xr).abs().max() / xr.abs().max().clamp_min(1e-30))
        print(f"sampling 1000 points: one-pass {1e3 * t_one:.1f} ms, D-pass reference {1e3 * t_ref:.1f} ms "
              f"({t_ref / t_one:.1f}x); max relative difference {err:.1e}")
        metrics.update(sample_one_pass_s=t_one, sample_d_pass_s=t_ref, sample_rel_diff=err)
        if args.compare:
            ref = histories[1]
            ok = _report_comparison(fused, ref, metrics) and ok
        return _finish(args.json, metrics, ok)


def main(argv: Sequence[str] | None = None) -> int:
    """``flowops train moons [options]``; ``demo`` is the same with ``--compare`` on by default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tasks = {"moons": "fit RealNVP to 2-moons (add --compare to also train with the reference ops)",
             "demo": "the 2-moons example with --compare on by default (what 'flowops demo' runs)",
             "vi": "fit a flow to an unnormalized target by maximizing the ELBO ('flowops train vi --help')",
             "maf": "fit a MAF to 2-moons or breast_cancer ('flowops train maf --help')",
             "glow": "fit Glow to scikit-learn's 8x8 digits, bits/dim and samples ('flowops train glow --help')",
             "ffjord": "fit an FFJORD continuous flow to 2-moons ('flowops train ffjord --help')"}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: flowops train {moons,demo,vi,maf,glow,ffjord} [options]\n\ntasks:")
        for name, text in tasks.items():
            print(f"  {name:<6} {text}")
        print("\n'flowops train moons --help' lists the options.")
        return 0
    task, rest = argv[0], argv[1:]
    if task == "vi":
        from . import vi

        return vi.main(rest)
    if task == "maf":
        return _maf(rest)
    if task == "glow":
        from . import glow_train

        return glow_train.main(rest)
    if task == "ffjord":
        from . import cnf_train

        return cnf_train.main(rest)
    if task not in tasks:
        print(f"flowops train: unknown task {task!r}; choose from {sorted(tasks)}", file=sys.stderr)
        return 2
    prog = "flowops demo" if task == "demo" else f"flowops train {task}"
    try:
        args = _parser(prog, compare_default=task == "demo").parse_args(rest)
    except SystemExit as exc:  # --help or a usage error
        return int(exc.code or 0)
    return _moons(args)


if __name__ == "__main__":
    sys.exit(main())
