"""Continuous normalizing flows (Chen et al. 2018; FFJORD, Grathwohl et al. 2019).

A :class:`CNF` integrates ``dz/dt = f(z, t)`` from ``t = 0`` (data) to ``t = T`` (latent) together
with the log-det ``d l/dt = tr(df/dz)``, so ``forward(x) -> (z(T), l(T))`` with ``l(T)`` the
log |det dz(T)/dx|, and ``inverse(z)`` integrates back from ``T`` to 0 (log-det ``-l``). The ODE is solved
with torchdiffeq (``solver="dopri5"`` adaptive, ``"rk4"`` fixed step, or any torchdiffeq method), optionally
with the adjoint method (``adjoint=True``: O(1) memory in the number of steps).

The trace term, by vector field and backend:

* :class:`MLPVectorField` (an MLP on ``[z, t]`` with tanh, softplus or SiLU): the fused op
  :func:`flowops.ops.mlp_trace`, which carries the probes as forward-mode tangents through the same GEMMs
  as the state (C++ on CPU, Triton elementwise kernels on GPU) with an analytic first-order backward;
* any other ``nn.Module`` called as ``field(t, z)``: batched forward-mode products through ``torch.func``
  (``vmap`` of ``jvp`` over the probes);
* ``flowops.use_backend("reference")``: FFJORD's formulation, ``torch.autograd.grad(f, z, eps,
  create_graph=True)`` per probe, or one backward per dimension for the exact trace
  (:mod:`flowops.reference.cnf`).

``trace="exact"`` uses the ``d`` basis probes (right for small d, e.g. 2-D toys); ``trace="hutchinson"``
uses ``probes`` random vectors (``noise="rademacher"`` or ``"gaussian"``), drawn once per solve and held
fixed while integrating, as FFJORD does. Hutchinson gives an unbiased estimate of the log-density, not the
log-density itself; evaluate held-out likelihoods with ``trace="exact"`` where d allows
(:meth:`CNF.exact`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import _backend
from ..reference import cnf as _ref
from .base import Transform

SOLVERS_FIXED = ("rk4", "euler", "midpoint", "explicit_adams", "implicit_adams")
TRACES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")


def _odeint(adjoint: bool):
    try:
        import torchdiffeq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("flowops.nn.CNF needs torchdiffeq to integrate the ODE: pip install torchdiffeq") from exc
    return torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint


class MLPVectorField(nn.Module):
    """``f(z, t)``: an MLP on ``[z, t]`` (time as an extra input) with ``activation`` between the layers.

    ``hidden`` lists the hidden widths (``(64, 64, 64)``: three hidden layers). The last layer starts at
    zero (the untrained flow is the identity); the others use PyTorch's ``nn.Linear`` initialization.
    Called as ``field(t, z)`` (the torchdiffeq convention). :class:`CNF` evaluates it together with its
    Jacobian trace through the fused op :func:`flowops.ops.mlp_trace`.
    """

    def __init__(self, dim: int, hidden=(64, 64, 64), activation: str = "tanh"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"MLPVectorField: dim must be a positive int, got {dim!r}")
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"MLPVectorField: hidden must be positive ints, got {hidden!r}")
        if activation not in _ref.ACTIVATIONS:
            raise ValueError(f"MLPVectorField: activation must be one of {_ref.ACTIVATIONS}, got {activation!r}")
        self.dim, self.hidden, self.activation = dim, hidden, activation
        widths = (dim + 1,) + hidden + (dim,)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    @property
    def weights(self):
        return [layer.weight for layer in self.layers]

    @property
    def biases(self):
        return [layer.bias for layer in self.layers]

    def forward(self, t, z):
        return _ref.mlp_vector_field(z, torch.as_tensor(t, dtype=z.dtype, device=z.device), self.weights,
                                     self.biases, self.activation)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"


def func_trace(field, t, z, eps=None):
    """``(f, tr)`` for any ``field(t, z)`` through ``torch.func``: ``vmap`` of ``jvp`` over the probes.

    ``eps`` None: exact (the ``d`` basis vectors); else Hutchinson with ``eps [m, B, d]`` (mean over probes).
    """
    d = z.shape[1]
    exact = eps is None
    if exact:
        eps = torch.eye(d, dtype=z.dtype, device=z.device)[:, None, :].expand(d, z.shape[0], d)

    def one(v):
        return torch.func.jvp(lambda zz: field(t, zz), (z,), (v,))

    f_all, jv = torch.func.vmap(one)(eps)
    f = f_all[0]
    if exact:
        return f, torch.diagonal(jv, dim1=0, dim2=2).sum(1)
    return f, (jv * eps).sum(2).mean(0)


class _Dynamics(nn.Module):
    """The augmented ODE ``d(z, l)/dt = (f, tr df/dz)`` handed to torchdiffeq (counts evaluations)."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.eps = None
        self.nfe = 0
        self.mode = "auto"

    def forward(self, t, state):
        z = state[0]
        self.nfe += 1
        f, tr = trace_fn(self.field, t, z, self.eps, self.mode)
        return f, tr.to(state[1].dtype)


def trace_fn(field, t, z, eps=None, mode="auto"):
    """``(f(z, t), tr)`` with the implementation :class:`CNF` picks (see the module docstring).

    ``mode``: ``"auto"`` (fused op for an :class:`MLPVectorField` unless the reference backend is forced, else
    ``torch.func``), ``"fused"``, ``"func"`` or ``"reference"``.
    """
    if mode == "auto":
        if _backend.get_backend() == "reference":
            mode = "reference"
        elif isinstance(field, MLPVectorField):
            mode = "fused"
        else:
            mode = "func"
    if mode == "reference":
        return _ref.trace_term(lambda zz: field(t, zz), z, eps)
    if mode == "fused":
        if not isinstance(field, MLPVectorField):
            raise TypeError(f"trace mode 'fused' needs an MLPVectorField, got {type(field).__name__}")
        from .. import ops

        return ops.mlp_trace(z, torch.as_tensor(t, dtype=z.dtype, device=z.device), field.weights, field.biases,
                             field.activation, eps)
    if mode == "func":
        return func_trace(field, t, z, eps)
    raise ValueError(f"trace mode must be 'auto', 'fused', 'func' or 'reference', got {mode!r}")


class CNF(Transform):
    """A continuous normalizing flow over ``[batch, d]`` vectors (see the module docstring).

    Args:
        vector_field: an ``nn.Module`` called as ``field(t, z) -> dz/dt`` (an :class:`MLPVectorField` runs
            the fused trace op).
        trace: ``"exact"`` or ``"hutchinson"``; probes: Hutchinson probes per solve; noise: ``"rademacher"``
            or ``"gaussian"``.
        solver: a torchdiffeq method (``"dopri5"`` adaptive with ``atol``/``rtol``; ``"rk4"`` fixed step with
            ``step_size``, default ``T / 8``). adjoint: integrate the backward with the adjoint method.
        T: the integration time. mode: which trace implementation (``"auto"``, see :func:`trace_fn`).

    ``last_nfe`` holds the number of vector-field evaluations of the last solve (its forward pass).
    """

    def __init__(self, vector_field: nn.Module, trace: str = "exact", probes: int = 1, noise: str = "rademacher",
                 solver: str = "dopri5", adjoint: bool = False, atol: float = 1e-5, rtol: float = 1e-5,
                 T: float = 1.0, step_size: float | None = None, mode: str = "auto"):
        super().__init__()
        if not isinstance(vector_field, nn.Module):
            raise TypeError(f"CNF: vector_field must be an nn.Module called as field(t, z), got "
                            f"{type(vector_field).__name__}")
        if trace not in TRACES:
            raise ValueError(f"CNF: trace must be one of {TRACES}, got {trace!r}")
        if noise not in NOISES:
            raise ValueError(f"CNF: noise must be one of {NOISES}, got {noise!r}")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"CNF: probes must be a positive int, got {probes!r}")
        if not (float(T) > 0):
            raise ValueError(f"CNF: T must be positive, got {T!r}")
        if not (atol > 0 and rtol > 0):
            raise ValueError(f"CNF: atol and rtol must be positive, got atol={atol!r}, rtol={rtol!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"CNF: step_size must be positive, got {step_size!r}")
        if mode not in ("auto", "fused", "func", "reference"):
            raise ValueError(f"CNF: mode must be 'auto', 'fused', 'func' or 'reference', got {mode!r}")
        self.dynamics = _Dynamics(vector_field)
        self.trace, self.probes, self.noise = trace, probes, noise
        self.solver, self.adjoint, self.atol, self.rtol = solver, bool(adjoint), float(atol), float(rtol)
        self.T, self.step_size, self.mode = float(T), step_size, mode
        self.dim = getattr(vector_field, "dim", None)
        self.last_nfe = 0
        self.nfe_history: list = []  # forward-pass evaluations of every solve (cleared by the caller)

    @property
    def vector_field(self) -> nn.Module:
        return self.dynamics.field

    def _probes(self, z):
        if self.trace == "exact":
            return None
        shape = (self.probes,) + tuple(z.shape)
        if self.noise == "gaussian":
            return torch.randn(shape, dtype=z.dtype, device=z.device)
        return torch.randint(0, 2, shape, device=z.device).to(z.dtype).mul_(2).sub_(1)

    def _check(self, x, arg):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CNF: {arg} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"CNF: {arg} must be a floating tensor, got {x.dtype}")
        if x.dim() != 2 or (self.dim is not None and x.shape[1] != self.dim):
            want = f"[batch, {self.dim}]" if self.dim is not None else "[batch, features]"
            raise ValueError(f"CNF: {arg} must be {want}, got shape {tuple(x.shape)}")

    def _solve(self, x, t0, t1):
        odeint = _odeint(self.adjoint)
        dyn = self.dynamics
        dyn.eps = self._probes(x)
        dyn.mode = self.mode
        dyn.nfe = 0
        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        ld0 = x.new_zeros(x.shape[0])
        kw = {"method": self.solver}
        if self.solver in SOLVERS_FIXED:
            kw["options"] = {"step_size": self.step_size if self.step_size is not None else self.T / 8}
        else:
            kw.update(atol=self.atol, rtol=self.rtol)
        if self.adjoint:
            kw["adjoint_params"] = tuple(dyn.field.parameters())
        if x.shape[0] == 0:
            return x.clone(), ld0
        zs, lds = odeint(dyn, (x, ld0), ts, **kw)
        self.last_nfe = dyn.nfe
        self.nfe_history.append(dyn.nfe)
        dyn.eps = None
        return zs[-1], lds[-1]

    def forward(self, x):
        """Data -> latent: ``(z(T), log|det dz(T)/dx|)``."""
        self._check(x, "x")
        return self._solve(x, 0.0, self.T)

    def inverse(self, z):
        """Latent -> data: ``(x(0), log|det dx/dz|)``."""
        self._check(z, "z")
        return self._solve(z, self.T, 0.0)

    @contextlib.contextmanager
    def exact(self):
        """Temporarily use the exact trace (for evaluating held-out likelihoods of a Hutchinson-trained CNF)."""
        previous = self.trace
        self.trace = "exact"
        try:
            yield self
        finally:
            self.trace = previous

    def extra_repr(self) -> str:
        return (f"trace={self.trace!r}, probes={self.probes}, solver={self.solver!r}, adjoint={self.adjoint}, "
                f"atol={self.atol:g}, rtol={self.rtol:g}, T={self.T:g}")


__all__ = ["CNF", "MLPVectorField", "func_trace", "trace_fn"]
