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
