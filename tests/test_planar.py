"""Planar and radial flows: constraints, inverses, log-dets, and the fused planar-stack op.

The fused op is checked against the loop of eager planar steps (flowops.reference.planar_stack)
for outputs and every gradient on every backend that runs here (C++ when built, the Triton
kernels under TRITON_INTERPRET=1 on tiny shapes, the reference), with float64 gradcheck,
torch.library.opcheck and brute-force Jacobian log-dets.
"""
import os

import pytest
import torch
from torch.autograd.functional import jacobian

import flowops
from flowops import _backend, reference
from flowops.nn import Planar, PlanarStack, Radial
from flowops.ops import planar as planar_op

F64 = torch.float64
HAS_CPP = _backend.has_cpp() and planar_op.HAS_CPP_OPS
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

BACKENDS = (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON and INTERPRET else []) + ["reference"]
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def make_params(K, d, dtype=torch.float32, scale=1.0, gen=None):
    w = torch.randn(K, d, generator=gen, dtype=F64) / d ** 0.5
    u = reference.planar_u_hat(w, torch.randn(K, d, generator=gen, dtype=F64) * scale / d ** 0.5)
    b = 0.3 * torch.randn(K, generator=gen, dtype=F64)
    return w.to(dtype), u.to(dtype), b.to(dtype)


def brute_logdet(fn, x):
    """log|det J| per sample from the full Jacobian of a [1, d] -> [1, d] map."""
    out = []
    for xi in x:
        J = jacobian(lambda v: fn(v[None])[0][0], xi)
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------
# constraints


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 1e3])
def test_planar_u_hat_constraint_for_any_raw_parameters(scale):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 5, generator=g, dtype=F64) * scale
    u = torch.randn(200, 5, generator=g, dtype=F64) * scale
    u = torch.cat([u, -w * 50.0, w * 50.0])  # w.u far below -1 and far above
    w = torch.cat([w, w, w])
    uh = reference.planar_u_hat(w, u)
    wu = (w * uh).sum(1)
    assert torch.isfinite(uh).all()
    # rounding: u_hat = u + (...) w cancels terms of size |u|, and w . u_hat sums terms of size |w| |u_hat|
    tol = 1e-12 * (1 + w.norm(dim=1) * (u.norm(dim=1) + uh.norm(dim=1)))
    assert (wu >= -1.0 - tol).all()
    assert ((wu - (torch.nn.functional.softplus((w * u).sum(1)) - 1.0)).abs() <= tol + 1e-12 * wu.abs()).all()


def test_planar_u_hat_zero_w_is_finite():
    w = torch.zeros(3, 4)
    u = torch.randn(3, 4)
    assert torch.equal(reference.planar_u_hat(w, u), u)


def test_radial_constraint_for_any_raw_parameters():
    a_raw = torch.linspace(-60, 60, 41, dtype=F64)[:, None].expand(41, 41)
    b_raw = torch.linspace(-60, 60, 41, dtype=F64)[None, :].expand(41, 41)
    alpha, beta = reference.radial_params(a_raw, b_raw)
    assert (alpha > 0).all()
    assert (beta >= -alpha).all()


# ------------------------------------------------------------------------------------------
# reference maps: log-dets against brute force, inverses


@pytest.mark.parametrize("d", [1, 2, 5])
def test_planar_stack_reference_logdet_matches_jacobian(d):
    w, u, b = make_params(4, d, F64, scale=2.0)
    x = torch.randn(6, d, dtype=F64)
    _, ld = reference.planar_stack(x, w, u, b)
    torch.testing.assert_close(ld, brute_logdet(lambda v: reference.planar_stack(v, w, u, b), x), rtol=1e-10,
                               atol=1e-10)
    y, _ = reference.planar_stack(x, w, u, b)
    _, ldi = reference.planar_stack_inverse(y, w, u, b)
    torch.testing.assert_close(ldi, brute_logdet(lambda v: reference.planar_stack_inverse(v, w, u, b), y),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_radial_reference_logdet_matches_jacobian(d):
    z0 = torch.randn(d, dtype=F64)
    for a_raw, b_raw in ((0.3, -1.0), (-2.0, 4.0), (1.0, -30.0)):
        alpha, beta = reference.radial_params(torch.tensor(a_raw, dtype=F64), torch.tensor(b_raw, dtype=F64))
        x = z0 + torch.randn(5, d, dtype=F64) * torch.tensor([0.01, 0.5, 1, 3, 10], dtype=F64)[:, None]
        y, ld = reference.radial(x, z0, alpha, beta)
        torch.testing.assert_close(ld, brute_logdet(lambda v: reference.radial(v, z0, alpha, beta), x), rtol=1e-10,
                                   atol=1e-10)
        _, ldi = reference.radial_inverse(y, z0, alpha, beta)
        torch.testing.assert_close(ldi, brute_logdet(lambda v: reference.radial_inverse(v, z0, alpha, beta), y),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("c", [-1.0, -1.0 + 1e-12, -0.999, -0.5, 0.0, 0.7, 5.0, 1e3])
def test_planar_scalar_solver_converges(c):
    g = torch.Generator().manual_seed(2)
    y = torch.cat([torch.randn(500, generator=g, dtype=F64) * 4, torch.tensor([0.0, 1e-8, -1e-8, 50.0],
                                                                              dtype=F64)])
    b = torch.randn(y.shape, generator=g, dtype=F64)
    b[-4:] = torch.tensor([0.0, 0.0, 0.0, -50.0], dtype=F64)  # roots at the flat point when c = -1
    cc = torch.full_like(y, c)
    alpha = reference.planar_solve_alpha(y, cc, b)
    # the map alpha -> alpha + c tanh(alpha + b) has slope >= 0; check the root by bracketing it
    f = lambda a: a + cc * torch.tanh(a + b) - y  # noqa: E731
    step = 1e-9 * (1 + alpha.abs())
    assert (f(alpha - step) <= 1e-13).all() and (f(alpha + step) >= -1e-13).all()


def test_planar_scalar_solver_nan_propagates():
    y = torch.tensor([1.0, float("nan"), 2.0], dtype=F64)
    alpha = reference.planar_solve_alpha(y, torch.tensor(0.5, dtype=F64), torch.tensor(0.1, dtype=F64))
    assert torch.isnan(alpha[1]) and torch.isfinite(alpha[[0, 2]]).all()


def _boundary_stack(d, K, gap=1e-4):
    """Planar layers with w . u_hat = -1 + gap (the invertibility boundary is gap = 0), b = 0."""
    layer = PlanarStack(d, K).double()
    with torch.no_grad():
        wu = torch.log(torch.expm1(torch.tensor(gap, dtype=F64)))  # softplus(wu) = gap
        w = layer.w
        layer.u.copy_(wu * w / (w * w).sum(1, keepdim=True))
        layer.b.zero_()
    assert torch.allclose((layer.w * layer.u_hat()).sum(1), torch.tensor(-1.0 + gap, dtype=F64), atol=1e-12)
    return layer


@pytest.mark.parametrize("make", [lambda: Planar(3), lambda: PlanarStack(2, 7), lambda: PlanarStack(64, 3),
                                  lambda: Radial(3), lambda: _boundary_stack(2, 1), lambda: _boundary_stack(5, 1),
                                  lambda: _boundary_stack(2, 1, 1e-8)],
                         ids=["planar", "stack2", "stack64", "radial", "near-boundary2", "near-boundary5",
                              "1e-8-from-boundary"])
def test_layers_round_trip_to_1e6(make):
    torch.manual_seed(3)
    layer = make().double()
    d = layer.features
    z = torch.randn(257, d, dtype=F64) * 2
    z[:8] = 0.0  # through the flat point of a boundary planar map (w.z + b = 0)
    x, ld = layer.inverse(z)
    zb, ldb = layer(x)
    assert (zb - z).abs().max() < 1e-6
    assert (ld + ldb).abs().max() < 1e-6
    xb, _ = layer.inverse(zb)
    assert (xb - x).abs().max() < 1e-6


@pytest.mark.parametrize("gap", [1e-4, 1e-8, 0.0])
def test_planar_stack_near_boundary_round_trip_in_data_space(gap):
    """Near w . u_hat = -1 a layer is nearly flat at one point (slope gap) and its inverse steep there
    (slope 1/gap); through a stack those slopes multiply, so recovering z is ill-conditioned (no solver
    can beat condition number x rounding), but the solved z maps back onto x to 1e-6 and stays finite."""
    torch.manual_seed(6)
    if gap:
        layer = _boundary_stack(3, 5, gap)
    else:
        layer = PlanarStack(3, 5).double()
        with torch.no_grad():
            layer.u.copy_(-40.0 * layer.w)  # w.u_hat = -1 + softplus(-40 |w|^2): -1 up to rounding
    x = torch.randn(300, 3, dtype=F64) * 2
    x[:5] = 0.0
    z, ld = layer(x)
    xb, ldb = layer.inverse(z)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    assert (xb - x).abs().max() < 1e-6


def test_radial_round_trip_near_boundary():
    layer = Radial(2).double()
    with torch.no_grad():
        layer.beta_raw.fill_(-35.0)  # beta = -alpha (1 - 6e-16): contracts nearly onto z0
    z = layer.z0.detach() + torch.randn(100, 2, dtype=F64) * torch.logspace(-3, 1, 100, dtype=F64)[:, None]
    x, ld = layer.inverse(z)
    zb, ldb = layer(x)
    assert (zb - z).abs().max() < 1e-6
    assert torch.isfinite(ld).all() and (ld + ldb).abs().max() < 1e-6


@pytest.mark.parametrize("make", [lambda: Planar(2), lambda: PlanarStack(3, 4), lambda: Radial(3)],
                         ids=["planar", "stack", "radial"])
def test_layer_logdets_match_jacobian(make):
    torch.manual_seed(4)
    layer = make().double()
    z = torch.randn(5, layer.features, dtype=F64)
    x, ld = layer.inverse(z)
    torch.testing.assert_close(ld, brute_logdet(lambda v: layer.inverse(v), z), rtol=1e-9, atol=1e-9)
    _, ldf = layer(x)
    torch.testing.assert_close(ldf, brute_logdet(lambda v: layer(v), x), rtol=1e-8, atol=1e-8)


def test_newton_inverse_gradients_gradcheck():
    """The normalizing direction (Newton solve + one differentiable Newton step) has exact gradients."""
    w, u, b = make_params(3, 2, F64, scale=2.0)
    x = torch.randn(4, 2, dtype=F64)
    args = [t.clone().requires_grad_() for t in (x, w, u, b)]
    assert torch.autograd.gradcheck(reference.planar_stack_inverse, args, eps=1e-6, atol=1e-7)


def test_radial_inverse_gradcheck():
    z0 = torch.randn(3, dtype=F64)
    a, bb = reference.radial_params(torch.tensor(0.2, dtype=F64), torch.tensor(-0.5, dtype=F64))
    x = torch.randn(4, 3, dtype=F64)
    args = [t.clone().requires_grad_() for t in (x, z0, a, bb)]
    assert torch.autograd.gradcheck(reference.radial_inverse, args)


# ------------------------------------------------------------------------------------------
# the fused op


SHAPES = [(1, 1, 1), (1, 2, 3), (7, 3, 5), (13, 5, 2), (37, 64, 3), (300, 2, 4), (129, 4, 32), (0, 2, 3),
          (5, 2, 0)]
TRITON_SHAPES = [(1, 1, 1), (7, 3, 5), (13, 2, 3), (5, 64, 2), (0, 2, 3)]


def _compare(backend, B, d, K, dtype):
    g = torch.Generator().manual_seed(B * 1000 + d * 10 + K)
    w, u, b = make_params(K, d, dtype, gen=g)
    z = torch.randn(B, d, generator=g, dtype=F64).to(dtype)
    gz = torch.randn(B, d, generator=g, dtype=F64).to(dtype)
    gl = torch.randn(B, generator=g, dtype=F64).to(dtype)
    ins = [t.clone().requires_grad_() for t in (z, w, u, b)]
    with flowops.use_backend(backend):
        y, ld = flowops.ops.planar_stack(*ins)
    def grad(outs, inputs, gouts):
        pairs = [(o, g) for o, g in zip(outs, gouts) if o.requires_grad]  # K = 0: a constant log-det
        return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)

    grads = grad((y, ld), ins, (gz, gl))
    ref_ins = [t.double().requires_grad_() for t in (z, w, u, b)]
    ry, rld = reference.planar_stack(*ref_ins)
    rgrads = grad((ry, rld), ref_ins, (gz.double(), gl.double()))
    assert y.shape == (B, d) and ld.shape == (B,) and y.dtype == dtype and ld.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), ry.detach(), **tol)
    torch.testing.assert_close(ld.double(), rld.detach(), **tol)
    for name, gr, rg in zip(("z", "w", "u_hat", "b"), grads, rgrads):
        rg = torch.zeros_like(ref_ins[0 if name == "z" else ["z", "w", "u_hat", "b"].index(name)]) if rg is None else rg
        gr = torch.zeros_like(rg) if gr is None else gr
        scale = max(1.0, rg.abs().max().item()) if rg.numel() else 1.0
        torch.testing.assert_close(gr.double() / scale, rg / scale, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B,d,K", SHAPES, ids=[f"{b}x{d}xK{k}" for b, d, k in SHAPES])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_planar_stack_matches_reference(backend, B, d, K, dtype):
    _compare(backend, B, d, K, dtype)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B,d,K", TRITON_SHAPES, ids=[f"{b}x{d}xK{k}" for b, d, k in TRITON_SHAPES])
def test_planar_stack_triton_kernels_match_reference(B, d, K, dtype):
    _compare("triton", B, d, K, dtype)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("B,d,K", [(5, 3, 4), (19, 2, 3), (3, 9, 2), (9, 1, 2)])
def test_planar_stack_cpp_gradcheck(B, d, K):
    w, u, b = make_params(K, d, F64, scale=2.0)
    z = torch.randn(B, d, dtype=F64)
    args = [t.clone().requires_grad_() for t in (z, w, u, b)]
    with flowops.use_backend("cpp"):
        assert torch.autograd.gradcheck(flowops.ops.planar_stack, args)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1")
def test_planar_stack_triton_gradcheck():
    w, u, b = make_params(2, 3, F64, scale=2.0)
    args = [t.clone().requires_grad_() for t in (torch.randn(3, 3, dtype=F64), w, u, b)]
    with flowops.use_backend("triton"):
        assert torch.autograd.gradcheck(flowops.ops.planar_stack, args)


def test_planar_stack_opcheck():
    w, u, b = make_params(3, 5, torch.float32)
    z = torch.randn(6, 5)
    args = [t.clone().requires_grad_() for t in (z, w, u, b)]
    torch.library.opcheck(torch.ops.flowops.planar_stack_fwd.default, args)
    gz, gl = torch.randn(6, 5), torch.randn(6)
    torch.library.opcheck(torch.ops.flowops.planar_stack_bwd.default, (gz, gl, z, w, u, b))
    if HAS_CPP:
        torch.library.opcheck(torch.ops.flowops.planar_stack.default, args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_planar_stack_higher_order_raises(backend):
    w, u, b = make_params(2, 3, F64)
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    with flowops.use_backend(backend):
        y, ld = flowops.ops.planar_stack(z, w, u, b)
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(ld.sum(), z, create_graph=True)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_planar_stack_cpp_deterministic_across_threads():
    w, u, b = make_params(8, 3, torch.float32)
    z = torch.randn(1000, 3)
    gz, gl = torch.randn(1000, 3), torch.randn(1000)
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ins = [t.clone().requires_grad_() for t in (z, w, u, b)]
            with flowops.use_backend("cpp"):
                y, ld = flowops.ops.planar_stack(*ins)
            outs.append((y, ld) + torch.autograd.grad((y, ld), ins, (gz, gl)))
    finally:
        torch.set_num_threads(old)
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] +
                         (["triton"] if "triton" in BACKENDS else []))
def test_planar_stack_nan_stays_in_its_sample(backend):
    w, u, b = make_params(3, 2, torch.float32)
    z = torch.randn(20, 2)
    z[4, 1] = float("nan")
    z[7, 0] = float("inf")
    with flowops.use_backend(backend):
        y, ld = flowops.ops.planar_stack(z, w, u, b)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[4, 7]] = True
    assert torch.isnan(y[4]).all() and torch.isnan(ld[4])
    assert torch.isfinite(y[~bad]).all() and torch.isfinite(ld[~bad]).all()


def test_planar_stack_saturated_inputs_are_finite():
    w, u, b = make_params(4, 3, torch.float32)
    z = torch.randn(50, 3) * 1e4
    y, ld = flowops.ops.planar_stack(z, w, u, b)
    ry, rld = reference.planar_stack(z.double(), w.double(), u.double(), b.double())
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(ld.double(), rld, rtol=1e-4, atol=1e-4)


def test_planar_stack_empty_batch_backpropagates():
    w, u, b = [t.requires_grad_() for t in make_params(3, 2, torch.float32)]
    z = torch.zeros(0, 2, requires_grad=True)
    y, ld = flowops.ops.planar_stack(z, w, u, b)
    assert y.shape == (0, 2) and ld.shape == (0,)
    (y.sum() + ld.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and z.grad.shape == (0, 2)


@pytest.mark.parametrize("args,exc,match", [
    (lambda z, w, u, b: (z[0], w, u, b), ValueError, "z must be"),
    (lambda z, w, u, b: (z, w[:, :1], u, b), ValueError, "w must be"),
    (lambda z, w, u, b: (z, w, u[:1], b), ValueError, "u_hat must have"),
    (lambda z, w, u, b: (z, w, u, b[:1]), ValueError, "b must have"),
    (lambda z, w, u, b: (z, w.double(), u, b), TypeError, "w dtype"),
    (lambda z, w, u, b: (z.long(), w, u, b), TypeError, "z must be a floating"),
    (lambda z, w, u, b: (z.tolist(), w, u, b), TypeError, "z must be a torch.Tensor"),
    (lambda z, w, u, b: (z, w, u, b.to("meta")), ValueError, "device"),
])
def test_planar_stack_bad_input(args, exc, match):
    w, u, b = make_params(3, 2, torch.float32)
    with pytest.raises(exc, match=match):
        flowops.ops.planar_stack(*args(torch.randn(4, 2), w, u, b))


def test_layers_bad_input():
    with pytest.raises(ValueError, match="features"):
        Planar(0)
    with pytest.raises(ValueError, match="layers"):
        PlanarStack(2, -1)
    with pytest.raises(ValueError, match="features"):
        Radial(2.5)
    for layer in (Planar(3), PlanarStack(3, 2), Radial(3)):
        with pytest.raises(ValueError, match=r"\[batch, 3\]"):
            layer(torch.randn(4, 2))
        with pytest.raises(ValueError, match=r"\[batch, 3\]"):
            layer.inverse(torch.randn(4, 3, 1))
        with pytest.raises(TypeError, match="floating"):
            layer.inverse(torch.ones(4, 3, dtype=torch.long))


def test_stack_equals_composed_planar_layers():
    torch.manual_seed(5)
    stack = PlanarStack(3, 4)
    layers = [Planar(3) for _ in range(4)]
    with torch.no_grad():
        for k, p in enumerate(layers):
            p.w.copy_(stack.w[k:k + 1])
            p.u.copy_(stack.u[k:k + 1])
            p.b.copy_(stack.b[k:k + 1])
    flow_stack = flowops.Flow(flowops.StandardNormal(3), [stack])
    flow_list = flowops.Flow(flowops.StandardNormal(3), layers[::-1])  # Compose.inverse runs the list backwards
    z = torch.randn(9, 3)
    xs, lds = flow_stack.inverse(z)
    xl, ldl = flow_list.inverse(z)
    torch.testing.assert_close(xs, xl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lds, ldl, rtol=1e-5, atol=1e-5)
    x = torch.randn(9, 3)
    torch.testing.assert_close(flow_stack.log_prob(x), flow_list.log_prob(x), rtol=1e-5, atol=1e-5)


def test_planar_stack_layer_compiles_without_graph_breaks():
    torch._dynamo.reset()
    layer = PlanarStack(2, 6)
    z = torch.randn(33, 2)
    fn = torch.compile(lambda v: layer.inverse(v), fullgraph=True)
    y, ld = fn(z)
    ry, rld = layer.inverse(z)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(ld, rld)
    ld.sum().backward()
    assert layer.w.grad is not None and torch.isfinite(layer.w.grad).all()


def test_bench_block_runs_and_checks(tmp_path):
    from flowops import benchmark

    path = tmp_path / "planar.json"
    assert benchmark.main(["--op", "planar_stack", "--quick", "--no-compile", "--no-memory", "--repeats", "2",
                           "--json", str(path)]) == 0
    import json

    data = json.loads(path.read_text())
    spec = benchmark.OPS["planar_stack"]
    assert len(data["results"]) == len(spec.quick_shapes) * len(spec.directions)
    for rec in data["results"]:
        assert rec["op"] == "planar_stack" and rec["check"]["ok"], rec["check"]


def test_registered_op_autograd_and_reference_backward_match_reference():
    """The path torch.compile traces (flowops::planar_stack_fwd with its Python autograd formula) and the
    closed-form reference backward kernel (the CPU kernel when the extension is absent)."""
    w, u, b = make_params(5, 3, F64, scale=2.0)
    z = torch.randn(11, 3, dtype=F64)
    gz, gl = torch.randn(11, 3, dtype=F64), torch.randn(11, dtype=F64)
    ins = [t.clone().requires_grad_() for t in (z, w, u, b)]
    y, ld = torch.ops.flowops.planar_stack_fwd(*ins)
    got = torch.autograd.grad((y, ld), ins, (gz, gl))
    ref_ins = [t.clone().requires_grad_() for t in (z, w, u, b)]
    ry, rld = reference.planar_stack(*ref_ins)
    want = torch.autograd.grad((ry, rld), ref_ins, (gz, gl))
    torch.testing.assert_close(y, ry.detach())
    torch.testing.assert_close(ld, rld.detach())
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)
    for a, c in zip(planar_op._ref_bwd(gz, gl, z, w, u, b), want):
        torch.testing.assert_close(a, c)
