"""pytest-benchmark cases of MADE/MAF: masked_linear (forward, fwd+bwd) and one MAF transform (density,
sampling) x implementation, from :mod:`flowops.benchmark` (the runner behind ``flowops bench``). The
``compiled`` implementation of MAF sampling is the D-pass loop behind a graph break (not traced)."""
import pytest
from conftest import bench_matrix, run_bench_case


@pytest.mark.parametrize("op,shape,direction,impl", list(bench_matrix(("masked_linear", "maf"))))
def test_made(benchmark, bench_config, op, shape, direction, impl):
    run_bench_case(benchmark, bench_config, op, shape, direction, impl, memory=False)
