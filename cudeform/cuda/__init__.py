"""GPU implementations of the ops: CuPy host code around the CUDA kernels in ``kernels/``.

One module per op, named like the op's public module and its ``kernels/<op>.cu`` source; each
declares ``SOURCE`` and ``NAME_EXPRESSIONS`` (every template instantiation it launches), which
``_compile`` compiles once per process and device and the CPU-only test suite compiles with
NVRTC for every supported architecture. Nothing here imports CuPy at import time.
"""
