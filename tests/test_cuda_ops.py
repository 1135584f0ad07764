"""The Glow and CNF fused ops, and the models built on them, on a CUDA device (Triton kernels compiled for
the GPU). Skipped without CUDA, or when TRITON_INTERPRET=1 (the CPU interpreter cannot run CUDA tensors):
bench/gpu_check.sh runs this file with TRITON_INTERPRET=0.
"""
import copy
import math
import os

import pytest
import torch

import flowops
from flowops.models import Glow
from flowops.ops import actnorm_invconv, mlp_trace
from flowops.reference.actnorm_invconv import actnorm_invconv as ref_aic
from flowops.reference.cnf import mlp_trace as ref_mlp_trace

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                reason="needs a CUDA device and TRITON_INTERPRET=0")
F64 = torch.float64
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def _aic_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=F64))
    w = q + 0.2 * torch.randn(c, c, generator=g, dtype=F64)
    ls = 0.3 * torch.randn(c, generator=g, dtype=F64)
    b = torch.randn(c, generator=g, dtype=F64)
    wld = torch.linalg.slogdet(w)[1]
    x = torch.randn(shape, generator=g, dtype=F64)
    return [t.to(device="cuda", dtype=dtype).requires_grad_() for t in (x, ls, b, w, wld)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(16, 48, 16, 16), (3, 5, 7, 9), (1, 12, 4, 4), (7, 6)])
def test_actnorm_invconv_cuda_matches_reference(shape, inverse, dtype):
    inputs = _aic_inputs(shape, dtype)
    with flowops.use_backend("triton"):
        y, ld = actnorm_invconv(*inputs, inverse=inverse)
    y_r, ld_r = ref_aic(*inputs, inverse=inverse)
    assert y.device.type == "cuda"
    torch.testing.assert_close(y, y_r, **TOL[dtype])
    torch.testing.assert_close(ld, ld_r, **TOL[dtype])
    g = torch.Generator(device="cuda").manual_seed(1)
    gy = torch.randn(y.shape, generator=g, device="cuda", dtype=dtype)
    gld = torch.randn(ld.shape, generator=g, device="cuda", dtype=ld.dtype)
    grads = torch.autograd.grad([y, ld], inputs, [gy, gld])
    grads_r = torch.autograd.grad([y_r, ld_r], inputs, [gy, gld])
    for a, b in zip(grads, grads_r):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a / scale, b / scale, **TOL[dtype])


def _mlp_inputs(B, d, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = (d + 1,) + tuple(hidden) + (d,)
    ws = [torch.randn(o, i, generator=g, dtype=F64) / math.sqrt(i) for i, o in zip(widths[:-1], widths[1:])]
    bs = [0.3 * torch.randn(o, generator=g, dtype=F64) for o in widths[1:]]
    z = torch.randn(B, d, generator=g, dtype=F64)
    t = torch.rand(B, generator=g, dtype=F64)

    def cuda(v):
        return v.to(device="cuda", dtype=dtype).requires_grad_()

    return cuda(z), cuda(t), [cuda(w) for w in ws], [cuda(b) for b in bs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["tanh", "softplus", "silu"])
@pytest.mark.parametrize("probes", [None, 2])
def test_mlp_trace_cuda_matches_reference(probes, act, dtype):
    B, d = 37, 3
    z, t, ws, bs = _mlp_inputs(B, d, (32, 24), dtype)
    eps = None
    if probes is not None:
        g = torch.Generator().manual_seed(2)
        eps = (torch.randint(0, 2, (probes, B, d), generator=g) * 2 - 1).to(device="cuda", dtype=dtype)
    with flowops.use_backend("triton"):
        f, tr = mlp_trace(z, t, ws, bs, act, eps)
    f_r, tr_r = ref_mlp_trace(z, t, ws, bs, act, eps)
    torch.testing.assert_close(f, f_r, **TOL[dtype])
    torch.testing.assert_close(tr, tr_r, **TOL[dtype])
    g = torch.Generator(device="cuda").manual_seed(3)
    gf = torch.randn(f.shape, generator=g, device="cuda", dtype=dtype)
    gtr = torch.randn(tr.shape, generator=g, device="cuda", dtype=dtype)
    inputs = [z, t, *ws, *bs]
    for a, b in zip(torch.autograd.grad([f, tr], inputs, [gf, gtr]),
                    torch.autograd.grad([f_r, tr_r], inputs, [gf, gtr])):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a / scale, b / scale, **TOL[dtype])


def _glow_pair(reversible=False):
    torch.manual_seed(0)
    model = Glow((3, 8, 8), levels=2, steps=2, hidden=16).to(device="cuda", dtype=F64)
    x = torch.rand(4, 3, 8, 8, device="cuda", dtype=F64) - 0.5
    with flowops.use_backend("reference"):
        model.log_prob(x)  # ActNorm initialization
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    twin = copy.deepcopy(model)
    twin.transform.reversible = reversible
    twin.transform.checkpoints = None  # a small model: the default would store every layer's input
    return model, twin, x


def _grads(model, x, backend):
    model.zero_grad(set_to_none=True)
    with flowops.use_backend(backend):
        loss = -model.log_prob(x).mean()
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_glow_fused_cuda_matches_reference_glow():
    ref, fused, x = _glow_pair()
    loss_r, g_r = _grads(ref, x, "reference")
    loss_f, g_f = _grads(fused, x, "triton")
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with torch.no_grad(), flowops.use_backend("triton"):
        z, _ = fused(x)
        x_back, _ = fused.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)


def test_reversible_glow_cuda_matches_ordinary_backprop():
    ordinary, rev, x = _glow_pair(reversible=True)
    loss_o, g_o = _grads(ordinary, x, "auto")
    loss_r, g_r = _grads(rev, x, "auto")
    torch.testing.assert_close(loss_r, loss_o, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_r, g_o):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
