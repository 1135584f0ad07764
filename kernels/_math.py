"""Device math and block-size helpers shared by the Triton kernels, jitted lazily like the kernels themselves.

Triton 3.x has no ``tl.tanh`` everywhere (and libdevice calls do not run in the interpreter), so
tanh is built from ``exp``.
"""
tl = None  # triton.language, bound by jitted_tanh()
_state: dict = {}


def _tanh(z):
    # tanh from exp, safe for every z: exp(-2|z|) never overflows. Near zero, where
    # (1 - e) / (1 + e) cancels, a degree-9 Taylor polynomial takes over (|z| < 0.02:
    # truncation below 1e-19 relative). Its coefficients are ratios of small integers, so
    # they are exact in fp64 too (an fp32 literal like 1/3 would not be).
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    z2 = a * a
    small = a * (1.0 - z2 / 3.0 * (1.0 - 2.0 * z2 / 5.0 * (1.0 - 17.0 * z2 / 42.0 * (1.0 - 62.0 * z2 / 153.0))))
    t = tl.where(a < 0.02, small, big)
    return tl.where(z < 0.0, -t, t)


def jitted_tanh():
    """The triton.jit-wrapped :func:`_tanh` (imports triton on first use)."""
    if not _state:
        import triton
        import triton.language as language

        global tl
        tl = language
        _state["tanh"] = triton.jit(_tanh)
    return _state["tanh"]


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes."""
    return 1 << max(0, int(n) - 1).bit_length()
