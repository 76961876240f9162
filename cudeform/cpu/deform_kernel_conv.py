"""Deformable Kernels on the CPU: Numba kernels around NumPy matmuls (the twin of
kernels/deform_kernel_conv.cu).

Global DK: ``_resample`` samples one kernel per image, (N, C_out, Cg, K) with Cg = C_in/groups
and K = kh*kw. The convolution runs on a few images at a time (a chunk): the rigid columns of
the chunk (``_im2col``) times one weight matrix per (image, weight group), in one batched
matmul. The backward gets the resampled kernels' gradient and the columns' gradient from two
more matmuls, scatters the latter into the input (``_col2im``), and backpropagates through the
resampling (``_global_offset_grad``, ``_global_weight_grad``).

Local DK: fused loops that sample the scope at every output position; nothing per position
is stored.

Parallel loops are split so that no two iterations write one element: by (image, output
channel) for outputs and resampled kernels, (image, channel) for input gradients, (image,
offset group, kernel point) for offset gradients and (output channel, channel) for weight
gradients, each of which sums over everything else.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._bilinear import in_open_box, pixel

# Upper bound of one columns buffer; a chunk holds as many images as fit (at least one).
COLUMNS_BYTES = 32 * 2**20


@njit(inline="always")
def _corner(h, w):
    """The top-left neighbour (y0, x0) of (h, w) and the fractions (lh, lw) past it."""
    h0 = math.floor(h)
    w0 = math.floor(w)
    return int(h0), int(w0), h - h0, w - w0


@njit(inline="always")
def _sample(plane, h, w):
    """The zero-padded bilinear sample of the scope at (h, w): 0 outside the open box, a
    neighbour outside the plane counting as 0 (bilinear_zero in kernels/common.cuh)."""
    if not in_open_box(h, w, plane.shape[0], plane.shape[1]):
        return 0.0
    y0, x0, lh, lw = _corner(h, w)
    return ((1 - lh) * ((1 - lw) * pixel(plane, y0, x0) + lw * pixel(plane, y0, x0 + 1))
            + lh * ((1 - lw) * pixel(plane, y0 + 1, x0) + lw * pixel(plane, y0 + 1, x0 + 1)))


@njit(inline="always")
def _position_grad(plane, h, w):
    """(d/dh, d/dw) of ``_sample``, from the right at the kinks: non-zero on [-1, S_h) x [-1, S_w)."""
    if not (h >= -1.0 and h < plane.shape[0] and w >= -1.0 and w < plane.shape[1]):
        return 0.0, 0.0
    y0, x0, lh, lw = _corner(h, w)
    v00 = pixel(plane, y0, x0)
    v01 = pixel(plane, y0, x0 + 1)
    v10 = pixel(plane, y0 + 1, x0)
    v11 = pixel(plane, y0 + 1, x0 + 1)
    return (1 - lw) * (v10 - v00) + lw * (v11 - v01), (1 - lh) * (v01 - v00) + lh * (v11 - v10)


@njit(inline="always")
def _scatter(plane, h, w, v):
    """plane += v * d _sample(plane, h, w) / d plane: v times the bilinear weights, into the
    neighbours inside the plane."""
    if not in_open_box(h, w, plane.shape[0], plane.shape[1]):
        return
    y0, x0, lh, lw = _corner(h, w)
    for yy, xx, wt in ((y0, x0, (1 - lh) * (1 - lw)), (y0, x0 + 1, (1 - lh) * lw),
                       (y0 + 1, x0, lh * (1 - lw)), (y0 + 1, x0 + 1, lh * lw)):
        if 0 <= yy < plane.shape[0] and 0 <= xx < plane.shape[1]:
            plane[yy, xx] += wt * v


@njit(inline="always")
def _scope_point(scope, kh, kw, k, dh, dw):
    """Where kernel point k moved by (dh, dw) reads the scope (the last two axes of ``scope``,
    a weight-shaped array): the kh x kw grid is centred in it."""
    return k // kw + (scope.shape[2] - kh) / 2 + dh, k % kw + (scope.shape[3] - kw) / 2 + dw


@njit(inline="always")
def _per_offset_group(offset, c_out, k_size):
    """Output channels per offset group (the offsets hold 2 * G * K channels)."""
    return c_out // (offset.shape[1] // (2 * k_size))


@njit(inline="always")
def _rigid_pixel(y, x, k, kw, sh, sw, ph, pw, dh, dw):
    """The input pixel (yy, xx) that kernel point k reads for output (y, x) on the rigid grid."""
    return y * sh - ph + (k // kw) * dh, x * sw - pw + (k % kw) * dw


@njit(inline="always")
def _local_tap(scope, offset, n, gk, k, y, x, height, width, kh, kw, sh, sw, ph, pw, dh, dw):
    """Kernel point k (of offset group slot gk) at output (y, x) in local DK: whether its rigid
    input pixel (yy, xx) is inside the image, that pixel, and where its moved point reads the
    scope (only computed inside)."""
    yy, xx = _rigid_pixel(y, x, k, kw, sh, sw, ph, pw, dh, dw)
    if not (0 <= yy < height and 0 <= xx < width):
        return False, yy, xx, 0.0, 0.0
    h, w = _scope_point(scope, kh, kw, k, offset[n, 2 * gk, y, x], offset[n, 2 * gk + 1, y, x])
    return True, yy, xx, h, w


# --------------------------------------------------------------------------------------------
# Global DK
# --------------------------------------------------------------------------------------------

@njit(inline="always")
def _global_point(scope, offset, n, gk, k, kh, kw):
    """Where kernel point k (of offset group slot gk) of image n reads the scope in global DK."""
    return _scope_point(scope, kh, kw, k, offset[n, 2 * gk], offset[n, 2 * gk + 1])


@njit(parallel=True, cache=True)
def _resample(weight, offset, kh, kw, kernels):
    n_images, c_out, c_per_group, k_size = kernels.shape
    per_offset_group = _per_offset_group(offset, c_out, k_size)
    for task in prange(n_images * c_out):
        n = task // c_out
        o = task % c_out
        gk0 = (o // per_offset_group) * k_size
        for k in range(k_size):
            h, w = _global_point(weight, offset, n, gk0 + k, k, kh, kw)
            for c in range(c_per_group):
                kernels[n, o, c, k] = _sample(weight[o, c], h, w)


@njit(parallel=True, cache=True)
def _im2col(inp, n0, kh, kw, sh, sw, ph, pw, dh, dw, out_w, cols):
    images, _, length = cols.shape
    channels = inp.shape[1]
    k_size = kh * kw
    for task in prange(images * channels):
        n = task // channels
        c = task % channels
        plane = inp[n0 + n, c]
        for k in range(k_size):
            for pos in range(length):
                yy, xx = _rigid_pixel(pos // out_w, pos % out_w, k, kw, sh, sw, ph, pw, dh, dw)
                cols[n, c * k_size + k, pos] = pixel(plane, yy, xx)


@njit(parallel=True, cache=True)
def _col2im(gcols, n0, kh, kw, sh, sw, ph, pw, dh, dw, out_w, grad_input):
    images, _, length = gcols.shape
    _, channels, height, width = grad_input.shape
    k_size = kh * kw
    for task in prange(images * channels):
        n = task // channels
        c = task % channels
        target = grad_input[n0 + n, c]
        for k in range(k_size):
            for pos in range(length):
                yy, xx = _rigid_pixel(pos // out_w, pos % out_w, k, kw, sh, sw, ph, pw, dh, dw)
                if 0 <= yy < height and 0 <= xx < width:
                    target[yy, xx] += gcols[n, c * k_size + k, pos]


@njit(parallel=True, cache=True)
def _global_offset_grad(grad_kernels, weight, offset, kh, kw, grad_offset):
    n_images, c_out, c_per_group, k_size = grad_kernels.shape
    gk_size = offset.shape[1] // 2
    per_offset_group = _per_offset_group(offset, c_out, k_size)
    for task in prange(n_images * gk_size):
        n = task // gk_size
        gk = task % gk_size
        g = gk // k_size
        k = gk % k_size
        h, w = _global_point(weight, offset, n, gk, k, kh, kw)
        grad_h = 0.0
        grad_w = 0.0
        for o in range(g * per_offset_group, (g + 1) * per_offset_group):
            for c in range(c_per_group):
                d_h, d_w = _position_grad(weight[o, c], h, w)
                grad_h += grad_kernels[n, o, c, k] * d_h
                grad_w += grad_kernels[n, o, c, k] * d_w
        grad_offset[n, 2 * gk] = grad_h
        grad_offset[n, 2 * gk + 1] = grad_w


@njit(parallel=True, cache=True)
def _global_weight_grad(grad_kernels, offset, kh, kw, grad_weight):
    n_images, c_out, c_per_group, k_size = grad_kernels.shape
    per_offset_group = _per_offset_group(offset, c_out, k_size)
    for task in prange(c_out * c_per_group):
        o = task // c_per_group
        c = task % c_per_group
        gk0 = (o // per_offset_group) * k_size
        target = grad_weight[o, c]
        for n in range(n_images):
            for k in range(k_size):
                h, w = _global_point(grad_weight, offset, n, gk0 + k, k, kh, kw)
                _scatter(target, h, w, grad_kernels[n, o, c, k])


def _chunks(n_images: int, columns_per_image: int, itemsize: int):
    """Ranges of images whose columns fit in COLUMNS_BYTES (at least one image each)."""
    step = max(1, min(n_images, COLUMNS_BYTES // max(1, columns_per_image * itemsize)))
    return step, [(n0, min(n_images, n0 + step)) for n0 in range(0, n_images, step)]


def _global_setup(x, weight, offset, geo):
    """What both global passes start from: the resampled kernels (N, C_out, Cg, K), the chunks
    of images and a columns buffer for one chunk, (images, C_in * K, L)."""
    n, c_in = x.shape[:2]
    kk = geo.kernel[0] * geo.kernel[1]
    length = geo.out_size[0] * geo.out_size[1]
    kernels = np.empty((n, *weight.shape[:2], kk), x.dtype)
    _resample(weight, offset, *geo.kernel, kernels)
    step, chunks = _chunks(n, c_in * kk * length, x.itemsize)
    return kernels, chunks, np.empty((step, c_in * kk, length), x.dtype)


def _rigid_args(geo):
    kh, kw = geo.kernel
    return (kh, kw, *geo.stride, *geo.padding, *geo.dilation, geo.out_size[1])


def _global_forward(x, weight, offset, geo, out):
    kernels, chunks, cols = _global_setup(x, weight, offset, geo)
    n, c_out, cg, kk = kernels.shape
    g = geo.groups
    length = cols.shape[2]
    kernels = kernels.reshape(n, g, c_out // g, cg * kk)
    for n0, n1 in chunks:
        b = n1 - n0
        _im2col(x, n0, *_rigid_args(geo), cols[:b])
        np.matmul(kernels[n0:n1], cols[:b].reshape(b, g, cg * kk, length),
                  out=out[n0:n1].reshape(b, g, c_out // g, length))


def _global_backward(go, x, weight, offset, geo, grad_input, grad_weight, grad_offset):
    kernels, chunks, cols = _global_setup(x, weight, offset, geo)
    n, c_out, cg, kk = kernels.shape
    g = geo.groups
    length = cols.shape[2]
    kernels_t = np.ascontiguousarray(kernels.reshape(n, g, c_out // g, cg * kk).transpose(0, 1, 3, 2))
    grad_kernels = np.empty((n, g, c_out // g, cg * kk), x.dtype)
    gcols = np.empty_like(cols)
    for n0, n1 in chunks:
        b = n1 - n0
        go_g = go[n0:n1].reshape(b, g, c_out // g, length)
        _im2col(x, n0, *_rigid_args(geo), cols[:b])
        np.matmul(go_g, cols[:b].reshape(b, g, cg * kk, length).transpose(0, 1, 3, 2), out=grad_kernels[n0:n1])
        np.matmul(kernels_t[n0:n1], go_g, out=gcols[:b].reshape(b, g, cg * kk, length))
        _col2im(gcols[:b], n0, *_rigid_args(geo), grad_input)
    grad_kernels = grad_kernels.reshape(n, c_out, cg, kk)
    _global_offset_grad(grad_kernels, weight, offset, *geo.kernel, grad_offset)
    _global_weight_grad(grad_kernels, offset, *geo.kernel, grad_weight)


# --------------------------------------------------------------------------------------------
# Local DK
# --------------------------------------------------------------------------------------------

@njit(inline="always")
def _local_sizes(outputs, inputs, scopes, offset, groups, kh, kw):
    """The sizes of a local DK call, from arrays shaped like its output, its input and its
    weight, and its offsets: (N, C_out, H_out, W_out, C_in, H, W, Cg, K, outputs per weight
    group, outputs per offset group)."""
    n_images, c_out, out_h, out_w = outputs.shape
    _, channels, height, width = inputs.shape
    k_size = kh * kw
    return (n_images, c_out, out_h, out_w, channels, height, width, scopes.shape[1], k_size, c_out // groups,
            _per_offset_group(offset, c_out, k_size))


@njit(parallel=True, cache=True)
def _local_forward(inp, weight, offset, groups, kh, kw, sh, sw, ph, pw, dh, dw, out):
    (n_images, c_out, out_h, out_w, _, height, width, c_per_group, k_size, per_weight_group,
     per_offset_group) = _local_sizes(out, inp, weight, offset, groups, kh, kw)
    for task in prange(n_images * c_out):
        n = task // c_out
        o = task % c_out
        first = (o // per_weight_group) * c_per_group
        gk0 = (o // per_offset_group) * k_size
        for y in range(out_h):
            for x in range(out_w):
                total = 0.0
                for k in range(k_size):
                    inside, yy, xx, h, w = _local_tap(weight, offset, n, gk0 + k, k, y, x, height, width,
                                                      kh, kw, sh, sw, ph, pw, dh, dw)
                    if not inside:
                        continue
                    for c in range(c_per_group):
                        total += inp[n, first + c, yy, xx] * _sample(weight[o, c], h, w)
                out[n, o, y, x] = total


@njit(parallel=True, cache=True)
def _local_input_grad(grad_out, weight, offset, groups, kh, kw, sh, sw, ph, pw, dh, dw, grad_input):
    (n_images, c_out, out_h, out_w, channels, height, width, c_per_group, k_size, per_weight_group,
     per_offset_group) = _local_sizes(grad_out, grad_input, weight, offset, groups, kh, kw)
    for task in prange(n_images * channels):
        n = task // channels
        c_in = task % channels
        c = c_in % c_per_group
        target = grad_input[n, c_in]
        first = (c_in // c_per_group) * per_weight_group
        for o in range(first, first + per_weight_group):
            gk0 = (o // per_offset_group) * k_size
            for y in range(out_h):
                for x in range(out_w):
                    for k in range(k_size):
                        inside, yy, xx, h, w = _local_tap(weight, offset, n, gk0 + k, k, y, x, height, width,
                                                          kh, kw, sh, sw, ph, pw, dh, dw)
                        if inside:
                            target[yy, xx] += grad_out[n, o, y, x] * _sample(weight[o, c], h, w)


@njit(parallel=True, cache=True)
def _local_offset_grad(grad_out, inp, weight, offset, groups, kh, kw, sh, sw, ph, pw, dh, dw, grad_offset):
    (n_images, c_out, out_h, out_w, _, height, width, c_per_group, k_size, per_weight_group,
     per_offset_group) = _local_sizes(grad_out, inp, weight, offset, groups, kh, kw)
    gk_size = offset.shape[1] // 2
    for task in prange(n_images * gk_size):
        n = task // gk_size
        gk = task % gk_size
        g = gk // k_size
        k = gk % k_size
        for y in range(out_h):
            for x in range(out_w):
                grad_h = 0.0
                grad_w = 0.0
                inside, yy, xx, h, w = _local_tap(weight, offset, n, gk, k, y, x, height, width,
                                                  kh, kw, sh, sw, ph, pw, dh, dw)
                if inside:
                    for o in range(g * per_offset_group, (g + 1) * per_offset_group):
                        first = (o // per_weight_group) * c_per_group
                        for c in range(c_per_group):
                            v = grad_out[n, o, y, x] * inp[n, first + c, yy, xx]
                            d_h, d_w = _position_grad(weight[o, c], h, w)
                            grad_h += v * d_h
                            grad_w += v * d_w
                grad_offset[n, 2 * gk, y, x] = grad_h
                grad_offset[n, 2 * gk + 1, y, x] = grad_w


@njit(parallel=True, cache=True)
def _local_weight_grad(grad_out, inp, offset, groups, kh, kw, sh, sw, ph, pw, dh, dw, grad_weight):
    (n_images, c_out, out_h, out_w, _, height, width, c_per_group, k_size, per_weight_group,
     per_offset_group) = _local_sizes(grad_out, inp, grad_weight, offset, groups, kh, kw)
    for task in prange(c_out * c_per_group):
        o = task // c_per_group
        c_in = (o // per_weight_group) * c_per_group + task % c_per_group
        gk0 = (o // per_offset_group) * k_size
        target = grad_weight[o, task % c_per_group]
        for n in range(n_images):
            for y in range(out_h):
                for x in range(out_w):
                    for k in range(k_size):
                        inside, yy, xx, h, w = _local_tap(grad_weight, offset, n, gk0 + k, k, y, x, height, width,
                                                          kh, kw, sh, sw, ph, pw, dh, dw)
                        if inside:
                            _scatter(target, h, w, grad_out[n, o, y, x] * inp[n, c_in, yy, xx])


def _local_args(geo):
    return (geo.groups, *geo.kernel, *geo.stride, *geo.padding, *geo.dilation)


# --------------------------------------------------------------------------------------------
# Entry points (called by cudeform.deform_kernel_conv)
# --------------------------------------------------------------------------------------------

def forward(input, weight, kernel_offset, bias, *, geo, dtype):
    x, offset = input, kernel_offset
    out = np.empty((x.shape[0], weight.shape[0], *geo.out_size), x.dtype)
    if geo.local:
        _local_forward(x, weight, offset, *_local_args(geo), out)
    else:
        _global_forward(x, weight, offset, geo, out)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def backward(grad_output, input, weight, kernel_offset, bias, *, geo, dtype, deterministic):
    go, x, offset = grad_output, input, kernel_offset
    grad_input = np.zeros_like(x)
    grad_weight = np.zeros_like(weight)
    grad_offset = np.empty_like(offset)
    if geo.local:
        args = _local_args(geo)
        _local_input_grad(go, weight, offset, *args, grad_input)
        _local_offset_grad(go, x, weight, offset, *args, grad_offset)
        _local_weight_grad(go, x, offset, *args, grad_weight)
    else:
        _global_backward(go, x, weight, offset, geo, grad_input, grad_weight, grad_offset)
    grad_bias = go.sum(axis=(0, 2, 3)) if bias is not None else None
    return grad_input, grad_weight, grad_offset, grad_bias
