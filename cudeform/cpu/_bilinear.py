"""Bilinear sampling helpers shared by the CPU kernels (the twin of kernels/common.cuh)."""

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
