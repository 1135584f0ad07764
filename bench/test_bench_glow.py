"""pytest-benchmark cases of the Glow ops: actnorm_invconv (forward, inverse, fwd+bwd), InvConv1x1's cached
inverse against its forward, the fused conditioner conv_net (forward, fwd+bwd), its forward with the
reversible walk's ReLU-kink records (recording, applying), the walk's one-call coupling step and one whole Glow training
step (L=3, K=8, hidden 128, batch 16) x implementation, from :mod:`flowops.benchmark` (the runner behind
``flowops bench``). The ``compiled`` implementation of the Glow step is its eager step behind a graph break."""
import pytest
from conftest import bench_matrix, run_bench_case


@pytest.mark.parametrize("op,shape,direction,impl",
                         list(bench_matrix(("actnorm_invconv", "invconv_inverse", "conv_net",
                                            "conv_net_kinks_record", "conv_net_kinks_apply", "glow_coupling_reverse",
                                            "glow_step"))))
def test_glow(benchmark, bench_config, op, shape, direction, impl):
    run_bench_case(benchmark, bench_config, op, shape, direction, impl, memory=op != "glow_step")
