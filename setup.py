"""Builds the optional C++ extension flowops._C (CPU kernels) with ninja.

Install with `pip install --no-build-isolation -e .` so the extension is built
against the torch already installed. Set FLOWOPS_NO_EXT=1 to skip the build; flowops then falls back to its
plain-PyTorch reference on CPU.
"""
import glob
import os
import subprocess

from setuptools import setup


def _native_flags():
    """-march=native plus the ATen vector capability the compiler then offers."""
    flags = ["-O3", "-march=native", "-ffp-contract=fast"]
    try:
        out = subprocess.run(["c++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["-O3"]
    if "__AVX512F__" in out and "__AVX512BW__" in out and "__AVX512DQ__" in out and "__AVX512VL__" in out:
        flags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif "__AVX2__" in out and "__FMA__" in out:
        flags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def _extensions():
    if os.environ.get("FLOWOPS_NO_EXT", "0") not in ("", "0"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("flowops: torch is not importable in this build environment; building without the C++ "
              "extension (install with --no-build-isolation to build it against your torch)")
        return [], {}

    ext = CppExtension(
        name="flowops._C",
        sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args={"cxx": _native_flags() + ["-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
