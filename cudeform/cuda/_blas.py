"""Row-major (strided-batched) GEMM through cuBLAS for every storage dtype.

CuPy's matmul has no bfloat16, so the GPU ops call ``cublasGemmStridedBatchedEx`` directly
on raw pointers: float32 accumulation for the half types, float64 for float64, and exact
float32 (no TF32) for float32.
"""

from __future__ import annotations

import numpy as np

_DATA_TYPES = {"float16": 2, "bfloat16": 14, "float32": 0, "float64": 1}  # cudaDataType
# alpha = 1 and beta in {0, 1} as host scalars of the compute type, made once, and their
# addresses (reading ``.ctypes.data`` costs microseconds per call).
_SCALARS = {(t, v): np.array(v, t) for t in (np.float32, np.float64) for v in (0.0, 1.0)}
_SCALAR_PTRS = {key: arr.ctypes.data for key, arr in _SCALARS.items()}


def matmul(a, b, c, *, m: int, n: int, k: int, dtype: str, c_dtype: str | None = None,
           trans_a: bool = False, trans_b: bool = False, batch: int = 1,
           stride_a: int = 0, stride_b: int = 0, stride_c: int = 0, beta: float = 0.0,
           ld_a: int | None = None, ld_b: int | None = None, ld_c: int | None = None) -> None:
    """``c[i] = op(a[i]) @ op(b[i]) + beta * c[i]`` for i < batch, row-major, on CuPy's
    current stream; beta is 0 or 1.

    ``op(a[i])`` is (m, k) and ``op(b[i])`` is (k, n); ``a``, ``b`` and ``c`` are CuPy arrays
    (or views) whose first element starts the first matrix; strides and leading dimensions
    (the distance between rows as stored; default: dense rows) are in elements. ``c`` may
    have the accumulation dtype ``c_dtype`` (float32 for half inputs).
    """
    import cupy
    from cupy_backends.cuda.libs import cublas

    c_dtype = c_dtype or dtype
    compute, scalar = ((cublas.CUBLAS_COMPUTE_64F, np.float64) if dtype == "float64"
                       else (cublas.CUBLAS_COMPUTE_32F, np.float32))
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    # Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
    lda = ld_a or (m if trans_a else k)
    ldb = ld_b or (k if trans_b else n)
    ldc = ld_c or n
    cublas.gemmStridedBatchedEx(
        handle,
        cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N,
        cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N,
        n, m, k,
        _SCALAR_PTRS[scalar, 1.0],
        b.data.ptr, _DATA_TYPES[dtype], ldb, stride_b,
        a.data.ptr, _DATA_TYPES[dtype], lda, stride_a,
        _SCALAR_PTRS[scalar, beta],
        c.data.ptr, _DATA_TYPES[c_dtype], ldc, stride_c,
        batch, compute, cublas.CUBLAS_GEMM_DEFAULT,
    )
