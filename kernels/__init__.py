"""Triton kernels of flowops (installed as ``flowops.kernels``).

Every module here imports :mod:`triton` lazily, on the first launch, so importing the
package never needs Triton, CUDA or a GPU. On a CPU-only machine the kernels run through
the Triton interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported.
"""
