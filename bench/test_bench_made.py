"""pytest-benchmark cases of MADE/MAF: masked_linear (forward, fwd+bwd) and one MAF transform (density,
sampling) x implementation, from :mod:`flowops.benchmark` (the runner behind ``flowops bench``). The
``compiled`` implementation of MAF sampling is the D-pass loop behind a graph break (not traced)."""
import pytest

from flowops import benchmark as fb
from flowops import use_backend

OPS = ("masked_linear", "maf")


def _matrix():
    for op in OPS:
        spec = fb.OPS[op]
        for shape in spec.small_shapes:
            for direction in spec.directions:
                for impl in fb.IMPLS:
                    name = f"{op}-{'x'.join(map(str, shape))}-{direction}-{impl}"
                    yield pytest.param(op, shape, direction, impl, id=name)


@pytest.mark.parametrize("op,shape,direction,impl", list(_matrix()))
def test_made(benchmark, bench_config, op, shape, direction, impl):
    spec = fb.OPS[op]
    case = fb.make_case(op, shape, direction, bench_config.dtype, bench_config.device, spec.options(bench_config))
    with use_backend("auto"):
        if impl == "compiled" and case.compile() is None:
            pytest.skip(f"torch.compile of the reference failed: {case.compile_error}")
        fn = fb.synced(case.callable(impl), case.device)
        for _ in range(3):
            fn()
        benchmark.group = f"{op} {'x'.join(map(str, shape))} {direction}"
        benchmark.extra_info.update(bytes=case.bytes, label=case.label, compile_s=case.compile_s)
        benchmark(fn)
