"""The Triton coupling kernels against the reference, forward and backward.

On CPU they run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); on a machine with a GPU and TRITON_INTERPRET=0 the same
comparisons run compiled on CUDA, with fp16/bf16 inputs (fp32 math, fp32 log-det) and
larger shapes added. The interpreter is slow: CPU cases stay tiny.
"""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

import flowops  # noqa: E402
from flowops import reference  # noqa: E402
from flowops.kernels import affine_coupling as K  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])
if not DEVICES:
    pytestmark = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device with TRITON_INTERPRET=0")

SCALES = ("exp", "softclamp", "sigmoid", "additive")
CLAMP = 1.7

# Elementwise tolerance of outputs and gradients (the kernel rounds once, on store).
TOL = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}


def logdet_tol(dtype, n):
    """The log-det is a sum of n terms of size ~1 in fp32 (fp64 for fp64 inputs)."""
    eps = 1e-13 if dtype == torch.float64 else 2e-6
    return dict(rtol=10 * eps, atol=eps * max(n, 10))


# name -> x shape; "slice" and "transposed" are built as strided views (see make_inputs).
SHAPES = {
    "1x1": (1, 1),
    "3x5": (3, 5),
    "7x3x5x4": (7, 3, 5, 4),
    "slice": (4, 4, 3, 3),
    "empty": (0, 3, 2),
    "transposed": (3, 4, 5),
    "2blocks": (2, 3, 20, 20),
}
CUDA_SHAPES = {
    "rows4096xN1": (4096, 1),
    "64x3x32x32": (64, 3, 32, 32),
    "2x1x300x300": (2, 1, 300, 300),
}


def make_inputs(shape_name, shape, scale, dtype, device, masked, gen=None):
    factor = 1 if scale == "additive" else 2
    B, C, *sp = shape
    if shape_name == "slice":
        # x = base[:, 2:] of a contiguous [4, 6, 3, 3]; params a channel slice of a conditioner output
        x = torch.randn(B, C + 2, *sp, device=device).to(dtype)[:, 2:]
        params = torch.randn(B, factor * C + 1, *sp, device=device).to(dtype)[:, 1:]
        assert not x.is_contiguous() and not params.is_contiguous()
    elif shape_name == "transposed":
        x = torch.randn(B, sp[0], C, device=device).to(dtype).transpose(1, 2)
        params = torch.randn(B, sp[0], factor * C, device=device).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(*shape, device=device).to(dtype)
        params = torch.randn(B, factor * C, *sp, device=device).to(dtype)
    mask = None
    if masked:
        n = math.prod(shape[1:])
        mask = (torch.arange(n, device=device) % 3 == 0).to(dtype).reshape(shape[1:])
    return x, params, mask


def ref(x, params, mask, scale, clamp, inverse):
    if scale == "additive":
        return reference.additive_coupling(x, params, inverse, mask)
    return reference.affine_coupling(x, params, scale, clamp, inverse, mask)


def ref_with_grads(x, params, mask, scale, clamp, inverse, gy, gl):
    """Reference in float64 (from the same input values) and its gradients under (gy, gl)."""
    xd = x.detach().double().requires_grad_(True)
    pd = params.detach().double().requires_grad_(True)
    md = None if mask is None else mask.double()
    y, ld = ref(xd, pd, md, scale, clamp, inverse)
    if y.numel() == 0:
        return y, ld, torch.zeros_like(xd), torch.zeros_like(pd)
    outs = [(o, g.double()) for o, g in ((y, gy), (ld, gl)) if o.requires_grad]  # additive: ld is constant
    gx, gp = torch.autograd.grad([o for o, _ in outs], (xd, pd), [g for _, g in outs], allow_unused=True)
    return y, ld, gx, (torch.zeros_like(pd) if gp is None else gp)


def assert_close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), **tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


COMBOS = [(scale, inverse, masked) for scale in SCALES for inverse in (False, True) for masked in (False, True)]
CUDA_SWEEP_SHAPE = "64x3x32x32"


def _case(device, shape_name, dtype, combo):
    scale, inverse, masked = combo
    cid = f"{device}-{shape_name}-{str(dtype)[6:]}-{scale}-{'inv' if inverse else 'fwd'}-{'mask' if masked else 'nomask'}"
    return pytest.param(device, shape_name, dtype, scale, inverse, masked, id=cid)


def _cases():
    """CPU: every shape x {fp32, fp64} x every (scale, direction, mask), and half inputs on one shape.

    CUDA: every combination compiles its own kernels (a fresh machine has an empty Triton cache),
    so the full (scale, direction, mask) sweep runs for each of the four dtypes on one shape, and
    every other shape and dtype gets two combinations in rotation.
    """
    out = []
    for device in DEVICES:
        if device == "cpu":
            for name in SHAPES:
                for dtype in (torch.float32, torch.float64):
                    out += [_case(device, name, dtype, c) for c in COMBOS]
            for dtype in (torch.float16, torch.bfloat16):
                out += [_case(device, "7x3x5x4", dtype, c) for c in COMBOS]
            continue
        dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        for di, dtype in enumerate(dtypes):
            out += [_case(device, CUDA_SWEEP_SHAPE, dtype, c) for c in COMBOS]
            for si, name in enumerate(n for n in dict(SHAPES, **CUDA_SHAPES) if n != CUDA_SWEEP_SHAPE):
                k = 3 * si + 5 * di
                out += [_case(device, name, dtype, COMBOS[k % 16]), _case(device, name, dtype, COMBOS[(k + 7) % 16])]
    return out


@pytest.mark.parametrize("device,shape_name,dtype,scale,inverse,masked", _cases())
def test_launchers_match_reference(device, shape_name, dtype, scale, inverse, masked):
    shape = dict(SHAPES, **CUDA_SHAPES)[shape_name]
    x, params, mask = make_inputs(shape_name, shape, scale, dtype, device, masked)
    x0, p0 = x.clone(), params.clone()
    flat = None if mask is None else mask.reshape(-1)
    y, ld = K.affine_coupling_fwd(x, params, flat, scale, CLAMP, inverse)

    ld_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert ld.shape == (x.shape[0],) and ld.dtype == ld_dtype
    gy = torch.randn(x.shape, device=device).to(dtype)
    gl = torch.randn(x.shape[0], device=device).to(ld_dtype)
    yr, ldr, gxr, gpr = ref_with_grads(x, params, mask, scale, CLAMP, inverse, gy, gl)
    n = math.prod(shape[1:])
    assert_close(y, yr, TOL[dtype], "y")
    assert_close(ld, ldr, logdet_tol(dtype, n), "logdet")

    gx, gp = K.affine_coupling_bwd(gy, gl, x, params, flat, scale, CLAMP, inverse)
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gp.shape == params.shape and gp.dtype == dtype
    assert_close(gx, gxr, TOL[dtype], "grad_x")
    assert_close(gp, gpr, TOL[dtype], "grad_params")
    # inputs untouched
    assert torch.equal(x, x0) and torch.equal(params, p0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_are_not_copied(device):
    base = torch.randn(4, 6, 3, 3, device=device)
    x = base[:, 2:]
    t, stride = K._rows(x)
    assert t.data_ptr() == x.data_ptr() and stride == 6 * 9
    t, stride = K._rows(base.transpose(2, 3))  # inner dims not contiguous: copied
    assert t.is_contiguous() and stride == 6 * 9
    t, stride = K._rows(base[:1, 2:])
    assert stride == 4 * 9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["softclamp", "sigmoid"])
def test_extreme_and_tiny_raw_scales(device, dtype, scale):
    # Large |raw| saturates the maps; tiny |raw| takes the series branch of tanh (|raw / clamp|
    # < 0.02, straddled by 0.0339 and 0.0341 with clamp 1.7). One element per row, so each
    # log-det is one log s and is checked to relative precision, as is d(log s)/d(raw)
    # (grad_params under grad_y = 0, grad_logdet = 1).
    raw = torch.tensor([-80.0, -30.0, -5.0, -1e-3, -1e-7, 0.0, 3e-8, 0.0339, 0.0341, 0.15, 2.5, 5.0, 30.0, 80.0],
                       dtype=torch.float64)[:, None]
    x = torch.linspace(-2, 2, raw.shape[0], dtype=torch.float64)[:, None].to(device, dtype)
    params = torch.cat([raw, 0.5 * torch.ones_like(raw)], 1).to(device, dtype)
    if dtype == torch.float64:
        tol, rel = dict(rtol=1e-12, atol=1e-14), dict(rtol=1e-12, atol=0.0)
    else:
        # fp32 cannot resolve 1 - tanh^2 below ~1e-15 (|raw| = 30); on GPUs exp/log are approximate
        tol, rel = dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-5, atol=1e-6 if device == "cuda" else 1e-12)
    for inverse in (False, True):
        y, ld = K.affine_coupling_fwd(x, params, None, scale, CLAMP, inverse)
        gy, gl = torch.ones_like(x), torch.ones_like(ld)
        yr, ldr, gxr, gpr = ref_with_grads(x, params, None, scale, CLAMP, inverse, gy, gl)
        gx, gp = K.affine_coupling_bwd(gy, gl, x, params, None, scale, CLAMP, inverse)
        assert_close(y, yr, tol, "y")
        assert_close(ld, ldr, rel, "logdet")
        assert_close(gx, gxr, tol, "grad_x")
        assert_close(gp, gpr, tol, "grad_params")
        assert torch.isfinite(gp).all()
        gy = torch.zeros_like(x)
        _, _, _, gpr = ref_with_grads(x, params, None, scale, CLAMP, inverse, gy, gl)
        _, gp = K.affine_coupling_bwd(gy, gl, x, params, None, scale, CLAMP, inverse)
        assert_close(gp[:, 0], gpr[:, 0], rel, "d logdet / d raw")


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_sample_and_masked_params_are_ignored(device):
    x = torch.randn(3, 4, device=device)
    params = torch.randn(3, 8, device=device)
    x[0, 1] = float("nan")
    params[1, 2] = float("nan")  # raw scale of sample 1
    params[2, 0] = float("nan")  # raw scale of sample 2 at a masked position
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0], device=device)
    y, ld = K.affine_coupling_fwd(x, params, mask, "softclamp", CLAMP, False)
    assert torch.isnan(y[0, 1]) and torch.isfinite(ld[0])
    assert torch.isnan(y[1, 2]) and torch.isnan(ld[1])
    assert torch.isfinite(y[2]).all() and torch.isfinite(ld[2])
    gx, gp = K.affine_coupling_bwd(torch.ones_like(x), torch.ones(3, device=device), x, params, mask,
                                   "softclamp", CLAMP, False)
    assert torch.isfinite(gx[2]).all() and torch.isfinite(gp[2]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_accepts_missing_and_expanded_grads(device):
    x = torch.randn(5, 3, device=device)
    params = torch.randn(5, 6, device=device)
    gy = torch.ones((), device=device).expand(5, 3)  # what y.sum() sends back
    gl = torch.full((), 2.0, device=device).expand(5)
    gx, gp = K.affine_coupling_bwd(gy, gl, x, params, None, "exp", CLAMP, False)
    _, _, gxr, gpr = ref_with_grads(x, params, None, "exp", CLAMP, False, gy, gl)
    assert_close(gx, gxr, TOL[torch.float32], "grad_x")
    assert_close(gp, gpr, TOL[torch.float32], "grad_params")
    gx, gp = K.affine_coupling_bwd(None, gl, x, params, None, "exp", CLAMP, False)
    assert torch.equal(gx, torch.zeros_like(x))
    _, _, _, gpr = ref_with_grads(x, params, None, "exp", CLAMP, False, torch.zeros_like(x), gl)
    assert_close(gp, gpr, TOL[torch.float32], "grad_params (no grad_y)")
    gx, gp = K.affine_coupling_bwd(gy, None, x, params, None, "exp", CLAMP, False)
    _, _, gxr, gpr = ref_with_grads(x, params, None, "exp", CLAMP, False, gy, torch.zeros(5, device=device))
    assert_close(gp, gpr, TOL[torch.float32], "grad_params (no grad_logdet)")


def test_block_config():
    assert K.block_config(4096, 1) == (1024, 1, 4)
    assert K.block_config(3, 5) == (4, 8, 1)
    rows, cols, _ = K.block_config(2, 1200)
    assert rows == 1 and cols == K.TILE
    rows, cols, _ = K.block_config(1, 2 ** 28)  # column blocks stay within CUDA's grid limit
    assert rows == 1 and -(-2 ** 28 // cols) <= K.MAX_GRID_Y


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(ValueError, match="params"):
        K.affine_coupling_fwd(x, torch.randn(2, 5, device=device), None, "exp", CLAMP, False)
    with pytest.raises(TypeError, match="params"):
        K.affine_coupling_fwd(x, torch.randn(2, 6, device=device, dtype=torch.float64), None, "exp", CLAMP, False)
    with pytest.raises(ValueError, match="scale"):
        K.affine_coupling_fwd(x, torch.randn(2, 6, device=device), None, "tanh", CLAMP, False)
    with pytest.raises(ValueError, match="mask"):
        K.affine_coupling_fwd(x, torch.randn(2, 6, device=device), torch.ones(4, device=device), "exp", CLAMP, False)


# ----------------------------------------------------------------------------------------
# Through the public op (autograd wiring included)
# ----------------------------------------------------------------------------------------

OP_CASES = [
    ("7x3x5x4", "softclamp", False, True),
    ("slice", "sigmoid", True, False),
    ("3x5", "exp", True, True),
    ("slice", "additive", False, True),
    ("3x5", "additive", True, False),
]


@pytest.mark.parametrize("shape_name,scale,inverse,masked", OP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_op_path_matches_reference(device, shape_name, scale, inverse, masked):
    dtype = torch.float32
    x, params, mask = make_inputs(shape_name, SHAPES[shape_name], scale, dtype, device, masked)
    xk = x.detach().clone().requires_grad_(True)
    pk = params.detach().clone().requires_grad_(True)
    with flowops.use_backend("triton"):
        if scale == "additive":
            y, ld = flowops.ops.additive_coupling(xk, pk, inverse=inverse, mask=mask)
        else:
            y, ld = flowops.ops.affine_coupling(xk, pk, scale=scale, clamp=CLAMP, inverse=inverse, mask=mask)
    gy, gl = torch.randn_like(y), torch.randn_like(ld)
    gx, gp = torch.autograd.grad((y, ld), (xk, pk), (gy, gl))
    yr, ldr, gxr, gpr = ref_with_grads(x, params, mask, scale, CLAMP, inverse, gy, gl)
    n = math.prod(x.shape[1:])
    assert_close(y, yr, TOL[dtype], "y")
    assert_close(ld, ldr, logdet_tol(dtype, n), "logdet")
    assert_close(gx, gxr, TOL[dtype], "grad_x")
    assert_close(gp, gpr, TOL[dtype], "grad_params")


@pytest.mark.parametrize("device", DEVICES)
def test_op_path_round_trip_and_logdets_cancel(device):
    x = torch.randn(3, 2, 4, 3, device=device)
    params = torch.randn(3, 4, 4, 3, device=device)
    with flowops.use_backend("triton"):
        z, ld = flowops.ops.affine_coupling(x, params, scale="softclamp", clamp=CLAMP)
        xr, ldi = flowops.ops.affine_coupling(z, params, scale="softclamp", clamp=CLAMP, inverse=True)
    torch.testing.assert_close(xr, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld + ldi, torch.zeros_like(ld), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale,inverse", [("exp", False), ("softclamp", True), ("sigmoid", False),
                                           ("sigmoid", True), ("additive", True)])
@pytest.mark.parametrize("device", DEVICES)
def test_op_path_gradcheck_float64(device, scale, inverse):
    factor = 1 if scale == "additive" else 2
    x = torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    params = torch.randn(2, 3 * factor, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=device)

    def fn(x, params):
        with flowops.use_backend("triton"):
            if scale == "additive":
                return flowops.ops.additive_coupling(x, params, inverse=inverse, mask=mask)
            return flowops.ops.affine_coupling(x, params, scale=scale, clamp=0.9, inverse=inverse, mask=mask)

    assert torch.autograd.gradcheck(fn, (x, params), eps=1e-6, atol=1e-8, rtol=1e-6)
