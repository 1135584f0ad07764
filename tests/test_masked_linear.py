"""flowops.ops.masked_linear against F.linear(x, weight * mask, bias): outputs, all gradients,
gradcheck, opcheck, torch.compile, the Triton kernels under the interpreter, bad inputs."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import flowops
from flowops import reference
from flowops.ops import masked_linear
from flowops.ops.masked_linear import BLOCK, staircase_plan
from flowops.reference.made import degree_mask, hidden_degrees

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

# (batch, in, out, strict, degree kind)
CASES = [
    (1, 1, 1, True, "sorted"),
    (1, 1, 1, False, "sorted"),
    (3, 7, 11, False, "sorted"),
    (5, 13, 2 * BLOCK + 3, True, "sorted"),       # several output blocks, a short last one
    (17, 300, 129, False, "sorted"),
    (2, 31, 37, True, "made"),                     # MADE hidden -> output layer
    (4, 23, 29, False, "unsorted"),                # falls back to the dense mask
    (0, 9, 10, False, "sorted"),                   # empty batch
]


def make_case(b, i, o, strict, kind, dtype, bias=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(b, i, dtype=dtype, generator=g)
    w = torch.randn(o, i, dtype=dtype, generator=g)
    bb = torch.randn(o, dtype=dtype, generator=g) if bias else None
    if kind == "made":
        d = 9
        di = hidden_degrees(d, i)
        do = torch.arange(1, d + 1).repeat_interleave(2)[:o] if o <= 2 * d else \
            torch.sort(torch.randint(1, d + 1, (o,), generator=g)).values
    else:
        di = torch.randint(1, 8, (i,), generator=g)
        do = torch.randint(1, 8, (o,), generator=g)
        if kind == "sorted":
            di, do = torch.sort(di).values, torch.sort(do).values
    return x, w, bb, di, do


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}to{c[2]}-{'strict' if c[3] else 'le'}-{c[4]}"
                                             for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(case, dtype, bias):
    b, i, o, strict, kind = case
    x, w, bb, di, do = make_case(b, i, o, strict, kind, dtype, bias)
    leaves = [t.requires_grad_() for t in (x, w) + ((bb,) if bias else ())]
    y = masked_linear(x, w, bb, di, do, strict)
    mask = degree_mask(di, do, strict).to(dtype)
    y_ref = F.linear(x, w * mask, bb)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    gy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, leaves, gy)
    grads_ref = torch.autograd.grad(y_ref, leaves, gy)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, **TOL[dtype])
    # the weight gradient is zero outside the connectivity, exactly
    assert torch.all(grads[1][mask == 0] == 0)


def test_plan_skips_zero_tiles():
    di = hidden_degrees(64, 1024)
    do = hidden_degrees(64, 1024)
    plan = staircase_plan(di, do, strict=False)
    assert len(plan) == 1024 // BLOCK
    area = sum((o1 - o0) * p1 for o0, o1, p0, p1 in plan)
    dense = int(degree_mask(di, do, False).sum())
    assert dense <= area < 0.6 * 1024 * 1024  # about half the dense work
    for o0, o1, p0, p1 in plan:
        m = degree_mask(di, do, False)[o0:o1]
        assert torch.all(m[:, :p0] == 1) and torch.all(m[:, p1:] == 0)


def test_gradcheck_float64():
    x, w, bb, di, do = make_case(3, 6, BLOCK + 5, True, "sorted", torch.float64)
    x.requires_grad_(), w.requires_grad_(), bb.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b_, c: masked_linear(a, b_, c, di, do, True), (x, w, bb))


def test_reference_backend_matches():
    x, w, bb, di, do = make_case(4, 20, 30, False, "sorted", torch.float64)
    with flowops.use_backend("reference"):
        y_ref = masked_linear(x, w, bb, di, do, False)
    torch.testing.assert_close(masked_linear(x, w, bb, di, do, False), y_ref)
    torch.testing.assert_close(y_ref, reference.masked_linear(x, w, bb, di, do, False))


def test_opcheck():
    x, w, bb, di, do = make_case(5, 12, 14, True, "sorted", torch.float32)
    for req in (False, True):
        args = (x.clone().requires_grad_(req), w.clone().requires_grad_(req), bb.clone().requires_grad_(req),
                di, do, True)
        torch.library.opcheck(torch.ops.flowops.masked_linear.default, args)


def test_double_backward_raises():
    x, w, bb, di, do = make_case(3, 5, 6, False, "sorted", torch.float64)
    x.requires_grad_()
    y = masked_linear(x, w, bb, di, do, False)
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    # the reference backend gives higher derivatives
    with flowops.use_backend("reference"):
        y = masked_linear(x, w, bb, di, do, False)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        assert g.requires_grad


def test_compile_fullgraph():
    x, w, bb, di, do = make_case(8, 10, 12, True, "sorted", torch.float32)
    w.requires_grad_()
    fn = torch.compile(lambda a, b_, c: masked_linear(a, b_, c, di, do, True), fullgraph=True, backend="eager")
    y = fn(x, w, bb)
    torch.testing.assert_close(y, reference.masked_linear(x, w, bb, di, do, True))
    y.sum().backward()
    assert w.grad is not None


def test_nan_propagates_per_sample():
    x, w, bb, di, do = make_case(4, 8, 9, False, "sorted", torch.float32)
    di = torch.ones_like(di)  # every output sees every input
    x[2, 3] = float("nan")
    y = masked_linear(x, w, bb, di, do, False)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("bad", ["x1d", "wshape", "wdtype", "degdtype", "degshape", "biasshape", "notensor"])
def test_bad_inputs(bad):
    x, w, bb, di, do = make_case(3, 5, 6, False, "sorted", torch.float32)
    args = dict(x=x, weight=w, bias=bb, in_degrees=di, out_degrees=do)
    err = ValueError
    if bad == "x1d":
        args["x"] = x[0]
    elif bad == "wshape":
        args["weight"] = w[:, :4]
    elif bad == "wdtype":
        args["weight"], err = w.double(), TypeError
    elif bad == "degdtype":
        args["in_degrees"], err = di.float(), TypeError
    elif bad == "degshape":
        args["out_degrees"] = do[:5]
    elif bad == "biasshape":
        args["bias"] = bb[:2]
    elif bad == "notensor":
        args["x"], err = x.tolist(), TypeError
    with pytest.raises(err, match="masked_linear"):
        masked_linear(**args)


# ---- the CPU staircase: rectangle cover (forward), column blocks (grad_x, grad_weight) -------------------
def test_rect_cover_is_an_exact_disjoint_cover():
    from flowops.ops.masked_linear import _rect_cover

    g = torch.Generator().manual_seed(3)
    for n_out, leaf in ((1, 4), (7, 2), (64, 64), (100, 8), (257, 16), (1024, 64)):
        pre = torch.sort(torch.randint(0, 90, (n_out,), generator=g)).values
        pre[n_out // 2:] = torch.clamp(pre[n_out // 2:], min=40)  # a flat stretch: long equal prefixes
        pre = pre.tolist()
        n_in = max(pre) + 3
        mask = torch.arange(n_in).reshape(1, -1) < torch.tensor(pre).reshape(-1, 1)
        count = torch.zeros(n_out, n_in, dtype=torch.int64)
        for o0, o1, c0, c1, masked in _rect_cover(pre, leaf):
            assert 0 <= o0 < o1 <= n_out and 0 <= c0 < c1 <= n_in
            count[o0:o1, c0:c1] += 1
            if masked:
                assert o1 - o0 <= leaf
            else:  # full rectangles lie inside the connectivity
                assert bool(mask[o0:o1, c0:c1].all())
        assert int(count.max()) == 1  # disjoint
        assert bool((count[mask] == 1).all())  # covers every connection
        # the covered area is the area of leaf-row blocks (each leaf up to its last row's prefix)
        blocks = sum((min(o + leaf, n_out) - o) * pre[min(o + leaf, n_out) - 1] for o in range(0, n_out, leaf))
        assert int(count.sum()) == blocks


@pytest.mark.parametrize("leaf,gw_block,block", [(2, 3, 4), (64, 256, 128), (1, 1, 1), (5, 512, 7)])
@pytest.mark.parametrize("strict", [False, True])
def test_cpu_paths_with_small_blocks(monkeypatch, leaf, gw_block, block, strict):
    """Many leaves, column blocks with no connected output (strict, high in-degrees), blocks
    fully connected, short last blocks; outputs and gradients against the dense mask."""
    mod = importlib.import_module("flowops.ops.masked_linear")
    monkeypatch.setattr(mod, "FWD_LEAF", leaf)
    monkeypatch.setattr(mod, "GW_BLOCK", gw_block)
    monkeypatch.setattr(mod, "BLOCK", block)
    monkeypatch.setattr(mod, "_PLANS", {})
    g = torch.Generator().manual_seed(11)
    b, n_in, n_out = 6, 47, 53
    di = torch.sort(torch.randint(1, 10, (n_in,), generator=g)).values
    do = torch.sort(torch.randint(1, 10, (n_out,), generator=g)).values
    di[-5:] = 10  # no output sees these inputs (both modes)
    do[:4] = 1  # these outputs see little (nothing in strict mode)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(b, n_in, dtype=dtype, generator=g).requires_grad_()
        w = torch.randn(n_out, n_in, dtype=dtype, generator=g).requires_grad_()
        bb = torch.randn(n_out, dtype=dtype, generator=g).requires_grad_()
        y = masked_linear(x, w, bb, di, do, strict)
        mask = degree_mask(di, do, strict).to(dtype)
        y_ref = F.linear(x, w * mask, bb)
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        gy = torch.randn(b, n_out, dtype=dtype, generator=g)
        grads = torch.autograd.grad(y, (x, w, bb), gy)
        for got, want in zip(grads, torch.autograd.grad(y_ref, (x, w, bb), gy)):
            torch.testing.assert_close(got, want, **TOL[dtype])
        assert torch.all(grads[1][mask == 0] == 0)  # exactly zero outside the connectivity
        assert torch.all(grads[0][:, -5:] == 0)  # inputs no output sees
        # gradient of the weight only: the other buffers are not needed
        (gw,) = torch.autograd.grad(masked_linear(x.detach(), w, None, di, do, strict), (w,), gy)
        torch.testing.assert_close(gw, grads[1], **TOL[dtype])


def test_cpu_backward_writes_every_element():
    """The CPU backward fills uninitialized buffers: poison the allocator's recycled memory with
    NaN first and check that no NaN reaches the gradients."""
    di = hidden_degrees(16, 300)
    do = hidden_degrees(16, 290)
    x = torch.randn(33, 300).requires_grad_()
    w = torch.randn(290, 300).requires_grad_()
    for _ in range(3):
        junk = torch.full((300 * 300,), float("nan"))
        del junk
        gx, gw = torch.autograd.grad(masked_linear(x, w, None, di, do, True), (x, w), torch.randn(33, 290))
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
        mask = degree_mask(di, do, True)
        assert torch.all(gw[~mask] == 0)


# ---- Triton kernels (CPU under TRITON_INTERPRET=1; CUDA when present) -------------------------------------
triton_ok = True
try:
    import triton  # noqa: F401
except Exception:  # pragma: no cover
    triton_ok = False
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() and not INTERPRET else [])


@pytest.mark.skipif(not triton_ok or not DEVICES, reason="needs triton with TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(3, 5, 7, False), (4, 37, 41, True), (1, 70, 20, False), (0, 4, 5, True)])
def test_triton_kernels(case, device):
    from flowops.kernels import masked_linear as K

    b, i, o, strict = case
    x, w, bb, di, do = make_case(b, i, o, strict, "sorted", torch.float32)
    x, w, bb, di, do = (t.to(device) for t in (x, w, bb, di, do))
    y = K.masked_linear_fwd(x, w, bb, di, do, strict)
    mask = degree_mask(di, do, strict).float()
    torch.testing.assert_close(y, F.linear(x, w * mask, bb), rtol=1e-4, atol=1e-4)
    gy = torch.randn(b, o, device=device)
    gx, gw, gb = K.masked_linear_bwd(gy, x, w, di, do, strict, True, True, True)
    torch.testing.assert_close(gx, gy @ (w * mask), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, (gy.t() @ x) * mask, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, gy.sum(0), rtol=1e-4, atol=1e-4)
    assert torch.all(gw[mask == 0] == 0)


@pytest.mark.skipif(not triton_ok or not INTERPRET, reason="needs triton with TRITON_INTERPRET=1")
def test_triton_backend_through_op():
    x, w, bb, di, do = make_case(3, 9, 10, True, "sorted", torch.float32)
    w.requires_grad_()
    with flowops.use_backend("triton"):
        y = masked_linear(x, w, bb, di, do, True)
        y.square().sum().backward()
    w2 = w.detach().clone().requires_grad_()
    y2 = reference.masked_linear(x, w2, bb, di, do, True)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)
