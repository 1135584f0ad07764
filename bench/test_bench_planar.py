"""pytest-benchmark cases of the fused planar stack (forward, fwd+bwd) x implementation, from
:mod:`flowops.benchmark` (the runner behind ``flowops bench``)."""
import pytest
from conftest import bench_matrix, run_bench_case


@pytest.mark.parametrize("op,shape,direction,impl", list(bench_matrix(("planar_stack",))))
def test_planar(benchmark, bench_config, op, shape, direction, impl):
    run_bench_case(benchmark, bench_config, op, shape, direction, impl)
