"""The fused CNF trace op (flowops.ops.mlp_trace) against autograd: outputs, traces, every gradient.

Backends: the C++ op (when built), the plain-torch fused algorithm (the CPU kernel without the extension),
and the Triton elementwise kernels under TRITON_INTERPRET=1; all against the FFJORD reference
(torch.autograd.grad with create_graph=True) and brute-force Jacobians.
"""
import math
import sys

import pytest
import torch

import flowops
from flowops import ops
from flowops.reference import cnf as ref

M = sys.modules["flowops.ops.mlp_trace"]
ACTS = ("tanh", "softplus", "silu")
BACKENDS = ["auto", "triton", "python"]


def make(B, d, hidden, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    widths = (d + 1,) + tuple(hidden) + (d,)
    ws = [(torch.randn(o, i, generator=g, dtype=torch.float64) * scale / math.sqrt(i)).to(dtype).requires_grad_()
          for i, o in zip(widths[:-1], widths[1:])]
    bs = [(torch.randn(o, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_() for o in widths[1:]]
    z = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.rand(B, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return z, t, ws, bs


def rademacher(m, B, d, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (m, B, d), generator=g) * 2 - 1).to(dtype)


class _Python(torch.autograd.Function):
    """The plain-torch fused algorithm (what the CPU kernel is without the C++ extension)."""

    @staticmethod
    def forward(ctx, z, t, activation, eps, n, *params):
        f, tr, acts = M.fused_fwd(z, t, list(params[:n]), list(params[n:]), eps, activation)
        ctx.save_for_backward(z, t, eps, acts, *params)
        ctx.n, ctx.activation = n, activation
        return f.clone(), tr

    @staticmethod
    def backward(ctx, gf, gtr):
        z, t, eps, acts, *params = ctx.saved_tensors
        n = ctx.n
        gz, gt, gws, gbs = M.fused_bwd(gf, gtr, z, t, params[:n], params[n:], eps, acts, ctx.activation)
        return (gz, gt, None, None, None, *gws, *gbs)


def run(backend, z, t, ws, bs, act, eps):
    if backend == "python":
        return _Python.apply(z, t.reshape(-1).expand(z.shape[0]).contiguous(), act, eps, len(ws), *ws, *bs)
    with flowops.use_backend(backend):
        return ops.mlp_trace(z, t, ws, bs, act, eps)


def jac_trace(z, t, ws, bs, act):
    """The brute-force trace: the full autograd Jacobian of each sample, summed on the diagonal."""
    out = []
    for i in range(z.shape[0]):
        fn = lambda zi: ref.mlp_vector_field(zi[None], t[i:i + 1], ws, bs, act)[0]  # noqa: E731
        J = torch.autograd.functional.jacobian(fn, z[i].detach())
        out.append(torch.diagonal(J).sum())
    return torch.stack(out), J


SHAPES = [(1, 1, (3,)), (5, 3, (7, 5)), (13, 2, (16, 16, 16))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}d{s[1]}h{len(s[2])}")
def test_exact_trace_equals_jacobian_trace(backend, act, shape):
    B, d, hidden = shape
    z, t, ws, bs = make(B, d, hidden)
    f, tr = run(backend, z, t, ws, bs, act, None)
    want, _ = jac_trace(z, t, ws, bs, act)
    f_ref = ref.mlp_vector_field(z, t, ws, bs, act)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tr, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("probes", [None, 1, 3])
@pytest.mark.parametrize("shape", [(1, 2, (5,)), (7, 3, (11, 6)), (17, 5, (8, 8, 8)), (9, 10, (12, 7)),
                                   (33, 3, (300, 16))],
                         ids=lambda s: f"B{s[0]}d{s[1]}h{'x'.join(map(str, s[2]))}")
def test_outputs_and_gradients_match_reference(backend, act, probes, shape):
    """Shapes cover the C++ kernel's paths: small d (first and last layer inside the elementwise passes,
    one hidden layer included), d > 8 (skinny GEMMs) and a hidden layer wider than 256 (sequential chunks)."""
    B, d, hidden = shape
    z, t, ws, bs = make(B, d, hidden, seed=B + d)
    eps = None if probes is None else rademacher(probes, B, d)
    f_r, tr_r = ref.mlp_trace(z, t, ws, bs, act, eps)
    f, tr = run(backend, z, t, ws, bs, act, eps)
    torch.testing.assert_close(f, f_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tr, tr_r, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(7)
    gf, gtr = torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    inputs = [z, t, *ws, *bs]
    want = torch.autograd.grad([f_r, tr_r], inputs, [gf, gtr])
    got = torch.autograd.grad([f, tr], inputs, [gf, gtr])
    for name, a, b in zip(["z", "t"] + [f"w{i}" for i in range(len(ws))] + [f"b{i}" for i in range(len(bs))],
                          got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("probes", [None, 2])
def test_gradcheck_float64(backend, act, probes):
    z, t, ws, bs = make(3, 2, (4, 5), seed=3)
    eps = None if probes is None else torch.randn(probes, 3, 2, dtype=torch.float64)

    def fn(z, t, *params):
        with flowops.use_backend(backend):
            return ops.mlp_trace(z, t, list(params[:3]), list(params[3:]), act, eps)

    assert torch.autograd.gradcheck(fn, (z, t, *ws, *bs), eps=1e-6, atol=1e-7)


def test_float32_against_float64_reference():
    z, t, ws, bs = make(64, 4, (32, 32), dtype=torch.float32, seed=5)
    eps = rademacher(2, 64, 4, dtype=torch.float32)
    f, tr = ops.mlp_trace(z, t, ws, bs, "silu", eps)
    d = lambda x: x.detach().double()  # noqa: E731
    f_r, tr_r = ref.mlp_trace(d(z), d(t), [d(w) for w in ws], [d(b) for b in bs], "silu", d(eps))
    torch.testing.assert_close(f.double(), f_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.double(), tr_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_scalar_time_and_python_float(backend):
    z, t, ws, bs = make(6, 2, (8,), seed=2)
    with flowops.use_backend(backend):
        f1, tr1 = ops.mlp_trace(z, 0.25, ws, bs)
        f2, tr2 = ops.mlp_trace(z, torch.tensor(0.25, dtype=torch.float64), ws, bs)
        f3, tr3 = ops.mlp_trace(z, torch.full((6, 1), 0.25, dtype=torch.float64), ws, bs)
    f_r, tr_r = ref.mlp_trace(z, torch.tensor(0.25, dtype=torch.float64), ws, bs)
    for f, tr in ((f1, tr1), (f2, tr2), (f3, tr3)):
        torch.testing.assert_close(f, f_r)
        torch.testing.assert_close(tr, tr_r)
    # the gradient of a scalar time is the sum over the batch
    tt = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    with flowops.use_backend(backend):
        f, tr = ops.mlp_trace(z, tt, ws, bs)
    (g,) = torch.autograd.grad(f.sum() + tr.sum(), tt)
    tt2 = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    f, tr = ref.mlp_trace(z, tt2, ws, bs)
    (g2,) = torch.autograd.grad(f.sum() + tr.sum(), tt2)
    torch.testing.assert_close(g, g2)


# ------------------------------------------------------------------------------------------
# Hutchinson: unbiased, with the variance the theory gives


def _single_probe_estimates(noise, n, seed=0):
    """n independent one-probe estimates for each of 3 samples, and the exact traces and Jacobians."""
    z, t, ws, bs = make(3, 3, (16, 16), seed=11, scale=1.5)
    z, t = z.detach(), t.detach()
    g = torch.Generator().manual_seed(seed)
    zr = z.repeat(n, 1)
    tr_ = t.repeat(n)
    if noise == "gaussian":
        eps = torch.randn(1, n * 3, 3, generator=g, dtype=torch.float64)
    else:
        eps = (torch.randint(0, 2, (1, n * 3, 3), generator=g) * 2 - 1).double()
    with torch.no_grad():
        _, est = ops.mlp_trace(zr, tr_, ws, bs, "tanh", eps)
    est = est.view(n, 3)
    jacs = []
    for i in range(3):
        fn = lambda zi: ref.mlp_vector_field(zi[None], t[i:i + 1], ws, bs, "tanh")[0]  # noqa: E731
        jacs.append(torch.autograd.functional.jacobian(fn, z[i]))
    return est, torch.stack(jacs)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_with_theoretical_variance(noise):
    n = 20000
    est, J = _single_probe_estimates(noise, n)
    exact = torch.diagonal(J, dim1=1, dim2=2).sum(1)
    A = 0.5 * (J + J.transpose(1, 2))  # eps^T J eps only sees the symmetric part
    fro2 = (A * A).sum((1, 2))
    diag2 = (torch.diagonal(A, dim1=1, dim2=2) ** 2).sum(1)
    var_theory = 2 * (fro2 - diag2) if noise == "rademacher" else 2 * fro2
    assert (var_theory > 1e-3).all()
    mean = est.mean(0)
    se = (var_theory / n).sqrt()
    assert ((mean - exact).abs() < 5 * se).all(), (mean, exact, se)
    var = est.var(0)
    # the sample variance of n draws is within a few percent of the true one (4th moments bounded here)
    torch.testing.assert_close(var, var_theory, rtol=0.1, atol=0.0)


def test_hutchinson_mean_of_probes_matches_mean_of_single_probe_runs():
    z, t, ws, bs = make(4, 3, (8, 8), seed=4)
    eps = rademacher(5, 4, 3)
    _, tr = ops.mlp_trace(z, t, ws, bs, "softplus", eps)
    singles = torch.stack([ops.mlp_trace(z, t, ws, bs, "softplus", eps[k:k + 1])[1] for k in range(5)])
    torch.testing.assert_close(tr, singles.mean(0))


def test_basis_probes_give_the_exact_trace():
    z, t, ws, bs = make(5, 3, (8, 8), seed=6)
    basis = torch.eye(3, dtype=torch.float64)[:, None, :].expand(3, 5, 3).contiguous()
    _, tr_h = ops.mlp_trace(z, t, ws, bs, "tanh", basis)
    _, tr_e = ops.mlp_trace(z, t, ws, bs, "tanh", None)
    torch.testing.assert_close(tr_h * 3, tr_e)  # Hutchinson averages: 3 basis probes sum to the trace


# ------------------------------------------------------------------------------------------
# registration, compile, first order only


def _op_args(probes):
    z, t, ws, bs = make(4, 3, (6, 5), seed=9)
    eps = None if probes is None else rademacher(probes, 4, 3)
    return z, t, ws, bs, eps


@pytest.mark.parametrize("probes", [None, 2])
def test_opcheck_fwd(probes):
    z, t, ws, bs, eps = _op_args(probes)
    torch.library.opcheck(torch.ops.flowops.mlp_trace_fwd, (z, t, ws, bs, eps, "tanh"))


@pytest.mark.parametrize("probes", [None, 2])
def test_opcheck_bwd(probes):
    z, t, ws, bs, eps = _op_args(probes)
    with torch.no_grad():
        _, _, acts = torch.ops.flowops.mlp_trace_fwd(z, t, ws, bs, eps, "silu")
    gf, gt = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.flowops.mlp_trace_bwd,
                          (gf, gt, z.detach(), t.detach(), [w.detach() for w in ws], [b.detach() for b in bs], eps,
                           acts, "silu"), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not M.HAS_CPP_OPS, reason="C++ extension not built")
def test_cpp_python_and_registered_kernels_agree():
    # the saved-activation buffer is backend-specific (the C++ kernel stores it chunk-major); with a batch
    # inside one chunk both layouts coincide, so even that buffer is compared here
    z, t, ws, bs, eps = _op_args(3)
    with torch.no_grad():
        cpp = torch.ops.flowops.mlp_trace_fwd(z, t, ws, bs, eps, "softplus")
        py = M._cpu_fwd(z, t, ws, bs, eps, "softplus")
        for a, b in zip(cpp, py):
            torch.testing.assert_close(a, b)
        g = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
        gc = torch.ops.flowops.mlp_trace_bwd(*g, z, t, ws, bs, eps, cpp[2], "softplus")
        gp = M._cpu_bwd(*g, z, t, ws, bs, eps, cpp[2], "softplus")
    torch.testing.assert_close(gc[0], gp[0])
    torch.testing.assert_close(gc[1], gp[1])
    for a, b in zip(list(gc[2]) + list(gc[3]), list(gp[2]) + list(gp[3])):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    z, t, ws, bs = make(8, 2, (16, 16), dtype=torch.float32, seed=1)

    def step(z, t, *params):
        f, tr = ops.mlp_trace(z, t, list(params[:3]), list(params[3:]), "tanh", None)
        return (f * f).sum() + tr.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = (z, t, *ws, *bs)
    loss_c = compiled(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    loss_e = step(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_double_backward_raises(backend):
    z, t, ws, bs = make(3, 2, (4,))
    with flowops.use_backend(backend):
        f, tr = ops.mlp_trace(z, t, ws, bs)
    with pytest.raises(RuntimeError, match="higher-order|first-order|create_graph"):
        torch.autograd.grad(tr.sum(), z, create_graph=True)


def test_reference_backend_supports_double_backward():
    z, t, ws, bs = make(3, 2, (4,))
    with flowops.use_backend("reference"):
        f, tr = ops.mlp_trace(z, t, ws, bs)
    (g,) = torch.autograd.grad(tr.sum(), z, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), ws[0])
    assert torch.isfinite(gg).all()


# ------------------------------------------------------------------------------------------
# edge cases and bad input


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_empty_batch(backend):
    z, t, ws, bs = make(0, 2, (4,))
    with flowops.use_backend(backend):
        f, tr = ops.mlp_trace(z, 0.5, ws, bs)
    assert f.shape == (0, 2) and tr.shape == (0,)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_nan_stays_in_its_sample(backend):
    z, t, ws, bs = make(5, 2, (6, 6))
    z = z.detach().clone()
    z[2, 0] = float("nan")
    with flowops.use_backend(backend), torch.no_grad():
        f, tr = ops.mlp_trace(z, t, ws, bs, "softplus")
    assert torch.isnan(f[2]).all() and torch.isnan(tr[2])
    keep = [0, 1, 3, 4]
    assert torch.isfinite(f[keep]).all() and torch.isfinite(tr[keep]).all()


def test_large_preactivations_are_finite():
    z, t, ws, bs = make(4, 2, (8,), scale=200.0)
    for act in ACTS:
        for backend in ("auto", "triton"):
            with flowops.use_backend(backend), torch.no_grad():
                f, tr = ops.mlp_trace(z, t, ws, bs, act)
            f_r, tr_r = ref.mlp_trace(z.detach(), t.detach(), [w.detach() for w in ws], [b.detach() for b in bs],
                                      act)
            assert torch.isfinite(f).all() and torch.isfinite(tr).all(), (act, backend)
            torch.testing.assert_close(tr, tr_r, rtol=1e-7, atol=1e-7)


def test_bad_input():
    z, t, ws, bs = make(4, 2, (5,))
    with pytest.raises(ValueError, match="z must be"):
        ops.mlp_trace(z[0], t, ws, bs)
    with pytest.raises(TypeError, match="z must be"):
        ops.mlp_trace(z.long(), t, ws, bs)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        ops.mlp_trace([[1.0, 2.0]], t, ws, bs)
    with pytest.raises(ValueError, match="eps must be"):
        ops.mlp_trace(z, t, ws, bs, eps=torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must be"):
        ops.mlp_trace(z, t, ws, bs, eps=torch.randn(1, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must be"):
        ops.mlp_trace(z, t, ws, bs, eps=torch.randn(0, 4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="eps dtype"):
        ops.mlp_trace(z, t, ws, bs, eps=torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="activation"):
        ops.mlp_trace(z, t, ws, bs, "relu")
    with pytest.raises(ValueError, match="t must be"):
        ops.mlp_trace(z, torch.zeros(3, dtype=torch.float64), ws, bs)
    with pytest.raises(TypeError, match="t must be"):
        ops.mlp_trace(z, "0.5", ws, bs)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        ops.mlp_trace(z, t, [ws[0][:, :2]] + ws[1:], bs)
    with pytest.raises(ValueError, match="last layer"):
        ops.mlp_trace(z, t, [ws[0], torch.randn(3, 5, dtype=torch.float64)], [bs[0], torch.randn(3).double()])
    with pytest.raises(ValueError, match="one bias per weight"):
        ops.mlp_trace(z, t, ws, bs[:1])
    with pytest.raises(TypeError, match=r"weights\[1\] dtype"):
        ops.mlp_trace(z, t, [ws[0], ws[1].float()], bs)
    with pytest.raises(ValueError, match=r"biases\[0\]"):
        ops.mlp_trace(z, t, ws, [bs[0][:2], bs[1]])


@pytest.mark.parametrize("probes", [None, 2])
@pytest.mark.parametrize("act", ACTS)
def test_many_chunks_match_reference(probes, act):
    """A batch spanning several of the C++ kernel's row chunks, the last one partial."""
    B, d = 701, 3
    z, t, ws, bs = make(B, d, (64, 48), seed=8)
    eps = None if probes is None else rademacher(probes, B, d)
    f_r, tr_r = ref.mlp_trace(z, t, ws, bs, act, eps)
    f, tr = ops.mlp_trace(z, t, ws, bs, act, eps)
    torch.testing.assert_close(f, f_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tr, tr_r, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    gf, gtr = torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    inputs = [z, t, *ws, *bs]
    for a, b in zip(torch.autograd.grad([f, tr], inputs, [gf, gtr]),
                    torch.autograd.grad([f_r, tr_r], inputs, [gf, gtr])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("probes", [None, 3])
@pytest.mark.parametrize("shape", [(203, 2, (64, 64)), (77, 10, (40, 33)), (150, 13, (300, 17, 70))],
                         ids=["small-d", "narrow", "wide"])
def test_float32_gemm_tiles_match_float64_reference(shape, probes):
    """float32 runs the C++ op's GEMMs on brgemm tiles (partial tiles, transposed panels, split thin
    dimensions); float64 takes at::mm. Every output and gradient against the float64 reference."""
    B, d, hidden = shape
    z, t, ws, bs = make(B, d, hidden, dtype=torch.float32, seed=12)
    eps = None if probes is None else rademacher(probes, B, d, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    gf, gtr = torch.randn(B, d, generator=g), torch.randn(B, generator=g)
    inputs = [z, t, *ws, *bs]
    f, tr = ops.mlp_trace(z, t, ws, bs, "tanh", eps)
    got = [f, tr, *torch.autograd.grad([f, tr], inputs, [gf, gtr])]
    d64 = [x.detach().double().requires_grad_() for x in inputs]
    f_r, tr_r = ref.mlp_trace(d64[0], d64[1], d64[2:2 + len(ws)], d64[2 + len(ws):], "tanh",
                              None if eps is None else eps.double())
    want = [f_r, tr_r, *torch.autograd.grad([f_r, tr_r], d64, [gf.double(), gtr.double()])]
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.double() - b).norm() / b.norm().clamp_min(1e-30)
        assert err < 2e-5, f"output {i}: relative error {err:.2e}"


@pytest.mark.skipif(not M.HAS_CPP_OPS, reason="C++ extension not built")
@pytest.mark.parametrize("probes", [None, 1, 2])
@pytest.mark.parametrize("act", ACTS)
def test_wide_field_eager_path_with_and_without_retain_graph(probes, act):
    """Fields wider than 256 units take the eager node's layer-by-layer path, which overwrites and releases
    its saved buffers during a backward that does not retain the graph: several row chunks (the last
    partial), against the reference; with retain_graph every backward gives the same gradients, and a
    backward after the graph was freed raises."""
    B, d = 150, 3
    z, t, ws, bs = make(B, d, (264, 24, 40), seed=9)
    eps = None if probes is None else rademacher(probes, B, d)
    f_r, tr_r = ref.mlp_trace(z, t, ws, bs, act, eps)
    g = torch.Generator().manual_seed(4)
    gf, gtr = torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    inputs = [z, t, *ws, *bs]
    want = torch.autograd.grad([f_r, tr_r], inputs, [gf, gtr])
    f, tr = ops.mlp_trace(z, t, ws, bs, act, eps)
    torch.testing.assert_close(f, f_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tr, tr_r, rtol=1e-10, atol=1e-10)
    consumed = torch.autograd.grad([f, tr], inputs, [gf, gtr])
    f, tr = ops.mlp_trace(z, t, ws, bs, act, eps)
    first = torch.autograd.grad([f, tr], inputs, [gf, gtr], retain_graph=True)
    second = torch.autograd.grad([f, tr], inputs, [gf, gtr])
    for a, b, c, w in zip(consumed, first, second, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-10)
        assert torch.equal(a, b) and torch.equal(b, c)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad([f, tr], inputs, [gf, gtr])


@pytest.mark.parametrize("probes", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_the_thread_count(probes, dtype):
    """Narrow fields run the C++ kernel's row chunks in parallel; the parameter gradients are summed per
    chunk in chunk order, so 1 and 2 threads give bitwise equal results."""
    B, d = 901, 2
    for hidden in ((64, 64, 64), (200, 16)):
        z, t, ws, bs = make(B, d, hidden, dtype=dtype, seed=11)
        eps = None if probes is None else rademacher(probes, B, d, dtype=dtype)
        g = torch.Generator().manual_seed(2)
        gf, gtr = torch.randn(B, d, generator=g).to(dtype), torch.randn(B, generator=g).to(dtype)
        inputs = [z, t, *ws, *bs]
        results = []
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                f, tr = ops.mlp_trace(z, t, ws, bs, "tanh", eps)
                results.append([f, tr, *torch.autograd.grad([f, tr], inputs, [gf, gtr])])
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(*results):
            assert torch.equal(a, b)
