"""``flowops bench --op reversible``: memory and time of reversible recomputation against ordinary backprop.

The model is multi-scale Glow (default: 3 levels, hidden 128, 32x32x3 images, batch 16, float32), run
with ``reversible=False`` (ordinary backprop) and ``reversible=True`` for each depth K (steps per level,
default 8 16 32 64). Reported:

* peak resident memory growth of a training step (``zero_grad(set_to_none=True)``, forward, backward;
  the peak over two steps): each
  (mode, K) runs in a fresh Python process; the baseline is the resident set right after building the
  model and the data. ``--baseline warm`` (the default): the process first ran one step of a K = 1 model of
  the same shapes and mode, so one-time lazy imports and the set-up of those shapes, such as JIT-compiled
  kernels, the library's convolution set-up and the fused ops' per-thread scratch buffers, are excluded;
  ``cold`` (or ``--cold``): after one step of a tiny model, only the imports excluded; ``none``: no warm-up,
  the first steps' one-time set-up counts in full. The peak is
  the process's high-water mark (``VmHWM``, reset before the steps
  through ``/proc/self/clear_refs`` where Linux allows it; elsewhere ``ru_maxrss`` before and after,
  a lower bound). Parameter gradients are part of the growth in both modes.
* peak saved-activation bytes: the high-water mark of the tensors autograd holds for the backward
  (:class:`flowops.reversible.SavedTensorMeter`, parameters excluded), over one more training step.
* step time of the two modes at one depth (``--time-steps``, default 32), interleaved, median of
  ``--repeats`` steps each, as a ratio measured in the same run.
* gradient equality: the largest ``max|g_rev - g_ord| / max|g_ord|`` over the parameter tensors, in
  float32 and float64, on the same weights (perturbed from the near-identity initialization so that
  every parameter gets a gradient); in float32 also the precision floor (both modes against float64), the
  gradients' sensitivity to a one-ulp change of the input, and the reversible mode without stored inputs
  (``checkpoints=None``), without ReLU-kink records (``kink_tol=None``; with ``kink_tol=1e-4`` when the
  main lines have none) and with ``bit_exact=True``.

The reversible mode is ``Glow(..., reversible=True)`` with its defaults (32 stored inputs, ``checkpoints=32``;
ReLU-kink records, ``kink_tol=1e-4``); ``--checkpoints C`` (0: none), ``--kink-tol T`` (0: none) and
``--bit-exact`` set those options for the memory table, the step time and the main gradient lines.

A PNG plot of memory against depth is written (``--plot``), and a JSON record on request (``--json``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

TARGETS = {"memory_ratio_min": 5.0, "step_time_ratio_max": 1.35, "grad_rel_fp32": 1e-4, "grad_rel_fp64": 1e-9,
           "flatness_max": 1.2}
MODES = ("ordinary", "reversible")
BASELINES = ("warm", "cold", "none")
BASELINE_TEXT = {"warm": "a warm-up step of the same shapes (K = 1)", "cold": "a tiny warm-up model (--baseline cold)",
                 "none": "building the model, no warm-up (--baseline none)"}


# -- resident memory ------------------------------------------------------------------------------------------

def _status_bytes(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def peak_rss() -> int:
    v = _status_bytes("VmHWM")
    return v if v is not None else _maxrss_bytes()


def current_rss():
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux ``clear_refs`` 5); False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- model ----------------------------------------------------------------------------------------------------

def build(cfg, steps: int, reversible: bool, dtype=torch.float32):
    from .models.glow import Glow

    torch.manual_seed(cfg["seed"])
    c, s = cfg["channels"], cfg["image"]
    model = Glow((c, s, s), levels=cfg["levels"], steps=steps, hidden=cfg["hidden"], reversible=reversible)
    model.transform.micro_batch = cfg.get("micro_batch")
    model.transform.bit_exact = bool(cfg.get("bit_exact"))
    if cfg.get("checkpoints") is not None:  # else the model's default; 0: none
        model.transform.checkpoints = cfg["checkpoints"] or None
    if cfg.get("kink_tol") is not None:  # else the model's default (1e-4); 0: no kink records
        model.transform.kink_tol = cfg["kink_tol"] or None
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    with torch.no_grad():  # leave the near-identity start, so every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model = model.to(dtype)
    x = (torch.rand((cfg["batch"], c, s, s), generator=gen) - 0.5).to(dtype)
    return model, x


def train_step(model, x):
    model.zero_grad(set_to_none=True)  # what optimizer.zero_grad() does by default
    loss = -model.log_prob(x).mean()
    loss.backward()
    return loss.detach()


def child(cfg) -> dict:
    """One (mode, depth) configuration; runs in a fresh process."""
    from .reversible import SavedTensorMeter

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    # Warm-up on a model of the same mode: one-time lazy imports and library set-up are not the memory of a
    # training step. By default ("warm") the warm-up model has the measured shapes with one step per level, so
    # that the one-time set-up of those shapes (the fused ops' JIT-compiled GEMM kernels and per-thread scratch
    # buffers, the library's convolution set-up; the same for both modes and every depth) is in the baseline
    # too; "cold" warms up on a tiny model only; "none" does not warm up.
    baseline = cfg.get("baseline", "warm")
    if baseline != "none":
        warm_cfg = dict(cfg, levels=1, hidden=4, image=4, batch=2) if baseline == "cold" else cfg
        warm, wx = build(warm_cfg, 1, cfg["mode"] == "reversible")
        train_step(warm, wx)
        del warm, wx
    model, x = build(cfg, cfg["steps"], cfg["mode"] == "reversible")
    params = list(model.parameters())
    gc.collect()
    exact = reset_peak_rss()
    base = current_rss() if exact else None
    if base is None:
        base, exact = peak_rss(), False
    for _ in range(2):
        train_step(model, x)
    peak = peak_rss()
    with SavedTensorMeter(exclude=params) as meter:
        train_step(model, x)
    return {"mode": cfg["mode"], "steps": cfg["steps"], "rss_growth": max(peak - base, 0), "rss_baseline": base,
            "rss_peak": peak, "peak_reset": exact, "saved_peak": meter.peak,
            "param_bytes": sum(p.numel() * p.element_size() for p in params)}


def run_child(cfg) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-m", "flowops.bench_reversible", "--child", json.dumps(cfg)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {cfg['mode']} K={cfg['steps']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def grad_rel_error(cfg, steps: int, dtype) -> dict:
    """Largest per-tensor max|g_rev - g_ord| / max|g_ord| and the log-likelihood difference."""
    from .models.glow import DEFAULT_KINK_TOL
    model, x = build(cfg, steps, False, dtype)
    model.log_prob(x)  # ActNorm initialization, shared by both copies
    twin = copy.deepcopy(model)
    twin.transform.reversible, twin.transform.bit_exact = True, False
    lo, lr = train_step(model, x), train_step(twin, x)

    def worst(a, ref):
        w, name_w = 0.0, None
        for (name, p), q in zip(ref.named_parameters(), a.parameters()):
            scale = p.grad.abs().max().item()
            err = (q.grad.to(p.dtype) - p.grad).abs().max().item() / (scale if scale > 0 else 1.0)
            if err > w or name_w is None:
                w, name_w = err, name
        return w, name_w

    def global_rel(a, ref):  # ||g_a - g_ref|| / ||g_ref|| over all parameters together
        num = sum(((q.grad.to(p.dtype) - p.grad) ** 2).sum().item() for p, q in zip(ref.parameters(), a.parameters()))
        den = sum((p.grad ** 2).sum().item() for p in ref.parameters())
        return (num / den) ** 0.5 if den > 0 else 0.0

    rel, name_w = worst(twin, model)
    out = {"dtype": str(dtype).replace("torch.", ""), "steps": steps, "max_rel": rel, "worst_param": name_w,
           "global_rel": global_rel(twin, model), "loss_diff": abs(lo.item() - lr.item())}
    if dtype != torch.float64:  # the precision floor: both modes against ordinary backprop in float64
        ref = copy.deepcopy(model).double()
        train_step(ref, x.double())
        out["ordinary_vs_fp64"], out["reversible_vs_fp64"] = worst(model, ref)[0], worst(twin, ref)[0]
        out["ordinary_vs_fp64_global"], out["reversible_vs_fp64_global"] = global_rel(model, ref), global_rel(twin, ref)
        # the gradient's own sensitivity: ordinary backprop again, every input value moved by one unit in the
        # last place (a random sign each): what any method that does not reproduce the forward bit for bit
        # must expect to differ by
        nudged = copy.deepcopy(model)
        eps = torch.finfo(dtype).eps
        flip = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(cfg["seed"] + 2)) < 0.5,
                           -1.0, 1.0).to(dtype)
        train_step(nudged, x * (1 + eps * flip))
        out["ordinary_1ulp_worst"], out["ordinary_1ulp_global"] = worst(nudged, model)[0], global_rel(nudged, model)
        # the same without stored inputs but the bottom one: rounding builds up through the whole stack
        pure = copy.deepcopy(model)
        pure.transform.reversible, pure.transform.bit_exact = True, False
        pure.transform.checkpoint_every, pure.transform.checkpoints = None, None
        train_step(pure, x)
        out["no_checkpoints_global"] = global_rel(pure, model)
        out["no_checkpoints_vs_fp64_global"] = global_rel(pure, ref)
        # the other side of the ReLU-kink records: without them when the main lines have them (Glow's default),
        # else with them (the recomputed conditioner units stay on the forward's side of the kink)
        kinks = copy.deepcopy(model)
        other = None if twin.transform.kink_tol else DEFAULT_KINK_TOL
        kinks.transform.reversible, kinks.transform.bit_exact, kinks.transform.kink_tol = True, False, other
        train_step(kinks, x)
        out["kink_tol"] = other
        out["kinks_global"], out["kinks_vs_fp64_global"] = global_rel(kinks, model), global_rel(kinks, ref)
        out["kinks_worst"] = worst(kinks, model)[0]
    # bit-exact rebuilds (the rounding differences kept): gradients should equal ordinary backprop's
    ex = copy.deepcopy(model)
    ex.transform.reversible, ex.transform.bit_exact = True, True
    train_step(ex, x)
    out["bit_exact_worst"], out["bit_exact_global"] = worst(ex, model)[0], global_rel(ex, model)
    return out


def step_times(cfg, steps: int, repeats: int) -> dict:
    model, x = build(cfg, steps, False)
    train_step(model, x)
    times = {m: [] for m in MODES}
    for r in range(repeats + 1):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            model.transform.reversible = mode == "reversible"
            t0 = time.perf_counter()
            train_step(model, x)
            dt = time.perf_counter() - t0
            if r:  # round 0 is the warm-up
                times[mode].append(dt)
    med = {m: statistics.median(v) for m, v in times.items()}
    # each round times both modes back to back: the median of the rounds' ratios follows a machine whose speed
    # drifts between rounds better than the ratio of the two medians (reported beside it, not instead)
    paired = statistics.median(r / o for r, o in zip(times["reversible"], times["ordinary"]))
    return {"steps": steps, "median_s": med, "times_s": times, "ratio": med["reversible"] / med["ordinary"],
            "paired_ratio": paired}


# -- output ---------------------------------------------------------------------------------------------------

def _mb(b) -> str:
    return f"{b / 2**20:.1f} MB"


def table(rows, depths) -> str:
    by = {(r["mode"], r["steps"]): r for r in rows}
    lines = ["| K | RSS growth ordinary | RSS growth reversible | ratio | saved activations ordinary | "
             "saved activations reversible | ratio |", "|---|---|---|---|---|---|---|"]
    for k in depths:
        o, r = by[("ordinary", k)], by[("reversible", k)]
        lines.append(f"| {k} | {_mb(o['rss_growth'])} | {_mb(r['rss_growth'])} | "
                     f"{o['rss_growth'] / max(r['rss_growth'], 1):.1f}x | {_mb(o['saved_peak'])} | "
                     f"{_mb(r['saved_peak'])} | {o['saved_peak'] / max(r['saved_peak'], 1):.1f}x |")
    return "\n".join(lines)


def plot(rows, depths, path, title) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "rss_growth", "peak RSS growth of a step (MB)"),
                           (fig.add_subplot(1, 2, 2), "saved_peak", "peak saved activations (MB)")):
        for mode, marker in zip(MODES, "os"):
            ys = [next(r[key] for r in rows if r["mode"] == mode and r["steps"] == k) / 2**20 for k in depths]
            ax.plot(depths, ys, marker=marker, label=mode)
        ax.set_xlabel("steps per level K")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(k) for k in depths])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowops bench --op reversible",
                                description="Memory against depth, step time and gradient equality of reversible "
                                            "recomputation vs ordinary backprop on multi-scale Glow.")
    p.add_argument("--depths", nargs="+", type=int, default=[8, 16, 32, 64], help="steps per level K")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--image", type=int, default=32, help="image height = width")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--time-steps", type=int, default=32, help="K for the step-time and gradient checks")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model and depths (smoke test)")
    p.add_argument("--plot", default="reversible_memory.png", help="PNG path ('' to skip)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--in-process", action="store_true",
                   help="measure every configuration in this process (no fresh process: RSS growth is then only "
                        "indicative; for smoke tests)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="micro_batch of the reversible mode (backward recomputation in slices of this many samples)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory table (time and gradients only)")
    p.add_argument("--checkpoints", type=int, default=None,
                   help="stored inputs of the reversible mode (checkpoints=C; 0: none, only the bottom one; default: "
                        "Glow's default, 32) for the memory table, the step time and the main gradient lines")
    p.add_argument("--kink-tol", dest="kink_tol", type=float, default=None,
                   help="ReLU-kink records of the reversible mode (kink_tol=T; 0: none; default: Glow's default, "
                        "1e-4) for the memory table, the step time and the main gradient lines")
    p.add_argument("--bit-exact", action="store_true",
                   help="the reversible mode keeps its rounding differences (bit_exact=True) in the memory table and "
                        "the step time")
    p.add_argument("--baseline", choices=BASELINES, default=None,
                   help="memory baseline: 'warm' (default) after one step of a K = 1 model of the same shapes and "
                        "mode; 'cold' after one step of a tiny model (the one-time set-up of the measured shapes: "
                        "JIT kernels, scratch buffers, convolution set-up, counts in the growth of both modes); "
                        "'none' right after building the model, no warm-up at all")
    p.add_argument("--cold", action="store_true", help="same as --baseline cold")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        args.depths, args.levels, args.hidden, args.image, args.batch = [2, 4], 2, 8, 8, 2
        args.time_steps, args.repeats = 2, 1
    if args.micro_batch is not None and args.micro_batch < 1:
        print("flowops bench --op reversible: --micro-batch must be positive", file=sys.stderr)
        return 2
    if args.checkpoints is not None and args.checkpoints < 0:
        print("flowops bench --op reversible: --checkpoints must be non-negative (0: none)", file=sys.stderr)
        return 2
    if args.kink_tol:  # 0: no records
        from .reversible import _check_kink_tol
        try:
            _check_kink_tol(args.kink_tol)
        except ValueError as exc:
            print(f"flowops bench --op reversible: --kink-tol: {exc}", file=sys.stderr)
            return 2
    if args.bit_exact and args.micro_batch:
        print("flowops bench --op reversible: --bit-exact cannot be combined with --micro-batch", file=sys.stderr)
        return 2
    for name in ("levels", "hidden", "image", "channels", "batch", "time_steps", "repeats"):
        if getattr(args, name) < 1:
            print(f"flowops bench --op reversible: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if not args.depths or min(args.depths) < 1:
        print("flowops bench --op reversible: --depths must be positive", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv) -> int:
    from .benchmark import machine_info

    cfg = {"levels": args.levels, "hidden": args.hidden, "image": args.image, "channels": args.channels,
           "batch": args.batch, "seed": args.seed, "threads": args.threads, "micro_batch": args.micro_batch,
           "baseline": args.baseline or ("cold" if args.cold else "warm"), "bit_exact": args.bit_exact,
           "checkpoints": args.checkpoints, "kink_tol": args.kink_tol}
    desc = (f"Glow L={args.levels}, hidden {args.hidden}, {args.image}x{args.image}x{args.channels}, "
            f"batch {args.batch}, float32" + (f", reversible micro_batch {args.micro_batch}" if args.micro_batch
                                               else "") + (", reversible bit_exact" if args.bit_exact else "")
            + (f", reversible checkpoints {args.checkpoints or None}" if args.checkpoints is not None else "")
            + (f", reversible kink_tol {args.kink_tol or None}" if args.kink_tol is not None else ""))
    print(f"flowops bench --op reversible: {desc}; "
          f"{'in this process' if args.in_process else 'one fresh process per (mode, K)'}; memory baseline after "
          f"{BASELINE_TEXT[cfg['baseline']]}")
    rows = []
    depths = [] if args.no_memory else list(args.depths)
    for k in depths:
        for mode in MODES:
            rows.append((child if args.in_process else run_child)(dict(cfg, steps=k, mode=mode)))
    if rows:
        print(table(rows, depths))
        if not rows[0]["peak_reset"]:
            print("(peak RSS could not be reset: growth is the rise of ru_maxrss, a lower bound)")
    timing = step_times(cfg, args.time_steps, args.repeats)
    print(f"step time at K={args.time_steps}: ordinary {timing['median_s']['ordinary'] * 1e3:.1f} ms, reversible "
          f"{timing['median_s']['reversible'] * 1e3:.1f} ms (median of {args.repeats}, interleaved): "
          f"ratio {timing['ratio']:.3f}x (target <= {TARGETS['step_time_ratio_max']}x); median of the rounds' "
          f"paired ratios {timing['paired_ratio']:.3f}x")
    grads = [grad_rel_error(cfg, args.time_steps, torch.float32), grad_rel_error(cfg, args.time_steps, torch.float64)]
    for g, tol in zip(grads, (TARGETS["grad_rel_fp32"], TARGETS["grad_rel_fp64"])):
        print(f"gradients {g['dtype']} K={g['steps']}: max relative difference {g['max_rel']:.2e} "
              f"({g['worst_param']}; target <= {tol:g}); over all parameters together "
              f"||g_rev - g_ord|| / ||g_ord|| = {g['global_rel']:.2e}; loss difference {g['loss_diff']:.2e}")
        if "ordinary_vs_fp64" in g:
            print(f"  precision floor: ordinary {g['dtype']} vs ordinary float64 {g['ordinary_vs_fp64']:.2e}, "
                  f"reversible {g['dtype']} vs ordinary float64 {g['reversible_vs_fp64']:.2e} (worst tensor); all "
                  f"parameters together: ordinary {g['ordinary_vs_fp64_global']:.2e}, reversible "
                  f"{g['reversible_vs_fp64_global']:.2e}")
            print(f"  sensitivity: ordinary {g['dtype']} with every input value moved by about one ulp differs from "
                  f"itself by {g['ordinary_1ulp_global']:.2e} (all parameters together), "
                  f"{g['ordinary_1ulp_worst']:.2e} (worst tensor)")
            print(f"  without stored inputs (checkpoints=None): all parameters together "
                  f"{g['no_checkpoints_global']:.2e} from ordinary {g['dtype']}, "
                  f"{g['no_checkpoints_vs_fp64_global']:.2e} from float64")
        if "kinks_global" in g:
            side = f"with kink_tol={g['kink_tol']:g}" if g["kink_tol"] else "without kink records (kink_tol=None)"
            print(f"  {side}: all parameters together {g['kinks_global']:.2e} from ordinary "
                  f"{g['dtype']} (worst tensor {g['kinks_worst']:.2e}), {g['kinks_vs_fp64_global']:.2e} from float64")
        print(f"  with bit_exact=True: worst tensor {g['bit_exact_worst']:.2e}, all parameters together "
              f"{g['bit_exact_global']:.2e} from ordinary {g['dtype']}")
    rev = [r["saved_peak"] for r in rows if r["mode"] == "reversible"]
    flat = max(rev) / max(min(rev), 1) if rev else None
    if rev:
        print(f"reversible saved-activation peak, max/min over K = {depths}: {flat:.3f} "
              f"(target <= {TARGETS['flatness_max']})")
    result = {"machine": machine_info(torch.device("cpu")), "config": dict(cfg, depths=depths, dtype="float32",
                                                                           time_steps=args.time_steps,
                                                                           repeats=args.repeats, argv=argv),
              "targets": TARGETS, "memory": rows, "timing": timing, "gradients": grads, "flatness": flat}
    if args.plot and rows:
        print(f"plot: {plot(rows, depths, args.plot, 'Memory of a training step: ' + desc)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
