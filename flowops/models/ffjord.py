"""FFJORD: a continuous normalizing flow with an MLP vector field over a standard-normal base."""
from __future__ import annotations

from ..distributions import StandardNormal
from ..flow import Flow
from ..nn.cnf import CNF, MLPVectorField


class FFJORD(Flow):
    """One CNF block (:class:`flowops.nn.CNF`) with an :class:`flowops.nn.MLPVectorField` ``(features + 1) ->
    hidden -> features``, so the trace runs through the fused op :func:`flowops.ops.mlp_trace`.

    ``trace="exact"`` suits small ``features`` (2-D toys); ``"hutchinson"`` with ``probes`` Rademacher (or
    Gaussian) probes scales to large ones. ``solver``/``atol``/``rtol``/``adjoint``/``step_size``/``T`` go to
    the CNF. ``blocks > 1`` chains several CNFs, each with its own field.
    """

    def __init__(self, features: int, hidden=(64, 64, 64), activation: str = "tanh", trace: str = "exact",
                 probes: int = 1, noise: str = "rademacher", solver: str = "dopri5", atol: float = 1e-5,
                 rtol: float = 1e-5, adjoint: bool = False, step_size: float | None = None, T: float = 1.0,
                 blocks: int = 1):
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"FFJORD: features must be a positive int, got {features!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"FFJORD: blocks must be a positive int, got {blocks!r}")
        cnfs = [CNF(MLPVectorField(features, hidden, activation), trace=trace, probes=probes, noise=noise,
                    solver=solver, adjoint=adjoint, atol=atol, rtol=rtol, T=T, step_size=step_size)
                for _ in range(blocks)]
        super().__init__(StandardNormal(features), cnfs)
        self.features = features

    @property
    def cnfs(self):
        return list(self.transform.transforms)

    @property
    def last_nfe(self) -> int:
        """Vector-field evaluations of the last forward/inverse pass, summed over the blocks."""
        return sum(c.last_nfe for c in self.cnfs)
