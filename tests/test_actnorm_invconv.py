"""The fused Glow op actnorm_invconv (ActNorm folded into the invertible 1x1 convolution).

Every backend (C++, Triton under the interpreter, the plain-torch registered kernels) against the
reference ActNorm-then-conv1x1 for outputs, inverse and all gradients; float64 gradcheck; log-dets
against brute-force Jacobians; gradients of the LU parameters through the fused path; opcheck;
torch.compile without graph breaks; GlowStep's fused path against its reference path; bad input.
"""
import importlib

import pytest
import torch
from torch.autograd.functional import jacobian

import flowops
from flowops import _backend
from flowops.nn import ActNorm, GlowStep, InvConv1x1
from flowops.ops import actnorm_invconv
from flowops.reference.actnorm_invconv import actnorm_invconv as ref_aic
from flowops.reference.actnorm_invconv import lu_inverse_weight_by_inv, lu_weight

AIC = importlib.import_module("flowops.ops.actnorm_invconv")
F64 = torch.float64
HAS_CPP = _backend.has_cpp() and AIC.HAS_CPP_OPS
HAS_TRITON = _backend.triton_interpreted() and _backend.has_triton()
BACKENDS = ["reference"] + (["cpp"] if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 5, 3), (3, 7), (4, 6, 2, 3, 2)]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), F64: dict(rtol=1e-9, atol=1e-9)}


def make_params(c, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=F64))
    w = q + 0.2 * torch.randn(c, c, generator=g, dtype=F64)
    ls = 0.3 * torch.randn(c, generator=g, dtype=F64)
    b = torch.randn(c, generator=g, dtype=F64)
    wld = torch.linalg.slogdet(w)[1]
    out = [t.to(dtype) for t in (ls, b, w, wld)]
    return [t.requires_grad_(requires_grad) for t in out]


def _run(backend, *args, **kw):
    with flowops.use_backend(backend):
        return actnorm_invconv(*args, **kw)


def _grads(y, ld, inputs, gy, gl):
    return torch.autograd.grad([y, ld], inputs, [gy, gl])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_matches_reference_outputs_and_all_gradients(backend, shape, inverse, dtype):
    c = shape[1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    params = make_params(c, dtype)
    inputs = [x, *params]
    y, ld = _run(backend, x, *params, inverse=inverse)
    yr, ldr = ref_aic(x, *params, inverse)
    assert y.shape == x.shape and ld.shape == (shape[0],) and ld.dtype == dtype
    torch.testing.assert_close(y, yr, **TOL[dtype])
    torch.testing.assert_close(ld, ldr, **TOL[dtype])
    gy, gl = torch.randn_like(y), torch.randn_like(ld)
    got = _grads(y, ld, inputs, gy, gl)
    want = _grads(yr, ldr, inputs, gy, gl)
    for name, a, b in zip(("x", "log_scale", "bias", "weight", "w_logdet"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck_float64(backend, inverse):
    x = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)
    params = make_params(3, F64)

    def fn(*a):
        with flowops.use_backend(backend):
            return actnorm_invconv(*a, inverse=inverse)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_logdet_brute_force_jacobian_and_roundtrip(backend, inverse):
    c = 3
    ls, b, w, _ = make_params(c, F64, requires_grad=False)
    wld = torch.linalg.slogdet(w)[1]
    weight = torch.linalg.inv(w) if inverse else w
    x = torch.randn(2, c, 2, 2, dtype=F64)
    y, ld = _run(backend, x, ls, b, weight, wld, inverse=inverse)
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        jac = jacobian(lambda v: _run(backend, v.reshape(xi.shape), ls, b, weight, wld, inverse=inverse)[0].flatten(),
                       xi.flatten())
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac)[1], rtol=1e-9, atol=1e-9)
    # the other direction with the other matrix undoes it, and the log-dets cancel
    back, ld_back = _run(backend, y, ls, b, w if inverse else torch.linalg.inv(w), wld, inverse=not inverse)
    torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld + ld_back, torch.zeros_like(ld), rtol=0, atol=1e-9)


def test_w_logdet_none_uses_slogdet():
    ls, b, w, wld = make_params(4, F64, requires_grad=False)
    x = torch.randn(3, 4, 5, dtype=F64)
    for backend in BACKENDS:
        for inverse, m in ((False, w), (True, torch.linalg.inv(w))):
            _, ld = _run(backend, x, ls, b, m, None, inverse=inverse)
            _, want = ref_aic(x, ls, b, m, wld, inverse)
            torch.testing.assert_close(ld, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_lu_and_actnorm_parameter_gradients_through_fused_op(backend, inverse):
    """The fused op fed by InvConv1x1's LU weight: gradients of lower/upper/log_s and ActNorm's parameters
    equal those of the reference sequence ActNorm then InvConv1x1 (inverse: InvConv1x1^-1 then ActNorm^-1)."""
    c = 5
    an, ic = ActNorm(c).double(), InvConv1x1(c).double()
    with torch.no_grad():
        for p in (*an.parameters(), *ic.parameters()):
            p.add_(0.2 * torch.randn_like(p))
    an.eval()
    x = torch.randn(3, c, 4, 3, dtype=F64)
    gy, gl = torch.randn_like(x), torch.randn(3, dtype=F64)
    params = [an.log_scale, an.bias, ic.lower, ic.upper, ic.log_s]
    with flowops.use_backend(backend):
        weight = ic.inverse_weight() if inverse else ic.weight()
        y, ld = actnorm_invconv(x, an.log_scale, an.bias, weight, ic.log_s.sum(), inverse=inverse)
    got = torch.autograd.grad([y, ld], params, [gy, gl])
    with flowops.use_backend("reference"):
        if inverse:
            h, l1 = ic.inverse(x)
            yr, l2 = an.inverse(h)
        else:
            h, l1 = an(x)
            yr, l2 = ic(h)
    ldr = l1 + l2
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ldr, rtol=1e-10, atol=1e-10)
    want = torch.autograd.grad([yr, ldr], params, [gy, gl])
    for name, a, b in zip(("log_scale", "bias", "lower", "upper", "log_s"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def test_opcheck():
    x = torch.randn(3, 4, 2, 5)
    params = make_params(4, torch.float32)
    for inverse in (False, True):
        args = (x.clone().requires_grad_(), *params, inverse)
        torch.library.opcheck(torch.ops.flowops.actnorm_invconv_fwd.default, args)
        gy, gl = torch.randn_like(x), torch.randn(3)
        torch.library.opcheck(torch.ops.flowops.actnorm_invconv_bwd.default,
                              (gy, gl, x, *[p.detach() for p in params], inverse))
        if HAS_CPP:
            torch.library.opcheck(torch.ops.flowops.actnorm_invconv.default, args,
                                  test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_higher_order_raises(backend):
    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    params = make_params(3, F64)
    y, ld = _run(backend, x, *params)
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad((y ** 2).sum() + ld.sum(), x, create_graph=True)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    params = make_params(3, torch.float32)

    def fn(x, ls, b, w, wld):
        y, ld = actnorm_invconv(x, ls, b, w, wld)
        z, ld2 = actnorm_invconv(y, ls, b, torch.linalg.inv(w), wld, inverse=True)
        return (z * y).sum() + ld.sum() + ld2.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, *params)
    want = fn(x, *params)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, [x, *params])
    ref = torch.autograd.grad(want, [x, *params])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_nan_propagation(backend):
    params = make_params(3, F64)
    x = torch.zeros(0, 3, 4, 2, dtype=F64, requires_grad=True)
    y, ld = _run(backend, x, *params)
    assert y.shape == x.shape and ld.shape == (0,)
    grads = torch.autograd.grad([y, ld], [x, *params], [torch.zeros_like(y), torch.zeros_like(ld)])
    for g, p in zip(grads[1:], params):
        assert g.shape == p.shape and torch.all(g == 0)
    x = torch.randn(3, 3, 2, 2, dtype=F64)
    x[1, 0, 1, 1] = float("nan")
    y, ld = _run(backend, x, *[p.detach() for p in params])
    assert torch.isnan(y[1]).any() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    assert torch.isfinite(ld).all()


def test_half_precision_runs_on_reference_with_float32_logdet():
    x = torch.randn(2, 3, 4, 4)
    params = make_params(3, torch.float32, requires_grad=False)
    for dt in (torch.float16, torch.bfloat16):
        y, ld = actnorm_invconv(x.to(dt), *[p.to(dt) for p in params])
        assert y.dtype == dt and ld.dtype == torch.float32
        yr, _ = ref_aic(x, *params)
        torch.testing.assert_close(y.float(), yr, rtol=5e-2, atol=5e-2)


def test_bad_input():
    ls, b, w, wld = make_params(3, torch.float32, requires_grad=False)
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        actnorm_invconv(x.tolist(), ls, b, w, wld)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        actnorm_invconv(x, ls, b, None, wld)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        actnorm_invconv(x.long(), ls, b, w, wld)
    with pytest.raises(TypeError, match="bias dtype must match x"):
        actnorm_invconv(x, ls, b.double(), w, wld)
    with pytest.raises(TypeError, match="w_logdet must be a torch.Tensor or None"):
        actnorm_invconv(x, ls, b, w, 0.5)
    with pytest.raises(ValueError, match="w_logdet must hold one value"):
        actnorm_invconv(x, ls, b, w, torch.zeros(2))
    with pytest.raises(ValueError, match=r"x must be \[batch, channels\]"):
        actnorm_invconv(torch.randn(3), ls, b, w, wld)
    with pytest.raises(ValueError, match="at least one channel"):
        actnorm_invconv(torch.randn(2, 0, 3), ls[:0], b[:0], w[:0, :0], wld)
    with pytest.raises(ValueError, match=r"log_scale must have shape \(3,\)"):
        actnorm_invconv(x, ls[:2], b, w, wld)
    with pytest.raises(ValueError, match=r"weight must have shape \(3, 3\)"):
        actnorm_invconv(x, ls, b, w[:, :2], wld)
    with pytest.raises(ValueError, match="weight must be on x's device"):
        actnorm_invconv(x, ls, b, w.to("meta"), wld)


# --------------------------------------------------------------------------------- Triton kernel details

@pytest.mark.skipif(not HAS_TRITON, reason="needs triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("inverse", [False, True])
def test_triton_kernels_many_programs_partial_sums(monkeypatch, inverse):
    """Tiny tiles force many programs per sample: the masked tails and the partial-sum reduction."""
    from flowops.kernels import actnorm_invconv as K

    monkeypatch.setattr(K, "TILE", 16)
    assert K.block_config(5, 33)[:2] == (8, 2)
    x = torch.randn(2, 5, 33)
    params = make_params(5, torch.float32, requires_grad=False)
    y, ld = K.actnorm_invconv_fwd(x, *params, inverse)
    yr, ldr = ref_aic(x, *params, inverse)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ldr, rtol=1e-6, atol=1e-6)
    gy, gl = torch.randn_like(x), torch.randn(2)
    got = K.actnorm_invconv_bwd(gy, gl, x, *params, inverse)
    inputs = [x.clone().requires_grad_(), *[p.clone().requires_grad_() for p in params]]
    yr, ldr = ref_aic(*inputs, inverse)
    want = torch.autograd.grad([yr, ldr], inputs, [gy, gl])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- GlowStep wiring

def _step(coupling="affine", c=4, hidden=8):
    torch.manual_seed(1)
    step = GlowStep(c, hidden, coupling).double()
    with torch.no_grad():
        for p in step.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return step


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_glow_step_fused_matches_reference_path(backend, coupling):
    step = _step(coupling)
    step.actnorm.initialize(torch.randn(5, 4, 3, 5, dtype=F64))
    x = torch.randn(3, 4, 3, 5, dtype=F64)
    params = list(step.parameters())
    with flowops.use_backend(backend):
        z, ld = step(x)
        got = torch.autograd.grad(z.square().sum() + ld.sum(), params)
        xr, ldi = step.inverse(z)
    with flowops.use_backend("reference"):
        zr, ldr = step(x)
        want = torch.autograd.grad(zr.square().sum() + ldr.sum(), params)
    torch.testing.assert_close(z, zr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ldr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xr, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld + ldi, torch.zeros_like(ld), rtol=0, atol=1e-9)
    for (name, _), a, b in zip(step.named_parameters(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad {name}: {m}")


def test_glow_step_fused_keeps_children_keys_and_actnorm_init():
    step = GlowStep(4, 8)
    keys = set(step.state_dict())
    assert {"transforms.0.log_scale", "transforms.0.bias", "transforms.1.lower", "transforms.1.upper",
            "transforms.1.log_s"} <= keys
    assert [type(t) for t in step.transforms][:2] == [ActNorm, InvConv1x1]
    x = torch.randn(16, 4, 3, 3) * 3.0 + 2.0
    with flowops.use_backend("auto"):
        step.train()
        assert not step.actnorm.is_initialized()
        z, _ = step(x)
        assert step.actnorm.is_initialized()
        h, _ = step.actnorm(x)  # the child on its own: unit variance per channel after the init
        torch.testing.assert_close(h.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
        # walking the children one by one gives the fused step's result
        y, lds = x, 0
        for t in step.transforms:
            y, ld = t(y)
            lds = lds + ld
        torch.testing.assert_close(y, z, rtol=1e-5, atol=1e-5)
        step.eval()
        with torch.no_grad():
            back, _ = step.inverse(z)
        torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)


def test_invconv_channel_matmul_matches_conv_and_cached_inverse():
    ic = InvConv1x1(6).double()
    with torch.no_grad():
        ic.lower.add_(0.1 * torch.randn_like(ic.lower))
        ic.log_s.add_(0.1)
    x = torch.randn(2, 6, 3, 5, dtype=F64)
    with flowops.use_backend("auto"):
        z, ld = ic(x)
        with torch.no_grad():
            xr, ldi = ic.inverse(z)
    with flowops.use_backend("reference"):
        zr, ldr = ic(x)
    torch.testing.assert_close(z, zr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xr, x, rtol=1e-10, atol=1e-10)
    args = (ic.perm, ic.lower, ic.upper, ic.sign, ic.log_s)
    torch.testing.assert_close(ic.weight(), lu_weight(*args))
    torch.testing.assert_close(ic.inverse_weight(), lu_inverse_weight_by_inv(*args), rtol=1e-10, atol=1e-10)


def test_invconv_forward_weight_cached_without_grad_and_invalidated():
    ic = InvConv1x1(4)
    with torch.no_grad():
        w1 = ic.forward_weight()
        assert ic.forward_weight() is w1
        torch.testing.assert_close(w1, ic.weight())
        ic.log_s.add_(0.5)  # an in-place update (as an optimizer step) bumps the version counter
        w2 = ic.forward_weight()
    assert w2 is not w1
    torch.testing.assert_close(w2, ic.weight().detach())
    w3 = ic.forward_weight()  # grad enabled and parameters require grad: rebuilt differentiably
    assert w3.requires_grad and w3 is not w2


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (3, 12, 16, 16), (2, 48, 4, 4), (4, 6), (0, 4, 2, 2), (1, 1, 1, 1),
                                   (2, 64, 5, 7), (2, 65, 2, 3), (3, 5, 17)])
@pytest.mark.parametrize("record", [False, True])
def test_actnorm_invconv_reverse_matches_inverse_and_autograd(dtype, shape, record):
    """The one-call walk of the reversible engine: x is GlowStep.norm_conv_inverse(y) up to rounding (the loops
    for C <= 64 and a permutation P; the aten path above that) and bit for bit with a bit-exact record (the aten
    path, which the forward's record matches), and the gradients are autograd's through GlowStep.norm_conv at x
    (up to summation order)."""
    c = shape[1]
    step = GlowStep(max(c, 2), 8) if c >= 2 else None
    an, ic = (step.actnorm, step.invconv) if step is not None else (ActNorm(1), InvConv1x1(1))
    gen = torch.Generator().manual_seed(c)
    with torch.no_grad():
        for p in (an.log_scale, an.bias, ic.lower, ic.upper, ic.log_s):  # milder for 64+ channels: a 0.3 spread in
            p.add_((0.3 if c < 64 else 0.1) * torch.randn(p.shape, generator=gen))  # L and U conditions W badly
        an.initialized.fill_(1)
    an, ic = an.to(dtype), ic.to(dtype)
    y = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    gy, gld = torch.randn_like(y), torch.randn(shape[0], generator=gen, dtype=F64).to(dtype)
    with torch.no_grad():
        want_x = actnorm_invconv(y, an.log_scale, an.bias, ic.inverse_weight(), ic.log_s.sum(), inverse=True)[0]
        # an all-zero record (what rebuild_record gives for a rebuild one ulp off, applied to the exact one)
        rec = torch.ops.flowops.rebuild_record(want_x, want_x.nextafter(torch.full_like(want_x, float("inf"))))
        rec = tuple(rec) if record and y.numel() else ()
        x, gx, *g = torch.ops.flowops.actnorm_invconv_reverse(y, gy, gld, an.log_scale, an.bias, ic.perm, ic.lower,
                                                               ic.upper, ic.sign, ic.log_s, *rec)
    if rec:
        assert torch.equal(x, want_x.nextafter(torch.full_like(want_x, float("-inf"))))
    elif shape[1] > 64:
        assert torch.equal(x, want_x)  # the aten path
    else:
        tol_x = 1e-13 if dtype == F64 else 1e-5
        torch.testing.assert_close(x, want_x, rtol=tol_x, atol=tol_x * max([1.0, *want_x.abs().flatten().tolist()]))
    params = [an.log_scale, an.bias, ic.lower, ic.upper, ic.log_s]
    xl = x.clone().requires_grad_()
    out, ld = actnorm_invconv(xl, an.log_scale, an.bias, ic.forward_weight(), ic.log_s.sum(), inverse=False)
    if y.numel():
        want = torch.autograd.grad((out, ld), [xl, *params], (gy, gld))
    else:
        want = [torch.zeros_like(t) for t in (xl, *params)]
    tol = 1e-12 if dtype == F64 else 2e-5
    for a, b in zip([gx, *g], want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max([1.0, *b.abs().flatten().tolist()]))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_actnorm_invconv_reverse_checks_its_arguments():
    ic, an = InvConv1x1(4).double(), ActNorm(4).double()
    y = torch.randn(2, 4, 3, 3, dtype=F64)
    lu = (ic.perm, ic.lower.detach(), ic.upper.detach(), ic.sign, ic.log_s.detach())
    ls, b = an.log_scale.detach(), an.bias.detach()
    with pytest.raises(ValueError, match="grad_y"):
        torch.ops.flowops.actnorm_invconv_reverse(y, y[:1], torch.zeros(2, dtype=F64), ls, b, *lu)
    with pytest.raises(ValueError, match="grad_logdet"):
        torch.ops.flowops.actnorm_invconv_reverse(y, y, torch.zeros(3, dtype=F64), ls, b, *lu)
    with pytest.raises(ValueError, match="log_scale"):
        torch.ops.flowops.actnorm_invconv_reverse(y, y, torch.zeros(2, dtype=F64), ls[:3], b, *lu)
    with pytest.raises(ValueError, match="lu_weight"):
        torch.ops.flowops.actnorm_invconv_reverse(y, y, torch.zeros(2, dtype=F64), ls, b, *lu[:4], ls[:3])
    with pytest.raises((ValueError, TypeError), match="dtype"):
        torch.ops.flowops.actnorm_invconv_reverse(y.float(), y.float(), torch.zeros(2), ls, b, *lu)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_lu_weight_bwd_checks_its_arguments():
    ic = InvConv1x1(4).double()
    args = (ic.perm, ic.lower.detach(), ic.upper.detach(), ic.sign, ic.log_s.detach())
    with pytest.raises(ValueError, match="grad must have"):
        torch.ops.flowops.lu_weight_bwd(torch.ones(3, 3, dtype=F64), *args)
    with pytest.raises(ValueError, match="grad must have"):
        torch.ops.flowops.lu_weight_bwd(torch.ones(4, 4), *args)
    with pytest.raises(ValueError, match="lu_weight"):
        torch.ops.flowops.lu_weight_bwd(torch.ones(4, 4, dtype=F64), *args[:4], torch.ones(3, dtype=F64))


def test_lu_weight_op_matches_reference_with_gradients():
    from flowops.ops.actnorm_invconv import lu_weight as fast_lu

    ic = InvConv1x1(5).double()
    with torch.no_grad():
        for p in ic.parameters():
            p.add_(0.3 * torch.randn_like(p))
    args = (ic.perm, ic.lower, ic.upper, ic.sign, ic.log_s)
    params = [ic.lower, ic.upper, ic.log_s]
    g = torch.randn(5, 5, dtype=F64)
    w = fast_lu(*args)
    torch.testing.assert_close(w, ic.weight(), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(w, params, g)
    want = torch.autograd.grad(ic.weight(), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda lo, up, ls: fast_lu(ic.perm, lo, up, ic.sign, ls),
                                    tuple(p.detach().clone().requires_grad_() for p in params))
    with torch.inference_mode():
        torch.testing.assert_close(fast_lu(*args), ic.weight())
    if HAS_CPP:
        with pytest.raises(RuntimeError, match="higher-order"):
            torch.autograd.grad(fast_lu(*args).square().sum(), params, create_graph=True)


@pytest.mark.parametrize("kind", ["permutation", "identity", "dense"])
@pytest.mark.parametrize("c", [1, 2, 7, 48])
def test_lu_weight_op_any_perm_matrix(kind, c):
    """The C++ op applies a permutation matrix as a row gather (loops) and multiplies any other matrix
    (the aten formula): both match the reference P L U and its autograd gradients, in float64 and float32."""
    from flowops.ops.actnorm_invconv import lu_weight as fast_lu

    gen = torch.Generator().manual_seed(c)
    if kind == "permutation":
        perm = torch.eye(c, dtype=F64)[torch.randperm(c, generator=gen)]
    elif kind == "identity":
        perm = torch.eye(c, dtype=F64)
    else:
        perm = torch.randn(c, c, generator=gen, dtype=F64)
    lower, upper = torch.randn(c, c, generator=gen, dtype=F64), torch.randn(c, c, generator=gen, dtype=F64)
    sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    log_s = 0.3 * torch.randn(c, generator=gen, dtype=F64)
    g = torch.randn(c, c, generator=gen, dtype=F64)
    p64 = [t.detach().clone().requires_grad_() for t in (lower, upper, log_s)]
    ref = lu_weight(perm, p64[0], p64[1], sign, p64[2])  # the reference formula in float64
    want = (ref.detach(), *torch.autograd.grad(ref, p64, g))
    for dtype, rtol in ((F64, 1e-12), (torch.float32, 1e-5)):
        ps = [t.to(dtype).requires_grad_() for t in (lower, upper, log_s)]
        w = fast_lu(perm.to(dtype), ps[0], ps[1], sign.to(dtype), ps[2])
        got = (w.detach(), *torch.autograd.grad(w, ps, g.to(dtype)))
        for a, b in zip(got, want):  # float32: rounding relative to the largest entry of each result
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * 4 * b.abs().max().item())
        with torch.no_grad():  # the no-autograd kernel
            nw = fast_lu(perm.to(dtype), lower.to(dtype), upper.to(dtype), sign.to(dtype), log_s.to(dtype))
        assert torch.equal(nw, w.detach())
        if HAS_CPP and hasattr(torch.ops.flowops, "lu_weight_bwd"):  # the plain backward call: the node's gradients
            plain = torch.ops.flowops.lu_weight_bwd(g.to(dtype), perm.to(dtype), lower.to(dtype), upper.to(dtype),
                                                    sign.to(dtype), log_s.to(dtype))
            for a, b in zip(plain, got[1:]):
                assert torch.equal(a, b)
    args = [t.detach().clone().requires_grad_() for t in (lower, upper, log_s)]
    assert torch.autograd.gradcheck(lambda lo, up, ls: fast_lu(perm, lo, up, sign, ls), tuple(args))


def test_bench_glow_ops_quick(tmp_path):
    import json

    from flowops import benchmark

    path = tmp_path / "glow.json"
    argv = ["--op", "actnorm_invconv", "invconv_inverse", "glow_step", "--quick", "--no-compile", "--no-memory",
            "--repeats", "2", "--warmup", "1", "--copy-mb", "4", "--json", str(path)]
    assert benchmark.main(argv) == 0
    records = json.loads(path.read_text())["results"]
    ops = {(r["op"], r["direction"]) for r in records}
    assert {("actnorm_invconv", "fwd+bwd"), ("invconv_inverse", "inverse"), ("glow_step", "fwd+bwd")} <= ops
    assert all(r["check"]["ok"] for r in records)
    text = benchmark.format_targets(records)
    assert "invconv_inverse 4x6x5x3 inverse time / forward time" in text and "glow_step 2x3x8x8" in text
