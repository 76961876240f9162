"""Deformable convolution on the CPU: Numba im2col / col2im kernels around NumPy matmuls.

The batch is processed a few images at a time (a chunk): the columns of a chunk,
(images, C_in*kh*kw, H_out*W_out), are built by ``_im2col`` and multiplied by the weight;
the backward rebuilds them for the weight gradient and scatters the columns' gradient
back with ``_col2im`` (input) and ``_col2im_coord`` (offset, mask).

Parallel loops are split so that no two iterations write one element: ``_im2col`` and
``_col2im_coord`` by (image, offset group, kernel point), ``_col2im`` by (image, channel).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._bilinear import in_open_box, pixel

# Upper bound of one columns buffer; a chunk holds as many images as fit (at least one).
COLUMNS_BYTES = 32 * 2**20


@njit(parallel=True, cache=True)
def _im2col(inp, offset, mask, use_mask, n0, kh, kw, sh, sw, ph, pw, dh, dw, cols):
    images, _, length = cols.shape
    _, channels, height, width = inp.shape
    out_w = offset.shape[3]
    k_size = kh * kw
    groups = offset.shape[1] // (2 * k_size)
    per_group = channels // groups
    for task in prange(images * groups * k_size):
        n = task // (groups * k_size)
        gk = task % (groups * k_size)
        g = gk // k_size
        k = gk % k_size
        i = k // kw
        j = k % kw
        for pos in range(length):
            y = pos // out_w
            x = pos % out_w
            h = y * sh - ph + i * dh + offset[n0 + n, 2 * gk, y, x]
            w = x * sw - pw + j * dw + offset[n0 + n, 2 * gk + 1, y, x]
            m = mask[n0 + n, gk, y, x] if use_mask else 1.0
            if not in_open_box(h, w, height, width):
                for c in range(g * per_group, (g + 1) * per_group):
                    cols[n, c * k_size + k, pos] = 0.0
                continue
            h0 = math.floor(h)
            w0 = math.floor(w)
            lh = h - h0
            lw = w - w0
            y0 = int(h0)
            x0 = int(w0)
            for c in range(g * per_group, (g + 1) * per_group):
                plane = inp[n0 + n, c]
                v = ((1 - lh) * ((1 - lw) * pixel(plane, y0, x0) + lw * pixel(plane, y0, x0 + 1))
                     + lh * ((1 - lw) * pixel(plane, y0 + 1, x0) + lw * pixel(plane, y0 + 1, x0 + 1)))
                cols[n, c * k_size + k, pos] = m * v


@njit(parallel=True, cache=True)
def _col2im(gcols, offset, mask, use_mask, n0, kh, kw, sh, sw, ph, pw, dh, dw, grad_input):
    images, _, length = gcols.shape
    _, channels, height, width = grad_input.shape
    out_w = offset.shape[3]
    k_size = kh * kw
    groups = offset.shape[1] // (2 * k_size)
    per_group = channels // groups
    for task in prange(images * channels):
        n = task // channels
        c = task % channels
        g = c // per_group
        target = grad_input[n0 + n, c]
        for k in range(k_size):
            i = k // kw
            j = k % kw
            gk = g * k_size + k
            for pos in range(length):
                y = pos // out_w
                x = pos % out_w
                h = y * sh - ph + i * dh + offset[n0 + n, 2 * gk, y, x]
                w = x * sw - pw + j * dw + offset[n0 + n, 2 * gk + 1, y, x]
                if not in_open_box(h, w, height, width):
                    continue
                m = mask[n0 + n, gk, y, x] if use_mask else 1.0
                gv = m * gcols[n, c * k_size + k, pos]
                h0 = math.floor(h)
                w0 = math.floor(w)
                lh = h - h0
                lw = w - w0
                y0 = int(h0)
                x0 = int(w0)
                y1 = y0 + 1
                x1 = x0 + 1
                if y0 >= 0:
                    if x0 >= 0:
                        target[y0, x0] += (1 - lh) * (1 - lw) * gv
                    if x1 < width:
                        target[y0, x1] += (1 - lh) * lw * gv
                if y1 < height:
                    if x0 >= 0:
                        target[y1, x0] += lh * (1 - lw) * gv
                    if x1 < width:
                        target[y1, x1] += lh * lw * gv


@njit(parallel=True, cache=True)
def _col2im_coord(gcols, inp, offset, mask, use_mask, closed_low, n0, kh, kw, sh, sw, ph, pw, dh, dw,
                  grad_offset, grad_mask):
    images, _, length = gcols.shape
    _, channels, height, width = inp.shape
    out_w = offset.shape[3]
    k_size = kh * kw
    groups = offset.shape[1] // (2 * k_size)
    per_group = channels // groups
    for task in prange(images * groups * k_size):
        n = task // (groups * k_size)
        gk = task % (groups * k_size)
        g = gk // k_size
        k = gk % k_size
        i = k // kw
        j = k % kw
        for pos in range(length):
            y = pos // out_w
            x = pos % out_w
            h = y * sh - ph + i * dh + offset[n0 + n, 2 * gk, y, x]
            w = x * sw - pw + j * dw + offset[n0 + n, 2 * gk + 1, y, x]
            m = mask[n0 + n, gk, y, x] if use_mask else 1.0
            grad_h = 0.0
            grad_w = 0.0
            grad_m = 0.0
            # The floor-based derivative is non-zero on [-1, H) x [-1, W); border_grad="mmcv"
            # drops the closed lower edges.
            if ((h > -1.0 or (closed_low and h == -1.0)) and h < height
                    and (w > -1.0 or (closed_low and w == -1.0)) and w < width):
                h0 = math.floor(h)
                w0 = math.floor(w)
                lh = h - h0
                lw = w - w0
                y0 = int(h0)
                x0 = int(w0)
                for c in range(g * per_group, (g + 1) * per_group):
                    plane = inp[n0 + n, c]
                    v00 = pixel(plane, y0, x0)
                    v01 = pixel(plane, y0, x0 + 1)
                    v10 = pixel(plane, y0 + 1, x0)
                    v11 = pixel(plane, y0 + 1, x0 + 1)
                    gc = gcols[n, c * k_size + k, pos]
                    grad_h += gc * ((1 - lw) * (v10 - v00) + lw * (v11 - v01))
                    grad_w += gc * ((1 - lh) * (v01 - v00) + lh * (v11 - v10))
                    if use_mask:
                        grad_m += gc * ((1 - lh) * ((1 - lw) * v00 + lw * v01) + lh * ((1 - lw) * v10 + lw * v11))
            grad_offset[n0 + n, 2 * gk, y, x] = m * grad_h
            grad_offset[n0 + n, 2 * gk + 1, y, x] = m * grad_w
            if use_mask:
                grad_mask[n0 + n, gk, y, x] = grad_m


def _chunks(n_images: int, columns_per_image: int, itemsize: int):
    """Ranges of images whose columns fit in COLUMNS_BYTES (at least one image each)."""
    step = max(1, min(n_images, COLUMNS_BYTES // max(1, columns_per_image * itemsize)))
    return step, [(n0, min(n_images, n0 + step)) for n0 in range(0, n_images, step)]


def _geometry_args(geo):
    kh, kw = geo.kernel
    return (kh, kw, *geo.stride, *geo.padding, *geo.dilation)


def forward(input, offset, weight, bias, mask, *, geo, dtype):
    x = np.ascontiguousarray(input)
    offset = np.ascontiguousarray(offset)
    use_mask = mask is not None
    mask = np.ascontiguousarray(mask) if use_mask else np.zeros((1, 1, 1, 1), x.dtype)
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    out_h, out_w = geo.out_size
    length = out_h * out_w
    kk = geo.kernel[0] * geo.kernel[1]
    g = geo.groups
    w = np.ascontiguousarray(weight).reshape(g, c_out // g, (c_in // g) * kk)
    out = np.empty((n, c_out, out_h, out_w), x.dtype)
    step, chunks = _chunks(n, c_in * kk * length, x.itemsize)
    cols = np.empty((step, c_in * kk, length), x.dtype)
    for n0, n1 in chunks:
        b = n1 - n0
        _im2col(x, offset, mask, use_mask, n0, *_geometry_args(geo), cols[:b])
        np.matmul(w, cols[:b].reshape(b, g, (c_in // g) * kk, length),
                  out=out[n0:n1].reshape(b, g, c_out // g, length))
    if bias is not None:
        out += bias.reshape(1, c_out, 1, 1)
    return out


def backward(grad_output, input, offset, weight, bias, mask, *, geo, dtype, border_grad, deterministic):
    x = np.ascontiguousarray(input)
    offset = np.ascontiguousarray(offset)
    go = np.ascontiguousarray(grad_output)
    use_mask = mask is not None
    mask_arr = np.ascontiguousarray(mask) if use_mask else np.zeros((1, 1, 1, 1), x.dtype)
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    out_h, out_w = geo.out_size
    length = out_h * out_w
    kk = geo.kernel[0] * geo.kernel[1]
    g = geo.groups
    rows = (c_in // g) * kk
    w = np.ascontiguousarray(weight).reshape(g, c_out // g, rows)
    w_t = np.ascontiguousarray(w.transpose(0, 2, 1))

    grad_input = np.zeros_like(x)
    grad_offset = np.empty_like(offset)
    grad_mask = np.empty_like(mask_arr) if use_mask else np.zeros((1, 1, 1, 1), x.dtype)
    grad_weight = np.zeros((g, c_out // g, rows), x.dtype)
    step, chunks = _chunks(n, c_in * kk * length, x.itemsize)
    cols = np.empty((step, c_in * kk, length), x.dtype)
    gcols = np.empty_like(cols)
    geo_args = _geometry_args(geo)
    for n0, n1 in chunks:
        b = n1 - n0
        go_g = go[n0:n1].reshape(b, g, c_out // g, length)
        _im2col(x, offset, mask_arr, use_mask, n0, *geo_args, cols[:b])
        cols_g = cols[:b].reshape(b, g, rows, length)
        grad_weight += np.matmul(go_g, cols_g.transpose(0, 1, 3, 2)).sum(axis=0)
        np.matmul(w_t, go_g, out=gcols[:b].reshape(b, g, rows, length))
        _col2im(gcols[:b], offset, mask_arr, use_mask, n0, *geo_args, grad_input)
        _col2im_coord(gcols[:b], x, offset, mask_arr, use_mask, border_grad == "torchvision", n0, *geo_args,
                      grad_offset, grad_mask)
    grad_bias = go.sum(axis=(0, 2, 3)) if bias is not None else None
    return (grad_input, grad_offset, grad_weight.reshape(weight.shape), grad_bias,
            grad_mask if use_mask else None)
