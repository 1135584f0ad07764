"""Glow layers (Kingma & Dhariwal, 2018): ActNorm, invertible 1x1 convolution (LU), squeeze, split, one step.

All layers use NCHW tensors and the library convention: ``forward(x) -> (z, logabsdet)`` maps data to
latent, ``inverse(z) -> (x, logabsdet)`` maps back, with one log|det J| per sample. Under
``flowops.use_backend("reference")`` every layer runs its plain-PyTorch form (ActNorm's elementwise
ops, ``F.conv2d`` for the 1x1 convolution). Otherwise :class:`GlowStep` runs ActNorm and the 1x1
convolution as the fused op :func:`flowops.ops.actnorm_invconv` (one channel matmul per sample with
the folded weight and bias), and :class:`InvConv1x1` on its own applies its matrix as a batched
channel matmul on the ``[N, C, H*W]`` view instead of a 1x1 convolution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, ops
from .base import Compose, Transform
from ..ops.conv_net import conv_net_params
from ..ops.conv_net import fast_path as conv_net_fast
from .conditioners import conv_net
from .coupling import AdditiveCoupling, AffineCoupling

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _check_input(layer: str, arg: str, x, channels: int | None = None, dims=(4,)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{layer}: {arg} must be a floating tensor, got {x.dtype}")
    if x.dim() not in dims:
        want = " or ".join({2: "[batch, channels]", 4: "[batch, channels, height, width]"}[d] for d in dims)
        raise ValueError(f"{layer}: {arg} must have shape {want}, got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{layer}: {arg} must have {channels} channels along dim 1, got shape {tuple(x.shape)}")


def _spatial(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _fused(x: torch.Tensor) -> bool:
    """True when the flowops kernels (not the plain-PyTorch reference) should run for ``x``."""
    return _backend.select(x.device) != "reference"


class ActNorm(Transform):
    """Per-channel affine normalization ``z = (x + bias) * exp(log_scale)``.

    Data-dependent initialization: the first ``forward`` call in training mode sets ``bias`` and
    ``log_scale`` so that this batch comes out with zero mean and unit variance per channel (statistics
    over batch and spatial positions). It happens once; the buffer ``initialized`` records it, so a model
    restored with ``load_state_dict`` does not re-initialize. ``inverse`` never initializes. Under
    ``torch.compile``, and once it is set, a Python mirror of the flag is read (no graph break, no device
    sync); it follows ``initialize`` and ``load_state_dict`` (use those rather than editing the buffer). Accepts ``[N, C, H, W]`` and ``[N, C]`` inputs; log|det| = H * W * sum(log_scale).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.channels = _positive_int("ActNorm: channels", channels)
        if not float(eps) > 0:
            raise ValueError(f"ActNorm: eps must be positive, got {eps}")
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(self.channels))
        self.bias = nn.Parameter(torch.zeros(self.channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_flag = False  # Python mirror of the buffer, read under torch.compile (no graph break)

    def is_initialized(self) -> bool:
        # Once set, the Python flag answers without reading the buffer (no device sync per training step).
        if self._initialized_flag or torch.compiler.is_compiling():
            return self._initialized_flag
        self._initialized_flag = bool(self.initialized)
        return self._initialized_flag

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_flag = bool(self.initialized)

    def _view(self, p, x):
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias and scale from the batch ``x`` and mark the layer initialized."""
        _check_input("ActNorm", "x", x, self.channels, dims=(2, 4))
        if x.shape[0] == 0:
            raise ValueError("ActNorm: cannot initialize from an empty batch")
        dims = [0] + list(range(2, x.dim()))
        xf = x.detach().to(self.bias.dtype)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(xf).all()):
            raise ValueError("ActNorm: the initialization batch x contains NaN or inf")
        mean = xf.mean(dim=dims)
        std = xf.std(dim=dims, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._initialized_flag = True

    def forward(self, x):
        _check_input("ActNorm", "x", x, self.channels, dims=(2, 4))
        if self.training and not self.is_initialized():
            self.initialize(x)
        z = (x + self._view(self.bias, x)) * self._view(self.log_scale.exp(), x)
        return z, (_spatial(x) * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z):
        _check_input("ActNorm", "z", z, self.channels, dims=(2, 4))
        x = z * self._view(torch.exp(-self.log_scale), z) - self._view(self.bias, z)
        return x, (-_spatial(z) * self.log_scale.sum()).expand(z.shape[0])


class InvConv1x1(Transform):
    """Invertible 1x1 convolution with the LU parameterization ``W = P L (U + diag(sign * exp(log_s)))``.

    ``P`` (a permutation matrix) and ``sign`` are fixed buffers; ``lower`` (strictly lower part used,
    unit diagonal implied), ``upper`` (strictly upper part used) and ``log_s`` are free. Initialized from
    a random orthogonal matrix. ``forward`` computes ``z[:, i] = sum_j W[i, j] x[:, j]`` as a 1x1
    convolution (``[N, C]`` inputs: a linear map); log|det| = H * W * sum(log_s).

    ``inverse`` uses ``W^-1 = (U + diag)^-1 L^-1 P^T`` from two triangular solves. With grad mode off (or
    no parameter requiring grad) the inverse weight is cached and reused for repeated sampling; the cache
    is keyed on the parameters' version counters and data pointers, so in-place updates (optimizer steps,
    ``load_state_dict``, ``.to()``) invalidate it. Changes made through ``.data`` bypass version counters:
    call :meth:`invalidate_cache` after those. With grad enabled the inverse weight is recomputed
    differentiably every call, and under ``torch.compile`` it is always recomputed (traced, no cache).
    Outside the reference backend, ``forward`` caches ``W`` the same way (:meth:`forward_weight`) and
    applies both matrices as a batched channel matmul on the ``[N, C, H*W]`` view.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        c = self.channels = _positive_int("InvConv1x1: channels", channels)
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=generator, dtype=torch.float64))
        p, lo, up = torch.linalg.lu(q)
        diag = torch.diagonal(up)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c), -1))
        self.register_buffer("eye", torch.eye(c))
        self.lower = nn.Parameter(torch.tril(lo, -1).float())
        self.upper = nn.Parameter(torch.triu(up, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())
        self._inv_cache = None
        self._w_cache = None

    def _factors(self):
        lo = self.lower * self.lower_mask + self.eye
        up = self.upper * self.lower_mask.t() + torch.diag(self.sign * torch.exp(self.log_s))
        return lo, up

    def weight(self) -> torch.Tensor:
        """The ``[C, C]`` matrix W (differentiable)."""
        lo, up = self._factors()
        return self.perm @ lo @ up

    def _inverse_weight_uncached(self) -> torch.Tensor:
        lo, up = self._factors()
        # W^-1 = up^-1 lo^-1 P^T: solve lo Y = P^T, then up X = Y.
        y = torch.linalg.solve_triangular(lo, self.perm.t(), upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(up, y, upper=True)

    def _cache_tensors(self):
        return (self.lower, self.upper, self.log_s, self.perm, self.sign)

    def _cache_key(self):
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in self._cache_tensors())

    def invalidate_cache(self) -> None:
        self._inv_cache = None
        self._w_cache = None

    def _cached(self, slot: str, build):
        """``build()``, or its cached value when no gradient is needed (see the class docs)."""
        params = (self.lower, self.upper, self.log_s)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return build()
        key, tensors = self._cache_key(), self._cache_tensors()
        cache = getattr(self, slot, None)
        # The cache holds the keyed tensors themselves, so their memory cannot be reused by replacements,
        # and a copy of the free parameters' values: some in-place updates (the fused Adam/AdamW step) do
        # not bump version counters, so the values are compared too (three C x C comparisons, negligible
        # next to the matmul they serve).
        if (cache is not None and cache[0] == key and all(a is b for a, b in zip(cache[1], tensors))
                and all(torch.equal(a, b) for a, b in zip(cache[3], params))):
            return cache[2]
        with torch.no_grad():
            value = build()
            snapshot = tuple(p.detach().clone() for p in params)
        setattr(self, slot, (key, tensors, value, snapshot))
        return value

    def inverse_weight(self) -> torch.Tensor:
        """``W^-1`` (cached when no gradient is needed, see the class docs)."""
        return self._cached("_inv_cache", self._inverse_weight_uncached)

    def _fast_weight(self) -> torch.Tensor:
        from ..ops.actnorm_invconv import lu_weight

        return lu_weight(self.perm, self.lower, self.upper, self.sign, self.log_s)

    def forward_weight(self) -> torch.Tensor:
        """``W`` for the fused paths' forward: one C++ autograd node on CPU (see
        :func:`flowops.ops.actnorm_invconv.lu_weight`), cached like :meth:`inverse_weight` when no gradient
        is needed."""
        return self._cached("_w_cache", self._fast_weight)

    def _apply_weight(self, x, w):
        if x.dtype != w.dtype:
            raise TypeError(f"InvConv1x1: input dtype {x.dtype} must match the parameters' dtype {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"InvConv1x1: input must be on the parameters' device ({w.device}), got {x.device}")
        if x.dim() == 2:
            return F.linear(x, w)
        if _fused(x):
            # a channel matmul on the [N, C, H*W] view: no permute copies, and far cheaper on CPU
            # than a 1x1 convolution
            return torch.matmul(w, x.reshape(x.shape[0], self.channels, -1)).view(x.shape)
        return F.conv2d(x, w.view(self.channels, self.channels, 1, 1))

    def _logdet(self, x):
        return (_spatial(x) * self.log_s.sum()).expand(x.shape[0])

    def forward(self, x):
        _check_input("InvConv1x1", "x", x, self.channels, dims=(2, 4))
        w = self.forward_weight() if _fused(x) else self.weight()
        return self._apply_weight(x, w), self._logdet(x)

    def inverse(self, z):
        _check_input("InvConv1x1", "z", z, self.channels, dims=(2, 4))
        return self._apply_weight(z, self.inverse_weight()), -self._logdet(z)


class Squeeze(Transform):
    """2x2 space-to-depth: ``[N, C, H, W] -> [N, 4C, H/2, W/2]``; log|det| = 0.

    Output channel ``4 * c + 2 * i + j`` holds input channel ``c`` at the offset ``(i, j)`` of each 2x2
    block. ``H`` and ``W`` must be even.
    """

    def forward(self, x):
        _check_input("Squeeze", "x", x)
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze: height and width of x must be even, got shape {tuple(x.shape)}")
        y = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(n)

    def inverse(self, z):
        _check_input("Squeeze", "z", z)
        n, c4, h, w = z.shape
        if c4 % 4:
            raise ValueError(f"Squeeze: channels of z must be a multiple of 4, got shape {tuple(z.shape)}")
        c = c4 // 4
        x = z.reshape(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 2 * h, 2 * w)
        return x, z.new_zeros(n)


class Split(nn.Module):
    """Factor out channels with Glow's learned conditional Gaussian prior.

    For ``x`` with ``channels`` channels, the first ``channels - channels // 2`` are kept (they continue
    through the flow) and the last ``channels // 2`` are factored out. A zero-initialized conv3x3 on the
    kept part gives the mean ``mu`` and log-std ``log_sigma`` of the factored part (first and second
    half of its output channels), so at initialization the prior is N(0, I).

    The factored latent is returned *standardized*: ``forward(x) -> (kept, eps, logabsdet)`` with
    ``eps = (x2 - mu) * exp(-log_sigma)`` and ``logabsdet = -sum(log_sigma)`` per sample. Then
    ``log N(x2; mu, sigma) = log N(eps; 0, I) + logabsdet``: the prior term is a standard-normal density
    of ``eps`` and the split is an ordinary transform with a log-det, which is how :class:`Glow` counts
    it. ``inverse(kept, eps) -> (x, +sum(log_sigma))`` is exact. ``sample(kept, temperature)`` draws
    ``eps ~ N(0, temperature^2 I)``, i.e. ``x2 ~ N(mu, (temperature * sigma)^2)`` (Glow's temperature).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = _positive_int("Split: channels", channels, minimum=2)
        self.factored = self.channels // 2
        self.kept = self.channels - self.factored
        self.prior = nn.Conv2d(self.kept, 2 * self.factored, 3, padding=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def _stats(self, kept):
        h = _conv_layout(self.prior, kept)
        return h[:, : self.factored], h[:, self.factored:]

    def forward(self, x):
        _check_input("Split", "x", x, self.channels)
        kept, x2 = x[:, : self.kept], x[:, self.kept:]
        mu, log_sigma = self._stats(kept)
        eps = (x2 - mu) * torch.exp(-log_sigma)
        return kept, eps, -log_sigma.flatten(1).sum(1)

    def _check_kept(self, kept, arg="kept"):
        _check_input("Split", arg, kept, self.kept)

    def inverse(self, kept, eps):
        self._check_kept(kept)
        _check_input("Split", "eps", eps, self.factored)
        if eps.shape[0] != kept.shape[0] or eps.shape[2:] != kept.shape[2:]:
            raise ValueError(f"Split: eps must have shape {(kept.shape[0], self.factored, *kept.shape[2:])}, "
                             f"got {tuple(eps.shape)}")
        mu, log_sigma = self._stats(kept)
        x2 = mu + torch.exp(log_sigma) * eps
        return torch.cat((kept, x2), dim=1), log_sigma.flatten(1).sum(1)

    def sample(self, kept, temperature: float = 1.0, generator: torch.Generator | None = None):
        """Draw the factored part given ``kept``; returns the full ``x`` (``channels`` channels)."""
        self._check_kept(kept)
        if not float(temperature) >= 0:
            raise ValueError(f"Split: temperature must be non-negative, got {temperature}")
        eps = torch.randn((kept.shape[0], self.factored, *kept.shape[2:]), dtype=kept.dtype, device=kept.device,
                          generator=generator) * float(temperature)
        return self.inverse(kept, eps)[0]


class _ReLUInPlace(torch.autograd.Function):
    """``relu_`` whose backward also works in place: the incoming gradient (the next convolution's fresh input
    gradient) is masked where it lies instead of into a new buffer, so a conditioner's backward holds one
    hidden-sized buffer less at its peak. Falls back to an out-of-place mask when the gradient is not a dense
    tensor (expanded or overlapping)."""

    @staticmethod
    def forward(ctx, h):
        h.relu_()
        ctx.mark_dirty(h)
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        if grad.is_contiguous(memory_format=torch.channels_last) or grad.is_contiguous():
            return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)
        return torch.ops.aten.threshold_backward(grad, out, 0)


def _relu_(h: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and h.requires_grad and not torch.compiler.is_compiling():
        return _ReLUInPlace.apply(h)
    return F.relu_(h)


def _conv_layout(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``module(h)`` for a convolutional conditioner. Outside the reference backend, on the CPU, Glow's own
    conditioner (:func:`flowops.nn.conv_net`, recognized by :func:`flowops.ops.conv_net.conv_net_params`)
    runs as the fused op :func:`flowops.ops.conv_net` where the C++ extension has it (float32/float64, not
    under torch.compile); any other convolutional module runs in the channels-last layout (oneDNN's
    convolutions skip their per-call layout reorders there: about 1.6x faster forward + backward for Glow's
    3x3 convolutions at 16x16 with 128 hidden channels). The result is contiguous NCHW; values are the
    same up to float rounding."""
    if h.dim() == 4 and h.device.type == "cpu" and _fused(h):
        params = conv_net_params(module)
        if params is not None and conv_net_fast(h):  # the C++ op checks the shapes
            return torch.ops.flowops.conv_net(h, *params)
        h = h.contiguous(memory_format=torch.channels_last)
        if isinstance(module, nn.Sequential):
            for m in module:  # ReLUs in place: no extra activation buffer (autograd keeps only their output)
                h = _relu_(h) if type(m) is nn.ReLU else m(h)
            return h.contiguous()
        return module(h).contiguous()
    return module(h)


class _AnySpatial:
    """Coupling mixin: accept any height/width (the conv conditioner does not depend on them)."""

    def _check(self, x):
        _check_input(type(self).__name__, "x", x, self.shape[0])

    def _params(self, h):
        p = _conv_layout(self.conditioner, h)
        if p.shape[1] != self.cond_out:
            raise ValueError(f"{type(self).__name__}: conditioner returned {p.shape[1]} channels along dim 1, "
                             f"expected {self.cond_out}")
        return p


class GlowAffineCoupling(_AnySpatial, AffineCoupling):
    """:class:`AffineCoupling` with a channel mask for ``[N, channels, H, W]`` inputs of any H, W."""

    def __init__(self, channels: int, hidden: int = 512, scale: str = "sigmoid"):
        c = _positive_int("GlowAffineCoupling: channels", channels, minimum=2)
        super().__init__((c, 1, 1), conditioner=lambda i, o: conv_net(i, o, hidden), mask="channel", scale=scale)


class GlowAdditiveCoupling(_AnySpatial, AdditiveCoupling):
    """:class:`AdditiveCoupling` with a channel mask for ``[N, channels, H, W]`` inputs of any H, W."""

    def __init__(self, channels: int, hidden: int = 512):
        c = _positive_int("GlowAdditiveCoupling: channels", channels, minimum=2)
        super().__init__((c, 1, 1), conditioner=lambda i, o: conv_net(i, o, hidden), mask="channel")


COUPLINGS = ("affine", "additive")


class GlowStep(Compose):
    """One Glow step: ActNorm -> InvConv1x1 -> coupling (data -> latent order).

    ``coupling="affine"`` uses Glow's ``sigmoid(raw + 2)`` scale; ``"additive"`` is volume preserving.
    The conditioner is ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialized conv3x3`` with ``hidden``
    channels (:func:`flowops.nn.conv_net`), so a fresh step is ActNorm followed by a rotation.

    Unless the backend is ``"reference"``, ActNorm and the 1x1 convolution run as the fused op
    :func:`flowops.ops.actnorm_invconv` (forward: ``W`` from :meth:`InvConv1x1.forward_weight`, rebuilt once
    per call as one C++ autograd node when gradients are needed, cached otherwise; inverse:
    :meth:`InvConv1x1.inverse_weight`, triangular solves, cached likewise). The children ``actnorm``, ``invconv`` and
    ``coupling`` keep their parameters, state_dict keys and their own ``forward``/``inverse``;
    ActNorm's data-dependent initialization still happens on the first training forward.
    """

    def __init__(self, channels: int, hidden: int = 512, coupling: str = "affine"):
        c = _positive_int("GlowStep: channels", channels, minimum=2)
        _positive_int("GlowStep: hidden", hidden)
        if coupling not in COUPLINGS:
            raise ValueError(f"GlowStep: coupling must be one of {COUPLINGS}, got {coupling!r}")
        cp = GlowAffineCoupling(c, hidden) if coupling == "affine" else GlowAdditiveCoupling(c, hidden)
        super().__init__(ActNorm(c), InvConv1x1(c), cp)
        self.channels, self.hidden, self.coupling_kind = c, hidden, coupling

    def norm_conv(self, x):
        """ActNorm then the 1x1 convolution: the fused op outside the reference backend, else the two
        layers in turn. ``(y, logabsdet)``."""
        an, ic = self.transforms[0], self.transforms[1]
        if not _fused(x):
            y, ld1 = an(x)
            y, ld2 = ic(y)
            return y, ld1 + ld2
        _check_input("GlowStep", "x", x, self.channels)
        if an.training and not an.is_initialized():
            an.initialize(x)
        return ops.actnorm_invconv(x, an.log_scale, an.bias, ic.forward_weight(), ic.log_s.sum(), inverse=False)

    def norm_conv_inverse(self, h):
        """Inverse of :meth:`norm_conv`: ``(x, logabsdet)``."""
        an, ic = self.transforms[0], self.transforms[1]
        if not _fused(h):
            x, ld1 = ic.inverse(h)
            x, ld2 = an.inverse(x)
            return x, ld1 + ld2
        _check_input("GlowStep", "z", h, self.channels)
        return ops.actnorm_invconv(h, an.log_scale, an.bias, ic.inverse_weight(), ic.log_s.sum(), inverse=True)

    def forward(self, x):
        if not _fused(x):
            return super().forward(x)
        h, ld = self.norm_conv(x)
        z, ld_c = self.transforms[2](h)
        return z, ld + ld_c

    def inverse(self, z):
        if not _fused(z):
            return super().inverse(z)
        _check_input("GlowStep", "z", z, self.channels)
        h, ld_c = self.transforms[2].inverse(z)
        x, ld = self.norm_conv_inverse(h)
        return x, ld_c + ld

    @property
    def actnorm(self) -> ActNorm:
        return self.transforms[0]

    @property
    def invconv(self) -> InvConv1x1:
        return self.transforms[1]

    @property
    def coupling(self) -> Transform:
        return self.transforms[2]
