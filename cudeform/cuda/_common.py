"""Host side of the reductions at the end of kernels/common.cuh, which every op module's
source compiles (each module lists COMMON_KERNELS among its NAME_EXPRESSIONS)."""

from __future__ import annotations

import numpy as np

from .. import _arrays
from . import _compile
from ._compile import ACC_DTYPES, launch

COMMON_KERNELS = ("plane_sums", "sum_partials")


def sum_partials(op_module, partial, chunks: int, out, dtype: str) -> None:
    """out[e] = the sum over the chunks of partial[chunk, e] (a flat array of chunks * out.size
    accumulators), in chunk order, stored as ``dtype``."""
    launch(_compile.typed(op_module, "sum_partials", dtype), out.size, (partial, np.int64(chunks), np.int64(out.size), out))


def bias_grad(op_module, grad_output, images: int, channels: int, L: int, dtype: str):
    """(channels,): the sum of grad_output (images, channels, L) over images and L, in a fixed
    order. Workspace: images * channels accumulators."""
    import cupy

    partial = cupy.empty(images * channels, ACC_DTYPES[dtype])
    launch(_compile.typed(op_module, "plane_sums", dtype), images * channels * _compile.BLOCK,
           (grad_output, np.int64(images * channels), np.int64(L), partial))
    out = _arrays.empty((channels,), dtype)
    sum_partials(op_module, partial, images, out, dtype)
    return out
