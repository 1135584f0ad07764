"""Whole-layer CPU fusion of MLP-conditioned couplings (torch.ops.flowops.coupling_mlp[_stack])."""
import pytest
import torch
from torch import nn

import flowops
from flowops import _backend
from flowops.nn import AffineCoupling, Compose, ReversePermutation, mlp

pytestmark = pytest.mark.skipif(not _backend.has_cpp(), reason="C++ extension not built")


def _randomize(module, std=0.4):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _outputs_and_grads(model, x, inverse, backend):
    with flowops.use_backend(backend):
        y, ld = model.inverse(x) if inverse else model(x)
        w = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)
        loss = (y * w).sum() + (ld * ld).sum()
        grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return (y, ld, *grads)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("features", [2, 5])
def test_stack_matches_reference(dtype, tol, inverse, act, features):
    layers = [AffineCoupling(features, conditioner=lambda i, o: mlp(i, o, (16, 7), act), flip=k % 2 == 1,
                             scale=s) for k, s in enumerate(["softclamp", "softclamp", "softclamp"])]
    model = _randomize(Compose(*layers)).to(dtype)
    x = torch.randn(11, features, dtype=dtype, requires_grad=True)
    fused = _outputs_and_grads(model, x, inverse, "auto")
    ref = _outputs_and_grads(model, x, inverse, "reference")
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
def test_single_layer_each_scale(scale):
    layer = _randomize(AffineCoupling(4, hidden=(8,), scale=scale, clamp=1.5)).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for inverse in (False, True):
        fused = _outputs_and_grads(layer, x, inverse, "auto")
        ref = _outputs_and_grads(layer, x, inverse, "reference")
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_gradcheck_stack_float64():
    model = _randomize(flowops.models.RealNVP(3, layers=3, hidden=(5, 4)), std=0.3).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())

    def f(x, *ps):
        y, ld = model(x)
        return y, ld

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradcheck(lambda z, *ps: model.inverse(z), (x, *params))


def test_fused_path_is_taken_and_mixed_stacks_fall_back():
    model = flowops.models.RealNVP(4, layers=2, hidden=8)
    x = torch.randn(3, 4)
    z, _ = model(x)
    assert "CouplingMLPStack" in z.grad_fn.name()
    mixed = Compose(AffineCoupling(4, hidden=8), ReversePermutation(4), AffineCoupling(4, hidden=8, flip=True))
    _randomize(mixed)
    xr = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    mixed.double()
    for inverse in (False, True):
        fused = _outputs_and_grads(mixed, xr, inverse, "auto")
        ref = _outputs_and_grads(mixed, xr, inverse, "reference")
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_round_trip_and_empty_batch():
    model = _randomize(flowops.models.RealNVP(2, layers=6, hidden=16), std=0.2)
    x = torch.randn(64, 2)
    z, ld = model(x)
    xb, ldb = model.inverse(z)
    torch.testing.assert_close(xb, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld + ldb, torch.zeros(64), rtol=0, atol=1e-4)
    e = torch.zeros(0, 2, requires_grad=True)
    lp = model.log_prob(e)
    assert lp.shape == (0,)
    lp.sum().backward()
    assert e.grad.shape == (0, 2)


def test_nan_propagates_per_sample():
    model = _randomize(flowops.models.RealNVP(2, layers=2, hidden=8), std=0.2)
    x = torch.randn(4, 2)
    x[1, 0] = float("nan")
    lp = model.log_prob(x)
    assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2, 3]]).all()


def test_wrong_feature_count_is_a_clear_error():
    model = flowops.models.RealNVP(3, layers=2, hidden=8)
    with pytest.raises(ValueError, match="expected input of shape"):
        model(torch.randn(4, 2))
