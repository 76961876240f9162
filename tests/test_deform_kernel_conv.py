"""deform_kernel_conv2d (global and local DK) and its backward against the naive reference,
finite differences, ordinary convolution identities and SPEC.md."""

import numpy as np
import pytest

import cudeform
import reference as ref
from helpers import assert_gradcheck, assert_grads_match, rel_err, to_numpy

# Deliberately asymmetric configurations: every pair differs in h and w, and the scopes are
# larger than the kernels by odd and even margins (half-integer and integer centring shifts).
CONFIGS = {
    "grouped": dict(N=2, C_in=4, C_out=6, groups=2, G=3, kernel=(3, 2), scope=(4, 5), H=7, W=8,
                    stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
    "plain": dict(N=1, C_in=3, C_out=4, groups=1, G=2, kernel=(3, 3), scope=(3, 4), H=5, W=6,
                  stride=1, padding=1, dilation=1),
    "depthwise": dict(N=2, C_in=4, C_out=4, groups=4, G=2, kernel=(1, 3), scope=(2, 5), H=4, W=9,
                      stride=(1, 2), padding=(0, 2), dilation=(1, 3)),
}
MODES = ("global", "local")


def out_size(cfg):
    s, p, d = (np.broadcast_to(cfg[k], 2) for k in ("stride", "padding", "dilation"))
    kh, kw = cfg["kernel"]
    return ((cfg["H"] + 2 * p[0] - (d[0] * (kh - 1) + 1)) // s[0] + 1,
            (cfg["W"] + 2 * p[1] - (d[1] * (kw - 1) + 1)) // s[1] + 1)


def offset_shape(cfg, mode):
    channels = 2 * cfg["G"] * cfg["kernel"][0] * cfg["kernel"][1]
    return (cfg["N"], channels) + (out_size(cfg) if mode == "local" else ())


def make_case(cfg, mode, *, seed=0, bias=True):
    """Random float64 NumPy inputs. The offsets spread the samples over the whole scope, its
    border band and outside it; a continuous distribution never lands on an integer kink."""
    rng = np.random.default_rng(seed)
    spread = max(cfg["scope"]) / 2 + 1
    args = dict(
        input=rng.standard_normal((cfg["N"], cfg["C_in"], cfg["H"], cfg["W"])),
        weight=rng.standard_normal((cfg["C_out"], cfg["C_in"] // cfg["groups"], *cfg["scope"])),
        kernel_offset=rng.uniform(-spread, spread, offset_shape(cfg, mode)),
        bias=rng.standard_normal(cfg["C_out"]) if bias else None,
    )
    geometry = dict(kernel_size=cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                    dilation=cfg["dilation"], groups=cfg["groups"])
    return args, geometry


def on(xp, arrays, dtype=np.float64):
    return {k: None if v is None else xp.asarray(v.astype(dtype)) for k, v in arrays.items()}


def positional(args):
    """(input, weight, kernel_offset, bias) of a case, for the reference."""
    return args["input"], args["weight"], args["kernel_offset"], args["bias"]


def grad_output_for(cfg, seed):
    return np.random.default_rng(seed).standard_normal((cfg["N"], cfg["C_out"], *out_size(cfg)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(xp, name, mode, bias):
    args, geo = make_case(CONFIGS[name], mode, bias=bias)
    given = on(xp, args)
    out = cudeform.deform_kernel_conv2d(**given, **geo)
    assert type(out) is type(given["input"])
    expected = ref.deform_kernel_conv2d(*positional(args), **geo)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_backward_matches_reference(xp, name, mode, bias):
    args, geo = make_case(CONFIGS[name], mode, seed=1, bias=bias)
    grad_out = grad_output_for(CONFIGS[name], seed=2)
    grads = cudeform.deform_kernel_conv2d_backward(xp.asarray(grad_out), **on(xp, args), **geo)
    expected = ref.deform_kernel_conv2d_backward(grad_out, *positional(args), **geo)
    assert grads._fields == ("input", "weight", "kernel_offset", "bias")
    assert_grads_match(grads, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_gradcheck(xp, name, mode):
    args, geo = make_case(CONFIGS[name], mode, seed=3)
    assert_gradcheck(xp, cudeform.deform_kernel_conv2d, cudeform.deform_kernel_conv2d_backward, on(xp, args), geo,
                     {"input", "weight", "kernel_offset", "bias"}, rtol=1e-6)


def test_global_equals_local_with_the_same_offsets_everywhere(xp):
    """A local offset that repeats the global one at every position gives the same output and
    gradients; the global offset gradient is the sum of the local one over positions."""
    cfg = CONFIGS["grouped"]
    args, geo = make_case(cfg, "global", seed=4)
    local = dict(args, kernel_offset=np.repeat(np.repeat(args["kernel_offset"][:, :, None, None],
                                                         out_size(cfg)[0], 2), out_size(cfg)[1], 3))
    grad_out = xp.asarray(grad_output_for(cfg, seed=5))
    g_out, l_out = (cudeform.deform_kernel_conv2d(**on(xp, a), **geo) for a in (args, local))
    assert rel_err(g_out, to_numpy(l_out)) < 1e-12
    g, l = (cudeform.deform_kernel_conv2d_backward(grad_out, **on(xp, a), **geo) for a in (args, local))
    for field in ("input", "weight", "bias"):
        assert rel_err(getattr(g, field), to_numpy(getattr(l, field))) < 1e-12, field
    assert rel_err(g.kernel_offset, to_numpy(l.kernel_offset).sum(axis=(2, 3))) < 1e-12


def _conv(xp, x, weight, bias, geo, out_hw, grad_out):
    """An ordinary (grouped) convolution, as deform_conv2d with zero offsets, and its gradients."""
    offset = xp.zeros((x.shape[0], 2 * weight.shape[2] * weight.shape[3], *out_hw))
    conv_geo = {k: geo[k] for k in ("stride", "padding", "dilation")}
    return (cudeform.deform_conv2d(x, offset, weight, bias, **conv_geo),
            cudeform.deform_conv2d_backward(grad_out, x, offset, weight, bias, **conv_geo))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CONFIGS)
def test_zero_offsets_with_the_kernel_as_scope_is_a_convolution(xp, name, mode):
    cfg = dict(CONFIGS[name], scope=CONFIGS[name]["kernel"])
    args, geo = make_case(cfg, mode, seed=6)
    args["kernel_offset"] = np.zeros_like(args["kernel_offset"])
    given = on(xp, args)
    grad_out = xp.asarray(grad_output_for(cfg, seed=7))
    out = cudeform.deform_kernel_conv2d(**given, **geo)
    grads = cudeform.deform_kernel_conv2d_backward(grad_out, **given, **geo)
    conv, conv_grads = _conv(xp, given["input"], given["weight"], given["bias"], geo, out_size(cfg), grad_out)
    assert rel_err(out, to_numpy(conv)) < 1e-12
    for field in ("input", "weight", "bias"):
        assert rel_err(getattr(grads, field), to_numpy(getattr(conv_grads, field))) < 1e-12, field
    # Every sample sits on an integer kink: the offset gradient is the derivative from the right.
    expected = ref.deform_kernel_conv2d_backward(to_numpy(grad_out), *positional(args), **geo)
    assert rel_err(grads.kernel_offset, expected[2]) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_offset_gradient_at_the_scope_border_is_taken_from_the_right(xp, mode):
    """A 1x1 kernel centred in the 2x2 scope [[1, 2], [3, 4]] reads it at (0.5 + dh, 0.5 + dw).
    With (dh, dw) = (-1.5, 0) the sample sits at (h, w) = (-1, 0.5) and reads 0; from the right,
    d/dh = (1 - 0.5) * 1 + 0.5 * 2 = 1.5 (times the input, 3) and d/dw = 0 (row -1 is zeros)."""
    x = xp.full((1, 1, 1, 1), 3.0)
    weight = xp.asarray([[[[1.0, 2.0], [3.0, 4.0]]]])
    offset = xp.asarray([[-1.5, 0.0]]).reshape((1, 2) + (1, 1) * (mode == "local"))
    assert float(cudeform.deform_kernel_conv2d(x, weight, offset, kernel_size=1).reshape(())) == 0.0
    grads = cudeform.deform_kernel_conv2d_backward(xp.ones((1, 1, 1, 1)), x, weight, offset, kernel_size=1)
    np.testing.assert_array_equal(to_numpy(grads.kernel_offset).reshape(2), [4.5, 0.0])
    np.testing.assert_array_equal(to_numpy(grads.weight), np.zeros((1, 1, 2, 2)))


@pytest.mark.parametrize("mode", MODES)
def test_integer_offsets_read_a_shifted_sub_kernel(xp, mode):
    """Kernel (3, 2) in a (5, 6) scope sits at rows 1..3, columns 2..3. An integer offset
    (dh, dw) moves it to rows 1+dh.., columns 2+dw..: the convolution with that sub-kernel.
    Each offset group (two output channels) gets its own shift."""
    cfg = dict(CONFIGS["grouped"], scope=(5, 6))
    args, geo = make_case(cfg, mode, seed=8)
    shifts = [(1, -2), (-1, 1), (0, 2)]  # per offset group
    kh, kw = cfg["kernel"]
    per_group = np.repeat(np.array(shifts, np.float64), kh * kw, axis=0).reshape(-1)  # (dh, dw) per point
    offset = np.broadcast_to(per_group.reshape((1, -1) + (1, 1) * (mode == "local")), args["kernel_offset"].shape)
    args["kernel_offset"] = np.ascontiguousarray(offset)
    sub = np.concatenate([args["weight"][2 * g:2 * g + 2, :, 1 + dh:1 + dh + kh, 2 + dw:2 + dw + kw]
                          for g, (dh, dw) in enumerate(shifts)])
    given = on(xp, args)
    grad_out = xp.asarray(grad_output_for(cfg, seed=9))
    out = cudeform.deform_kernel_conv2d(**given, **geo)
    grads = cudeform.deform_kernel_conv2d_backward(grad_out, **given, **geo)
    conv, conv_grads = _conv(xp, given["input"], xp.asarray(sub), given["bias"], geo, out_size(cfg), grad_out)
    assert rel_err(out, to_numpy(conv)) < 1e-12
    assert rel_err(grads.input, to_numpy(conv_grads.input)) < 1e-12
    expected_weight = np.zeros_like(args["weight"])
    for g, (dh, dw) in enumerate(shifts):
        expected_weight[2 * g:2 * g + 2, :, 1 + dh:1 + dh + kh, 2 + dw:2 + dw + kw] = \
            to_numpy(conv_grads.weight)[2 * g:2 * g + 2]
    assert rel_err(grads.weight, expected_weight) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(xp, mode):
    cfg = dict(CONFIGS["grouped"], N=0)
    args, geo = make_case(cfg, mode, seed=10)
    given = on(xp, args)
    out = cudeform.deform_kernel_conv2d(**given, **geo)
    assert out.shape == (0, cfg["C_out"], *out_size(cfg))
    grads = cudeform.deform_kernel_conv2d_backward(xp.zeros(out.shape), **given, **geo)
    for field, got in zip(grads._fields, grads):
        assert got.shape == given[field].shape, field
        assert not np.any(to_numpy(got)), field


def test_chunked_batch_equals_single_chunk(monkeypatch):
    """Forcing one image per columns chunk (global DK) changes no result beyond rounding."""
    from cudeform.cpu import deform_kernel_conv as cpu

    cfg = dict(CONFIGS["grouped"], N=3)
    args, geo = make_case(cfg, "global", seed=11)
    grad_out = grad_output_for(cfg, seed=12)
    whole = (cudeform.deform_kernel_conv2d(**args, **geo),
             *cudeform.deform_kernel_conv2d_backward(grad_out, **args, **geo))
    monkeypatch.setattr(cpu, "COLUMNS_BYTES", 1)
    chunked = (cudeform.deform_kernel_conv2d(**args, **geo),
               *cudeform.deform_kernel_conv2d_backward(grad_out, **args, **geo))
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(xp, mode):
    args, geo = make_case(CONFIGS["grouped"], mode, seed=13)
    expected = ref.deform_kernel_conv2d(*positional(args), **geo)
    strided = {}
    for k, v in on(xp, args).items():
        if v.ndim < 2:
            strided[k] = v
            continue
        # Same values, reversed memory order of the last two axes.
        strided[k] = xp.ascontiguousarray(v.swapaxes(-1, -2)).swapaxes(-1, -2)
        assert not strided[k].flags.c_contiguous
    assert rel_err(cudeform.deform_kernel_conv2d(**strided, **geo), expected) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_float32_close_to_float64(xp, mode):
    args, geo = make_case(CONFIGS["plain"], mode, seed=14)
    given = on(xp, args, np.float32)
    out = cudeform.deform_kernel_conv2d(**given, **geo)
    assert out.dtype == np.float32
    assert rel_err(out, ref.deform_kernel_conv2d(*positional(args), **geo)) < 1e-5
    grad_out = grad_output_for(CONFIGS["plain"], seed=15)
    grads = cudeform.deform_kernel_conv2d_backward(xp.asarray(grad_out, np.float32), **given, **geo)
    expected = ref.deform_kernel_conv2d_backward(grad_out, *positional(args), **geo)
    assert_grads_match(grads, expected, tol=1e-5, dtype=np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_bitwise_repeatable(xp, mode, deterministic):
    """Every reduction has a fixed order (on the GPU too), so both modes repeat bit for bit."""
    args, geo = make_case(CONFIGS["grouped"], mode, seed=16)
    given = on(xp, args)
    grad_out = xp.asarray(grad_output_for(CONFIGS["grouped"], seed=17))
    first = cudeform.deform_kernel_conv2d_backward(grad_out, **given, **geo, deterministic=deterministic)
    for _ in range(3):
        again = cudeform.deform_kernel_conv2d_backward(grad_out, **given, **geo, deterministic=deterministic)
        for field, a, b in zip(first._fields, first, again):
            assert np.array_equal(to_numpy(a), to_numpy(b)), field


@pytest.mark.parametrize("mode", MODES)
def test_caller_arrays_unchanged(xp, mode):
    args, geo = make_case(CONFIGS["grouped"], mode, seed=18)
    given = on(xp, args)
    before = {k: to_numpy(v).copy() for k, v in given.items()}
    out = cudeform.deform_kernel_conv2d(**given, **geo)
    grad_out = xp.ones_like(out)
    cudeform.deform_kernel_conv2d_backward(grad_out, **given, **geo)
    for k, v in given.items():
        assert np.array_equal(to_numpy(v), before[k]), k
    assert np.array_equal(to_numpy(grad_out), np.ones(out.shape))


# The GPU host's choices, checked without a GPU.

@pytest.mark.parametrize("c_in,c_out,groups,offset_groups", [
    (256, 256, 256, 1), (20, 20, 20, 2), (3, 6, 3, 3), (2, 8, 2, 4), (8, 16, 8, 2), (12, 12, 4, 3), (16, 24, 1, 2),
])
def test_gpu_local_input_grad_chunks_share_offset_groups(c_in, c_out, groups, offset_groups):
    """dk_local_input_grad samples the scope once per kernel point and output slot q for a
    whole chunk of input channels: for every q, the outputs (weight group * og + q) of a chunk's
    channels must lie in one offset group."""
    from types import SimpleNamespace

    from cudeform.cuda import deform_kernel_conv as gpu

    s = SimpleNamespace(c_in=c_in, cg=c_in // groups, og=c_out // groups, opg=c_out // offset_groups)
    run, span = gpu._input_grad_chunks(s)
    assert c_in % run == 0 and 1 <= span <= gpu.CHUNK
    for first in range(0, c_in, run):
        for start in range(first, first + run, span):
            chunk = range(start, min(first + run, start + span))
            for q in range(s.og):
                assert len({((c // s.cg) * s.og + q) // s.opg for c in chunk}) == 1, (chunk, q)
    if groups == c_in == c_out and offset_groups == 1:
        assert span == gpu.CHUNK  # depthwise channels share full chunks


def test_gpu_direct_path_bounds():
    """Global DK is direct on the GPU only for short reductions and for planes whose
    coordinates fit the direct kernels' 32-bit in-plane arithmetic."""
    from types import SimpleNamespace

    from cudeform.cuda import deform_kernel_conv as gpu

    geo = SimpleNamespace(kernel=(3, 3), padding=(1, 1), dilation=(1, 1))

    def shapes(rows, h, w):
        return SimpleNamespace(rows=rows, h=h, w=w, hw=h * w, L=h * w)

    assert gpu._direct(shapes(9, 56, 56), geo)
    assert not gpu._direct(shapes(gpu.DIRECT_MAX_REDUCTION + 1, 56, 56), geo)
    assert not gpu._direct(shapes(9, 2**15, 2**15), geo)
    assert not gpu._direct(shapes(9, 1, 2**30 - 1), geo)


@pytest.mark.parametrize("terms,scope,acc_bytes,budget", [(65536, 16, 4, 48 * 1024), (1, 16, 8, 48 * 1024),
                                                         (40, 72, 8, 48 * 1024), (512, 16, 4, 2400),
                                                         (512, 16, 8, 2400), (512, 49, 4, 0)])
def test_gpu_resample_launch(terms, scope, acc_bytes, budget):
    """dk_resample's block: whole warps, at most BLOCK and no wider than an offset group needs;
    staged scopes an odd pitch apart within the shared-memory budget, else in place."""
    from cudeform.cuda import _compile
    from cudeform.cuda import deform_kernel_conv as gpu

    block, staged, pitch, shared = gpu._resample_launch(terms, scope, acc_bytes, budget)
    assert block % _compile.WARP == 0 and 0 < block <= _compile.BLOCK
    assert block <= -(-terms // _compile.WARP) * _compile.WARP
    assert pitch >= scope and pitch % 2 == 1
    if staged:
        assert shared == block * pitch * acc_bytes <= budget
    else:
        assert shared == 0 and _compile.WARP * pitch * acc_bytes > budget


# (planes, out_size, kernel, stride, dilation, Cg * K, accumulator bytes, shared budget, target blocks)
TILE_CASES = {
    "depthwise56": (4096, (56, 56), (3, 3), (1, 1), (1, 1), 9, 4, 48 * 1024, 2048),
    "few_planes": (4, (56, 56), (3, 3), (1, 1), (1, 1), 9, 8, 48 * 1024, 2048),
    "wide_row": (1, (3, 1100), (3, 3), (1, 1), (1, 1), 9, 4, 48 * 1024, 2048),
    "strided": (64, (40, 40), (3, 5), (3, 2), (2, 3), 30, 8, 48 * 1024, 1),
    "small_budget": (64, (40, 40), (3, 3), (1, 1), (1, 1), 18, 8, 1024, 1),
    "huge_dilation": (1, (9, 10), (2, 2), (1, 1), (120, 121), 4, 4, 48 * 1024, 1),
    "tiny": (1, (1, 1), (3, 3), (1, 1), (1, 1), 9, 8, 48 * 1024, 2048),
}


@pytest.mark.parametrize("name", list(TILE_CASES))
def test_gpu_direct_conv_tiles(name):
    """dk_global_conv's tiles: a thread per column and span of SPAN rows, in blocks of whole
    warps covering every plane; a staged window (the tile's rows rounded up to whole spans)
    within the shared budget with the kernel, whole output rows where a block holds them, a
    window too large for the budget read from the planes instead, and as many tiles as the
    rows allow while the planes are too few for the target."""
    from cudeform.cuda import _compile
    from cudeform.cuda import deform_kernel_conv as gpu

    planes, (oh, ow), (kh, kw), (sh, sw), (dh, dw), rows, acc, budget, target = TILE_CASES[name]
    threads, block, shared, (th, tw, staged) = gpu._conv_tiles(*TILE_CASES[name])
    th, tw, staged = int(th), int(tw), bool(staged)
    spans = -(-th // gpu.SPAN)
    assert 1 <= th <= oh and 1 <= tw <= ow and (th == oh or th % gpu.SPAN == 0)
    assert block % _compile.WARP == 0 and tw * spans <= block <= _compile.BLOCK
    assert threads == planes * -(-oh // th) * -(-ow // tw) * block

    def window(th, tw):
        return ((-(-th // gpu.SPAN) * gpu.SPAN - 1) * sh + (kh - 1) * dh + 1) * ((tw - 1) * sw + (kw - 1) * dw + 1)

    assert shared == acc * (rows + (window(th, tw) if staged else 0))
    assert staged == (acc * (rows + window(1, 1)) <= budget)
    if staged:
        assert shared <= budget
    if ow <= _compile.BLOCK and staged and budget >= 48 * 1024:
        assert tw == ow
    if planes * -(-oh // th) * -(-ow // tw) < target:
        assert th == min(oh, gpu.SPAN)
