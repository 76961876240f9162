"""Deformable convolution on the GPU: kernels/deform_conv.cu around cuBLAS GEMMs.

Forward, per chunk of images: im2col, then the GEMM. With one weight group and H_out*W_out a
multiple of PITCH, one strided-batched GEMM over the images writes straight into the output,
then the bias is added. Otherwise one GEMM per weight group (a strided batch) over all images
of the chunk writes a (C_out, images, pitch) buffer, and an epilogue lays it out as the output
and adds the bias: each image's columns start at a multiple of PITCH elements, so every GEMM
row is 16-byte aligned, which cuBLAS's fast kernels need (at H_out*W_out = 25*38 in fp16 on an
H200, the unaligned per-image GEMMs took 76 us, the aligned GEMM over both images 16 us).
Backward, per chunk: GEMM for the columns' gradient -> col2im (input gradient) and
col2im_coord (offset and mask gradients) -> im2col again into the same buffer -> GEMM
accumulating the weight gradient in float32 (float64 for float64).

The half types' forward on sm_90 (FUSED) is one implicit GEMM on Hopper's warpgroup MMA,
dcn_fused_wgmma, which gathers and blends the samples straight into the tensor cores' operands:
no columns, no cuBLAS. Its workspace is the input made channels-last and the weight reordered
(C_out, kh*kw, C_in/groups), made by one launch of dcn_fused_operands. Their backward
(_fused_backward) works on the same two: per chunk, the column gradients as
grad_output^T @ weight_r, (positions, kh*kw, C_in/groups) with channels contiguous ->
dcn_col2im_cl (the input gradient by 16-byte float32 vector atomics into a channels-last
accumulator, the offset and mask gradients, and the columns in place of the column gradients)
-> GEMM accumulating the reordered weight's gradient in float32; then
dcn_input_grad_cl and dcn_weight_grad_cl lay the two accumulators out as NCHW and (C_out,
C_in/groups, kh, kw) in the storage type. Its deterministic mode runs dcn_col2im_cl twice, as
the NCHW kernels do: a bound on the contributions, then 64-bit fixed-point atomics (four lanes
trade their values so that each atomic instruction fills whole sectors).

Workspace: one columns buffer of at most COLUMNS_BYTES (always at least one image), plus a
(C_out, images, pitch) GEMM buffer for a chunk when the forward does not write the output
directly, and in the backward for a chunk of several images; the backward adds a float32
input-gradient accumulator for the half types (channels-last in _fused_backward, which adds
the channels-last input and the reordered weight) and, in deterministic mode, a 64-bit fixed-point
accumulator of one chunk's input gradient. Chunks are balanced: the fewest that fit, of equal
size.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple

import numpy as np

from .. import _arrays
from . import _blas, _common, _compile
from ._common import TENSOR_CORE_DTYPES
from ._compile import ACC_DTYPES, CXX_TYPES, MAX_ABS_THREADS, STORAGE_DTYPES, WARP, launch

SOURCE = "deform_conv.cu"
_KERNELS = ("dcn_im2col", "dcn_col2im", "dcn_col2im_max_abs", "dcn_col2im_fixed", "dcn_col2im_coord",
            "dcn_output_epilogue", "dcn_gather_grad_output", "add_bias", *_common.COMMON_KERNELS)
_FUSED_KERNELS = ("dcn_fused_operands", "dcn_weight_grad_cl", "dcn_input_grad_cl")
_CL_FLOAT, _CL_MAX_ABS, _CL_FIXED = range(3)  # dcn_col2im_cl's modes
NAME_EXPRESSIONS = (
    [f"{k}<{t}>" for t in CXX_TYPES.values() for k in _KERNELS]
    + ["cast_from_acc<__half>", "cast_from_acc<__nv_bfloat16>", "fixed_point_add<float>", "fixed_point_add<double>"]
    + [f"{k}<{CXX_TYPES[t]}>" for t in TENSOR_CORE_DTYPES for k in _FUSED_KERNELS]
    + [f"dcn_col2im_cl<{CXX_TYPES[t]}, {mode}>" for t in TENSOR_CORE_DTYPES for mode in range(3)]
    + [f"dcn_fused_wgmma<{CXX_TYPES[t]}, {bn}>" for t in TENSOR_CORE_DTYPES for bn in (64, 128)]
)

COLUMNS_BYTES = 128 * 2**20
PITCH = 8  # elements: 16 bytes of fp16/bf16, the alignment cuBLAS's vectorised kernels need
# im2col/col2im threads handle runs of channels that share a sampling point (within an offset
# group): the bilinear taps are computed once per run. The longest run per dtype, as measured on
# an H200 over the benchmark shapes (runs of 1-16; fewer, longer threads win up to these).
MAX_RUN = {"float16": 16, "bfloat16": 16, "float32": 8, "float64": 8}

# The half types' forward on sm_90: dcn_fused_wgmma where _fused_applies. False: im2col and
# cuBLAS everywhere (the reference backend the tests compare with).
FUSED = True
FUSED_TILE = (256, 128)  # dcn_fused::BM (output channels) and BN (positions), its largest
FUSED_THREADS = 512  # dcn_fused::THREADS
FUSED_SHARED_BYTES = 1024 + 2 * sum(FUSED_TILE) * 64 * 2  # dcn_fused::SHARED_BYTES
# Tiles of 64 positions where those of 128 would be fewer than this many (an SM each), and
# im2col and cuBLAS where even those would be: on an H200 at N=2, C=512, 25x38 (60 tiles)
# the fused forward took 96 us of device time, im2col and cuBLAS 58.
FUSED_FEW_TILES = 100
FUSED_MIN_TILES = 100
# dcn_fused_operands' weight reordering: at most this many blocks, a slice of 64 channels of an
# output channel each.
REORDER_BLOCKS = 2048


def _kernel(name: str, dtype: str):
    return _compile.typed(sys.modules[__name__], name, dtype)


@functools.lru_cache(maxsize=1024)
def _geometry_args(geo, shape, images, n0):
    """The DCN_GEOMETRY kernel arguments of a chunk (cached: building NumPy scalars costs more
    than a small kernel's launch)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    i64, i32 = np.int64, np.int32
    return (i64(images), i64(n0), i64(shape[1]), i64(shape[2]), i64(shape[3]), i64(geo.offset_groups),
            i32(kh), i32(kw), i32(sh), i32(sw), i32(ph), i32(pw), i32(dh), i32(dw),
            i64(geo.out_size[0]), i64(geo.out_size[1]))


def _run(geo, channels, dtype):
    """Channels per im2col/col2im thread: a power of two that divides an offset group's."""
    return math.gcd(channels // geo.offset_groups, MAX_RUN[dtype])


class _Chunk(NamedTuple):
    n0: int
    im2col_threads: int
    im2col_args: tuple  # dcn_im2col's scalar arguments
    gemm: _blas.Gemm
    epilogue_threads: int  # add_bias's or dcn_output_epilogue's
    epilogue_args: tuple  # their scalar arguments


class _ForwardPlan(NamedTuple):
    """Everything about a forward call that its arrays' shapes fix (cached per shape: working it
    out costs more host time than a small call's kernels take)."""

    out_shape: tuple
    workspace: int  # elements: the columns, then the GEMM buffer unless direct
    columns: int
    direct: bool
    chunks: tuple  # of _Chunk


@functools.lru_cache(maxsize=1024)
def _forward_plan(geo, shape, c_out, dtype) -> _ForwardPlan:
    n, c_in = shape[:2]
    g = geo.groups
    L = geo.out_size[0] * geo.out_size[1]
    K = geo.kernel[0] * geo.kernel[1]
    rows = (c_in // g) * K
    # Direct: one weight group and aligned rows, so each image's GEMM writes its output block.
    direct = g == 1 and L % PITCH == 0
    pitch = -(-L // PITCH) * PITCH
    step, chunks = _common.image_chunks(n, c_in * K * pitch * np.dtype(STORAGE_DTYPES[dtype]).itemsize,
                                        COLUMNS_BYTES)
    size = c_in * K * step * pitch  # a multiple of PITCH: the GEMM buffer after it stays aligned
    run = _run(geo, c_in, dtype)
    plans = []
    for n0, n1 in chunks:
        b = n1 - n0
        im2col = (c_in // run * b * L, (*_geometry_args(geo, shape, b, n0), np.int32(run), np.int64(pitch)))
        if direct:
            gemm = _blas.gemm(m=c_out, n=L, k=rows, dtype=dtype, batch=b, stride_b=L, ld_b=b * L, stride_c=c_out * L)
            epilogue = (b * c_out * _compile.BLOCK, _int64s(b, c_out, L))
        else:
            gemm = _blas.gemm(m=c_out // g, n=b * pitch, k=rows, dtype=dtype, batch=g, stride_a=(c_out // g) * rows,
                              stride_b=rows * b * pitch, stride_c=(c_out // g) * b * pitch)
            epilogue = (b * c_out * L, _int64s(c_out, b, L, pitch, n0))
        plans.append(_Chunk(n0, *im2col, gemm, *epilogue))
    return _ForwardPlan((n, c_out, *geo.out_size), size + (0 if direct else c_out * step * pitch), size, direct,
                        tuple(plans))


_FLAGS = (np.int32(0), np.int32(1))


def _fused_applies(geo, shape, c_out, dtype) -> bool:
    """Whether the forward is dcn_fused_wgmma: a half type on sm_90, whole 16-byte vectors of
    channels per weight group and per offset group, an image channels-last and a plane of
    positions within 32-bit indices, and a kernel of at most 384 points (dcn_fused_operands'
    shared memory)."""
    c_in, height, width = shape[1:]
    return (FUSED and dtype in TENSOR_CORE_DTYPES and (c_in // geo.groups) % 8 == 0
            and (c_in // geo.offset_groups) % 8 == 0 and c_in * height * width < 2**31
            and geo.out_size[0] * geo.out_size[1] < 2**30 and geo.kernel[0] * geo.kernel[1] <= 384
            and _compile.has_wgmma())


class _FusedPlan(NamedTuple):
    out_shape: tuple
    input_cl: int  # elements of the channels-last input, the workspace's first part
    weight_r: int  # of the reordered weight after it
    operand_blocks: int  # dcn_fused_operands': the layout's, then the reordering's
    operand_args: tuple
    operand_shared: int
    tiles: int  # dcn_fused_wgmma's
    positions: int  # in a tile: its BN
    geometry: tuple  # dcn_fused_wgmma's DCN_GEOMETRY arguments
    groups: np.int32


@functools.lru_cache(maxsize=1024)
def _fused_plan(geo, shape, c_out, few_tiles: int, min_tiles: int) -> _FusedPlan | None:
    """Tiles of 64 positions where FUSED_TILE's would be fewer than `few_tiles`; None (the
    im2col path) where even those would be fewer than `min_tiles`."""
    n, c_in, height, width = shape
    g, K, L = geo.groups, geo.kernel[0] * geo.kernel[1], geo.out_size[0] * geo.out_size[1]
    cg = c_in // g
    layout_blocks = min(_common.channels_last_tiles(n, c_in, height * width), _common.LAYOUT_BLOCKS)
    weight_r = c_out * K * cg
    reorder_blocks = min(c_out * -(-cg // 64), REORDER_BLOCKS)
    m_tiles = n * g * -(-(c_out // g) // FUSED_TILE[0])
    positions = FUSED_TILE[1] if m_tiles * -(-L // FUSED_TILE[1]) >= few_tiles else FUSED_TILE[1] // 2
    if m_tiles * -(-L // positions) < min_tiles:
        return None
    args = (np.int32(layout_blocks), *_int64s(n, c_in, height * width, c_out), np.int32(cg), np.int32(K))
    shared = max(_common.CHANNELS_LAST_SHARED_BYTES, 64 * K * 2)
    return _FusedPlan((n, c_out, *geo.out_size), n * c_in * height * width, weight_r, layout_blocks + reorder_blocks,
                      args, shared, m_tiles * -(-L // positions), positions, _geometry_args(geo, shape, n, 0),
                      np.int32(g))


def _fused_forward(x, offset, weight, bias, mask, plan, dtype):
    """The forward by dcn_fused_operands and dcn_fused_wgmma."""
    out = _arrays.empty(plan.out_shape, dtype)
    if x.shape[0] == 0:
        return out
    # The channels-last input, then the reordered weight (16-byte aligned: input_cl is a
    # multiple of 8 elements).
    workspace = _arrays.empty(plan.input_cl + plan.weight_r, dtype)
    weight_r = _compile.Pointer(workspace.data.ptr + plan.input_cl * workspace.itemsize)
    launch(_kernel("dcn_fused_operands", dtype), plan.operand_blocks * _compile.BLOCK,
           (x, weight, *plan.operand_args, workspace, weight_r), shared_mem=plan.operand_shared)
    kernel = _compile.function(sys.modules[__name__], f"dcn_fused_wgmma<{CXX_TYPES[dtype]}, {plan.positions}>",
                               dynamic_shared=FUSED_SHARED_BYTES)
    launch(kernel, plan.tiles * FUSED_THREADS,
           (workspace, weight_r, offset, x if mask is None else mask, _FLAGS[mask is not None],
            x if bias is None else bias, _FLAGS[bias is not None], *plan.geometry,
            np.int64(weight.shape[0]), np.int32(plan.groups), out),
           block=FUSED_THREADS, shared_mem=FUSED_SHARED_BYTES)
    return out


def forward(input, offset, weight, bias, mask, *, geo, dtype):
    x = input
    # dcn_fused_operands reads the weight in 16-byte vectors.
    if _fused_applies(geo, x.shape, weight.shape[0], dtype) and weight.data.ptr % 16 == 0:
        plan = _fused_plan(geo, x.shape, weight.shape[0], FUSED_FEW_TILES, FUSED_MIN_TILES)
        if plan is not None:
            return _fused_forward(x, offset, weight, bias, mask, plan, dtype)
    plan = _forward_plan(geo, x.shape, weight.shape[0], dtype)
    out = _arrays.empty(plan.out_shape, dtype)
    if x.shape[0] == 0:
        return out
    # The columns start the workspace, which stands for them as the kernels' and cuBLAS's base
    # pointer: slicing a CuPy array costs microseconds of host time.
    cols = _arrays.empty(plan.workspace, dtype)
    buffer = None if plan.direct else cols[plan.columns:]
    use_mask = _FLAGS[mask is not None]
    im2col = _kernel("dcn_im2col", dtype)
    epilogue = _kernel("add_bias" if plan.direct else "dcn_output_epilogue", dtype)
    for c in plan.chunks:
        launch(im2col, c.im2col_threads, (x, offset, x if mask is None else mask, use_mask, *c.im2col_args, cols))
        if plan.direct:
            first = out if c.n0 == 0 else out[c.n0]  # only the base pointer is read
            c.gemm(weight, cols, first)
            if bias is not None:
                launch(epilogue, c.epilogue_threads, (first, bias, *c.epilogue_args))
        else:
            c.gemm(weight, cols, buffer)
            launch(epilogue, c.epilogue_threads,
                   (buffer, x if bias is None else bias, _FLAGS[bias is not None], *c.epilogue_args, out))
    return out


@functools.lru_cache(maxsize=1024)
def _int64s(*values):
    """Kernel arguments as int64 scalars (cached: NumPy scalars cost more than a small launch)."""
    return tuple(np.int64(v) for v in values)


def _grad_output_chunk(go, n0, n1, L, buffer, dtype):
    """Images n0..n1 of grad_output (N, C_out, H_out, W_out) as a (C_out, images * L) GEMM
    operand: the image itself, or the images gathered into `buffer`."""
    if n1 - n0 == 1:
        return go[n0]
    c_out = go.shape[1]
    launch(_kernel("dcn_gather_grad_output", dtype), c_out * (n1 - n0) * _compile.BLOCK,
           (go, *_int64s(c_out, n1 - n0, L, n0), _FLAGS[L % (16 // go.itemsize) == 0 and go.data.ptr % 16 == 0],
            buffer))
    return buffer


def _slices(geo, channels):
    """dcn_col2im_cl's threads per item: a power of two, at most a warp, each taking at least
    two quads of channels: on an H200 in fp16, one quad a thread took 1.13-1.14x as long as two
    at C = 128, four quads 1.04-1.12x as long as two at C = 256; at C = 512 four (this rule)
    were within 10% of the best of two to eight."""
    return math.gcd(channels // geo.offset_groups // 8, WARP)


def _col2im_cl(dtype, mode):
    """dcn_col2im_cl in one of its modes (_CL_FLOAT, _CL_MAX_ABS, _CL_FIXED)."""
    return _compile.function(sys.modules[__name__], f"dcn_col2im_cl<{CXX_TYPES[dtype]}, {mode}>")


def _fused_backward(go, x, offset, weight, bias, mask, *, geo, dtype, border_grad, deterministic):
    """The backward of the half types on sm_90: cuBLAS for the column gradients and the weight
    gradient, dcn_col2im_cl between (channels-last)."""
    import cupy

    n, c_in, height, width = x.shape
    c_out, g = weight.shape[0], geo.groups
    cg, og, K, L = c_in // g, c_out // g, geo.kernel[0] * geo.kernel[1], geo.out_size[0] * geo.out_size[1]
    plan = _fused_plan(geo, x.shape, c_out, 0, 0)
    operands = _arrays.empty(plan.input_cl + plan.weight_r, dtype)
    x_cl, weight_r = operands[: plan.input_cl], operands[plan.input_cl:]
    launch(_kernel("dcn_fused_operands", dtype), plan.operand_blocks * _compile.BLOCK,
           (x, weight, *plan.operand_args, x_cl, weight_r), shared_mem=plan.operand_shared)
    grad_cl = cupy.zeros(x.size, np.float32)
    grad_weight_r = cupy.zeros(weight.size, np.float32)
    grad_offset = _arrays.empty(offset.shape, dtype)
    grad_mask = _arrays.empty(mask.shape, dtype) if mask is not None else None
    mask_arg, use_mask = (x, _FLAGS[0]) if mask is None else (mask, _FLAGS[1])
    step, chunks = _common.image_chunks(n, c_in * K * L * x.itemsize, COLUMNS_BYTES)
    cols = _arrays.empty(c_in * K * step * L, dtype)
    go_buffer = _arrays.empty(c_out * step * L, dtype) if step > 1 else None
    slices = _slices(geo, c_in)
    plane = c_in * height * width
    if deterministic:
        fixed = cupy.empty(step * plane, np.uint64)
        max_abs_bits = cupy.empty(1, np.uint32)
    else:
        fixed, max_abs_bits = grad_cl, grad_cl  # not read
    for n0, n1 in chunks:
        b = n1 - n0
        geo_args = _geometry_args(geo, x.shape, b, n0)
        go_chunk = _grad_output_chunk(go, n0, n1, L, go_buffer, dtype)
        # The column gradients, grad_output^T @ weight_r, per weight group.
        _blas.matmul(go_chunk, weight_r, cols, m=b * L, n=K * cg, k=og, dtype=dtype, trans_a=True, batch=g,
                     stride_a=og * b * L, stride_b=og * K * cg, stride_c=b * L * K * cg)
        col2im_args = (cols, x_cl, offset, mask_arg, use_mask, _FLAGS[border_grad == "torchvision"], *geo_args,
                       np.int32(g), np.int32(slices), grad_cl, max_abs_bits, fixed, grad_offset,
                       grad_offset if mask is None else grad_mask)
        col2im_threads = -(-geo.offset_groups * b * L * slices // WARP) * WARP
        if deterministic:
            max_abs_bits.fill(0)
            fixed[: b * plane].fill(0)
            launch(_col2im_cl(dtype, _CL_MAX_ABS), col2im_threads, col2im_args)
            launch(_col2im_cl(dtype, _CL_FIXED), col2im_threads, col2im_args)
            launch(_kernel("fixed_point_add", "float32"), b * plane,
                   (fixed, max_abs_bits, *_int64s(K * L, b * plane), grad_cl[n0 * plane:n1 * plane]))
        else:
            launch(_col2im_cl(dtype, _CL_FLOAT), col2im_threads, col2im_args)
        # dcn_col2im_cl left the columns in the buffer, for the weight gradient.
        _blas.matmul(go_chunk, cols, grad_weight_r, m=og, n=K * cg, k=b * L, dtype=dtype, c_dtype="float32", batch=g,
                     beta=1.0, stride_a=og * b * L, stride_b=b * L * K * cg, stride_c=og * K * cg)

    grad_input = _arrays.empty(x.shape, dtype)
    launch(_kernel("dcn_input_grad_cl", dtype), n * -(-c_in // 32) * -(-(height * width) // 32) * _compile.BLOCK,
           (grad_cl, *_int64s(n, c_in, height * width), grad_input))
    grad_weight = _arrays.empty(weight.shape, dtype)
    launch(_kernel("dcn_weight_grad_cl", dtype), weight.size, (grad_weight_r, *_int64s(c_out), np.int32(cg),
                                                               np.int32(K), grad_weight))
    grad_bias = None if bias is None else _common.bias_grad(sys.modules[__name__], go, n, c_out, L, dtype)
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def backward(grad_output, input, offset, weight, bias, mask, *, geo, dtype, border_grad, deterministic):
    import cupy

    if input.shape[0] and _fused_applies(geo, input.shape, weight.shape[0], dtype) and weight.data.ptr % 16 == 0:
        return _fused_backward(grad_output, input, offset, weight, bias, mask, geo=geo, dtype=dtype,
                               border_grad=border_grad, deterministic=deterministic)

    x, go = input, grad_output
    n, c_in, height, width = x.shape
    c_out, g = weight.shape[0], geo.groups
    L = geo.out_size[0] * geo.out_size[1]
    K = geo.kernel[0] * geo.kernel[1]
    rows = (c_in // g) * K
    storage, acc_dtype = STORAGE_DTYPES[dtype], ACC_DTYPES[dtype]
    same_acc = np.dtype(storage) == np.dtype(acc_dtype)
    use_mask = np.int32(mask is not None)
    mask_arg = mask if use_mask else x

    grad_acc = cupy.zeros(x.shape, acc_dtype)  # the input gradient itself for float32/float64
    grad_offset = _arrays.empty(offset.shape, dtype)
    grad_mask = _arrays.empty(mask.shape, dtype) if use_mask else None
    grad_weight_acc = cupy.zeros(weight.shape, acc_dtype)
    step, chunks = _common.image_chunks(n, c_in * K * L * x.itemsize, COLUMNS_BYTES)
    cols = cupy.empty(c_in * K * step * L, storage) if n else None
    go_buffer = cupy.empty(c_out * step * L, storage) if step > 1 else None
    plane = c_in * height * width
    if deterministic and n:
        fixed = cupy.empty(step * plane, np.uint64)
        max_abs_bits = cupy.empty(1, np.uint32)

    kernels = {name: _kernel(name, dtype) for name in _KERNELS}
    run = _run(geo, c_in, dtype)
    sites = c_in // run
    for n0, n1 in chunks:
        b = n1 - n0
        geo_args = _geometry_args(geo, x.shape, b, n0)
        go_chunk = _grad_output_chunk(go, n0, n1, L, go_buffer, dtype)
        # The columns' gradient, W^T @ grad_output, per weight group.
        _blas.matmul(weight, go_chunk, cols, m=rows, n=b * L, k=c_out // g, dtype=dtype, trans_a=True, batch=g,
                     stride_a=(c_out // g) * rows, stride_b=(c_out // g) * b * L, stride_c=rows * b * L)
        sample_args = (cols, offset, mask_arg, use_mask, *geo_args, np.int32(run))
        if deterministic:
            max_abs_bits.fill(0)
            fixed[: b * plane].fill(0)
            launch(kernels["dcn_col2im_max_abs"], min(c_in * K * b * WARP, MAX_ABS_THREADS),
                   (cols, mask_arg, use_mask, *_int64s(b, n0, c_in, geo.offset_groups, K, L), max_abs_bits))
            launch(kernels["dcn_col2im_fixed"], sites * b * L, (*sample_args, max_abs_bits, fixed, grad_acc))
            launch(_kernel("fixed_point_add", np.dtype(acc_dtype).name),
                   b * plane, (fixed, max_abs_bits, *_int64s(K * L, b * plane), grad_acc[n0:n1]))
        else:
            launch(kernels["dcn_col2im"], sites * b * L, (*sample_args, grad_acc))
        launch(kernels["dcn_col2im_coord"], geo.offset_groups * K * b * L,
               (cols, x, offset, mask_arg, use_mask, np.int32(border_grad == "torchvision"), *geo_args,
                grad_offset, grad_mask if use_mask else grad_offset))
        # The columns again, in the same buffer, for the weight gradient.
        launch(kernels["dcn_im2col"], sites * b * L,
               (x, offset, mask_arg, use_mask, *geo_args, np.int32(run), *_int64s(L), cols))
        _blas.matmul(go_chunk, cols, grad_weight_acc, m=c_out // g, n=rows, k=b * L, dtype=dtype,
                     c_dtype=np.dtype(acc_dtype).name, trans_b=True, batch=g, beta=1.0,
                     stride_a=(c_out // g) * b * L, stride_b=rows * b * L, stride_c=(c_out // g) * rows)

    grad_input = grad_acc if same_acc else _cast(grad_acc, dtype)
    grad_weight = grad_weight_acc if same_acc else _cast(grad_weight_acc, dtype)
    grad_bias = None
    if bias is not None:
        grad_bias = _common.bias_grad(sys.modules[__name__], go, n, c_out, L, dtype)
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def _cast(acc, dtype):
    out = _arrays.empty(acc.shape, dtype)
    launch(_kernel("cast_from_acc", dtype), acc.size, (acc, *_int64s(acc.size), out))
    return out
