"""CNF / FFJORD: log-likelihoods against brute-force log-dets of the integrated map, the three trace paths
(fused op, torch.func, autograd reference) against each other, adjoint vs direct gradients, bad input,
and the ``flowops train ffjord`` task on a few steps."""
import sys

import pytest
import torch
from torch import nn

import flowops
from flowops.models import FFJORD
from flowops.nn import CNF, MLPVectorField
from flowops.nn.cnf import func_trace, trace_fn

pytest.importorskip("torchdiffeq")

MODES = ("fused", "func", "reference")


def field64(d=2, hidden=(8, 8), act="tanh", seed=0, std=0.5):
    torch.manual_seed(seed)
    f = MLPVectorField(d, hidden, act).double()
    with torch.no_grad():
        for p in f.parameters():
            p.normal_(0.0, std)
    return f


class QuadField(nn.Module):
    """A vector field that is not an MLP (the torch.func path): f = A z + 0.1 sin(z) * t + c z^2."""

    def __init__(self, d=2):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, t, z):
        return z @ self.A.t() + 0.1 * torch.sin(z) * t + self.c * z * z


def brute_logdet(cnf, x):
    J = torch.autograd.functional.jacobian(lambda xx: cnf(xx)[0].sum(0), x).permute(1, 0, 2)
    return torch.linalg.slogdet(J)[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", ["tanh", "softplus", "silu"])
def test_logdet_matches_bruteforce_of_integrated_map(mode, act):
    field = field64(2, (8, 8), act)
    cnf = CNF(field, solver="dopri5", atol=1e-9, rtol=1e-9, mode=mode)
    x = torch.randn(4, 2, dtype=torch.float64)
    z, ld = cnf(x)
    torch.testing.assert_close(ld, brute_logdet(cnf, x), rtol=1e-6, atol=1e-6)
    xr, ldi = cnf.inverse(z)
    torch.testing.assert_close(xr, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ld + ldi, torch.zeros_like(ld), rtol=0, atol=1e-6)


def test_generic_field_logdet_matches_bruteforce():
    cnf = CNF(QuadField(3), solver="dopri5", atol=1e-9, rtol=1e-9)
    x = 0.5 * torch.randn(3, 3, dtype=torch.float64)
    z, ld = cnf(x)
    torch.testing.assert_close(ld, brute_logdet(cnf, x), rtol=1e-6, atol=1e-6)


def test_flow_log_prob_matches_change_of_variables():
    flow = FFJORD(2, hidden=(8,), solver="dopri5", atol=1e-9, rtol=1e-9).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(3, 2, dtype=torch.float64)
    cnf = flow.cnfs[0]
    z, _ = cnf(x)
    want = -0.5 * (z * z).sum(1) - torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)) + brute_logdet(cnf, x)
    torch.testing.assert_close(flow.log_prob(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_three_trace_paths_agree_with_gradients(trace):
    field = field64(3, (8, 8), "silu", seed=1, std=0.4)
    x = torch.randn(6, 3, dtype=torch.float64)
    results = {}
    for mode in MODES:
        cnf = CNF(field, trace=trace, probes=2, solver="rk4", step_size=0.25, mode=mode)
        torch.manual_seed(5)  # the same probes for every path
        z, ld = cnf(x)
        loss = (-0.5 * (z * z).sum(1) + ld).mean()
        results[mode] = (z, ld, torch.autograd.grad(loss, list(field.parameters())))
    for mode in ("func", "reference"):
        torch.testing.assert_close(results["fused"][0], results[mode][0])
        torch.testing.assert_close(results["fused"][1], results[mode][1])
        for a, b in zip(results["fused"][2], results[mode][2]):
            torch.testing.assert_close(a, b)


def test_auto_mode_picks_fused_reference_and_func(monkeypatch):
    calls = []
    import flowops.nn.cnf as cnf_mod

    for name in ("func_trace",):
        orig = getattr(cnf_mod, name)
        monkeypatch.setattr(cnf_mod, name, lambda *a, _o=orig, **k: calls.append("func") or _o(*a, **k))
    field = field64(2, (4,))
    z = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor(0.1, dtype=torch.float64)
    f1, tr1 = trace_fn(field, t, z)
    with flowops.use_backend("reference"):
        f2, tr2 = trace_fn(field, t, z)
    f3, tr3 = trace_fn(QuadField(2), t, z)
    assert calls == ["func"]
    torch.testing.assert_close(tr1, tr2)
    torch.testing.assert_close(f1, f2)
    with pytest.raises(TypeError, match="MLPVectorField"):
        trace_fn(QuadField(2), t, z, mode="fused")


def test_func_trace_hutchinson_matches_exact_on_basis():
    field = QuadField(3)
    z = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    basis = torch.eye(3, dtype=torch.float64)[:, None, :].expand(3, 4, 3)
    _, tr_e = func_trace(field, t, z)
    _, tr_h = func_trace(field, t, z, basis)
    torch.testing.assert_close(3 * tr_h, tr_e)


def test_adjoint_gradients_match_direct():
    field = field64(2, (8, 8), "tanh", seed=2, std=0.4)
    x = torch.randn(5, 2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        cnf = CNF(field, solver="dopri5", atol=1e-10, rtol=1e-10, adjoint=adjoint)
        z, ld = cnf(x)
        loss = (-0.5 * (z * z).sum(1) + ld).mean()
        grads.append(torch.autograd.grad(loss, list(field.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_hutchinson_cnf_gaussian_probes_and_nfe():
    flow = FFJORD(2, hidden=(8, 8), trace="hutchinson", probes=3, noise="gaussian", solver="rk4", step_size=0.5)
    x = torch.randn(16, 2)
    lp = flow.log_prob(x)
    assert lp.shape == (16,) and torch.isfinite(lp).all()
    assert flow.last_nfe == 8  # rk4, 2 steps, 4 stages
    lp.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())


def test_sample_and_log_prob_consistent():
    flow = FFJORD(2, hidden=(8,), solver="dopri5", atol=1e-8, rtol=1e-8).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.3)
        x, lp = flow.sample_and_log_prob(7)
        torch.testing.assert_close(flow.log_prob(x), lp, rtol=1e-5, atol=1e-5)
    assert flow.sample(0).shape == (0, 2)


def test_identity_at_initialization():
    flow = FFJORD(3)
    x = torch.randn(5, 3)
    z, ld = flow(x)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(ld, torch.zeros(5))


def test_bad_input():
    cnf = CNF(MLPVectorField(2, (4,)), solver="rk4")
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        cnf(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        cnf(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        cnf(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cnf.inverse([[0.0, 1.0]])
    with pytest.raises(ValueError, match="trace"):
        CNF(MLPVectorField(2), trace="bogus")
    with pytest.raises(ValueError, match="probes"):
        CNF(MLPVectorField(2), trace="hutchinson", probes=0)
    with pytest.raises(ValueError, match="noise"):
        CNF(MLPVectorField(2), noise="uniform")
    with pytest.raises(TypeError, match="vector_field"):
        CNF(lambda t, z: z)
    with pytest.raises(ValueError, match="atol"):
        CNF(MLPVectorField(2), atol=0)
    with pytest.raises(ValueError, match="activation"):
        MLPVectorField(2, activation="relu")
    with pytest.raises(ValueError, match="dim"):
        MLPVectorField(0)
    with pytest.raises(ValueError, match="features"):
        FFJORD(0)


def test_missing_torchdiffeq_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    cnf = CNF(MLPVectorField(2, (4,)))
    with pytest.raises(ImportError, match="torchdiffeq"):
        cnf(torch.randn(2, 2))


def test_empty_batch():
    cnf = CNF(MLPVectorField(2, (4,)))
    z, ld = cnf(torch.randn(0, 2))
    assert z.shape == (0, 2) and ld.shape == (0,)


def test_train_ffjord_cli(tmp_path):
    from flowops import cnf_train

    out = tmp_path / "ff.png"
    js = tmp_path / "m.json"
    rc = cnf_train.main(["--steps", "4", "--batch", "32", "--heldout", "300", "--hidden", "16", "--compare",
                         "--plot-grid", "12", "--out", str(out), "--json", str(js), "--quiet"])
    assert rc == 0
    assert out.exists() and out.stat().st_size > 1000
    import json

    m = json.loads(js.read_text())
    assert m["fused_nfe_per_solve_mean"] == 32 and m["reference_nfe_per_solve_mean"] == 32
    assert abs(m["fused"]["heldout_nll"] - m["reference"]["heldout_nll"]) < 1e-4  # same batches, same weights
    assert cnf_train.main(["--steps", "-1"]) == 2
    assert cnf_train.main(["--lr", "0"]) == 2
