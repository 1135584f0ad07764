"""pytest-benchmark cases: coupling ops x shape x direction x implementation.

The cases, inputs, byte counts and callables come from :mod:`flowops.benchmark` (the runner behind
``flowops bench``); this file only hands them to pytest-benchmark. Shapes are the ops'
``small_shapes`` so the whole directory runs in a few minutes on a laptop CPU. Compare the
implementations of one case within its group (``--benchmark-group-by=group``, the default).
"""
import pytest
import torch

from flowops import benchmark as fb
from flowops import use_backend

OPS = ("affine_coupling", "additive_coupling")


def _matrix():
    for op in OPS:
        spec = fb.OPS[op]
        for shape in spec.small_shapes:
            for direction in spec.directions:
                for impl in fb.IMPLS:
                    name = f"{op}-{'x'.join(map(str, shape))}-{direction}-{impl}"
                    yield pytest.param(op, shape, direction, impl, id=name)


@pytest.mark.parametrize("op,shape,direction,impl", list(_matrix()))
def test_coupling(benchmark, bench_config, op, shape, direction, impl):
    spec = fb.OPS[op]
    case = fb.make_case(op, shape, direction, bench_config.dtype, bench_config.device, spec.options(bench_config))
    with use_backend("auto"):
        if impl == "compiled" and case.compile() is None:
            pytest.skip(f"torch.compile of the reference failed: {case.compile_error}")
        fn = fb.synced(case.callable(impl), case.device)
        for _ in range(3):  # warm-up (the compile, if any, already happened above)
            fn()
        benchmark.group = f"{op} {'x'.join(map(str, shape))} {direction}"
        benchmark.extra_info.update(bytes=case.bytes, backend=fb.resolved_backend(case.device, case.dtype),
                                    label=case.label, compile_s=case.compile_s,
                                    peak_bytes=fb.peak_memory(fn, case.device))
        benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["gbps_median"] = case.bytes / stats.stats.median / 1e9
