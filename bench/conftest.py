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
