"""Property-based fuzzing (hypothesis) of every op's CPU path against the float64 references.

Random valid geometries (kernels 1-4, asymmetric stride/padding/dilation, weight groups and
offset groups that divide the channels, batch 0-3, RoIs anywhere, scopes >= kernels) and
random offsets, some of them huge (+-1e4); outputs and every gradient are compared in float64
at 1e-10 relative. The case builders are the op tests' own (``make_case``, ``roi_case``,
``ps_case``); hypothesis draws their configurations and seeds, and then perturbs the offsets.

Non-finite offsets (NaN, +Inf, -Inf) follow one rule for every op: a sampling position that
is not finite fails every comparison of the box test and counts as outside the image (or the
kernel scope):

- deform_conv2d: the sample (n, offset group, kernel point, y, x) whose dy or dx is not finite
  reads 0, passes no gradient to the input, and both its dy and dx gradients are 0 (also with
  ``border_grad="torchvision"``); equal to the reference with the offset moved far outside.
- deform_kernel_conv2d (global and local): likewise for the kernel point's scope sample.
- deform_roi_pool: a non-finite offset[r, :, p, q] puts every sample of bin (r, p, q) outside
  (``gamma * roi_w * inf`` is inf, or NaN for a zero-size RoI): the bin outputs 0 and passes
  no gradient to the input; its offset and mask gradients are 0.
- deform_psroi_pool: a non-finite offset[r, 2*cls:2*cls+2, i, j] empties every bin of class
  cls that reads part (i, j): those bins output 0 (no valid sample) and pass no gradient; the
  gradient of that part's offsets is 0.

In every case the outputs and gradients stay finite when the other inputs are finite.

The GPU path (CuPy arrays, float64 and float32) is fuzzed against the CPU path on the same
inputs, the same way: every draw of every op, huge and non-finite offsets included, with the
backward in its default or its deterministic mode; where a non-finite offset empties a sample
or a bin, both paths give exactly 0.

``CUDEFORM_FUZZ_SCALE=k`` multiplies every example count by k (default 1, which keeps CI within
minutes); the GPU proof runs thousands of cases per op this way (``.ci/fuzz``).
"""

import os

import numpy as np
import pytest

import cudeform
import reference as ref
import test_deform_conv as tdc
import test_deform_kernel_conv as tdk
import test_deform_roi_pool as tdr
from helpers import rel_err, to_numpy

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOL = 1e-10
FAR = 1e6  # an offset that puts any sample far outside every image / scope of these tests


SCALE = int(os.environ.get("CUDEFORM_FUZZ_SCALE", "1"))


def fuzz(n):
    """Reproducible settings: derandomised, no example database, no deadline; n examples
    times CUDEFORM_FUZZ_SCALE."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


seeds = st.integers(0, 2**32 - 1)
# Batch 0-3; listed so that most examples (and the first, minimal one) have images.
batches = st.sampled_from([2, 1, 3, 2, 1, 0])
images = st.sampled_from([2, 1, 3])  # for the non-finite tests, where an empty batch checks nothing
# Fraction of the offsets replaced by huge values (+-1e4 or uniform in (-1e4, 1e4)).
huge_fractions = st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])
# Fraction of the offsets made non-finite (at least one is); 1.0: all of them.
nonfinite_fractions = st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 1.0])


def inject_huge(rng, offset, fraction):
    if offset is None or fraction == 0.0:
        return offset
    offset = offset.copy()
    hit = rng.random(offset.shape) < fraction
    pool = np.concatenate([[1e4, -1e4], rng.uniform(-1e4, 1e4, 8)])
    offset[hit] = rng.choice(pool, hit.sum())
    return offset


def inject_nonfinite(rng, offset, fraction):
    """A copy with a random fraction (at least one entry) set to NaN, +Inf or -Inf, and the
    boolean map of the entries hit."""
    offset = offset.copy()
    hit = rng.random(offset.shape) < fraction
    if offset.size:
        hit.flat[rng.integers(offset.size)] = True
    offset[hit] = rng.choice([np.nan, np.inf, -np.inf], hit.sum())
    return offset, hit


def assert_close(got, want, field=""):
    if want is None:
        assert got is None, field
        return
    assert got is not None, field
    assert got.shape == want.shape, (field, got.shape, want.shape)
    assert np.isfinite(got).all(), field
    assert rel_err(got, want) < TOL, (field, rel_err(got, want))


def divisor_pair(draw, limit=3):
    """(a, b, channels): two group counts and a channel count both divide."""
    a = draw(st.integers(1, limit))
    b = draw(st.integers(1, limit))
    mult = draw(st.integers(1, 2))
    return a, b, int(np.lcm(a, b)) * mult


@st.composite
def conv_geometry(draw):
    """kernel, stride, padding, dilation and a spatial size with at least one output."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    size = []
    for k, p, d in zip(kernel, padding, dilation):
        need = max(1, d * (k - 1) + 1 - 2 * p)
        size.append(need + draw(st.integers(0, 4)))
    return dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, H=size[0], W=size[1])


# --------------------------------------------------------------------------------------------
# deform_conv2d
# --------------------------------------------------------------------------------------------

@st.composite
def conv_cases(draw, batch=batches):
    groups, G, C_in = divisor_pair(draw)
    cfg = dict(draw(conv_geometry()), N=draw(batch), C_in=C_in, groups=groups, G=G,
               C_out=groups * draw(st.integers(1, 2)))
    mask, bias = draw(st.booleans()), draw(st.booleans())
    spread = draw(st.sampled_from([0.5, 3.0, 20.0]))
    seed = draw(seeds)
    args, geo = tdc.make_case(cfg, seed=seed, mask=mask, bias=bias, spread=spread)
    rng = np.random.default_rng(seed + 1)
    if draw(st.booleans()):  # integer offsets: samples exactly on the kinks and on h = -1
        args["offset"] = np.round(args["offset"])
    args["offset"] = inject_huge(rng, args["offset"], draw(huge_fractions))
    border_grad = draw(st.sampled_from(["torchvision", "mmcv"]))
    grad_out = rng.standard_normal((cfg["N"], cfg["C_out"], *tdc.out_size(cfg)))
    return args, geo, border_grad, grad_out


def check_conv(args, geo, border_grad, grad_out, ref_args=None):
    ref_args = args if ref_args is None else ref_args
    pos, kw = tdc.split(args)
    rpos, rkw = tdc.split(ref_args)
    out = cudeform.deform_conv2d(*pos, **kw, **geo)
    assert_close(out, ref.deform_conv2d(*rpos, **rkw, **geo), "output")
    grads = cudeform.deform_conv2d_backward(grad_out, *pos, **kw, **geo, border_grad=border_grad)
    want = ref.deform_conv2d_backward(grad_out, *rpos, **rkw, **geo, border_grad=border_grad)
    for field, got, expected in zip(grads._fields, grads, want):
        assert_close(got, expected, field)
    return grads


@fuzz(40)
@given(conv_cases())
def test_fuzz_deform_conv2d(case):
    check_conv(*case)


@fuzz(25)
@given(conv_cases(images), nonfinite_fractions, seeds)
def test_fuzz_deform_conv2d_nonfinite_offsets(case, fraction, seed):
    args, geo, border_grad, grad_out = case
    rng = np.random.default_rng(seed)
    bad, hit = inject_nonfinite(rng, args["offset"], fraction)
    far = np.where(hit, FAR, args["offset"])
    grads = check_conv(dict(args, offset=bad), geo, border_grad, grad_out, ref_args=dict(args, offset=far))
    assert not grads.offset[hit].any()


# --------------------------------------------------------------------------------------------
# deform_kernel_conv2d (global and local)
# --------------------------------------------------------------------------------------------

@st.composite
def dk_cases(draw, batch=batches):
    groups, G, C_out = divisor_pair(draw)
    geom = draw(conv_geometry())
    scope = tuple(k + draw(st.integers(0, 2)) for k in geom["kernel"])
    cfg = dict(geom, N=draw(batch), C_in=groups * draw(st.integers(1, 2)), C_out=C_out,
               groups=groups, G=G, scope=scope)
    mode = draw(st.sampled_from(tdk.MODES))
    seed = draw(seeds)
    args, geo = tdk.make_case(cfg, mode, seed=seed, bias=draw(st.booleans()))
    rng = np.random.default_rng(seed + 1)
    if draw(st.booleans()):
        args["kernel_offset"] = np.round(args["kernel_offset"] * 2) / 2  # kinks and half-integer centres
    args["kernel_offset"] = inject_huge(rng, args["kernel_offset"], draw(huge_fractions))
    return args, geo, tdk.grad_output_for(cfg, seed + 2)


def check_dk(args, geo, grad_out, ref_args=None):
    ref_args = args if ref_args is None else ref_args
    out = cudeform.deform_kernel_conv2d(**args, **geo)
    assert_close(out, ref.deform_kernel_conv2d(*tdk.positional(ref_args), **geo), "output")
    grads = cudeform.deform_kernel_conv2d_backward(grad_out, **args, **geo)
    want = ref.deform_kernel_conv2d_backward(grad_out, *tdk.positional(ref_args), **geo)
    for field, got, expected in zip(grads._fields, grads, want):
        assert_close(got, expected, field)
    return grads


@fuzz(40)
@given(dk_cases())
def test_fuzz_deform_kernel_conv2d(case):
    check_dk(*case)


@fuzz(25)
@given(dk_cases(images), nonfinite_fractions, seeds)
def test_fuzz_deform_kernel_conv2d_nonfinite_offsets(case, fraction, seed):
    args, geo, grad_out = case
    rng = np.random.default_rng(seed)
    bad, hit = inject_nonfinite(rng, args["kernel_offset"], fraction)
    far = np.where(hit, FAR, args["kernel_offset"])
    grads = check_dk(dict(args, kernel_offset=bad), geo, grad_out, ref_args=dict(args, kernel_offset=far))
    assert not grads.kernel_offset[hit].any()


# --------------------------------------------------------------------------------------------
# deform_roi_pool and deform_psroi_pool
# --------------------------------------------------------------------------------------------

@st.composite
def wild_roi(draw, height, width, scale):
    """A RoI row anywhere: inside, across a border, fully outside, or of zero size."""
    img_h, img_w = height / scale, width / scale
    x1 = draw(st.floats(-2 * img_w, 3 * img_w, allow_nan=False))
    y1 = draw(st.floats(-2 * img_h, 3 * img_h, allow_nan=False))
    w = draw(st.sampled_from([0.0, 0.0, 1.0])) * draw(st.floats(0, 1.5 * img_w, allow_nan=False))
    h = draw(st.sampled_from([0.0, 1.0, 1.0])) * draw(st.floats(0, 1.5 * img_h, allow_nan=False))
    return [x1, y1, x1 + w, y1 + h]


def add_wild_rois(draw, rois, height, width, scale):
    for r in range(draw(st.integers(0, 2))):
        rois[r, 1:] = draw(wild_roi(height, width, scale))


@st.composite
def roi_cases(draw, with_offset=st.booleans()):
    ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    geo = dict(output_size=(ph, pw), spatial_scale=draw(st.sampled_from([0.5, 0.75, 1.0, 2.0])),
               sampling_ratio=draw(st.integers(0, 3)), gamma=draw(st.sampled_from([0.1, 0.3, 1.0])))
    cfg = dict(N=draw(st.integers(1, 3)), C=draw(st.integers(1, 3)), H=draw(st.integers(1, 6)),
               W=draw(st.integers(1, 6)), R=draw(st.integers(4, 7)), geo=geo)
    seed = draw(seeds)
    args, geo = tdr.roi_case(cfg, seed=seed, offset=draw(with_offset), mask=draw(st.booleans()))
    add_wild_rois(draw, args["rois"], cfg["H"], cfg["W"], geo["spatial_scale"])
    rng = np.random.default_rng(seed + 1)
    args["offset"] = inject_huge(rng, args["offset"], draw(huge_fractions))
    grad_out = rng.standard_normal((cfg["R"], cfg["C"], ph, pw))
    return args, geo, grad_out


@st.composite
def ps_cases(draw, with_offset=st.booleans()):
    classes = draw(st.integers(1, 2))
    pooled = draw(st.integers(1, 3))
    geo = dict(output_dim=classes * draw(st.integers(1, 2)), pooled_size=pooled,
               group_size=draw(st.integers(1, 3)), part_size=draw(st.sampled_from([None, 1, 2, 3, 4])),
               sample_per_part=draw(st.integers(1, 3)), spatial_scale=draw(st.sampled_from([0.5, 0.75, 1.0])),
               trans_std=draw(st.sampled_from([0.1, 0.3])))
    cfg = dict(N=draw(st.integers(1, 3)), H=draw(st.integers(1, 6)), W=draw(st.integers(1, 6)),
               R=draw(st.integers(4, 6)), classes=classes, geo=geo)
    seed = draw(seeds)
    args, geo = tdr.ps_case(cfg, seed=seed, offset=draw(with_offset))
    add_wild_rois(draw, args["rois"], cfg["H"], cfg["W"], geo["spatial_scale"])
    rng = np.random.default_rng(seed + 1)
    args["offset"] = inject_huge(rng, args["offset"], draw(huge_fractions))
    grad_out = rng.standard_normal((cfg["R"], geo["output_dim"], pooled, pooled))
    return args, geo, grad_out


def check_pool(op, args, geo, grad_out, ref_args=None, dead=None):
    """Compare op's forward and backward with the reference on ref_args; ``dead`` (a boolean
    map over the output) marks bins that must be 0 and pass no gradient."""
    forward, backward, ref_forward, ref_backward, call = tdr.OPS[op]
    ref_args = args if ref_args is None else ref_args
    pos, kw = call(args)
    rpos, rkw = call(ref_args)
    want = ref_forward(*rpos, **rkw, **geo)
    ref_grad_out = grad_out
    if dead is not None:
        want = np.where(dead, 0.0, want)
        ref_grad_out = np.where(dead, 0.0, grad_out)
    assert_close(forward(*pos, **kw, **geo), want, "output")
    grads = backward(grad_out, *pos, **kw, **geo)
    expected = ref_backward(ref_grad_out, *rpos, **rkw, **geo)
    return grads, expected


@fuzz(35)
@given(roi_cases())
def test_fuzz_deform_roi_pool(case):
    grads, expected = check_pool("roi", *case)
    for field, got, want in zip(grads._fields, grads, expected):
        assert_close(got, want, field)


@fuzz(30)
@given(ps_cases())
def test_fuzz_deform_psroi_pool(case):
    grads, expected = check_pool("psroi", *case)
    for field, got, want in zip(grads._fields, grads, expected):
        assert_close(got, want, field)


def roi_dead_bins(hit):
    """(R, 1, ph, pw): the bins with a non-finite offset."""
    return hit.any(axis=1, keepdims=True)


@fuzz(25)
@given(roi_cases(st.just(True)), nonfinite_fractions, seeds)
def test_fuzz_deform_roi_pool_nonfinite_offsets(case, fraction, seed):
    args, geo, grad_out = case
    rng = np.random.default_rng(seed)
    bad, hit = inject_nonfinite(rng, args["offset"], fraction)
    dead_bins = roi_dead_bins(hit)
    dead = np.broadcast_to(dead_bins, grad_out.shape)
    grads, expected = check_pool("roi", dict(args, offset=bad), geo, grad_out,
                                 ref_args=dict(args, offset=np.where(hit, 0.0, args["offset"])), dead=dead)
    assert_close(grads.input, expected[0], "input")
    assert_close(grads.offset, np.where(dead_bins, 0.0, expected[1]), "offset")
    if args["mask"] is not None:
        assert_close(grads.mask, np.where(dead_bins, 0.0, expected[2]), "mask")


def ps_dead_bins(hit, geo):
    """(R, output_dim, k, k): the bins whose class's offsets at their part are not finite."""
    R, two_classes, part, _ = hit.shape
    k, output_dim = geo["pooled_size"], geo["output_dim"]
    per_class = output_dim // (two_classes // 2)
    bad_part = hit.reshape(R, two_classes // 2, 2, part, part).any(axis=2)  # (R, classes, part, part)
    cls = np.arange(output_dim) // per_class
    idx = np.floor(np.arange(k) / k * part).astype(int)
    return bad_part[:, cls][:, :, idx][:, :, :, idx], bad_part


@fuzz(25)
@given(ps_cases(st.just(True)), nonfinite_fractions, seeds)
def test_fuzz_deform_psroi_pool_nonfinite_offsets(case, fraction, seed):
    args, geo, grad_out = case
    rng = np.random.default_rng(seed)
    bad, hit = inject_nonfinite(rng, args["offset"], fraction)
    dead, bad_part = ps_dead_bins(hit, geo)
    grads, expected = check_pool("psroi", dict(args, offset=bad), geo, grad_out,
                                 ref_args=dict(args, offset=np.where(hit, 0.0, args["offset"])), dead=dead)
    assert_close(grads.input, expected[0], "input")
    dead_offsets = np.repeat(bad_part, 2, axis=1)  # both channels of a class's bad part
    assert_close(grads.offset, np.where(dead_offsets, 0.0, expected[1]), "offset")


# --------------------------------------------------------------------------------------------
# The GPU path against the CPU path
# --------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
gpu_dtypes = pytest.mark.parametrize("dtype", ["float64", "float32"])
# Both paths compute in the inputs' dtype: they differ by the order of sums and by rounding.
GPU_TOL = {"float64": TOL, "float32": 1e-4}


def dk_call(args):
    """(positional, keyword) arguments of deform_kernel_conv2d from a case's dict."""
    return (), args


def both_paths(forward, backward, call, args, geo, grad_out, dtype, **backward_kw):
    """``forward`` and ``backward`` on NumPy (the CPU path) and on CuPy (the GPU path) arrays of
    ``dtype`` holding the same values. Every result is finite on both and agrees within
    GPU_TOL; returns {"output" or gradient field: (CPU result, GPU result as NumPy)}."""
    import cupy

    results = {}
    for xp in (np, cupy):
        pos, kw = call(tdc.on(xp, args, dtype))
        out = forward(*pos, **kw, **geo)
        grads = backward(xp.asarray(grad_out.astype(dtype)), *pos, **kw, **geo, **backward_kw)
        for field, value in [("output", out), *zip(grads._fields, grads)]:
            results.setdefault(field, []).append(to_numpy(value))
    for field, (cpu, on_gpu) in results.items():
        if cpu is None:
            assert on_gpu is None, field
            continue
        assert on_gpu.shape == cpu.shape and on_gpu.dtype == cpu.dtype, field
        assert np.isfinite(cpu).all() and np.isfinite(on_gpu).all(), field
        assert rel_err(on_gpu, cpu) < GPU_TOL[dtype], (field, rel_err(on_gpu, cpu))
    return results


def assert_zero_on_both(results, field, where):
    """Both paths give exactly 0 at ``where`` (broadcast to the result's shape)."""
    for path, value in zip(("CPU", "GPU"), results[field]):
        assert not value[np.broadcast_to(where, value.shape)].any(), (field, path)


@gpu
@gpu_dtypes
@fuzz(15)
@given(conv_cases(), st.booleans())
def test_gpu_matches_cpu_deform_conv2d(dtype, case, deterministic):
    args, geo, border_grad, grad_out = case
    both_paths(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, tdc.split, args, geo, grad_out, dtype,
               border_grad=border_grad, deterministic=deterministic)


@gpu
@gpu_dtypes
@fuzz(10)
@given(conv_cases(images), nonfinite_fractions, seeds, st.booleans())
def test_gpu_matches_cpu_deform_conv2d_nonfinite_offsets(dtype, case, fraction, seed, deterministic):
    args, geo, border_grad, grad_out = case
    bad, hit = inject_nonfinite(np.random.default_rng(seed), args["offset"], fraction)
    results = both_paths(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, tdc.split,
                         dict(args, offset=bad), geo, grad_out, dtype, border_grad=border_grad,
                         deterministic=deterministic)
    assert_zero_on_both(results, "offset", hit)


@gpu
@gpu_dtypes
@fuzz(15)
@given(dk_cases(), st.booleans())
def test_gpu_matches_cpu_deform_kernel_conv2d(dtype, case, deterministic):
    args, geo, grad_out = case
    both_paths(cudeform.deform_kernel_conv2d, cudeform.deform_kernel_conv2d_backward, dk_call, args, geo,
               grad_out, dtype, deterministic=deterministic)


@gpu
@gpu_dtypes
@fuzz(10)
@given(dk_cases(images), nonfinite_fractions, seeds)
def test_gpu_matches_cpu_deform_kernel_conv2d_nonfinite_offsets(dtype, case, fraction, seed):
    args, geo, grad_out = case
    bad, hit = inject_nonfinite(np.random.default_rng(seed), args["kernel_offset"], fraction)
    results = both_paths(cudeform.deform_kernel_conv2d, cudeform.deform_kernel_conv2d_backward, dk_call,
                         dict(args, kernel_offset=bad), geo, grad_out, dtype)
    assert_zero_on_both(results, "kernel_offset", hit)


def pool_paths(op, args, geo, grad_out, dtype, deterministic):
    # Position-sensitive pooling rounds RoI corners to integers, so with round spatial scales
    # many samples sit exactly on its box edge (-0.5 or H - 0.5): the draws keep those ties,
    # which the two paths must settle alike (they compute positions in the same arithmetic).
    forward, backward, _, _, call = tdr.OPS[op]
    return both_paths(forward, backward, call, args, geo, grad_out, dtype, deterministic=deterministic)


@gpu
@gpu_dtypes
@fuzz(15)
@given(roi_cases(), st.booleans())
def test_gpu_matches_cpu_deform_roi_pool(dtype, case, deterministic):
    pool_paths("roi", *case, dtype, deterministic)


@gpu
@gpu_dtypes
@fuzz(15)
@given(ps_cases(), st.booleans())
def test_gpu_matches_cpu_deform_psroi_pool(dtype, case, deterministic):
    pool_paths("psroi", *case, dtype, deterministic)


@gpu
@gpu_dtypes
@fuzz(10)
@given(roi_cases(st.just(True)), nonfinite_fractions, seeds, st.booleans())
def test_gpu_matches_cpu_deform_roi_pool_nonfinite_offsets(dtype, case, fraction, seed, deterministic):
    args, geo, grad_out = case
    bad, hit = inject_nonfinite(np.random.default_rng(seed), args["offset"], fraction)
    results = pool_paths("roi", dict(args, offset=bad), geo, grad_out, dtype, deterministic)
    dead_bins = roi_dead_bins(hit)
    for field in ("output", "offset") + (("mask",) if args["mask"] is not None else ()):
        assert_zero_on_both(results, field, dead_bins)


@gpu
@gpu_dtypes
@fuzz(10)
@given(ps_cases(st.just(True)), nonfinite_fractions, seeds, st.booleans())
def test_gpu_matches_cpu_deform_psroi_pool_nonfinite_offsets(dtype, case, fraction, seed, deterministic):
    args, geo, grad_out = case
    bad, hit = inject_nonfinite(np.random.default_rng(seed), args["offset"], fraction)
    results = pool_paths("psroi", dict(args, offset=bad), geo, grad_out, dtype, deterministic)
    dead, bad_part = ps_dead_bins(hit, geo)
    assert_zero_on_both(results, "output", dead)
    assert_zero_on_both(results, "offset", np.repeat(bad_part, 2, axis=1))
