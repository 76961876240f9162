"""Host pieces the op modules share: the reductions at the end of kernels/common.cuh, which every
op module's source compiles (each module lists COMMON_KERNELS among its NAME_EXPRESSIONS), and
the chunks of images of the columns paths, and the channels-last copy of tensor_core.cuh that the
tensor-core paths run."""

from __future__ import annotations

import numpy as np

from .. import _arrays
from . import _compile
from ._compile import ACC_DTYPES, launch

COMMON_KERNELS = ("plane_sums", "sum_partials")
# plane_sums gives a plane of grad_output a warp up to this many elements (a block beyond: few
# long planes would leave the GPU idle).
PLANE_WARP_MAX = 8192

# The tensor-core paths' dtypes, and tensor_core.cuh's channels_last: 64 x 64 tiles, each block
# with CHANNELS_LAST_SHARED bytes of shared memory; the kernels running it give it at most
# LAYOUT_BLOCKS blocks (grid-stride over the tiles beyond).
TENSOR_CORE_DTYPES = ("float16", "bfloat16")
CHANNELS_LAST_SHARED_BYTES = 64 * 65 * 2
LAYOUT_BLOCKS = 4096


def channels_last_tiles(images: int, channels: int, positions: int) -> int:
    """channels_last's 64 x 64 tiles for (images, channels, positions)."""
    return images * -(-channels // 64) * -(-positions // 64)


def image_chunks(n_images: int, bytes_per_image: int, budget: int) -> tuple[int, list]:
    """(step, [(n0, n1), ...]): the fewest chunks of images whose columns fit in `budget` bytes
    (at least one image each), of equal size but the last: 16 images that fit 14 at a time go as
    8 + 8, since a GEMM over 2 images uses the GPU poorly."""
    most = max(1, min(n_images, budget // max(1, bytes_per_image)))
    count = -(-n_images // most) if n_images else 1
    step = max(1, -(-n_images // count))
    return step, [(n0, min(n_images, n0 + step)) for n0 in range(0, n_images, step)]


def sum_partials(op_module, partial, chunks: int, out, dtype: str) -> None:
    """out[e] = the sum over the chunks of partial[chunk, e] (a flat array of chunks * out.size
    accumulators), in chunk order, stored as ``dtype``."""
    launch(_compile.typed(op_module, "sum_partials", dtype), out.size, (partial, np.int64(chunks), np.int64(out.size), out))


def bias_grad(op_module, grad_output, images: int, channels: int, L: int, dtype: str):
    """(channels,): the sum of grad_output (images, channels, L) over images and L, in a fixed
    order. Workspace: images * channels accumulators."""
    import cupy

    partial = cupy.empty(images * channels, ACC_DTYPES[dtype])
    lanes = _compile.WARP if L <= PLANE_WARP_MAX else _compile.BLOCK
    launch(_compile.typed(op_module, "plane_sums", dtype), images * channels * lanes,
           (grad_output, np.int64(images * channels), np.int64(L), np.int32(lanes), partial))
    out = _arrays.empty((channels,), dtype)
    sum_partials(op_module, partial, images, out, dtype)
    return out
