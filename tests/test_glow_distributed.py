"""``torchrun --nproc_per_node=2 -m flowops train glow --distributed``: DDP on gloo equals one process.

Two processes (gloo, localhost, a free port chosen by torchrun's standalone rendezvous) train a tiny Glow
for a few steps on global batches of 9 images (shards of 5 and 4: the loss scaling must handle unequal
shards); a single process trains the same configuration in this test process. ActNorm initializes from
the whole first global batch on every rank, so the runs start equal and must stay equal. float64 makes
the comparison sharp: in float32, Adam's first steps amplify the rounding differences of the gradient
all-reduce for parameters whose gradient is near zero.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import flowops
from flowops import glow_train

ARGS = ["--levels", "2", "--flow-steps", "1", "--hidden", "8", "--batch", "9", "--steps", "4", "--warmup", "2",
        "--dtype", "float64", "--checkpoint-every", "2", "--no-plot", "--quiet", "--threads", "1"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_process_ddp_equals_single_process(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(flowops.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    dist_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flowops", "train", "glow", "--distributed", *ARGS, "--out", str(dist_out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + "\n--- stderr ---\n" + proc.stderr[:4000] + "\n...\n" + \
        proc.stderr[-2000:]
    assert "over 2 processes" in proc.stdout

    assert glow_train.main([*ARGS, "--out", str(tmp_path / "single")]) == 0  # restores the thread count itself

    md = json.loads((dist_out / "metrics.json").read_text())
    ms = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert md["world_size"] == 2 and ms["world_size"] == 1
    saved = {}
    for name in ("checkpoint-step000002.pt", "checkpoint-step000004.pt"):
        a = torch.load(dist_out / name, weights_only=True)
        b = torch.load(tmp_path / "single" / name, weights_only=True)
        saved[name] = b
        assert a["model"].keys() == b["model"].keys()
        for k, v in b["model"].items():
            if v.is_floating_point():
                assert _rel(a["model"][k], v) <= 1e-5, (name, k, _rel(a["model"][k], v))
        assert a["history"]["fused"] == pytest.approx(b["history"]["fused"], rel=1e-9)
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["order"]["perm"], b["order"]["perm"])
    # the check can fail: the parameters moved between the two checkpoints
    early, late = (saved[n]["model"] for n in ("checkpoint-step000002.pt", "checkpoint-step000004.pt"))
    moved = [k for k, v in late.items() if v.is_floating_point() and _rel(early[k], v) > 1e-4]
    assert len(moved) > 10
    assert md["fused"]["heldout_bpd"] == pytest.approx(ms["fused"]["heldout_bpd"], rel=1e-6)
    # A distributed checkpoint resumes in one process and continues like the single-process run.
    assert glow_train.main([*ARGS, "--resume", str(dist_out / "checkpoint-step000002.pt"),
                            "--out", str(tmp_path / "resumed")]) == 0
    c = torch.load(tmp_path / "resumed" / "checkpoint-step000004.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoint-step000004.pt", weights_only=True)
    for k, v in b["model"].items():
        if v.is_floating_point():
            assert _rel(c["model"][k], v) <= 1e-5, k
