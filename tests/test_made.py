"""MADE, MAF, IAF and the one-pass autoregressive inversion (flowops.ops.made_inverse)."""
import pytest
import torch

import flowops
from flowops import reference
from flowops.nn import IAF, MADE, MAF
from flowops.train import num_threads
from flowops.ops.made_inverse import _has_cpp_solve, degree_ends

HAS_CPP = _has_cpp_solve()
METHODS = ["reference", "sliced"] + (["cpp"] if HAS_CPP else [])


def randomize(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


@pytest.mark.parametrize("order", ["natural", "reversed", "random", [2, 0, 4, 1, 3]])
@pytest.mark.parametrize("ppf", [1, 2, 3])
@pytest.mark.parametrize("hidden", [(7, 4), (4,), ()])
def test_made_autoregressive_property(order, ppf, hidden):
    d = 5
    m = randomize(MADE(d, hidden, params_per_feature=ppf, order=order, activation="tanh").double())
    x = torch.randn(d, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: m(v[None])[0], x)  # [ppf * d, d]
    pos = m.order  # position of each feature in the order
    for p in range(ppf):
        for j in range(d):
            row = jac[p * d + j]
            allowed = pos < pos[j]
            assert torch.all(row[~allowed] == 0), (p, j)
    # and the allowed connections are really used (random weights, tanh: no dead units)
    if hidden:
        for p in range(ppf):
            for j in range(d):
                allowed = pos < pos[j]
                assert torch.all(jac[p * d + j][allowed] != 0)


def test_made_matches_reference_masks():
    d = 6
    m = randomize(MADE(d, (11, 9), order="random", generator=torch.Generator().manual_seed(3)).double())
    x = torch.randn(4, d, dtype=torch.float64)
    out = m(x)
    xs = x[:, m.perm]
    ref = reference.made_forward(xs, list(m.weights), list(m.biases), m.hidden_degrees, "relu")
    torch.testing.assert_close(out, ref[:, m.out_index])
    with flowops.use_backend("reference"):
        torch.testing.assert_close(m(x), out)


@pytest.mark.parametrize("cls", [MAF, IAF])
@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
@pytest.mark.parametrize("order", ["natural", "reversed", "random"])
def test_logdet_brute_force_and_round_trip(cls, scale, order):
    d = 5
    layer = randomize(cls(d, (9, 8), order=order, scale=scale, activation="tanh").double(), std=0.4)
    x = torch.randn(3, d, dtype=torch.float64)
    z, ld = layer(x)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x[i])
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)
        assert torch.all(torch.diagonal(jac[m_perm(layer)][:, m_perm(layer)], offset=1) == 0)
    xb, ld_inv = layer.inverse(z)
    torch.testing.assert_close(xb, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), rtol=0, atol=1e-10)


def m_perm(layer):
    return layer.made.perm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 2, (3,)), (7, 13, (17, 12)), (33, 20, (19, 25, 23)), (5, 1, (4,)),
                                   (0, 4, (6,)), (6, 3, ())])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_one_pass_inverse_matches_d_pass(dtype, shape, activation):
    b, d, hidden = shape
    layer = randomize(MAF(d, hidden, activation=activation, order="random", scale="softclamp"), std=0.25).to(dtype)
    z = torch.randn(b, d, dtype=dtype)
    with torch.no_grad():
        ref_x, ref_ld = layer.inverse(z, method="reference")
        for method in METHODS[1:]:
            x, ld = layer.inverse(z, method=method)
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x, ref_x, **tol)
            torch.testing.assert_close(ld, ref_ld, **tol)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_cpp_inverse_multiple_tiles_and_threads():
    # more samples than one SIMD tile, odd batch; results independent of the thread count
    layer = randomize(MAF(9, (16, 8), order="reversed", scale="exp"), std=0.2)
    z = torch.randn(301, 9)
    with torch.no_grad():
        a, la = layer.inverse(z, method="cpp")
        with num_threads(1):
            b, lb = layer.inverse(z, method="cpp")
        r, lr = layer.inverse(z, method="reference")
    assert torch.equal(a, b) and torch.equal(la, lb)
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lr, rtol=1e-5, atol=1e-5)


def test_auto_method_dispatch():
    layer = randomize(MAF(4, (5,)), std=0.2)
    z = torch.randn(3, 4)
    with torch.no_grad():
        x0, _ = layer.inverse(z)
    x1, _ = layer.inverse(z)  # grad mode on, parameters require grad: the differentiable path
    assert not x0.requires_grad and x1.requires_grad
    torch.testing.assert_close(x0, x1.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="no backward"):
        if HAS_CPP:
            layer.inverse(z, method="cpp")
        else:
            raise RuntimeError("no backward")
    with pytest.raises(ValueError, match="method"):
        with torch.no_grad():
            layer.inverse(z, method="magic")


def test_gradients_through_sampling_match_d_pass():
    """rsample: gradients of the one-pass inverse equal those of the D-pass reference."""
    layer = randomize(MAF(6, (9, 7), order="random", scale="softclamp", activation="tanh").double(), std=0.3)
    z = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    params = [z, *layer.parameters()]

    def loss(method):
        x, ld = layer.inverse(z, method=method)
        return (x.sin().sum() + 0.3 * ld.sum())

    g_one = torch.autograd.grad(loss("sliced"), params)
    g_ref = torch.autograd.grad(loss("reference"), params)
    for a, b in zip(g_one, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_one_pass_inverse():
    layer = randomize(MAF(4, (5, 3), scale="exp", activation="tanh").double(), std=0.3)
    m = layer.made
    ws = [w.detach().clone().requires_grad_() for w in m.weights]
    bs = [b.detach().clone().requires_grad_() for b in m.biases]
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def fn(y, *wb):
        return flowops.ops.made_inverse(y, wb[:3], wb[3:], m.hidden_degrees, "tanh", "exp", method="sliced")

    assert torch.autograd.gradcheck(fn, (y, *ws, *bs))


def test_iaf_forward_gradients():
    layer = randomize(IAF(5, (6, 6), order="reversed", activation="tanh").double(), std=0.3)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z, ld = layer(x)
    (ld.sum() + z.sum()).backward()
    g = x.grad.clone()
    x.grad = None
    with flowops.use_backend("reference"):
        z2, ld2 = layer(x)
        (ld2.sum() + z2.sum()).backward()
    torch.testing.assert_close(g, x.grad)


def test_degree_ends():
    degs = [reference.made.hidden_degrees(5, 7)]
    ends = degree_ends(degs, 5)
    assert ends[0][0] == 0 and ends[0][5] == 7
    assert all(a <= b for a, b in zip(ends[0], ends[0][1:]))


def test_flow_model_log_prob_and_sample():
    torch.manual_seed(0)
    flow = flowops.models.MAF(3, transforms=3, hidden=(8, 8), permutation="random")
    randomize(flow, std=0.2)
    x = torch.randn(10, 3)
    lp = flow.log_prob(x)
    assert lp.shape == (10,) and torch.isfinite(lp).all()
    with torch.no_grad():
        s = flow.sample(7)
    assert s.shape == (7,) + (3,)
    z, _ = flow.transform(s)
    xb, _ = flow.transform.inverse(z)
    torch.testing.assert_close(xb, s, rtol=1e-4, atol=1e-4)
    orders = [t.made.order.tolist() for t in flow.transform]
    assert len({tuple(o) for o in orders}) > 1
    with flowops.use_backend("reference"):
        torch.testing.assert_close(flow.log_prob(x), lp, rtol=1e-5, atol=1e-5)
    s2, lp2 = flow.sample_and_log_prob(4)
    torch.testing.assert_close(lp2, flow.log_prob(s2), rtol=1e-4, atol=1e-4)


def test_untrained_maf_is_identity():
    layer = MAF(4, (8,))
    x = torch.randn(3, 4)
    z, ld = layer(x)
    torch.testing.assert_close(z, x)
    assert torch.all(ld == 0)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_opcheck_made_solve():
    layer = randomize(MAF(4, (5,)), std=0.2)
    m = layer.made
    ends = [torch.tensor(e) for e in degree_ends(m.hidden_degrees, 4)]
    args = (torch.randn(6, 4), [w.detach() for w in m.weights], [b.detach() for b in m.biases], ends, "relu",
            "softclamp", 2.0)
    torch.library.opcheck(torch.ops.flowops.made_solve.default, args, test_utils=("test_schema", "test_faketensor"))


def test_compile_log_prob_fullgraph():
    flow = flowops.models.MAF(3, transforms=2, hidden=(6, 6))
    randomize(flow, std=0.2)
    x = torch.randn(5, 3)
    compiled = torch.compile(flow.log_prob, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), flow.log_prob(x), rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_construction():
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, (4,), order=[0, 0, 1])
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, (4,), order=[0, 1])
    with pytest.raises(TypeError, match="order"):
        MADE(3, (4,), order=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="order"):
        MADE(3, (4,), order="sideways")
    with pytest.raises(ValueError, match="hidden width"):
        MADE(10, (16, 8))
    with pytest.raises(ValueError, match="features"):
        MADE(0)
    with pytest.raises(ValueError, match="activation"):
        MADE(3, (4,), activation="swish")
    with pytest.raises(ValueError, match="scale"):
        MAF(3, (4,), scale="cubic")
    with pytest.raises(ValueError, match="clamp"):
        MAF(3, (4,), clamp=0)
    with pytest.raises(ValueError, match="permutation"):
        flowops.models.MAF(3, permutation="shuffle")
    with pytest.raises(ValueError, match="transforms"):
        flowops.models.MAF(3, transforms=0)


@pytest.mark.parametrize("cls", [MAF, IAF])
def test_bad_inputs(cls):
    layer = cls(4, (5,))
    for fn in (layer.forward, layer.inverse):
        with pytest.raises(ValueError, match=r"\[batch, 4\]"):
            fn(torch.randn(3, 5))
        with pytest.raises(ValueError, match=r"\[batch, 4\]"):
            fn(torch.randn(4))
        with pytest.raises(TypeError, match="dtype"):
            fn(torch.randn(3, 4, dtype=torch.float64))
        with pytest.raises(TypeError, match="Tensor"):
            fn([[0.0] * 4])


@pytest.mark.parametrize("method", METHODS)
def test_nan_stays_in_its_sample(method):
    layer = randomize(MAF(4, (5,)), std=0.2)
    z = torch.randn(3, 4)
    z[1, 2] = float("nan")
    with torch.no_grad():
        x, ld = layer.inverse(z, method=method)
    assert torch.isfinite(x[[0, 2]]).all() and torch.isfinite(ld[[0, 2]]).all()
    assert torch.isnan(x[1]).any()


# ---- the persistent Triton inversion kernel (CPU under TRITON_INTERPRET=1; CUDA when present) -----------
def _triton_devices():
    import os

    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover
        return []
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return (["cpu"] if interp else []) + (["cuda"] if torch.cuda.is_available() and not interp else [])


@pytest.mark.skipif(not _triton_devices(), reason="needs triton with TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("cfg", [(37, 4, (7, 5), "relu", "softclamp"), (5, 11, (20, 19), "tanh", "exp"),
                                 (3, 3, (), "relu", "sigmoid"), (40, 5, (6,), "tanh", "sigmoid"),
                                 (0, 3, (4,), "relu", "exp")])
def test_triton_inverse_matches_d_pass(device, cfg):
    b, d, hidden, act, scale = cfg
    layer = randomize(MAF(d, hidden, activation=act, scale=scale, order="random"), std=0.3).to(device)
    z = torch.randn(b, d, device=device)
    with torch.no_grad():
        x, ld = layer.inverse(z, method="triton")
        xr, ldr = layer.inverse(z, method="reference")
    torch.testing.assert_close(x, xr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ldr, rtol=1e-5, atol=1e-5)


def test_triton_method_refuses_grad():
    layer = MAF(3, (4,))
    with pytest.raises(RuntimeError, match="no backward"):
        layer.inverse(torch.randn(2, 3), method="triton")
