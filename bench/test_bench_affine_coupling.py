"""pytest-benchmark cases: coupling ops x shape x direction x implementation.

The cases, inputs, byte counts and callables come from :mod:`flowops.benchmark` (the runner behind
``flowops bench``); this file only hands them to pytest-benchmark (bench/conftest.py). Shapes are the ops'
``small_shapes`` so the whole directory runs in a few minutes on a laptop CPU. Compare the
implementations of one case within its group (``--benchmark-group-by=group``, the default).
"""
import pytest
from conftest import bench_matrix, run_bench_case


@pytest.mark.parametrize("op,shape,direction,impl", list(bench_matrix(("affine_coupling", "additive_coupling"))))
def test_coupling(benchmark, bench_config, op, shape, direction, impl):
    run_bench_case(benchmark, bench_config, op, shape, direction, impl)
