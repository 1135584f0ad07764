"""Backend selection, the `flowops info` command, and import without the compiled extension."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flowops
from flowops import _backend, cli, ops, reference


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = flowops.get_backend()
    yield
    flowops.set_backend(previous)


def test_set_backend_validation():
    for name in ("reference", "auto", "cpp", "triton"):
        flowops.set_backend(name)
        assert flowops.get_backend() == name
    flowops.set_backend("  Reference ")
    assert flowops.get_backend() == "reference"
    flowops.set_backend("auto")
    with pytest.raises(ValueError, match="backend") as info:
        flowops.set_backend("cuda")
    assert "'cuda'" in str(info.value)
    assert flowops.get_backend() == "auto", "a rejected name must leave the backend unchanged"


def test_set_backend_none_reads_environment(monkeypatch):
    monkeypatch.setenv("FLOWOPS_BACKEND", "reference")
    flowops.set_backend(None)
    assert flowops.get_backend() == "reference"
    monkeypatch.delenv("FLOWOPS_BACKEND")
    flowops.set_backend(None)
    assert flowops.get_backend() == "auto"
    monkeypatch.setenv("FLOWOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        flowops.set_backend(None)


def test_use_backend_context():
    assert flowops.get_backend() == "auto"
    with flowops.use_backend("reference"):
        assert flowops.get_backend() == "reference"
        with flowops.use_backend("cpp"):
            assert flowops.get_backend() == "cpp"
        assert flowops.get_backend() == "reference"
    assert flowops.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="boom"):
        with flowops.use_backend("reference"):
            raise RuntimeError("boom")
    assert flowops.get_backend() == "auto", "the previous backend comes back after an exception"
    with pytest.raises(ValueError, match="backend"):
        with flowops.use_backend("gpu"):
            pass
    assert flowops.get_backend() == "auto"


def test_auto_selection():
    cpu = torch.device("cpu")
    expected = "cpp" if _backend.has_cpp() else "reference"
    assert _backend.select(cpu) == expected
    with flowops.use_backend("reference"):
        assert _backend.select(cpu) == "reference"
        assert _backend.select(torch.device("cuda")) == "reference"
    # tensors on other devices fall back to the reference in auto mode, and refuse a forced backend
    assert _backend.select(torch.device("meta")) == "reference"
    with flowops.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="meta"):
            _backend.select(torch.device("meta"))
        with pytest.raises(RuntimeError, match="CPU tensors only"):
            _backend.select(torch.device("cuda"))


def test_forced_cpp_unavailable_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_cpp", False)
    monkeypatch.setattr(_backend, "_cpp_error", "flowops._C not importable (test)")
    x, p = torch.randn(3, 4), torch.randn(3, 8)
    with flowops.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="cpp"):
            ops.affine_coupling(x, p)
        with pytest.raises(RuntimeError, match="not importable"):
            ops.additive_coupling(x, p[:, :4])
    # auto falls back to the reference, with the reference's results
    y, ld = ops.affine_coupling(x, p, "softclamp")
    ry, rld = reference.affine_coupling(x, p, "softclamp")
    assert torch.equal(y, ry) and torch.equal(ld, rld)
    assert _backend.select(torch.device("cpu")) == "reference"


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    x, p = torch.randn(3, 4), torch.randn(3, 8)
    with flowops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ops.affine_coupling(x, p)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _backend.select(torch.device("cpu"))
        assert _backend.info()["cpu_tensors"] == "error"


def test_forced_triton_missing(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: True)
    monkeypatch.setattr(_backend, "_triton", False)
    monkeypatch.setattr(_backend, "_triton_error", "triton not importable (test)")
    with flowops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="triton not importable"):
            ops.affine_coupling(torch.randn(2, 3), torch.randn(2, 6))


def test_info():
    data = flowops.info()
    assert data["forced"] == flowops.get_backend()
    assert data["torch"] == torch.__version__
    for key in ("cpp", "triton", "cuda"):
        assert isinstance(data[key]["available"], bool) and isinstance(data[key]["detail"], str)
        assert data[key]["detail"], f"{key}: a reason or a description is always given"
    assert data["cpp"]["available"] == _backend.has_cpp()
    assert data["cpu_tensors"] == ("cpp" if _backend.has_cpp() else "reference")
    if not torch.cuda.is_available():
        assert data["cuda_tensors"].startswith("n/a")


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"flowops {flowops.__version__}" in out
    assert "cpp" in out and "triton" in out and "CPU tensors run on" in out
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cpp"]["available"] == _backend.has_cpp()
    assert data["forced"] == "auto"


def test_cli_help_and_unknown(capsys):
    assert cli.main([]) == 0
    assert "info" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2


_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import flowops
    from flowops import _backend, ops, reference

    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    p = torch.randn(5, 6, 4, 4, requires_grad=True)
    mask = (torch.rand(3, 4, 4) < 0.5).float()
    y, ld = ops.affine_coupling(x, p, "softclamp", 1.5, False, mask)
    gx, gp = torch.autograd.grad((y.sum() + ld.sum()), (x, p))
    ry, rld = reference.affine_coupling(x, p, "softclamp", 1.5, False, mask)
    rgx, rgp = torch.autograd.grad((ry.sum() + rld.sum()), (x, p))
    # the registered ops exist (defined in Python) and run the reference
    fy, fld = torch.ops.flowops.affine_coupling_fwd(x.detach(), p.detach(), mask.reshape(-1), "exp", 2.0, True)
    ey, eld = reference.affine_coupling(x.detach(), p.detach(), "exp", 2.0, True, mask)
    print(json.dumps({
        "has_cpp": _backend.has_cpp(),
        "ext_loaded": "flowops._C" in sys.modules,
        "selected": _backend.select(torch.device("cpu")),
        "equal": all(torch.equal(a, b) for a, b in ((y, ry), (ld, rld), (gx, rgx), (gp, rgp))),
        "registered_equal": torch.equal(fy, ey) and torch.equal(fld, eld),
        "grad_fn": y.grad_fn.name(),
        "forced": flowops.get_backend(),
    }))
""")


_OPCHECK_CHILD = textwrap.dedent("""
    import json
    import torch
    import flowops

    torch.manual_seed(0)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    p = torch.randn(3, 4, 3, dtype=torch.float64)
    mask = torch.tensor([1.0, 0, 0, 1, 0, 1], dtype=torch.float64)
    fwd = torch.library.opcheck(torch.ops.flowops.affine_coupling_fwd,
                                (x.clone().requires_grad_(True), p.clone().requires_grad_(True), mask, "sigmoid",
                                 2.0, False), raise_exception=False)
    bwd = torch.library.opcheck(torch.ops.flowops.affine_coupling_bwd,
                                (torch.randn_like(x), torch.randn(3, dtype=x.dtype), x, p, None, "softclamp", 1.5,
                                 True), raise_exception=False)
    # eager autograd through the registered op (the CUDA path without Triton), additive and affine
    backward = {}
    for kind, width in (("additive", 2), ("softclamp", 4)):
        xx = x.clone().requires_grad_(True)
        pp = torch.randn(3, width, 3, dtype=torch.float64, requires_grad=True)
        try:
            y, ld = torch.ops.flowops.affine_coupling_fwd(xx, pp, mask, kind, 1.5, False)
            gx, gp = torch.autograd.grad((2 * y).sum() + ld.sum(), (xx, pp))
            xr, pr = xx.detach().requires_grad_(True), pp.detach().requires_grad_(True)
            m = mask.reshape(2, 3)
            if kind == "additive":
                ry, rld = flowops.reference.additive_coupling(xr, pr, False, m)
            else:
                ry, rld = flowops.reference.affine_coupling(xr, pr, kind, 1.5, False, m)
            loss = (2 * ry).sum() + (rld.sum() if rld.requires_grad else 0)
            rgx, rgp = torch.autograd.grad(loss, (xr, pr))
            backward[kind] = "ok" if torch.allclose(gx, rgx) and torch.allclose(gp, rgp) else "mismatch"
        except Exception as exc:
            backward[kind] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"fwd": {k: str(v) for k, v in fwd.items()}, "bwd": {k: str(v) for k, v in bwd.items()},
                      "backward": backward, "has_cpp": flowops._backend.has_cpp()}))
""")


def _run_child(script=_CHILD, **env):
    full = dict(os.environ)
    full.pop("FLOWOPS_BACKEND", None)
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_without_extension():
    out = _run_child(FLOWOPS_DISABLE_EXT="1")
    assert out == {"has_cpp": False, "ext_loaded": False, "selected": "reference", "equal": True,
                   "registered_equal": True, "grad_fn": out["grad_fn"], "forced": "auto"}
    assert "flowops::" not in out["grad_fn"]


def test_environment_forces_backend():
    out = _run_child(FLOWOPS_BACKEND="reference")
    assert out["forced"] == "reference" and out["selected"] == "reference" and out["equal"]


def test_registered_ops_without_extension():
    """The operators defined in Python (no extension) differentiate like the reference and pass opcheck."""
    out = _run_child(_OPCHECK_CHILD, FLOWOPS_DISABLE_EXT="1")
    assert out["has_cpp"] is False
    assert out["backward"] == {"additive": "ok", "softclamp": "ok"}, out["backward"]
    for op in ("fwd", "bwd"):
        assert out[op] and all(v == "SUCCESS" for v in out[op].values()), (op, out[op])
