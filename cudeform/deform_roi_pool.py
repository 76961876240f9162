"""Deformable RoI pooling: deform_roi_pool (plain and modulated) and its position-sensitive
variant deform_psroi_pool (R-FCN).

Public functions, argument validation and dispatch to the CPU (Numba) or GPU (CUDA)
implementation. The contract is sections 2 and 3 of SPEC.md: mmcv's ``DeformRoIPool``
(RoIAlign-style sampling) and MSRA's ``DeformablePSROIPooling``, with exact gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _arrays
from . import _validate as check
from .cuda import _compile


class DeformRoIPoolGrads(NamedTuple):
    """Gradients returned by :func:`deform_roi_pool_backward`; None for an argument not given."""

    input: Any
    offset: Any
    mask: Any


class DeformPSRoIPoolGrads(NamedTuple):
    """Gradients returned by :func:`deform_psroi_pool_backward`; None for an argument not given."""

    input: Any
    offset: Any


class RoIPoolGeometry(NamedTuple):
    """Everything about a deform_roi_pool call that is not an array."""

    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    gamma: float


class PSRoIPoolGeometry(NamedTuple):
    """Everything about a deform_psroi_pool call that is not an array."""

    output_dim: int
    pooled_size: int
    group_size: int
    part_size: int
    sample_per_part: int
    spatial_scale: float
    trans_std: float
    num_classes: int  # offset.shape[1] // 2; 1 without an offset


def _input_and_rois(op: str, a: dict) -> None:
    x, rois = a["input"], a["rois"]
    check.ndim(op, "input", x, 4, "(N, C, H, W)")
    if x.shape[2] < 1 or x.shape[3] < 1:
        check.fail(op, "input", "a spatial size of at least 1x1", f"shape {tuple(x.shape)}")
    check.ndim(op, "rois", rois, 2, "(R, 5), rows [batch_index, x1, y1, x2, y2]")
    if rois.shape[1] != 5:
        check.fail(op, "rois", "shape (R, 5), rows [batch_index, x1, y1, x2, y2]", f"shape {tuple(rois.shape)}")


def _batch_indices(op: str, p: _arrays.Prepared) -> None:
    """Every RoI's batch index must be in [0, N). The CPU checks it on every call; the GPU only
    in debug mode (CUDEFORM_DEBUG=1), since reading the answer back would synchronise the device:
    otherwise its kernels pool zeros for such a RoI."""
    if p.device.kind == "cuda" and not _compile._debug:
        return
    n = p.arrays["input"].shape[0]
    with p.context():
        b = p.arrays["rois"][:, 0]
        if p.dtype == "bfloat16":  # stored as its 16 bits, the high half of a float32's
            b = (b.astype(np.uint32) << 16).view(np.float32)
        bad = ~((b >= 0) & (b < n))
        if bad.any():
            row = int(bad.argmax())
            check.fail(op, "rois", f"batch indices rois[:, 0] in [0, N) = [0, {n})",
                       f"{float(b[row])!r} in row {row}")


def _roi_geometry(op: str, a: dict, output_size, spatial_scale, sampling_ratio, gamma) -> RoIPoolGeometry:
    geo = RoIPoolGeometry(
        check.int_pair(op, "output_size", output_size, minimum=1),
        check.real(op, "spatial_scale", spatial_scale, positive=True),
        check.integer(op, "sampling_ratio", sampling_ratio, minimum=0),
        check.real(op, "gamma", gamma),
    )
    _input_and_rois(op, a)
    r = a["rois"].shape[0]
    if a["offset"] is not None:
        check.shape(op, "offset", a["offset"], (r, 2, *geo.output_size), "(R, 2, ph, pw)")
    if a["mask"] is not None:
        check.shape(op, "mask", a["mask"], (r, 1, *geo.output_size), "(R, 1, ph, pw)")
    return geo


def _psroi_geometry(op: str, a: dict, output_dim, pooled_size, group_size, part_size, sample_per_part,
                    spatial_scale, trans_std) -> PSRoIPoolGeometry:
    output_dim = check.integer(op, "output_dim", output_dim, minimum=1)
    pooled_size = check.integer(op, "pooled_size", pooled_size, minimum=1)
    group_size = check.integer(op, "group_size", group_size, minimum=1)
    part_size = pooled_size if part_size is None else check.integer(op, "part_size", part_size, minimum=1)
    sample_per_part = check.integer(op, "sample_per_part", sample_per_part, minimum=1)
    spatial_scale = check.real(op, "spatial_scale", spatial_scale, positive=True)
    trans_std = check.real(op, "trans_std", trans_std)
    _input_and_rois(op, a)
    x, offset = a["input"], a["offset"]
    if x.shape[1] != output_dim * group_size**2:
        channels = output_dim * group_size**2
        check.fail(op, "input", f"output_dim * group_size**2 = {output_dim} * {group_size}**2 = {channels} channels",
                   f"shape {tuple(x.shape)}")
    num_classes = 1
    if offset is not None:
        check.ndim(op, "offset", offset, 4, "(R, 2 * num_classes, part_size, part_size)")
        k = offset.shape[1]
        if k == 0 or k % 2 or output_dim % (k // 2):
            check.fail(op, "offset", f"2 * num_classes channels, num_classes dividing output_dim = {output_dim}",
                       f"shape {tuple(offset.shape)}")
        num_classes = k // 2
        check.shape(op, "offset", offset, (a["rois"].shape[0], k, part_size, part_size),
                    "(R, 2 * num_classes, part_size, part_size)")
    return PSRoIPoolGeometry(output_dim, pooled_size, group_size, part_size, sample_per_part, spatial_scale,
                             trans_std, num_classes)


def deform_roi_pool(input, rois, offset=None, *, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                    mask=None):
    """Deformable RoI pooling (mmcv's ``DeformRoIPool``; modulated when ``mask`` is given).

    RoIAlign-style average pooling of each RoI into ``ph x pw`` bins, every bin moved by its
    own normalised offset. For RoI r, ``start = coord * spatial_scale - 0.5`` and
    ``roi_w = x2' - x1'``, ``roi_h = y2' - y1'`` (no rounding, no minimum size). Bin (p, q)
    averages a ``grid_h x grid_w`` grid of samples (``sampling_ratio`` each way if > 0, else
    ``ceil(roi_h / ph)`` by ``ceil(roi_w / pw)``) at
    ``y = start_h + gamma*roi_h*offset[r, 1, p, q] + p*roi_h/ph + (iy + 0.5) * (roi_h/ph) / grid_h``
    (likewise x with ``offset[r, 0, p, q]``), divided by ``max(grid_h * grid_w, 1)``, so a
    zero-size RoI with ``sampling_ratio=0`` pools 0. A sample is 0 outside
    ``[-1, H] x [-1, W]``; inside, its coordinates are clamped into ``[0, H-1] x [0, W-1]``
    and it is bilinear between the floor and floor + 1 (clamped) neighbours, as RoIAlign.
    With zero offsets this is ``torchvision.ops.roi_align(..., aligned=True)``. A non-finite
    offset puts every sample of its bin outside: the bin pools 0 and gets no gradient.

    Args:
        input: (N, C, H, W).
        rois: (R, 5), rows ``[batch_index, x1, y1, x2, y2]`` in input-image coordinates
            (scaled by ``spatial_scale``), in the dtype of ``input`` (so for float16 and
            bfloat16 the coordinates are rounded to that precision). The batch index is the
            integer part of ``rois[r, 0]`` and must be in [0, N): the CPU raises ValueError
            otherwise; the GPU, which does not synchronise to check, pools zeros for such a
            RoI (and gives it zero gradients), unless debug mode (``CUDEFORM_DEBUG=1``) is
            on, where it raises as the CPU does.
        offset: (R, 2, ph, pw) or None. **Channel 0 moves x (w) and channel 1 moves y (h)**
            (the reverse of deform_conv2d's (dy, dx)), in units of ``gamma`` times the RoI's
            width and height: the normalised offsets of the DCN paper, whose offset branch
            (e.g. an FC layer) is the caller's.
        output_size: (ph, pw), an int or a pair.
        spatial_scale: positive; the feature map's scale relative to the image.
        sampling_ratio: samples per bin each way; 0 adapts it to the RoI size.
        gamma: the offsets' scale.
        mask: (R, 1, ph, pw) or None; multiplies bin (p, q) as given (no sigmoid).

    Returns:
        (R, C, ph, pw), in the framework and on the device of ``input``.

    NumPy arrays run on the CPU (float32, float64); CuPy arrays and CUDA tensors on the GPU
    (float16, bfloat16, float32, float64; the half types accumulate in float32).
    """
    op = "deform_roi_pool"
    p = _arrays.prepare(op, ("offset", "mask"), input=input, rois=rois, offset=offset, mask=mask)
    geo = _roi_geometry(op, p.arrays, output_size, spatial_scale, sampling_ratio, gamma)
    _batch_indices(op, p)
    with p.context():
        out = p.backend("deform_roi_pool").forward(geo=geo, dtype=p.dtype, **p.arrays)
    return p.wrap(out)


def deform_roi_pool_backward(grad_output, input, rois, offset=None, *, output_size, spatial_scale=1.0,
                             sampling_ratio=0, gamma=0.1, mask=None, deterministic=False) -> DeformRoIPoolGrads:
    """Gradients of :func:`deform_roi_pool` with respect to ``input``, ``offset`` and ``mask``.

    The exact derivatives of the forward, including for RoIs that touch or cross the image
    border: along a coordinate that the sampler clamps (a sample in ``[-1, 0)`` or
    ``[H-1, H]``), the sample does not move with the offset, so that coordinate contributes no
    offset gradient (mmcv's differs there). At the kinks (integer coordinates) the derivative is
    taken from the right; the jumps where a sample crosses ``-1`` or ``H`` contribute nothing.
    The RoIs get no gradient.

    Args:
        grad_output: (R, C, ph, pw), the gradient of the loss with respect to the output.
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask: as given
            to the forward.
        deterministic: make the GPU path bitwise reproducible run after run. With
            ``sampling_ratio > 0`` the input gradient is then gathered: a list of the bins'
            corners (16 entries per 2x2 samples of a bin, about 28 bytes each in float32),
            sorted by input pixel, and each element summed in that order; past 2**26 entries,
            with ``sampling_ratio == 0`` and inside a CUDA graph capture, it goes through
            64-bit fixed point instead (a uint64 buffer of the input's size). The CPU path is
            deterministic in both modes.

    Returns:
        DeformRoIPoolGrads(input, offset, mask), each shaped like its argument; ``offset`` and
        ``mask`` are None when not given.
    """
    op = "deform_roi_pool_backward"
    check.boolean(op, "deterministic", deterministic)
    p = _arrays.prepare(op, ("offset", "mask"), grad_output=grad_output, input=input, rois=rois, offset=offset,
                        mask=mask)
    geo = _roi_geometry(op, p.arrays, output_size, spatial_scale, sampling_ratio, gamma)
    check.shape(op, "grad_output", p.arrays["grad_output"],
                (p.arrays["rois"].shape[0], p.arrays["input"].shape[1], *geo.output_size), "(R, C, ph, pw)")
    _batch_indices(op, p)
    with p.context():
        grads = p.backend("deform_roi_pool").backward(geo=geo, dtype=p.dtype, deterministic=deterministic,
                                                      **p.arrays)
    return DeformRoIPoolGrads(*(p.wrap(g) for g in grads))


def deform_psroi_pool(input, rois, offset=None, *, output_dim, pooled_size, group_size=1, part_size=None,
                      sample_per_part=4, spatial_scale=1.0, trans_std=0.1):
    """Deformable position-sensitive RoI pooling (MSRA's ``DeformablePSROIPooling``, R-FCN).

    For RoI r, ``start = round(x1) * spatial_scale - 0.5``, ``end = (round(x2) + 1) *
    spatial_scale - 0.5`` (``round`` takes halves away from zero, as C's), ``roi_w =
    max(end_w - start_w, 0.1)`` (likewise h). Output (r, ctop, p, q) averages the
    ``sample_per_part**2`` samples at ``w = q * roi_w/k + start_w + offset_x * trans_std *
    roi_w + iw * roi_w/k/sample_per_part`` (likewise h), ``k = pooled_size``, of input
    channel ``(ctop * group_size + gh) * group_size + gw`` with ``gh = floor(p * group_size /
    k)`` (likewise gw). A sample outside ``[-0.5, H - 0.5] x [-0.5, W - 0.5]`` is skipped; the
    others are clamped into ``[0, H-1] x [0, W-1]`` and bilinear between floor and ceil. The
    output is the mean over the valid samples, 0 if there is none: a non-finite offset
    empties the bins that read its part.

    Args:
        input: (N, output_dim * group_size**2, H, W).
        rois: (R, 5), rows ``[batch_index, x1, y1, x2, y2]``, as for :func:`deform_roi_pool`
            (same dtype as ``input``; a batch index outside [0, N) raises ValueError on the
            CPU and in debug mode, and pools zeros on the GPU otherwise).
        offset: (R, 2 * num_classes, part_size, part_size) or None (no deformation).
            Channel ``2 * cls`` is x (w) and ``2 * cls + 1`` is y (h); output channel ctop
            belongs to class ``ctop // (output_dim // num_classes)``, so num_classes must
            divide output_dim; bin (p, q) reads part cell ``(floor(p * part_size / k),
            floor(q * part_size / k))``, computed exactly in integers.
        output_dim: output channels.
        pooled_size: k, the output is k x k.
        group_size: the position-sensitive grid; 1 is plain deformable RoI pooling.
        part_size: the offsets' grid; default pooled_size.
        sample_per_part: samples per bin each way.
        spatial_scale: positive; the feature map's scale relative to the image.
        trans_std: the offsets' scale.

    Returns:
        (R, output_dim, pooled_size, pooled_size), in the framework and on the device of
        ``input``.

    NumPy arrays run on the CPU (float32, float64); CuPy arrays and CUDA tensors on the GPU
    (float16, bfloat16, float32, float64; the half types accumulate in float32).
    """
    op = "deform_psroi_pool"
    p = _arrays.prepare(op, ("offset",), input=input, rois=rois, offset=offset)
    geo = _psroi_geometry(op, p.arrays, output_dim, pooled_size, group_size, part_size, sample_per_part,
                          spatial_scale, trans_std)
    _batch_indices(op, p)
    with p.context():
        out = p.backend("deform_roi_pool").psroi_forward(geo=geo, dtype=p.dtype, **p.arrays)
    return p.wrap(out)


def deform_psroi_pool_backward(grad_output, input, rois, offset=None, *, output_dim, pooled_size, group_size=1,
                               part_size=None, sample_per_part=4, spatial_scale=1.0, trans_std=0.1,
                               deterministic=False) -> DeformPSRoIPoolGrads:
    """Gradients of :func:`deform_psroi_pool` with respect to ``input`` and ``offset``.

    The exact derivatives of the forward: along a coordinate that is clamped (a sample in
    ``[-0.5, 0)`` or ``[H-1, H-0.5]``) the sample does not move with the offset, so it
    contributes no offset gradient there (MSRA's code differs). At the kinks (integer
    coordinates) the derivative is taken from the right; the jumps where a sample enters or
    leaves the valid box contribute nothing. The RoIs get no gradient.

    Args:
        grad_output: (R, output_dim, pooled_size, pooled_size).
        input, rois, offset, output_dim, pooled_size, group_size, part_size, sample_per_part,
            spatial_scale, trans_std: as given to the forward.
        deterministic: as for :func:`deform_roi_pool_backward`.

    Returns:
        DeformPSRoIPoolGrads(input, offset), each shaped like its argument; ``offset`` is None
        when not given.
    """
    op = "deform_psroi_pool_backward"
    check.boolean(op, "deterministic", deterministic)
    p = _arrays.prepare(op, ("offset",), grad_output=grad_output, input=input, rois=rois, offset=offset)
    geo = _psroi_geometry(op, p.arrays, output_dim, pooled_size, group_size, part_size, sample_per_part,
                          spatial_scale, trans_std)
    check.shape(op, "grad_output", p.arrays["grad_output"],
                (p.arrays["rois"].shape[0], geo.output_dim, geo.pooled_size, geo.pooled_size),
                "(R, output_dim, pooled_size, pooled_size)")
    _batch_indices(op, p)
    with p.context():
        grads = p.backend("deform_roi_pool").psroi_backward(geo=geo, dtype=p.dtype, deterministic=deterministic,
                                                            **p.arrays)
    return DeformPSRoIPoolGrads(*(p.wrap(g) for g in grads))
