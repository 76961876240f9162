"""deform_roi_pool and deform_psroi_pool on the GPU: every dtype against float64, the GPU
against the CPU path, deterministic mode and torchvision's roi_align. (test_deform_roi_pool.py
runs its whole suite on CuPy as well; test_validation.py has the out-of-range batch indices,
test_large_gpu.py the 64-bit indexing.)"""

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_deterministic_backward_is_bitwise(torch, op, dtype):
    """Many RoIs on one small image, so that the input gradient's atomics race on every pixel."""
    rng = np.random.default_rng(24)
    if op == "roi":
        cfg = dict(ROI_CONFIGS["fixed"], N=1, C=8, H=6, W=6, R=64)
        args, geo = roi_case(cfg, seed=24)
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
@pytest.mark.parametrize("op", OPS)
def test_deterministic_backward_keeps_infinities_and_nans(op, dtype):
    """Each input-gradient element is +inf, -inf or NaN in deterministic mode exactly where it
    is in the default mode, and the finite ones agree: deform_roi_pool's deterministic mode sums
    the non-finite contributions apart from its fixed point; deform_psroi_pool's two modes are
    one gathered computation, so there this guards that it stays so."""
    import cupy

    forward, backward, _, _, call = OPS[op]
    args, geo = case(op, 32, ps="rfcn")
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
def test_backward_channel_split_matches_cpu_path(dtype, channels, offset, mask):
    """deform_roi_pool's backward splits the channels of 32 bins into chunks of 64 over 8 warps:
    fewer channels than warps, a count that is not a multiple of 8, several per warp, three
    chunks, the last partly filled (whose offset and mask sums droi_coord_grads adds); 60 RoIs x
    6 bins do not fill the last 32. Both modes against the CPU path, and the deterministic one
    bit for bit."""
    import cupy

    cfg = dict(ROI_CONFIGS["adaptive"], C=channels, R=60)
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


def test_backward_grid_stride_past_the_block_cap():
    """More than 65535 blocks' worth of bins (32 each): the backward's grid-stride loop takes
    the rest, the last group of 32 only partly filled."""
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
    got = cudeform.deform_roi_pool_backward(cupy.asarray(go), *roi_call(gpu)[0], **roi_call(gpu)[1], **geo)
    assert_grads_match(got, want)


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
