"""The fused Glow conditioner (flowops.ops.conv_net) against F.conv2d + ReLU: outputs and every gradient,
float64 gradcheck, awkward shapes and layouts, the no-grad and empty-batch paths, bad input, and the
Glow model routing its conditioners through it."""
import sys

import pytest
import torch
from torch import nn

from flowops import _backend, ops
from flowops.models.glow import Glow
from flowops.nn import conv_net as make_conv_net
from flowops.reference.conv_net import conv_net_kinks_apply as kinks_apply, conv_net_kinks_record as kinks_record

CN = sys.modules["flowops.ops.conv_net"]
needs_cpp = pytest.mark.skipif(not CN._cpp_op(), reason="C++ extension not built")


def make(c, o, k, dtype=torch.float64, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return [r(k, c, 3, 3), r(k), r(k, k, 1, 1), r(k), r(o, k, 3, 3), r(o)]


def grads(y, inputs, gy):
    return torch.autograd.grad(y, inputs, gy, allow_unused=True)


def assert_close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-30)
    assert (a - b).abs().max() <= rtol * scale, ((a - b).abs().max().item(), scale.item())


# (N, C, H, W, hidden, out): odd and non-square images, 1x1 and 1xW images, one channel, one sample,
# hidden sizes that are not multiples of the 64-wide tiles, and Glow's three levels
SHAPES = [(2, 3, 5, 7, 20, 6), (1, 1, 1, 1, 4, 2), (3, 2, 1, 9, 8, 4), (2, 6, 16, 16, 70, 12),
          (4, 12, 8, 8, 128, 24), (3, 24, 4, 4, 128, 48), (2, 5, 3, 2, 130, 1)]


@needs_cpp
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_conv2d_reference(shape, dtype, rtol):
    n, c, h, w, k, o = shape
    ps = make(c, o, k, dtype)
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.ops.flowops.conv_net(x, *ps)
    ref = CN.conv_net_reference(x, *ps)
    assert y.shape == ref.shape and y.is_contiguous()
    assert_close(y, ref, rtol)
    gy = torch.randn_like(ref)
    for a, b in zip(grads(y, [x, *ps], gy), grads(ref, [x, *ps], gy)):
        assert a.shape == b.shape
        assert_close(a, b, rtol)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4, 4, 8, 6)])
def test_plain_forward_backward_calls_match_the_op(shape, dtype):
    """conv_net_fwd / conv_net_bwd (the two plain calls the reversible engine uses) give the autograd op's
    output and gradients bit for bit; need_x=False skips the input gradient."""
    n, c, h, w, k, o = shape
    ps = make(c, o, k, dtype)
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.ops.flowops.conv_net(x, *ps)
    gy = torch.randn_like(y)
    want = grads(y, [x, *ps], gy) if n else [torch.zeros_like(t) for t in (x, *ps)]
    with torch.no_grad():
        y2, h1, h2 = torch.ops.flowops.conv_net_fwd(x, *ps)
        assert torch.equal(y2, y) and h1.shape == h2.shape == (n * h * w, k)
        got = torch.ops.flowops.conv_net_bwd(gy, x, h1, h2, *ps, True)
        assert len(got) == 7
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        no_x = torch.ops.flowops.conv_net_bwd(gy, x, h1, h2, *ps, False)
        assert no_x[0].numel() == 0
        for a, b in zip(no_x[1:], want[1:]):
            assert torch.equal(a, b)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4, 4, 8, 6)])
def test_plain_calls_into_given_buffers(shape, dtype):
    """conv_net_fwd_into / conv_net_bwd_into (the reversible engine's kept activations and gradient buffer) write
    what conv_net_fwd / conv_net_bwd return, bit for bit, into the given tensors (views of one pool buffer here),
    overwriting them."""
    n, c, h, w, k, o = shape
    ops = torch.ops.flowops
    ps = [p.detach() for p in make(c, o, k, dtype)]
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    gy = torch.randn(n, o, h, w, dtype=torch.float64).to(dtype)
    y, h1, h2 = ops.conv_net_fwd(x, *ps)
    want = ops.conv_net_bwd(gy, x, h1, h2, *ps, True)
    p_rows = n * h * w
    flat = ops.conv_net_pooled(1, y.numel() + 2 * p_rows * k + 16, dtype).view(-1).fill_(float("nan"))
    y2 = flat[:y.numel()].view(y.shape)
    h1b = flat[y.numel():y.numel() + p_rows * k].view(p_rows, k)
    h2b = flat[y.numel() + p_rows * k:y.numel() + 2 * p_rows * k].view(p_rows, k)
    ops.conv_net_fwd_into(x, *ps, y2, h1b, h2b)
    assert torch.equal(y2, y) and torch.equal(h1b, h1) and torch.equal(h2b, h2)
    dst = [torch.full_like(p, float("nan")) for p in ps]
    for need_x in (True, False):
        gx = ops.conv_net_bwd_into(gy, x, h1b, h2b, *ps, need_x, dst)
        if need_x:
            assert torch.equal(gx, want[0])
        else:
            assert gx.numel() == 0
        for a, b in zip(dst, want[1:]):
            assert torch.equal(a, b)


@needs_cpp
def test_into_calls_check_their_arguments():
    ops = torch.ops.flowops
    ps = [p.detach() for p in make(3, 4, 8, torch.float32)]
    x = torch.randn(2, 3, 4, 4)
    y, h1, h2 = ops.conv_net_fwd(x, *ps)
    dst = [torch.empty_like(p) for p in ps]
    with pytest.raises(ValueError, match="six tensors"):
        ops.conv_net_bwd_into(y, x, h1, h2, *ps, True, dst[:5])
    with pytest.raises(ValueError, match=r"grads\[4\]"):
        ops.conv_net_bwd_into(y, x, h1, h2, *ps, True, dst[:4] + [dst[4][:, :4], dst[5]])
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        ops.conv_net_bwd_into(y, x, h1, h2, *ps, True, [dst[0].double()] + dst[1:])
    with pytest.raises(ValueError, match=r"grads\[2\]"):
        ops.conv_net_bwd_into(y, x, h1, h2, *ps, True,
                              dst[:2] + [torch.empty(8, 8, 1, 2)[..., :1]] + dst[3:])
    with pytest.raises(ValueError, match="y must be contiguous"):
        ops.conv_net_fwd_into(x, *ps, y[:1], h1, h2)
    with pytest.raises(ValueError, match="h1 and h2"):
        ops.conv_net_fwd_into(x, *ps, y, h1.double(), h2)
    with pytest.raises(ValueError, match="h1 and h2"):
        ops.conv_net_fwd_into(x, *ps, y, h1, h2.t().contiguous().t())
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.conv_net_pooled(2, 3, torch.int32)
    with pytest.raises(ValueError, match="non-negative"):
        ops.conv_net_pooled(-1, 3, torch.float32)
    big = ops.conv_net_pooled(512, 256, torch.float64)
    assert big.shape == (512, 256) and big.dtype == torch.float64 and big.is_contiguous()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4, 4, 8, 6)])
def test_kink_records(shape, dtype):
    """conv_net_fwd_kinks: recording gives conv_net_fwd's output and exactly the reference's near-kink units with
    their values; applying them to a recomputation from a slightly moved input puts every unit that moved less
    than tau on the recorded side of the ReLU (those near the kink get the recorded values) and leaves the rest."""
    n, c, h, w, k, o = shape
    ps = make(c, o, k, dtype)
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    tol = 0.05  # wide, so that small shapes have records
    ops = torch.ops.flowops
    with torch.no_grad():
        _check_kinks(ops, x, ps, tol, dtype, n)


def _check_kinks(ops, x, ps, tol, dtype, n):
    y, h1, h2 = ops.conv_net_fwd(x, *ps)
    y2, e1, e2, rec = ops.conv_net_fwd_kinks(x, *ps, tol, [])
    assert torch.equal(y2, y) and e1.numel() == 0 and e2.numel() == 0 and len(rec) == 4
    for hh, idx, val in ((h1, rec[0], rec[1]), (h2, rec[2], rec[3])):
        want_idx, want_val = kinks_record(hh, tol)
        order = idx.argsort()  # the op's threads append in any order
        assert idx.dtype == torch.int32 and val.dtype == dtype
        assert torch.equal(idx[order], want_idx) and torch.equal(val[order], want_val)
        assert idx.numel() > 0 or hh.numel() < 200  # the wide band finds units on all but the tiny shapes
    xm = x * (1 + 1e-9 if dtype == torch.float64 else 1 + 1e-6)
    _, m1, m2 = ops.conv_net_fwd(xm, *ps)
    _, a1, a2, none = ops.conv_net_fwd_kinks(xm, *ps, tol, list(rec))
    assert none == [] and a1.shape == m1.shape
    assert torch.equal(a1, kinks_apply(m1, tol, rec[0], rec[1]))
    if n:
        assert ((a1 > 0) == (h1 > 0)).all()  # every unit on the forward's side (the move is far below tau)


@needs_cpp
@pytest.mark.parametrize("hidden", [70, 128])  # 128: float's vector path (a multiple of 16 units); 70: the generic one
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kink_records_skip_rows_with_nan_and_keep_relu_bits(dtype, hidden):
    """A NaN input makes some hidden rows NaN: those rows get no records and no clearing (their band is NaN, as
    in the reference), the others are recorded as usual; the ReLU output equals the plain op's bit for bit (NaN
    and -0 kept as std::max(z, 0) keeps them)."""
    ps = [p.detach() for p in make(3, 6, hidden, dtype)]
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).to(dtype)
    x[0, 1, 2, 3] = float("nan")
    ops = torch.ops.flowops
    with torch.no_grad():
        y, h1, h2 = ops.conv_net_fwd(x, *ps)
        y2, _, _, rec = ops.conv_net_fwd_kinks(x, *ps, 0.05, [])
        assert torch.equal(y2.isnan(), y.isnan()) and torch.equal(y2.nan_to_num(), y.nan_to_num())
        for hh, idx, val in ((h1, rec[0], rec[1]), (h2, rec[2], rec[3])):
            assert hh.isnan().any(dim=1).any() and not hh.isnan().all()
            want_idx, want_val = kinks_record(hh, 0.05)
            order = idx.argsort()
            assert torch.equal(idx[order], want_idx) and torch.equal(val[order], want_val)
            assert not hh.isnan().any(dim=1)[idx.long() // hh.shape[1]].any()
        _, a1, _, _ = ops.conv_net_fwd_kinks(x, *ps, 0.05, list(rec))
        want = kinks_apply(h1, 0.05, rec[0], rec[1])
        assert torch.equal(a1.isnan(), want.isnan()) and torch.equal(a1.nan_to_num(), want.nan_to_num())
        assert torch.equal(torch.signbit(a1), torch.signbit(want))


@needs_cpp
def test_kink_records_check_their_arguments():
    ps = [p.detach() for p in make(3, 6, 8, torch.float32)]
    x = torch.randn(2, 3, 4, 4)
    ops = torch.ops.flowops
    rec = ops.conv_net_fwd_kinks(x, *ps, 0.1, [])[3]
    with pytest.raises(ValueError, match="tol must be in"):
        ops.conv_net_fwd_kinks(x, *ps, 0.7, [])
    with pytest.raises(ValueError, match="apply must be empty"):
        ops.conv_net_fwd_kinks(x, *ps, 0.1, rec[:2])
    with pytest.raises(ValueError, match="int32 indices, values"):
        ops.conv_net_fwd_kinks(x, *ps, 0.1, [rec[0].long(), rec[1], rec[2], rec[3]])
    bad = torch.tensor([2 * 4 * 4 * 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="out of range"):
        ops.conv_net_fwd_kinks(x, *ps, 0.1, [bad, torch.ones(1), rec[2], rec[3]])


@needs_cpp
def test_plain_backward_checks_its_arguments():
    ps = make(3, 6, 8)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y, h1, h2 = torch.ops.flowops.conv_net_fwd(x, *ps)
        with pytest.raises(ValueError, match="h1 and h2"):
            torch.ops.flowops.conv_net_bwd(y, x, h1[:-1], h2, *ps, True)
        with pytest.raises(ValueError, match="h1 and h2"):
            torch.ops.flowops.conv_net_bwd(y, x, h1.float(), h2, *ps, True)
        with pytest.raises(ValueError, match="h1 and h2"):
            torch.ops.flowops.conv_net_bwd(y, x, h1.t().contiguous().t(), h2, *ps, True)
        with pytest.raises(ValueError, match="grad_y"):
            torch.ops.flowops.conv_net_bwd(y[:, :3], x, h1, h2, *ps, True)
        with pytest.raises(ValueError, match="w3"):
            torch.ops.flowops.conv_net_bwd(y, x, h1, h2, *ps[:4], ps[4][:, :4], ps[5], True)


@needs_cpp
@pytest.mark.parametrize("layout", ["channel_slice", "channels_last", "transposed_hw"])
def test_strided_inputs(layout):
    ps = make(4, 6, 16)
    base = torch.randn(3, 9, 6, 5, dtype=torch.float64)
    if layout == "channel_slice":  # the coupling's pass-through half: a view into the full activation
        x = base[:, 2:6]
    elif layout == "channels_last":
        x = base[:, :4].contiguous(memory_format=torch.channels_last)
    else:
        x = base[:, :4].transpose(2, 3)
    x.requires_grad_()
    y = ops.conv_net(x, *ps)
    ref = CN.conv_net_reference(x, *ps)
    assert_close(y, ref, 1e-12)
    gy = torch.randn_like(ref).transpose(2, 3).contiguous().transpose(2, 3)  # a non-contiguous upstream gradient
    for a, b in zip(grads(y, [x, *ps], gy), grads(ref, [x, *ps], gy)):
        assert_close(a, b, 1e-12)


@needs_cpp
def test_gradcheck_float64():
    ps = make(3, 4, 5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.flowops.conv_net(*a), (x, *ps))


@needs_cpp
def test_partial_requires_grad_and_no_grad():
    ps = make(3, 4, 8)
    frozen = [p.detach() for p in ps[:2]] + ps[2:]  # first conv frozen, x a constant
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = ops.conv_net(x, *frozen)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, ps[2:], gy)
    want = torch.autograd.grad(CN.conv_net_reference(x, *frozen), ps[2:], gy)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-12)
    with torch.no_grad():
        y0 = ops.conv_net(x, *ps)
    assert not y0.requires_grad
    assert torch.equal(y0, y.detach())


@needs_cpp
def test_retain_graph_and_second_order():
    ps = make(3, 4, 8)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = ops.conv_net(x, *ps)
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, [x, *ps], gy, retain_graph=True)
    g2 = torch.autograd.grad(y, [x, *ps], gy)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    y = ops.conv_net(x, *ps)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@needs_cpp
def test_empty_batch():
    ps = make(3, 4, 8)
    x = torch.zeros(0, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = ops.conv_net(x, *ps)
    assert y.shape == (0, 4, 5, 5)
    gs = torch.autograd.grad(y.sum(), [x, *ps])
    assert gs[0].shape == x.shape
    for g, p in zip(gs[1:], ps):
        assert g.shape == p.shape and not g.any()


def test_bad_input():
    ps = make(3, 4, 8, torch.float32)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="4-d"):
        ops.conv_net(x[0], *ps)
    with pytest.raises(ValueError, match="w1 must have shape"):
        ops.conv_net(torch.randn(2, 5, 5, 5), *ps)
    with pytest.raises(ValueError, match="w3 must have shape"):
        ops.conv_net(x, *ps[:4], ps[4][:, :, :1], ps[5])
    with pytest.raises(ValueError, match="float64"):
        ops.conv_net(x.double(), *ps)
    if CN._cpp_op():  # the registered op checks on its own
        with pytest.raises(ValueError, match="b2 must have shape"):
            torch.ops.flowops.conv_net(x, *ps[:3], ps[3][:2], *ps[4:])
        with pytest.raises(ValueError, match="float32 or float64"):
            torch.ops.flowops.conv_net(x.half(), *[p.half() for p in ps])


def test_reference_backend_and_compile_take_the_composition(monkeypatch):
    ps = make(3, 4, 8, torch.float32)
    x = torch.randn(2, 3, 5, 5)
    called = []
    real = CN.conv_net_reference
    monkeypatch.setattr(CN, "conv_net_reference", lambda *a: called.append(1) or real(*a))
    with _backend.use_backend("reference"):
        ops.conv_net(x, *ps)
    assert called
    monkeypatch.undo()
    compiled = torch.compile(ops.conv_net, backend="eager", fullgraph=True)  # no graph break: the composition
    assert_close(compiled(x, *ps), CN.conv_net_reference(x, *ps), 1e-5)


def test_conditioner_recognition():
    net = make_conv_net(4, 6, 16)
    got = CN.conv_net_params(net)
    assert got is not None and got[0] is net[0].weight and got[5] is net[4].bias
    assert CN.conv_net_params(nn.Sequential(*list(net)[:4], nn.Conv2d(16, 6, 5, padding=2))) is None
    assert CN.conv_net_params(nn.Sequential(*list(net)[:3], nn.Tanh(), net[4])) is None
    assert CN.conv_net_params(nn.Sequential(nn.Conv2d(4, 16, 3, padding=1, bias=False), *list(net)[1:])) is None
    assert CN.conv_net_params(nn.Sequential(nn.Conv2d(4, 16, 3, padding=1, padding_mode="reflect"),
                                            *list(net)[1:])) is None
    handle = net[2].register_forward_hook(lambda *a: None)
    assert CN.conv_net_params(net) is None  # hooks must run: the module path
    handle.remove()
    assert CN.conv_net_params(net) is not None


@needs_cpp
def test_glow_runs_its_conditioners_through_the_op(monkeypatch):
    model = Glow((3, 8, 8), levels=2, steps=2, hidden=16).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.1)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    with _backend.use_backend("reference"):
        model.log_prob(x)  # ActNorm init
        ref = model.log_prob(x)
        g_ref = torch.autograd.grad(ref.sum(), list(model.parameters()))
    calls = []
    real = torch.ops.flowops.conv_net
    monkeypatch.setattr(CN.torch.ops.flowops, "conv_net", lambda *a: calls.append(1) or real(*a), raising=False)
    out = model.log_prob(x)
    assert len(calls) == 4  # every coupling of both levels
    g_out = torch.autograd.grad(out.sum(), list(model.parameters()))
    assert_close(out, ref, 1e-12)
    for a, b in zip(g_out, g_ref):
        assert_close(a, b, 1e-10)


@needs_cpp
def test_activation_pool_reuse_and_empty_cache():
    CN.empty_cache()
    assert CN.cached_bytes() == 0
    ps = make(3, 4, 64, torch.float32)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)  # hidden activations of 4*16*16*64*4 = 256 KB each
    gy = torch.randn(4, 4, 16, 16)
    first = torch.autograd.grad(ops.conv_net(x, *ps), [x, *ps], gy)
    held = CN.cached_bytes()
    assert held == 2 * 4 * 16 * 16 * 64 * 4  # both saved activations came back after the backward
    again = torch.autograd.grad(ops.conv_net(x, *ps), [x, *ps], gy)  # reuses them (values must not leak)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    ref = grads(CN.conv_net_reference(x, *ps), [x, *ps], gy)
    for a, b in zip(again, ref):
        assert_close(a, b, 2e-5)
    assert CN.cached_bytes() == held
    assert CN.empty_cache() == held and CN.cached_bytes() == 0


@needs_cpp
def test_activation_pool_can_be_turned_off():
    import subprocess

    code = ("import torch; from flowops import ops; import sys; CN = sys.modules['flowops.ops.conv_net']; "
            "ps = [torch.randn(64, 3, 3, 3), torch.randn(64), torch.randn(64, 64, 1, 1), torch.randn(64), "
            "torch.randn(4, 64, 3, 3), torch.randn(4)]; x = torch.randn(4, 3, 16, 16, requires_grad=True); "
            "ops.conv_net(x, *ps).sum().backward(); print(CN.cached_bytes())")
    env = dict(__import__("os").environ, FLOWOPS_POOL_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


@needs_cpp
def test_forked_child_runs_the_op():
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method on this platform")
    ps = make(3, 4, 64, torch.float32)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    ops.conv_net(x, *ps).sum().backward()  # the parent's pool holds buffers
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as workers:
        got = workers.apply(_child_conv_net, ([p.detach() for p in ps], x.detach()))
    assert torch.allclose(got, CN.conv_net_reference(x, *ps).detach(), rtol=1e-5, atol=1e-5)


def _child_conv_net(ps, x):
    # one thread, as DataLoader workers run: OpenMP is not fork-safe (plain torch.mm hangs in a forked child
    # after the parent ran parallel regions)
    torch.set_num_threads(1)
    ps = [p.requires_grad_() for p in ps]
    y = ops.conv_net(x, *ps)
    y.sum().backward()  # takes and returns pooled buffers in the child
    return y.detach()


@needs_cpp
@pytest.mark.parametrize("op", ["conv_net_kinks_record", "conv_net_kinks_apply"])
def test_kink_bench_cases_match_their_reference(op):
    """The bench cases of the kink records: flowops' outputs (records sorted; the recomputation's y, h1, h2)
    against the F.conv2d reference, on a shape with records in both layers."""
    from flowops import benchmark
    case = benchmark.make_case(op, (2, 6, 8, 8), "forward")
    ref = benchmark._as_tuple(case.callable("reference")())
    got = benchmark._as_tuple(case.callable("flowops")())
    assert len(ref) == len(got)
    if op == "conv_net_kinks_record":
        from flowops.reference.conv_net import _images, _rows
        x, w1, b1, w2, b2 = case.inputs[:5]
        h1 = _rows(torch.relu(torch.nn.functional.conv2d(x, w1, b1, padding=1)))
        h2 = _rows(torch.relu(torch.nn.functional.conv2d(_images(h1, 2, 8, 8), w2, b2)))
        for h, (ri, rv), (gi, gv) in ((h1, ref[1:3], got[1:3]), (h2, ref[3:5], got[3:5])):
            assert ri.numel() > 0
            # the same units, but for any within rounding of the band's edge (2 tau: the two convolutions round
            # differently); the common ones with the same values
            edge = 2 * benchmark.KINK_TOL * h.max(dim=1).values
            for i in set(ri.tolist()) ^ set(gi.tolist()):
                r, k = divmod(i, h.shape[1])
                assert abs(h[r, k] - edge[r]) <= 1e-5 * h[r].max(), i
            common = sorted(set(ri.tolist()) & set(gi.tolist()))
            assert len(common) >= 0.95 * ri.numel()
            pick = lambda idx, val: val[torch.isin(idx, torch.tensor(common, dtype=idx.dtype))]  # noqa: E731
            assert (pick(gi, gv) - pick(ri, rv)).abs().max() <= 1e-5 * h.max()  # rounding of the layer's scale
    else:
        assert case.check()["ok"] and case.inputs[-4].numel() > 0
    assert_close(got[0], ref[0], 1e-4)


def _separate_reverse(y, gy, gld, ps, part, scale, clamp, kinks, kept, need_x):
    """The reversible walk's separate calls for one Glow coupling (what glow_coupling_reverse fuses)."""
    f = torch.ops.flowops
    (ps0, pl), (ts, tl) = part
    yp, yt = y[:, ps0:ps0 + pl], y[:, ts:ts + tl]
    if kept is not None:
        cond, h1, h2 = kept
    elif kinks is not None:
        cond, h1, h2, _ = f.conv_net_fwd_kinks(yp, *ps, kinks[0], list(kinks[1]))
    else:
        cond, h1, h2 = f.conv_net_fwd(yp, *ps)
    xt = f.affine_coupling(yt, cond, None, scale, clamp, True)[0]
    gxt, gcond = f.affine_coupling_bwd(gy[:, ts:ts + tl], gld, xt, cond, None, scale, clamp, False)
    dst = [torch.full_like(p, float("nan")) for p in ps]
    gxp = f.conv_net_bwd_into(gcond, yp, h1, h2, *ps, need_x, dst)
    first = ps0 < ts
    x = torch.cat((yp, xt) if first else (xt, yp), 1)
    gyp = gy[:, ps0:ps0 + pl] + gxp if need_x else None
    gx = torch.cat((gyp, gxt) if first else (gxt, gyp), 1) if need_x else None
    return x, gx, dst


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 12, 8, 8, 32), (2, 6, 5, 3, 20), (0, 4, 4, 4, 8), (1, 2, 1, 1, 4)])
@pytest.mark.parametrize("scale", ["sigmoid", "softclamp", "additive"])
def test_glow_coupling_reverse_matches_the_separate_calls(dtype, shape, scale):
    """The reversible walk's one-call step for a Glow coupling: the same x, grad_x and conditioner gradients as
    the separate calls (recomputation plain, with kink records applied, from kept activations and into given
    buffers; pass-through half first and second; with and without the input gradient), bit for bit."""
    n, c, h, w, k = shape
    half = c // 2
    clamp = 2.0 if scale == "softclamp" else 1.0
    o = half if scale == "additive" else 2 * half
    ps = [p.detach() for p in make(half, o, k, dtype, scale=0.2)]
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    gy, gld = torch.randn_like(y), torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    f = torch.ops.flowops
    for part in (((0, half), (half, half)), ((half, half), (0, half))):
        yp = y[:, part[0][0]:part[0][0] + half]
        rec = f.conv_net_fwd_kinks(yp, *ps, 0.1, [])[3]  # a large band: records in most rows
        for mode in ("plain", "kinks", "kept", "buffers"):
            for need_x in (True, False):
                kinks = (0.1, tuple(rec)) if mode == "kinks" else None
                kept = f.conv_net_fwd(yp, *ps) if mode == "kept" else None
                x0, gx0, g0 = _separate_reverse(y, gy, gld, ps, part, scale, clamp, kinks, kept, need_x)
                acts = list(kept) if kept is not None else []
                if mode == "buffers":
                    acts = [torch.full_like(kept_t, float("nan")) for kept_t in f.conv_net_fwd(yp, *ps)]
                dst = [torch.full_like(p, float("nan")) for p in ps]
                x, gx = f.glow_coupling_reverse(y, gy, gld, *ps, part[0][0], half, part[1][0], half, scale, clamp,
                                                kinks[0] if kinks else 0.0, list(kinks[1]) if kinks else [], acts,
                                                mode == "buffers", need_x, dst)
                assert torch.equal(x, x0), (mode, need_x)
                if need_x:
                    assert torch.equal(gx, gx0), (mode, need_x)
                else:
                    assert gx.numel() == 0
                for a, b in zip(dst, g0):
                    assert torch.equal(a, b), (mode, need_x)


@needs_cpp
def test_glow_coupling_reverse_checks_its_arguments():
    ps = [p.detach() for p in make(2, 4, 8)]
    y, gld = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    dst = [torch.empty_like(p) for p in ps]
    f = torch.ops.flowops

    def call(y=y, gy=None, part=(0, 2, 2, 2), kinks=(), acts=(), recompute=False, grads=dst):
        return f.glow_coupling_reverse(y, y if gy is None else gy, gld, *ps, *part, "sigmoid", 1.0, 1e-3,
                                       list(kinks), list(acts), recompute, True, list(grads))

    x, gx = call()
    assert x.shape == gx.shape == y.shape
    with pytest.raises(ValueError, match="must be \\[N, C, H, W\\]"):
        call(y=y[0], gy=y[0])
    with pytest.raises(ValueError, match="grad_y must have y's shape"):
        call(gy=y[:1])
    with pytest.raises(ValueError, match="split y's 4 channels"):
        call(part=(0, 2, 1, 2))
    with pytest.raises(ValueError, match="split y's 4 channels"):
        call(part=(0, 2, 2, 1))
    with pytest.raises(ValueError, match="grads must be six tensors"):
        call(grads=dst[:5])
    with pytest.raises(ValueError, match="acts must be empty or"):
        call(acts=[y])
    with pytest.raises(ValueError, match="acts\\[1\\] must be contiguous"):
        cond, h1, h2 = f.conv_net_fwd(y[:, :2], *ps)
        call(acts=[cond, h1[:1], h2])
    rec = f.conv_net_fwd_kinks(y[:, :2], *ps, 1e-3, [])[3]
    with pytest.raises(ValueError, match="not to kept activations"):
        call(kinks=rec, acts=f.conv_net_fwd(y[:, :2], *ps))
    with pytest.raises(ValueError, match="four tensors"):
        call(kinks=rec[:2])
    with pytest.raises(ValueError, match="params must have"):
        f.glow_coupling_reverse(y, y, gld, *ps, 0, 2, 2, 2, "additive", 1.0, 0.0, [], [], False, True, dst)


@needs_cpp
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(3, 12, 8, 8, 32), (2, 6, 5, 3, 20), (0, 4, 4, 4, 8), (1, 2, 1, 1, 4),
                                   (2, 24, 4, 4, 130)])
@pytest.mark.parametrize("scale", ["sigmoid", "softclamp", "exp", "additive"])
def test_glow_coupling_reverse_matches_its_reference(dtype, rtol, shape, scale):
    """glow_coupling_reverse (plain recomputation) against flowops.reference.conv_net.glow_coupling_reverse: the
    rebuilt input, its gradient and the six conditioner gradients (autograd through F.conv2d and the reference
    coupling), both channel orders. (The op computes gradients itself and has no backward, so there is no
    gradcheck of it; its other modes equal this one bit for bit, test above.)"""
    from flowops.reference.conv_net import glow_coupling_reverse as reference

    n, c, h, w, k = shape
    half = c // 2
    clamp = 2.0
    o = half if scale == "additive" else 2 * half
    ps = [p.detach() for p in make(half, o, k, dtype, scale=0.2)]
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    gy, gld = torch.randn_like(y), torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    for part in ((0, half, half, half), (half, half, 0, half)):
        want = reference(y, gy, gld, *ps, *part, scale, clamp)
        dst = [torch.full_like(p, float("nan")) for p in ps]
        x, gx = torch.ops.flowops.glow_coupling_reverse(y, gy, gld, *ps, *part, scale, clamp, 0.0, [], [], False,
                                                        True, dst)
        for got, ref in zip((x, gx, *dst), want):
            assert got.shape == ref.shape and got.dtype == ref.dtype
            if ref.numel():
                assert_close(got, ref, rtol)
            else:
                assert not got.numel() or not got.any()
