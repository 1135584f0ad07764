"""The Glow couplings' one-node fused CPU path (split -> channels-last conv conditioner -> coupling -> concat)
against the same layers under the reference backend: outputs, log-dets, inverses, input and parameter gradients."""
import pytest
import torch
from torch import nn

import flowops
from flowops import _backend
from flowops.models import Glow
from flowops.nn import GlowAdditiveCoupling, GlowAffineCoupling
from flowops.nn.glow import _conv_chain

pytestmark = pytest.mark.skipif(not _backend.has_cpp(), reason="needs the C++ extension")

FUSED_NODE = "_GlowCouplingFnBackward"


def _layer(kind, c, hidden, dtype):
    torch.manual_seed(2)
    layer = (GlowAffineCoupling(c, hidden) if kind == "affine" else GlowAdditiveCoupling(c, hidden)).to(dtype)
    with torch.no_grad():  # the last conv starts at zero: perturb every parameter
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _run(layer, x, inverse, backend):
    params = list(layer.parameters())
    x = x.clone().requires_grad_(True)
    with flowops.use_backend(backend):
        y, ld = layer.inverse(x) if inverse else layer(x)
        node = type(y.grad_fn).__name__
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + (ld * ld).sum()
        grads = torch.autograd.grad(loss, [x, *params])
    return y.detach(), ld.detach(), grads, node


@pytest.mark.parametrize("kind", ["affine", "additive"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype,c,shape", [(torch.float64, 5, (3, 4, 6)), (torch.float32, 12, (2, 8, 8)),
                                           (torch.float64, 2, (1, 1, 3))])
def test_fused_coupling_matches_reference(kind, inverse, dtype, c, shape):
    layer = _layer(kind, c, 16, dtype)
    x = torch.randn(shape[0], c, *shape[1:], dtype=dtype)
    y, ld, grads, node = _run(layer, x, inverse, "cpp")
    yr, ldr, grads_r, node_r = _run(layer, x, inverse, "reference")
    assert node.startswith(FUSED_NODE) and not node_r.startswith(FUSED_NODE)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(ld, ldr, **tol)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, grads_r):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad {name}: {m}")
    # the pass-through channels are copied exactly and the two directions invert each other
    assert torch.equal(y[:, : c // 2], x[:, : c // 2])
    with flowops.use_backend("cpp"), torch.no_grad():
        back, ld_back = (layer(y) if inverse else layer.inverse(y))
    torch.testing.assert_close(back, x, **tol)
    torch.testing.assert_close(ld + ld_back, torch.zeros_like(ld), rtol=0, atol=tol["atol"] * 10)


def test_fused_coupling_channels_last_and_strided_input():
    layer = _layer("affine", 6, 8, torch.float64)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    for xin in (x.contiguous(memory_format=torch.channels_last), torch.randn(2, 6, 5, 8, dtype=torch.float64)[..., ::2]):
        y, ld, grads, node = _run(layer, xin, False, "cpp")
        yr, ldr, grads_r, _ = _run(layer, xin, False, "reference")
        assert node.startswith(FUSED_NODE)
        assert y.is_contiguous()
        torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
        for a, b in zip(grads, grads_r):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_coupling_only_parameter_gradients():
    layer = _layer("affine", 4, 8, torch.float64)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)  # no grad for x: the conditioner's input gradient is skipped
    with flowops.use_backend("cpp"):
        y, ld = layer(x)
        got = torch.autograd.grad(y.sum() + ld.sum(), list(layer.parameters()))
    with flowops.use_backend("reference"):
        y, ld = layer(x)
        want = torch.autograd.grad(y.sum() + ld.sum(), list(layer.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_coupling_falls_back_for_other_conditioners():
    layer = _layer("affine", 4, 8, torch.float64)
    assert _conv_chain(layer.conditioner) is not None
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    layer.conditioner[1] = nn.Tanh()  # not a conv/ReLU chain: the layer runs op by op
    assert _conv_chain(layer.conditioner) is None
    y, ld, grads, node = _run(layer, x, False, "cpp")
    yr, ldr, grads_r, _ = _run(layer, x, False, "reference")
    assert not node.startswith(FUSED_NODE)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    layer = _layer("affine", 4, 8, torch.float64)
    calls = []
    layer.conditioner[0].register_forward_hook(lambda *args: calls.append(1))  # hooks must still run
    y, *_ , node = _run(layer, x, False, "cpp")
    assert calls and not node.startswith(FUSED_NODE)


def test_fused_coupling_rejects_double_backward():
    layer = _layer("affine", 4, 8, torch.float64)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with flowops.use_backend("cpp"):
        y, ld = layer(x)
        with pytest.raises(RuntimeError, match="higher-order"):
            torch.autograd.grad(y.sum() + ld.sum(), x, create_graph=True)


def test_fused_glow_training_step_matches_reference():
    torch.manual_seed(0)
    model = Glow((3, 8, 8), levels=2, steps=2, hidden=16).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.add_(0.05 * torch.randn_like(m.weight))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with flowops.use_backend("reference"):
        model.log_prob(x)  # ActNorm init
    params = list(model.parameters())
    out = {}
    for backend in ("cpp", "reference"):
        with flowops.use_backend(backend):
            loss = -model.log_prob(x).mean()
            out[backend] = (loss, *torch.autograd.grad(loss, params))
    for a, b in zip(out["cpp"], out["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_conv_chain_recognizes_only_plain_chains():
    def chain(*mods):
        return _conv_chain(nn.Sequential(*mods))

    conv = lambda: nn.Conv2d(2, 2, 3, padding=1)  # noqa: E731
    assert chain(conv(), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.ReLU(), conv())[1] == [True, True, False]
    assert chain(conv()) is not None
    assert chain(conv(), nn.ReLU()) is None  # a trailing ReLU
    assert chain(nn.ReLU(), conv()) is None
    assert chain(conv(), nn.ReLU(), nn.ReLU(), conv()) is None
    assert chain(nn.Conv2d(2, 2, 3, padding=1, bias=False)) is None
    assert chain(nn.Conv2d(2, 2, 3, stride=2, padding=1)) is None
    assert chain(nn.Conv2d(2, 2, 3, padding="same")) is None
    assert chain(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")) is None
    assert _conv_chain(conv()) is None  # not a Sequential
