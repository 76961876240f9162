"""Deformable Kernels on the GPU: kernels/deform_kernel_conv.cu, with cuBLAS or tensor-core GEMMs for global DK.

Global DK, with a short reduction (Cg * K <= DIRECT_MAX_REDUCTION, Cg = C_in/groups,
K = kh*kw: depthwise and the like) and planes small enough for 32-bit in-plane indices: direct
kernels. The forward ``dk_global_conv`` samples each (image, output channel)'s kernel into
shared memory and convolves tiles of the plane, each staging its input window there
(``_conv_tiles``), one launch, nothing stored. The backward stores the resampled kernels
(``dk_resample``); at stride 1 the input gradient is ``dk_global_conv`` again, a convolution of
grad_output with the flipped kernels (``transposed``), otherwise a gather through them
(``dk_global_input_grad``); the kernels' gradient is summed per tile of outputs
(``dk_global_kernel_grad``, on dk_global_conv's tiles). With a long reduction, the forward in
float16/bfloat16 on sm_80+ (C_in/groups a multiple of 8): an implicit GEMM on tensor cores,
``dk_global_mma``, over the input made channels-last and the kernels resampled
kernel-point-major (both in one launch, ``dk_mma_operands``), with no columns. Otherwise, per
chunk of images: the rigid ``dk_im2col`` and one strided-batched GEMM whose batch runs over
(image, weight group), each with its own resampled kernels; the backward's two GEMMs and the
gather ``dk_col2im``. Both then backpropagate through the resampling in one pass over the
kernels' gradient, ``dk_global_resample_grad`` (a thread per (o, c) pair and chunk of images),
whose partial sums ``sum_partials`` adds up. The backward of the tensor-core forward's shapes
(``_mma_backward``) takes its kernel-point-major kernels and columns instead, so that the
kernels' gradient is a matrix of (image, kernel point) rows that ``dk_resample_grad_sums``
reduces both ways in one pass; at stride 1 its input gradient is ``dk_global_mma``'s
transposed convolution of grad_output (made channels-last), with no columns' gradient. On sm_90
(compiled for sm_90a) these GEMMs run ``dk_global_wgmma`` on Hopper's warpgroup MMA, which also
takes the backward's kernels' gradient as an implicit GEMM over the channels-last input: no
columns at all.

Local DK: fused kernels that sample the scope at every output position, each thread for a chunk
of CHUNK channels that share the position's bilinear taps; the weight gradient is reduced inside
blocks (``dk_local_weight_grad``), then over the blocks in a second pass.

Every reduction has a fixed order, so both modes of the backward are bitwise reproducible.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import numpy as np

from .. import _arrays
from . import _blas, _common, _compile
from ._common import TENSOR_CORE_DTYPES
from ._compile import ACC_DTYPES, CXX_TYPES, STORAGE_DTYPES, launch

SOURCE = "deform_kernel_conv.cu"
_KERNELS = ("dk_resample", "dk_global_input_grad", "dk_im2col",
            "dk_col2im", "dk_global_resample_grad", "dk_local_conv", "dk_local_input_grad",
            "dk_local_offset_grad", "dk_local_weight_grad", "add_bias", *_common.COMMON_KERNELS)
# Kernel sizes the direct kernels are compiled for (unrolled), besides any size (0):
# dk_global_conv's heights, dk_global_kernel_grad's square kernels.
COMPILED_SIZES = (0, 3)
_TENSOR_CORE_KERNELS = ("dk_mma_operands", "dk_resample_grad_sums", "dk_resample_grad_offsets")
NAME_EXPRESSIONS = ([f"{k}<{t}>" for t in CXX_TYPES.values() for k in _KERNELS]
                    + [f"{k}<{t}, {size}>" for t in CXX_TYPES.values() for size in COMPILED_SIZES
                       for k in ("dk_global_conv", "dk_global_kernel_grad")]
                    + [f"{k}<{CXX_TYPES[t]}>" for t in TENSOR_CORE_DTYPES for k in _TENSOR_CORE_KERNELS]
                    + [f"dk_global_mma<{CXX_TYPES[t]}, {b}>" for t in TENSOR_CORE_DTYPES for b in ("false", "true")]
                    + [f"dk_global_wgmma<{CXX_TYPES[t]}, {mode}>" for t in TENSOR_CORE_DTYPES for mode in range(3)])

# The columns buffer of the GEMM path: at most this many bytes (at least one image), in chunks
# of equal size (_common.image_chunks). Its cuBLAS products ran best over a whole batch: global
# DK, fp32, N=16, C=256, 32x32 (151 MB of columns) on an H200 took 1.80 ms forward+backward in
# one chunk, 1.97 in two of 8 images and 1.91 in 13 + 3.
COLUMNS_BYTES = 192 * 2**20
# Global DK convolves directly (no columns, no GEMM) when a GEMM would reduce over at most this
# many terms: with depthwise weights the GEMMs are 1-row products that waste the tensor cores.
DIRECT_MAX_REDUCTION = 64
# The direct kernels cut each (image, channel) plane into bands or tiles of positions, one block
# each, when there are too few planes for this many blocks (each band at least BLOCK positions,
# each tile at least SPAN output rows).
TARGET_BLOCKS = 2048
# Outputs of a column per thread of dk_global_conv, one above the other (DK_SPAN in the source).
# At N=16, C=256, 56x56 depthwise fp16 on an H200: 4 took 169 us, 8 124 us, 16 166 us.
SPAN = 8
# dk_global_conv's dynamic shared memory per block: what every block may have without opting in.
DIRECT_SHARED_BYTES = 48 * 1024
# Outputs of a row (dk_im2col) or pixels (dk_col2im) per thread (DK_IM2COL_RUN in the source).
IM2COL_RUN = 4
# Kernel points per block sum of dk_global_kernel_grad (DK_POINT_RUN in the source).
POINT_RUN = 16
# Channels per thread of the local kernels (DK_CHUNK in the source).
CHUNK = 8
# Blocks to aim for when dk_global_resample_grad cuts the images into chunks (blocks of pairs
# are few where the pairs are: depthwise).
GRAD_TARGET_BLOCKS = 1024
# Scope elements per thread of dk_global_resample_grad (DK_SCOPE_RUN in the source), and its
# dynamic shared memory per block: within the 48 KB every block may have, beside its static
# arrays (3.75 KB in float64).
SCOPE_RUN = 16
RESAMPLE_GRAD_SHARED_BYTES = 44 * 1024
# (o, c) pairs per block of dk_resample_grad_sums (DK_SUM_COLUMNS in the source), and its dynamic
# shared memory (dk_sums::SHARED_BYTES): three stages of 32 rows of its columns and their taps.
SUM_COLUMNS = 256
SUM_SHARED_BYTES = 3 * (SUM_COLUMNS * 32 + 32 * (SCOPE_RUN + 8)) * 4
# dk_local_weight_grad: threads per block (its shared memory holds a column per thread) and the
# number of blocks to aim for when splitting the positions into chunks.
WEIGHT_GRAD_BLOCK = 128
WEIGHT_GRAD_TARGET_BLOCKS = 4096


# Global DK with a long reduction in a half type, Cg a multiple of 8 (whole 16-byte vectors of
# channels), on sm_80+: dk_global_mma, an implicit GEMM on tensor cores, rather than the
# columns and cuBLAS. False: the columns everywhere (the tests compare the two).
TENSOR_CORES = True
MMA_THREADS = 128  # dk_mma::THREADS
MMA_TILE = 128  # dk_mma::BM and dk_mma::BN, dk_wgmma's too
MMA_SHARED_BYTES = 3 * 2 * MMA_TILE * (64 + 8) * 2  # dk_mma::SHARED_BYTES
# On sm_90 the same tiles on Hopper's warpgroup MMA: dk_global_wgmma. False: dk_global_mma
# there too (the tests run both).
WGMMA = True
WGMMA_THREADS = 256  # dk_wgmma::THREADS
WGMMA_SHARED_BYTES = 1024 + 3 * 2 * MMA_TILE * 64 * 2 + MMA_TILE * 8  # dk_wgmma::SHARED_BYTES
TAP_BYTES = 32  # sizeof(ScopeTap<float>)
RESAMPLE_BLOCKS = 1024
# dk_mma_operands' scope taps (the backward): at most this many blocks, a thread per table row.
TAPS_BLOCKS = 1024


def _kernel(name: str, dtype: str, dynamic_shared: int = 0):
    return _compile.typed(sys.modules[__name__], name, dtype, dynamic_shared=dynamic_shared)


@functools.lru_cache(maxsize=1024)
def _geometry_args(geo, shape, c_out, images):
    """The DK_GEOMETRY kernel arguments for `images` images of an input of this shape (cached:
    building NumPy scalars costs more than a small kernel's launch)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    i64, i32 = np.int64, np.int32
    return (i64(images), i64(shape[1]), i64(shape[2]), i64(shape[3]), i64(c_out), i64(geo.groups),
            i64(geo.offset_groups), i32(kh), i32(kw), i32(sh), i32(sw), i32(ph), i32(pw), i32(dh), i32(dw),
            i64(geo.out_size[0]), i64(geo.out_size[1]), i64(geo.scope[0]), i64(geo.scope[1]))


def _columns(s, x):
    """Chunks of images whose rigid columns fit in COLUMNS_BYTES (_common.image_chunks), and a
    columns buffer for one chunk."""
    import cupy

    per_image = s.c_in * s.K * s.L
    step, chunks = _common.image_chunks(s.n, per_image * x.itemsize, COLUMNS_BYTES)
    return chunks, cupy.empty(per_image * step if s.n else 0, x.dtype)


def _small_planes(s, geo) -> bool:
    """Whether every in-plane coordinate and index of the convolution fits 32-bit arithmetic."""
    (kh, kw), (ph, pw), (dh, dw) = geo.kernel, geo.padding, geo.dilation
    return max(s.hw, s.L, s.h + 2 * ph + (kh - 1) * dh, s.w + 2 * pw + (kw - 1) * dw) < 2**30


def _small_units(units: int) -> bool:
    """Whether dk_global_conv's unit indices fit 32-bit arithmetic, with room for the grid
    stride past the last one."""
    return units < 2**31 - 2**16


def _direct(s, geo) -> bool:
    """Whether global DK takes the direct kernels: a short reduction that fits their shared
    memory, and planes small enough for their 32-bit in-plane arithmetic."""
    return s.rows <= DIRECT_MAX_REDUCTION and _small_planes(s, geo)


@functools.lru_cache(maxsize=1024)
def _conv_tiles(planes, out_size, kernel, stride, dilation, rows, acc_bytes, budget, target_blocks):
    """dk_global_conv's launch for `planes` (image, output channel) planes of `out_size` outputs
    and a reduction of `rows` (Cg * K) values of `acc_bytes` each: (threads, block, shared
    bytes, its (tile_h, tile_w, staged) arguments). A tile is at most BLOCK columns (whole
    output rows where they fit) by spans of SPAN rows, a thread per column and span. It stages
    its input window (which stride and dilation widen) when the window fits `budget` bytes of
    shared memory, narrowing the tile as needed, else reads the planes directly. Planes too few
    for `target_blocks` are cut into shorter tiles. Cached: the arguments cost more to build
    than a small launch."""
    (oh, ow), (kh, kw), (sh, sw), (dh, dw) = out_size, kernel, stride, dilation
    spans = -(-oh // SPAN)

    def shared(th, tw, staged):
        # The window of th rows rounded up to whole spans, after the kernel.
        window = ((-(-th // SPAN) * SPAN - 1) * sh + (kh - 1) * dh + 1) * ((tw - 1) * sw + (kw - 1) * dw + 1)
        return acc_bytes * (rows + (window if staged else 0))

    tw = -(-ow // -(-ow // _compile.BLOCK))  # as even as can be
    narrow = tw
    while narrow > 1 and shared(1, narrow, True) > budget:
        narrow = -(-narrow // 2)
    staged = shared(1, narrow, True) <= budget
    tw = narrow if staged else tw
    tiles_x = -(-ow // tw)
    tile_spans = _compile.BLOCK // tw
    while staged and tile_spans > 1 and shared(tile_spans * SPAN, tw, staged) > budget:
        tile_spans -= 1
    tiles_y = min(spans, max(-(-spans // tile_spans), -(-target_blocks // (planes * tiles_x))))
    th = min(oh, SPAN * -(-spans // tiles_y))
    block = -(-tw * -(-th // SPAN) // _compile.WARP) * _compile.WARP
    threads = planes * -(-oh // th) * tiles_x * block
    return threads, block, shared(th, tw, staged), (np.int32(th), np.int32(tw), np.int32(staged))


def _im2col(x, point_major, geo, s, dtype, cols) -> None:
    """dk_im2col: the rigid columns of the images of x (all of them or a chunk) into cols, their
    rows in the kernels' order (`point_major`, ColumnRows)."""
    images = x.shape[0]
    launch(_kernel("dk_im2col", dtype), images * s.c_in * geo.out_size[0] * -(-geo.out_size[1] // IM2COL_RUN),
           (x, np.int32(_small_planes(s, geo)), np.int32(point_major), *_geometry_args(geo, x.shape, s.c_out, images),
            cols))


def _bands(planes: int, size: int) -> int:
    """Bands per plane of `size` positions for a direct kernel with one block per band: enough
    blocks for the GPU when the planes are few, each band at least a block of positions."""
    return max(1, min(-(-TARGET_BLOCKS // max(planes, 1)), size // _compile.BLOCK))


@functools.lru_cache(maxsize=256)
def _shapes(x_shape: tuple, weight_shape: tuple, geo) -> "_Shapes":
    """The call's _Shapes, made once per shape (a Python object's dozen attributes cost
    microseconds a call)."""
    return _Shapes(x_shape, weight_shape, geo)


class _Shapes:
    """The sizes every launch needs, from the shapes of the input and the weight. Not to be
    modified: _shapes shares one per shape, and the caches of _mma_fits and _mma_plan key on it."""

    def __init__(self, x_shape, weight_shape, geo):
        self.n, self.c_in = x_shape[:2]
        self.c_out, self.cg = weight_shape[:2]
        self.h, self.w = x_shape[2:]
        self.hw = self.h * self.w
        self.L = geo.out_size[0] * geo.out_size[1]
        self.K = geo.kernel[0] * geo.kernel[1]
        self.S = geo.scope[0] * geo.scope[1]
        self.og = self.c_out // geo.groups
        self.opg = self.c_out // geo.offset_groups
        self.rows = self.cg * self.K  # of one (image, weight group) GEMM operand


def _tensor_core_path(s, geo, dtype) -> bool:
    """Whether global DK's forward takes dk_global_mma (see TENSOR_CORES)."""
    return TENSOR_CORES and dtype in TENSOR_CORE_DTYPES and _mma_fits(s, geo) and _compile.has_tensor_cores()


@functools.lru_cache(maxsize=256)
def _mma_fits(s, geo) -> bool:
    """Whether dk_global_mma and dk_mma_operands take this shape: whole 16-byte vectors of
    channels, 32-bit coordinates, a scope slice of 8 channels in shared memory."""
    return (s.cg % 8 == 0 and _small_planes(s, geo) and s.hw * s.c_in < 2**31 and s.K * s.cg < 2**31
            and _resample_cl_launch(s.n, s.c_out, s.cg, s.K, s.S) is not None)


@functools.lru_cache(maxsize=256)
def _resample_cl_launch(n: int, c_out: int, cg: int, K: int, S: int):
    """dk_mma_operands' resampling (resample_cl): (slice, pass, blocks, shared bytes), passes
    of `pass` images (all of them where their taps fit a quarter of DIRECT_SHARED_BYTES) and
    scope slices of `slice` channels, as wide as the rest allows and narrow enough for
    RESAMPLE_BLOCKS blocks; None when not even 8 channels of one scope fit. (Slices of all
    256 channels at N=16, C=256 gave 256 blocks, latency-bound, 17 us; passes of 2 images 2048
    blocks that spent their time copying the same scopes, 37 us.)"""
    pass_ = max(1, min(n, DIRECT_SHARED_BYTES // 4 // (TAP_BYTES * K)))
    passes = -(-n // pass_)
    widest = min(cg, (DIRECT_SHARED_BYTES - pass_ * K * TAP_BYTES) // (S * 2) // 8 * 8)
    if widest < 8:
        return None
    even = -(-cg // -(-RESAMPLE_BLOCKS // (c_out * passes)))  # channels per slice for the blocks
    slice_ = max(8, min(widest, -(-even // 8) * 8))
    blocks = c_out * -(-cg // slice_) * passes
    return np.int32(slice_), np.int32(pass_), blocks, pass_ * K * TAP_BYTES + slice_ * S * 2


class _MmaPlan(NamedTuple):
    """The launches of the tensor-core path for one shape and direction, made once (their
    arguments cost more to build than the launches)."""
    input_cl: int  # elements of the input's channels-last copy (0: none)
    grad_output_cl: int  # the same for grad_output
    operand_blocks: int  # dk_mma_operands': every job's
    operand_args: tuple  # (slice, pass, layout blocks, taps blocks)
    operand_shared: int
    mma_tiles: int  # the forward's, or the backward's input gradient's (0: not on tensor cores)
    kernel_grad_tiles: int  # the backward's kernels' gradient's on dk_global_wgmma (0: not there)


def _mma_tiles(s, groups: int, outputs: int, positions: int) -> int:
    """dk_global_mma's tiles for `outputs` channels of `positions` positions per image."""
    return s.n * groups * -(-outputs // groups // MMA_TILE) * -(-positions // MMA_TILE)


@functools.lru_cache(maxsize=256)
def _mma_plan(s, geo, backward: bool, wgmma: bool) -> _MmaPlan:
    """The forward's plan: dk_mma_operands makes the input channels-last and resamples the
    kernels, dk_global_mma (dk_global_wgmma where `wgmma`) convolves. The backward's:
    dk_mma_operands resamples the kernels and makes dk_resample_grad_sums' taps; where the
    transposed convolution takes the input gradient (_mma_input_grad) it makes grad_output
    channels-last for it, and where dk_global_wgmma takes the kernels' gradient
    (_wgmma_kernel_grad) the input."""
    slice_, pass_, resample_blocks, resample_shared = _resample_cl_launch(s.n, s.c_out, s.cg, s.K, s.S)
    input_grad = backward and _mma_input_grad(s, geo)
    kernel_grad = backward and wgmma and _wgmma_kernel_grad(s)
    input_cl = s.n * s.hw * s.c_in if not backward or kernel_grad else 0
    grad_output_cl = s.n * s.L * s.c_out if input_grad else 0
    copy_tiles = ((_common.channels_last_tiles(s.n, s.c_in, s.hw) if input_cl else 0)
                  + (_common.channels_last_tiles(s.n, s.c_out, s.L) if grad_output_cl else 0))
    layout_blocks = min(copy_tiles, _common.LAYOUT_BLOCKS)
    taps_blocks = min(-(-geo.offset_groups * s.n * s.K // _compile.BLOCK), TAPS_BLOCKS) if backward else 0
    if not backward:
        mma_tiles = _mma_tiles(s, geo.groups, s.c_out, s.L)
    else:
        mma_tiles = _mma_tiles(s, geo.groups, s.c_in, s.hw) if input_grad else 0
    kernel_grad_tiles = _mma_tiles(s, geo.groups, s.c_out, MMA_TILE) * s.K * -(-s.cg // MMA_TILE) if kernel_grad else 0
    return _MmaPlan(input_cl, grad_output_cl, layout_blocks + taps_blocks + resample_blocks,
                    (slice_, pass_, np.int32(layout_blocks), np.int32(taps_blocks)),
                    max(resample_shared, _common.CHANNELS_LAST_SHARED_BYTES), mma_tiles, kernel_grad_tiles)


@functools.lru_cache(maxsize=256)
def _mma_input_grad(s, geo) -> bool:
    """Whether the tensor-core backward's input gradient is dk_global_mma's transposed
    convolution of grad_output (stride 1; whole 16-byte vectors of its channels per group, a
    plane of them within 32-bit indices) rather than cuBLAS and dk_col2im."""
    return geo.stride == (1, 1) and s.og % 8 == 0 and s.L * s.c_out < 2**31


def _wgmma_kernel_grad(s) -> bool:
    """Whether dk_global_wgmma can take the kernels' gradient, grad_output @ the input's
    columns^T with no columns (rather than dk_im2col and cuBLAS): grad_output's rows whole
    16-byte vectors."""
    return s.L % 8 == 0


# dk_global_wgmma's modes (DkWgMode in the source); dk_global_mma's TRANSPOSED is INPUT_GRAD.
FORWARD, INPUT_GRAD, KERNEL_GRAD = 0, 1, 2


def _wgmma() -> bool:
    """Whether the tensor-core path runs dk_global_wgmma (see WGMMA)."""
    return WGMMA and _compile.has_wgmma()


def _mma(tiles: int, mode: int, args: tuple, dtype: str) -> None:
    """dk_global_mma or dk_global_wgmma (_wgmma) over `tiles` tiles in `mode` (KERNEL_GRAD on
    dk_global_wgmma only)."""
    kernel, block, shared = _mma_kernel(dtype, mode, _wgmma(), _compile.current_device())
    launch(kernel, tiles * block, args, block=block, shared_mem=shared)


@functools.lru_cache(maxsize=64)
def _mma_kernel(dtype: str, mode: int, wgmma: bool, device: int):
    """_mma's (kernel, block, shared bytes) on `device`, looked up once."""
    if wgmma:
        expression, block, shared = f"dk_global_wgmma<{CXX_TYPES[dtype]}, {mode}>", WGMMA_THREADS, WGMMA_SHARED_BYTES
    else:
        expression, block, shared = (f"dk_global_mma<{CXX_TYPES[dtype]}, {str(mode == INPUT_GRAD).lower()}>",
                                     MMA_THREADS, MMA_SHARED_BYTES)
    return _compile.function(sys.modules[__name__], expression, dynamic_shared=shared), block, shared


def _mma_operands(x, go, weight, offset, geo, s, dtype, plan, taps=None):
    """dk_mma_operands by `plan` (_mma_plan): the kernels resampled kernel-point-major, (N,
    C_out, K, Cg), after the plan's channels-last copies of the input and of grad_output (`go`,
    None in the forward) in one workspace array; given `taps` (a Pointer to room for
    dk_resample_grad_sums' taps: the backward), those taps too. Returns the workspace, and the
    copies (Pointer(0) where none) and the kernels as Pointers into it."""
    workspace = _arrays.empty(plan.input_cl + plan.grad_output_cl + s.n * s.c_out * s.K * s.cg, dtype)
    # The copies' sizes are multiples of 8 elements: every part is aligned to 16-byte vectors.
    start, item = workspace.data.ptr, workspace.itemsize
    x_cl = _compile.Pointer(start if plan.input_cl else 0)
    go_cl = _compile.Pointer(start + plan.input_cl * item if plan.grad_output_cl else 0)
    kernels = _compile.Pointer(start + (plan.input_cl + plan.grad_output_cl) * item)
    launch(_kernel("dk_mma_operands", dtype), plan.operand_blocks * _compile.BLOCK,
           (x, x if go is None else go, weight, offset, *plan.operand_args,
            *_geometry_args(geo, x.shape, s.c_out, s.n), x_cl, go_cl, kernels,
            _compile.Pointer(0) if taps is None else taps), shared_mem=plan.operand_shared)
    return workspace, x_cl, go_cl, kernels


def _mma_forward(x, weight, offset, bias_arg, use_bias, geo, s, dtype, out):
    """Global DK's forward: _mma_operands, then dk_global_mma."""
    plan = _mma_plan(s, geo, False, _wgmma())
    _, x_cl, _, kernels = _mma_operands(x, None, weight, offset, geo, s, dtype, plan)
    _mma(plan.mma_tiles, FORWARD, (x_cl, kernels, bias_arg, use_bias, *_geometry_args(geo, x.shape, s.c_out, s.n),
                                   out), dtype)


@functools.lru_cache(maxsize=256)
def _resample_launch(terms: int, scope: int, acc_bytes: int, budget: int):
    """dk_resample's (block, staged, pitch, shared bytes) for offset groups of `terms` (o, c)
    pairs: a block of at most BLOCK threads, no wider than a group needs, whose scopes (`pitch`
    values apart, odd) fit `budget` bytes of shared memory; unstaged when not even a warp's do."""
    block, pitch = min(_compile.BLOCK, -(-terms // _compile.WARP) * _compile.WARP), scope | 1
    fit = budget // (pitch * acc_bytes) // _compile.WARP * _compile.WARP
    if fit == 0:
        return block, np.int32(0), np.int32(pitch), 0
    block = min(block, fit)
    return block, np.int32(1), np.int32(pitch), block * pitch * acc_bytes


def _resample(weight, offset, x, geo, s, dtype):
    import cupy

    kernels = cupy.empty((s.n, s.c_out, s.rows), STORAGE_DTYPES[dtype])
    terms = s.opg * s.cg
    block, staged, pitch, shared = _resample_launch(terms, s.S, np.dtype(ACC_DTYPES[dtype]).itemsize,
                                                    DIRECT_SHARED_BYTES)
    # Chunks of images, each block staging its scopes once for all of them, enough for the GPU.
    tiles = geo.offset_groups * -(-terms // block)
    chunks = max(1, min(s.n, -(-RESAMPLE_BLOCKS // tiles)))
    images = max(1, -(-s.n // chunks))
    launch(_kernel("dk_resample", dtype), tiles * -(-s.n // images) * block,
           (weight, offset, staged, pitch, np.int64(images), *_geometry_args(geo, x.shape, s.c_out, s.n), kernels),
           block=block, shared_mem=shared)
    return kernels


def _direct_conv(x, weight, offset, bias_arg, use_bias, transposed, geo, geo_args, planes, rows, dtype, out):
    """dk_global_conv over `planes` output planes with a reduction of `rows` (Cg * K) values."""
    threads, block, shared, tiles = _conv_tiles(planes, geo.out_size, geo.kernel, geo.stride, geo.dilation, rows,
                                                np.dtype(ACC_DTYPES[dtype]).itemsize, DIRECT_SHARED_BYTES,
                                                TARGET_BLOCKS)
    kh = geo.kernel[0] if geo.kernel[0] in COMPILED_SIZES else 0
    launch(_compile.function(sys.modules[__name__], f"dk_global_conv<{CXX_TYPES[dtype]}, {kh}>"), threads,
           (x, weight, offset, bias_arg, use_bias, np.int32(transposed), *tiles,
            np.int32(_small_units(threads // block)), *geo_args, out), block=block, shared_mem=shared)


@functools.lru_cache(maxsize=256)
def _transposed(geo, h: int, w: int):
    """The geometry of global DK's input gradient at stride 1 as a convolution of grad_output
    with the flipped kernels (dk_global_conv's `transposed`): the outputs are the input's
    H x W, the padding (k - 1) * dilation - padding."""
    (kh, kw), (ph, pw), (dh, dw) = geo.kernel, geo.padding, geo.dilation
    return geo._replace(padding=((kh - 1) * dh - ph, (kw - 1) * dw - pw), out_size=(h, w), offset_groups=1)


def _direct_kernel_grad(go, x, geo, geo_args, s, dtype):
    """dk_global_kernel_grad: the resampled kernels' gradient per tile of outputs, (N, bands,
    C_out, Cg * K) accumulators, and `bands`."""
    import cupy

    acc_bytes = np.dtype(ACC_DTYPES[dtype]).itemsize
    planes = s.n * s.c_out
    budget = DIRECT_SHARED_BYTES - _compile.BLOCK // _compile.WARP * POINT_RUN * acc_bytes  # beside warp sums
    threads, block, shared, tiles = _conv_tiles(max(planes, 1), geo.out_size, geo.kernel, geo.stride, geo.dilation,
                                                0, acc_bytes, budget, TARGET_BLOCKS)
    bands = threads // block // max(planes, 1)
    grad_kernels = cupy.empty((s.n, bands, s.c_out, s.rows), ACC_DTYPES[dtype])
    # A compiled size only with its assumptions: a square kernel, unit row stride and dilation, a
    # staged window.
    kh, kw = geo.kernel
    square = kh == kw and geo.stride[0] == 1 and geo.dilation[0] == 1 and tiles[2]
    size = kh if square and kh in COMPILED_SIZES else 0
    launch(_compile.function(sys.modules[__name__], f"dk_global_kernel_grad<{CXX_TYPES[dtype]}, {size}>"), threads,
           (go, x, *tiles, np.int32(_small_units(threads // block)), *geo_args, grad_kernels), block=block,
           shared_mem=shared)
    return grad_kernels, bands


def _local_blocks(s, positions: int, runs: int, run: int, span: int) -> int:
    """Blocks of dk_local_conv / dk_local_input_grad: (image, block of positions, chunk)."""
    return s.n * -(-positions // _compile.BLOCK) * runs * -(-run // span)


def forward(input, weight, kernel_offset, bias, *, geo, dtype):
    x, offset = input, kernel_offset
    s = _shapes(x.shape, weight.shape, geo)
    out = _arrays.empty((s.n, s.c_out, *geo.out_size), dtype)
    use_bias = np.int32(bias is not None)
    bias_arg = bias if use_bias else x
    geo_args = _geometry_args(geo, x.shape, s.c_out, s.n)
    if geo.local:
        # Chunks of output channels inside one offset group: they share the scope taps.
        span = min(CHUNK, s.opg)
        launch(_kernel("dk_local_conv", dtype), _local_blocks(s, s.L, geo.offset_groups, s.opg, span) * _compile.BLOCK,
               (x, weight, offset, bias_arg, use_bias, np.int32(span), *geo_args, out))
        return out
    if _direct(s, geo):
        if out.size:
            _direct_conv(x, weight, offset, bias_arg, use_bias, 0, geo, geo_args, s.n * s.c_out, s.rows, dtype, out)
        return out
    if _tensor_core_path(s, geo, dtype):
        if out.size:
            _mma_forward(x, weight, offset, bias_arg, use_bias, geo, s, dtype, out)
        return out
    kernels = _resample(weight, offset, x, geo, s, dtype)
    chunks, cols = _columns(s, x)
    for n0, n1 in chunks:
        b = n1 - n0
        _im2col(x[n0:n1], 0, geo, s, dtype, cols)
        # One product per (image, weight group): its resampled kernels times its columns.
        _blas.matmul(kernels[n0:n1], cols, out[n0:n1], m=s.og, n=s.L, k=s.rows, dtype=dtype, batch=b * geo.groups,
                     stride_a=s.og * s.rows, stride_b=s.rows * s.L, stride_c=s.og * s.L)
    if use_bias:
        launch(_kernel("add_bias", dtype), s.n * s.c_out * _compile.BLOCK,
               (out, bias, np.int64(s.n), np.int64(s.c_out), np.int64(s.L)))
    return out


def backward(grad_output, input, weight, kernel_offset, bias, *, geo, dtype, deterministic):
    go, x, offset = grad_output, input, kernel_offset
    s = _shapes(x.shape, weight.shape, geo)
    grad_input = _arrays.empty(x.shape, dtype)
    grad_offset = _arrays.empty(offset.shape, dtype)
    grad_weight = _arrays.empty(weight.shape, dtype)
    if geo.local:
        _local_backward(go, x, weight, offset, geo, s, dtype, grad_input, grad_offset, grad_weight)
    else:
        _global_backward(go, x, weight, offset, geo, s, dtype, grad_input, grad_offset, grad_weight)
    grad_bias = None
    if bias is not None:
        grad_bias = _common.bias_grad(sys.modules[__name__], go, s.n, s.c_out, s.L, dtype)
    return grad_input, grad_weight, grad_offset, grad_bias


def _global_backward(go, x, weight, offset, geo, s, dtype, grad_input, grad_offset, grad_weight):
    import cupy

    if not _direct(s, geo) and _tensor_core_path(s, geo, dtype):
        _mma_backward(go, x, weight, offset, geo, s, dtype, grad_input, grad_offset, grad_weight)
        return
    acc_dtype = ACC_DTYPES[dtype]
    geo_args = _geometry_args(geo, x.shape, s.c_out, s.n)
    kernels = _resample(weight, offset, x, geo, s, dtype)
    if _direct(s, geo):
        if geo.stride == (1, 1) and s.og * s.K <= DIRECT_MAX_REDUCTION:
            if grad_input.size:
                t = _transposed(geo, s.h, s.w)
                _direct_conv(go, kernels, kernels, go, np.int32(0), 1, t, _geometry_args(t, go.shape, s.c_in, s.n),
                             s.n * s.c_in, s.og * s.K, dtype, grad_input)
        else:
            in_bands = _bands(s.n * s.c_in, s.hw)
            launch(_kernel("dk_global_input_grad", dtype), s.n * s.c_in * in_bands * _compile.BLOCK,
                   (go, kernels, np.int64(in_bands), *geo_args, grad_input))
        grad_kernels, bands = _direct_kernel_grad(go, x, geo, geo_args, s, dtype)
    else:
        bands = 1
        grad_kernels = cupy.empty((s.n, bands, s.c_out, s.rows), acc_dtype)
        _columns_backward(go, x, kernels, grad_kernels, 0, geo, s, dtype, grad_input)
    # Through the resampling: partial sums per block of (o, c) pairs (the offsets') and per
    # chunk of images (the weight's), in one buffer, each summed by sum_partials.
    this = sys.modules[__name__]
    terms = s.opg * s.cg  # (o, c) pairs per offset group
    column = 2 * SCOPE_RUN * np.dtype(acc_dtype).itemsize  # a thread's shared memory
    block = min(_compile.BLOCK, -(-terms // _compile.WARP) * _compile.WARP,
                RESAMPLE_GRAD_SHARED_BYTES // column // _compile.WARP * _compile.WARP)
    pair_blocks, runs = -(-terms // block), -(-s.S // SCOPE_RUN)
    image_chunks = max(1, min(s.n, -(-GRAD_TARGET_BLOCKS // (geo.offset_groups * pair_blocks))))
    offset_chunks = pair_blocks * runs
    cut = offset_chunks * grad_offset.size
    partial = cupy.empty(cut + image_chunks * grad_weight.size, acc_dtype)
    offset_partial, weight_partial = partial[:cut], partial[cut:]
    launch(_kernel("dk_global_resample_grad", dtype), geo.offset_groups * pair_blocks * image_chunks * block,
           (grad_kernels, weight, offset, np.int64(bands), np.int64(pair_blocks), np.int64(image_chunks), *geo_args,
            offset_partial, weight_partial), block=block, shared_mem=block * column)
    _common.sum_partials(this, offset_partial, offset_chunks, grad_offset, dtype)
    _common.sum_partials(this, weight_partial, image_chunks, grad_weight, dtype)


def _mma_backward(go, x, weight, offset, geo, s, dtype, grad_input, grad_offset, grad_weight):
    """Global DK's backward for the shapes of the tensor-core forward, on its kernel-point-major
    kernels (_mma_operands, which also makes dk_resample_grad_sums' taps and the channels-last
    copies that _mma_plan asks for). The input gradient at stride 1 (_mma_input_grad) is the
    transposed convolution of grad_output on tensor cores; otherwise the columns' gradient,
    kernels^T @ grad_output (cuBLAS), gathered by dk_col2im. The kernels' gradient, grad_output
    @ columns^T, is dk_global_wgmma's KERNEL_GRAD on sm_90 (_wgmma_kernel_grad), no columns;
    otherwise dk_im2col's kernel-point-major columns and cuBLAS. It comes out (N, C_out, K, Cg):
    a matrix of (n, k) rows that dk_resample_grad_sums reduces both ways, into the weight's
    gradient and partial products per chunk of SUM_COLUMNS (o, c) pairs, which
    dk_resample_grad_offsets finishes. Workspace beside any columns: the kernels, their
    gradient in float32, the channels-last copies, ``G * N * K * ceil(S_h*S_w / SCOPE_RUN) *
    SCOPE_RUN`` taps and ``G * ceil(C_out/G * Cg / SUM_COLUMNS) * N * K * S_h*S_w`` partial
    products. At N=16, C=256, 32x32 in fp16 on an H200 the transposed convolution took 68 us
    on dk_global_mma, 47 on dk_global_wgmma (+6 us for the copy) where cuBLAS and dk_col2im
    took 41 + 50. (dk_kernel_grad_mma, an implicit GEMM for the kernels' gradient on mma.sync,
    took 108 us where dk_im2col and cuBLAS take 35 + 40.)"""
    import cupy

    plan = _mma_plan(s, geo, True, _wgmma())
    rows, runs = s.n * s.K, -(-s.S // SCOPE_RUN)
    taps_size = geo.offset_groups * rows * runs * SCOPE_RUN
    chunks = geo.offset_groups * -(-s.opg * s.cg // SUM_COLUMNS)
    # One allocation: the kernels' gradient, the taps, the partial products.
    scratch = cupy.empty(s.n * s.c_out * s.rows + taps_size + chunks * rows * s.S, np.float32)
    grad_kernels = scratch[:s.n * s.c_out * s.rows].reshape(s.n, s.c_out, s.rows)
    taps = _compile.Pointer(scratch.data.ptr + grad_kernels.nbytes)
    workspace, x_cl, go_cl, kernels = _mma_operands(x, go, weight, offset, geo, s, dtype, plan, taps=taps)
    if plan.mma_tiles:
        t = _transposed(geo, s.h, s.w)
        _mma(plan.mma_tiles, INPUT_GRAD, (go_cl, kernels, go, np.int32(0), *_geometry_args(t, go.shape, s.c_in, s.n),
                                          grad_input), dtype)
    if plan.kernel_grad_tiles:
        _mma(plan.kernel_grad_tiles, KERNEL_GRAD,
             (x_cl, go, go, np.int32(0), *_geometry_args(geo, x.shape, s.c_out, s.n), grad_kernels), dtype)
    if not (plan.mma_tiles and plan.kernel_grad_tiles):
        # What the tensor cores did not take; the workspace is then the kernels alone, or after
        # the input's copy.
        kernels_array = workspace[plan.input_cl:].reshape(s.n, s.c_out, s.rows) if not plan.mma_tiles else None
        _columns_backward(go, x, kernels_array, None if plan.kernel_grad_tiles else grad_kernels, 1, geo, s, dtype,
                          None if plan.mma_tiles else grad_input)
    geo_args = _geometry_args(geo, x.shape, s.c_out, s.n)
    partial = _compile.Pointer(taps + taps_size * scratch.itemsize)
    launch(_kernel("dk_resample_grad_sums", dtype, SUM_SHARED_BYTES), chunks * runs * SUM_COLUMNS,
           (grad_kernels, weight, taps, *geo_args, partial, grad_weight), block=SUM_COLUMNS,
           shared_mem=SUM_SHARED_BYTES)
    launch(_kernel("dk_resample_grad_offsets", dtype), geo.offset_groups * rows * _compile.BLOCK,
           (partial, offset, *geo_args, grad_offset))


def _columns_backward(go, x, kernels, grad_kernels, point_major, geo, s, dtype, grad_input):
    """The columns path's backward, per chunk of images (_columns): unless grad_kernels is None,
    dk_im2col, then per (image, weight group) grad_kernels = grad_output @ columns^T (in the
    accumulation type); unless grad_input is None, the columns' gradient, kernels^T @
    grad_output, into the same buffer, which dk_col2im gathers. `kernels` and `grad_kernels`
    have the images first; `point_major` (0 or 1) sets the columns' row order to the kernels'
    (ColumnRows)."""
    chunks, cols = _columns(s, x)
    for n0, n1 in chunks:
        b = n1 - n0
        # One chunk (the usual case) takes the arrays whole: each slice costs host time.
        images = (lambda a: a) if b == s.n else (lambda a: a[n0:n1])  # noqa: E731
        g = images(go)
        if grad_kernels is not None:
            _im2col(images(x), point_major, geo, s, dtype, cols)
            _blas.matmul(g, cols, images(grad_kernels), m=s.og, n=s.rows, k=s.L, dtype=dtype,
                         c_dtype=np.dtype(ACC_DTYPES[dtype]).name, trans_b=True, batch=b * geo.groups,
                         stride_a=s.og * s.L, stride_b=s.rows * s.L, stride_c=s.og * s.rows)
        if grad_input is None:
            continue
        _blas.matmul(images(kernels), g, cols, m=s.rows, n=s.L, k=s.og, dtype=dtype, trans_a=True,
                     batch=b * geo.groups, stride_a=s.og * s.rows, stride_b=s.og * s.L, stride_c=s.rows * s.L)
        launch(_kernel("dk_col2im", dtype), b * s.c_in * s.h * -(-s.w // IM2COL_RUN),
               (cols, np.int32(_small_planes(s, geo)), np.int32(point_major),
                *_geometry_args(geo, x.shape, s.c_out, b), images(grad_input)))


def _input_grad_chunks(s) -> tuple[int, int]:
    """(run, span) of dk_local_input_grad: chunks of `span` input channels, inside runs of `run`,
    whose outputs (weight group * og + q) lie in one offset group for every q. Inside one weight
    group that always holds (the chunk shares its outputs); depthwise channels (Cg = 1) may
    share a chunk when span * og divides C_out/G, so chunks never straddle an offset group."""
    if s.cg > 1:
        return s.cg, min(CHUNK, s.cg)
    return s.c_in, max([1] + [d for d in range(2, CHUNK + 1) if s.opg % (d * s.og) == 0])


def _local_backward(go, x, weight, offset, geo, s, dtype, grad_input, grad_offset, grad_weight):
    import cupy

    geo_args = _geometry_args(geo, x.shape, s.c_out, s.n)
    run, span = _input_grad_chunks(s)
    launch(_kernel("dk_local_input_grad", dtype), _local_blocks(s, s.hw, s.c_in // run, run, span) * _compile.BLOCK,
           (go, weight, offset, np.int32(span), np.int64(run), *geo_args, grad_input))
    launch(_kernel("dk_local_offset_grad", dtype), grad_offset.size // 2,
           (go, x, weight, offset, *geo_args, grad_offset))
    # Enough chunks of positions to fill the GPU, each at least a block's worth of positions.
    pairs, positions = s.c_out * s.cg, s.n * s.L
    chunks = max(1, min(-(-WEIGHT_GRAD_TARGET_BLOCKS // pairs), positions // WEIGHT_GRAD_BLOCK))
    partial = cupy.empty(chunks * weight.size, ACC_DTYPES[dtype])
    launch(_kernel("dk_local_weight_grad", dtype), pairs * chunks * WEIGHT_GRAD_BLOCK,
           (go, x, offset, np.int64(chunks), *geo_args, partial), block=WEIGHT_GRAD_BLOCK)
    _common.sum_partials(sys.modules[__name__], partial, chunks, grad_weight, dtype)
