"""deform_roi_pool and deform_psroi_pool on the GPU: every dtype against float64, the GPU
against the CPU path, deterministic mode (deform_roi_pool's two paths) and torchvision's
roi_align. (test_deform_roi_pool.py runs its whole suite on CuPy as well; test_validation.py
has the out-of-range batch indices, test_large_gpu.py the 64-bit indexing.)"""

import numpy as np
import pytest

import cudeform
from helpers import TOLERANCE, assert_grads_match, l2_rel, rel_err
from test_deform_roi_pool import OPS, PS_CONFIGS, ROI_CONFIGS, case, make_rois, on, ps_case, roi_call, roi_case

pytestmark = pytest.mark.gpu

DTYPES = list(TOLERANCE)


def rounded(torch, args, dtype):
    """The arguments in `dtype` as CUDA tensors, and the same (rounded) values in float64 NumPy."""
    tensors = {k: None if v is None else torch.from_numpy(v).to("cuda", getattr(torch, dtype)) for k, v in args.items()}
    exact = {k: None if v is None else v.to(torch.float64).cpu().numpy() for k, v in tensors.items()}
    return tensors, exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_every_dtype_against_float64(torch, op, dtype):
    forward, backward, ref_forward, ref_backward, call = OPS[op]
    args, geo = case(op, 20, ps="rfcn")
    tensors, exact = rounded(torch, args, dtype)
    out = forward(*call(tensors)[0], **call(tensors)[1], **geo)
    assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, dtype) and out.is_cuda
    expected = ref_forward(*call(exact)[0], **call(exact)[1], **geo)
    assert l2_rel(out.double().cpu().numpy(), expected) < TOLERANCE[dtype]

    grad_out = torch.from_numpy(np.random.default_rng(21).standard_normal(expected.shape)).to(
        "cuda", getattr(torch, dtype))
    for deterministic in (False, True):
        grads = backward(grad_out, *call(tensors)[0], **call(tensors)[1], **geo, deterministic=deterministic)
        want = ref_backward(grad_out.double().cpu().numpy(), *call(exact)[0], **call(exact)[1], **geo)
        for field, got, w in zip(grads._fields, grads, want):
            assert got.dtype == getattr(torch, dtype), field
            assert l2_rel(got.double().cpu().numpy(), w) < TOLERANCE[dtype], (field, deterministic)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_matches_cpu_path(op, dtype):
    import cupy

    forward, backward, _, _, call = OPS[op]
    args, geo = case(op, 22, ps="rfcn")
    cpu, gpu = on(np, args, dtype), on(cupy, args, dtype)
    tol = 1e-10 if dtype == "float64" else 1e-5
    out_cpu = forward(*call(cpu)[0], **call(cpu)[1], **geo)
    assert rel_err(forward(*call(gpu)[0], **call(gpu)[1], **geo), out_cpu) < tol
    go = np.random.default_rng(23).standard_normal(out_cpu.shape).astype(dtype)
    g_cpu = backward(go, *call(cpu)[0], **call(cpu)[1], **geo)
    g_gpu = backward(cupy.asarray(go), *call(gpu)[0], **call(gpu)[1], **geo)
    for field, a, b in zip(g_cpu._fields, g_gpu, g_cpu):
        assert rel_err(a, b) < tol, field


# deform_roi_pool's deterministic input gradient: gathered with sampling_ratio > 0, in fixed
# point with sampling_ratio 0; deform_psroi_pool's has one path.
DETERMINISTIC_PATHS = [pytest.param("roi", 2, id="roi-gathered"), pytest.param("roi", 0, id="roi-fixed-point"),
                       pytest.param("psroi", None, id="psroi")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,sampling_ratio", DETERMINISTIC_PATHS)
def test_deterministic_backward_is_bitwise(torch, op, sampling_ratio, dtype):
    """Many RoIs on one small image, so that every pixel sees many of them (with atomics, a
    race on every pixel)."""
    rng = np.random.default_rng(24)
    if op == "roi":
        cfg = dict(ROI_CONFIGS["fixed"], N=1, C=8, H=6, W=6, R=64)
        args, geo = roi_case(cfg, seed=24)
        geo["sampling_ratio"] = sampling_ratio
    else:
        cfg = dict(PS_CONFIGS["rfcn"], N=1, H=6, W=6, R=64)
        args, geo = ps_case(cfg, seed=24)
    args["rois"] = make_rois(rng, 1, 64, 6, 6, geo.get("spatial_scale", 1.0))
    forward, backward, ref_forward, ref_backward, call = OPS[op]
    tensors, exact = rounded(torch, args, dtype)
    shape = ref_forward(*call(exact)[0], **call(exact)[1], **geo).shape
    go = torch.randn(*shape, device="cuda", dtype=getattr(torch, dtype))
    first = backward(go, *call(tensors)[0], **call(tensors)[1], **geo, deterministic=True)
    for _ in range(5):
        again = backward(go, *call(tensors)[0], **call(tensors)[1], **geo, deterministic=True)
        for field, a, b in zip(first._fields, first, again):
            assert torch.equal(a, b), field
    want = ref_backward(go.double().cpu().numpy(), *call(exact)[0], **call(exact)[1], **geo)
    assert l2_rel(first.input.double().cpu().numpy(), want[0]) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("op,sampling_ratio", DETERMINISTIC_PATHS)
def test_deterministic_backward_keeps_infinities_and_nans(op, sampling_ratio, dtype):
    """Each input-gradient element is +inf, -inf or NaN in deterministic mode exactly where it
    is in the default mode, and the finite ones agree: deform_roi_pool's fixed-point path sums
    the non-finite contributions apart from its fixed point, its gathered path sums them in its
    fixed order (with the default's merged corners, so that a corner of weight 0 meets an
    infinity exactly where it does there); deform_psroi_pool's two modes are one gathered
    computation, so there this guards that it stays so."""
    import cupy

    forward, backward, _, _, call = OPS[op]
    args, geo = case(op, 32, ps="rfcn")
    if op == "roi":
        geo["sampling_ratio"] = sampling_ratio
    gpu = on(cupy, args, dtype)
    out = forward(*call(gpu)[0], **call(gpu)[1], **geo)
    go = np.random.default_rng(33).standard_normal(out.shape)
    # Whole channels of a few RoIs: pixels that see +inf only, -inf only, both, and NaN.
    go[0, 0], go[1, 0], go[2, 1], go[3, 0], go[3, 1] = np.inf, -np.inf, np.nan, np.inf, -np.inf
    go = cupy.asarray(go.astype(dtype))
    want = backward(go, *call(gpu)[0], **call(gpu)[1], **geo).input.get().astype(np.float64)
    got = backward(go, *call(gpu)[0], **call(gpu)[1], **geo, deterministic=True).input.get().astype(np.float64)
    for kind in (np.isposinf, np.isneginf, np.isnan):
        assert kind(want).any() and np.array_equal(kind(got), kind(want)), kind.__name__
    finite = np.isfinite(want)
    assert rel_err(got[finite], want[finite]) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("channels", [1, 17, 40, 140])
@pytest.mark.parametrize("offset,mask", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_backward_channel_split_matches_cpu_path(dtype, channels, offset, mask, sampling_ratio):
    """deform_roi_pool's backward splits the channels of 32 bins into chunks of 64 over 8 warps:
    fewer channels than warps, a count that is not a multiple of 8, several per warp, three
    chunks, the last partly filled (whose offset and mask sums droi_coord_grads adds); 60 RoIs x
    6 bins do not fill the last 32. With sampling_ratio 2 the deterministic mode gathers the
    input gradient in tiles of 32 channels (the last partly filled but for 1 channel) and
    droi_backward only reduces the offset and mask sums. Both modes against the CPU path, and
    the deterministic one bit for bit."""
    import cupy

    cfg = dict(ROI_CONFIGS["adaptive"], C=channels, R=60)
    cfg["geo"] = dict(cfg["geo"], sampling_ratio=sampling_ratio)
    args, geo = roi_case(cfg, seed=29, offset=offset, mask=mask)
    cpu, gpu = on(np, args, dtype), on(cupy, args, dtype)
    go = np.random.default_rng(30).standard_normal((60, channels, 3, 2)).astype(dtype)
    want = cudeform.deform_roi_pool_backward(go, *roi_call(cpu)[0], **roi_call(cpu)[1], **geo)
    tol = 1e-10 if dtype == "float64" else 1e-5
    for deterministic in (False, True):
        got = cudeform.deform_roi_pool_backward(cupy.asarray(go), *roi_call(gpu)[0], **roi_call(gpu)[1], **geo,
                                                deterministic=deterministic)
        assert_grads_match(got, want, tol)
    again = cudeform.deform_roi_pool_backward(cupy.asarray(go), *roi_call(gpu)[0], **roi_call(gpu)[1], **geo,
                                              deterministic=True)
    for field, a, b in zip(got._fields, got, again):
        assert (a is None and b is None) or bool(cupy.array_equal(a, b)), field


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_grid_stride_past_the_block_cap(deterministic):
    """More than 65535 blocks' worth of bins (32 each): the backward's grid-stride loop takes
    the rest, the last group of 32 only partly filled. Deterministic, the gathered path's 2 x
    43,000 tiles of grad_output to transpose and its 34 million sorted entries pass their grid
    caps too (and the 360 pixels sum tens of thousands of entries each)."""
    import cupy

    rng = np.random.default_rng(31)
    n_rois, h, w = 43_000, 12, 15
    assert n_rois * 49 > 65535 * 32 and n_rois * 49 % 32
    args = dict(input=rng.standard_normal((2, 1, h, w)), rois=make_rois(rng, 2, n_rois, h, w, 0.5),
                offset=rng.uniform(-1, 1, (n_rois, 2, 7, 7)), mask=rng.uniform(0, 1, (n_rois, 1, 7, 7)))
    geo = dict(output_size=7, spatial_scale=0.5, sampling_ratio=2)
    go = rng.standard_normal((n_rois, 1, 7, 7))
    want = cudeform.deform_roi_pool_backward(go, *roi_call(args)[0], **roi_call(args)[1], **geo)
    gpu = on(cupy, args)
    got = cudeform.deform_roi_pool_backward(cupy.asarray(go), *roi_call(gpu)[0], **roi_call(gpu)[1], **geo,
                                            deterministic=deterministic)
    assert_grads_match(got, want)


def gathered_case(sampling_ratio, offset, mask, seed):
    """deform_roi_pool arguments for the gathered deterministic input gradient: two images of
    9 x 37 pixels (two 32-pixel tiles a row, the second partial) and 40 channels (two channel
    tiles, the second partial); RoIs inside, across the border, outside and of zero size
    (make_rois), one whose offsets push a bin out of the box, one pushed partly out, and the
    first three with batch indices out of range (N, -1, NaN). Returns (args, geo, the rows of
    the RoIs in range)."""
    cfg = dict(N=2, C=40, H=9, W=37, R=24,
               geo=dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=sampling_ratio, gamma=0.2))
    args, geo = roi_case(cfg, seed=seed, offset=offset, mask=mask)
    if offset:
        args["offset"][4, :, 1, 0] = [12.0, -15.0]
        args["offset"][5] = 1.37
    args["rois"][:3, 0] = [2.0, -1.0, np.nan]
    return args, geo, np.arange(3, cfg["R"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("offset,mask", [(True, True), (False, False)])
def test_gathered_deterministic_backward_matches_cpu_path(torch, dtype, sampling_ratio, offset, mask):
    """deform_roi_pool's deterministic backward with sampling_ratio > 0 (one sample a side,
    pairs of samples, and a pair and a single one) gathers its input gradient: against the CPU
    path in float64 on the same rounded values (the RoIs out of the batch left out there; they
    get zero offset and mask gradients), and bit for bit the same twice."""
    args, geo, good = gathered_case(sampling_ratio, offset, mask, seed=62)
    tensors, exact = rounded(torch, args, dtype)
    go = torch.from_numpy(np.random.default_rng(63).standard_normal((24, 40, 3, 2))).to("cuda", getattr(torch, dtype))
    first = cudeform.deform_roi_pool_backward(go, *roi_call(tensors)[0], **roi_call(tensors)[1], **geo,
                                              deterministic=True)
    again = cudeform.deform_roi_pool_backward(go, *roi_call(tensors)[0], **roi_call(tensors)[1], **geo,
                                              deterministic=True)
    kept = {k: v if v is None or k == "input" else v[good] for k, v in exact.items()}
    want = cudeform.deform_roi_pool_backward(go.double().cpu().numpy()[good], *roi_call(kept)[0],
                                             **roi_call(kept)[1], **geo)
    assert np.abs(want.input).max() > 0
    for field, got, b, w in zip(first._fields, first, again, want):
        if w is None:
            assert got is None and b is None, field
            continue
        assert torch.equal(got, b), field
        got = got.double().cpu().numpy()
        if field != "input":
            assert np.array_equal(got[:3], np.zeros_like(got[:3])), field
            got = got[good]
        assert l2_rel(got, w) < TOLERANCE[dtype], field


@pytest.mark.parametrize("rois", ["none", "all outside the batch"])
def test_gathered_input_grad_without_live_entries(rois):
    """No RoI, or only RoIs whose batch index is out of range (every entry dead, sorted to the
    end): the gathered input gradient is all zeros."""
    import cupy

    args, geo, _ = gathered_case(2, True, True, seed=64)
    if rois == "none":
        args = {k: v if k == "input" else v[:0] for k, v in args.items()}
    else:
        args["rois"][:, 0] = 2.0
    gpu = on(cupy, args)
    go = cupy.asarray(np.random.default_rng(65).standard_normal((args["rois"].shape[0], 40, 3, 2)))
    grads = cudeform.deform_roi_pool_backward(go, *roi_call(gpu)[0], **roi_call(gpu)[1], **geo, deterministic=True)
    for field, got, arg in zip(grads._fields, grads, (args["input"], args["offset"], args["mask"])):
        assert got.shape == arg.shape and not bool(got.any()), field


# GATHER_MAX_ENTRIES against this case's entries: 16 per 2 x 2 samples of each of 8 x 4 bins.
ENTRIES = 8 * 4 * 16


@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("sampling_ratio,budget,path", [
    (2, None, "gathered"), (2, ENTRIES, "gathered"), (2, ENTRIES - 1, "fixed point"), (0, None, "fixed point")])
def test_deterministic_input_grad_path(monkeypatch, sampling_ratio, budget, path, offset):
    """deterministic=True gathers deform_roi_pool's input gradient when sampling_ratio > 0
    and its entries fit GATHER_MAX_ENTRIES, without droi_backward unless there is an offset or
    a mask to differentiate; otherwise it takes the fixed-point path. Either way the result
    matches the CPU path and is the same twice, bit for bit."""
    import cupy
    from cudeform.cuda import deform_roi_pool as roi_cuda

    cfg = dict(ROI_CONFIGS["fixed"], geo=dict(ROI_CONFIGS["fixed"]["geo"], sampling_ratio=sampling_ratio))
    args, geo = roi_case(cfg, seed=66, offset=offset, mask=offset)
    if budget is not None:
        monkeypatch.setattr(roi_cuda, "GATHER_MAX_ENTRIES", budget)
    launched = []
    kernel = roi_cuda._kernel
    monkeypatch.setattr(roi_cuda, "_kernel", lambda name, dtype: launched.append(name) or kernel(name, dtype))
    go = np.random.default_rng(67).standard_normal((8, 4, 2, 2))
    gpu = on(cupy, args)
    got = cudeform.deform_roi_pool_backward(cupy.asarray(go), *roi_call(gpu)[0], **roi_call(gpu)[1], **geo,
                                            deterministic=True)
    assert ("droi_gather_input_grad" in launched) == (path == "gathered")
    assert ("roi_pool_fixed_finish" in launched) == (path == "fixed point")
    assert ("droi_backward" in launched) == (path == "fixed point" or offset)
    assert_grads_match(got, cudeform.deform_roi_pool_backward(go, *roi_call(args)[0], **roi_call(args)[1], **geo))
    again = cudeform.deform_roi_pool_backward(cupy.asarray(go), *roi_call(gpu)[0], **roi_call(gpu)[1], **geo,
                                              deterministic=True)
    for field, a, b in zip(got._fields, got, again):
        assert (a is None and b is None) or bool(cupy.array_equal(a, b)), field


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("offset", ["none", "zeros"])
def test_zero_offset_equals_torchvision_roi_align(torch, sampling_ratio, offset):
    torchvision = pytest.importorskip("torchvision")
    cfg = ROI_CONFIGS["adaptive"]
    args, _ = roi_case(cfg, seed=27, offset=False, mask=False)
    geo = dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=sampling_ratio)
    x = torch.from_numpy(args["input"]).cuda().requires_grad_(True)
    rois = torch.from_numpy(args["rois"]).cuda()
    off = torch.zeros(rois.shape[0], 2, 3, 2, device="cuda", dtype=torch.float64) if offset == "zeros" else None
    expected = torchvision.ops.roi_align(x, rois, aligned=True, **geo)
    out = cudeform.deform_roi_pool(x, rois, off, **geo)
    assert rel_err(out.cpu().numpy(), expected.detach().cpu().numpy()) < 1e-12
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    grads = cudeform.deform_roi_pool_backward(grad_out, x, rois, off, **geo)
    assert rel_err(grads.input.cpu().numpy(), x.grad.cpu().numpy()) < 1e-12


@pytest.mark.parametrize("offset", [True, False])
def test_psroi_gather_past_every_chunk(offset):
    """deform_psroi_pool's gathered input gradient: several 8 x 32 pixel tiles (and partial
    ones), 20 output channels per class (chunks of 8, the last partial), 700 RoIs (several
    listing rounds of 256 candidates) crowding the tiles (more than 64 listed bins), against
    the CPU path."""
    import cupy

    rng = np.random.default_rng(37)
    n_rois, h, w = 700, 19, 45
    geo = dict(output_dim=20, pooled_size=3, group_size=3, part_size=2, sample_per_part=2, spatial_scale=0.5,
               trans_std=0.2)
    args = dict(input=rng.standard_normal((2, 20 * 9, h, w)), rois=make_rois(rng, 2, n_rois, h, w, 0.5),
                offset=rng.uniform(-1, 1, (n_rois, 2, 2, 2)) if offset else None)
    go = rng.standard_normal((n_rois, 20, 3, 3))
    want = cudeform.deform_psroi_pool_backward(go, args["input"], args["rois"], args["offset"], **geo)
    gpu = on(cupy, args)
    got = cudeform.deform_psroi_pool_backward(cupy.asarray(go), gpu["input"], gpu["rois"], gpu["offset"], **geo)
    assert_grads_match(got, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spatial_scale", [0.5, 0.5 * (1 + 2**-10 / 3)])
def test_psroi_samples_on_the_box_edge_count_alike(dtype, spatial_scale):
    """A RoI whose rounded corners put a sample at scaled coordinate 0, i.e. exactly on MSRA's
    box edge -0.5 up to rounding (the 2000-draw fuzz found it): the GPU and CPU paths compute
    positions in the same arithmetic, so they count that sample alike, whatever the scale."""
    import cupy

    rois = np.array([[0, -0.82, -0.66, 0.58, 0.46], [0, 0.10, 1.77, 1.82, 2.41]], dtype)
    x = np.full((1, 1, 1, 1), 0.125, dtype)
    geo = dict(output_dim=1, pooled_size=3, sample_per_part=1, spatial_scale=spatial_scale)
    want = cudeform.deform_psroi_pool(x, rois, **geo)
    got = cudeform.deform_psroi_pool(cupy.asarray(x), cupy.asarray(rois), **geo)
    np.testing.assert_array_equal(got.get(), want)
    go = np.random.default_rng(41).standard_normal(want.shape).astype(dtype)
    want_grad = cudeform.deform_psroi_pool_backward(go, x, rois, **geo).input
    got_grad = cudeform.deform_psroi_pool_backward(cupy.asarray(go), cupy.asarray(x), cupy.asarray(rois), **geo).input
    assert rel_err(got_grad, want_grad) < (1e-12 if dtype == "float64" else 1e-6)
