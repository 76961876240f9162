"""deform_roi_pool and deform_psroi_pool, with their backwards, against the naive reference,
finite differences and SPEC.md sections 2 and 3."""

import numpy as np
import pytest

import cudeform
import reference as ref
from helpers import assert_gradcheck, assert_grads_match, rel_err, to_numpy

# Deliberately asymmetric: every pair differs in h and w.
ROI_CONFIGS = {
    "adaptive": dict(N=2, C=3, H=7, W=9, R=10, geo=dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=0,
                                                        gamma=0.1)),
    "fixed": dict(N=1, C=4, H=6, W=5, R=8, geo=dict(output_size=2, spatial_scale=1.0, sampling_ratio=2, gamma=0.3)),
}

PS_CONFIGS = {
    "plain": dict(N=2, H=7, W=8, R=8, classes=1, geo=dict(output_dim=3, pooled_size=3, sample_per_part=2,
                                                          spatial_scale=0.5, trans_std=0.1)),
    "rfcn": dict(N=1, H=6, W=7, R=6, classes=2, geo=dict(output_dim=4, pooled_size=3, group_size=3, part_size=2,
                                                         sample_per_part=3, trans_std=0.2)),
    "coarse": dict(N=2, H=5, W=6, R=5, classes=1, geo=dict(output_dim=2, pooled_size=2, group_size=3, part_size=4,
                                                           sample_per_part=2, spatial_scale=0.75, trans_std=0.3)),
}


def make_rois(rng, n, r, height, width, scale):
    """R >= 4 RoIs in image coordinates: random ones inside and across the border, then one
    fully outside (beyond any offset's reach), one of zero size and one crossing the low
    corner; batch indices in [0, n)."""
    img_h, img_w = height / scale, width / scale
    x1 = rng.uniform(-0.3 * img_w, 1.0 * img_w, r)
    y1 = rng.uniform(-0.3 * img_h, 1.0 * img_h, r)
    x2 = x1 + rng.uniform(0.3 * img_w, 0.9 * img_w, r)
    y2 = y1 + rng.uniform(0.3 * img_h, 0.9 * img_h, r)
    rois = np.stack([rng.integers(0, n, r).astype(np.float64), x1, y1, x2, y2], axis=1)
    rois[-3, 1:] = [3 * img_w, 3 * img_h, 3.5 * img_w, 4 * img_h]
    rois[-2, 1:] = [0.37 * img_w, 0.61 * img_h, 0.37 * img_w, 0.61 * img_h]
    rois[-1, 1:] = [-0.41 * img_w, -0.33 * img_h, 0.29 * img_w, 0.23 * img_h]
    return rois


def roi_case(cfg, *, seed=0, offset=True, mask=True):
    """Random float64 NumPy arguments of deform_roi_pool and its geometry keywords."""
    rng = np.random.default_rng(seed)
    ph, pw = np.broadcast_to(cfg["geo"]["output_size"], 2)
    r = cfg["R"]
    args = dict(
        input=rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"])),
        rois=make_rois(rng, cfg["N"], r, cfg["H"], cfg["W"], cfg["geo"]["spatial_scale"]),
        offset=rng.uniform(-1, 1, (r, 2, ph, pw)) if offset else None,
        mask=rng.uniform(0, 1, (r, 1, ph, pw)) if mask else None,
    )
    return args, dict(cfg["geo"])


def ps_case(cfg, *, seed=0, offset=True):
    """Random float64 NumPy arguments of deform_psroi_pool and its geometry keywords."""
    rng = np.random.default_rng(seed)
    geo = dict(cfg["geo"])
    g, part = geo.get("group_size", 1), geo.get("part_size") or geo["pooled_size"]
    scale = geo.get("spatial_scale", 1.0)
    args = dict(
        input=rng.standard_normal((cfg["N"], geo["output_dim"] * g * g, cfg["H"], cfg["W"])),
        rois=make_rois(rng, cfg["N"], cfg["R"], cfg["H"], cfg["W"], scale),
        offset=rng.uniform(-1, 1, (cfg["R"], 2 * cfg["classes"], part, part)) if offset else None,
    )
    return args, geo


def case(op, seed=0, *, roi="adaptive", ps="plain"):
    """A case of either op: (arguments, geometry)."""
    if op == "roi":
        return roi_case(ROI_CONFIGS[roi], seed=seed)
    return ps_case(PS_CONFIGS[ps], seed=seed)


def on(xp, arrays, dtype=np.float64):
    return {k: None if v is None else xp.asarray(v.astype(dtype)) for k, v in arrays.items()}


def output_shape(op, args, geo):
    """The output's shape after its R dimension."""
    if op == "roi":
        return (args["input"].shape[1], *np.broadcast_to(geo["output_size"], 2))
    return (geo["output_dim"], geo["pooled_size"], geo["pooled_size"])


def roi_call(args):
    """(positional, keyword) arguments of deform_roi_pool from a case's dict."""
    return (args["input"], args["rois"], args["offset"]), dict(mask=args["mask"])


def ps_call(args):
    return (args["input"], args["rois"], args["offset"]), {}


OPS = {
    "roi": (cudeform.deform_roi_pool, cudeform.deform_roi_pool_backward, ref.deform_roi_pool,
            ref.deform_roi_pool_backward, roi_call),
    "psroi": (cudeform.deform_psroi_pool, cudeform.deform_psroi_pool_backward, ref.deform_psroi_pool,
              ref.deform_psroi_pool_backward, ps_call),
}


def cases():
    """(op, args, geometry) of every configuration and choice of optional arguments."""
    for name, cfg in ROI_CONFIGS.items():
        for offset, mask in [(True, True), (True, False), (False, False), (False, True)]:
            yield pytest.param("roi", *roi_case(cfg, offset=offset, mask=mask),
                               id=f"roi-{name}-offset{int(offset)}-mask{int(mask)}")
    for name, cfg in PS_CONFIGS.items():
        for offset in (True, False):
            yield pytest.param("psroi", *ps_case(cfg, offset=offset), id=f"psroi-{name}-offset{int(offset)}")


@pytest.mark.parametrize("op,args,geo", list(cases()))
def test_forward_matches_reference(xp, op, args, geo):
    forward, _, ref_forward, _, call = OPS[op]
    pos, kw = call(on(xp, args))
    out = forward(*pos, **kw, **geo)
    assert type(out) is type(pos[0])
    expected = ref_forward(*call(args)[0], **call(args)[1], **geo)
    assert out.shape == expected.shape
    assert np.abs(expected).max() > 0
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("op,args,geo", list(cases()))
def test_backward_matches_reference(xp, op, args, geo):
    forward, backward, ref_forward, ref_backward, call = OPS[op]
    pos, kw = call(args)
    grad_out = np.random.default_rng(1).standard_normal(ref_forward(*pos, **kw, **geo).shape)
    gpos, gkw = call(on(xp, args))
    grads = backward(xp.asarray(grad_out), *gpos, **gkw, **geo)
    expected = ref_backward(grad_out, *pos, **kw, **geo)
    assert_grads_match(grads, expected)


@pytest.mark.parametrize("name", ROI_CONFIGS)
def test_gradcheck_roi(xp, name):
    args, geo = roi_case(ROI_CONFIGS[name], seed=3)
    assert_gradcheck(xp, cudeform.deform_roi_pool, cudeform.deform_roi_pool_backward, on(xp, args), geo,
                     {"input", "offset", "mask"})


@pytest.mark.parametrize("name", PS_CONFIGS)
def test_gradcheck_psroi(xp, name):
    args, geo = ps_case(PS_CONFIGS[name], seed=4)
    assert_gradcheck(xp, cudeform.deform_psroi_pool, cudeform.deform_psroi_pool_backward, on(xp, args), geo,
                     {"input", "offset"})


def test_clamped_band_has_no_offset_gradient(xp):
    """A 1x1 bin whose only sample sits in the band (H-1, H] below the last row: it reads the
    last row, moves with x but not with y. mmcv would pull it along y by the slope it sees."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 4, 6))
    # start = coord - 0.5: the sample of a 1x1 grid is the RoI's centre, (h, w) = (3.4, 2.3).
    rois = np.array([[0.0, 2.3, 3.4, 3.3, 4.4]])
    offset = np.zeros((1, 2, 1, 1))
    geo = dict(output_size=1, sampling_ratio=1)
    out = cudeform.deform_roi_pool(xp.asarray(x), xp.asarray(rois), xp.asarray(offset), **geo)
    np.testing.assert_allclose(to_numpy(out)[0, :, 0, 0], 0.7 * x[0, :, 3, 2] + 0.3 * x[0, :, 3, 3], rtol=1e-13)
    grad_out = np.array([[[[1.0]], [[-2.0]]]])
    grads = cudeform.deform_roi_pool_backward(xp.asarray(grad_out), xp.asarray(x), xp.asarray(rois),
                                              xp.asarray(offset), **geo)
    gamma_roi = 0.1 * 1.0
    d_w = (x[0, 0, 3, 3] - x[0, 0, 3, 2]) - 2 * (x[0, 1, 3, 3] - x[0, 1, 3, 2])
    np.testing.assert_allclose(to_numpy(grads.offset)[0, :, 0, 0], [gamma_roi * d_w, 0.0], rtol=1e-13, atol=0)


def test_psroi_rounds_halves_away_from_zero(xp):
    """MSRA rounds the RoI corners with C's round(): 1.5 -> 2, -0.5 -> -1 (NumPy's round gives 2, -0)."""
    args, geo = ps_case(PS_CONFIGS["plain"], seed=6, offset=False)
    halves = np.array([[0, 1.5, 2.5, 4.5, 5.5], [1, -0.5, -1.5, 3.5, 2.5]])
    rounded = np.array([[0, 2.0, 3.0, 5.0, 6.0], [1, -1.0, -2.0, 4.0, 3.0]])
    x = xp.asarray(args["input"])
    got = cudeform.deform_psroi_pool(x, xp.asarray(halves), **geo)
    want = cudeform.deform_psroi_pool(x, xp.asarray(rounded), **geo)
    assert np.array_equal(to_numpy(got), to_numpy(want))
    assert rel_err(got, ref.deform_psroi_pool(args["input"], halves, **geo)) < 1e-12


@pytest.mark.parametrize("op", OPS)
def test_zero_rois(xp, op):
    forward, backward, _, _, call = OPS[op]
    args, geo = case(op, ps="rfcn")
    args = {k: None if v is None else v[:0] if k != "input" else v for k, v in args.items()}
    pos, kw = call(on(xp, args))
    out = forward(*pos, **kw, **geo)
    assert out.shape[0] == 0
    grads = backward(xp.zeros(out.shape), *pos, **kw, **geo)
    assert np.array_equal(to_numpy(grads.input), np.zeros(args["input"].shape))
    for field in grads._fields[1:]:
        assert getattr(grads, field).shape[0] == 0, field


def test_empty_batch_and_channels(xp):
    x = xp.zeros((0, 3, 4, 4))
    out = cudeform.deform_roi_pool(x, xp.zeros((0, 5)), output_size=2)
    assert out.shape == (0, 3, 2, 2)
    out = cudeform.deform_roi_pool(xp.zeros((1, 0, 4, 4)), xp.asarray([[0.0, 0, 0, 2, 2]]), output_size=2)
    assert out.shape == (1, 0, 2, 2)


def test_rois_outside_or_empty_pool_zeros(xp):
    """Zero-size RoIs with sampling_ratio=0 have no samples (count = max(0, 1)), and RoIs far
    outside the image see nothing: zero outputs and gradients, no NaN."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, 5, 6))
    rois = np.array([[0, 3.0, 2.0, 3.0, 2.0], [0, 4.0, 1.0, 4.0, 3.0], [0, 40.0, 30.0, 50.0, 35.0],
                     [0, -30.0, 1.0, -20.0, 2.0], [0, 3.0, 3.0, 1.0, 1.0]])
    offset = rng.uniform(-1, 1, (5, 2, 2, 2))
    mask = rng.uniform(0, 1, (5, 1, 2, 2))
    a = [xp.asarray(v) for v in (x, rois, offset)]
    out = cudeform.deform_roi_pool(*a, output_size=2, mask=xp.asarray(mask))
    assert np.array_equal(to_numpy(out), np.zeros((5, 2, 2, 2)))
    grads = cudeform.deform_roi_pool_backward(xp.ones((5, 2, 2, 2)), *a, output_size=2, mask=xp.asarray(mask))
    for g in grads:
        assert np.array_equal(to_numpy(g), np.zeros(g.shape))


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs_and_caller_arrays_unchanged(xp, op):
    forward, backward, ref_forward, ref_backward, call = OPS[op]
    args, geo = case(op, 8, roi="fixed", ps="rfcn")
    strided = {}
    for k, v in on(xp, args).items():
        # Same values, reversed memory order of the last two axes.
        strided[k] = None if v is None else xp.ascontiguousarray(v.swapaxes(-1, -2)).swapaxes(-1, -2)
    before = {k: None if v is None else to_numpy(v).copy() for k, v in strided.items()}
    pos, kw = call(strided)
    expected = ref_forward(*call(args)[0], **call(args)[1], **geo)
    assert rel_err(forward(*pos, **kw, **geo), expected) < 1e-12
    grad_out = xp.asarray(np.random.default_rng(9).standard_normal(expected.shape)[..., ::-1])  # negative strides
    grad_out_before = to_numpy(grad_out).copy()
    grads = backward(grad_out, *pos, **kw, **geo)
    want = ref_backward(grad_out_before, *call(args)[0], **call(args)[1], **geo)
    for field, got, w in zip(grads._fields, grads, want):
        assert rel_err(got, w) < 1e-10, field
    for k, v in strided.items():
        if v is not None:
            assert np.array_equal(to_numpy(v), before[k]), k
    assert np.array_equal(to_numpy(grad_out), grad_out_before)


@pytest.mark.parametrize("op", OPS)
def test_float32_close_to_float64(xp, op):
    forward, backward, ref_forward, ref_backward, call = OPS[op]
    args, geo = case(op, 10, ps="rfcn")
    # The reference sees the float32-rounded values, so only the arithmetic differs.
    exact = {k: None if v is None else v.astype(np.float32).astype(np.float64) for k, v in args.items()}
    pos, kw = call(on(xp, args, np.float32))
    out = forward(*pos, **kw, **geo)
    assert out.dtype == np.float32
    assert rel_err(out, ref_forward(*call(exact)[0], **call(exact)[1], **geo)) < 1e-5
    grad_out = np.random.default_rng(11).standard_normal(out.shape).astype(np.float32)
    grads = backward(xp.asarray(grad_out), *pos, **kw, **geo)
    want = ref_backward(grad_out, *call(exact)[0], **call(exact)[1], **geo)
    assert_grads_match(grads, want, tol=1e-5, dtype=np.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_repeatable(xp, op, deterministic):
    # Bitwise on the CPU in both modes; the GPU's default mode adds with float atomics in any
    # order, so there only the deterministic mode is held to every bit.
    bitwise = xp is np or deterministic
    _, backward, ref_forward, _, call = OPS[op]
    args, geo = case(op, 12)
    grad_out = xp.asarray(np.random.default_rng(13).standard_normal(
        ref_forward(*call(args)[0], **call(args)[1], **geo).shape))
    pos, kw = call(on(xp, args))
    first = backward(grad_out, *pos, **kw, **geo, deterministic=deterministic)
    for _ in range(3):
        again = backward(grad_out, *pos, **kw, **geo, deterministic=deterministic)
        for a, b in zip(first, again):
            if bitwise:
                assert np.array_equal(to_numpy(a), to_numpy(b))
            else:
                assert rel_err(a, to_numpy(b)) < 1e-13
