"""Row-major (strided-batched) GEMM through cuBLAS for every storage dtype.

CuPy's matmul has no bfloat16, so the GPU ops call ``cublasGemmStridedBatchedEx`` directly
on raw pointers: float32 accumulation for the half types, float64 for float64, and exact
float32 (no TF32) for float32.
"""

from __future__ import annotations

import functools

import numpy as np

_DATA_TYPES = {"float16": 2, "bfloat16": 14, "float32": 0, "float64": 1}  # cudaDataType
# alpha = 1 and beta in {0, 1} as host scalars of the compute type, made once, and their
# addresses (reading ``.ctypes.data`` costs microseconds per call).
_SCALARS = {(t, v): np.array(v, t) for t in (np.float32, np.float64) for v in (0.0, 1.0)}
_SCALAR_PTRS = {key: arr.ctypes.data for key, arr in _SCALARS.items()}


class Gemm:
    """One GEMM's cuBLAS arguments but the three pointers, made once per shape (see
    :func:`gemm`): converting them costs more than a small GEMM's launch."""

    def __init__(self, m, n, k, dtype, c_dtype, trans_a, trans_b, batch, stride_a, stride_b, stride_c, beta,
                 ld_a, ld_b, ld_c):
        import cupy
        from cupy_backends.cuda.libs import cublas

        compute, scalar = ((cublas.CUBLAS_COMPUTE_64F, np.float64) if dtype == "float64"
                           else (cublas.CUBLAS_COMPUTE_32F, np.float32))
        # Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
        self.head = (cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N,
                     cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N,
                     n, m, k, _SCALAR_PTRS[scalar, 1.0])
        self.b = (_DATA_TYPES[dtype], ld_b or (k if trans_b else n), stride_b)
        self.a = (_DATA_TYPES[dtype], ld_a or (m if trans_a else k), stride_a)
        self.beta = _SCALAR_PTRS[scalar, beta]
        self.tail = (_DATA_TYPES[c_dtype or dtype], ld_c or n, stride_c, batch, compute, cublas.CUBLAS_GEMM_DEFAULT)
        self.call = cublas.gemmStridedBatchedEx
        self.set_stream = cublas.setStream
        self.handle = cupy.cuda.device.get_cublas_handle
        self.current_stream = cupy.cuda.get_current_stream

    def __call__(self, a, b, c) -> None:
        handle = self.handle()
        self.set_stream(handle, self.current_stream().ptr)
        self.call(handle, *self.head, b.data.ptr, *self.b, a.data.ptr, *self.a, self.beta, c.data.ptr, *self.tail)


@functools.lru_cache(maxsize=4096)
def gemm(*, m: int, n: int, k: int, dtype: str, c_dtype: str | None = None, trans_a: bool = False,
         trans_b: bool = False, batch: int = 1, stride_a: int = 0, stride_b: int = 0, stride_c: int = 0,
         beta: float = 0.0, ld_a: int | None = None, ld_b: int | None = None, ld_c: int | None = None) -> Gemm:
    """``gemm(...)(a, b, c)`` computes ``c[i] = op(a[i]) @ op(b[i]) + beta * c[i]`` for
    i < batch, row-major, on CuPy's current stream; beta is 0 or 1.

    ``op(a[i])`` is (m, k) and ``op(b[i])`` is (k, n); ``a``, ``b`` and ``c`` are CuPy arrays
    (or views) whose first element starts the first matrix; strides and leading dimensions
    (the distance between rows as stored; default: dense rows) are in elements. ``c`` may
    have the accumulation dtype ``c_dtype`` (float32 for half inputs).
    """
    return Gemm(m, n, k, dtype, c_dtype, trans_a, trans_b, batch, stride_a, stride_b, stride_c, beta,
                ld_a, ld_b, ld_c)


def matmul(a, b, c, **shape) -> None:
    """``gemm(**shape)(a, b, c)``."""
    gemm(**shape)(a, b, c)
