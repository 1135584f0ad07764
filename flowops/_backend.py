"""Backend selection: which implementation of an op runs for a given tensor.

``auto`` (the default) picks Triton for CUDA tensors, the C++ extension for CPU
tensors, and the plain-PyTorch reference where neither is available. The
environment variable ``FLOWOPS_BACKEND=reference|cpp|triton|auto`` (read at
import) or :func:`set_backend` / :func:`use_backend` force one; a forced backend
that cannot run raises instead of silently falling back.
"""
from __future__ import annotations

import contextlib
import importlib
import os

BACKENDS = ("auto", "reference", "cpp", "triton")

_forced = "auto"
_cpp: bool | None = None
_cpp_error = ""
_triton: bool | None = None
_triton_error = ""


def _normalize(name: str | None) -> str:
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op (``None`` re-reads ``FLOWOPS_BACKEND``)."""
    global _forced
    _forced = _normalize(os.environ.get("FLOWOPS_BACKEND") if name is None else name)


def get_backend() -> str:
    return _forced


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager forcing a backend inside a block."""
    global _forced
    previous = _forced
    _forced = _normalize(name)
    try:
        yield
    finally:
        _forced = previous


def has_cpp() -> bool:
    """True when the compiled extension flowops._C loads (tried once)."""
    global _cpp, _cpp_error
    if _cpp is None:
        if os.environ.get("FLOWOPS_DISABLE_EXT", "0") not in ("", "0"):
            _cpp, _cpp_error = False, "disabled by FLOWOPS_DISABLE_EXT"
        else:
            try:
                importlib.import_module("flowops._C")
                _cpp = True
            except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
                _cpp, _cpp_error = False, f"flowops._C not importable ({type(exc).__name__}: {exc})"
    return _cpp


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def has_triton() -> bool:
    """True when triton imports (tried once, on first need: importing triton is slow)."""
    global _triton, _triton_error
    if _triton is None:
        try:
            importlib.import_module("triton")
            _triton = True
        except Exception as exc:
            _triton, _triton_error = False, f"triton not importable ({type(exc).__name__}: {exc})"
    return _triton


def cpp_eager(x) -> bool:
    """True when the C++ kernels run for ``x`` as they are: a CPU float32/float64 tensor, the C++ backend selected,
    eager mode (not traced by torch.compile)."""
    import torch

    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and select(x.device) == "cpp")


def select(device) -> str:
    """The backend an op runs on for a tensor on ``device``."""
    forced = _forced
    if forced == "reference":
        return "reference"
    kind = device.type
    if kind == "cuda":
        if forced == "cpp":
            raise RuntimeError("flowops backend 'cpp' runs on CPU tensors only; got a CUDA tensor")
        if has_triton():
            return "triton"
        if forced == "triton":
            raise RuntimeError(f"flowops backend 'triton' was forced but {_triton_error}")
        return "reference"
    if kind == "cpu":
        if forced == "triton":
            if not triton_interpreted():
                raise RuntimeError("flowops backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                                   "triton is imported")
            if not has_triton():
                raise RuntimeError(f"flowops backend 'triton' was forced but {_triton_error}")
            return "triton"
        if has_cpp():
            return "cpp"
        if forced == "cpp":
            raise RuntimeError(f"flowops backend 'cpp' was forced but {_cpp_error}")
        return "reference"
    if forced != "auto":
        raise RuntimeError(f"flowops backend {forced!r} does not run on {kind} tensors")
    return "reference"


def info() -> dict:
    """Availability of every backend, with the reason where one is missing."""
    import torch

    out = {"forced": _forced, "torch": torch.__version__}
    cpp = has_cpp()
    cap = ""
    if cpp:
        import torch as _t

        cap = _t.ops.flowops.cpu_capability()
    out["cpp"] = {"available": cpp, "detail": f"flowops._C loaded, vector ISA {cap}" if cpp else _cpp_error}
    tri = has_triton()
    if tri:
        import triton

        detail = f"triton {triton.__version__}"
    else:
        detail = _triton_error
    cuda = torch.cuda.is_available()
    out["triton"] = {"available": tri, "detail": detail, "interpret": triton_interpreted()}
    out["cuda"] = {"available": cuda,
                   "detail": torch.cuda.get_device_name(0) if cuda else "torch.cuda.is_available() is False"}
    out["threads"] = torch.get_num_threads()
    out["cpu_tensors"] = select(torch.device("cpu")) if _forced != "triton" or triton_interpreted() else "error"
    out["cuda_tensors"] = select(torch.device("cuda")) if cuda else "n/a (no CUDA device)"
    return out


set_backend(None)
