"""pytest-benchmark configuration of the flowops benchmark cases.

Run with ``pytest bench/ --benchmark-only``; pick the device, dtype and scale map with
``--bench-device``, ``--bench-dtype`` and ``--bench-scale``.
"""
import argparse

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("flowops bench")
    group.addoption("--bench-device", default="cpu", choices=["cpu", "cuda"], help="device of the cases")
    group.addoption("--bench-dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    group.addoption("--bench-scale", default="softclamp", choices=["exp", "softclamp", "sigmoid"],
                    help="scale map of affine_coupling")


@pytest.fixture(scope="session")
def bench_config(request):
    device = request.config.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device")
    return argparse.Namespace(device=device, dtype=request.config.getoption("--bench-dtype"),
                              scale=request.config.getoption("--bench-scale"), clamp=2.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def bench_matrix(ops):
    """pytest params (op, shape, direction, impl) over the ops' small shapes, from flowops.benchmark's registry."""
    from flowops import benchmark as fb

    for op in ops:
        spec = fb.OPS[op]
        for shape in spec.small_shapes:
            for direction in spec.directions:
                for impl in fb.IMPLS:
                    yield pytest.param(op, shape, direction, impl,
                                       id=f"{op}-{'x'.join(map(str, shape))}-{direction}-{impl}")


def run_bench_case(benchmark, config, op, shape, direction, impl, memory=True):
    """Build one flowops.benchmark case and hand its callable to pytest-benchmark."""
    from flowops import benchmark as fb
    from flowops import use_backend

    spec = fb.OPS[op]
    case = fb.make_case(op, shape, direction, config.dtype, config.device, spec.options(config))
    with use_backend("auto"):
        if impl == "compiled" and case.compile() is None:
            pytest.skip(f"torch.compile of the reference failed: {case.compile_error}")
        fn = fb.synced(case.callable(impl), case.device)
        for _ in range(3):  # warm-up (the compile, if any, already happened above)
            fn()
        benchmark.group = f"{op} {'x'.join(map(str, shape))} {direction}"
        benchmark.extra_info.update(bytes=case.bytes, backend=fb.resolved_backend(case.device, case.dtype),
                                    label=case.label, compile_s=case.compile_s)
        if memory:
            benchmark.extra_info["peak_bytes"] = fb.peak_memory(fn, case.device)
        benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["gbps_median"] = case.bytes / stats.stats.median / 1e9
