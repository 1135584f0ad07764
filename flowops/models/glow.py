"""Glow: a multi-scale flow of (squeeze, K x [ActNorm, 1x1 conv, coupling], split) levels on NCHW images."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..distributions import StandardNormal
from ..flow import Flow
from ..nn.base import Compose, Transform
from ..nn.glow import COUPLINGS, GlowStep, Split, Squeeze, _check_input, _positive_int

# Stored inputs of a reversible Glow (``checkpoints``): memory independent of depth; see GlowTransform.
DEFAULT_CHECKPOINTS = 32
DEFAULT_KINK_TOL = 1e-4  # reversible mode: ReLU-kink records on by default (float32 gradients as ordinary backprop's)


class GlowTransform(Transform):
    """The multi-scale Glow map between images ``[N, C, H, W]`` and flat latents ``[N, C * H * W]``.

    Level ``l`` (of ``levels``) squeezes, runs ``steps`` :class:`GlowStep` s and, except for the last
    level, :class:`Split` s off half of the channels. The flat latent is the concatenation (each flattened
    in C, H, W order) of the standardized split latents, level 0 first, then the final latent; see
    :attr:`latent_shapes`, :meth:`unflatten` and :meth:`flatten`. Every part is standard normal under
    the model: each split's learned prior enters as its log-det ``-sum(log_sigma)``.

    ``reversible=True`` trains by reversible recomputation (:mod:`flowops.reversible`): the forward keeps
    only the latents and the log-det, the backward rebuilds each layer's input from its output; the
    split latents are outputs of the reversible node. ``checkpoints=c`` (default 32) also stores the inputs
    of ``c`` evenly spaced layers whatever the depth (squeezes, ActNorm + 1x1 conv pairs, couplings and splits
    counted one by one; ``None``: only the bottom one), so that rebuilds restart from exact tensors: float32
    gradients as close to the float64 ones as ordinary backprop's, for memory that does not grow with depth.
    ``checkpoint_every=k`` adds the input of every k-th layer. ``kink_tol`` (default 1e-4; None: off) keeps the
    conditioners' ReLUs on the forward's side of their kinks in the backward (ReLU-kink records, see
    :mod:`flowops.reversible`): the recomputed gradients then stay as close to ordinary backprop's in float32
    as in float64, for a few KB per coupling and little time. The attributes ``drift_tol`` and ``on_drift`` set
    the drift check, ``micro_batch`` the backward's slices, ``bit_exact`` the exact rebuilds (see
    :class:`flowops.ReversibleSequential`).
    Values, gradients and the state_dict layout are those of the ordinary model; the attribute
    ``reversible`` can be switched at any time.
    """

    def __init__(self, in_shape, levels: int = 3, steps: int = 8, hidden: int = 512, coupling: str = "affine",
                 reversible: bool = False, checkpoint_every: int | None = None,
                 checkpoints: int | None = DEFAULT_CHECKPOINTS, kink_tol: float | None = DEFAULT_KINK_TOL):
        super().__init__()
        from ..reversible import _check_checkpoints, _check_kink_tol, _check_options

        self.reversible = bool(reversible)
        self.checkpoint_every = _check_options(checkpoint_every, None, "warn")
        self.checkpoints = _check_checkpoints(checkpoints)
        self.kink_tol = _check_kink_tol(kink_tol)
        self.drift_tol, self.on_drift, self.micro_batch, self.bit_exact = None, "warn", None, False
        if not isinstance(in_shape, (tuple, list, torch.Size)) or len(in_shape) != 3:
            raise ValueError(f"Glow: in_shape must be (C, H, W), got {in_shape!r}")
        c, h, w = (_positive_int(f"Glow: in_shape[{i}]", int(s)) for i, s in enumerate(in_shape))
        levels = _positive_int("Glow: levels", levels)
        steps = _positive_int("Glow: steps", steps)
        hidden = _positive_int("Glow: hidden", hidden)
        if coupling not in COUPLINGS:
            raise ValueError(f"Glow: coupling must be one of {COUPLINGS}, got {coupling!r}")
        f = 2 ** levels
        if h % f or w % f:
            raise ValueError(f"Glow: height and width of in_shape must be divisible by 2**levels = {f}, got "
                             f"{tuple(in_shape)}")
        self.in_shape = (c, h, w)
        self.squeeze = Squeeze()
        self.flows = nn.ModuleList()
        self.splits = nn.ModuleList()
        shapes = []
        for lvl in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.flows.append(Compose(*[GlowStep(c, hidden, coupling) for _ in range(steps)]))
            if lvl < levels - 1:
                split = Split(c)
                self.splits.append(split)
                shapes.append((split.factored, h, w))
                c = split.kept
        shapes.append((c, h, w))
        self.latent_shapes = tuple(shapes)
        self.dim = math.prod(self.in_shape)
        assert sum(math.prod(s) for s in shapes) == self.dim
        self.levels, self.steps, self.hidden, self.coupling = levels, steps, hidden, coupling

    def unflatten(self, z: torch.Tensor):
        """Flat ``[N, D]`` latent -> list of per-level latents (shapes :attr:`latent_shapes`)."""
        _check_input("Glow", "z", z, self.dim, dims=(2,))
        parts, start = [], 0
        for s in self.latent_shapes:
            d = math.prod(s)
            parts.append(z[:, start:start + d].reshape(z.shape[0], *s))
            start += d
        return parts

    def flatten(self, parts) -> torch.Tensor:
        """Inverse of :meth:`unflatten`."""
        if len(parts) != len(self.latent_shapes):
            raise ValueError(f"Glow: expected {len(self.latent_shapes)} latent parts, got {len(parts)}")
        for i, (p, s) in enumerate(zip(parts, self.latent_shapes)):
            if not isinstance(p, torch.Tensor) or tuple(p.shape[1:]) != s:
                raise ValueError(f"Glow: latent part {i} must have shape [batch, {', '.join(map(str, s))}], got "
                                 f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    def forward(self, x):
        _check_input("Glow", "x", x, self.in_shape[0])
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"Glow: x must have shape [batch, {', '.join(map(str, self.in_shape))}], got "
                             f"{tuple(x.shape)}")
        if self.reversible:
            return self._reversible_forward(x)
        total = x.new_zeros(x.shape[0])
        parts = []
        h = x
        for lvl, flow in enumerate(self.flows):
            h, _ = self.squeeze(h)
            h, ld = flow(h)
            total = total + ld
            if lvl < len(self.splits):
                h, eps, ld = self.splits[lvl](h)
                total = total + ld
                parts.append(eps)
        parts.append(h)
        return torch.cat([p.flatten(1) for p in parts], dim=1), total

    def named_layers(self):
        """``(name, layer)`` in data -> latent order: per level the squeeze, the steps, the split."""
        named = []
        for lvl, flow in enumerate(self.flows):
            named += [("squeeze", self.squeeze), (f"flows.{lvl}", flow)]
            if lvl < len(self.splits):
                named.append((f"splits.{lvl}", self.splits[lvl]))
        return named

    def _reversible_forward(self, x):
        from ..reversible import _check_bit_exact, _check_checkpoints, _check_kink_tol, _Engine, reversible_blocks

        engine = _Engine(reversible_blocks(self.named_layers()), self.checkpoint_every, self.drift_tol, self.on_drift,
                         micro_batch=self.micro_batch, bit_exact=_check_bit_exact(self.bit_exact),
                         checkpoints=_check_checkpoints(self.checkpoints), kink_tol=_check_kink_tol(self.kink_tol))
        h, total, parts = engine.run(x)
        return torch.cat([p.flatten(1) for p in (*parts, h)], dim=1), x.new_zeros(x.shape[0]) + total

    def inverse(self, z):
        parts = self.unflatten(z)
        total = z.new_zeros(z.shape[0])
        h = parts[-1]
        for lvl in range(len(self.flows) - 1, -1, -1):
            if lvl < len(self.splits):
                h, ld = self.splits[lvl].inverse(h, parts[lvl])
                total = total + ld
            h, ld = self.flows[lvl].inverse(h)
            total = total + ld
            h, _ = self.squeeze.inverse(h)
        return h, total


class Glow(Flow):
    """Glow (Kingma & Dhariwal, 2018) on images of shape ``in_shape = (C, H, W)``, NCHW.

    ``levels`` scales, each: squeeze -> ``steps`` x (ActNorm -> InvConv1x1 -> coupling with a
    ``hidden``-channel conv conditioner) -> split (not after the last level). The base is N(0, I) over the
    flat ``C * H * W`` latent of :class:`GlowTransform` (split latents standardized by their learned
    priors, then the final latent). ``forward(x) -> (z, logabsdet)``, ``inverse(z) -> (x, logabsdet)``,
    ``log_prob(x)``, ``sample(n, temperature=1.0)`` (all latents drawn with std ``temperature``, which
    scales the split priors' std the way Glow does) and ``bits_per_dim`` come from :class:`Flow`.

    ActNorm layers initialize from the first batch passed through ``forward``/``log_prob`` in training
    mode: call ``log_prob`` on a real data batch before sampling. For discrete pixels use
    :mod:`flowops.nn.preprocess` (dequantization, logit transform, bits/dim).

    ``reversible=True`` trains with memory that does not grow with ``steps`` (``checkpoints``, default 32 stored
    inputs, keeps that; ``checkpoint_every=k`` adds depth / k; ``kink_tol``, default 1e-4, keeps the recomputed
    conditioners' ReLUs on the forward's side): see :class:`GlowTransform` and :mod:`flowops.reversible`.
    """

    def __init__(self, in_shape, levels: int = 3, steps: int = 8, hidden: int = 512, coupling: str = "affine",
                 reversible: bool = False, checkpoint_every: int | None = None,
                 checkpoints: int | None = DEFAULT_CHECKPOINTS, kink_tol: float | None = DEFAULT_KINK_TOL):
        transform = GlowTransform(in_shape, levels, steps, hidden, coupling, reversible, checkpoint_every,
                                  checkpoints, kink_tol)
        super().__init__(StandardNormal(transform.dim), transform)
        self.in_shape = transform.in_shape
        self.levels, self.steps, self.hidden, self.coupling = levels, steps, hidden, coupling

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        if not float(temperature) >= 0:
            raise ValueError(f"Glow.sample: temperature must be non-negative, got {temperature}")
        return super().sample(n, temperature=float(temperature), generator=generator)

    def latents(self, x: torch.Tensor):
        """Per-level latents of ``x`` (list of tensors, shapes ``transform.latent_shapes``)."""
        return self.transform.unflatten(self.transform(x)[0])
