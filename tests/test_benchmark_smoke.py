"""Smoke test of the benchmark runner: it runs end to end and writes well-formed JSON.

No timing assertions: speed lives in bench/, correctness here.
"""
import json

from flowops import benchmark


def test_bench_quick_json(tmp_path):
    path = tmp_path / "bench.json"
    assert benchmark.main(["--quick", "--no-compile", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert {"machine", "config", "copy_bandwidth", "results", "targets"} <= set(data)
    for key in ("cpu", "threads", "torch", "date", "device"):
        assert key in data["machine"]
    assert data["copy_bandwidth"]["copy_gbps"] > 0
    results = data["results"]
    spec = benchmark.OPS["affine_coupling"]
    assert len(results) == len(spec.quick_shapes) * len(benchmark.DIRECTIONS)
    seen = set()
    for rec in results:
        assert rec["op"] == "affine_coupling"
        assert rec["direction"] in benchmark.DIRECTIONS
        assert rec["bytes"] > 0
        assert rec["check"]["ok"], rec["check"]
        assert rec["impls"]["compiled"] is None  # --no-compile
        for impl in ("reference", "flowops"):
            entry = rec["impls"][impl]
            assert entry["median_s"] > 0 and entry["gbps"] > 0
            assert len(entry["times_s"]) == data["config"]["repeats"]
        assert rec["speedup"]["vs_reference"] > 0 and rec["speedup"]["vs_compiled"] is None
        seen.add((tuple(rec["shape"]), rec["direction"]))
    assert len(seen) == len(results)


def test_bench_help_and_bad_args(capsys):
    assert benchmark.main(["--help"]) == 0
    assert "--op" in capsys.readouterr().out
    assert benchmark.main(["--op", "no_such_op"]) != 0


def test_case_bytes_and_shapes():
    case = benchmark.make_case("affine_coupling", (4, 3), "fwd+bwd", opts={"scale": "exp"})
    x, params = case.inputs
    assert params.shape == (4, 6) and x.requires_grad
    assert not torch_all_zero(x)
    # forward: x, params read, y, logdet written; backward: grads of y and logdet, x, params read,
    # grads of x and params written
    fwd = 4 * (12 + 24 + 12 + 4)
    bwd = 4 * (12 + 4 + 12 + 24 + 12 + 24)
    assert case.bytes == fwd + bwd


def torch_all_zero(t):
    return bool((t == 0).all())


def test_shapes_may_hold_zero_after_batch_and_features():
    assert benchmark.parse_shape("1024x2x64x0") == (1024, 2, 64, 0)
    import argparse

    import pytest
    for bad in ("0x2", "4x0", "4x2x-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark.parse_shape(bad)


def _mlp_trace_record(shape, ref_s, fused_s, ref_peak, fused_peak):
    """A bench record of one mlp_trace fwd+bwd case, as format_targets reads it."""
    return {"op": "mlp_trace", "shape": list(shape), "direction": "fwd+bwd", "device": "cpu", "dtype": "float32",
            "speedup": {"vs_reference": ref_s / fused_s},
            "impls": {"reference": {"median_s": ref_s, "peak_bytes": ref_peak},
                      "flowops": {"median_s": fused_s, "peak_bytes": fused_peak}}}


def test_cnf_floor_line():
    """The mlp_trace target lines carry the GEMM floor: the hidden x hidden GEMMs both sides run, timed alone."""
    ms, count = benchmark._cnf_gemm_floor((32, 2, 16, 0), {"device": "cpu", "dtype": "float32"}, repeats=3)
    assert ms > 0 and count == 6
    assert benchmark._cnf_gemm_floor((32, 2, 16, 0), {"device": "cuda", "dtype": "float32"}) is None
    text = benchmark.format_targets([_mlp_trace_record((1024, 2, 64, 0), 4e-3, 1.6e-3, 4_800_000, 2_800_000)])
    assert "mlp_trace 1024x2x64x0 fwd+bwd vs autograd reference: 2.50x (>= 2x: met)" in text
    assert "hidden x hidden GEMMs that both sides run" in text
    assert "peak memory reference/fused: 1.71x (>= 1.5x: met)" in text


def test_cnf_edge_gemm_line():
    """For d > 8 the floor line is followed by the first/last-layer GEMMs the fused formulation runs."""
    assert benchmark._cnf_edge_gemms((16, 12, 32, 1), {"device": "cpu", "dtype": "float32"}, repeats=2) > 0
    assert benchmark._cnf_edge_gemms((16, 8, 32, 1), {"device": "cpu", "dtype": "float32"}) is None  # folded
    assert benchmark._cnf_edge_gemms((16, 12, 32, 1), {"device": "cuda", "dtype": "float32"}) is None
    text = benchmark.format_targets([_mlp_trace_record((256, 64, 512, 1), 12e-3, 11e-3, 7_800_000, 6_900_000)])
    assert "(>= 1.3x: MISSED)" in text
    assert "first and last layers' products that the forward-mode formulation runs as GEMMs" in text
