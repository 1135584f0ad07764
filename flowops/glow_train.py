"""``flowops train glow``: Glow on scikit-learn's 8x8 digits, with checkpoints, exact resume and DDP.

The data: :func:`flowops.data.digits` (1797 images of 8x8 pixels with 17 gray levels 0..16; a fixed,
seeded 80/20 train / held-out split). Each training step draws the next ``--batch`` training images
of an epoch-wise shuffled order, dequantizes them uniformly (``v = (k + u) / 17``), maps them through
the logit transform ``y = logit(0.05 + 0.9 v)`` and minimizes the batch-mean bits/dim of ``v``:
``-(log p_glow(y) + log|dy/dv| - 64 log 17) / (64 log 2)``, the logit Jacobian counted
(:mod:`flowops.nn.preprocess`). The uniform distribution over the 17 levels scores ``log2(17) = 4.09``.

The default model is ``Glow((1, 8, 8), levels=2, steps=4, hidden=64, coupling="affine")``: level 0
squeezes to 4x4x4, runs 4 steps and factors out 2 channels; level 1 squeezes to 2x2x8 and runs 4 more
(``levels=3`` also fits 8x8, ending at 1x1x16). Adam at 1e-3 (fused step where supported) with a
linear warm-up over the first 100 steps, then a cosine decay to 0, batch 64, 3000 steps, gradient-norm
clipping at 50 (the loss is in bits/dim).

Reproducibility and resume: weights come from ``torch.manual_seed(seed)``; the data order and the
dequantization noise come from two ``torch.Generator`` s seeded from ``seed``. A checkpoint (a plain
dict of tensors and primitive containers, readable with ``torch.load(weights_only=True)``) holds the
model, the optimizer, the step counter, both generators' states (plus the current epoch permutation
and position), torch's global RNG state, the configuration and the loss history; the learning rate is a
pure function of the step, so ``--resume`` continues exactly: N steps straight and N/2 + N/2 with a
resume in between end with bitwise-equal parameters and the same loss history.

``--compare`` trains a twin with every op forced to the plain-PyTorch reference
(``flowops.use_backend("reference")``): the same initial weights (copied after the ActNorm
initialization), the same batches and the same dequantization noise, one step each in turn so both see
the same machine load. Only optimization steps are timed.

``--distributed`` (under ``torchrun``) trains with DistributedDataParallel (gloo on CPU, nccl on CUDA).
Every rank draws the same global batch (same generators) and keeps its contiguous shard; the loss of a
shard is ``sum(bpd) * world / global_batch``, so DDP's gradient average is the gradient of the global
batch mean even for unequal shards. ActNorm initializes on every rank from the whole first global
batch before the model is wrapped, exactly as a single process does, so a distributed run follows the
single-process run on the same global batches (up to float rounding of the gradient sum). Rank 0
evaluates and writes every output; checkpoints of distributed and single-process runs are
interchangeable.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import sys
import time

import torch

from . import _backend
from .train import SCHEDULES, History, _backend_name, _finish, lr_factor, make_optimizer, num_threads, time_ratios

__all__ = ["DEFAULTS", "BatchOrder", "build_model", "heldout_bpd", "load_checkpoint", "main"]

FORMAT = "flowops.glow_train/1"
N_LEVELS = 17
SHAPE = (1, 8, 8)
DIMS = 64
ALPHA = 0.05

DEFAULTS = dict(steps=3000, batch=64, lr=1e-3, levels=2, flow_steps=4, hidden=64, coupling="affine",
                schedule="cosine", warmup=100, clip=50.0, seed=0, compare=False, reversible=False,
                test_fraction=0.2, dtype="float32")
# Options that must match when resuming (steps may be extended; backend/threads/outputs may change).
_FIXED = ("batch", "lr", "levels", "flow_steps", "hidden", "coupling", "schedule", "warmup", "clip", "seed",
          "compare", "reversible", "test_fraction", "dtype")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class BatchOrder:
    """Epoch-wise shuffled indices into ``n`` training rows from a seeded generator, resumable.

    ``next(b)`` returns the next ``b`` indices, crossing into a fresh permutation at epoch ends;
    :meth:`state_dict` / :meth:`load_state_dict` capture the generator, the current permutation and the
    position (tensors and ints only).
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"BatchOrder: n must be positive, got {n}")
        self.n = int(n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.pos = 0
        self.epoch = 0

    def next(self, b: int) -> torch.Tensor:
        parts, need = [], int(b)
        while need > 0:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
                self.epoch += 1
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        perm = state["perm"]
        if perm.shape != (self.n,):
            raise ValueError(f"BatchOrder: the saved permutation has {perm.numel()} entries, expected {self.n}")
        self.gen.set_state(state["generator"])
        self.perm = perm.clone()
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


def glow_accepts_reversible() -> bool:
    from .models import Glow

    return "reversible" in inspect.signature(Glow.__init__).parameters


def build_model(cfg: dict) -> torch.nn.Module:
    """``Glow((1, 8, 8), levels, flow_steps, hidden, coupling)`` (``reversible=True`` only when asked)."""
    from .models import Glow

    kw = {"reversible": True} if cfg.get("reversible") else {}
    return Glow(SHAPE, levels=cfg["levels"], steps=cfg["flow_steps"], hidden=cfg["hidden"],
                coupling=cfg["coupling"], **kw)


class _LogProb(torch.nn.Module):
    """What DDP wraps: its forward is the flow's ``log_prob`` (DDP hooks only run through ``forward``)."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, y):
        return self.flow.log_prob(y)


def _lr_at(cfg: dict, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg["warmup"]) if cfg["warmup"] > 0 else 1.0
    return cfg["lr"] * warm * lr_factor(cfg["schedule"], step, cfg["steps"])


@torch.no_grad()
def heldout_bpd(model, x: torch.Tensor, seed: int = 0, draws: int = 4, chunk: int = 1024) -> float:
    """Mean bits/dim of the discrete images ``x`` under ``model`` (eval mode, no gradients).

    Uniform dequantization, the logit transform with its Jacobian and the bin width, as
    :func:`~flowops.nn.preprocess.discrete_bits_per_dim`, averaged over ``draws`` dequantization draws from
    a generator seeded with ``seed`` (the same noise for every model evaluated with the same seed).
    """
    from .nn.preprocess import LogitTransform, bits_per_dim, dequantize

    was = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(int(seed))
        p0 = next(model.parameters())
        device, dtype = p0.device, p0.dtype
        logit = LogitTransform(ALPHA)
        total = 0.0
        for _ in range(draws):
            for i in range(0, x.shape[0], chunk):
                # the noise is drawn on the CPU, so every device and rank sees the same values
                y, ld = logit(dequantize(x[i:i + chunk], N_LEVELS, generator=gen, dtype=dtype))
                lp = model.log_prob(y.to(device)) + ld.to(device)
                total += float(bits_per_dim(lp, DIMS, N_LEVELS).double().sum())
        return total / (draws * x.shape[0]) if x.shape[0] else float("nan")
    finally:
        model.train(was)


def load_checkpoint(path: str) -> dict:
    """Loads a ``flowops train glow`` checkpoint with ``torch.load(weights_only=True)``; ValueError if it is not one."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a 'flowops train glow' checkpoint")
    return ckpt


def _save(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="flowops train glow",
        description="Fit Glow to scikit-learn's 8x8 digits (17 gray levels; uniform dequantization, logit "
                    "transform alpha=0.05) by maximum likelihood; report held-out bits/dim, write a PNG of "
                    "samples at two temperatures next to real digits, metrics JSON and checkpoints.")
    # None defaults: on --resume, only options given explicitly are checked against the checkpoint.
    p.add_argument("--steps", type=int, default=None, help=f"total optimization steps (default {d['steps']})")
    p.add_argument("--batch", type=int, default=None,
                   help=f"global batch size; split over ranks with --distributed (default {d['batch']})")
    p.add_argument("--lr", type=float, default=None, help=f"peak Adam learning rate (default {d['lr']:g})")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="learning-rate decay after the warm-up: cosine to 0 (default) or constant")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"linear learning-rate warm-up steps (default {d['warmup']})")
    p.add_argument("--clip", type=float, default=None,
                   help=f"gradient-norm clipping threshold, 0 = off (default {d['clip']:g})")
    p.add_argument("--levels", type=int, default=None,
                   help=f"Glow levels (scales), 1..3 for 8x8 images (default {d['levels']})")
    p.add_argument("--flow-steps", dest="flow_steps", type=int, default=None,
                   help=f"Glow steps K per level (default {d['flow_steps']})")
    p.add_argument("--hidden", type=int, default=None,
                   help=f"channels of each coupling's conv conditioner (default {d['hidden']})")
    p.add_argument("--coupling", default=None, choices=("affine", "additive"), help="coupling type (default affine)")
    p.add_argument("--seed", type=int, default=None, help="seed of the weights, data order and noise (default 0)")
    p.add_argument("--test-fraction", dest="test_fraction", type=float, default=None,
                   help="held-out share of the digits (default 0.2; the split is fixed, seed 0)")
    p.add_argument("--compare", action="store_true", default=None,
                   help="also train the same model with the plain-PyTorch reference ops on the same batches and noise")
    p.add_argument("--reversible", action="store_true", default=None,
                   help="build Glow with reversible=True (memory-lean backprop)")
    p.add_argument("--bit-exact", dest="bit_exact", action="store_true",
                   help="with --reversible: rebuild every layer's input bit for bit (bit_exact=True; gradients equal "
                        "ordinary backprop's, memory of about one byte per value per layer)")
    p.add_argument("--stored-inputs", dest="stored_inputs", type=int, default=None, metavar="C",
                   help="with --reversible: keep the inputs of C evenly spaced layers (checkpoints=C, default 32; "
                        "0: none; memory independent of depth, rebuilds restart from them)")
    p.add_argument("--kink-tol", dest="kink_tol", type=float, default=None, metavar="T",
                   help="with --reversible: ReLU-kink records (kink_tol=T; default Glow's 1e-4; 0: none): float32 "
                        "gradients as close to ordinary backprop's as float64 ones, for little step time")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="parameter and data dtype (default float32; float64 for exactness checks)")
    p.add_argument("--backend", default="auto", choices=_backend.BACKENDS,
                   help="backend of the main model (default auto: the fused ops where available)")
    p.add_argument("--distributed", action="store_true",
                   help="DistributedDataParallel under torchrun (gloo on CPU, nccl on CUDA); rank 0 writes outputs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    p.add_argument("--out", default="flowops-glow", help="output directory for PNG, JSON and checkpoints "
                                                          "(default ./flowops-glow)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=1000,
                   help="save a checkpoint every N steps, 0 = only at the end (default 1000)")
    p.add_argument("--resume", metavar="PATH", default=None, help="continue from a checkpoint")
    p.add_argument("--temperatures", default="1.0,0.7",
                   help="comma-separated sampling temperatures for the PNG (default 1.0,0.7)")
    p.add_argument("--samples", type=int, default=32, help="samples per temperature in the PNG (default 32)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _usage_error(msg: str) -> int:
    print(f"flowops train glow: error: {msg}", file=sys.stderr)
    return 2


def _config(args, ckpt) -> tuple[dict | None, str | None]:
    """The run's configuration: defaults, or the checkpoint's, overridden by explicit options."""
    base = dict(DEFAULTS) if ckpt is None else dict(ckpt["config"])
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    if ckpt is not None:
        for k in _FIXED:
            if k in given and given[k] != base[k]:
                flag = "--" + k.replace("_", "-")
                return None, f"{flag} {given[k]} differs from the checkpoint's {base[k]} (--resume continues the " \
                             f"saved run; leave {flag} out)"
        if "steps" in given and given["steps"] < ckpt["step"]:
            return None, f"--steps {given['steps']} is below the checkpoint's step {ckpt['step']}"
    base.update(given)
    c = base
    for name in ("steps", "warmup"):
        if c[name] < 0:
            return None, f"--{name} must be non-negative, got {c[name]}"
    for name in ("batch", "levels", "flow_steps", "hidden"):
        if c[name] < 1:
            return None, f"--{name.replace('_', '-')} must be positive, got {c[name]}"
    if not (c["lr"] > 0 and math.isfinite(c["lr"])):
        return None, f"--lr must be a positive number, got {c['lr']}"
    if not (c["clip"] >= 0 and math.isfinite(c["clip"])):
        return None, f"--clip must be non-negative (0 = off), got {c['clip']}"
    if 2 ** c["levels"] > SHAPE[1]:
        return None, f"--levels {c['levels']} needs 8x8 images divisible by 2**levels = {2 ** c['levels']}; " \
                     f"use 1, 2 or 3"
    if not 0.0 < c["test_fraction"] < 1.0:
        return None, f"--test-fraction must be in (0, 1), got {c['test_fraction']}"
    if c["reversible"] and not glow_accepts_reversible():
        return None, "--reversible: this version of flowops.models.Glow does not accept reversible=True yet"
    return c, None


def _temperatures(text: str):
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        return None
    return temps if temps and all(t >= 0 and math.isfinite(t) for t in temps) else None


def _init_distributed(device_kind: str):
    """(rank, world, device) from torchrun's environment; initializes the process group."""
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError("--distributed needs torchrun's environment (missing " + ", ".join(missing) +
                           "); launch with: torchrun --nproc_per_node=2 -m flowops train glow --distributed ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device_kind == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return rank, world, device


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error (argparse printed it)
        return int(exc.code or 0)
    for name in ("threads", "samples"):
        if getattr(args, name) < 1:
            return _usage_error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.checkpoint_every < 0:
        return _usage_error(f"--checkpoint-every must be non-negative (0 = only at the end), got "
                            f"{args.checkpoint_every}")
    temps = _temperatures(args.temperatures)
    if temps is None:
        return _usage_error(f"--temperatures must be comma-separated non-negative numbers, got {args.temperatures!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _usage_error("--device cuda: CUDA is not available")
    try:
        _backend_name(args.backend, args.device)
    except Exception as exc:  # a forced backend that cannot run here
        return _usage_error(f"--backend {args.backend}: {exc}")
    ckpt = None
    if args.resume is not None:
        if not os.path.isfile(args.resume):
            return _usage_error(f"--resume: no such file {args.resume!r}")
        try:
            ckpt = load_checkpoint(args.resume)
        except Exception as exc:  # unpickling errors, wrong format
            return _usage_error(f"--resume: cannot load {args.resume!r}: {exc}")
    cfg, err = _config(args, ckpt)
    if err:
        return _usage_error(err)
    if args.bit_exact and not cfg["reversible"]:
        return _usage_error("--bit-exact needs --reversible (it sets how the reversible backward rebuilds inputs)")
    if args.stored_inputs is not None and not cfg["reversible"]:
        return _usage_error("--stored-inputs needs --reversible (it sets where the reversible backward restarts)")
    if args.kink_tol is not None and not cfg["reversible"]:
        return _usage_error("--kink-tol needs --reversible (it sets how the reversible backward recomputes)")
    if args.kink_tol:  # 0: no records
        from .reversible import _check_kink_tol
        try:
            _check_kink_tol(args.kink_tol)
        except ValueError as exc:
            return _usage_error(f"--kink-tol: {exc}")
    if args.stored_inputs is not None and args.stored_inputs < 0:
        return _usage_error(f"--stored-inputs must be non-negative (0: none), got {args.stored_inputs}")
    if args.distributed:
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg["batch"] < world_env:
            return _usage_error(f"--batch {cfg['batch']} is smaller than the number of processes {world_env}")
        try:
            rank, world, device = _init_distributed(args.device)
        except RuntimeError as exc:
            return _usage_error(str(exc))
    else:
        rank, world, device = 0, 1, torch.device(args.device)
    finished = False
    try:
        with num_threads(args.threads):
            rc = _run(args, cfg, ckpt, temps, rank, world, device)
        finished = True
        return rc
    finally:
        if args.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                if finished:
                    dist.barrier()  # the other ranks wait while rank 0 evaluates and writes, then all leave together
                dist.destroy_process_group()


def _run(args, cfg, ckpt, temps, rank, world, device) -> int:
    from . import data
    from .nn.preprocess import LogitTransform, bits_per_dim, dequantize

    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    seed = cfg["seed"]
    train_x, heldout_x = data.digits(cfg["test_fraction"], seed=0)
    order = BatchOrder(train_x.shape[0], seed + 1)
    noise = torch.Generator().manual_seed(seed + 2)
    logit = LogitTransform(ALPHA)

    torch.manual_seed(seed)
    dtype = DTYPES[cfg["dtype"]]
    model = build_model(cfg).to(device=device, dtype=dtype)
    if args.bit_exact:  # run-time options (not part of the checkpointed configuration)
        model.transform.bit_exact = True
    if args.stored_inputs is not None:
        model.transform.checkpoints = args.stored_inputs or None
    if args.kink_tol is not None:
        model.transform.kink_tol = args.kink_tol or None
    backends = [args.backend] + (["reference"] if cfg["compare"] else [])
    names = [_backend_name(b, device) for b in backends]
    step = 0
    losses = [[] for _ in backends]
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        models = [model]
        if cfg["compare"]:
            twin = build_model(cfg).to(device=device, dtype=dtype)
            twin.load_state_dict(ckpt["reference_model"])
            models.append(twin)
        step = int(ckpt["step"])
        order.load_state_dict(ckpt["order"])
        noise.set_state(ckpt["noise"])
        torch.set_rng_state(ckpt["torch_rng"])
        losses = [list(ckpt["history"]["fused"])] + ([list(ckpt["history"]["reference"])] if cfg["compare"] else [])
        times_before = list(ckpt.get("train_time_s", [0.0] * len(backends)))
    else:
        times_before = [0.0] * len(backends)
        models = [model]
        # ActNorm's data-dependent init from the whole first global batch (every rank alike; the streams are
        # rewound, so step 0 trains on that same batch); then the twin copies the initialized weights.
        saved = order.state_dict(), noise.get_state()
        first, _ = _draw(train_x, order, noise, cfg["batch"], logit, dequantize, dtype)
        order.load_state_dict(saved[0])
        noise.set_state(saved[1])
        model.train()
        with torch.no_grad(), _backend.use_backend(backends[0]):
            model.log_prob(first.to(device))
        if cfg["compare"]:
            models.append(copy.deepcopy(model))
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    opts = []
    for i, ps in enumerate(params):
        opt, opt_name = make_optimizer(ps, cfg["lr"])
        if ckpt is not None:
            opt.load_state_dict(ckpt["optimizer" if i == 0 else "reference_optimizer"])
        opts.append((opt, opt_name))
    hists = [History(backend=n, optimizer=o[1]) for n, o in zip(names, opts)]
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runners = [DDP(_LogProb(m), device_ids=[device.index] if device.type == "cuda" else None) for m in models]
    else:
        runners = [m.log_prob for m in models]

    out = os.path.abspath(args.out)
    if lead:
        os.makedirs(out, exist_ok=True)
    arch = (f"Glow((1, 8, 8), levels={cfg['levels']}, steps={cfg['flow_steps']}, hidden={cfg['hidden']}, "
            f"coupling={cfg['coupling']!r}{', reversible=True' if cfg['reversible'] else ''})")
    n_params = sum(p.numel() for p in params[0])
    say(f"{arch}, {n_params} parameters, on digits ({train_x.shape[0]} training / {heldout_x.shape[0]} held-out "
        f"images, 17 levels): batch {cfg['batch']}{f' over {world} processes' if world > 1 else ''}, "
        f"{cfg['steps']} steps, lr {cfg['lr']:g} (warm-up {cfg['warmup']}, {cfg['schedule']}), clip "
        f"{cfg['clip'] or 'off'}, seed {seed}, {args.threads} thread(s)")
    if ckpt is not None:
        say(f"resumed from {os.path.abspath(args.resume)} at step {step}")
    if cfg["compare"]:
        say(f"training the '{names[0]}' model and the 'reference' model in lockstep on the same batches and noise")
        if names[0] == "reference":
            say("note: no fused backend is available here (flowops info), both runs use the reference ops")

    initial_bpd = None
    if ckpt is None and lead:
        with _backend.use_backend(backends[0]):
            initial_bpd = heldout_bpd(model, heldout_x)
        say(f"held-out bits/dim after the ActNorm initialization: {initial_bpd:.4f}")

    ok, every = True, args.checkpoint_every
    ckpt_path = None

    def state() -> dict:
        s = {"format": FORMAT, "config": dict(cfg), "step": step, "model": models[0].state_dict(),
             "optimizer": opts[0][0].state_dict(), "order": order.state_dict(), "noise": noise.get_state(),
             "torch_rng": torch.get_rng_state(),
             "history": {"fused": list(losses[0]), "reference": list(losses[1]) if cfg["compare"] else []},
             "train_time_s": [t + h.train_time for t, h in zip(times_before, hists)]}
        if cfg["compare"]:
            s.update(reference_model=models[1].state_dict(), reference_optimizer=opts[1][0].state_dict())
        return s

    bar = None
    if lead and not args.quiet and cfg["steps"] > step:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg["steps"], initial=step, desc="glow-digits", unit="step", mininterval=0.5,
                   dynamic_ncols=True, file=sys.stderr)
    for m in models:
        m.train()
    shard = torch.tensor_split(torch.arange(cfg["batch"]), world)[rank]
    lo, hi = (int(shard[0]), int(shard[-1]) + 1) if shard.numel() else (0, 0)
    scale = world / cfg["batch"]
    clock = time.perf_counter
    try:
        while step < cfg["steps"]:
            y, ld = _draw(train_x, order, noise, cfg["batch"], logit, dequantize, dtype)
            y, ld = y[lo:hi].to(device), ld[lo:hi].to(device)
            step_lr = _lr_at(cfg, step)
            sums = []
            for i, (run, (opt, _), ps, hist) in enumerate(zip(runners, opts, params, hists)):
                for group in opt.param_groups:
                    group["lr"] = step_lr
                t0 = clock()
                with _backend.use_backend(backends[i]):
                    bpd = bits_per_dim(run(y) + ld, DIMS, N_LEVELS)
                    loss = bpd.sum() * scale
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg["clip"] > 0:
                        torch.nn.utils.clip_grad_norm_(ps, cfg["clip"], foreach=True)
                    opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                hist.step_time.append(clock() - t0)
                sums.append(bpd.detach().sum())
            total = torch.stack(sums).double()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(total)
            vals = (total / cfg["batch"]).tolist()
            for i, v in enumerate(vals):
                losses[i].append(v)
            step += 1
            if not all(math.isfinite(v) for v in vals):
                say(f"error: the training loss is not finite at step {step}; stopping", file=sys.stderr)
                ok = False
                break
            if bar is not None and (step % 10 == 0 or step == cfg["steps"]):
                tail = [sum(lst[-50:]) / len(lst[-50:]) for lst in losses]
                bar.set_postfix({(f"bpd[{n}]" if len(names) > 1 else "bpd"): f"{t:.3f}" for n, t in zip(names, tail)},
                                refresh=False)
                bar.update(step - bar.n)
            if lead and every and step % every == 0 and step < cfg["steps"]:
                ckpt_path = os.path.join(out, f"checkpoint-step{step:06d}.pt")
                _save(ckpt_path, state())
    finally:
        if bar is not None:
            bar.close()
    if not lead:
        return 0 if ok else 1
    ckpt_path = os.path.join(out, f"checkpoint-step{step:06d}.pt")
    _save(ckpt_path, state())
    say(f"checkpoint: {ckpt_path}")

    results = []
    for i, (m, hist) in enumerate(zip(models, hists)):
        with _backend.use_backend(backends[i]):
            bpd = heldout_bpd(m, heldout_x)
        tail = losses[i][-100:]
        r = {"backend": hist.backend, "optimizer": hist.optimizer, "heldout_bpd": bpd,
             "final_train_bpd": sum(tail) / len(tail) if tail else float("nan"),
             "train_time_s": times_before[i] + hist.train_time, "this_run_train_time_s": hist.train_time,
             "median_step_ms": 1e3 * hist.median_step}
        results.append(r)
        ok = ok and math.isfinite(bpd)
        say(f"{r['backend']:<9} ({r['optimizer']}): train {r['this_run_train_time_s']:6.2f} s "
            f"({r['median_step_ms']:.2f} ms/step median)  held-out {bpd:.4f} bits/dim  "
            f"(last-100-step train {r['final_train_bpd']:.4f}; uniform over 17 levels: {math.log2(17):.4f})")
    metrics = {"task": "glow", "data": "digits", "model": arch, "parameters": n_params, "config": cfg,
               "steps_done": step, "world_size": world, "threads": args.threads, "device": str(device),
               "resumed_from": os.path.abspath(args.resume) if args.resume else None,
               "torch": torch.__version__, "initial_heldout_bpd": initial_bpd, "fused": results[0],
               "checkpoint": ckpt_path}
    if cfg["compare"]:
        f, r = hists
        diff = results[0]["heldout_bpd"] - results[1]["heldout_bpd"]
        ratio, step_ratio = time_ratios(f, r)
        say(f"held-out bits/dim difference ({names[0]} - reference): {diff:+.4f} (target |diff| <= 0.02: "
            f"{'met' if abs(diff) <= 0.02 else 'NOT met'}); training-time ratio reference/{names[0]}: {ratio:.2f}x "
            f"(median per-step ratio {step_ratio:.2f}x)")
        metrics.update(reference=results[1], bpd_diff=diff, time_ratio=ratio, step_time_ratio=step_ratio)
    if args.plot:
        from .plots import sample_grid_figure

        png = os.path.join(out, "samples.png")
        n = args.samples
        panels = [("held-out digits", heldout_x[:n].float() / (N_LEVELS - 1))]
        gen = torch.Generator(device=device).manual_seed(seed + 3)
        m = models[0]
        m.eval()
        with torch.no_grad(), _backend.use_backend(backends[0]):
            for t in temps:
                v, _ = logit.inverse(m.sample(n, temperature=t, generator=gen))
                panels.append((f"samples, T = {t:g}", v.clamp(0, 1).cpu()))
        sample_grid_figure(panels, png, cols=8,
                           title=f"{arch} on 8x8 digits, {step} steps: held-out {results[0]['heldout_bpd']:.3f} "
                                 f"bits/dim ({names[0]})")
        metrics["samples_png"] = png
        say(f"samples: {png}")
    metrics["history"] = {"fused": losses[0], **({"reference": losses[1]} if cfg["compare"] else {})}
    return _finish(os.path.join(out, "metrics.json"), metrics, ok, what="held-out bits/dim")


def _draw(train_x, order, noise, batch, logit, dequantize, dtype=torch.float32):
    """The next global batch in logit space: ``(y, log|dy/dv|)`` (CPU; same values on every rank)."""
    v = dequantize(train_x[order.next(batch)], N_LEVELS, generator=noise, dtype=dtype)
    return logit(v)


if __name__ == "__main__":
    sys.exit(main())
