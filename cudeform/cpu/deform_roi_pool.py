"""Deformable RoI pooling on the CPU: Numba kernels for deform_roi_pool and deform_psroi_pool.

The forward is a gather, parallel over (RoI, channel). The backward is split so that no two
parallel iterations write one element: the input gradient, a scatter, runs over (image, input
channel), each iteration visiting the RoIs of its image in RoI order; the offset and mask
gradients run over RoIs, each iteration summing its bins over the channels. Every result is
therefore independent of thread scheduling (``deterministic`` changes nothing here).

The public module has checked that every batch index ``rois[:, 0]`` is in [0, N).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._bilinear import blend, blend_gradient, clamped_corners, in_closed_box


@njit(inline="always")
def _scatter(target, y0, x0, y1, x1, lh, lw, g):
    """Spread g over a sample's four (clamped) corners."""
    target[y0, x0] += (1 - lh) * (1 - lw) * g
    target[y0, x1] += (1 - lh) * lw * g
    target[y1, x0] += lh * (1 - lw) * g
    target[y1, x1] += lh * lw * g


def _by_image(batch, n_images):
    """RoIs grouped by image: the RoIs of image b are order[starts[b]:starts[b + 1]], in RoI order."""
    order = np.argsort(batch, kind="stable")
    return order, np.searchsorted(batch[order], np.arange(n_images + 1))


def _dummy(dtype):
    """Stands for an optional array that was not given (the kernels never read it)."""
    return np.zeros((1, 1, 1, 1), dtype)


def _optional(arr, dtype):
    return arr if arr is not None else _dummy(dtype)


# --------------------------------------------------------------------------------------------
# deform_roi_pool (SPEC.md section 2)
# --------------------------------------------------------------------------------------------

@njit(inline="always")
def _roi_align_box(rois, r, scale, pooled_h, pooled_w, ratio):
    """RoI r's start, size, bin size and sample grid, in mmcv's order of operations:
    (start_h, start_w, roi_h, roi_w, bin_h, bin_w, grid_h, grid_w, count)."""
    start_w = rois[r, 1] * scale - 0.5
    start_h = rois[r, 2] * scale - 0.5
    roi_w = (rois[r, 3] * scale - 0.5) - start_w
    roi_h = (rois[r, 4] * scale - 0.5) - start_h
    # A RoI of negative size has no samples (mmcv multiplies two negative grids).
    grid_h = ratio if ratio > 0 else max(math.ceil(roi_h / pooled_h), 0)
    grid_w = ratio if ratio > 0 else max(math.ceil(roi_w / pooled_w), 0)
    return (start_h, start_w, roi_h, roi_w, roi_h / pooled_h, roi_w / pooled_w, grid_h, grid_w,
            max(grid_h * grid_w, 1))


@njit(inline="always")
def _bin_corner(start, roi_size, bin_size, index, offset_value, gamma):
    """The corner of bin `index` along one axis, moved by gamma * roi_size * offset."""
    return (start + gamma * roi_size * offset_value) + index * bin_size


@njit(inline="always")
def _droi_bin(offset, use_offset, r, p, q, gamma, start_h, start_w, roi_h, roi_w, bin_h, bin_w):
    """The corner (y, x) of bin (p, q) of RoI r, moved by its offset."""
    # Two returns rather than a conditional offset value: that one made the input gradient 8% slower.
    if use_offset:
        return (_bin_corner(start_h, roi_h, bin_h, p, offset[r, 1, p, q], gamma),
                _bin_corner(start_w, roi_w, bin_w, q, offset[r, 0, p, q], gamma))
    return _bin_corner(start_h, roi_h, bin_h, p, 0.0, gamma), _bin_corner(start_w, roi_w, bin_w, q, 0.0, gamma)


@njit(inline="always")
def _clamped_sample(h, w, height, width, margin):
    """Whether (h, w) lies in the closed box of ``margin`` (see in_closed_box), and there its
    clamped corners (see clamped_corners)."""
    if not in_closed_box(h, w, height, width, margin):
        return False, 0, 0, 0, 0, 0.0, 0.0, False, False
    y0, x0, y1, x1, lh, lw, moves_h, moves_w = clamped_corners(h, w, height, width)
    return True, y0, x0, y1, x1, lh, lw, moves_h, moves_w


@njit(inline="always")
def _droi_sample(y, x, iy, ix, bin_h, bin_w, grid_h, grid_w, height, width):
    """Sample (iy, ix) of the bin whose corner is (y, x): whether it lies in RoIAlign's box,
    and its clamped corners."""
    return _clamped_sample(y + (iy + 0.5) * bin_h / grid_h, x + (ix + 0.5) * bin_w / grid_w, height, width, 1.0)


@njit(parallel=True, cache=True)
def _droi_forward(inp, rois, batch, offset, use_offset, mask, use_mask, scale, ratio, gamma, out):
    n_rois, channels, pooled_h, pooled_w = out.shape
    height, width = inp.shape[2], inp.shape[3]
    for task in prange(n_rois * channels):
        r = task // channels
        c = task % channels
        plane = inp[batch[r], c]
        start_h, start_w, roi_h, roi_w, bin_h, bin_w, grid_h, grid_w, count = _roi_align_box(
            rois, r, scale, pooled_h, pooled_w, ratio)
        for p in range(pooled_h):
            for q in range(pooled_w):
                y, x = _droi_bin(offset, use_offset, r, p, q, gamma, start_h, start_w, roi_h, roi_w, bin_h, bin_w)
                total = 0.0
                for iy in range(grid_h):
                    for ix in range(grid_w):
                        inside, y0, x0, y1, x1, lh, lw, _, _ = _droi_sample(y, x, iy, ix, bin_h, bin_w, grid_h, grid_w,
                                                                            height, width)
                        if inside:
                            total += blend(plane[y0, x0], plane[y0, x1], plane[y1, x0], plane[y1, x1], lh, lw)
                total /= count
                if use_mask:
                    total *= mask[r, 0, p, q]
                out[r, c, p, q] = total


@njit(parallel=True, cache=True)
def _droi_input_grad(go, rois, order, starts, offset, use_offset, mask, use_mask, scale, ratio, gamma,
                     grad_input):
    n_images, channels, height, width = grad_input.shape
    pooled_h, pooled_w = go.shape[2], go.shape[3]
    for task in prange(n_images * channels):
        b = task // channels
        c = task % channels
        target = grad_input[b, c]
        for k in range(starts[b], starts[b + 1]):
            r = order[k]
            start_h, start_w, roi_h, roi_w, bin_h, bin_w, grid_h, grid_w, count = _roi_align_box(
                rois, r, scale, pooled_h, pooled_w, ratio)
            for p in range(pooled_h):
                for q in range(pooled_w):
                    y, x = _droi_bin(offset, use_offset, r, p, q, gamma, start_h, start_w, roi_h, roi_w, bin_h,
                                     bin_w)
                    g = go[r, c, p, q] * (mask[r, 0, p, q] if use_mask else 1.0) / count
                    for iy in range(grid_h):
                        for ix in range(grid_w):
                            inside, y0, x0, y1, x1, lh, lw, _, _ = _droi_sample(y, x, iy, ix, bin_h, bin_w, grid_h,
                                                                                grid_w, height, width)
                            if inside:
                                _scatter(target, y0, x0, y1, x1, lh, lw, g)


@njit(parallel=True, cache=True)
def _droi_coord_grad(go, inp, rois, batch, offset, use_offset, mask, use_mask, scale, ratio, gamma,
                     grad_offset, grad_mask):
    n_rois, channels, pooled_h, pooled_w = go.shape
    height, width = inp.shape[2], inp.shape[3]
    for r in prange(n_rois):
        image = inp[batch[r]]
        start_h, start_w, roi_h, roi_w, bin_h, bin_w, grid_h, grid_w, count = _roi_align_box(
            rois, r, scale, pooled_h, pooled_w, ratio)
        for p in range(pooled_h):
            for q in range(pooled_w):
                y, x = _droi_bin(offset, use_offset, r, p, q, gamma, start_h, start_w, roi_h, roi_w, bin_h, bin_w)
                sum_h = 0.0
                sum_w = 0.0
                sum_v = 0.0
                for iy in range(grid_h):
                    for ix in range(grid_w):
                        inside, y0, x0, y1, x1, lh, lw, moves_h, moves_w = _droi_sample(
                            y, x, iy, ix, bin_h, bin_w, grid_h, grid_w, height, width)
                        if not inside:
                            continue
                        for c in range(channels):
                            plane = image[c]
                            v00, v01, v10, v11 = plane[y0, x0], plane[y0, x1], plane[y1, x0], plane[y1, x1]
                            d_h, d_w = blend_gradient(v00, v01, v10, v11, lh, lw, moves_h, moves_w)
                            g = go[r, c, p, q]
                            sum_h += g * d_h
                            sum_w += g * d_w
                            sum_v += g * blend(v00, v01, v10, v11, lh, lw)
                m = mask[r, 0, p, q] if use_mask else 1.0
                if use_offset:
                    grad_offset[r, 0, p, q] = gamma * roi_w * (m / count) * sum_w
                    grad_offset[r, 1, p, q] = gamma * roi_h * (m / count) * sum_h
                if use_mask:
                    grad_mask[r, 0, p, q] = sum_v / count


def _roi_args(geo):
    return float(geo.spatial_scale), int(geo.sampling_ratio), float(geo.gamma)


def forward(input, rois, offset, mask, *, geo, dtype):
    x = input
    out = np.empty((rois.shape[0], x.shape[1], *geo.output_size), x.dtype)
    _droi_forward(x, rois, rois[:, 0].astype(np.int64), _optional(offset, x.dtype), offset is not None,
                  _optional(mask, x.dtype), mask is not None, *_roi_args(geo), out)
    return out


def backward(grad_output, input, rois, offset, mask, *, geo, dtype, deterministic):
    x, go = input, grad_output
    batch = rois[:, 0].astype(np.int64)
    offset_arr, mask_arr = _optional(offset, x.dtype), _optional(mask, x.dtype)
    use_offset, use_mask = offset is not None, mask is not None
    grad_input = np.zeros_like(x)
    _droi_input_grad(go, rois, *_by_image(batch, x.shape[0]), offset_arr, use_offset, mask_arr, use_mask,
                     *_roi_args(geo), grad_input)
    grad_offset = np.empty_like(offset_arr) if use_offset else None
    grad_mask = np.empty_like(mask_arr) if use_mask else None
    if use_offset or use_mask:
        _droi_coord_grad(go, x, rois, batch, offset_arr, use_offset, mask_arr, use_mask, *_roi_args(geo),
                         grad_offset if use_offset else _dummy(x.dtype), grad_mask if use_mask else _dummy(x.dtype))
    return grad_input, grad_offset, grad_mask


# --------------------------------------------------------------------------------------------
# deform_psroi_pool (SPEC.md section 3)
# --------------------------------------------------------------------------------------------

@njit(inline="always")
def _round_half_away(v):
    """C's round(): halves go away from zero (Python's round and np.round go to even)."""
    a = np.floor(abs(v))
    if abs(v) - a >= 0.5:
        a += 1.0
    return math.copysign(a, v)


@njit(inline="always")
def _psroi_box(rois, r, scale, pooled, sample_per_part):
    """RoI r's geometry in MSRA's order of operations:
    (start_h, start_w, roi_h, roi_w, bin_h, bin_w, sub_h, sub_w).

    Every position of deform_psroi_pool is computed in the dtype of the arrays, one rounding per
    operation, exactly as the GPU kernels do: a sample can land exactly on the box edge (integer
    RoIs with scaled coordinate 0 do), and only the same arithmetic puts it on the same side."""
    T = rois.dtype.type
    s, half = T(scale), T(0.5)
    start_w = T(_round_half_away(rois[r, 1])) * s - half
    start_h = T(_round_half_away(rois[r, 2])) * s - half
    roi_w = max((T(_round_half_away(rois[r, 3])) + T(1)) * s - half - start_w, T(0.1))
    roi_h = max((T(_round_half_away(rois[r, 4])) + T(1)) * s - half - start_h, T(0.1))
    bin_h = roi_h / T(pooled)
    bin_w = roi_w / T(pooled)
    return start_h, start_w, roi_h, roi_w, bin_h, bin_w, bin_h / T(sample_per_part), bin_w / T(sample_per_part)


@njit(inline="always")
def _psroi_first(offset, use_offset, r, cls, p, q, pooled, part_size, trans_std, start_h, start_w, roi_h, roi_w,
                 bin_h, bin_w):
    """The first sample (h0, w0) of bin (p, q), moved by class cls's offset times trans_std,
    and the bin's part cell (part_h, part_w)."""
    T = offset.dtype.type
    part_h = p * part_size // pooled
    part_w = q * part_size // pooled
    h0 = T(p) * bin_h + start_h
    w0 = T(q) * bin_w + start_w
    if not use_offset:
        return h0, w0, part_h, part_w
    return (h0 + offset[r, 2 * cls + 1, part_h, part_w] * T(trans_std) * roi_h,
            w0 + offset[r, 2 * cls, part_h, part_w] * T(trans_std) * roi_w, part_h, part_w)


@njit(inline="always")
def _psroi_sample(T, h0, w0, ih, iw, sub_h, sub_w, height, width):
    """Sample (ih, iw) of the bin whose first sample is (h0, w0), positions of type T: whether
    it lies in MSRA's box, and its clamped corners."""
    return _clamped_sample(h0 + T(ih) * sub_h, w0 + T(iw) * sub_w, height, width, 0.5)


@njit(inline="always")
def _psroi_channel(ctop, p, q, group, pooled):
    """The input channel that bin (p, q) of output channel ctop reads: its group cell's."""
    return (ctop * group + p * group // pooled) * group + q * group // pooled


@njit(inline="always")
def _psroi_count(T, h0, w0, sub_h, sub_w, n, height, width):
    """The number of a bin's samples inside MSRA's box [-0.5, H - 0.5] x [-0.5, W - 0.5]."""
    count = 0
    for ih in range(n):
        for iw in range(n):
            if in_closed_box(h0 + T(ih) * sub_h, w0 + T(iw) * sub_w, height, width, 0.5):
                count += 1
    return count


@njit(parallel=True, cache=True)
def _psroi_forward(inp, rois, batch, offset, use_offset, group, part_size, n, scale, trans_std, out):
    n_rois, output_dim, pooled = out.shape[0], out.shape[1], out.shape[2]
    height, width = inp.shape[2], inp.shape[3]
    per_class = output_dim // (offset.shape[1] // 2) if use_offset else output_dim
    T = rois.dtype.type
    for task in prange(n_rois * output_dim):
        r = task // output_dim
        ctop = task % output_dim
        start_h, start_w, roi_h, roi_w, bin_h, bin_w, sub_h, sub_w = _psroi_box(rois, r, scale, pooled, n)
        for p in range(pooled):
            for q in range(pooled):
                h0, w0, _, _ = _psroi_first(offset, use_offset, r, ctop // per_class, p, q, pooled, part_size,
                                            trans_std, start_h, start_w, roi_h, roi_w, bin_h, bin_w)
                plane = inp[batch[r], _psroi_channel(ctop, p, q, group, pooled)]
                total = 0.0
                count = 0
                for ih in range(n):
                    for iw in range(n):
                        inside, y0, x0, y1, x1, lh, lw, _, _ = _psroi_sample(T, h0, w0, ih, iw, sub_h, sub_w,
                                                                                height, width)
                        if inside:
                            total += blend(plane[y0, x0], plane[y0, x1], plane[y1, x0], plane[y1, x1], lh, lw)
                            count += 1
                out[r, ctop, p, q] = total / count if count else 0.0


@njit(parallel=True, cache=True)
def _psroi_input_grad(go, rois, order, starts, offset, use_offset, group, part_size, n, scale, trans_std,
                      grad_input):
    n_images, channels, height, width = grad_input.shape
    output_dim, pooled = go.shape[1], go.shape[2]
    per_class = output_dim // (offset.shape[1] // 2) if use_offset else output_dim
    T = rois.dtype.type
    for task in prange(n_images * channels):
        b = task // channels
        c = task % channels
        # The bins that read input channel c: class ctop, group cell (gh, gw).
        ctop = c // (group * group)
        gh = c // group % group
        gw = c % group
        target = grad_input[b, c]
        for k in range(starts[b], starts[b + 1]):
            r = order[k]
            start_h, start_w, roi_h, roi_w, bin_h, bin_w, sub_h, sub_w = _psroi_box(rois, r, scale, pooled, n)
            for p in range(pooled):
                if p * group // pooled != gh:
                    continue
                for q in range(pooled):
                    if q * group // pooled != gw:
                        continue
                    h0, w0, _, _ = _psroi_first(offset, use_offset, r, ctop // per_class, p, q, pooled, part_size,
                                                trans_std, start_h, start_w, roi_h, roi_w, bin_h, bin_w)
                    count = _psroi_count(T, h0, w0, sub_h, sub_w, n, height, width)
                    if count == 0:
                        continue
                    g = go[r, ctop, p, q] / count
                    for ih in range(n):
                        for iw in range(n):
                            inside, y0, x0, y1, x1, lh, lw, _, _ = _psroi_sample(T, h0, w0, ih, iw, sub_h, sub_w,
                                                                                    height, width)
                            if inside:
                                _scatter(target, y0, x0, y1, x1, lh, lw, g)


@njit(parallel=True, cache=True)
def _psroi_offset_grad(go, inp, rois, batch, offset, group, part_size, n, scale, trans_std, grad_offset):
    n_rois, output_dim, pooled = go.shape[0], go.shape[1], go.shape[2]
    height, width = inp.shape[2], inp.shape[3]
    per_class = output_dim // (offset.shape[1] // 2)
    T = rois.dtype.type
    for r in prange(n_rois):
        start_h, start_w, roi_h, roi_w, bin_h, bin_w, sub_h, sub_w = _psroi_box(rois, r, scale, pooled, n)
        for ctop in range(output_dim):
            cls = ctop // per_class
            for p in range(pooled):
                for q in range(pooled):
                    h0, w0, part_h, part_w = _psroi_first(offset, True, r, cls, p, q, pooled, part_size, trans_std,
                                                          start_h, start_w, roi_h, roi_w, bin_h, bin_w)
                    count = _psroi_count(T, h0, w0, sub_h, sub_w, n, height, width)
                    if count == 0:
                        continue
                    plane = inp[batch[r], _psroi_channel(ctop, p, q, group, pooled)]
                    d_h = 0.0
                    d_w = 0.0
                    for ih in range(n):
                        for iw in range(n):
                            inside, y0, x0, y1, x1, lh, lw, moves_h, moves_w = _psroi_sample(
                                T, h0, w0, ih, iw, sub_h, sub_w, height, width)
                            if inside:
                                dh, dw = blend_gradient(plane[y0, x0], plane[y0, x1], plane[y1, x0], plane[y1, x1],
                                                        lh, lw, moves_h, moves_w)
                                d_h += dh
                                d_w += dw
                    g = go[r, ctop, p, q] / count
                    grad_offset[r, 2 * cls, part_h, part_w] += trans_std * roi_w * (g * d_w)
                    grad_offset[r, 2 * cls + 1, part_h, part_w] += trans_std * roi_h * (g * d_h)


def _psroi_args(geo):
    return (int(geo.group_size), int(geo.part_size), int(geo.sample_per_part), float(geo.spatial_scale),
            float(geo.trans_std))


def psroi_forward(input, rois, offset, *, geo, dtype):
    x = input
    out = np.empty((rois.shape[0], geo.output_dim, geo.pooled_size, geo.pooled_size), x.dtype)
    _psroi_forward(x, rois, rois[:, 0].astype(np.int64), _optional(offset, x.dtype), offset is not None,
                   *_psroi_args(geo), out)
    return out


def psroi_backward(grad_output, input, rois, offset, *, geo, dtype, deterministic):
    x, go = input, grad_output
    batch = rois[:, 0].astype(np.int64)
    offset_arr = _optional(offset, x.dtype)
    grad_input = np.zeros_like(x)
    _psroi_input_grad(go, rois, *_by_image(batch, x.shape[0]), offset_arr, offset is not None, *_psroi_args(geo),
                      grad_input)
    grad_offset = None
    if offset is not None:
        grad_offset = np.zeros_like(offset_arr)
        _psroi_offset_grad(go, x, rois, batch, offset_arr, *_psroi_args(geo), grad_offset)
    return grad_input, grad_offset
