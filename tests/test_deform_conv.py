"""deform_conv2d and its backward against the naive reference, finite differences and SPEC.md."""

import numpy as np
import pytest

import cudeform
import reference as ref
from helpers import assert_gradcheck, assert_grads_match, rel_err, to_numpy

# Deliberately asymmetric configurations: every pair differs in h and w.
CONFIGS = {
    "grouped": dict(N=2, C_in=6, C_out=4, groups=2, G=3, kernel=(3, 2), H=7, W=8,
                    stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
    "plain3x3": dict(N=1, C_in=4, C_out=6, groups=1, G=2, kernel=(3, 3), H=5, W=6,
                     stride=1, padding=1, dilation=1),
    "depthwise": dict(N=2, C_in=4, C_out=4, groups=4, G=1, kernel=(1, 3), H=4, W=9,
                      stride=(1, 2), padding=(0, 2), dilation=(1, 3)),
}


def out_size(cfg):
    s, p, d = (np.broadcast_to(cfg[k], 2) for k in ("stride", "padding", "dilation"))
    kh, kw = cfg["kernel"]
    return ((cfg["H"] + 2 * p[0] - (d[0] * (kh - 1) + 1)) // s[0] + 1,
            (cfg["W"] + 2 * p[1] - (d[1] * (kw - 1) + 1)) // s[1] + 1)


def make_case(cfg, *, seed=0, mask=True, bias=True, spread=3.0):
    """Random float64 NumPy inputs; offsets uniform in (-spread, spread) so samples land
    inside, on the border band and outside the image, never on an integer."""
    rng = np.random.default_rng(seed)
    kh, kw = cfg["kernel"]
    ho, wo = out_size(cfg)
    n, g = cfg["N"], cfg["G"]
    args = dict(
        input=rng.standard_normal((n, cfg["C_in"], cfg["H"], cfg["W"])),
        offset=rng.uniform(-spread, spread, (n, 2 * g * kh * kw, ho, wo)),
        weight=rng.standard_normal((cfg["C_out"], cfg["C_in"] // cfg["groups"], kh, kw)),
        bias=rng.standard_normal(cfg["C_out"]) if bias else None,
        mask=rng.uniform(0.0, 1.0, (n, g * kh * kw, ho, wo)) if mask else None,
    )
    geometry = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
    return args, geometry


def on(xp, arrays, dtype=np.float64):
    return {k: None if v is None else xp.asarray(v.astype(dtype)) for k, v in arrays.items()}


def split(args):
    """(positional, keyword) arguments of deform_conv2d from a case's dict."""
    return (args["input"], args["offset"], args["weight"], args["bias"]), dict(mask=args["mask"])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mask,bias", [(True, True), (False, False), (True, False)])
def test_forward_matches_reference(xp, name, mask, bias):
    args, geo = make_case(CONFIGS[name], mask=mask, bias=bias)
    pos, kw = split(on(xp, args))
    out = cudeform.deform_conv2d(*pos, **kw, **geo)
    assert type(out) is type(pos[0])
    expected = ref.deform_conv2d(*split(args)[0], **split(args)[1], **geo)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("border_grad", ["torchvision", "mmcv"])
@pytest.mark.parametrize("mask,bias", [(True, True), (False, False)])
def test_backward_matches_reference(xp, name, border_grad, mask, bias):
    args, geo = make_case(CONFIGS[name], mask=mask, bias=bias, seed=1)
    rng = np.random.default_rng(2)
    grad_out = rng.standard_normal((args["input"].shape[0], args["weight"].shape[0], *out_size(CONFIGS[name])))
    pos, kw = split(on(xp, args))
    grads = cudeform.deform_conv2d_backward(xp.asarray(grad_out), *pos, **kw, **geo, border_grad=border_grad)
    expected = ref.deform_conv2d_backward(grad_out, *split(args)[0], **split(args)[1], **geo,
                                          border_grad=border_grad)
    assert_grads_match(grads, expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradcheck(xp, name):
    args, geo = make_case(CONFIGS[name], seed=3)
    assert_gradcheck(xp, cudeform.deform_conv2d, cudeform.deform_conv2d_backward, on(xp, args), geo,
                     {"input", "offset", "weight", "bias", "mask"})


@pytest.mark.parametrize("n", [0, 1, 33])
def test_batch_sizes(xp, n):
    cfg = dict(CONFIGS["grouped"], N=n, H=5, W=4)
    args, geo = make_case(cfg, seed=4)
    pos, kw = split(on(xp, args))
    out = cudeform.deform_conv2d(*pos, **kw, **geo)
    assert out.shape == (n, cfg["C_out"], *out_size(cfg))
    np.testing.assert_allclose(to_numpy(out), ref.deform_conv2d(*split(args)[0], **split(args)[1], **geo),
                               rtol=1e-10, atol=1e-12)
    grad_out = xp.asarray(np.random.default_rng(5).standard_normal(out.shape))
    grads = cudeform.deform_conv2d_backward(grad_out, *pos, **kw, **geo)
    expected = ref.deform_conv2d_backward(to_numpy(grad_out), *split(args)[0], **split(args)[1], **geo)
    for field, got, want in zip(grads._fields, grads, expected):
        assert got.shape == want.shape, field
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-10, atol=1e-12, err_msg=field)


def test_chunked_batch_equals_single_chunk(monkeypatch):
    """Forcing one image per chunk changes no bit of the results."""
    from cudeform.cpu import deform_conv as cpu

    args, geo = make_case(dict(CONFIGS["grouped"], N=5), seed=6)
    pos, kw = split(args)
    grad_out = np.random.default_rng(7).standard_normal((5, 4, *out_size(CONFIGS["grouped"])))
    whole = cudeform.deform_conv2d(*pos, **kw, **geo), cudeform.deform_conv2d_backward(grad_out, *pos, **kw, **geo)
    monkeypatch.setattr(cpu, "COLUMNS_BYTES", 1)
    chunked = cudeform.deform_conv2d(*pos, **kw, **geo), cudeform.deform_conv2d_backward(grad_out, *pos, **kw, **geo)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-13, atol=1e-13)
    for a, b in zip(chunked[1], whole[1]):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_non_contiguous_inputs(xp):
    args, geo = make_case(CONFIGS["grouped"], seed=8)
    expected = ref.deform_conv2d(*split(args)[0], **split(args)[1], **geo)
    strided = {}
    for k, v in on(xp, args).items():
        if v is None:
            strided[k] = v
            continue
        # Same values: every other element of a larger array (1-D), or the last two axes in
        # reversed memory order.
        strided[k] = (xp.repeat(v, 2)[::2] if v.ndim == 1
                      else xp.ascontiguousarray(v.swapaxes(-1, -2)).swapaxes(-1, -2))
        assert not strided[k].flags.c_contiguous
    pos, kw = split(strided)
    assert rel_err(cudeform.deform_conv2d(*pos, **kw, **geo), expected) < 1e-12
    sliced = xp.asarray(np.repeat(args["input"], 2, axis=1))[:, ::2]  # a channel stride of 2
    assert rel_err(cudeform.deform_conv2d(sliced, *pos[1:], **kw, **geo), expected) < 1e-12


def test_float32_close_to_float64(xp):
    args, geo = make_case(CONFIGS["plain3x3"], seed=9)
    pos, kw = split(on(xp, args, np.float32))
    out = cudeform.deform_conv2d(*pos, **kw, **geo)
    assert out.dtype == np.float32
    assert rel_err(out, ref.deform_conv2d(*split(args)[0], **split(args)[1], **geo)) < 1e-5
    grad_out = np.random.default_rng(10).standard_normal(out.shape)
    grads = cudeform.deform_conv2d_backward(xp.asarray(grad_out, np.float32), *pos, **kw, **geo)
    expected = ref.deform_conv2d_backward(grad_out, *split(args)[0], **split(args)[1], **geo)
    assert_grads_match(grads, expected, tol=1e-5, dtype=np.float32)


def test_border_conventions_at_h_minus_one(xp):
    """A sample at exactly h = -1 reads 0; torchvision still pulls it into the image, mmcv does not.

    One 2x2 image [[1, 2], [3, 4]], a 1x1 kernel of weight 1 and grad_output 1. At output (0, 0)
    the offset (dy, dx) = (-1, 0.5) puts the sample at (h, w) = (-1, 0.5). From the right,
    d/dh = (1 - 0.5) * (x[0, 0] - 0) + 0.5 * (x[0, 1] - 0) = 0.5 + 1 = 1.5 and d/dw = 0 (row -1
    is all zeros). The other three outputs sample the pixels themselves, away from h = -1.
    """
    x = xp.asarray([[[[1.0, 2.0], [3.0, 4.0]]]])
    w = xp.ones((1, 1, 1, 1))
    offset = xp.zeros((1, 2, 2, 2))
    offset[0, 0, 0, 0] = -1.0
    offset[0, 1, 0, 0] = 0.5
    out = cudeform.deform_conv2d(x, offset, w)
    np.testing.assert_array_equal(to_numpy(out), [[[[0.0, 2.0], [3.0, 4.0]]]])
    grad_out = xp.ones((1, 1, 2, 2))
    tv = cudeform.deform_conv2d_backward(grad_out, x, offset, w, border_grad="torchvision")
    mm = cudeform.deform_conv2d_backward(grad_out, x, offset, w, border_grad="mmcv")
    assert float(tv.offset[0, 0, 0, 0]) == 1.5
    assert float(tv.offset[0, 1, 0, 0]) == 0.0
    assert float(mm.offset[0, 0, 0, 0]) == 0.0
    assert float(mm.offset[0, 1, 0, 0]) == 0.0
    # Everywhere else the conventions agree, and so do the other gradients.
    np.testing.assert_array_equal(to_numpy(tv.offset)[:, :, 1:], to_numpy(mm.offset)[:, :, 1:])
    np.testing.assert_array_equal(to_numpy(tv.offset)[:, :, 0, 1], to_numpy(mm.offset)[:, :, 0, 1])
    for field in ("input", "weight"):
        np.testing.assert_array_equal(to_numpy(getattr(tv, field)), to_numpy(getattr(mm, field)))
    # At (0, 1) the sample sits on pixel (0, 1) = 2: d/dh = x[1, 1] - x[0, 1] = 2, d/dw = 0 - 2.
    assert float(tv.offset[0, 0, 0, 1]) == 2.0
    assert float(tv.offset[0, 1, 0, 1]) == -2.0


def test_mmcv_zero_offset_padding_gives_no_border_offset_gradient(xp):
    """With zero offsets and padding 1, the mmcv convention starts the border points with no
    offset gradient, torchvision's does not."""
    rng = np.random.default_rng(11)
    x = xp.asarray(rng.standard_normal((1, 2, 4, 4)))
    w = xp.asarray(rng.standard_normal((3, 2, 3, 3)))
    offset = xp.zeros((1, 18, 4, 4))
    grad_out = xp.asarray(rng.standard_normal((1, 3, 4, 4)))
    tv = to_numpy(cudeform.deform_conv2d_backward(grad_out, x, offset, w, padding=1).offset)
    mm = to_numpy(cudeform.deform_conv2d_backward(grad_out, x, offset, w, padding=1, border_grad="mmcv").offset)
    # Kernel row 0 (i = 0) of output row 0 samples h = -1: channel 2*k for k in 0..2 is its dy.
    assert np.all(mm[0, 0:6:2, 0, :] == 0.0)
    assert np.any(tv[0, 0:6:2, 0, :] != 0.0)
    assert np.array_equal(tv[0, :, 1:3, 1:3], mm[0, :, 1:3, 1:3])


@pytest.mark.parametrize("deterministic", [False, True])
def test_repeatable(xp, deterministic):
    args, geo = make_case(CONFIGS["grouped"], seed=12)
    pos, kw = split(on(xp, args))
    grad_out = xp.asarray(np.random.default_rng(13).standard_normal((2, 4, *out_size(CONFIGS["grouped"]))))
    # The CPU path is bitwise repeatable in both modes; the GPU's default mode adds with float
    # atomics in any order, so there only the deterministic mode is held to every bit.
    bitwise = xp is np or deterministic
    first = cudeform.deform_conv2d_backward(grad_out, *pos, **kw, **geo, deterministic=deterministic)
    for _ in range(3):
        again = cudeform.deform_conv2d_backward(grad_out, *pos, **kw, **geo, deterministic=deterministic)
        for a, b in zip(first, again):
            if bitwise:
                assert np.array_equal(to_numpy(a), to_numpy(b))
            else:
                assert rel_err(a, to_numpy(b)) < 1e-13


def test_caller_arrays_unchanged(xp):
    args, geo = make_case(CONFIGS["grouped"], seed=14)
    given = on(xp, args)
    before = {k: None if v is None else to_numpy(v).copy() for k, v in given.items()}
    pos, kw = split(given)
    out = cudeform.deform_conv2d(*pos, **kw, **geo)
    grad_out = xp.ones_like(out)
    grad_out_before = to_numpy(grad_out).copy()
    cudeform.deform_conv2d_backward(grad_out, *pos, **kw, **geo)
    for k, v in given.items():
        if v is not None:
            assert np.array_equal(to_numpy(v), before[k]), k
    assert np.array_equal(to_numpy(grad_out), grad_out_before)
