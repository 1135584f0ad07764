"""The 2-moons training example: data, the training loop, the CLI entry point and the figure."""
import json
import math

import pytest
import torch

import flowops
from flowops import data, train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_moons_shape_dtype_and_seed():
    a = data.moons(101, seed=3)
    assert a.shape == (101, 2) and a.dtype == torch.float32
    assert torch.equal(a, data.moons(101, seed=3))
    assert not torch.equal(a, data.moons(101, seed=4))
    assert data.moons(0).shape == (0, 2)
    with pytest.raises(ValueError, match="n"):
        data.moons(-1)
    # Both crescents: roughly x in [-1, 2], y in [-0.5, 1] for the default noise.
    x = data.moons(4000, seed=0)
    assert -1.3 < x[:, 0].min() < -0.8 and 1.8 < x[:, 0].max() < 2.3
    assert -0.8 < x[:, 1].min() < -0.3 and 0.8 < x[:, 1].max() < 1.3


def test_sampler_is_reproducible_and_fresh():
    s1, s2 = data.MoonsSampler(seed=5, chunk=100), data.MoonsSampler(seed=5, chunk=100)
    batches = [s1(37) for _ in range(6)]  # crosses chunk boundaries
    assert all(b.shape == (37, 2) for b in batches)
    assert all(torch.equal(b, s2(37)) for b in batches)
    assert not torch.equal(batches[0], batches[1])
    assert s1(250).shape == (250, 2)  # a request larger than one chunk


def test_standardize_is_a_flow_layer_with_the_right_logdet():
    x = data.moons(500, seed=1).double()
    std = data.Standardize.fit(x)
    z, ld = std(x)
    assert torch.allclose(z.mean(0), torch.zeros(2, dtype=z.dtype), atol=1e-6)
    assert torch.allclose(z.std(0), torch.ones(2, dtype=z.dtype), atol=1e-6)
    assert torch.allclose(ld, -torch.log(std.std.double()).sum().expand(500))
    back, ld_inv = std.inverse(z)
    assert torch.allclose(back, x, atol=1e-6) and torch.allclose(ld + ld_inv, torch.zeros_like(ld))
    # The standardized model's log_prob is in raw-data units: with identity couplings (zero-initialized),
    # it is the density of N(mean, diag(std^2)).
    model = train.build_moons_model(layers=2, hidden=8, standardize=std).double()
    with torch.no_grad():
        lp = model.log_prob(x)
    ref = torch.distributions.Normal(std.mean.double(), std.std.double()).log_prob(x).sum(1)
    assert torch.allclose(lp, ref, atol=1e-10)


def test_short_training_decreases_the_nll():
    torch.manual_seed(0)
    model = train.build_moons_model(layers=4, hidden=32)
    heldout = data.moons(2000, seed=11)
    before = train.evaluate_nll(model, heldout)
    hist = train.train_flow(model, data.MoonsSampler(seed=0), steps=100, batch=128, lr=3e-3, seed=0,
                            progress=False)
    after = train.evaluate_nll(model, heldout)
    assert hist.steps == 100 and len(hist.step_time) == 100 and len(hist.grad_norm) == 100
    assert all(math.isfinite(v) for v in hist.nll)
    assert after < before - 0.5, (before, after)
    assert sum(hist.nll[-20:]) / 20 < sum(hist.nll[:20]) / 20
    assert model.training  # the mode is restored


def test_lockstep_training_same_init_same_batches():
    torch.manual_seed(0)
    a = train.build_moons_model(layers=2, hidden=16)
    b = train.build_moons_model(layers=2, hidden=16)
    b.load_state_dict(a.state_dict())
    hists = train.train_flows([a, b], data.MoonsSampler(seed=1), steps=5, batch=32, progress=False,
                              backends=[None, "reference"])
    assert [h.backend for h in hists][1] == "reference"
    # Same weights and batch: the first step's losses agree to rounding whatever the backend.
    assert abs(hists[0].nll[0] - hists[1].nll[0]) < 1e-5
    with pytest.raises(ValueError, match="backends"):
        train.train_flows([a, b], data.MoonsSampler(seed=1), steps=1, batch=8, backends=[None], progress=False)


def test_main_moons_smoke(tmp_path, capsys):
    png, js = tmp_path / "moons.png", tmp_path / "metrics.json"
    rc = train.main(["moons", "--steps", "30", "--batch", "64", "--layers", "2", "--hidden", "16",
                     "--heldout", "500", "--compare", "--quiet", "--out", str(png), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out NLL" in out and "reference/" in out
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(js.read_text())
    assert math.isfinite(metrics["fused"]["heldout_nll"]) and math.isfinite(metrics["reference"]["heldout_nll"])
    assert metrics["fused"]["steps"] == 30 and len(metrics["history"]["fused"]["nll"]) == 30
    assert math.isfinite(metrics["nll_diff"]) and metrics["time_ratio"] > 0
    # The trained weights evaluate the same under the fused and the reference ops.
    assert abs(metrics["fused_model_reference_eval_nll"] - metrics["fused"]["heldout_nll"]) < 1e-4


def test_main_no_plot_and_usage(tmp_path, capsys):
    js = tmp_path / "m.json"
    assert train.main(["moons", "--steps", "3", "--batch", "16", "--layers", "2", "--hidden", "8", "--heldout",
                       "100", "--no-plot", "--quiet", "--json", str(js)]) == 0
    metrics = json.loads(js.read_text())
    assert "reference" not in metrics and "figure" not in metrics
    assert train.main(["moons", "--help"]) == 0
    assert "--compare" in capsys.readouterr().out
    assert train.main([]) == 0
    assert train.main(["nosuchtask"]) == 2
    assert train.main(["moons", "--steps", "-1"]) == 2


def test_demo_compares_by_default():
    p_demo, p_train = train._parser("demo", True), train._parser("moons", False)
    assert p_demo.parse_args([]).compare and not p_demo.parse_args(["--no-compare"]).compare
    assert not p_train.parse_args([]).compare and p_train.parse_args(["--compare"]).compare


def test_figure_accepts_plain_histories(tmp_path):
    from flowops.plots import chi2_2_quantiles, moons_figure

    # chi-square(2) is exponential with mean 2: median 2 log 2.
    assert abs(float(chi2_2_quantiles(0.5)) - 2 * math.log(2)) < 1e-12
    torch.manual_seed(0)
    model = flowops.models.RealNVP(2, layers=2, hidden=8)
    x = data.moons(300, seed=0)
    path = moons_figure(model, x, x, [2.0, 1.5, 1.2], str(tmp_path / "f.png"), n_samples=200, grid=40)
    assert (tmp_path / "f.png").exists() and path.endswith("f.png")


def test_lr_schedules():
    assert train.lr_factor("constant", 7, 10) == 1.0
    assert train.lr_factor("cosine", 0, 100) == 1.0
    assert abs(train.lr_factor("cosine", 50, 100) - 0.5) < 1e-12
    assert 0 < train.lr_factor("cosine", 99, 100) < 1e-3
    with pytest.raises(ValueError, match="schedule"):
        train.lr_factor("linear", 0, 10)
