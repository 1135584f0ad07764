"""Glow layers and model (reference PyTorch): log-dets, inverses, ActNorm init, 1x1-conv cache, preprocessing."""
import io
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from flowops.models import Glow
from flowops.nn import (ActNorm, GlowStep, InvConv1x1, LogitTransform, Split, Squeeze, bits_per_dim, dequantize,
                        discrete_bits_per_dim)


def _brute_logdet(fn, x):
    """log|det d fn(x_i) / d x_i| per sample, from the full Jacobian of one sample at a time."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        jac = jacobian(lambda v: fn(v.reshape(xi.shape)).flatten(), xi.flatten())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def _randomize(module, std=0.3):
    """Perturb every parameter (zero-initialized layers included) so nothing is trivially the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))


def _roundtrip(layer, x, rtol=0.0, atol=1e-10):
    z, ld = layer(x)
    xr, ldi = layer.inverse(z)
    torch.testing.assert_close(xr, x, rtol=rtol, atol=atol)
    torch.testing.assert_close(ld + ldi, torch.zeros_like(ld), rtol=0, atol=1e-8)
    return z, ld


def _save_load(module):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------------------------- ActNorm

def test_actnorm_data_dependent_init_once():
    an = ActNorm(3)
    assert not bool(an.initialized)
    x = torch.randn(8, 3, 5, 7) * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + 4.0
    z, _ = an(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert bool(an.initialized)
    params = [p.detach().clone() for p in an.parameters()]
    an(torch.randn(8, 3, 5, 7) * 10)  # a second batch must not re-initialize
    for p, q in zip(params, an.parameters()):
        assert torch.equal(p, q)


def test_actnorm_no_init_in_eval_or_inverse():
    an = ActNorm(2).eval()
    x = torch.randn(4, 2, 3, 3) * 5
    z, ld = an(x)
    assert torch.equal(z, x) and not bool(an.initialized) and torch.all(ld == 0)
    an.train()
    an.inverse(x)
    assert not bool(an.initialized)


def test_actnorm_init_survives_state_dict():
    an = ActNorm(4)
    an(torch.randn(6, 4, 3, 3) * 3 + 1)
    state = _save_load(an)
    fresh = ActNorm(4)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(fresh(x)[0], an(x)[0])  # training-mode forward, no re-init


def test_actnorm_logdet_and_inverse_float64():
    an = ActNorm(3).double()
    an(torch.randn(10, 3, 2, 3, dtype=torch.float64) * 2 - 1)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    z, ld = _roundtrip(an, x)
    torch.testing.assert_close(ld, _brute_logdet(lambda v: an(v)[0], x))
    torch.testing.assert_close(ld, 6 * an.log_scale.sum().expand(2))
    # [N, C] inputs too
    x2 = torch.randn(3, 3, dtype=torch.float64)
    _, ld2 = _roundtrip(an, x2)
    torch.testing.assert_close(ld2, _brute_logdet(lambda v: an(v)[0], x2))


def test_actnorm_bad_input():
    with pytest.raises(ValueError, match="channels"):
        ActNorm(0)
    with pytest.raises(TypeError, match="channels"):
        ActNorm(2.5)
    an = ActNorm(3)
    with pytest.raises(ValueError, match="x must have 3 channels"):
        an(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="x must be a floating"):
        an(torch.ones(2, 3, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        an(torch.randn(0, 3, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        an(torch.full((2, 3, 2, 2), float("nan")))
    assert not bool(an.initialized)


# -------------------------------------------------------------------------------------------- InvConv1x1

def test_invconv_init_orthogonal_and_lu():
    conv = InvConv1x1(5).double()
    w = conv.weight()
    torch.testing.assert_close(w @ w.t(), torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(conv.log_s.sum().item()) < 1e-6
    lo, up = conv._factors()
    assert torch.equal(torch.triu(lo, 1), torch.zeros(5, 5, dtype=torch.float64))
    assert torch.equal(torch.diagonal(lo), torch.ones(5, dtype=torch.float64))
    assert torch.equal(torch.tril(up, -1), torch.zeros(5, 5, dtype=torch.float64))
    torch.testing.assert_close(w, conv.perm @ lo @ up)


def test_invconv_logdet_vs_slogdet_and_jacobian(monkeypatch):
    conv = InvConv1x1(4).double()
    _randomize(conv)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    expected = 6 * torch.linalg.slogdet(conv.weight())[1]
    brute = _brute_logdet(lambda v: conv(v)[0], x)

    def forbidden(*a, **k):
        raise AssertionError("general inverse/determinant called")

    for name in ("inv", "det", "slogdet", "solve", "pinv"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr(torch, "inverse", forbidden)
    monkeypatch.setattr(torch, "det", forbidden)
    z, ld = _roundtrip(conv, x)
    with torch.no_grad():
        _roundtrip(conv, x)
    monkeypatch.undo()
    torch.testing.assert_close(ld, expected.expand(2))
    torch.testing.assert_close(ld, brute)
    torch.testing.assert_close(z, torch.einsum("ij,njhw->nihw", conv.weight(), x))
    torch.testing.assert_close(conv.inverse_weight(), torch.linalg.inv(conv.weight()))
    # [N, C] inputs are a plain linear map
    v = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(conv(v)[0], v @ conv.weight().t())


def test_invconv_inverse_cache_and_invalidation():
    conv = InvConv1x1(6)
    z = torch.randn(3, 6, 4, 4)
    with torch.no_grad():
        w1 = conv.inverse_weight()
        assert conv.inverse_weight() is w1  # cache hit
        conv.log_s.add_(0.5)  # in-place change: the inverse must follow
        w2 = conv.inverse_weight()
        assert w2 is not w1
        torch.testing.assert_close(w2 @ conv.weight(), torch.eye(6), atol=1e-5, rtol=0)
        conv.lower.mul_(1.5)
        x, _ = conv.inverse(z)
        torch.testing.assert_close(conv(x)[0], z, atol=1e-5, rtol=1e-5)
    opt = torch.optim.SGD(conv.parameters(), lr=0.05)
    conv(torch.randn(2, 6, 3, 3))[0].pow(2).mean().backward()
    with torch.no_grad():
        before = conv.inverse_weight()
        assert conv.inverse_weight() is before
    opt.step()
    with torch.no_grad():
        assert conv.inverse_weight() is not before
    with torch.no_grad():
        x, _ = conv.inverse(z)
        torch.testing.assert_close(conv(x)[0], z, atol=1e-5, rtol=1e-5)
        # load_state_dict copies in place and invalidates too
        other = InvConv1x1(6)
        conv.load_state_dict(other.state_dict())
        torch.testing.assert_close(conv.inverse(z)[0], other.inverse(z)[0])
        # .data bypasses version counters: invalidate_cache is the documented escape hatch
        conv.upper.data.add_(0.3)
        conv.invalidate_cache()
        torch.testing.assert_close(conv(conv.inverse(z)[0])[0], z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opt_kw", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_invconv_caches_follow_every_adam_flavour(opt_kw):
    # the fused Adam step updates parameters in place without bumping their version counters: the cached
    # W and W^-1 must still follow (they compare the parameters' values too)
    torch.manual_seed(0)
    conv = InvConv1x1(5)
    z = torch.randn(2, 5, 3, 3)
    with torch.no_grad():
        w_inv, w = conv.inverse_weight(), conv.forward_weight()
    opt = torch.optim.Adam(conv.parameters(), lr=0.1, **opt_kw)
    conv(torch.randn(4, 5, 3, 3))[0].pow(3).mean().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(conv.forward_weight(), conv.weight(), atol=1e-6, rtol=0)
        torch.testing.assert_close(conv.inverse_weight() @ conv.weight(), torch.eye(5), atol=1e-5, rtol=0)
        assert not torch.allclose(conv.inverse_weight(), w_inv) and not torch.allclose(conv.forward_weight(), w)
        x, _ = conv.inverse(z)
        torch.testing.assert_close(conv(x)[0], z, atol=1e-5, rtol=1e-5)


def test_glow_sampling_reuses_cached_inverse(monkeypatch):
    model = Glow((1, 4, 4), levels=2, steps=2, hidden=4)
    model.log_prob(torch.randn(4, 1, 4, 4))
    calls = []
    solve = torch.linalg.solve_triangular
    monkeypatch.setattr(torch.linalg, "solve_triangular", lambda *a, **k: calls.append(1) or solve(*a, **k))
    with torch.no_grad():
        model.sample(3)
        first = len(calls)
        model.sample(3)
    assert first == 2 * 4 and len(calls) == first  # 4 InvConv1x1 layers, two solves each, then cache hits
    for p in model.parameters():
        p.requires_grad_(False)
    model.sample(2)  # grad mode on but nothing requires grad: cached too
    assert len(calls) == first
    with torch.no_grad():
        model.transform.flows[0][0].invconv.log_s.add_(0.1)
        model.sample(2)
    assert len(calls) == first + 2
    model.transform.flows[0][0].invconv.log_s = torch.nn.Parameter(torch.zeros(4))  # replaced tensor
    with torch.no_grad():
        model.sample(2)
    assert len(calls) == first + 4


def test_invconv_inverse_differentiable_with_grad():
    conv = InvConv1x1(4)
    with torch.no_grad():
        conv.inverse_weight()  # populate the cache; it must not be used when gradients are needed
    z = torch.randn(2, 4, 3, 3)
    x, ld = conv.inverse(z)
    (x.sum() + ld.sum()).backward()
    for p in conv.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_invconv_bad_input():
    conv = InvConv1x1(3)
    with pytest.raises(ValueError, match="3 channels"):
        conv(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="z must have shape"):
        conv.inverse(torch.randn(2, 3, 2))
    with pytest.raises(TypeError, match="dtype"):
        conv(torch.randn(2, 3, 2, 2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ Squeeze/Split

def test_squeeze_layout_roundtrip_and_errors():
    sq = Squeeze()
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    y, ld = sq(x)
    assert y.shape == (2, 12, 2, 3) and torch.all(ld == 0)
    # channel 4c + 2i + j holds x[:, c, 2h + i, 2w + j]
    for c, i, j in ((0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)):
        assert torch.equal(y[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    _roundtrip(sq, x, atol=0)
    with pytest.raises(ValueError, match="even"):
        sq(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="even"):
        sq(torch.randn(1, 1, 4, 5))
    with pytest.raises(ValueError, match="x must have shape"):
        sq(torch.randn(4, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        sq.inverse(torch.randn(1, 6, 2, 2))


def test_split_prior_roundtrip_and_sampling():
    sp = Split(6).double()
    _randomize(sp, 0.2)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    kept, eps, ld = sp(x)
    assert kept.shape == (3, 3, 4, 5) and eps.shape == (3, 3, 4, 5)
    xr, ldi = sp.inverse(kept, eps)
    torch.testing.assert_close(xr, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld + ldi, torch.zeros(3, dtype=torch.float64))
    # the documented identity: log N(x2; mu, sigma) = log N(eps; 0, I) + logabsdet
    h = sp.prior(kept)
    mu, log_sigma = h[:, :3], h[:, 3:]
    direct = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(x[:, 3:]).flatten(1).sum(1)
    std = torch.distributions.Normal(0.0, 1.0).log_prob(eps).flatten(1).sum(1)
    torch.testing.assert_close(std + ld, direct)
    # as a map x -> (kept, eps) its Jacobian log-det is the returned one
    brute = _brute_logdet(lambda v: torch.cat([t.flatten(1) for t in sp(v)[:2]], 1), x[:2])
    torch.testing.assert_close(ld[:2], brute)
    # temperature 0 samples the prior mean
    torch.testing.assert_close(sp.sample(kept, temperature=0.0)[:, 3:], mu)
    g = torch.Generator().manual_seed(1)
    s = sp.sample(kept, temperature=0.5, generator=g)
    assert torch.equal(s[:, :3], kept) and s.shape == x.shape


def test_split_errors():
    with pytest.raises(ValueError, match="channels"):
        Split(1)
    sp = Split(4)
    with pytest.raises(ValueError, match="4 channels"):
        sp(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="kept must have 2 channels"):
        sp.inverse(torch.randn(2, 3, 3, 3), torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="eps must have shape"):
        sp.inverse(torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match="temperature"):
        sp.sample(torch.randn(2, 2, 3, 3), temperature=-1.0)


# ----------------------------------------------------------------------------------------------- GlowStep

@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_glow_step_logdet_and_inverse_float64(coupling):
    step = GlowStep(4, hidden=6, coupling=coupling).double()
    step(torch.randn(8, 4, 3, 2, dtype=torch.float64))  # ActNorm init
    _randomize(step)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    _, ld = _roundtrip(step, x)
    torch.testing.assert_close(ld, _brute_logdet(lambda v: step(v)[0], x))


def test_glow_step_errors():
    with pytest.raises(ValueError, match="coupling"):
        GlowStep(4, 8, coupling="spline")
    with pytest.raises(ValueError, match="channels"):
        GlowStep(1, 8)
    with pytest.raises(ValueError, match="4 channels"):
        GlowStep(4, 8)(torch.randn(1, 3, 2, 2))


# ------------------------------------------------------------------------------------------- Glow model

def test_glow_logdet_brute_force_float64():
    model = Glow((1, 4, 4), levels=2, steps=1, hidden=4).double()
    model(torch.randn(6, 1, 4, 4, dtype=torch.float64))
    _randomize(model, 0.2)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    z, ld = _roundtrip(model, x)
    assert z.shape == (2, 16)
    torch.testing.assert_close(ld, _brute_logdet(lambda v: model(v)[0], x))
    torch.testing.assert_close(model.log_prob(x), model.base.log_prob(z) + ld)


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_glow_roundtrip_and_gradients_through_training(coupling):
    torch.manual_seed(0)
    model = Glow((3, 8, 8), levels=2, steps=2, hidden=16, coupling=coupling)
    assert model.transform.latent_shapes == ((6, 4, 4), (24, 2, 2))
    data = torch.rand(16, 3, 8, 8) * 2 - 1

    def check_roundtrip():
        with torch.no_grad():
            x = data[:5]
            z, ld = model(x)
            xr, ldi = model.inverse(z)
            assert (xr - x).abs().max() <= 1e-4 * x.abs().max()
            assert (ld + ldi).abs().max() <= 1e-4 * ld.abs().max().clamp_min(1.0)
            zz = torch.randn(4, model.transform.dim)
            z2 = model(model.inverse(zz)[0])[0]
            assert (z2 - zz).abs().max() <= 1e-4 * zz.abs().max()

    lp0 = model.log_prob(data)  # initializes ActNorm
    assert torch.isfinite(lp0).all()
    check_roundtrip()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = -model.log_prob(data).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    check_roundtrip()
    opt.zero_grad()
    (-model.log_prob(data).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_glow_latent_parts_sampling_and_state_dict():
    model = Glow((2, 4, 8), levels=2, steps=1, hidden=8)
    x = torch.randn(5, 2, 4, 8)
    model.log_prob(x)
    parts = model.latents(x)
    assert [tuple(p.shape[1:]) for p in parts] == list(model.transform.latent_shapes)
    assert torch.equal(model.transform.flatten(parts), model(x)[0])
    g = torch.Generator().manual_seed(0)
    s = model.sample(3, temperature=0.7, generator=g)
    assert s.shape == (3, 2, 4, 8) and torch.isfinite(s).all()
    s0 = model.sample(2, temperature=0.0)
    torch.testing.assert_close(s0[0], s0[1])
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=-0.5)
    fresh = Glow((2, 4, 8), levels=2, steps=1, hidden=8)
    fresh.load_state_dict(_save_load(model))
    torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x))  # train mode: no re-init after load


def test_glow_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        Glow((1, 6, 8), levels=2, steps=1, hidden=4)
    with pytest.raises(ValueError, match="in_shape"):
        Glow((8, 8), levels=1, steps=1, hidden=4)
    with pytest.raises(ValueError, match="coupling"):
        Glow((1, 4, 4), levels=1, steps=1, hidden=4, coupling="x")
    with pytest.raises(ValueError, match="levels"):
        Glow((1, 4, 4), levels=0, steps=1, hidden=4)
    model = Glow((1, 4, 4), levels=1, steps=1, hidden=4)
    with pytest.raises(ValueError, match="x must have shape"):
        model.log_prob(torch.randn(2, 1, 4, 6))
    with pytest.raises(ValueError, match="z must have 16 channels"):
        model.inverse(torch.randn(2, 15))


# ----------------------------------------------------------------------------------------- preprocessing

def test_dequantize_range_and_errors():
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    v = dequantize(x, 256)
    assert v.dtype == torch.float32 and v.min() >= 0 and v.max() < 1
    assert torch.equal(torch.floor(v * 256).to(torch.uint8), x)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        dequantize(torch.tensor([[0, 4]]), n_levels=4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        dequantize(torch.tensor([[-1.0, 2.0]]), n_levels=4)
    with pytest.raises(ValueError, match="whole numbers"):
        dequantize(torch.tensor([[0.5, 2.0]]), n_levels=4)
    with pytest.raises(ValueError, match="n_levels"):
        dequantize(torch.tensor([[0, 1]]), n_levels=1)


def test_logit_transform_logdet_inverse_and_range():
    lt = LogitTransform(0.05)
    x = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    _, ld = _roundtrip(lt, x, atol=1e-12)
    torch.testing.assert_close(ld, _brute_logdet(lambda v: lt(v)[0], x))
    y, _ = lt(x)
    assert y.min() >= math.log(0.05 / 0.95) - 1e-12 and y.max() <= math.log(0.95 / 0.05) + 1e-12
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        lt(torch.tensor([[0.5, 1.2]]))
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        lt(torch.tensor([[0.5, -0.1]]))
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        lt(torch.tensor([[float("nan"), 0.1]]))
    with pytest.raises(ValueError, match="alpha"):
        LogitTransform(0.5)
    with pytest.raises(ValueError, match="open interval"):
        LogitTransform(0.0)(torch.tensor([[0.0, 0.5]]))


class _UniformOnLogit:
    """The density of y = logit(alpha + (1 - 2 alpha) v) when v is uniform on [0, 1)^D."""

    def __init__(self, alpha):
        self.lt = LogitTransform(alpha)

    def log_prob(self, y):
        return self.lt.inverse(y)[1]


class _BinDensity:
    """Piecewise-constant density on [0, 1)^D giving each discrete level k the probability q[k] (per dim)."""

    def __init__(self, q):
        self.q = q

    def log_prob(self, v):
        k = torch.floor(v * len(self.q)).long()
        return torch.log(self.q[k] * len(self.q)).flatten(1).sum(1)


@pytest.mark.parametrize("n_levels", [2, 16, 256])
def test_bits_per_dim_known_cases(n_levels):
    x = torch.randint(0, n_levels, (7, 1, 4, 4))
    g = torch.Generator().manual_seed(0)
    # uniform density of v: log2(n_levels) bits/dim, with or without the logit transform
    bpd = bits_per_dim(torch.zeros(7), 16, n_levels)
    torch.testing.assert_close(bpd, torch.full((7,), math.log2(n_levels)))
    bpd = discrete_bits_per_dim(_UniformOnLogit(0.05), x.double(), n_levels, alpha=0.05, generator=g)
    torch.testing.assert_close(bpd, torch.full((7,), math.log2(n_levels), dtype=torch.float64))
    # a density that is constant on each bin gives the exact discrete code length
    q = torch.rand(n_levels, dtype=torch.float64) + 0.1
    q = q / q.sum()
    bpd = discrete_bits_per_dim(_BinDensity(q), x.double(), n_levels, alpha=None, generator=g)
    exact = -torch.log2(q[x]).flatten(1).sum(1) / 16
    torch.testing.assert_close(bpd, exact)
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(torch.zeros(2), 0, n_levels)


def test_glow_on_discrete_pixels_bits_per_dim():
    model = Glow((1, 4, 4), levels=2, steps=1, hidden=8)
    x = torch.randint(0, 256, (8, 1, 4, 4))
    bpd = discrete_bits_per_dim(model, x, 256)
    assert bpd.shape == (8,) and torch.isfinite(bpd).all() and (bpd > 0).all()


def test_glow_awkward_shapes_batch_one():
    model = Glow((3, 12, 20), levels=2, steps=1, hidden=5, coupling="additive")
    x = torch.randn(1, 3, 12, 20)
    lp = model.log_prob(x)
    assert lp.shape == (1,) and torch.isfinite(lp).all()
    assert model.transform.latent_shapes == ((6, 6, 10), (24, 3, 5))
    with torch.no_grad():
        z, ld = model(x)
        xr, ldi = model.inverse(z)
    assert (xr - x).abs().max() <= 1e-4 * x.abs().max()
    assert (ld + ldi).abs().max() <= 1e-4 * ld.abs().max().clamp_min(1.0)


def test_glow_traces_without_graph_breaks():
    model = Glow((1, 4, 4), levels=2, steps=1, hidden=4)
    x = torch.randn(3, 1, 4, 4)
    log_prob = torch.compile(model.log_prob, fullgraph=True, backend="eager")
    torch.testing.assert_close(log_prob(x), model.log_prob(x))  # first call initializes ActNorm inside the trace
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))
    z = torch.randn(2, 16)
    with torch.no_grad():
        inverse = torch.compile(model.inverse, fullgraph=True, backend="eager")
        torch.testing.assert_close(inverse(z)[0], model.inverse(z)[0])


def test_actnorm_load_uninitialized_state_resets_flag():
    an = ActNorm(2)
    an(torch.randn(4, 2, 3, 3))
    an.load_state_dict(ActNorm(2).state_dict())  # an uninitialized state: the next training batch initializes
    assert not an.is_initialized()
    x = torch.randn(5, 2, 3, 3) * 3 + 2
    z, _ = an(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)


def test_inplace_relu_of_the_fused_conditioners():
    """The fused path's ReLU masks its incoming gradient in place; values and gradients equal F.relu's,
    also for a gradient that is not a dense tensor of its own (an expanded one falls back)."""
    from flowops.nn import glow as G

    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        h = torch.nn.functional.conv2d(x.contiguous(memory_format=memory_format), w, padding=1)
        want = torch.autograd.grad((torch.relu(h) * g).sum(), (x, w))
        h = torch.nn.functional.conv2d(x.contiguous(memory_format=memory_format), w, padding=1)
        out = G._relu_(h)
        torch.testing.assert_close(out.detach(), torch.relu(torch.nn.functional.conv2d(x, w, padding=1)).detach())
        got = torch.autograd.grad((out * g).sum(), (x, w))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # an expanded incoming gradient (sum's backward) cannot be written in place: out-of-place fallback
        h = torch.nn.functional.conv2d(x, w, padding=1)
        got = torch.autograd.grad(G._relu_(h).sum(), (x, w))
        h = torch.nn.functional.conv2d(x, w, padding=1)
        want = torch.autograd.grad(torch.relu(h).sum(), (x, w))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no graph: plain relu_
        h = torch.randn(3, 3)
        assert G._relu_(h) is h and bool((h >= 0).all())
