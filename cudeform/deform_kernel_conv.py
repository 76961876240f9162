"""Deformable Kernels (Gao et al.): global and local DK.

Public functions, argument validation and dispatch to the CPU (Numba) or GPU (CUDA)
implementation. The contract is section 4 of SPEC.md: ``O_j = sum_k I_{j+k} W_{k + dk}``, the
input read on the rigid grid and the kernel resampled from a larger scope.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from . import _arrays
from . import _validate as check


class DeformKernelConv2dGrads(NamedTuple):
    """Gradients returned by :func:`deform_kernel_conv2d_backward`; None for an argument not given."""

    input: Any
    weight: Any
    kernel_offset: Any
    bias: Any


class KernelConvGeometry(NamedTuple):
    """Everything about a Deformable Kernels convolution that is not an array."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kernel: tuple[int, int]
    scope: tuple[int, int]
    out_size: tuple[int, int]
    groups: int
    offset_groups: int
    local: bool  # kernel_offset has one set of offsets per output position


def _geometry(op: str, a: dict, kernel_size, stride, padding, dilation, groups) -> KernelConvGeometry:
    kernel = check.int_pair(op, "kernel_size", kernel_size, minimum=1)
    stride = check.int_pair(op, "stride", stride, minimum=1)
    padding = check.int_pair(op, "padding", padding, minimum=0)
    dilation = check.int_pair(op, "dilation", dilation, minimum=1)
    groups = check.integer(op, "groups", groups, minimum=1)
    return check.on_shapes(_shape_geometry, op, a, ("input", "weight", "kernel_offset", "bias"), kernel, stride,
                           padding, dilation, groups)


@functools.lru_cache(maxsize=256)
def _shape_geometry(op: str, shapes: tuple, kernel, stride, padding, dilation, groups) -> KernelConvGeometry:
    """The checks and sizes that depend on the arrays' shapes alone (cached, as in deform_conv)."""
    x, weight, offset, bias = (None if s is None else check.Dims(s) for s in shapes)
    check.ndim(op, "input", x, 4, "(N, C_in, H, W)")
    check.ndim(op, "weight", weight, 4, "(C_out, C_in / groups, S_h, S_w)")
    if offset.ndim not in (2, 4):
        check.fail(op, "kernel_offset",
                   "a 2-D (N, 2 * offset_groups * kh * kw) array (global DK) or a 4-D "
                   "(N, 2 * offset_groups * kh * kw, H_out, W_out) array (local DK)",
                   f"shape {tuple(offset.shape)}")
    n, c_in, h, w = x.shape
    c_out, c_per_group, s_h, s_w = weight.shape
    if min(c_out, c_per_group, s_h, s_w) < 1:
        check.fail(op, "weight", "a non-empty (C_out, C_in / groups, S_h, S_w) array", f"shape {tuple(weight.shape)}")
    if c_in % groups or c_out % groups:
        check.fail(op, "groups", f"a divisor of both C_in = {c_in} and C_out = {c_out}", groups)
    if c_per_group != c_in // groups:
        check.fail(op, "weight", f"weight.shape[1] = C_in / groups = {c_in} / {groups} = {c_in // groups}",
                   f"shape {tuple(weight.shape)}")
    kh, kw = kernel
    if kh > s_h or kw > s_w:
        check.fail(op, "kernel_size", f"at most the weight's scope (S_h, S_w) = ({s_h}, {s_w})", kernel)
    out_h = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        check.fail(
            op, "input",
            f"a spatial size that fits the dilated {kh}x{kw} kernel with padding {padding} and dilation {dilation}",
            f"H, W = {h}, {w} (output would be {out_h}x{out_w})",
        )
    k = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * k):
        check.fail(op, "kernel_offset",
                   f"a positive multiple of 2 * kh * kw = {2 * k} channels (2 * offset_groups * kh * kw)",
                   f"shape {tuple(offset.shape)}")
    offset_groups = offset.shape[1] // (2 * k)
    if c_out % offset_groups:
        check.fail(op, "kernel_offset",
                   f"offset_groups = kernel_offset.shape[1] / {2 * k} to divide C_out = {c_out}",
                   f"shape {tuple(offset.shape)} (offset_groups = {offset_groups})")
    local = offset.ndim == 4
    if local:
        check.shape(op, "kernel_offset", offset, (n, 2 * offset_groups * k, out_h, out_w),
                    "(N, 2 * offset_groups * kh * kw, H_out, W_out)")
    else:
        check.shape(op, "kernel_offset", offset, (n, 2 * offset_groups * k), "(N, 2 * offset_groups * kh * kw)")
    if bias is not None:
        check.shape(op, "bias", bias, (c_out,), "(C_out,)")
    return KernelConvGeometry(stride, padding, dilation, kernel, (s_h, s_w), (out_h, out_w), groups,
                              offset_groups, local)


def deform_kernel_conv2d(input, weight, kernel_offset, bias=None, *, kernel_size, stride=1, padding=0,
                         dilation=1, groups=1):
    """Deformable Kernels convolution: global DK (one resampled kernel per image) or local DK
    (one per output position), chosen by the rank of ``kernel_offset``.

    The input is read on the rigid grid, at ``y*stride_h - pad_h + i*dil_h`` (and likewise for
    x) with zero padding; the kernel is resampled: kernel point (i, j) with offset (dh, dw)
    reads the weight's scope bilinearly at ``(i + (S_h - kh)/2 + dh, j + (S_w - kw)/2 + dw)``
    (the kh x kw grid centred in the scope), 0 outside ``(-1, S_h) x (-1, S_w)`` and a
    neighbour outside the scope counting as 0 (as is a point with a non-finite offset, which
    then passes no gradient)::

        out[n, o, y, x] = bias[o] + sum over c, i, j of
            input[n, c, y*stride_h - pad_h + i*dil_h, x*stride_w - pad_w + j*dil_w]
            * weight[o, c, sampled at kernel point (i, j) moved by its offset]

    Args:
        input: (N, C_in, H, W).
        weight: (C_out, C_in / groups, S_h, S_w), the kernel scope, ``S >= kernel_size``.
        kernel_offset: the offsets of offset group g and kernel point ``k = i*kw + j`` are
            channels ``2 * (g*kh*kw + k)`` (dh, along the scope's rows) and the next one (dw).
            Offset group g holds output channels ``[g * C_out/G, (g+1) * C_out/G)``.
            Global DK: (N, 2 * G * kh * kw). Local DK: (N, 2 * G * kh * kw, H_out, W_out).
        bias: (C_out,) or None.
        kernel_size: (kh, kw), an int or a pair, at most the scope.
        stride, padding, dilation: an int or an (h, w) pair.
        groups: weight groups (contiguous blocks of channels), from 1 to C_in (depthwise).

    Returns:
        (N, C_out, H_out, W_out), ``H_out = (H + 2*pad_h - (dil_h*(kh-1) + 1)) // stride_h + 1``
        (and likewise W_out), in the framework and on the device of ``input``.

    NumPy arrays run on the CPU (float32, float64); CuPy arrays and CUDA tensors on the GPU
    (float16, bfloat16, float32, float64). Memory beyond the output:

    - global DK: the resampled kernels, ``N * C_out * (C_in/groups) * kh*kw`` elements, plus
      rigid columns (``C_in*kh*kw*H_out*W_out`` elements per image) for as many images as fit
      in 32 MiB on the CPU, 192 MiB on the GPU (at least one image). On the GPU, when
      ``(C_in/groups)*kh*kw <= 64`` (depthwise and the like) and the planes have fewer than
      2**30 positions, the convolution is direct and needs nothing: each block samples the
      kernel of its (image, output channel) into shared memory. Otherwise, in float16 and
      bfloat16 with ``C_in/groups`` a multiple of 8 on a GPU with tensor cores (sm_80+), no
      columns: the resampled kernels and a channels-last copy of the input.
    - local DK: nothing; the scope is sampled at every output position on the fly, so no
      per-position kernel of ``N*C_out*(C_in/groups)*kh*kw*H_out*W_out`` elements exists.
    """
    op = "deform_kernel_conv2d"
    p = _arrays.prepare(op, ("bias",), input=input, weight=weight, kernel_offset=kernel_offset, bias=bias)
    geo = _geometry(op, p.arrays, kernel_size, stride, padding, dilation, groups)
    with p.context():
        out = p.backend("deform_kernel_conv").forward(geo=geo, dtype=p.dtype, **p.arrays)
    return p.wrap(out)


def deform_kernel_conv2d_backward(grad_output, input, weight, kernel_offset, bias=None, *, kernel_size, stride=1,
                                  padding=0, dilation=1, groups=1, deterministic=False) -> DeformKernelConv2dGrads:
    """Gradients of :func:`deform_kernel_conv2d` with respect to every array argument.

    Args:
        grad_output: (N, C_out, H_out, W_out), the gradient of the loss with respect to the
            output.
        input, weight, kernel_offset, bias, kernel_size, stride, padding, dilation, groups: as
            given to the forward.
        deterministic: accepted for symmetry with ``deform_conv2d_backward``. Every sum of
            this op, on the CPU and on the GPU, is a gather or a reduction in a fixed order
            (no atomics), so the gradients are bitwise identical run after run in both modes.

    Returns:
        DeformKernelConv2dGrads(input, weight, kernel_offset, bias), each shaped like its
        argument; ``bias`` is None when not given. The sampled kernel is a piecewise-bilinear
        function of the offsets with kinks at integer scope coordinates; the kernel_offset
        gradient is the derivative from the right (floor-based), as deform_conv2d's default
        ``border_grad="torchvision"``: it is non-zero on ``[-1, S_h) x [-1, S_w)``.

    Memory beyond the gradients: global DK, the resampled kernels and their gradient (each
    ``N * C_out * (C_in/groups) * kh*kw`` elements, the gradient in float32 for the half
    types; on the GPU's direct path one such gradient per tile of outputs of the forward's
    kernel: tiles of up to 2048 outputs, smaller ones when ``N * C_out < 2048`` or an input
    window does not fit in shared memory), the columns of the forward (two buffers on the CPU;
    on the GPU only off the direct path) and on the GPU partial sums of the offset and weight
    gradients (at most ``ceil(C_out/G * C_in/groups / 160) * ceil(S_h*S_w / 16) * N * G * 2 *
    kh*kw`` and fewer than ``(262144 + C_out * C_in/groups) * S_h*S_w`` elements; where the
    forward runs on tensor cores, instead ``G * ceil(C_out/G * C_in/groups / 256) * N * kh*kw
    * S_h*S_w`` floats, and the scope's taps, ``G * N * kh*kw * ceil(S_h*S_w / 16) * 16``
    floats; there, at stride 1 with ``C_out/groups`` a multiple of 8, the input gradient is a
    convolution of a channels-last copy of grad_output, and the columns serve only the
    kernels' gradient, which on sm_90 with ``H_out*W_out`` a multiple of 8 needs none: a
    channels-last copy of the input instead); local DK, on the GPU, per-block partial sums of the weight gradient
    (fewer than ``(4096 + C_out * C_in/groups) * S_h*S_w`` elements), nothing on the CPU. A
    bias adds ``N * C_out`` partial sums on the GPU.
    """
    op = "deform_kernel_conv2d_backward"
    check.boolean(op, "deterministic", deterministic)
    p = _arrays.prepare(op, ("bias",), grad_output=grad_output, input=input, weight=weight,
                        kernel_offset=kernel_offset, bias=bias)
    geo = _geometry(op, p.arrays, kernel_size, stride, padding, dilation, groups)
    n = p.arrays["input"].shape[0]
    c_out = p.arrays["weight"].shape[0]
    check.ndim(op, "grad_output", p.arrays["grad_output"], 4, "(N, C_out, H_out, W_out)")
    check.shape(op, "grad_output", p.arrays["grad_output"], (n, c_out, *geo.out_size), "(N, C_out, H_out, W_out)")
    with p.context():
        grads = p.backend("deform_kernel_conv").backward(geo=geo, dtype=p.dtype, deterministic=deterministic,
                                                         **p.arrays)
    return DeformKernelConv2dGrads(*(p.wrap(g) for g in grads))
