"""Bilinear sampling helpers shared by the CPU kernels (the twin of kernels/common.cuh)."""

import math

from numba import njit


@njit(inline="always")
def pixel(plane, y, x):
    """plane[y, x], or 0 for a pixel outside the plane (zero padding)."""
    if 0 <= y < plane.shape[0] and 0 <= x < plane.shape[1]:
        return plane[y, x]
    return 0.0


@njit(inline="always")
def in_open_box(h, w, height, width):
    """Whether a sample at (h, w) can see the image: ``(-1, H) x (-1, W)``; False for NaN."""
    return h > -1.0 and h < height and w > -1.0 and w < width


# Bilinear sampling with clamping (RoIAlign, deformable RoI pooling): the twin of
# in_closed_box and ClampedCorners in kernels/common.cuh, which explain the rule.

@njit(inline="always")
def in_closed_box(h, w, height, width, margin):
    """Whether (h, w) lies in [-margin, H - 1 + margin] x [-margin, W - 1 + margin]; False for
    NaN. RoIAlign's box has margin 1, MSRA's position-sensitive pooling's margin 0.5."""
    return h >= -margin and h <= height - 1 + margin and w >= -margin and w <= width - 1 + margin


@njit(inline="always")
def clamped_corners(h, w, height, width):
    """The corners of (h, w) clamped into the image: (y0, x0, y1, x1, lh, lw, moves_h, moves_w),
    where moves_h (moves_w) says whether the clamped position follows h (w)."""
    moves_h = 0.0 <= h < height - 1
    moves_w = 0.0 <= w < width - 1
    ch = min(max(h, 0.0), height - 1.0)
    cw = min(max(w, 0.0), width - 1.0)
    y0 = int(math.floor(ch))
    x0 = int(math.floor(cw))
    return y0, x0, min(y0 + 1, height - 1), min(x0 + 1, width - 1), ch - y0, cw - x0, moves_h, moves_w


@njit(inline="always")
def blend(v00, v01, v10, v11, lh, lw):
    """The bilinear blend of four corner values; v01 is (y0, x1), v10 is (y1, x0)."""
    return (1 - lh) * ((1 - lw) * v00 + lw * v01) + lh * ((1 - lw) * v10 + lw * v11)


@njit(inline="always")
def blend_gradient(v00, v01, v10, v11, lh, lw, moves_h, moves_w):
    """(d/dh, d/dw) of :func:`blend` with respect to the unclamped position."""
    d_h = (1 - lw) * (v10 - v00) + lw * (v11 - v01) if moves_h else 0.0
    d_w = (1 - lh) * (v01 - v00) + lh * (v11 - v10) if moves_w else 0.0
    return d_h, d_w
