"""``flowops train glow``: the digits data, the CLI end to end, exact resume, bad arguments, bits/dim sanity."""
import json
import math
import os

import pytest
import torch

from flowops import data, glow_train
from flowops.nn.preprocess import discrete_bits_per_dim

# A tiny Glow: 8x8 -> 4x4x4 (one step, split) -> 2x2x8 (one step); a few ms per step.
TINY = ["--levels", "2", "--flow-steps", "1", "--hidden", "8", "--batch", "16", "--quiet", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    rc = glow_train.main([*TINY, "--out", str(out), *extra])
    return rc, out


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_digits_split():
    train, held = data.digits()
    assert train.shape == (1438, 1, 8, 8) and held.shape == (359, 1, 8, 8)
    assert train.dtype == held.dtype == torch.int64
    assert int(train.min()) == 0 and int(train.max()) == data.DIGITS_LEVELS - 1 == 16
    t2, h2 = data.digits()
    assert torch.equal(train, t2) and torch.equal(held, h2)  # the split is deterministic
    t3, _ = data.digits(seed=1)
    assert not torch.equal(train, t3)
    # train and held-out rows together are the whole data set (as multisets of images)
    from sklearn.datasets import load_digits

    full = torch.from_numpy(load_digits().images).round().long().flatten(1)
    both = torch.cat([train, held]).flatten(1)
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert key(both) == key(full)
    assert data.digits(test_fraction=0.5)[1].shape[0] == 898
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="test_fraction"):
            data.digits(test_fraction=bad)


def test_batch_order_epochs_and_resume():
    order = glow_train.BatchOrder(10, seed=3)
    first = torch.cat([order.next(4) for _ in range(5)])  # 20 indices: two full epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])
    state = order.state_dict()
    ahead = [order.next(3) for _ in range(7)]
    again = glow_train.BatchOrder(10, seed=99)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next(3)) for a in ahead)
    with pytest.raises(ValueError, match="permutation"):
        glow_train.BatchOrder(11, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="n must be positive"):
        glow_train.BatchOrder(0, seed=0)


def test_heldout_bpd_matches_the_library_pipeline():
    # The CLI's held-out bits/dim is preprocess.discrete_bits_per_dim: dequantize, logit with its log-det, bin width.
    torch.manual_seed(0)
    cfg = dict(glow_train.DEFAULTS, levels=2, flow_steps=1, hidden=8)
    model = glow_train.build_model(cfg)
    _, held = data.digits()
    x = held[:37]
    model.train()
    with torch.no_grad():
        model.log_prob(torch.randn(16, 1, 8, 8))  # ActNorm init
    got = glow_train.heldout_bpd(model, x, seed=5, draws=1, chunk=10)
    model.eval()
    with torch.no_grad():
        want = discrete_bits_per_dim(model, x, n_levels=17, alpha=0.05,
                                     generator=torch.Generator().manual_seed(5)).double().mean().item()
    assert got == pytest.approx(want, rel=1e-6)


def test_cli_end_to_end_writes_png_json_and_checkpoints(tmp_path, capsys):
    rc, out = _run(tmp_path, "run", "--steps", "6", "--checkpoint-every", "3", "--compare", "--samples", "8",
                   "--temperatures", "1.0,0.7")
    text = capsys.readouterr().out
    assert rc == 0
    assert "held-out" in text and "bits/dim" in text and "training-time ratio" in text
    png = out / "samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "glow" and m["steps_done"] == 6 and m["world_size"] == 1
    assert m["config"]["levels"] == 2 and m["config"]["flow_steps"] == 1 and m["config"]["hidden"] == 8
    assert math.isfinite(m["fused"]["heldout_bpd"]) and math.isfinite(m["reference"]["heldout_bpd"])
    assert len(m["history"]["fused"]) == len(m["history"]["reference"]) == 6
    # Same init, same batches, same noise: the fused and the reference twin stay together.
    assert abs(m["bpd_diff"]) < 1e-3
    assert m["time_ratio"] > 0 and m["reference"]["backend"] == "reference"
    assert sorted(os.listdir(out)) == ["checkpoint-step000003.pt", "checkpoint-step000006.pt", "metrics.json",
                                       "samples.png"]
    ck = _load(out / "checkpoint-step000006.pt")  # weights_only: tensors and primitive containers only
    assert ck["format"] == glow_train.FORMAT and ck["step"] == 6
    assert set(ck) >= {"model", "optimizer", "order", "noise", "torch_rng", "config", "history",
                       "reference_model", "reference_optimizer"}
    # A fresh model loads the saved weights and reproduces the reported held-out bits/dim.
    fresh = glow_train.build_model(ck["config"])
    fresh.load_state_dict(ck["model"])
    assert glow_train.heldout_bpd(fresh, data.digits()[1]) == pytest.approx(m["fused"]["heldout_bpd"], abs=1e-6)


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "reference_model"):
        if key in a:
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for key in ("optimizer", "reference_optimizer"):
        if key in a:
            for pid, st in a[key]["state"].items():
                for k, v in st.items():
                    assert torch.equal(v, b[key]["state"][pid][k]), f"{key} {pid} {k}"
    assert a["history"] == b["history"]
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["order"]["generator"], b["order"]["generator"])
    assert torch.equal(a["order"]["perm"], b["order"]["perm"]) and a["order"]["pos"] == b["order"]["pos"]


@pytest.mark.parametrize("compare", [False, True])
def test_resume_continues_exactly(tmp_path, compare):
    # 10 steps straight (checkpoint at 5) == 5 steps, then a fresh process state resumed for 5 more. With batch
    # 16 over 1438 images the data order crosses no epoch here; the noise and order streams still must resume.
    extra = ["--compare"] if compare else []
    rc, straight = _run(tmp_path, "straight", "--steps", "10", "--checkpoint-every", "5", "--no-plot", *extra)
    assert rc == 0
    half = straight / "checkpoint-step000005.pt"
    rc, resumed = _run(tmp_path, "resumed", "--resume", str(half), "--no-plot")
    assert rc == 0
    a, b = _load(straight / "checkpoint-step000010.pt"), _load(resumed / "checkpoint-step000010.pt")
    _assert_same_state(a, b)
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert ma["history"] == mb["history"] and len(mb["history"]["fused"]) == 10
    assert ma["fused"]["heldout_bpd"] == mb["fused"]["heldout_bpd"]
    # A different run really differs (the check above can fail): another seed.
    rc, other = _run(tmp_path, "other", "--steps", "10", "--checkpoint-every", "0", "--no-plot", "--seed", "1", *extra)
    assert rc == 0
    c = _load(other / "checkpoint-step000010.pt")
    assert c["history"] != a["history"]


def test_resume_across_an_epoch_boundary(tmp_path):
    # batch 300 over 1438 training images: the 5-step halves cross epoch ends (new permutations mid-run).
    common = ["--steps", "10", "--batch", "300", "--no-plot", "--hidden", "4"]
    rc, straight = _run(tmp_path, "s", *common, "--checkpoint-every", "5")
    assert rc == 0
    ck5 = _load(straight / "checkpoint-step000005.pt")
    assert ck5["order"]["epoch"] == 1
    rc, resumed = _run(tmp_path, "r", *common, "--resume", str(straight / "checkpoint-step000005.pt"))
    assert rc == 0  # the same options again are fine; only conflicting ones are refused
    _assert_same_state(_load(straight / "checkpoint-step000010.pt"), _load(resumed / "checkpoint-step000010.pt"))


def test_resume_can_extend_the_run(tmp_path, capsys):
    rc, first = _run(tmp_path, "a", "--steps", "4", "--no-plot", "--schedule", "constant", "--warmup", "0")
    assert rc == 0
    rc, more = _run(tmp_path, "b", "--resume", str(first / "checkpoint-step000004.pt"), "--steps", "6", "--no-plot")
    assert rc == 0
    assert "resumed from" in capsys.readouterr().out
    ck = _load(more / "checkpoint-step000006.pt")
    assert ck["step"] == 6 and len(ck["history"]["fused"]) == 6
    # constant learning rate, no warm-up: 4 + 2 steps equal 6 straight
    rc, straight = _run(tmp_path, "c", "--steps", "6", "--no-plot", "--schedule", "constant", "--warmup", "0")
    assert rc == 0
    _assert_same_state(_load(straight / "checkpoint-step000006.pt"), ck)


def _gaussian_mle_bpd(x, seed=0, draws=4):
    """Held-out bits/dim of the maximum-likelihood full-covariance Gaussian of the logit-space data, fitted to
    the evaluation data itself, with the evaluation's dequantization noise."""
    from flowops.nn.preprocess import LogitTransform, dequantize

    gen, total = torch.Generator().manual_seed(seed), 0.0
    for _ in range(draws):
        y, ld = LogitTransform(0.05)(dequantize(x, 17, generator=gen))
        y = y.flatten(1).double()
        cov = torch.cov(y.T, correction=0) + 1e-9 * torch.eye(y.shape[1], dtype=torch.float64)
        lp = torch.distributions.MultivariateNormal(y.mean(0), cov).log_prob(y) + ld.double()
        total += float((-(lp - 64 * math.log(17)) / (64 * math.log(2))).mean())
    return total / draws


def test_bits_per_dim_sane(tmp_path):
    # Untrained (ActNorm-initialized only): a finite value below the 8-bit scale and well above a trained model;
    # trained briefly: better than the uniform code over the 17 levels, log2(17) = 4.09.
    rc, zero = _run(tmp_path, "zero", "--steps", "0", "--no-plot")
    assert rc == 0
    m0 = json.loads((zero / "metrics.json").read_text())
    untrained = m0["fused"]["heldout_bpd"]
    assert m0["initial_heldout_bpd"] == pytest.approx(untrained)
    assert 3.0 < untrained < 4.5
    # At initialization every coupling is a constant scale and every split prior N(0, I): the untrained Glow is a
    # Gaussian in logit space, so it cannot beat the best Gaussian fitted to the held-out set itself (same noise).
    assert untrained >= _gaussian_mle_bpd(data.digits()[1]) - 1e-6
    rc, trained = _run(tmp_path, "trained", "--steps", "150", "--batch", "32", "--lr", "3e-3", "--warmup", "10",
                       "--no-plot", "--checkpoint-every", "0")
    assert rc == 0
    m = json.loads((trained / "metrics.json").read_text())
    bpd = m["fused"]["heldout_bpd"]
    assert bpd < math.log2(17) - 0.3 and bpd < untrained - 0.3
    assert m["initial_heldout_bpd"] == pytest.approx(untrained, abs=0.05)  # the same init up to the first batch
    h = m["history"]["fused"]
    assert sum(h[-20:]) / 20 < sum(h[:20]) / 20 - 0.3


def test_samples_png_helper(tmp_path):
    from flowops.plots import image_grid, sample_grid_figure

    imgs = torch.rand(10, 1, 8, 8)
    g = image_grid(imgs, cols=4, pad=1, pad_value=0.5)
    assert g.shape == (3 * 9 + 1, 4 * 9 + 1)
    assert g[1:9, 1:9].tolist() == imgs[0, 0].double().tolist()
    with pytest.raises(ValueError, match="one channel"):
        image_grid(torch.rand(2, 3, 8, 8))
    path = sample_grid_figure({"real": imgs, "samples": imgs.flip(0)}, str(tmp_path / "g.png"), cols=5, title="t")
    assert open(path, "rb").read(4) == b"\x89PNG"


BAD = [
    (["--steps", "-1"], "--steps must be non-negative"),
    (["--batch", "0"], "--batch must be positive"),
    (["--lr", "0"], "--lr must be a positive"),
    (["--lr", "nan"], "--lr must be a positive"),
    (["--levels", "4"], "--levels 4"),
    (["--flow-steps", "0"], "--flow-steps must be positive"),
    (["--hidden", "0"], "--hidden must be positive"),
    (["--clip", "-1"], "--clip must be non-negative"),
    (["--test-fraction", "1.5"], "--test-fraction"),
    (["--threads", "0"], "--threads must be positive"),
    (["--checkpoint-every", "-2"], "--checkpoint-every"),
    (["--temperatures", "1.0,hot"], "--temperatures"),
    (["--temperatures", "-1"], "--temperatures"),
    (["--coupling", "spline"], "invalid choice"),
    (["--steps", "ten"], "invalid int value"),
    (["--resume", "no/such/file.pt"], "no such file"),
    (["--distributed"], "torchrun"),
    (["--bit-exact"], "--bit-exact needs --reversible"),
    (["--stored-inputs", "4"], "--stored-inputs needs --reversible"),
    (["--reversible", "--stored-inputs", "-1"], "--stored-inputs must be non-negative"),
    (["--kink-tol", "1e-3"], "--kink-tol needs --reversible"),
    (["--reversible", "--kink-tol", "0.9"], "--kink-tol: reversible: kink_tol must be in"),
    (["--reversible", "--kink-tol=-1e-3"], "--kink-tol: reversible: kink_tol must be in"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, message):
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        rc = glow_train.main([*argv, "--out", str(tmp_path / "o"), "--quiet"])
    finally:
        os.environ.update(env)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_unavailable_backend_is_a_usage_error(tmp_path, capsys, monkeypatch):
    def unavailable(backend, device):
        raise RuntimeError(f"flowops backend {backend!r} is not available here")

    monkeypatch.setattr(glow_train, "_backend_name", unavailable)
    assert glow_train.main(["--backend", "cpp", "--out", str(tmp_path / "o")]) == 2
    assert "--backend cpp: flowops backend 'cpp' is not available here" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_resume_files(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    torch.save({"hello": torch.zeros(1)}, junk)
    assert glow_train.main(["--resume", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "not a 'flowops train glow' checkpoint" in capsys.readouterr().err
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    assert glow_train.main(["--resume", str(text), "--out", str(tmp_path / "o")]) == 2
    assert "cannot load" in capsys.readouterr().err
    rc, run = _run(tmp_path, "run", "--steps", "2", "--no-plot")
    assert rc == 0
    ck = str(run / "checkpoint-step000002.pt")
    capsys.readouterr()
    assert glow_train.main(["--resume", ck, "--hidden", "16", "--out", str(tmp_path / "o")]) == 2
    assert "--hidden 16 differs from the checkpoint's 8" in capsys.readouterr().err
    assert glow_train.main(["--resume", ck, "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "below the checkpoint's step 2" in capsys.readouterr().err
    assert glow_train.main(["--resume", ck, "--compare", "--out", str(tmp_path / "o")]) == 2
    assert "--compare True differs" in capsys.readouterr().err


def test_reversible_flag(tmp_path, capsys):
    common = ["--steps", "8", "--no-plot", "--lr", "3e-3", "--warmup", "0", "--dtype", "float64"]
    rc, out = _run(tmp_path, "rev", *common, "--reversible")
    if glow_train.glow_accepts_reversible():
        assert rc == 0
        ck = _load(out / "checkpoint-step000008.pt")
        assert ck["config"]["reversible"] is True
        # Reversible recomputation changes memory, not values: the same run without it has the same losses.
        # In float64 they agree to about 1e-13; a weight cache gone stale after the fused Adam step (which bumps
        # no version counter) used by the reversible backward's reconstruction puts them 0.04 apart.
        rc, plain = _run(tmp_path, "plain", *common)
        assert rc == 0
        a = _load(plain / "checkpoint-step000008.pt")["history"]["fused"]
        assert ck["history"]["fused"] == pytest.approx(a, abs=1e-9)
        assert a[-1] < a[0] - 0.01  # the runs moved
        # bit-exact rebuilds: the same run, its gradients ordinary backprop's
        rc, exact = _run(tmp_path, "exact", *common, "--reversible", "--bit-exact")
        assert rc == 0
        assert _load(exact / "checkpoint-step000008.pt")["history"]["fused"] == pytest.approx(a, abs=1e-12)
        # other stored-input budgets (the default stores every layer's input of this small model): the same run
        for c, kink in (("3", "1e-3"), ("0", "0")):  # --kink-tol 0: no kink records
            rc, budget = _run(tmp_path, "budget" + c, *common, "--reversible", "--stored-inputs", c,
                              "--kink-tol", kink)
            assert rc == 0
            assert _load(budget / "checkpoint-step000008.pt")["history"]["fused"] == pytest.approx(a, abs=1e-9)
    else:
        assert rc == 2
        assert "reversible" in capsys.readouterr().err


def test_train_dispatch_reaches_glow(tmp_path):
    from flowops import train

    assert train.main(["glow", *TINY, "--steps", "1", "--no-plot", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "checkpoint-step000001.pt").exists()
    assert train.main(["glow", "--levels", "9"]) == 2
