"""Correctness of the fused coupling op (flowops.ops.affine_coupling / additive_coupling).

Every CPU backend is compared against flowops.reference: outputs, inverse and every gradient
(x and params) under the same random upstream gradients for y and the log-det. The Triton kernels
have their own test file.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import flowops
from flowops import _backend, ops, reference
from flowops.train import num_threads

BACKENDS = ["reference"] + (["cpp"] if _backend.has_cpp() else [])
SCALES = ["exp", "softclamp", "sigmoid"]
KINDS = SCALES + ["additive"]  # "additive" = additive_coupling (the shift alone)

# dtype -> (rtol, atol) for y and every gradient; the log-det, a sum over a row, scales its atol
# with sqrt(row length).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}

# Per-sample shapes. AVX512 holds 16 floats / 8 doubles, so rows shorter than that take the C++
# "tile" path (vectorized across samples) and rows longer than 16384 are split into chunks.
SHAPES = [
    (1, 1),            # batch 1, one feature
    (1, 7),            # batch 1, tile path
    (3, 5),            # primes, tile path
    (7, 13),           # primes, tile path for float32, row path with a tail for float64
    (17, 15),          # more samples than a tile of lanes, 15 < 16
    (2, 16),           # exactly one float32 vector
    (5, 31),           # row path with a tail
    (3, 3, 5, 7),      # image NCHW, primes
    (2, 1, 1, 1),      # image of one pixel
    (1, 2, 3, 3),      # image, batch 1
    (2, 16411),        # prime N > 16384: two chunks, the second a short tail
    (3, 2, 3, 2741),   # image with N = 16446 > 16384
]


def _call(kind, x, params, inverse=False, mask=None, clamp=1.5):
    if kind == "additive":
        return ops.additive_coupling(x, params, inverse=inverse, mask=mask)
    return ops.affine_coupling(x, params, scale=kind, clamp=clamp, inverse=inverse, mask=mask)


def _ref(kind, x, params, inverse=False, mask=None, clamp=1.5):
    if kind == "additive":
        return reference.additive_coupling(x, params, inverse=inverse, mask=mask)
    return reference.affine_coupling(x, params, scale=kind, clamp=clamp, inverse=inverse, mask=mask)


def _params_shape(kind, shape):
    factor = 1 if kind == "additive" else 2
    return (shape[0], factor * shape[1], *shape[2:])


def _inputs(kind, shape, dtype, masked, gen=None):
    x = torch.randn(shape, dtype=dtype, generator=gen)
    params = torch.randn(_params_shape(kind, shape), dtype=dtype, generator=gen)
    mask = None
    if masked:
        mask = (torch.rand(shape[1:], generator=gen) < 0.5).to(dtype)
        flat = mask.view(-1)
        flat[0] = 1.0  # at least one pass-through position
        if flat.numel() > 1:
            flat[-1] = 0.0  # and at least one transformed one
    return x, params, mask


def _grads(outputs, inputs, upstream):
    """Gradients of sum(output * upstream) w.r.t. inputs; zeros for an input nothing depends on."""
    pairs = [(o, g) for o, g in zip(outputs, upstream) if o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, got)]


def _assert_close(got, want, dtype, n=1, what=""):
    rtol, atol = TOL[dtype]
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * math.sqrt(max(n, 1)), msg=lambda m: f"{what}: {m}")


def _run_both(backend, kind, x, params, mask, inverse, gy, gld, clamp=1.5):
    """(y, logdet, grad_x, grad_params) of the op on ``backend`` and of the reference."""
    results = []
    for use_op in (True, False):
        xx = x.detach().requires_grad_(True)
        pp = params.detach().requires_grad_(True)
        if use_op:
            with flowops.use_backend(backend):
                y, ld = _call(kind, xx, pp, inverse, mask, clamp)
        else:
            y, ld = _ref(kind, xx, pp, inverse, mask, clamp)
        gx, gp = _grads((y, ld), (xx, pp), (gy, gld))
        results.append((y.detach(), ld.detach(), gx, gp))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_reference(backend, dtype, shape, kind, inverse, masked):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind, inverse, masked)).encode()))
    x, params, mask = _inputs(kind, shape, dtype, masked, gen)
    gy = torch.randn(shape, dtype=dtype, generator=gen)
    gld = torch.randn(shape[0], dtype=dtype, generator=gen)
    (y, ld, gx, gp), (ry, rld, rgx, rgp) = _run_both(backend, kind, x, params, mask, inverse, gy, gld)
    n = x[0].numel()
    _assert_close(y, ry, dtype, what="y")
    _assert_close(ld, rld, dtype, n=n, what="logdet")
    _assert_close(gx, rgx, dtype, what="grad x")
    _assert_close(gp, rgp, dtype, what="grad params")
    assert ld.shape == (shape[0],)
    if masked:
        keep = mask.bool().expand_as(x)
        assert torch.equal(y[keep], x[keep]), "masked positions must pass through unchanged"
        pkeep = keep if kind == "additive" else torch.cat([keep, keep], dim=1)
        assert torch.all(gp[pkeep] == 0), "params of pass-through positions must get zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_really_dispatches(backend):
    """Guards the comparison above against silently testing the reference against itself."""
    x = torch.randn(3, 4, requires_grad=True)
    p = torch.randn(3, 8, requires_grad=True)
    with flowops.use_backend(backend):
        y, _ = ops.affine_coupling(x, p)
    name = y.grad_fn.name()
    if backend == "cpp":
        assert "AffineCouplingFn" in name, name
    else:
        assert "AffineCouplingFn" not in name, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clamp", [0.5, 3.0])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_softclamp_clamps(backend, clamp, inverse):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 37, dtype=torch.float64, generator=gen)
    p = 4 * torch.randn(6, 74, dtype=torch.float64, generator=gen)  # large raw scales: the clamp matters
    gy, gld = torch.randn_like(x), torch.randn(6, dtype=torch.float64)
    (y, ld, gx, gp), (ry, rld, rgx, rgp) = _run_both(backend, "softclamp", x, p, None, inverse, gy, gld, clamp)
    for got, want, what in ((y, ry, "y"), (ld, rld, "logdet"), (gx, rgx, "grad x"), (gp, rgp, "grad params")):
        _assert_close(got, want, torch.float64, n=37, what=what)
    # |log s| <= clamp at every position
    assert torch.all(ld.abs() <= 37 * clamp + 1e-9)
    with flowops.use_backend(backend):
        _, ld_other = ops.affine_coupling(x, p, "softclamp", clamp=2 * clamp, inverse=inverse)
    assert not torch.allclose(ld, ld_other), "clamp must change the result"


@pytest.mark.parametrize("kind", SCALES)
def test_reference_scale_maps(kind):
    """The oracle itself against the closed forms of the design (s = exp(raw), exp(c tanh(raw/c)), sigmoid(raw+2))."""
    x = torch.randn(4, 6, dtype=torch.float64)
    p = torch.randn(4, 12, dtype=torch.float64)
    raw, t = p[:, :6], p[:, 6:]
    s = {"exp": raw.exp(), "softclamp": (1.5 * torch.tanh(raw / 1.5)).exp(), "sigmoid": torch.sigmoid(raw + 2)}[kind]
    y, ld = reference.affine_coupling(x, p, kind, 1.5)
    torch.testing.assert_close(y, x * s + t)
    torch.testing.assert_close(ld, s.log().sum(1))
    xi, ldi = reference.affine_coupling(x, p, kind, 1.5, inverse=True)
    torch.testing.assert_close(xi, (x - t) / s)
    torch.testing.assert_close(ldi, -s.log().sum(1))


# --------------------------------------------------------------------------- layouts


def _check_layout(backend, kind, x, params, mask=None, inverse=False):
    dtype = x.dtype
    gy = torch.randn(x.shape, dtype=dtype)
    gld = torch.randn(x.shape[0], dtype=dtype)
    (y, ld, gx, gp), (ry, rld, rgx, rgp) = _run_both(backend, kind, x, params, mask, inverse, gy, gld)
    n = x[0].numel()
    _assert_close(y, ry, dtype, what="y")
    _assert_close(ld, rld, dtype, n=n, what="logdet")
    _assert_close(gx, rgx, dtype, what="grad x")
    _assert_close(gp, rgp, dtype, what="grad params")
    # and the same values as on contiguous copies
    (cy, cld, cgx, cgp), _ = _run_both(backend, kind, x.contiguous(), params.contiguous(), mask, inverse, gy, gld)
    _assert_close(y, cy, dtype, what="y vs contiguous")
    _assert_close(gp, cgp, dtype, what="grad params vs contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_channel_slice_view(backend, kind, inverse):
    """x as a channel slice x[:, k:] of a bigger tensor (the split of a coupling layer), vector and image."""
    for full_shape, k in (((5, 11), 4), ((3, 7, 5, 3), 2), ((2, 40), 3)):
        full = torch.randn(full_shape)
        x = full[:, k:]
        assert not x.is_contiguous()
        params = torch.randn(_params_shape(kind, x.shape))
        _check_layout(backend, kind, x, params, inverse=inverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_noncontiguous_params(backend, kind, masked):
    """Transposed params, params sliced from a wider conditioner output, expanded params, strided x."""
    c = 6
    factor = 1 if kind == "additive" else 2
    mask = (torch.arange(c) % 3 == 0).float() if masked else None
    x = torch.randn(5, c)
    transposed = torch.randn(factor * c, 5).t()
    assert not transposed.is_contiguous()
    _check_layout(backend, kind, x, transposed, mask)
    sliced = torch.randn(5, factor * c + 3)[:, 3:]
    _check_layout(backend, kind, x, sliced, mask)
    expanded = torch.randn(1, factor * c).expand(5, factor * c)
    _check_layout(backend, kind, x, expanded, mask)
    # image: params in channels_last, x strided along width
    xi = torch.randn(2, 3, 4, 10)[..., ::2]
    pi = torch.randn(2, factor * 3, 4, 5).to(memory_format=torch.channels_last)
    mi = (torch.rand(3, 4, 5) < 0.5).float() if masked else None
    _check_layout(backend, kind, xi, pi, mi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_dtypes(backend):
    """bool, integer and float masks (any nonzero value passes through) give the same result."""
    x = torch.randn(4, 9)
    p = torch.randn(4, 18)
    m_bool = torch.rand(9) < 0.5
    with flowops.use_backend(backend):
        want = ops.affine_coupling(x, p, "exp", mask=m_bool.float())
        for m in (m_bool, m_bool.long(), 2.5 * m_bool.float(), m_bool.double()):
            got = ops.affine_coupling(x, p, "exp", mask=m)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), m.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_logdet_dtype_half(backend):
    """Half-precision inputs return a float32 log-det and a y of the input dtype on every backend."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(3, 8).to(dtype)
        p = torch.randn(3, 16).to(dtype)
        with flowops.use_backend(backend):
            y, ld = ops.affine_coupling(x, p, "softclamp")
        ry, rld = reference.affine_coupling(x, p, "softclamp")
        assert y.dtype == dtype and ld.dtype == torch.float32
        torch.testing.assert_close(y, ry)
        torch.testing.assert_close(ld, rld)


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", [(2, 3), (2, 2, 2, 3)], ids=["vec", "img"])
def test_gradcheck(backend, kind, inverse, masked, shape):
    x, params, mask = _inputs(kind, shape, torch.float64, masked)
    x.requires_grad_(True)
    params.requires_grad_(True)

    def fn(a, b):
        with flowops.use_backend(backend):
            y, ld = _call(kind, a, b, inverse, mask)
        return (y, ld) if ld.requires_grad else y

    assert torch.autograd.gradcheck(fn, (x, params))


def _brute_logdet(fn, x):
    """log|det J| of the map x[0] -> y[0] of a single-sample input, by autograd jacobian + slogdet."""
    shape = x.shape

    def flat(v):
        return fn(v.reshape(shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", [(1, 5), (1, 2, 3, 2)], ids=["vec", "img"])
def test_logdet_brute_force(backend, kind, inverse, masked, shape):
    x, params, mask = _inputs(kind, shape, torch.float64, masked)

    def fn(v):
        with flowops.use_backend(backend):
            return _call(kind, v, params, inverse, mask)

    _, ld = fn(x)
    torch.testing.assert_close(ld[0], _brute_logdet(fn, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 5, 7), (2, 16411)], ids=["vec", "img", "long"])
def test_inverse_round_trip(backend, dtype, kind, masked, shape):
    x, params, mask = _inputs(kind, shape, dtype, masked)
    rtol, atol = TOL[dtype]
    with flowops.use_backend(backend):
        y, ld = _call(kind, x, params, False, mask)
        x_back, ld_back = _call(kind, y, params, True, mask)
        # and the other way round
        z, ld_z = _call(kind, x, params, True, mask)
        x_fwd, ld_fwd = _call(kind, z, params, False, mask)
    scale = 100 * rtol  # exp(raw) up to ~e^4 amplifies rounding
    torch.testing.assert_close(x_back, x, rtol=scale, atol=scale)
    torch.testing.assert_close(x_fwd, x, rtol=scale, atol=scale)
    tol = atol * math.sqrt(x[0].numel()) * 10
    torch.testing.assert_close(ld + ld_back, torch.zeros_like(ld), rtol=0, atol=tol)
    torch.testing.assert_close(ld_z + ld_fwd, torch.zeros_like(ld), rtol=0, atol=tol)
    if kind == "additive":
        assert torch.all(ld == 0)
    else:
        assert torch.all(ld != 0)


@pytest.mark.parametrize("path", BACKENDS + ["registered_fwd_op"])
@pytest.mark.parametrize("kind", ["softclamp", "additive"])
def test_double_backward(path, kind):
    """Second-order gradients (gradient penalties, Hessian-vector products) either equal the
    reference's or raise; they must never be silently dropped or zero."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    p = torch.randn(_params_shape(kind, (3, 4)), dtype=torch.float64, generator=gen)

    def second_order(use):
        xx, pp = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        if use == "registered_fwd_op":
            y, ld = torch.ops.flowops.affine_coupling_fwd(xx, pp, None, kind, 1.5, False)
        elif use == "ref":
            y, ld = _ref(kind, xx, pp)
        else:
            with flowops.use_backend(use):
                y, ld = _call(kind, xx, pp)
        first = (y ** 3).sum() + (ld.sum() if ld.requires_grad else 0)
        gx, = torch.autograd.grad(first, xx, create_graph=True)
        penalty = (gx ** 2).sum() + pp.sum()
        penalty.backward()
        return pp.grad

    want = second_order("ref")
    try:
        got = second_order(path)
    except RuntimeError:
        return  # a clear error is acceptable
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- registration


_OPCHECK_CASES = [("softclamp", False, False), ("exp", True, True), ("sigmoid", False, True), ("additive", True, False)]


def _op_args(kind, masked):
    x = torch.randn(3, 5, dtype=torch.float64)
    p = torch.randn(3, (1 if kind == "additive" else 2) * 5, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64) if masked else None
    return x, p, mask


@pytest.mark.parametrize("kind,inverse,masked", _OPCHECK_CASES)
def test_opcheck_fwd(kind, inverse, masked):
    x, p, mask = _op_args(kind, masked)
    args = (x.requires_grad_(True), p.requires_grad_(True), mask, kind, 1.5, inverse)
    torch.library.opcheck(torch.ops.flowops.affine_coupling_fwd, args)


@pytest.mark.parametrize("kind,inverse,masked", _OPCHECK_CASES)
def test_opcheck_bwd(kind, inverse, masked):
    x, p, mask = _op_args(kind, masked)
    args = (torch.randn_like(x), torch.randn(3, dtype=x.dtype), x, p, mask, kind, 1.5, inverse)
    torch.library.opcheck(torch.ops.flowops.affine_coupling_bwd, args)


@pytest.mark.skipif(not _backend.has_cpp(), reason="flowops._C not built")
@pytest.mark.parametrize("kind,inverse,masked", _OPCHECK_CASES)
def test_opcheck_cpp_autograd_op(kind, inverse, masked):
    x, p, mask = _op_args(kind, masked)
    args = (x.requires_grad_(True), p.requires_grad_(True), mask, kind, 1.5, inverse)
    torch.library.opcheck(torch.ops.flowops.affine_coupling, args)


@pytest.mark.parametrize("kind,inverse,masked", _OPCHECK_CASES)
def test_registered_ops_match_reference(kind, inverse, masked):
    """The registered fwd/bwd ops (flattened mask) compute what the reference computes."""
    x, p, mask = _op_args(kind, masked)
    y, ld = torch.ops.flowops.affine_coupling_fwd(x, p, mask, kind, 1.5, inverse)
    m = None if mask is None else mask.reshape(5)
    ry, rld = _ref(kind, x, p, inverse, m)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(ld, rld)
    gy, gld = torch.randn_like(x), torch.randn(3, dtype=x.dtype)
    gx, gp = torch.ops.flowops.affine_coupling_bwd(gy, gld, x, p, mask, kind, 1.5, inverse)
    xx, pp = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    rgx, rgp = _grads(_ref(kind, xx, pp, inverse, m), (xx, pp), (gy, gld))
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gp, rgp)


# --------------------------------------------------------------------------- bad input


def _raises(exc, words, fn):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in error message: {msg}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x, p = torch.randn(3, 4), torch.randn(3, 8)
    with flowops.use_backend(backend):
        _raises(ValueError, ["params", "(3, 8)", "(3, 4)"], lambda: ops.affine_coupling(x, torch.randn(3, 4)))
        _raises(ValueError, ["params", "(2, 8)"], lambda: ops.affine_coupling(x, torch.randn(2, 8)))
        _raises(ValueError, ["params"], lambda: ops.affine_coupling(x, torch.randn(3, 8, 1)))
        _raises(TypeError, ["params", "float64"], lambda: ops.affine_coupling(x, p.double()))
        _raises(ValueError, ["params", "device", "meta"], lambda: ops.affine_coupling(x, p.to("meta")))
        _raises(TypeError, ["params"], lambda: ops.affine_coupling(x, 1.0))
        _raises(TypeError, ["x", "int64"], lambda: ops.affine_coupling(x.long(), p.long()))
        _raises(TypeError, ["x", "int32"], lambda: ops.affine_coupling(x.int(), p))
        _raises(TypeError, ["x"], lambda: ops.affine_coupling(x.numpy(), p))
        _raises(ValueError, ["x", "(4,)"], lambda: ops.affine_coupling(x[0], p[0]))
        _raises(ValueError, ["mask", "(4,)", "(3,)"], lambda: ops.affine_coupling(x, p, mask=torch.ones(3)))
        _raises(ValueError, ["mask", "(4,)", "(3, 4)"], lambda: ops.affine_coupling(x, p, mask=torch.ones(3, 4)))
        _raises(TypeError, ["mask"], lambda: ops.affine_coupling(x, p, mask=[1, 0, 1, 0]))
        _raises(ValueError, ["mask", "device"], lambda: ops.affine_coupling(x, p, mask=torch.ones(4, device="meta")))
        _raises(ValueError, ["scale", "'tanh'"], lambda: ops.affine_coupling(x, p, scale="tanh"))
        _raises(ValueError, ["scale"], lambda: ops.affine_coupling(x, p, scale="additive"))
        for clamp in (0.0, -1.0, float("nan"), float("inf")):
            _raises(ValueError, ["clamp"], lambda: ops.affine_coupling(x, p, scale="softclamp", clamp=clamp))
        # additive_coupling names its own argument, `shift`
        _raises(ValueError, ["shift", "(3, 4)"], lambda: ops.additive_coupling(x, p))
        _raises(TypeError, ["x"], lambda: ops.additive_coupling(x.long(), p[:, :4].long()))
        _raises(ValueError, ["mask"], lambda: ops.additive_coupling(x, p[:, :4], mask=torch.ones(5)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_shift(backend):
    """additive_coupling's second argument is called `shift`; its dtype/device errors must say so."""
    x, t = torch.randn(3, 4), torch.randn(3, 4)
    with flowops.use_backend(backend):
        _raises(TypeError, ["shift"], lambda: ops.additive_coupling(x, t.double()))
        _raises(ValueError, ["shift"], lambda: ops.additive_coupling(x, t.to("meta")))


@pytest.mark.skipif(not _backend.has_cpp(), reason="flowops._C not built")
def test_registered_op_rejects_bad_input():
    """The C++ kernels check their own arguments when called directly."""
    x, p = torch.randn(3, 4), torch.randn(3, 8)
    fwd = torch.ops.flowops.affine_coupling_fwd
    _raises(ValueError, ["scale", "'tanh'"], lambda: fwd(x, p, None, "tanh", 2.0, False))
    _raises(ValueError, ["params"], lambda: fwd(x, torch.randn(3, 6), None, "exp", 2.0, False))
    _raises(ValueError, ["mask"], lambda: fwd(x, p, torch.ones(5), "exp", 2.0, False))
    _raises(TypeError, ["dtype"], lambda: fwd(x, p.double(), None, "exp", 2.0, False))


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [5, 40, 16411], ids=["tile", "row", "chunked"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_nonfinite_propagates_to_that_sample_only(backend, n, inverse):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, n, generator=gen)
    p = torch.randn(5, 2 * n, generator=gen)
    x[1, 2] = float("nan")        # sample 1: NaN in x -> y NaN, log-det unaffected (depends on params only)
    p[2, 3] = float("inf")        # sample 2: Inf raw scale -> y and log-det non-finite
    p[3, n + 1] = float("nan")    # sample 3: NaN shift -> y NaN
    p[4, 0] = float("nan")        # sample 4: NaN raw scale -> y and log-det NaN
    xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    with flowops.use_backend(backend):
        y, ld = ops.affine_coupling(xr, pr, "exp", inverse=inverse)
    ry, rld = reference.affine_coupling(x, p, "exp", inverse=inverse)
    # inverse: (x - t) * exp(-inf) = 0 keeps sample 2 finite
    assert torch.isfinite(y).all(1).tolist() == [True, False, inverse, False, False]
    assert torch.isfinite(ry).all(1).tolist() == [True, False, inverse, False, False]
    assert torch.isfinite(ld).tolist() == [True, True, False, True, False]
    assert torch.isnan(ld[4])
    torch.testing.assert_close(y[0], ry[0])
    torch.testing.assert_close(ld[[0, 1, 3]], rld[[0, 1, 3]], atol=1e-5 * math.sqrt(n), rtol=1e-5)
    # backward runs and the clean sample's gradients stay finite
    (y.sum() + ld.sum()).backward()
    assert torch.isfinite(xr.grad[0]).all() and torch.isfinite(pr.grad[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_in_masked_positions_is_ignored(backend, kind):
    """params at pass-through positions are ignored, even when they are NaN."""
    x = torch.randn(3, 6)
    p = torch.randn(_params_shape(kind, (3, 6)))
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    p[:, 0] = float("nan")
    p[:, -1] = float("nan")  # shift of position 5 (masked) for both kinds
    p.requires_grad_(True)
    with flowops.use_backend(backend):
        y, ld = _call(kind, x, p, mask=mask)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    # ignored means ignored by the backward too: no NaN gradient leaks out of a pass-through position
    loss = y.sum() + (ld.sum() if ld.requires_grad else 0)
    loss.backward()
    assert torch.isfinite(p.grad).all(), p.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 4, 4)], ids=["vec", "img"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_empty_batch(backend, kind, shape, masked):
    x = torch.randn(shape, requires_grad=True)
    p = torch.randn(_params_shape(kind, shape), requires_grad=True)
    mask = torch.ones(shape[1:]) if masked else None
    with flowops.use_backend(backend):
        y, ld = _call(kind, x, p, mask=mask)
        assert y.shape == shape and ld.shape == (0,) and ld.dtype == x.dtype
        loss = y.sum() + (ld.sum() if ld.requires_grad else 0)
        loss.backward()
        x_back, _ = _call(kind, y.detach(), p.detach(), inverse=True, mask=mask)
    assert x.grad.shape == shape and p.grad.shape == p.shape
    assert x_back.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(33, 7), (5, 3, 9, 11), (3, 40000)], ids=["tile", "img", "chunked"])
def test_deterministic(backend, kind, shape):
    """Two calls give bitwise-identical outputs and gradients, also with a different thread count."""
    x, p, mask = _inputs(kind, shape, torch.float32, masked=False)
    gy, gld = torch.randn(shape), torch.randn(shape[0])

    def once():
        xx, pp = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        with flowops.use_backend(backend):
            y, ld = _call(kind, xx, pp)
        return [y.detach(), ld.detach(), *_grads((y, ld), (xx, pp), (gy, gld))]

    first = once()
    second = once()
    with num_threads(1):
        single = once()
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
