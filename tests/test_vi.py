"""Flow-based variational inference: targets, the ELBO's sign conventions, fitting, the CLI."""
import json
import math

import pytest
import torch

import flowops
from flowops import vi
from flowops.nn import Compose

F64 = torch.float64


def grid_log_z(target, lim=(-12.0, 12.0, -12.0, 40.0), n=1201):
    x = torch.linspace(lim[0], lim[1], n, dtype=F64)
    y = torch.linspace(lim[2], lim[3], 2 * n, dtype=F64)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    lp = target.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
    cell = (x[1] - x[0]) * (y[1] - y[0])
    return float(torch.logsumexp(lp, 0) + torch.log(cell))


@pytest.mark.parametrize("make", [vi.banana, vi.gaussian, lambda: vi.banana(1.0, 1.5)], ids=["banana", "gaussian",
                                                                                            "banana-sharp"])
def test_known_normalizers_match_numerical_integration(make):
    target = make()
    assert abs(grid_log_z(target) - target.log_z) < 1e-4


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_energies(name):
    target = vi.make_target(name.lower())
    assert target.name == name and target.log_z is None and target.dim == 2
    z = torch.randn(100, 2) * 3
    lp = target.log_prob(z)
    assert lp.shape == (100,) and torch.isfinite(lp).all()
    # far from the ridge/ring the energy is large: the density concentrates inside the plotting frame
    assert target.log_prob(torch.tensor([[0.0, 3.9]])).item() < target.log_prob(torch.tensor([[0.0, 0.0]])).item() \
        or name == "U1"


def test_energy_values_at_known_points():
    # U2 = 0.5 ((z2 - sin(pi z1 / 2)) / 0.4)^2 vanishes on the curve z2 = sin(pi z1 / 2)
    z = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.4]])
    torch.testing.assert_close(vi.energy("U2").log_prob(z), torch.tensor([0.0, 0.0, -0.5]))
    # U1 on the ring |z| = 2 at z1 = +-2: -log(1 + exp(-0.5 (4 / 0.6)^2))
    torch.testing.assert_close(vi.energy("U1").log_prob(torch.tensor([[2.0, 0.0]])),
                               torch.tensor([math.log1p(math.exp(-0.5 * (4 / 0.6) ** 2))]))


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_energies_are_normalizable(name):
    """exp(-U) has finite mass: the integral over a box twice the plotting frame equals the one over a box
    four times it (U2..U4 as published would grow with the box along z1)."""
    target = vi.energy(name)
    small = grid_log_z(target, (-8.0, 8.0, -8.0, 8.0), 801)
    large = grid_log_z(target, (-16.0, 16.0, -16.0, 16.0), 1601)
    assert abs(small - large) < 1e-3


def test_target_bad_input():
    with pytest.raises(ValueError, match="target must be one of"):
        vi.make_target("moons")
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        vi.banana().log_prob(torch.randn(3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vi.banana().log_prob([[0.0, 0.0]])
    with pytest.raises(ValueError, match="positive"):
        vi.gaussian((0.0, 0.0), (1.0, -1.0))
    with pytest.raises(ValueError, match="same length"):
        vi.gaussian((0.0, 0.0), (1.0,))
    with pytest.raises(ValueError, match="positive"):
        vi.banana(a=0.0)


def test_elbo_of_the_base_against_its_own_unnormalized_density_is_log_z():
    """No transform: q = N(0, I); with p~ = exp(-|z|^2 / 2) every term is log Z = log(2 pi) exactly."""
    flow = flowops.Flow(flowops.StandardNormal(2), Compose())
    target = vi.Target("std", 2, lambda z: -0.5 * (z * z).sum(1), math.log(2 * math.pi))
    _, terms = vi.elbo(flow, target, 64)
    torch.testing.assert_close(terms, torch.full((64,), math.log(2 * math.pi)))


@pytest.mark.parametrize("kind", ["planar", "planar-eager", "radial", "realnvp", "iaf"])
def test_sample_log_prob_agrees_with_density_evaluation(kind):
    """The sign flip: log q from sampling (base log-prob MINUS the generative log-det) equals log_prob of the
    same points through the normalizing direction (PLUS its log-det); the ELBO against q's own density is 0."""
    torch.manual_seed(0)
    flow = vi.build_vi_flow(kind, 2, layers=6, hidden=16).double()
    with torch.no_grad():
        for p in flow.parameters():  # move away from the near-identity initialization
            p.add_(0.3 * torch.randn_like(p))
        x, log_q = flow.sample_and_log_prob(200)
        torch.testing.assert_close(flow.log_prob(x), log_q, rtol=1e-8, atol=1e-8)
        own = vi.Target("own", 2, flow.log_prob, 0.0)
        _, terms = vi.elbo(flow, own, 200)
    assert terms.abs().max() < 1e-8


def test_entropy_sign_on_a_stretching_map():
    """A radial layer that pushes mass outwards raises the entropy: E[generative log-det] > 0 and the ELBO
    against a broad flat-ish target exceeds that of the bare base."""
    torch.manual_seed(1)
    layer = flowops.nn.Radial(2).double()
    with torch.no_grad():
        layer.z0.zero_()
        layer.beta_raw.fill_(3.0)  # beta = softplus(3) - 1 > 0: expands around z0
    z = torch.randn(4000, 2, dtype=F64)
    _, ld = layer.inverse(z)
    assert ld.mean() > 0
    flow = flowops.Flow(flowops.StandardNormal(2).double(), [layer])
    base = flowops.Flow(flowops.StandardNormal(2).double(), Compose())
    wide = vi.gaussian((0.0, 0.0), (3.0, 3.0))
    torch.manual_seed(2)
    e_flow = vi.estimate_elbo(flow, wide, 20000)[0]
    torch.manual_seed(2)
    e_base = vi.estimate_elbo(base, wide, 20000)[0]
    assert e_flow > e_base


def test_fit_reaches_log_z_for_a_gaussian_target():
    """A diagonal Gaussian is inside the RealNVP family, so the optimum ELBO is log Z (KL = 0); the fitted
    flow's estimate must reach it within Monte Carlo error."""
    target = vi.gaussian()
    torch.manual_seed(0)
    flow = vi.build_vi_flow("realnvp", 2, layers=2, hidden=16)
    hist = vi.fit_vi(flow, target, steps=500, batch=256, lr=1e-2, seed=0, progress=False, eval_samples=20000)
    assert hist.steps == 500 and len(hist.grad_norm) == 500
    gap = target.log_z - hist.final_elbo
    assert abs(gap) < 4 * hist.final_stderr + 2e-3, (hist.final_elbo, hist.final_stderr, target.log_z)
    assert hist.elbo[-1] > hist.elbo[0]


def test_fit_planar_stack_on_banana_improves_and_stays_below_log_z():
    target = vi.banana()
    torch.manual_seed(0)
    flow = vi.build_vi_flow("planar", 2, layers=16)
    before, _ = vi.estimate_elbo(flow, target, 5000)
    hist = vi.fit_vi(flow, target, steps=400, batch=256, lr=1e-2, seed=0, progress=False, eval_samples=20000)
    assert hist.final_elbo > before + 1.0
    assert hist.final_elbo > target.log_z - 0.5
    assert hist.final_elbo < target.log_z + 4 * hist.final_stderr  # the ELBO is a lower bound


def test_fit_vi_bad_input():
    flow = vi.build_vi_flow("planar", 2, layers=2)
    target = vi.banana()
    with pytest.raises(ValueError, match="steps"):
        vi.fit_vi(flow, target, steps=-1, progress=False)
    with pytest.raises(ValueError, match="batch"):
        vi.fit_vi(flow, target, steps=1, batch=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        vi.fit_vi(flow, target, steps=1, lr=0.0, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        vi.fit_vi(flow, target, steps=1, schedule="step", progress=False)
    with pytest.raises(TypeError, match="Target"):
        vi.fit_vi(flow, "banana", steps=1, progress=False)
    with pytest.raises(TypeError, match="sample_and_log_prob"):
        vi.fit_vi(torch.nn.Linear(2, 2), target, steps=1, progress=False)
    with pytest.raises(ValueError, match="kind"):
        vi.build_vi_flow("maf", 2)
    with pytest.raises(ValueError, match="n must be positive"):
        vi.elbo(flow, target, 0)


def test_fit_vi_zero_steps_and_annealing():
    flow = vi.build_vi_flow("radial", 2, layers=2)
    hist = vi.fit_vi(flow, vi.energy("U3"), steps=0, progress=False, eval_samples=100)
    assert hist.steps == 0 and math.isfinite(hist.final_elbo)
    hist = vi.fit_vi(flow, vi.energy("U3"), steps=5, anneal=3, progress=False, eval_samples=0)
    assert hist.steps == 5 and hist.final_elbo is None


def test_cli_writes_figure_and_json(tmp_path, capsys):
    from flowops import train

    png, js = tmp_path / "vi.png", tmp_path / "vi.json"
    rc = train.main(["vi", "--target", "banana", "--steps", "30", "--layers", "4", "--eval-samples", "2000",
                     "--out", str(png), "--json", str(js), "--quiet"])
    assert rc == 0
    assert png.stat().st_size > 10000
    data = json.loads(js.read_text())
    assert data["summary"]["steps"] == 30 and len(data["history"]["elbo"]) == 30
    out = capsys.readouterr().out
    assert "final ELBO" in out and "log Z" in out


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4", "gaussian"])
def test_figure_for_every_target(tmp_path, name):
    target = vi.make_target(name)
    flow = vi.build_vi_flow("planar", 2, layers=2)
    path = vi.vi_figure(flow, target, [0.0, 1.0, 2.0], str(tmp_path / f"{name}.png"), n_samples=500, grid=40)
    assert (tmp_path / f"{name}.png").stat().st_size > 5000 and path.endswith(".png")


def test_cli_bad_arguments(capsys):
    from flowops import train

    assert train.main(["vi", "--steps", "-1", "--quiet"]) == 2
    assert train.main(["vi", "--lr", "0", "--quiet"]) == 2
    assert train.main(["vi", "--target", "moons"]) == 2
    assert train.main(["vi", "--help"]) == 0
    assert "--target" in capsys.readouterr().out
