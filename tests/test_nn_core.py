"""Coupling layers, composition, permutations, Flow and RealNVP."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flowops
from flowops import Flow, StandardNormal
from flowops.models import RealNVP
from flowops.nn import (AdditiveCoupling, AffineCoupling, Compose, Permutation, RandomPermutation,
                        ReversePermutation, make_mask)

VEC = 5            # odd feature count: the halves differ in size
IMG = (3, 4, 4)    # odd channel count, small enough for a brute-force Jacobian (48 x 48)
IMG_SMALL = (3, 2, 3)  # for the brute-force Jacobians (18 x 18)
HIDDEN = 8

# (shape, mask) pairs: every mask kind on the shapes it applies to.
MASK_CASES = [
    (VEC, "half"),
    (VEC, "alternating"),
    (VEC, "explicit"),
    (IMG, "half"),
    (IMG, "alternating"),
    (IMG, "checkerboard"),
    (IMG, "channel"),
    (IMG, "explicit"),
]
LAYERS = [AffineCoupling, AdditiveCoupling]


def _explicit_mask(shape):
    g = torch.Generator().manual_seed(7)
    m = (torch.rand(shape, generator=g) < 0.5).float()
    m.view(-1)[0], m.view(-1)[-1] = 1.0, 0.0
    return m


def _make(cls, shape, mask, flip=False, **kw):
    m = _explicit_mask((shape,) if isinstance(shape, int) else shape) if mask == "explicit" else mask
    return cls(shape, mask=m, hidden=HIDDEN, flip=flip, **kw)


def _randomize(module, std=0.3, seed=0):
    """Give every parameter (the zero-initialized last conditioner layer too) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _batch(shape, n=4, dtype=torch.float32):
    s = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.randn((n, *s), dtype=dtype)


def _ids(case):
    shape, mask = case
    return f"{'vec' if isinstance(shape, int) else 'img'}-{mask}"


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", MASK_CASES, ids=_ids)
@pytest.mark.parametrize("flip", [False, True], ids=["noflip", "flip"])
def test_identity_at_init(cls, case, flip):
    shape, mask = case
    layer = _make(cls, shape, mask, flip)
    x = _batch(shape)
    z, ld = layer(x)
    assert torch.equal(z, x)
    assert torch.equal(ld, torch.zeros(4))
    x_back, ld_back = layer.inverse(x)
    assert torch.equal(x_back, x) and torch.equal(ld_back, torch.zeros(4))


@pytest.mark.parametrize("scale", ["exp", "softclamp"])
def test_identity_at_init_scales(scale):
    layer = AffineCoupling(VEC, hidden=HIDDEN, scale=scale)
    x = _batch(VEC)
    z, ld = layer(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(4))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", MASK_CASES, ids=_ids)
@pytest.mark.parametrize("flip", [False, True], ids=["noflip", "flip"])
def test_round_trip(backend, cls, case, flip):
    shape, mask = case
    layer = _randomize(_make(cls, shape, mask, flip))
    x = _batch(shape, n=3)
    with flowops.use_backend(backend):
        z, ld = layer(x)
        x_back, ld_back = layer.inverse(z)
    assert not torch.allclose(z, x), "randomized layer should not be the identity"
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld + ld_back, torch.zeros(3), rtol=0, atol=1e-4)
    if cls is AffineCoupling:
        assert torch.all(ld != 0)
    else:
        assert torch.all(ld == 0)
    # the pass-through part is untouched
    if mask in ("half", "channel"):
        c = layer.shape[0]
        k = c // 2
        pas = slice(c - k, c) if flip else slice(0, k)
        assert torch.equal(z[:, pas], x[:, pas])
    else:
        keep = layer.mask.bool().expand_as(x)
        assert torch.equal(z[keep], x[keep])
        assert not torch.equal(z[~keep], x[~keep])


def _brute_logdet(layer, x, inverse):
    fn = layer.inverse if inverse else layer.forward
    shape = x.shape

    def flat(v):
        return fn(v.reshape(shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabs


# the reference backend on a subset: the fused backend is compared against it in test_fused_matches_reference
_BRUTE_MODES = [("auto", False, False), ("auto", True, False), ("auto", False, True), ("auto", True, True),
                ("reference", True, True)]


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", MASK_CASES, ids=_ids)
@pytest.mark.parametrize("backend,flip,inverse", _BRUTE_MODES)
def test_logdet_brute_force(backend, cls, case, flip, inverse):
    shape, mask = case
    shape = shape if isinstance(shape, int) else IMG_SMALL
    layer = _randomize(_make(cls, shape, mask, flip, **({"scale": "exp"} if cls is AffineCoupling else {})))
    layer = layer.double()
    x = _batch(shape, n=1, dtype=torch.float64)
    with flowops.use_backend(backend):
        _, ld = (layer.inverse if inverse else layer)(x)
        brute = _brute_logdet(layer, x, inverse)
    torch.testing.assert_close(ld[0], brute, rtol=1e-9, atol=1e-9)
    if cls is AffineCoupling:
        assert abs(brute.item()) > 1e-6, "the test needs a layer that changes volume"


@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
def test_logdet_brute_force_scales(scale):
    layer = _randomize(AffineCoupling(IMG_SMALL, mask="checkerboard", hidden=HIDDEN, scale=scale, clamp=0.7)).double()
    x = _batch(IMG_SMALL, n=1, dtype=torch.float64)
    _, ld = layer(x)
    torch.testing.assert_close(ld[0], _brute_logdet(layer, x, False), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", MASK_CASES, ids=_ids)
@pytest.mark.parametrize("flip", [False, True], ids=["noflip", "flip"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_fused_matches_reference(cls, case, flip, inverse):
    """The fused (auto) backend and the reference give the same outputs and every gradient."""
    shape, mask = case
    layer = _randomize(_make(cls, shape, mask, flip))
    twin = copy.deepcopy(layer)
    x = _batch(shape, n=6)
    gz = torch.randn_like(x)
    gld = torch.randn(6)
    results = []
    for backend, mod in (("auto", layer), ("reference", twin)):
        xx = x.clone().requires_grad_(True)
        with flowops.use_backend(backend):
            z, ld = (mod.inverse if inverse else mod)(xx)
        ((z * gz).sum() + (ld * gld).sum()).backward()
        grads = {n: p.grad for n, p in mod.named_parameters()}
        results.append((z.detach(), ld.detach(), xx.grad, grads))
    (z, ld, gx, gp), (rz, rld, rgx, rgp) = results
    torch.testing.assert_close(z, rz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, rld, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    assert gp.keys() == rgp.keys() and len(gp) > 0
    for name in gp:
        assert gp[name] is not None, name
        torch.testing.assert_close(gp[name], rgp[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in gp.values())


@pytest.mark.parametrize("case", [(VEC, "half"), (VEC, "alternating"), (IMG, "checkerboard")], ids=_ids)
def test_fused_path_is_used(case):
    """With the extension built, the auto backend really runs a flowops C++ node inside the layer."""
    if not flowops._backend.has_cpp():
        pytest.skip("flowops._C not built")
    shape, mask = case
    layer = _randomize(_make(AffineCoupling, shape, mask))
    _, ld = layer(_batch(shape))
    assert "flowops::" in ld.grad_fn.name()
    with flowops.use_backend("reference"):
        _, ld_ref = layer(_batch(shape))
    assert "flowops::" not in ld_ref.grad_fn.name()


@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
@pytest.mark.parametrize("mask", ["half", "alternating"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("direction", ["log_prob", "inverse"])
def test_flow_fused_matches_reference(scale, mask, dtype, direction):
    """A whole RealNVP (a stack the fused backend may run as one node) against the plain-PyTorch model."""
    model = _randomize(RealNVP(VEC, layers=3, hidden=HIDDEN, scale=scale, mask=mask), std=0.3).to(dtype)
    twin = copy.deepcopy(model)
    x = _batch(VEC, n=9, dtype=dtype)
    g = torch.randn(9, dtype=dtype)
    gx_up = torch.randn(9, VEC, dtype=dtype)
    results = []
    for backend, mod in (("auto", model), ("reference", twin)):
        xx = x.clone().requires_grad_(True)
        with flowops.use_backend(backend):
            if direction == "log_prob":
                out, ld = mod.log_prob(xx), None
                loss = (out * g).sum()
            else:
                out, ld = mod.inverse(xx)
                loss = (out * gx_up).sum() + (ld * g).sum()
        loss.backward()
        results.append((out.detach(), None if ld is None else ld.detach(), xx.grad,
                        {n: p.grad for n, p in mod.named_parameters()}))
    (out, ld, gx, gp), (rout, rld, rgx, rgp) = results
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, rout, **tol)
    if ld is not None:
        torch.testing.assert_close(ld, rld, **tol)
    torch.testing.assert_close(gx, rgx, **tol)
    for name in rgp:
        assert gp[name] is not None, name
        torch.testing.assert_close(gp[name], rgp[name], msg=name, **tol)


def _tanh_conditioner(cin, cout):
    return nn.Sequential(nn.Linear(cin, 7), nn.Tanh(), nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, cout))


@pytest.mark.parametrize("conditioner", [None, _tanh_conditioner, lambda i, o: nn.Linear(i, o)],
                         ids=["relu-mlp", "tanh-mlp", "linear"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_layer_awkward_inputs(conditioner, inverse):
    """Batch 1, an empty batch, strided, sliced and expanded inputs; custom MLP conditioners."""
    layer = _randomize(AffineCoupling(VEC, conditioner=conditioner, hidden=HIDDEN))
    twin = copy.deepcopy(layer)
    inputs = [torch.randn(1, VEC), torch.randn(0, VEC), torch.randn(VEC, 6).t(), torch.randn(4, VEC + 3)[:, 2:-1],
              torch.randn(1, VEC).expand(3, VEC)]
    for x in inputs:
        got = []
        for backend, mod in (("auto", layer), ("reference", twin)):
            mod.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_(True)
            with flowops.use_backend(backend):
                z, ld = (mod.inverse if inverse else mod)(xx)
            assert z.shape == x.shape and ld.shape == (x.shape[0],)
            ((z ** 2).sum() + ld.sum()).backward()
            got.append([z.detach(), ld.detach(), xx.grad] + [p.grad for p in mod.parameters()])
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", ["half", "alternating"])
def test_flow_second_order_gradients(mask):
    """A gradient penalty on the score d log p / dx trains the same on every backend, or raises;
    the coupling's share of the second-order gradient must not be silently dropped."""
    model = _randomize(RealNVP(4, layers=2, hidden=HIDDEN, mask=mask), std=0.3).double()
    x = _batch(4, n=5, dtype=torch.float64)

    def penalty_grads(backend):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        with flowops.use_backend(backend):
            lp = model.log_prob(xx)
            score, = torch.autograd.grad(lp.sum(), xx, create_graph=True)
            ((score ** 2).sum() + lp.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = penalty_grads("reference")
    try:
        got = penalty_grads("auto")
    except RuntimeError:
        return  # a clear error is acceptable
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_mask_kinds():
    assert torch.equal(make_mask(4, "half"), torch.tensor([1.0, 1, 0, 0]))
    assert torch.equal(make_mask(5, "half", flip=True), torch.tensor([0.0, 0, 1, 1, 1]))
    assert torch.equal(make_mask(5, "alternating"), torch.tensor([1.0, 0, 1, 0, 1]))
    cb = make_mask((2, 2, 3), "checkerboard")
    assert torch.equal(cb[0], torch.tensor([[1.0, 0, 1], [0, 1, 0]])) and torch.equal(cb[1], cb[0])
    assert torch.equal(make_mask((2, 2, 3), "checkerboard", flip=True), 1 - cb)
    ch = make_mask((4, 2, 2), "channel")
    assert torch.all(ch[:2] == 1) and torch.all(ch[2:] == 0)
    with pytest.raises(ValueError, match="checkerboard"):
        make_mask(4, "checkerboard")
    with pytest.raises(ValueError, match="mask"):
        make_mask(4, "diagonal")


def test_flip_swaps_parts():
    x = _batch(6)
    for mask in ("half", "alternating"):
        a = _randomize(AffineCoupling(6, mask=mask, hidden=HIDDEN))
        b = _randomize(AffineCoupling(6, mask=mask, hidden=HIDDEN, flip=True))
        za, zb = a(x)[0], b(x)[0]
        changed_a = (za != x).any(0)
        changed_b = (zb != x).any(0)
        assert changed_a.any() and changed_b.any()
        assert not (changed_a & changed_b).any(), "flip must transform the other part"
        assert (changed_a | changed_b).all()


# --------------------------------------------------------------------------- Compose, permutations


def test_compose():
    layers = [_randomize(AffineCoupling(VEC, hidden=HIDDEN, flip=i % 2 == 1), seed=i) for i in range(3)]
    x = _batch(VEC)
    comp = Compose(*layers)
    assert len(comp) == 3 and comp[1] is layers[1]
    z, ld = comp(x)
    h, total = x, torch.zeros(4)
    for t in layers:
        h, l = t(h)
        total = total + l
    torch.testing.assert_close(z, h)
    torch.testing.assert_close(ld, total)
    x_back, ld_back = comp.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld + ld_back, torch.zeros(4), rtol=0, atol=1e-4)
    # a list works as well, and the empty composition is the identity
    z2, _ = Compose(layers)(x)
    assert torch.equal(z2, z)
    z0, ld0 = Compose()(x)
    assert torch.equal(z0, x) and torch.equal(ld0, torch.zeros(4))
    with pytest.raises(TypeError, match="transform 1"):
        Compose(layers[0], nn.Linear(5, 5))
    # .inv swaps the directions
    zi, ldi = comp.inv(z)
    torch.testing.assert_close(zi, x_back)
    torch.testing.assert_close(ldi, ld_back)


def test_permutations():
    x = _batch(VEC)
    rev = ReversePermutation(VEC)
    z, ld = rev(x)
    assert torch.equal(z, x.flip(1)) and torch.equal(ld, torch.zeros(4))
    assert torch.equal(rev.inverse(z)[0], x)
    g = torch.Generator().manual_seed(3)
    rnd = RandomPermutation(VEC, generator=g)
    z, ld = rnd(x)
    assert torch.equal(z, x[:, rnd.perm]) and torch.equal(ld, torch.zeros(4))
    assert torch.equal(rnd.inverse(z)[0], x)
    assert sorted(rnd.perm.tolist()) == list(range(VEC))
    # channels of an image
    xi = _batch(IMG)
    perm = Permutation([2, 0, 1])
    zi, _ = perm(xi)
    assert torch.equal(zi[:, 0], xi[:, 2]) and torch.equal(perm.inverse(zi)[0], xi)
    # a permutation changes no volume: brute-force log-det is 0
    jac = torch.autograd.functional.jacobian(lambda v: rnd(v.reshape(1, VEC))[0].reshape(-1), x[0])
    assert torch.linalg.slogdet(jac)[1].abs() < 1e-6


@pytest.mark.parametrize("perm", [[0, 0, 1], [1, 2], [0, 1, 3], [[0, 1], [1, 0]], [-1, 0, 1]])
def test_invalid_permutation(perm):
    with pytest.raises(ValueError, match="perm"):
        Permutation(perm)


def test_permutation_wrong_features():
    with pytest.raises(ValueError, match="5 features"):
        ReversePermutation(5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="5 features"):
        ReversePermutation(5).inverse(torch.randn(2, 6))


# --------------------------------------------------------------------------- Flow, RealNVP


def _flow(features=VEC, layers=3, seed=0):
    model = RealNVP(features, layers=layers, hidden=HIDDEN)
    return _randomize(model, std=0.2, seed=seed)


def test_flow_log_prob():
    flow = _flow()
    x = _batch(VEC, n=7)
    z, ld = flow.transform(x)
    lp = flow.log_prob(x)
    assert lp.shape == (7,)
    torch.testing.assert_close(lp, flow.base.log_prob(z) + ld)
    torch.testing.assert_close(lp, flow.base.dist.log_prob(z) + ld)
    fz, fld = flow(x)
    assert torch.equal(fz, z) and torch.equal(fld, ld)
    assert torch.any(ld.abs() > 1e-3)
    # change of variables in one dimension, checked numerically: a 2-D flow's density integrates to ~1
    flow2 = _flow(features=2, layers=2, seed=1)
    grid = torch.linspace(-9, 9, 361)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        mass = flow2.log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1.0) < 0.02


def test_flow_accepts_torch_distribution():
    base = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(VEC), torch.ones(VEC)), 1)
    layers = [_randomize(AffineCoupling(VEC, hidden=HIDDEN, flip=i % 2 == 1), seed=i) for i in range(2)]
    flow = Flow(base, layers)
    x = _batch(VEC)
    z, ld = flow(x)
    torch.testing.assert_close(flow.log_prob(x), base.log_prob(z) + ld)
    s, lp = flow.sample_and_log_prob(5)
    assert s.shape == (5, VEC)
    torch.testing.assert_close(flow.log_prob(s), lp, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="transforms"):
        Flow(base, nn.Linear(3, 3))


def test_sample_consistency():
    flow = _flow()
    with torch.no_grad():
        x, lp = flow.sample_and_log_prob(64)
        assert x.shape == (64, VEC) and lp.shape == (64,)
        torch.testing.assert_close(flow.log_prob(x), lp, rtol=1e-4, atol=1e-4)
        a = flow.sample(8, generator=torch.Generator().manual_seed(5))
        b = flow.sample(8, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)
        z = flow.base.sample(8, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(flow.inverse(z)[0], a)
        assert flow.sample(0).shape == (0, VEC)
        cold = flow.sample(4096, temperature=0.1)
        assert cold.std() < flow.sample(4096).std()
    with pytest.raises(ValueError, match="n"):
        flow.sample(-1)


def test_image_flow_sample_consistency():
    layers = [_randomize(AffineCoupling(IMG, mask="checkerboard", hidden=HIDDEN, flip=i % 2 == 1), seed=i)
              for i in range(2)]
    layers.insert(1, Permutation([1, 2, 0]))
    flow = Flow(StandardNormal(IMG), layers)
    with torch.no_grad():
        x, lp = flow.sample_and_log_prob(3)
        assert x.shape == (3, *IMG)
        torch.testing.assert_close(flow.log_prob(x), lp, rtol=1e-4, atol=1e-4)
        bpd = flow.bits_per_dim(x)
        torch.testing.assert_close(bpd, -lp.mean() / (48 * torch.log(torch.tensor(2.0))))


def test_realnvp_shapes():
    model = RealNVP(6, layers=4, hidden=HIDDEN)
    assert len(model.transform) == 4
    assert all(isinstance(t, AffineCoupling) for t in model.transform)
    assert [t.flip for t in model.transform] == [False, True, False, True]
    x = _batch(6, n=9)
    lp = model.log_prob(x)
    assert lp.shape == (9,)
    # identity at init: the density is the base density
    torch.testing.assert_close(lp, StandardNormal(6).log_prob(x))
    assert model.sample(3).shape == (3, 6)
    lp.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="features"):
        RealNVP(1)
    with pytest.raises(ValueError, match="layers"):
        RealNVP(4, layers=0)


def test_realnvp_alternating_covers_all_features():
    model = _randomize(RealNVP(6, layers=2, hidden=HIDDEN), std=0.2)
    x = _batch(6)
    z, _ = model(x)
    assert (z != x).all(), "two flipped halves transform every feature"


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    layer = AffineCoupling(VEC, hidden=HIDDEN)
    with pytest.raises(ValueError, match=r"\[batch, 5\]") as info:
        layer(torch.randn(2, 4))
    assert "(2, 4)" in str(info.value)
    with pytest.raises(ValueError, match=r"\[batch, 5\]"):
        layer.inverse(torch.randn(2, 5, 1))
    img = AffineCoupling(IMG, mask="checkerboard", hidden=HIDDEN)
    with pytest.raises(ValueError, match=r"\[batch, 3, 4, 4\]"):
        img(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(VEC, mask=torch.ones(4))
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(IMG, mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="0 and 1"):
        AffineCoupling(VEC, mask=torch.tensor([0.0, 0.5, 1, 1, 0]))
    with pytest.raises(ValueError, match="everything or nothing"):
        AffineCoupling(VEC, mask=torch.ones(VEC))
    with pytest.raises(ValueError, match="everything or nothing"):
        AdditiveCoupling(VEC, mask=torch.zeros(VEC))
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(VEC, mask="diagonal")
    with pytest.raises(ValueError, match="checkerboard"):
        AffineCoupling(VEC, mask="checkerboard")
    with pytest.raises(ValueError, match="channel"):
        AffineCoupling(VEC, mask="channel")
    with pytest.raises(ValueError, match="scale") as info:
        AffineCoupling(VEC, scale="tanh")
    assert "'tanh'" in str(info.value)
    with pytest.raises(ValueError, match="clamp"):
        AffineCoupling(VEC, scale="softclamp", clamp=0.0)
    with pytest.raises(ValueError, match="2 channels"):
        AffineCoupling(1)
    with pytest.raises(TypeError, match="conditioner"):
        AffineCoupling(VEC, conditioner=lambda i, o: 3)


def test_bad_conditioner_output():
    layer = AffineCoupling(VEC, conditioner=nn.Linear(2, 5))  # half mask: in 2, expects out 2 * 3 = 6
    with pytest.raises(ValueError, match="expected 6"):
        layer(torch.randn(2, VEC))


def test_custom_conditioner():
    calls = []

    def factory(cin, cout):
        calls.append((cin, cout))
        return _randomize(nn.Sequential(nn.Linear(cin, 16), nn.Tanh(), nn.Linear(16, cout)))

    layer = AffineCoupling(VEC, conditioner=factory, mask="alternating")
    assert calls == [(VEC, 2 * VEC)]
    x = _batch(VEC)
    z, ld = layer(x)
    torch.testing.assert_close(layer.inverse(z)[0], x, rtol=1e-5, atol=1e-5)
    split = AdditiveCoupling(VEC, conditioner=factory, mask="half", flip=True)
    assert calls[-1] == (2, 3)
    torch.testing.assert_close(split.inverse(split(x)[0])[0], x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = _flow(features=VEC, layers=3, seed=11)
    path = tmp_path / "realnvp.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)
    fresh = RealNVP(VEC, layers=3, hidden=HIDDEN)
    x = _batch(VEC, n=5)
    assert not torch.allclose(fresh.log_prob(x), model.log_prob(x))
    state = torch.load(path, weights_only=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_prob(x), model.log_prob(x))


def test_checkpoint_round_trip_image(tmp_path):
    def build():
        return Flow(StandardNormal(IMG), [
            AffineCoupling(IMG, mask="checkerboard", hidden=HIDDEN),
            AdditiveCoupling(IMG, mask="channel", hidden=HIDDEN, flip=True),
            AffineCoupling(IMG, mask=_explicit_mask(IMG), hidden=HIDDEN, scale="sigmoid"),
        ])

    model = _randomize(build(), std=0.1, seed=4)
    path = tmp_path / "image_flow.pt"
    torch.save(model.state_dict(), path)
    fresh = build()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = _batch(IMG, n=2)
    assert torch.equal(fresh.log_prob(x), model.log_prob(x))
    assert torch.equal(fresh.transform[0].mask, model.transform[0].mask)
