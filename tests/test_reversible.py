"""Reversible recomputation: gradients equal ordinary backprop, drift checks, bounded memory, misuse errors."""
import copy
import json
import statistics
import warnings

import pytest
import torch
from torch import nn

from flowops import _backend, bench_reversible, benchmark
from flowops.flow import Flow
from flowops.models.glow import Glow
from flowops.models.maf import MAF
from flowops.models.realnvp import RealNVP
from flowops.nn.base import Compose, RandomPermutation, ReversePermutation, Transform
from flowops.nn.coupling import AdditiveCoupling, AffineCoupling
from flowops.nn.glow import ActNorm, InvConv1x1
from flowops.nn.planar import Planar
from flowops.reversible import (ReversibleDriftError, ReversibleDriftWarning, ReversibleSequential,
                                SavedTensorMeter)

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _perturb(module, scale=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return module


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _compare(ordinary, reversible, x, dtype, check_x=True):
    """Same log-density and gradients (input and every parameter) from the two modules."""
    xo = x.clone().requires_grad_(check_x)
    xr = x.clone().requires_grad_(check_x)
    lo = ordinary.log_prob(xo) if isinstance(ordinary, Flow) else ordinary(xo)[1]
    lr = reversible.log_prob(xr) if isinstance(reversible, Flow) else reversible(xr)[1]
    assert lr.grad_fn is not None
    torch.testing.assert_close(lr, lo, rtol=TOL[dtype], atol=TOL[dtype])
    w = torch.linspace(0.5, 1.5, x.shape[0], dtype=dtype)  # a non-uniform upstream gradient
    (lo * w).sum().backward()
    (lr * w).sum().backward()
    if check_x:
        assert _rel(xr.grad, xo.grad) <= TOL[dtype]
    n = 0
    for (name, po), pr in zip(ordinary.named_parameters(), reversible.parameters()):
        if po.grad is None:
            assert pr.grad is None, name
            continue
        assert pr.grad is not None, name
        assert _rel(pr.grad, po.grad) <= TOL[dtype], (name, _rel(pr.grad, po.grad))
        n += 1
    assert n > 0


def _rev_flow(flow: Flow, **kw) -> Flow:
    """The same flow (a deep copy) with its Compose replaced by a ReversibleSequential."""
    twin = copy.deepcopy(flow)
    twin.transform = ReversibleSequential(*twin.transform.transforms, **kw)
    return twin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", ["half", "alternating"])
def test_realnvp_gradients_equal(dtype, mask):
    flow = _perturb(RealNVP(5, layers=5, hidden=16, mask=mask)).to(dtype)
    rev = _rev_flow(flow)
    _compare(flow, rev, torch.randn(7, 5, dtype=dtype), dtype)
    state = flow.state_dict()
    assert set(rev.state_dict()) == set(state)  # same layout: checkpoints load either way


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maf_gradients_equal(dtype):
    flow = _perturb(MAF(4, transforms=3, hidden=(12, 12)), scale=0.2).to(dtype)
    _compare(flow, _rev_flow(flow), torch.randn(6, 4, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("checkpoints", ["default", None])
def test_glow_gradients_equal(dtype, coupling, checkpoints):
    torch.manual_seed(3)
    ordinary = Glow((3, 8, 8), levels=2, steps=2, hidden=8, coupling=coupling).to(dtype)
    rev = copy.deepcopy(ordinary)
    rev.transform.reversible = True
    if checkpoints != "default":  # the default stores every input of this small model; None rebuilds them all
        rev.transform.checkpoints = checkpoints
    # Fresh ActNorms: the data-dependent initialization happens inside the reversible forward.
    x = torch.rand(5, 3, 8, 8, dtype=dtype)
    _compare(ordinary, rev, x, dtype)
    assert all(bool(m.initialized) for m in rev.modules() if isinstance(m, ActNorm))
    for (n, a), b in zip(ordinary.named_buffers(), rev.buffers()):
        torch.testing.assert_close(a, b, msg=n)
    # Trained-looking weights (zero-initialized conditioner outputs perturbed), second step.
    _perturb(ordinary, 0.05)
    _perturb(rev, 0.05)
    ordinary.zero_grad()
    rev.zero_grad()
    _compare(ordinary, rev, x, dtype)


def test_glow_reversible_constructor_and_checkpoints():
    torch.manual_seed(0)
    g = Glow((3, 8, 8), levels=3, steps=3, hidden=8, reversible=True, checkpoint_every=4)
    assert g.transform.reversible and g.transform.checkpoint_every == 4
    ordinary = copy.deepcopy(g)
    ordinary.transform.reversible = False
    _perturb(g, 0.05)
    _perturb(ordinary, 0.05)
    _compare(ordinary, g, torch.rand(3, 3, 8, 8, dtype=torch.float32), torch.float32)
    with pytest.raises(ValueError, match="checkpoint_every"):
        Glow((3, 8, 8), levels=1, steps=1, hidden=4, reversible=True, checkpoint_every=0)
    # sampling and no-grad evaluation use the ordinary path: no custom autograd node
    g.eval()
    with torch.no_grad():
        z, ld = g.transform(torch.rand(2, 3, 8, 8))
        x, _ = g.transform.inverse(z)
    assert z.grad_fn is None and x.shape == (2, 3, 8, 8)


def test_checkpoints_budget_positions_and_options():
    d = 4
    for n, c in ((10, 3), (10, 10), (4, 9), (64, 16), (7, 1)):
        rs = ReversibleSequential(*[AffineCoupling(d, flip=i % 2 == 1) for i in range(n)], checkpoints=c)
        idx = sorted(rs.engine().checkpoint_indices())
        assert idx[0] == 0 and len(idx) == min(c, n), (n, c, idx)
        gaps = [b - a for a, b in zip(idx + [n], (idx + [n])[1:])]
        assert max(gaps) - min(gaps) <= 1, (n, c, idx)  # evenly spaced
    assert "checkpoints=3" in repr(ReversibleSequential(AffineCoupling(d), checkpoints=3))
    with pytest.raises(TypeError, match="checkpoints must be an int"):
        ReversibleSequential(AffineCoupling(d), checkpoints=2.0)
    with pytest.raises(ValueError, match="checkpoints must be at least 1"):
        ReversibleSequential(AffineCoupling(d), checkpoints=0)
    both = ReversibleSequential(*[AffineCoupling(d) for _ in range(10)], checkpoints=2, checkpoint_every=4)
    assert both.engine().checkpoint_indices() == {0, 4, 5, 8}  # the union
    g = Glow((3, 8, 8), levels=1, steps=1, hidden=4, reversible=True)
    assert g.transform.checkpoints == 32 and Glow((3, 8, 8), checkpoints=None).transform.checkpoints is None
    g.transform.checkpoints = 0  # set later: checked when the engine is built
    with pytest.raises(ValueError, match="checkpoints must be at least 1"):
        g.log_prob(torch.rand(2, 3, 8, 8)).sum().backward()


def test_checkpoints_budget_memory_independent_of_depth():
    torch.manual_seed(0)

    def peak(depth, **kw):
        stack = ReversibleSequential(*[AffineCoupling(16, hidden=8, flip=i % 2 == 1) for i in range(depth)], **kw)
        x = torch.randn(256, 16)
        with SavedTensorMeter(exclude=list(stack.parameters())) as meter:
            z, ld = stack(x)
            (z.square().sum() + ld.sum()).backward()
        return meter.peak

    one_input = 256 * 16 * 4
    budget = {k: peak(k, checkpoints=4) for k in (8, 32)}
    every = {k: peak(k, checkpoint_every=4) for k in (8, 32)}
    assert budget[32] == budget[8], budget
    assert every[32] >= every[8] + 5 * one_input, every  # 8 vs 2 stored inputs


def test_checkpoints_budget_glow_float32_accuracy():
    """A stored input every ~17 of the 67 layers keeps float32 rounding from building up through the stack
    (without them this configuration's gradients are ~2e-4 off ordinary backprop's); float64 equality too."""
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        ordinary = Glow((3, 8, 8), levels=2, steps=16, hidden=16).to(dtype)
        x = (torch.rand(8, 3, 8, 8) - 0.5).to(dtype)
        ordinary.log_prob(x)  # ActNorm initialization
        _perturb(ordinary, 0.05)
        rev = copy.deepcopy(ordinary)
        rev.transform.reversible, rev.transform.checkpoints = True, 4
        _compare(ordinary, rev, x, dtype)


@pytest.mark.skipif(not _backend.has_cpp(), reason="C++ extension not built")
def test_kink_records_glow_float32(monkeypatch):
    """ReLU-kink records: a 67-layer float32 Glow rebuilt through the whole stack (no stored inputs) has gradients
    2.2e-4 from ordinary backprop's, all parameters together, because recomputed conditioner units cross their
    ReLU's kink; with the records they stay on the forward's side (4e-5 here). float64 equality too."""
    import flowops.reversible as rev_mod

    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        torch.manual_seed(0)
        ordinary = Glow((3, 8, 8), levels=2, steps=16, hidden=16).to(dtype)
        x = (torch.rand(8, 3, 8, 8) - 0.5).to(dtype)
        ordinary.log_prob(x)
        _perturb(ordinary, 0.05)
        rev = copy.deepcopy(ordinary)
        rev.transform.reversible, rev.transform.checkpoints, rev.transform.kink_tol = True, None, 1e-3
        recorded = []
        real = rev_mod._CouplingBlock.forward_kinks

        def spy(self, h, t):
            out = real(self, h, t)
            recorded.append(out[3] is not None and sum(r.numel() for r in out[3][::2]))
            return out

        with monkeypatch.context() as m:
            m.setattr(rev_mod._CouplingBlock, "forward_kinks", spy)
            (-rev.log_prob(x).mean()).backward()
        (-ordinary.log_prob(x).mean()).backward()
        assert len(recorded) == 31 and sum(recorded) > 0  # 32 couplings; the top one's output is the stack's
        num = sum(((q.grad - p.grad) ** 2).sum() for p, q in zip(ordinary.parameters(), rev.parameters()))
        den = sum((p.grad ** 2).sum() for p in ordinary.parameters())
        assert (num / den).sqrt().item() <= tol


@pytest.mark.skipif(not _backend.has_cpp(), reason="C++ extension not built")
def test_kink_records_skip_couplings_with_exact_outputs(monkeypatch):
    """With kink records, a coupling whose output the backward has exactly (the top of the stack, a stored input)
    records nothing, and a stored input that would fall on a coupling moves up one layer onto its output. The
    gradients stay ordinary backprop's (float64)."""
    import flowops.reversible as rev_mod

    torch.manual_seed(0)
    glow = _perturb(Glow((3, 8, 8), levels=2, steps=8, hidden=8, reversible=True, checkpoints=7), 0.05).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    glow.log_prob(x)  # ActNorm initialization
    blocks = rev_mod.reversible_blocks(glow.transform.named_layers())
    plain = rev_mod._Engine(blocks, checkpoints=7).checkpoint_indices()
    eng = rev_mod._Engine(blocks, checkpoints=7, kink_tol=1e-3)
    ckpt = eng.checkpoint_indices()
    assert len(ckpt) == len(plain) == 7 and 0 in ckpt
    coupling = [isinstance(b, rev_mod._CouplingBlock) for b in blocks]
    moved = sorted(ckpt - plain)
    assert moved and all(p - 1 in plain and coupling[p - 1] for p in moved)  # moved up from a coupling ...
    assert all(p == 0 or not coupling[p] for p in ckpt)  # ... so none sits on a coupling's input any more
    expect = [i for i, c in enumerate(coupling) if c and i + 1 != len(blocks) and i + 1 not in ckpt]
    assert eng.exact_output(len(blocks) - 1, ckpt) and not eng.exact_output(expect[0], ckpt)
    recorded = []
    real = rev_mod._CouplingBlock.forward_kinks

    def spy(self, h, t):
        recorded.append(blocks.index(next(b for b in blocks if b.module is self.module)))
        return real(self, h, t)

    ordinary = copy.deepcopy(glow)
    ordinary.transform.reversible = False
    with monkeypatch.context() as m:
        m.setattr(rev_mod._CouplingBlock, "forward_kinks", spy)
        m.setattr(rev_mod, "KEEP_SMALL", False)  # every coupling recorded or exact, none kept
        (-glow.log_prob(x).mean()).backward()
    (-ordinary.log_prob(x).mean()).backward()
    assert sorted(recorded) == expect and len(expect) < sum(coupling) - len(moved)
    for p, q in zip(ordinary.parameters(), glow.parameters()):
        assert _rel(q.grad, p.grad) <= 1e-9


def test_kink_tol_option():
    with pytest.raises(TypeError, match="kink_tol must be a number"):
        ReversibleSequential(AffineCoupling(4), kink_tol="small")
    with pytest.raises(ValueError, match="kink_tol must be in"):
        ReversibleSequential(AffineCoupling(4), kink_tol=0.0)
    assert "kink_tol=0.001" in repr(ReversibleSequential(AffineCoupling(4), kink_tol=1e-3))
    g = Glow((3, 8, 8), levels=2, steps=2, hidden=8, reversible=True)
    assert g.transform.kink_tol == 1e-4  # Glow's default
    assert Glow((3, 8, 8), levels=2, steps=2, hidden=8, kink_tol=None).transform.kink_tol is None
    with pytest.raises(ValueError, match="kink_tol must be in"):
        Glow((3, 8, 8), levels=2, steps=2, hidden=8, kink_tol=0.5)
    g.transform.kink_tol = 2.0
    with pytest.raises(ValueError, match="kink_tol must be in"):
        g.log_prob(torch.rand(2, 3, 8, 8)).sum().backward()
    # with micro_batch the records are off (they index the whole batch): the micro-batched gradients
    torch.manual_seed(0)
    a = _perturb(Glow((3, 8, 8), levels=2, steps=2, hidden=8, reversible=True, checkpoints=None, kink_tol=None),
                 0.05)
    b = copy.deepcopy(a)
    a.transform.micro_batch, b.transform.micro_batch, b.transform.kink_tol = 2, 2, 1e-3
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64).float()
    for m in (a, b):
        m.log_prob(x).sum().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_mixed_stack_shared_frozen_and_hooks():
    torch.manual_seed(0)
    d = 6
    shared = AffineCoupling(d, hidden=8, scale="exp")
    frozen = AffineCoupling(d, hidden=8, flip=True)
    layers = [ActNorm(d), shared, RandomPermutation(d), frozen, InvConv1x1(d), AdditiveCoupling(d, mask="alternating",
                                                                                                  hidden=8), shared]
    inner = ReversibleSequential(*layers)
    outer_rev = Compose(AffineCoupling(d, hidden=8), inner, AffineCoupling(d, hidden=8, flip=True))
    _perturb(outer_rev, 0.2)
    for p in frozen.parameters():
        p.requires_grad_(False)
    outer_ord = copy.deepcopy(outer_rev)
    outer_ord.transforms[1] = Compose(*outer_ord.transforms[1].transforms)
    seen = []
    shared_rev = outer_rev.transforms[1].transforms[1]
    shared_rev.conditioner[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    _compare(outer_ord, outer_rev, torch.randn(9, d, dtype=torch.float32), torch.float32)
    assert len(seen) == 1  # the shared parameter's hook fired once, with the summed gradient
    torch.testing.assert_close(seen[0], shared_rev.conditioner[0].weight.grad)
    assert all(p.grad is None for p in outer_rev.transforms[1].transforms[3].parameters())


def test_logdet_matches_bruteforce_jacobian_and_gradcheck():
    torch.manual_seed(0)
    d = 4
    rs = _perturb(ReversibleSequential(AffineCoupling(d, hidden=8, scale="exp"), ReversePermutation(d),
                                       AffineCoupling(d, hidden=8, mask="alternating"), ActNorm(d)), 0.3).double()
    rs(torch.randn(16, d, dtype=torch.float64))  # ActNorm initialization
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    _, ld = rs(x)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: rs(v.unsqueeze(0))[0].squeeze(0), x[i].detach())
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac)[1].detach())
    assert torch.autograd.gradcheck(lambda v: rs(v), (x,))
    # inverse round trip
    z, ldz = rs(x)
    xb, ldx = rs.inverse(z)
    torch.testing.assert_close(xb, x)
    torch.testing.assert_close(ldx, -ldz)


def _bad_coupling(d):
    """An affine coupling whose shift is huge: x * s + 1e6 keeps few of x's bits in float32."""
    c = AffineCoupling(d, hidden=4, scale="exp")
    with torch.no_grad():
        c.conditioner[-1].bias[d - d // 2:] = 1e6
    return c


def test_drift_check_names_layer():
    torch.manual_seed(0)
    d = 4
    good = lambda flip: _perturb(AffineCoupling(d, hidden=8, flip=flip), 0.1)  # noqa: E731
    rs = ReversibleSequential(good(False), good(True), _bad_coupling(d), good(True), good(False))
    x = torch.randn(8, d)
    with pytest.warns(ReversibleDriftWarning, match=r"transforms\.0.*worst single-layer round trip is layer "
                                                    r"transforms\.2 \(AffineCoupling"):
        rs(x)[1].sum().backward()
    rs.on_drift = "error"
    with pytest.raises(ReversibleDriftError, match="drift_tol"):
        rs(x)[1].sum().backward()
    rs.drift_tol = 10.0  # tolerance option: no complaint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rs(x)[1].sum().backward()
    # A checkpoint at the bad layer's output isolates the drift: the layers below rebuild exactly.
    rs.drift_tol, rs.checkpoint_every = None, 3
    with pytest.raises(ReversibleDriftError, match=r"layer transforms\.0 .*inverting layers 0\.\.2"):
        rs(x)[1].sum().backward()
    # A well-conditioned stack never warns.
    ok = ReversibleSequential(*[good(i % 2 == 1) for i in range(6)], on_drift="error")
    ok(x)[1].sum().backward()


def test_saved_memory_bounded_in_depth():
    torch.manual_seed(0)

    def peak(depth, reversible):
        layers = [AffineCoupling(16, hidden=64, flip=i % 2 == 1) for i in range(depth)]
        stack = ReversibleSequential(*layers) if reversible else Compose(*layers)
        x = torch.randn(128, 16)
        with SavedTensorMeter(exclude=list(stack.parameters())) as meter:
            z, ld = stack(x)
            (z.square().sum() + ld.sum()).backward()
        assert meter.live == 0
        return meter.peak

    rev = {k: peak(k, True) for k in (4, 16)}
    ordn = {k: peak(k, False) for k in (4, 16)}
    assert rev[16] <= 1.2 * rev[4], rev
    assert ordn[16] >= 3 * ordn[4], ordn
    assert ordn[16] >= 5 * rev[16], (ordn, rev)


def test_misuse_errors():
    d = 4
    with pytest.raises(TypeError, match=r"layer transforms\.1 \(Planar\) has no exact inverse"):
        ReversibleSequential(AffineCoupling(d), Planar(d))

    class NoExact(Transform):
        def forward(self, x):
            return x * 2, x.new_full((x.shape[0],), d * 0.6931)

        def inverse(self, z):
            return z / 2, z.new_full((z.shape[0],), -d * 0.6931)

    with pytest.raises(TypeError, match="exact_inverse"):
        ReversibleSequential(NoExact())
    declared = NoExact()
    declared.exact_inverse = True
    ReversibleSequential(declared)
    with pytest.raises(TypeError, match="Transform"):
        ReversibleSequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="on_drift"):
        ReversibleSequential(AffineCoupling(d), on_drift="explode")
    with pytest.raises(TypeError, match="checkpoint_every"):
        ReversibleSequential(AffineCoupling(d), checkpoint_every=1.5)

    rs = _perturb(ReversibleSequential(AffineCoupling(d, hidden=8), AffineCoupling(d, hidden=8, flip=True)))
    x = torch.randn(3, d, requires_grad=True)
    out = rs(x)[1].sum()
    out.backward()
    with pytest.raises(RuntimeError, match="second time through the same graph"):
        out.backward()
    out = rs(x)[1].sum()
    with pytest.raises(RuntimeError, match="first order"):
        torch.autograd.grad(out, x, create_graph=True)
    out = rs(x)[1].sum()
    with torch.no_grad():
        rs[0].conditioner[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()
    # empty batch: empty outputs, zero gradients
    z, ld = rs(torch.zeros(0, d, requires_grad=True))
    assert z.shape == (0, d) and ld.shape == (0,)
    ld.sum().backward()


def test_disabled_and_no_grad_paths_match():
    rs = _perturb(ReversibleSequential(AffineCoupling(4, hidden=8), AffineCoupling(4, hidden=8, flip=True)))
    x = torch.randn(5, 4)
    z1, l1 = rs(x)
    rs.enabled = False
    z2, l2 = rs(x)
    with torch.no_grad():
        rs.enabled = True
        z3, l3 = rs(x)
    assert z3.grad_fn is None
    for a in (z2, z3):
        torch.testing.assert_close(a, z1)
    for a in (l2, l3):
        torch.testing.assert_close(a, l1)


def test_bench_reversible_quick(tmp_path):
    js, png = tmp_path / "rev.json", tmp_path / "rev.png"
    argv = ["--op", "reversible", "--quick", "--in-process", "--threads", "1", "--plot", str(png),
            "--json", str(js)]
    assert benchmark.main(argv) == 0
    data = json.loads(js.read_text())
    assert png.stat().st_size > 0
    assert {r["mode"] for r in data["memory"]} == {"ordinary", "reversible"}
    assert len(data["memory"]) == 2 * len(data["config"]["depths"])
    for g in data["gradients"]:
        assert g["max_rel"] <= data["targets"]["grad_rel_" + ("fp32" if g["dtype"] == "float32" else "fp64")]
    assert data["timing"]["ratio"] > 0 and data["config"]["baseline"] == "warm"
    rounds = list(zip(data["timing"]["times_s"]["reversible"], data["timing"]["times_s"]["ordinary"]))
    assert data["timing"]["paired_ratio"] == pytest.approx(statistics.median(r / o for r, o in rounds))
    by = {(r["mode"], r["steps"]): r for r in data["memory"]}
    k = max(data["config"]["depths"])
    assert by[("ordinary", k)]["saved_peak"] > by[("reversible", k)]["saved_peak"] > 0
    assert benchmark.main(["--op", "reversible", "--baseline", "sometimes"]) == 2
    js2 = tmp_path / "exact.json"
    assert benchmark.main(["--op", "reversible", "--quick", "--in-process", "--threads", "1", "--plot", "",
                           "--bit-exact", "--no-memory", "--json", str(js2)]) == 0
    exact = json.loads(js2.read_text())
    assert exact["config"]["bit_exact"] and all(g["bit_exact_global"] <= 1e-6 for g in exact["gradients"])
    fp32 = next(g for g in data["gradients"] if g["dtype"] == "float32")
    assert fp32["no_checkpoints_global"] <= 1e-4 and fp32["no_checkpoints_vs_fp64_global"] <= 1e-4
    assert fp32["kink_tol"] is None and fp32["kinks_global"] <= 1e-4  # Glow's default has records: the line without
    assert benchmark.main(["--op", "reversible", "--kink-tol", "2"]) == 2
    js4 = tmp_path / "nokinks.json"
    assert benchmark.main(["--op", "reversible", "--quick", "--in-process", "--threads", "1", "--plot", "",
                           "--kink-tol", "0", "--no-memory", "--json", str(js4)]) == 0
    nokinks = json.loads(js4.read_text())
    assert nokinks["config"]["kink_tol"] == 0
    assert next(g for g in nokinks["gradients"] if g["dtype"] == "float32")["kink_tol"] == 1e-4
    js3 = tmp_path / "budget.json"
    assert benchmark.main(["--op", "reversible", "--quick", "--in-process", "--threads", "1", "--plot", "",
                           "--checkpoints", "0", "--no-memory", "--json", str(js3)]) == 0
    assert json.loads(js3.read_text())["config"]["checkpoints"] == 0
    assert benchmark.main(["--op", "reversible", "--checkpoints", "-1"]) == 2
    assert benchmark.main(["--op", "reversible", "--bit-exact", "--micro-batch", "2"]) == 2


@pytest.mark.parametrize("baseline", ["warm", "cold", "none"])
def test_bench_reversible_fresh_process_child(baseline):
    cfg = {"levels": 1, "hidden": 4, "image": 4, "channels": 3, "batch": 2, "seed": 0, "threads": 1,
           "steps": 2, "mode": "reversible", "baseline": baseline}
    rec = bench_reversible.run_child(cfg)
    assert rec["mode"] == "reversible" and rec["steps"] == 2
    assert rec["saved_peak"] > 0 and rec["rss_growth"] >= 0 and rec["param_bytes"] > 0


def test_micro_batch_gradients_equal():
    torch.manual_seed(0)
    ordinary = Glow((3, 8, 8), levels=2, steps=2, hidden=8)
    rev = copy.deepcopy(ordinary)
    rev.transform.reversible, rev.transform.micro_batch, rev.transform.checkpoints = True, 2, None
    _perturb(ordinary, 0.05)
    _perturb(rev, 0.05)
    _compare(ordinary, rev, torch.rand(5, 3, 8, 8, dtype=torch.float64).float(), torch.float32)
    rs = ReversibleSequential(AffineCoupling(4, hidden=8), micro_batch=3)
    ordinary_rs = copy.deepcopy(rs)
    ordinary_rs.enabled = False
    _perturb(rs)
    _perturb(ordinary_rs)
    _compare(ordinary_rs, rs, torch.randn(7, 4, dtype=torch.float32), torch.float32)
    with pytest.raises(ValueError, match="micro_batch"):
        ReversibleSequential(AffineCoupling(4), micro_batch=0)


def _direct_vs_generic(monkeypatch, model, x, dtype, tol):
    """Gradients of the reversible walk with the direct kernel calls equal those of the generic walk (autograd
    around each block's forward), and the direct run really took the kernels."""
    import flowops.reversible as rev_mod

    generic = copy.deepcopy(model)
    taken = {"conv": 0, "coupling": 0}
    real_direct, real_conv = rev_mod._CouplingBlock._backprop_direct, rev_mod._CouplingBlock._conv_net

    def spy_direct(self, *a, **k):
        taken["coupling"] += 1
        return real_direct(self, *a, **k)

    def spy_conv(self, yp):
        w = real_conv(self, yp)
        taken["conv"] += w is not None
        return w

    def no_local_grad(*a, **k):
        raise AssertionError("the generic ActNorm + InvConv walk ran")

    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    with monkeypatch.context() as m:
        m.setattr(rev_mod._CouplingBlock, "_backprop_direct", spy_direct)
        m.setattr(rev_mod._CouplingBlock, "_conv_net", spy_conv)
        m.setattr(rev_mod._ActNormInvConvBlock, "_local_grad", no_local_grad)
        (model.log_prob(xs[0]) * torch.linspace(0.5, 1.5, x.shape[0], dtype=dtype)).sum().backward()
    with monkeypatch.context() as m:
        m.setattr(rev_mod, "_direct", lambda t: False)
        (generic.log_prob(xs[1]) * torch.linspace(0.5, 1.5, x.shape[0], dtype=dtype)).sum().backward()
    assert _rel(xs[0].grad, xs[1].grad) <= tol
    for (name, a), b in zip(model.named_parameters(), generic.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert _rel(a.grad, b.grad) <= tol, (name, _rel(a.grad, b.grad))
    return taken


@pytest.mark.skipif(not _backend.has_cpp(), reason="C++ extension not built")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_direct_kernel_walk_matches_generic_walk_glow(monkeypatch, dtype, tol, coupling):
    """The direct walk against the generic one (autograd through each layer's forward). The ActNorm + 1x1 block's
    direct call sums its products in another order than the generic walk's aten ops (and rebuilds its input up to
    rounding), so float32 agrees to its rounding (about 1e-6 here) and float64 to 1e-13."""
    torch.manual_seed(0)
    model = _perturb(Glow((3, 8, 8), levels=2, steps=2, hidden=8, coupling=coupling), 0.05).to(dtype)
    model.log_prob(torch.rand(6, 3, 8, 8, dtype=dtype))  # ActNorm initialization
    model.transform.reversible, model.transform.checkpoints = True, None  # rebuild every input
    model.transform.kink_tol = None  # the walks themselves (kink records: their own tests)
    # frozen parameters: part of a conditioner and one ActNorm's log-scale (the blocks get parameter subsets)
    model.transform.flows[0].transforms[1].transforms[2].conditioner[0].bias.requires_grad_(False)
    model.transform.flows[1].transforms[0].transforms[0].log_scale.requires_grad_(False)
    taken = _direct_vs_generic(monkeypatch, model, torch.rand(5, 3, 8, 8, dtype=dtype), dtype, tol)
    assert taken == {"conv": 4, "coupling": 4}


@pytest.mark.skipif(not _backend.has_cpp(), reason="C++ extension not built")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_direct_kernel_walk_matches_generic_walk_other_conditioner(monkeypatch, dtype, tol):
    """An MLP-conditioned split coupling: the coupling kernels run directly, autograd runs the conditioner."""
    torch.manual_seed(0)
    flow = _rev_flow(_perturb(RealNVP(5, layers=4, hidden=16, mask="half")).to(dtype))
    taken = _direct_vs_generic(monkeypatch, flow, torch.randn(7, 5, dtype=dtype), dtype, tol)
    assert taken == {"conv": 0, "coupling": 4}


# ------------------------------------------------------------------------------------------ bit-exact rebuilds

def _every_rebuild_exact(model, x):
    """Run the engine's forward with records and check every block's backprop rebuilds its input bit for bit."""
    import flowops.reversible as rev_mod

    blocks = rev_mod.reversible_blocks(model.transform.named_layers())
    for b in blocks:
        b.params()
    ins, outs, fixes = [], [], []
    with torch.no_grad():
        h = x
        for b in blocks:
            ins.append(h)
            y, ex, _, fix = b.forward_exact(h)
            outs.append((y, ex))
            fixes.append(fix)
            h = y
    kinds = set()
    for b, h, (y, ex), fix in zip(blocks, ins, outs, fixes):
        gy = torch.randn_like(y)
        rebuilt = b.backprop(y, ex, gy, [torch.randn_like(e) for e in ex], torch.randn(x.shape[0], dtype=x.dtype),
                             b.params(), True, fix)[0]
        assert rebuilt.dtype == h.dtype and torch.equal(rebuilt, h), b.label()
        kinds.add(type(b).__name__)
    return kinds, sum(f is not None for f in fixes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("path", ["direct", "generic"])
def test_bit_exact_records_rebuild_every_block_exactly(monkeypatch, dtype, coupling, path):
    import flowops.reversible as rev_mod

    if path == "generic":
        monkeypatch.setattr(rev_mod, "_direct", lambda t: False)
    torch.manual_seed(0)
    model = _perturb(Glow((3, 8, 8), levels=2, steps=3, hidden=8, coupling=coupling), 0.1).to(dtype)
    x = torch.rand(5, 3, 8, 8, dtype=dtype)
    model.log_prob(x)  # ActNorm initialization
    kinds, n_fixes = _every_rebuild_exact(model, x)
    assert kinds == {"_Block", "_ActNormInvConvBlock", "_CouplingBlock", "_SplitBlock"}
    assert n_fixes > 0  # the plain rebuilds were not exact: the records did the work


def _grad_diff(a, b):
    num = sum(((p.grad - q.grad) ** 2).sum() for p, q in zip(a.parameters(), b.parameters()) if q.grad is not None)
    den = sum((q.grad ** 2).sum() for q in b.parameters() if q.grad is not None)
    return (num / den).sqrt().item()


@pytest.mark.parametrize("micro_batch,checkpoint_every", [(None, None), (None, 5)])
def test_bit_exact_glow_gradients_equal_ordinary_float32(micro_batch, checkpoint_every):
    """Deep perturbed float32 Glow: the default rebuild drifts (gradients differ), the bit-exact one does not."""
    torch.manual_seed(1)
    ordinary = _perturb(Glow((3, 8, 8), levels=2, steps=6, hidden=16), 0.3)
    x = torch.rand(5, 3, 8, 8)
    ordinary.log_prob(x)
    modes = {}
    for exact in (False, True):
        rev = copy.deepcopy(ordinary)
        rev.transform.reversible, rev.transform.bit_exact = True, exact
        rev.transform.micro_batch, rev.transform.checkpoint_every = micro_batch, checkpoint_every
        rev.transform.checkpoints = None
        modes[exact] = rev
    w = torch.linspace(0.5, 1.5, 5)
    for m in (ordinary, *modes.values()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReversibleDriftWarning)
            (m.log_prob(x) * w).sum().backward()
    assert _grad_diff(modes[True], ordinary) <= 1e-6
    # the default rebuild drifts far (to non-finite gradients at these weights without checkpoints)
    assert not _grad_diff(modes[False], ordinary) <= 10 * max(_grad_diff(modes[True], ordinary), 1e-9)
    for (name, p), q in zip(ordinary.named_parameters(), modes[True].parameters()):
        assert _rel(q.grad, p.grad) <= 1e-5, name
    # retain_graph: a second backward through the same graph rebuilds from the same records
    modes[True].zero_grad()
    lp = modes[True].log_prob(x)
    (lp * w).sum().backward(retain_graph=True)
    first = [p.grad.clone() for p in modes[True].parameters()]
    modes[True].zero_grad()
    (lp * w).sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, modes[True].parameters()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bit_exact_realnvp_maf_mixed(dtype):
    torch.manual_seed(0)
    for flow, x in ((_perturb(RealNVP(5, layers=6, hidden=16, mask="alternating"), 0.3).to(dtype),
                     torch.randn(7, 5, dtype=dtype)),
                    (_perturb(RealNVP(6, layers=6, hidden=16, mask="half"), 0.3).to(dtype),
                     torch.randn(7, 6, dtype=dtype)),
                    (_perturb(MAF(4, transforms=3, hidden=(12, 12)), 0.2).to(dtype), torch.randn(6, 4, dtype=dtype))):
        rev = _rev_flow(flow, bit_exact=True)
        _compare(flow, rev, x, dtype)
        assert rev.transform.bit_exact and "bit_exact=True" in repr(rev.transform)


def test_bit_exact_option_checks():
    with pytest.raises(TypeError, match="bit_exact"):
        ReversibleSequential(AffineCoupling(4), bit_exact=1)
    rs = ReversibleSequential(AffineCoupling(4), bit_exact=True, micro_batch=2)
    with pytest.raises(ValueError, match="micro_batch"):
        rs(torch.randn(3, 4, requires_grad=True))
    g = Glow((3, 4, 4), levels=1, steps=1, hidden=4, reversible=True)
    g.transform.bit_exact = "yes"
    with pytest.raises(TypeError, match="bit_exact"):
        g.log_prob(torch.rand(2, 3, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rebuild_record_codec(dtype):
    """The records restore every bit pattern (signed zeros, infinities, NaN, tiny values rebuilt from large
    ones, values crossing zero); the C++ pass equals the torch-ops reference."""
    import flowops.reversible as rev_mod

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40000, generator=gen).to(dtype)
    x[:, ::9] = 1e-3
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -1e-3]).to(dtype)
    rebuilt = (x.double() * (1 + 1e-3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)) + 1e-6).to(dtype)
    rebuilt.view(-1)[:6] = torch.tensor([-0.0, 0.0, float("inf"), 1.0, 2.0, 1e-3]).to(dtype)
    itype = rev_mod._KEYS[dtype][0]
    ref_d = rev_mod._keys(x) - rev_mod._keys(rebuilt)
    small = ref_d.clamp(-127, 127).to(torch.int8)
    ref = (small, (ref_d != small).flatten().nonzero().squeeze(1))
    assert ref[1].numel() > 0
    fix = rev_mod._encode(x, rebuilt)
    assert torch.equal(fix[0], ref[0]) and torch.equal(fix[1], ref[1])
    assert torch.equal(rev_mod._decode(rebuilt, fix).view(itype), x.view(itype))
    assert rev_mod._encode(x, x.clone()) is None
    if _backend.has_cpp() and hasattr(torch.ops.flowops, "rebuild_record"):
        with pytest.raises(ValueError, match="same shape"):
            torch.ops.flowops.rebuild_record(x, rebuilt[:3])
        with pytest.raises(ValueError, match="small"):
            torch.ops.flowops.rebuild_apply(rebuilt, fix[0][:3], fix[1], fix[2])
        with pytest.raises(ValueError, match="idx"):
            torch.ops.flowops.rebuild_apply(rebuilt, fix[0], fix[1], fix[2][:1])
        bad = fix[1].clone()
        bad[0] = x.numel()
        with pytest.raises(ValueError, match="out of range"):
            torch.ops.flowops.rebuild_apply(rebuilt, fix[0], bad, fix[2])
    with pytest.raises(TypeError, match="bit_exact"):
        rev_mod._encode(x.to(torch.int32), x.to(torch.int32))


def test_grad_slots_write_then_accumulate():
    """The node's gradient buffer: views with the parameters' shapes, a first write copies, later ones add, and
    slots never written come back None."""
    from flowops.reversible import _GradSlots
    params = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(1, dtype=torch.float64), torch.zeros(5)]
    slots = _GradSlots(params, [True, True, True, False])
    a, b = torch.arange(6.0).view(2, 3), torch.ones(4)
    slots.add([(0, a), (1, b), (3, torch.ones(5))])  # slot 3 not needed
    slots.add([(0, a), (1, b), (2, torch.ones(1, dtype=torch.float64))])
    out = slots.result()
    assert torch.equal(out[0], 2 * a) and torch.equal(out[1], 2 * b)
    assert out[2].dtype == torch.float64 and out[2].item() == 1.0 and out[3] is None
    assert [tuple(o.shape) for o in out[:3]] == [(2, 3), (4,), (1,)]


def test_glow_step_parameter_shared_by_actnorm_and_invconv():
    """A parameter used by both halves of a GlowStep's ActNorm + 1x1 conv block is one input of the block (its
    gradient once, the sum of both uses), as in ordinary backprop."""
    from flowops.nn.glow import GlowStep
    torch.manual_seed(0)
    step = GlowStep(4, hidden=8).double()
    with torch.no_grad():
        step.transforms[0].initialized.fill_(True)
    step.transforms[1].log_s = step.transforms[0].log_scale  # tied
    _perturb(step, 0.05)
    rev = ReversibleSequential(copy.deepcopy(step))
    ordinary = Compose(step)
    _compare(ordinary, rev, torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.float64)


def test_drift_error_measure():
    """max|a - b| / max(max|b|, 1): in the inputs' precision (half types in float32), NaN when either holds one."""
    from flowops.reversible import _rel_err
    b = torch.tensor([4.0, -2.0, 1.0])
    assert _rel_err(b + torch.tensor([0.0, 0.5, 0.0]), b) == pytest.approx(0.125)
    assert _rel_err(torch.tensor([0.25]), torch.tensor([0.0])) == pytest.approx(0.25)  # scale at least 1
    h = torch.tensor([60000.0, -60000.0], dtype=torch.float16)
    assert _rel_err(-h, h) == pytest.approx(2.0)  # 120000 overflows float16, not float32
    assert _rel_err(torch.tensor([float("nan"), 1.0]), torch.ones(2)) != _rel_err(torch.ones(2), torch.ones(2))
    assert _rel_err(torch.empty(0), torch.empty(0)) == 0.0


def test_grad_slots_take_in_place():
    """take() hands out the slots of distinct, needed, unwritten parameters (marking them written), else None, so
    a conditioner that writes its gradients in place never overwrites an earlier block's (a shared parameter)."""
    from flowops.reversible import _GradSlots
    params = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(5)]
    slots = _GradSlots(params, [True, True, False])
    assert slots.take([params[2]]) is None  # not needed
    assert slots.take([params[0], params[0]]) is None  # not distinct
    assert slots.take([torch.zeros(2)]) is None  # not an input of the node
    views = slots.take([params[1], params[0]])
    assert [tuple(v.shape) for v in views] == [(4,), (2, 3)]
    views[0].fill_(2.0)
    views[1].fill_(1.0)
    assert slots.take([params[0]]) is None  # written already: the caller adds instead
    slots.add([(0, torch.ones(2, 3))])
    out = slots.result()
    assert torch.equal(out[0], torch.full((2, 3), 2.0)) and torch.equal(out[1], torch.full((4,), 2.0))
    assert out[2] is None


def test_module_params_walk_matches_parameters():
    """The engine's parameter walk lists what Module.parameters() lists, in the same order (shared modules and
    parameters once, None entries skipped)."""
    from flowops.reversible import _module_params
    torch.manual_seed(0)
    glow = Glow((3, 8, 8), levels=2, steps=2, hidden=8)
    shared = nn.Linear(3, 3)
    odd = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, nn.Linear(3, 2, bias=False)))
    odd.register_parameter("extra", None)
    odd.tied = nn.Parameter(torch.zeros(1))
    odd[2][1].weight2 = odd.tied
    for mod in (*glow.modules(), odd):
        assert [id(p) for p in _module_params(mod)] == [id(p) for p in mod.parameters()]


def _kept_log(monkeypatch):
    """Records, for each layer whose activations the reversible forward keeps, the shapes laid out and the kept
    buffers' total bytes against the budget."""
    import flowops.reversible as rev_mod
    log, orig = [], rev_mod._Kept.alloc

    def alloc(self, shapes, dtype):
        views = orig(self, shapes, dtype)
        if views is not None:
            assert [tuple(v.shape) for v in views] == [tuple(sh) for sh in shapes]
            held = sum(c.numel() * c.element_size() for c, _ in self.chunks)
            log.append((shapes, held, self.largest - self.largest // rev_mod.KEEP_FRACTION))
        return views

    monkeypatch.setattr(rev_mod._Kept, "alloc", alloc)
    return log


@pytest.mark.skipif(not _backend.has_cpp(), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_activations_of_small_layers(monkeypatch, dtype):
    """A three-level Glow keeps the top level's conditioner activations from the forward (those layers skip their
    recomputation) within the budget; gradients equal ordinary backprop's, the peak of saved activations is the
    one without keeping, everything kept is released by the backward, and a second backward (retain_graph)
    recomputes what the first consumed, with the same gradients."""
    import flowops.reversible as rev_mod
    log = _kept_log(monkeypatch)
    torch.manual_seed(2)
    ordinary = _perturb(Glow((3, 16, 16), levels=3, steps=3, hidden=8), 0.05).to(dtype)
    x = torch.rand(4, 3, 16, 16, dtype=dtype)
    ordinary.log_prob(x)  # ActNorm initialization, shared by the copies
    rev = copy.deepcopy(ordinary)
    rev.transform.reversible = True
    _compare(ordinary, rev, x, dtype)
    assert log, "no layer kept its activations"
    assert all(held <= budget for _, held, budget in log)
    assert all(shapes[0][2:] == (2, 2) for shapes, _, _ in log)  # the top level's layers (16 / 2**3 pixels)
    # peak saved activations with and without keeping
    peaks = {}
    params = list(rev.parameters())
    for keep in (True, False):
        monkeypatch.setattr(rev_mod, "KEEP_SMALL", keep)
        rev.zero_grad()
        with rev_mod.SavedTensorMeter(exclude=params) as meter:
            rev.log_prob(x).sum().backward()
        peaks[keep] = meter.peak
        assert meter.live == 0
    assert peaks[True] == peaks[False]
    monkeypatch.setattr(rev_mod, "KEEP_SMALL", True)
    # retain_graph: the second backward recomputes the layers whose kept activations the first one used
    rev.zero_grad()
    lp = rev.log_prob(x).sum()
    lp.backward(retain_graph=True)
    first = [p.grad.clone() for p in rev.parameters()]
    rev.zero_grad()
    lp.backward()
    for a, p in zip(first, rev.parameters()):
        assert _rel(p.grad, a) <= TOL[dtype]


def test_coupling_hooks_fire_in_reversible_forward():
    """A forward hook on a Glow coupling still runs in the reversible forward (the direct call of its kernels is
    used only for layers without hooks), and the values are those of the module's own forward."""
    torch.manual_seed(0)
    glow = _perturb(Glow((3, 8, 8), levels=2, steps=2, hidden=8, reversible=True, kink_tol=None), 0.05)
    x = torch.rand(3, 3, 8, 8)
    glow.log_prob(x)
    coupling = glow.transform.flows[0].transforms[1].transforms[2]
    calls = []
    handle = coupling.register_forward_hook(lambda m, inp, out: calls.append(out[0].shape))
    lp_hooked = glow.log_prob(x)
    assert len(calls) == 1
    glow.transform.kink_tol = 1e-3  # the recording forward too
    torch.testing.assert_close(glow.log_prob(x), lp_hooked, rtol=0, atol=0)
    assert len(calls) == 2
    glow.transform.kink_tol = None
    handle.remove()
    lp_direct = glow.log_prob(x)
    assert torch.equal(lp_hooked, lp_direct)
    glow.transform.reversible = False  # the log-dets are summed in another order there
    torch.testing.assert_close(glow.log_prob(x), lp_direct, rtol=1e-6, atol=1e-5)


def test_glow_conditioner_shared_between_steps_float64():
    """Two Glow steps sharing one conditioner: the second block's gradients go through the accumulating path
    (the first one's were written in place), summed as in ordinary backprop."""
    torch.manual_seed(1)
    ordinary = Glow((3, 8, 8), levels=2, steps=3, hidden=8).double()
    steps = ordinary.transform.flows[0].transforms
    steps[2].transforms[2].conditioner = steps[0].transforms[2].conditioner
    _perturb(ordinary, 0.05)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    ordinary.log_prob(x)
    rev = copy.deepcopy(ordinary)
    rev.transform.reversible = True
    steps = rev.transform.flows[0].transforms
    assert steps[2].transforms[2].conditioner is steps[0].transforms[2].conditioner
    _compare(ordinary, rev, x, torch.float64)


def test_global_module_hook_fires_in_reversible_forward():
    """A global forward hook (torch.nn.modules.module.register_module_forward_hook) sees every coupling of a
    reversible Glow's forward, as in ordinary use: the direct kernel calls step aside for it."""
    from torch.nn.modules.module import register_module_forward_hook
    torch.manual_seed(0)
    glow = _perturb(Glow((3, 8, 8), levels=2, steps=2, hidden=8, reversible=True), 0.05)
    x = torch.rand(3, 3, 8, 8)
    glow.log_prob(x)
    seen = []
    handle = register_module_forward_hook(lambda m, inp, out: seen.append(type(m).__name__))
    try:
        glow.log_prob(x).sum().backward()
    finally:
        handle.remove()
    assert seen.count("GlowAffineCoupling") == 4


@pytest.mark.skipif(not _backend.has_cpp(), reason="C++ extension not built")
def test_glow_coupling_step_is_one_call_and_the_meter_sees_the_separate_calls(monkeypatch):
    """Each Glow coupling's backward step is one glow_coupling_reverse call; with a SavedTensorMeter active the
    walk makes the separate calls instead (so the meter counts the recomputed activations). Same gradients, bit
    for bit, and both ordinary backprop's (float64)."""
    torch.manual_seed(0)
    glow = _perturb(Glow((3, 8, 8), levels=2, steps=3, hidden=8, reversible=True), 0.05).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    glow.log_prob(x)
    ordinary = copy.deepcopy(glow)
    ordinary.transform.reversible = False
    (-ordinary.log_prob(x).mean()).backward()
    f = torch.ops.flowops
    calls = {"glow_coupling_reverse": 0, "conv_net_bwd_into": 0}
    for name in calls:
        real = getattr(f, name)

        def spy(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(f, name, spy)
    results = []
    for metered in (False, True):
        glow.zero_grad()
        for k in calls:
            calls[k] = 0
        if metered:
            with SavedTensorMeter(exclude=list(glow.parameters())) as meter:
                (-glow.log_prob(x).mean()).backward()
            assert meter.peak > 0 and calls == {"glow_coupling_reverse": 0, "conv_net_bwd_into": 6}
        else:
            (-glow.log_prob(x).mean()).backward()
            assert calls == {"glow_coupling_reverse": 6, "conv_net_bwd_into": 0}
        results.append([p.grad.clone() for p in glow.parameters()])
    for a, b, p in zip(*results, ordinary.parameters()):
        assert torch.equal(a, b)
        assert _rel(a, p.grad) <= 1e-9
