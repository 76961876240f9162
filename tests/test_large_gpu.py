"""Every op, forward and backward, on arrays past 2**31 elements (float16, a few GiB each): the
64-bit index arithmetic, checked at the far end against the CPU path.

One pattern for every case: a small float64 case is rounded to float16 and embedded at the far
end of one axis of arrays of zeros, so that its first element lies at or past element 2**31 —
the last image of a batch (every op), or the last channels of one image (deform_conv2d with a
1x1 kernel, whose columns then hold one image's 2**31 elements too, and deform_roi_pool). The
zeros add nothing to any sum, so at the far end every result must be the small case's (the CPU
path in float64, to float16's accuracy), and before it exactly what zeros give (checked on the
GPU, which also catches writes that land in the wrong place). A 32-bit index that wraps reads
zeros or faults instead.
"""

import gc

import numpy as np
import pytest

import cudeform
import test_deform_conv as tdc
import test_deform_kernel_conv as tdk
import test_deform_roi_pool as tdr
from helpers import TOLERANCE, l2_rel, to_numpy

pytestmark = [pytest.mark.gpu, pytest.mark.large]

FIRST_FAR_ELEMENT = 2**31
CONV = (cudeform.deform_conv2d, cudeform.deform_conv2d_backward)
DK = (cudeform.deform_kernel_conv2d, cudeform.deform_kernel_conv2d_backward)
# Images of 64 x 128 x 128 = 2**20 elements: the last of 2049 starts at element 2**31 exactly,
# and 2048 is still an exact float16 batch index for the RoIs.
IMAGE = dict(H=128, W=128)
CHANNELS = 64


@pytest.fixture(autouse=True)
def free_gpu_memory():
    """Hand every cached block back, so that the next case finds the GPU's memory free."""
    yield
    import cupy

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()


def float16_exact(array):
    """The float64 values of the array rounded to float16."""
    return None if array is None else array.astype(np.float16).astype(np.float64)


def far_size(small, axis):
    """The length along ``axis`` that puts ``small``'s part, at the far end, past element 2**31
    (where the indices before ``axis`` are 0)."""
    stride = int(np.prod(small.shape[axis + 1:]))
    return small.shape[axis] + -(-FIRST_FAR_ELEMENT // stride)


def near_and_far(shape, axis, width):
    """Index tuples of the zero part and of the far end (its last ``width`` along ``axis``)."""
    near, far = [slice(None)] * len(shape), [slice(None)] * len(shape)
    near[axis], far[axis] = slice(None, shape[axis] - width), slice(shape[axis] - width, None)
    return tuple(near), tuple(far)


def embed(small, axis, size):
    """float16 CuPy zeros of ``small``'s shape but ``size`` long along ``axis``, holding
    ``small`` at the far end."""
    import cupy

    shape = list(small.shape)
    shape[axis] = size
    big = cupy.zeros(shape, cupy.float16)
    big[near_and_far(shape, axis, small.shape[axis])[1]] = cupy.asarray(small, cupy.float16)
    return big


def assert_far_end(field, got, want, axis, zero_result):
    """``got`` (CuPy) holds ``want`` at the far end of ``axis`` and, before it, exactly
    ``zero_result`` (what the zeros give, broadcast)."""
    import cupy

    near, far = near_and_far(got.shape, axis, want.shape[axis])
    assert not (got[near] != cupy.asarray(zero_result, got.dtype)).any(), f"{field}: the zero part"
    assert l2_rel(to_numpy(got[far]), want) < tolerance(field), field


def tolerance(field):
    # The offset gradient differentiates the interpolation: its error grows with the input's.
    return TOLERANCE["float16"] * (4 if "offset" in field else 1)


def check_far_end(op, args, geo, embedded, out_axis, deterministic):
    """Run ``op`` (forward, backward) on ``args`` with the arguments of ``embedded`` (name ->
    axis) at the far end of arrays of zeros, each as long along its axis as the input must be
    for its far end to pass 2**31; ``out_axis``: the output's axis that grows with them (None:
    the output keeps its size)."""
    import cupy

    forward, backward = op
    exact = {k: float16_exact(v) for k, v in args.items()}
    big = {k: None if v is None else cupy.asarray(v, cupy.float16) for k, v in exact.items()}
    size = far_size(exact["input"], embedded["input"])
    for name, axis in embedded.items():
        big[name] = embed(exact[name], axis, size)
    if "rois" in args and embedded["input"] == 0:
        # The small case's RoIs read its image 0: the big batch's last.
        last = big["input"].shape[0] - 1
        assert float(np.float16(last)) == last
        big["rois"][:, 0] = last
    zeros = dict(exact, **{name: np.zeros_like(exact[name]) for name in embedded})

    want = forward(**exact, **geo)  # the CPU path
    out = forward(**big, **geo)
    rng = np.random.default_rng(41)
    grad_out = float16_exact(rng.standard_normal(want.shape))
    if out_axis is None:
        assert l2_rel(to_numpy(out), want) < tolerance("output")
        big_grad_out = cupy.asarray(grad_out, cupy.float16)
    else:
        zero_out = forward(**zeros, **geo).take([0], axis=out_axis)  # constant along out_axis
        assert_far_end("output", out, want, out_axis, zero_out)
        big_grad_out = embed(grad_out, out_axis, out.shape[out_axis])
    del out

    expected = backward(grad_out, **exact, **geo)
    grads = backward(big_grad_out, **big, **geo, deterministic=deterministic)
    for field, got, w in zip(grads._fields, grads, expected):
        if w is None:
            assert got is None, field
        elif field in embedded:
            assert_far_end(field, got, w, embedded[field], 0.0)  # grad_output is 0 there
        else:
            assert l2_rel(to_numpy(got), w) < tolerance(field), field


def conv_case(**cfg):
    args, geo = tdc.make_case(dict(dict(N=1, stride=1, dilation=1), **cfg), seed=40)
    return CONV, args, geo


def dk_case(mode, **cfg):
    cfg = dict(dict(N=1, C_in=CHANNELS, **IMAGE, kernel=(3, 3), scope=(4, 4), stride=1, padding=1, dilation=1), **cfg)
    args, geo = tdk.make_case(cfg, mode, seed=42)
    return DK, args, geo


def pool_case(op, **cfg):
    forward, backward, _, _, _ = tdr.OPS[op]
    build = tdr.roi_case if op == "roi" else tdr.ps_case
    args, geo = build(dict(dict(N=1, R=6, **IMAGE), **cfg), seed=43)
    return (forward, backward), args, geo


CASES = {
    # The last image of a batch.
    "deform_conv2d": lambda: (*conv_case(C_in=CHANNELS, C_out=4, groups=2, G=2, kernel=(3, 3), padding=1, **IMAGE),
                              {"input": 0, "offset": 0, "mask": 0}, 0),
    "dk_global_gemm": lambda: (*dk_case("global", C_out=8, groups=4, G=2), {"input": 0, "kernel_offset": 0}, 0),
    "dk_global_direct": lambda: (*dk_case("global", C_out=CHANNELS, groups=CHANNELS, G=1),
                                 {"input": 0, "kernel_offset": 0}, 0),
    "dk_local": lambda: (*dk_case("local", C_out=CHANNELS, groups=CHANNELS, G=1), {"input": 0, "kernel_offset": 0}, 0),
    "deform_roi_pool": lambda: (*pool_case("roi", C=CHANNELS, geo=dict(output_size=(3, 2), spatial_scale=1.0,
                                                                       sampling_ratio=2, gamma=0.1)),
                                {"input": 0}, None),
    "deform_psroi_pool": lambda: (*pool_case("psroi", classes=1, geo=dict(output_dim=CHANNELS // 16, pooled_size=4,
                                                                           group_size=4, part_size=2,
                                                                           sample_per_part=2, trans_std=0.2)),
                                  {"input": 0}, None),
    # The last channels of one image.
    "deform_conv2d_1x1_channels": lambda: (*conv_case(C_in=4, C_out=3, groups=1, G=1, kernel=(1, 1), padding=0,
                                                      **IMAGE),
                                           {"input": 1, "weight": 1}, None),
    "deform_roi_pool_channels": lambda: (*pool_case("roi", C=4, geo=dict(output_size=2, spatial_scale=0.5,
                                                                         sampling_ratio=0, gamma=0.3)),
                                         {"input": 1}, 1),
}
# deform_conv2d's and deform_roi_pool's deterministic modes have their own accumulation (and,
# for deform_conv2d, chunk) arithmetic. deform_psroi_pool's two modes are one code path (a
# gathered input gradient), as deform_kernel_conv2d's are; it stays here to guard that.
DETERMINISTIC = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool")


@pytest.mark.parametrize("name,deterministic", [(name, False) for name in CASES] +
                         [(name, True) for name in DETERMINISTIC])
def test_past_int32(name, deterministic):
    op, args, geo, embedded, out_axis = CASES[name]()
    check_far_end(op, args, geo, embedded, out_axis, deterministic)
