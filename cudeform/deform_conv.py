"""Deformable convolution: DCN v1, and v2 when a modulation mask is given.

Public functions, argument validation and dispatch to the CPU (Numba) or GPU (CUDA)
implementation. The contract is section 1 of SPEC.md: torchvision's layout and semantics.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from . import _arrays
from . import _validate as check

BORDER_GRADS = ("torchvision", "mmcv")


class DeformConv2dGrads(NamedTuple):
    """Gradients returned by :func:`deform_conv2d_backward`; None for an argument not given."""

    input: Any
    offset: Any
    weight: Any
    bias: Any
    mask: Any


class ConvGeometry(NamedTuple):
    """Everything about a deformable convolution that is not an array."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kernel: tuple[int, int]
    out_size: tuple[int, int]
    groups: int
    offset_groups: int


def _geometry(op: str, a: dict, stride, padding, dilation) -> ConvGeometry:
    stride = check.int_pair(op, "stride", stride, minimum=1)
    padding = check.int_pair(op, "padding", padding, minimum=0)
    dilation = check.int_pair(op, "dilation", dilation, minimum=1)
    return check.on_shapes(_shape_geometry, op, a, ("input", "offset", "weight", "bias", "mask"), stride, padding,
                           dilation)


@functools.lru_cache(maxsize=256)
def _shape_geometry(op: str, shapes: tuple, stride, padding, dilation) -> ConvGeometry:
    """The checks and sizes that depend on the arrays' shapes alone (cached: they cost 5 us of a
    small call's ~150 us)."""
    x, offset, weight, bias, mask = (None if s is None else check.Dims(s) for s in shapes)
    check.ndim(op, "input", x, 4, "(N, C_in, H, W)")
    check.ndim(op, "weight", weight, 4, "(C_out, C_in / groups, kh, kw)")
    check.ndim(op, "offset", offset, 4, "(N, 2 * offset_groups * kh * kw, H_out, W_out)")
    n, c_in, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    if c_in < 1:
        check.fail(op, "input", "at least one channel (N, C_in, H, W)", f"shape {tuple(x.shape)}")
    if min(c_out, c_per_group, kh, kw) < 1:
        check.fail(op, "weight", "a non-empty (C_out, C_in / groups, kh, kw) array", f"shape {tuple(weight.shape)}")
    if c_in % c_per_group:
        check.fail(
            op, "weight",
            f"weight.shape[1] (C_in / groups) to divide the input's {c_in} channels",
            f"shape {tuple(weight.shape)}",
        )
    groups = c_in // c_per_group
    if c_out % groups:
        check.fail(
            op, "weight",
            f"C_out = weight.shape[0] to be a multiple of groups = {groups} (= C_in {c_in} / weight.shape[1] {c_per_group})",
            f"shape {tuple(weight.shape)}",
        )
    out_h = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        check.fail(
            op, "input",
            f"a spatial size that fits the dilated {kh}x{kw} kernel with padding {padding} "
            f"and dilation {dilation}",
            f"H, W = {h}, {w} (output would be {out_h}x{out_w})",
        )
    k = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * k):
        check.fail(
            op, "offset", f"a positive multiple of 2 * kh * kw = {2 * k} channels (2 * offset_groups * kh * kw)",
            f"shape {tuple(offset.shape)}",
        )
    offset_groups = offset.shape[1] // (2 * k)
    if c_in % offset_groups:
        check.fail(
            op, "offset",
            f"offset_groups = offset.shape[1] / {2 * k} to divide the input's {c_in} channels",
            f"shape {tuple(offset.shape)} (offset_groups = {offset_groups})",
        )
    check.shape(op, "offset", offset, (n, 2 * offset_groups * k, out_h, out_w),
                "(N, 2 * offset_groups * kh * kw, H_out, W_out)")
    if mask is not None:
        check.shape(op, "mask", mask, (n, offset_groups * k, out_h, out_w),
                    "(N, offset_groups * kh * kw, H_out, W_out)")
    if bias is not None:
        check.shape(op, "bias", bias, (c_out,), "(C_out,)")
    return ConvGeometry(stride, padding, dilation, (kh, kw), (out_h, out_w), groups, offset_groups)


def deform_conv2d(input, offset, weight, bias=None, *, stride=1, padding=0, dilation=1, mask=None):
    """Deformable 2-D convolution (DCN v1; v2 when ``mask`` is given).

    Each kernel point (i, j) of output position (y, x) samples the input bilinearly at
    ``h = y*stride_h - pad_h + i*dil_h + dy``, ``w = x*stride_w - pad_w + j*dil_w + dx``,
    where (dy, dx) is that point's learned offset; the sample is 0 outside
    ``(-1, H) x (-1, W)`` and a neighbour outside the image counts as 0. The sample is
    multiplied by the mask (as given: no sigmoid) and by the weight, and summed. A sample
    whose position is not finite (a NaN or infinite offset) fails the box test, so it counts
    as outside: it reads 0 and passes no gradient (its offset gradient is 0).

    Args:
        input: (N, C_in, H, W).
        offset: (N, 2 * G * kh * kw, H_out, W_out). Channel ``2 * (g*kh*kw + i*kw + j)``
            is dy and the next one dx, for offset group g, which holds input channels
            ``[g * C_in/G, (g+1) * C_in/G)``.
        weight: (C_out, C_in / groups, kh, kw); ``groups = C_in // weight.shape[1]``.
        bias: (C_out,) or None.
        stride, padding, dilation: an int or an (h, w) pair.
        mask: (N, G * kh * kw, H_out, W_out) or None; channel ``g*kh*kw + i*kw + j``.

    Returns:
        (N, C_out, H_out, W_out), with
        ``H_out = (H + 2*pad_h - (dil_h*(kh-1) + 1)) // stride_h + 1`` (and likewise W_out),
        in the framework and on the device of ``input``.

    NumPy arrays run on the CPU (float32, float64); CuPy arrays and CUDA tensors on the GPU
    (float16, bfloat16, float32, float64). The CPU path works on a few images at a time: its
    columns workspace holds ``C_in*kh*kw*H_out*W_out`` elements per image for as many images
    as fit in 32 MiB (at least one). The GPU's is at most 128 MiB of columns, except for the
    fused tensor-core forward of float16/bfloat16 on sm_90 (C_in/groups and
    C_in/offset_groups multiples of 8, enough output tiles to fill the GPU), which needs no
    columns: its workspace is a channels-last copy of ``input`` and the weight reordered.
    """
    op = "deform_conv2d"
    p = _arrays.prepare(op, ("bias", "mask"), input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    geo = _geometry(op, p.arrays, stride, padding, dilation)
    with p.context():
        out = p.backend("deform_conv").forward(geo=geo, dtype=p.dtype, **p.arrays)
    return p.wrap(out)


def deform_conv2d_backward(
    grad_output, input, offset, weight, bias=None, *, stride=1, padding=0, dilation=1, mask=None,
    border_grad="torchvision", deterministic=False,
) -> DeformConv2dGrads:
    """Gradients of :func:`deform_conv2d` with respect to every array argument.

    Args:
        grad_output: (N, C_out, H_out, W_out), the gradient of the loss with respect to
            the output.
        input, offset, weight, bias, stride, padding, dilation, mask: as given to the forward.
        border_grad: how the offset gradient treats the image border. The sample is a
            piecewise-bilinear function of its position with kinks at integer
            coordinates; the offset gradient is the derivative from the right
            (floor-based), as torchvision computes it. ``"torchvision"``: that derivative
            everywhere, so a point at exactly ``h = -1`` (or ``w = -1``), which samples 0,
            still gets the gradient pulling it into the image. ``"mmcv"``: 0 whenever the
            point is outside the open box ``(-1, H) x (-1, W)``, as mmcv and DCNv2 do; with
            zero offsets and padding 1, the border points then start with no offset
            gradient. The two agree everywhere else.
        deterministic: make the GPU path bitwise reproducible run after run. The CPU path
            is deterministic in both modes (it never accumulates from two threads into one
            element).

    Returns:
        DeformConv2dGrads(input, offset, weight, bias, mask), each shaped like its argument;
        ``bias`` and ``mask`` are None when not given.

    The CPU path's workspace is two columns buffers of the size the forward documents. The
    GPU's is one (at most 128 MiB, at least one image) and a float32 accumulator of the input
    gradient for the half types (channels-last, with a channels-last copy of ``input`` and the
    weight reordered, on sm_90 where C_in/groups and C_in/offset_groups are multiples of 8);
    ``deterministic`` adds a 64-bit one for the images of a columns buffer.
    """
    op = "deform_conv2d_backward"
    check.choice(op, "border_grad", border_grad, BORDER_GRADS)
    check.boolean(op, "deterministic", deterministic)
    p = _arrays.prepare(op, ("bias", "mask"), grad_output=grad_output, input=input, offset=offset, weight=weight,
                        bias=bias, mask=mask)
    geo = _geometry(op, p.arrays, stride, padding, dilation)
    n = p.arrays["input"].shape[0]
    c_out = p.arrays["weight"].shape[0]
    check.ndim(op, "grad_output", p.arrays["grad_output"], 4, "(N, C_out, H_out, W_out)")
    check.shape(op, "grad_output", p.arrays["grad_output"], (n, c_out, *geo.out_size),
                "(N, C_out, H_out, W_out)")
    with p.context():
        grads = p.backend("deform_conv").backward(
            geo=geo, dtype=p.dtype, border_grad=border_grad, deterministic=deterministic, **p.arrays
        )
    return DeformConv2dGrads(*(p.wrap(g) for g in grads))
