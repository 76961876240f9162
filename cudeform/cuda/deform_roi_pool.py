"""Deformable RoI pooling on the GPU: kernels/deform_roi_pool.cu.

Forward: one thread per output element. Backward of deform_roi_pool: one launch whose blocks
take a chunk of ROI_BWD_CHANNELS channels of 32 (RoI, bin) items, chunk-major (so that the L2
holds the chunk's input and accumulator), atomics for the input gradient and (with an offset
or a mask) a shared-memory reduction of their gradients over the chunk's channels, from the
same corner reads; then droi_coord_grads adds the chunks' sums in a fixed order. Backward of
deform_psroi_pool: the input gradient gathered, a block per (image, group cell, class, channel
chunk, pixel tile), written once in the storage dtype; with an offset, a second launch, a warp
per (RoI, class, part cell), reduces the offset gradient. Neither uses atomics, so the
deterministic mode is the default one.

deform_roi_pool's deterministic mode gathers the input gradient when ``sampling_ratio > 0``
(every bin then has sampling_ratio**2 samples, so the host knows how many entries to list
without reading the device) and the list has at most GATHER_MAX_ENTRIES entries:
droi_list_corners lists every distinct corner of every pair of sample rows by pair of sample
columns of every bin (16 entries per 2x2 samples; 4 per bin with sampling_ratio 1) as a uint64
key (input pixel, entry index) and a coefficient (weights * mask / count); CuPy sorts the keys
(Thrust's radix sort, without synchronising); droi_sorted_entries finds each pixel's run and
puts the entries' bins and coefficients in sorted order; grad_output is transposed to
(R * bins, C); and droi_gather_input_grad sums each element's run in that order and writes it
once in the storage dtype. With an offset or a mask, droi_backward then runs for their sums
alone (no scatter). Workspace, per entry: the key (8 bytes), the sort's second key buffer
(8), the coefficient (acc dtype), its sorted copy (acc dtype) and its bin (4): 28 bytes in
float32, 36 in float64 (1.75 and 2.25 GiB at GATHER_MAX_ENTRIES); plus 4 bytes per input pixel
(N * H * W + 1 run starts) and the transposed grad_output (grad_output's size).

Otherwise (the default mode; deterministic with ``sampling_ratio == 0``, over the budget or
during a CUDA graph capture, where CuPy's sort cannot run)
droi_backward scatters the input gradient. Its workspace: for the half types, a float32
input-gradient accumulator; in deterministic mode instead a uint64 fixed-point accumulator of
the input's size and a word of non-finite flags per 16 elements, a first pass over grad_output
for the fixed-point scale and a last one that writes the gradient in the storage dtype. Nothing
synchronises the device: RoIs whose batch index is out of range are handled by the kernels
(zero output, zero gradient).
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import numpy as np

from .. import _arrays
from . import _compile
from ._compile import ACC_DTYPES, CXX_TYPES, MAX_ABS_THREADS, STORAGE_DTYPES, WARP, launch

SOURCE = "deform_roi_pool.cu"
_KERNELS = ("droi_forward", "droi_backward", "droi_coord_grads", "droi_list_corners", "droi_sorted_entries",
            "droi_transpose_grad_output", "droi_gather_input_grad", "dpsroi_forward", "dpsroi_input_grad",
            "dpsroi_offset_grad", "roi_pool_max_abs", "roi_pool_fixed_finish")
NAME_EXPRESSIONS = (
    [f"{k}<{t}>" for t in CXX_TYPES.values() for k in _KERNELS]
    + ["cast_from_acc<__half>", "cast_from_acc<__nv_bfloat16>"]
)

ROI_BWD_BLOCK = WARP * 8  # droi_backward's block: ROI_BWD_BLOCK in the kernel
ROI_BWD_CHANNELS = 64  # channels per droi_backward block (ROI_BWD_CHANNELS)
PS_TILE_H = 8  # dpsroi_input_grad's tile of PS_TILE_H x WARP pixels (PS_TILE_H, PS_TILE_W in the kernel)
PS_GATHER_BLOCK = PS_TILE_H * WARP
PS_GATHER_CHANNELS = 8  # output channels per dpsroi_input_grad block (PS_GATHER_CHANNELS)
GATHER_BLOCK = WARP * 8  # DROI_GATHER_BLOCK: droi_transpose_grad_output's and droi_gather_input_grad's block
# The most entries of deform_roi_pool's gathered deterministic input gradient (see the
# docstring); past it, the fixed-point path. Entry indices then fit int32 (and 26 bits of a key).
GATHER_MAX_ENTRIES = 1 << 26


def _kernel(name: str, dtype: str):
    return _compile.typed(sys.modules[__name__], name, dtype)


def _or(array, stand_in):
    """An optional array, or a stand-in pointer the kernel does not read (its use_* flag is 0)."""
    return stand_in if array is None else array


@functools.lru_cache(maxsize=1024)
def _droi_args(shape, n_rois, geo, dtype):
    """The DROI_GEOMETRY kernel arguments (cached: building NumPy scalars costs more than a
    small kernel's launch)."""
    acc = ACC_DTYPES[dtype]
    n, c, h, w = shape
    return (np.int64(n_rois), np.int64(n), np.int64(c), np.int64(h), np.int64(w),
            np.int32(geo.output_size[0]), np.int32(geo.output_size[1]), acc(geo.spatial_scale),
            np.int32(geo.sampling_ratio), acc(geo.gamma))


def _part_size(geo, has_offset):
    """The kernels' part_size: without an offset every part cell is a bin (and geo.num_classes is 1)."""
    return geo.part_size if has_offset else geo.pooled_size


@functools.lru_cache(maxsize=1024)
def _psroi_args(shape, n_rois, geo, has_offset, dtype):
    """The DPSROI_GEOMETRY kernel arguments (cached, as _droi_args)."""
    acc = ACC_DTYPES[dtype]
    n, c, h, w = shape
    return (np.int64(n_rois), np.int64(n), np.int64(c), np.int64(h), np.int64(w),
            np.int32(geo.output_dim), np.int32(geo.pooled_size), np.int32(geo.group_size),
            np.int32(_part_size(geo, has_offset)), np.int32(geo.sample_per_part), np.int32(geo.num_classes),
            acc(geo.spatial_scale), acc(geo.trans_std))


def forward(input, rois, offset, mask, *, geo, dtype):
    x = input
    out = _arrays.empty((rois.shape[0], x.shape[1], *geo.output_size), dtype)
    launch(_kernel("droi_forward", dtype), out.size,
           (x, rois, _or(offset, x), _or(mask, x), np.int32(offset is not None), np.int32(mask is not None),
            *_droi_args(x.shape, rois.shape[0], geo, dtype), out))
    return out


def backward(grad_output, input, rois, offset, mask, *, geo, dtype, deterministic):
    import cupy

    go, x = grad_output, input
    grad_offset = _arrays.empty(offset.shape, dtype) if offset is not None else None
    grad_mask = _arrays.empty(mask.shape, dtype) if mask is not None else None
    bins = geo.output_size[0] * geo.output_size[1]
    items, chunks = rois.shape[0] * bins, -(-x.shape[1] // ROI_BWD_CHANNELS)
    args = (rois, _or(offset, x), _or(mask, x), np.int32(offset is not None), np.int32(mask is not None),
            *_droi_args(x.shape, rois.shape[0], geo, dtype))
    # CuPy's sort makes calls that a stream capture (a CUDA graph) forbids: captured calls
    # take the fixed-point path.
    gather = deterministic and not cupy.cuda.get_current_stream().is_capturing()
    layout = _gather_layout(x.shape, items, geo) if gather else None
    # The per-chunk offset and mask sums, each written once by droi_backward.
    partials = cupy.empty((chunks, 3, items), ACC_DTYPES[dtype]) if offset is not None or mask is not None else None
    if layout is None:
        workspace = _input_grad_workspace(x, go, mask, bins, dtype, deterministic)
        launch(_kernel("droi_backward", dtype), -(-items // WARP) * chunks * ROI_BWD_BLOCK,
               (go, x, *args, np.int32(1), *workspace, _or(partials, workspace[-1])), block=ROI_BWD_BLOCK)
        grad_input = _input_grad(x, workspace, items, dtype)
    else:
        grad_input = _gathered_input_grad(go, x, args, layout, dtype)
        if partials is not None:
            # droi_backward for the offset and mask sums alone: no scatter, so its four
            # input-gradient pointers are never read (partials stands in for them).
            launch(_kernel("droi_backward", dtype), -(-items // WARP) * chunks * ROI_BWD_BLOCK,
                   (go, x, *args, np.int32(0), np.int32(0), *(partials,) * 5), block=ROI_BWD_BLOCK)
    if partials is not None:
        launch(_kernel("droi_coord_grads", dtype), items,
               (partials, np.int64(chunks), *args, _or(grad_offset, x), _or(grad_mask, x)))
    return grad_input, grad_offset, grad_mask


def psroi_forward(input, rois, offset, *, geo, dtype):
    x = input
    out = _arrays.empty((rois.shape[0], geo.output_dim, geo.pooled_size, geo.pooled_size), dtype)
    has_offset = offset is not None
    launch(_kernel("dpsroi_forward", dtype), out.size,
           (x, rois, _or(offset, x), np.int32(has_offset),
            *_psroi_args(x.shape, rois.shape[0], geo, has_offset, dtype), out))
    return out


def psroi_backward(grad_output, input, rois, offset, *, geo, dtype, deterministic):
    """Both modes are one computation: the input gradient is gathered (each element written once,
    by one thread, in a fixed order) and the offset gradient reduced in a fixed order, so the
    result is bitwise repeatable whatever ``deterministic`` says."""
    go, x = grad_output, input
    has_offset = offset is not None
    geo_args = _psroi_args(x.shape, rois.shape[0], geo, has_offset, dtype)
    grad_input = _arrays.empty(x.shape, dtype)
    n, _, h, w = x.shape
    per_class = geo.output_dim // geo.num_classes
    blocks = (n * geo.group_size**2 * geo.num_classes * -(-per_class // PS_GATHER_CHANNELS)
              * -(-h // PS_TILE_H) * -(-w // WARP))
    launch(_kernel("dpsroi_input_grad", dtype), blocks * PS_GATHER_BLOCK,
           (go, rois, _or(offset, x), np.int32(has_offset), *geo_args, grad_input), block=PS_GATHER_BLOCK)
    if not has_offset:
        return grad_input, None
    grad_offset = _arrays.empty(offset.shape, dtype)
    launch(_kernel("dpsroi_offset_grad", dtype), rois.shape[0] * geo.num_classes * geo.part_size**2 * WARP,
           (go, x, rois, offset, *geo_args, grad_offset))
    return grad_input, grad_offset


class GatherLayout(NamedTuple):
    """The entries of deform_roi_pool's gathered input gradient (see droi_list_corners)."""

    slots: int  # entries per bin's pair of sample rows (and columns) along each axis
    per_item: int  # entries per (RoI, bin)
    entries: int
    entry_bits: int  # bits of the entry index in a key


def _gather_layout(shape, items, geo):
    """The GatherLayout of a deterministic deform_roi_pool backward that gathers its input
    gradient, or None for the fixed-point path: sampling_ratio 0 (the entries' count would be on
    the device) or more than GATHER_MAX_ENTRIES entries."""
    sr = geo.sampling_ratio
    if sr == 0:
        return None
    slots = 2 if sr == 1 else 4
    per_item = ((sr + 1) // 2 * slots) ** 2
    entries = items * per_item
    entry_bits = max(entries - 1, 1).bit_length()
    pixels = shape[0] * shape[2] * shape[3]
    if entries > GATHER_MAX_ENTRIES or pixels.bit_length() + entry_bits > 64:  # keys are uint64
        return None
    return GatherLayout(slots, per_item, entries, entry_bits)


def _gathered_input_grad(go, x, args, layout, dtype):
    """deform_roi_pool's input gradient in the storage dtype, gathered (see the module
    docstring); ``args`` are droi_backward's (rois, ..., DROI_GEOMETRY) arguments."""
    import cupy

    n, c, h, w = x.shape
    n_rois, bins = go.shape[0], go.shape[2] * go.shape[3]
    pixels, acc = n * h * w, ACC_DTYPES[dtype]
    keys = cupy.empty(layout.entries, np.uint64)
    coefs = cupy.empty(layout.entries, acc)
    launch(_kernel("droi_list_corners", dtype), layout.entries // layout.slots**2,
           (*args, np.int32(layout.slots), np.int32(layout.entry_bits), keys, coefs))
    keys.sort()  # Thrust's radix sort (par_nosync in CuPy): on the current stream, no synchronisation
    starts = cupy.empty(pixels + 1, np.int32)
    items = cupy.empty(layout.entries, np.int32)
    sorted_coefs = cupy.empty(layout.entries, acc)
    launch(_kernel("droi_sorted_entries", dtype), max(layout.entries, pixels + 1),
           (keys, np.int64(layout.entries), np.int32(layout.entry_bits), np.int32(layout.per_item), coefs,
            np.int64(pixels), starts, items, sorted_coefs))
    go_t = cupy.empty((n_rois * bins, c), go.dtype)
    launch(_kernel("droi_transpose_grad_output", dtype), n_rois * -(-c // WARP) * -(-bins // WARP) * GATHER_BLOCK,
           (go, np.int64(n_rois), np.int64(c), np.int64(bins), go_t), block=GATHER_BLOCK)
    grad_input = _arrays.empty(x.shape, dtype)
    launch(_kernel("droi_gather_input_grad", dtype), -(-c // WARP) * n * h * -(-w // WARP) * GATHER_BLOCK,
           (starts, items, sorted_coefs, go_t, np.int64(n), np.int64(c), np.int64(h), np.int64(w), grad_input),
           block=GATHER_BLOCK)
    return grad_input


def _input_grad_workspace(x, go, mask, bins, dtype, deterministic):
    """The backward kernels' (deterministic, max_abs_bits, fixed, special, grad_input) arguments:
    a zeroed float accumulator, or in deterministic mode the zeroed fixed-point workspace (the
    float pointer then unused) after the max-abs pass (whose bound covers R * bins terms: see
    roi_pool_max_abs)."""
    import cupy

    if not deterministic:
        grad_acc = cupy.zeros(x.shape, ACC_DTYPES[dtype])
        return np.int32(0), grad_acc, grad_acc, grad_acc, grad_acc
    max_abs_bits = cupy.zeros(1, np.uint32)
    fixed = cupy.zeros(x.size, np.uint64)
    special = cupy.zeros(-(-x.size // 16), np.uint32)
    launch(_kernel("roi_pool_max_abs", dtype), min(go.size, MAX_ABS_THREADS),
           (go, _or(mask, go), np.int32(mask is not None), np.int64(go.shape[1]), np.int64(bins), np.int64(go.size),
            max_abs_bits))
    return np.int32(1), max_abs_bits, fixed, special, fixed


def _input_grad(x, workspace, terms, dtype):
    """The input gradient in the storage dtype, from _input_grad_workspace's arrays."""
    deterministic, max_abs_bits, fixed, special, grad_acc = workspace
    if not deterministic and np.dtype(STORAGE_DTYPES[dtype]) == grad_acc.dtype:
        return grad_acc
    out = _arrays.empty(x.shape, dtype)
    if deterministic:
        launch(_kernel("roi_pool_fixed_finish", dtype), out.size,
               (fixed, special, max_abs_bits, np.int64(terms), np.int64(out.size), out))
    else:
        launch(_kernel("cast_from_acc", dtype), out.size, (grad_acc, np.int64(out.size), out))
    return out
