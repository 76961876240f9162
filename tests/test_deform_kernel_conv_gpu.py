"""deform_kernel_conv2d on the GPU: every dtype against float64, PyTorch CUDA tensors, both
global DK paths (direct and GEMM), the local weight gradient's tiles and chunks, GPU against
the CPU path, and bitwise repeatability. (test_deform_kernel_conv.py runs its whole suite on
CuPy as well.)"""

import numpy as np
import pytest

import cudeform
import reference as ref
from gpu_cases import busy_torch_stream
from helpers import TOLERANCE, l2_rel, rel_err
from test_deform_kernel_conv import CONFIGS, MODES, grad_output_for, make_case, on, positional

pytestmark = pytest.mark.gpu


# Larger than the CPU suite's: many blocks, grid-stride loops, several position chunks in the
# local weight gradient, and a scope wider than one shared-memory tile (float32 and float64).
LARGE = {
    "depthwise3x3": dict(N=3, C_in=32, C_out=32, groups=32, G=1, kernel=(3, 3), scope=(4, 4), H=28, W=30,
                         stride=1, padding=1, dilation=1),
    "dense3x3": dict(N=2, C_in=16, C_out=24, groups=1, G=2, kernel=(3, 3), scope=(4, 4), H=12, W=13,
                     stride=(1, 2), padding=1, dilation=1),
    "widescope": dict(N=2, C_in=4, C_out=4, groups=2, G=2, kernel=(3, 2), scope=(9, 8), H=20, W=19,
                      stride=1, padding=(1, 0), dilation=(2, 1)),
}


# Small shapes for the branches of the GPU kernels: chunks of channels that straddle weight or
# offset groups, kernel rows wider than one unrolled piece, planes cut into bands, borders.
EDGES = {
    # depthwise with a channel multiplier; C_out/G = 2 outputs per offset group, so the local
    # input gradient's chunks hold one input channel
    "multiplier": dict(N=2, C_in=3, C_out=6, groups=3, G=3, kernel=(3, 3), scope=(4, 4), H=9, W=11,
                       stride=1, padding=1, dilation=1),
    # weight groups of 4 outputs over offset groups of 2
    "split_groups": dict(N=1, C_in=2, C_out=8, groups=2, G=4, kernel=(2, 2), scope=(3, 3), H=6, W=5,
                         stride=1, padding=0, dilation=1),
    # depthwise, more channels than a chunk, chunks shared across offset groups
    "chunks": dict(N=2, C_in=20, C_out=20, groups=20, G=2, kernel=(3, 3), scope=(4, 4), H=6, W=7,
                   stride=1, padding=1, dilation=1),
    # kernel rows of 5 points (two pieces), stride and dilation 2, depthwise
    "wide_strided": dict(N=2, C_in=6, C_out=6, groups=6, G=2, kernel=(2, 5), scope=(3, 7), H=13, W=17,
                         stride=2, padding=(1, 3), dilation=2),
    # few planes of many positions: the direct kernels cut them into bands
    "bands": dict(N=1, C_in=2, C_out=2, groups=2, G=1, kernel=(3, 3), scope=(4, 4), H=45, W=50,
                  stride=1, padding=1, dilation=1),
    "bands_dense": dict(N=1, C_in=2, C_out=3, groups=1, G=1, kernel=(3, 3), scope=(3, 3), H=40, W=33,
                        stride=(1, 2), padding=1, dilation=1),
    # padding past the dilated kernel's reach: the stride-1 input gradient's convolution has a
    # negative padding
    "pad_past_kernel": dict(N=1, C_in=2, C_out=2, groups=2, G=1, kernel=(3, 3), scope=(4, 4), H=5, W=6,
                            stride=1, padding=(3, 2), dilation=1),
    # padding wider than the input: every output reads some zeros
    "big_pad": dict(N=1, C_in=3, C_out=3, groups=3, G=1, kernel=(3, 3), scope=(5, 4), H=3, W=4,
                    stride=1, padding=3, dilation=2),
    # output rows longer than a block's spans: dk_global_conv tiles the columns
    "wide_row": dict(N=1, C_in=2, C_out=2, groups=2, G=1, kernel=(3, 3), scope=(4, 4), H=3, W=1030,
                     stride=1, padding=1, dilation=1),
    # a window too large for shared memory: dk_global_conv reads the planes directly
    "huge_dilation": dict(N=1, C_in=2, C_out=2, groups=2, G=2, kernel=(2, 2), scope=(3, 3), H=125, W=127,
                          stride=1, padding=2, dilation=(120, 121)),
    # the GEMM path (Cg * K = 72) with a stride, dilations and paddings that differ between the
    # axes, and offset groups across weight groups
    "gemm_phases": dict(N=2, C_in=16, C_out=6, groups=2, G=3, kernel=(3, 3), scope=(4, 4), H=11, W=13,
                        stride=(2, 1), padding=(2, 1), dilation=(3, 2)),
    # a 3 x 3 kernel (dk_global_kernel_grad's compiled size) at row stride 2: its general loop
    "strided3x3": dict(N=2, C_in=4, C_out=4, groups=4, G=2, kernel=(3, 3), scope=(5, 5), H=11, W=10,
                       stride=(2, 1), padding=1, dilation=1),
    # one pixel, one output
    "tiny": dict(N=2, C_in=3, C_out=3, groups=3, G=1, kernel=(3, 3), scope=(4, 4), H=1, W=1,
                 stride=1, padding=1, dilation=1),
}


# The tensor-core path (dk_global_mma, and the backward on its kernel-point-major kernels):
# channel counts that leave a stage half empty, outputs past one tile of 128 channels and of 128
# positions, rows of positions that are not whole 16-byte vectors (L = 117), weight and offset
# groups, strides, dilations, a kernel of 1 x 2, (o, c) pairs whose chunks of 256 columns
# in dk_resample_grad_sums straddle output channels (Cg = 136), and (image, kernel point) rows
# for more than its three stage buffers of 32 (108 rows; 40 rows of two kernel points). Where
# the stride is 1 and C_out/groups a multiple of 8, the input gradient is dk_global_mma's
# transposed convolution (every config but mma_tails and mma_groups, which take cuBLAS and
# dk_col2im), mma_flipped's with weight groups, a dilation and a padding larger than the
# kernel's extent (the transposed convolution's padding is negative). On sm_90, where H_out *
# W_out is a multiple of 8, dk_global_wgmma takes the kernels' gradient too (mma_tiles: a second,
# partial tile of output channels, a last stage of 16 positions; mma_groups: weight groups, a
# stride and a dilation; mma_kernel_grad: a second tile of 8 input channels; mma_points,
# mma_flipped).
MMA = {
    "mma_tails": dict(N=2, C_in=24, C_out=20, groups=1, G=2, kernel=(3, 3), scope=(4, 4), H=9, W=13,
                      stride=1, padding=1, dilation=1),
    "mma_groups": dict(N=2, C_in=32, C_out=12, groups=2, G=3, kernel=(3, 2), scope=(5, 4), H=10, W=12,
                       stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
    "mma_tiles": dict(N=1, C_in=40, C_out=136, groups=1, G=1, kernel=(3, 3), scope=(3, 3), H=12, W=12,
                      stride=1, padding=1, dilation=1),
    "mma_stages": dict(N=3, C_in=72, C_out=16, groups=1, G=4, kernel=(1, 2), scope=(2, 3), H=5, W=7,
                       stride=1, padding=0, dilation=1),
    "mma_wide": dict(N=1, C_in=136, C_out=8, groups=1, G=1, kernel=(3, 3), scope=(4, 4), H=6, W=7,
                     stride=1, padding=1, dilation=1),
    "mma_rows": dict(N=12, C_in=16, C_out=24, groups=1, G=2, kernel=(3, 3), scope=(4, 4), H=5, W=6,
                     stride=1, padding=1, dilation=1),
    "mma_points": dict(N=20, C_in=40, C_out=8, groups=1, G=1, kernel=(1, 2), scope=(2, 3), H=4, W=5,
                       stride=1, padding=0, dilation=1),
    "mma_flipped": dict(N=2, C_in=32, C_out=16, groups=2, G=4, kernel=(3, 2), scope=(5, 4), H=10, W=12,
                        stride=1, padding=(3, 1), dilation=(1, 2)),
    "mma_kernel_grad": dict(N=2, C_in=136, C_out=16, groups=1, G=2, kernel=(3, 3), scope=(4, 4), H=8, W=9,
                            stride=1, padding=1, dilation=1),
}


def rounded_case(torch, cfg, mode, dtype, seed):
    """Inputs in `dtype` as CUDA tensors, and the same values in float64 NumPy."""
    args, geo = make_case(cfg, mode, seed=seed)
    tdtype = getattr(torch, dtype)
    tensors = {k: torch.from_numpy(v).to("cuda", tdtype) for k, v in args.items()}
    exact = {k: v.to(torch.float64).cpu().numpy() for k, v in tensors.items()}
    return tensors, exact, geo


def check_against_reference(torch, tensors, exact, geo, dtype, seed):
    out = cudeform.deform_kernel_conv2d(**tensors, **geo)
    assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, dtype) and out.is_cuda
    expected = ref.deform_kernel_conv2d(*positional(exact), **geo)
    assert l2_rel(out.double().cpu().numpy(), expected) < TOLERANCE[dtype]
    go = torch.from_numpy(np.random.default_rng(seed).standard_normal(expected.shape)).to("cuda", getattr(torch, dtype))
    grads = cudeform.deform_kernel_conv2d_backward(go, **tensors, **geo)
    want = ref.deform_kernel_conv2d_backward(go.double().cpu().numpy(), *positional(exact), **geo)
    for field, got, w in zip(grads._fields, grads, want):
        assert got.dtype == getattr(torch, dtype) and got.is_cuda, field
        # The offset gradient differentiates the interpolation: its error grows with the input's.
        tol = TOLERANCE[dtype] * (4 if field == "kernel_offset" and dtype in ("float16", "bfloat16") else 1)
        assert l2_rel(got.double().cpu().numpy(), w) < tol, field


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS) + list(LARGE) + list(EDGES))
def test_every_dtype_against_float64(torch, dtype, mode, name):
    cfg = {**CONFIGS, **LARGE, **EDGES}[name]
    tensors, exact, geo = rounded_case(torch, cfg, mode, dtype, seed=30)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=31)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("path,limit", [("direct", 10**9), ("gemm", 0)])
@pytest.mark.parametrize("name", list(CONFIGS) + ["dense3x3", "depthwise3x3"] + list(EDGES))
def test_both_global_paths(torch, monkeypatch, dtype, path, limit, name):
    """Global DK convolves directly or through columns and GEMMs, by the reduction length:
    force each path on every configuration, with several columns chunks for the GEMM."""
    from cudeform.cuda import deform_kernel_conv as gpu

    monkeypatch.setattr(gpu, "DIRECT_MAX_REDUCTION", limit)
    if path == "gemm":
        monkeypatch.setattr(gpu, "COLUMNS_BYTES", 1)  # one image per chunk
        monkeypatch.setattr(gpu, "TENSOR_CORES", False)
    cfg = {**CONFIGS, **LARGE, **EDGES}[name]
    tensors, exact, geo = rounded_case(torch, cfg, "global", dtype, seed=32)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=33)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("wgmma", [True, False], ids=["wgmma", "mma_sync"])
@pytest.mark.parametrize("name", list(MMA) + ["dense3x3"])
def test_tensor_core_path(torch, monkeypatch, dtype, wgmma, name):
    """dk_global_mma (dk_global_wgmma on sm_90, unless turned off) and the backward on its
    kernels (kernel-point-major columns, the products through the resampling; the input
    gradient by the transposed convolution or by dk_col2im) against float64, and against the
    other columns path of the same rounded inputs."""
    from cudeform.cuda import _compile, deform_kernel_conv as gpu

    monkeypatch.setattr(gpu, "WGMMA", wgmma)

    calls = []
    for step in ("_mma_forward", "_mma_backward"):
        monkeypatch.setattr(gpu, step, lambda *a, f=getattr(gpu, step), step=step: calls.append(step) or f(*a))
    taken = []  # per backward: the (kernels' gradient, input gradient) that the columns took
    monkeypatch.setattr(gpu, "_columns_backward", lambda *a, f=gpu._columns_backward:
                        taken.append((a[3] is not None, a[-1] is not None)) or f(*a))
    cfg = {**MMA, **LARGE}[name]
    tensors, exact, geo = rounded_case(torch, cfg, "global", dtype, seed=46)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=47)
    assert calls == ["_mma_forward", "_mma_backward"], "the tensor-core path was not taken"
    out = cudeform.deform_kernel_conv2d(**tensors, **geo)
    transposed = cfg["stride"] in (1, (1, 1)) and cfg["C_out"] // cfg["groups"] % 8 == 0
    kernel_grad = wgmma and _compile.has_wgmma() and out.shape[2] * out.shape[3] % 8 == 0
    assert taken == ([] if transposed and kernel_grad else [(not kernel_grad, not transposed)])
    go = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(48)).to(out.dtype)
    grads = cudeform.deform_kernel_conv2d_backward(go, **tensors, **geo)
    monkeypatch.setattr(gpu, "TENSOR_CORES", False)
    columns = cudeform.deform_kernel_conv2d(**tensors, **geo)
    columns_grads = cudeform.deform_kernel_conv2d_backward(go, **tensors, **geo)
    assert l2_rel(out.double().cpu().numpy(), columns.double().cpu().numpy()) < TOLERANCE[dtype]
    for field, got, want in zip(grads._fields, grads, columns_grads):
        tol = TOLERANCE[dtype] * (4 if field == "kernel_offset" else 1)
        assert l2_rel(got.double().cpu().numpy(), want.double().cpu().numpy()) < tol, field
    assert len(calls) == 4


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("budget,target", [(None, 1), (1024, 1), (4096, 1), (0, 2048)],
                         ids=["tall", "narrow", "narrow_grad", "unstaged"])
@pytest.mark.parametrize("name", list(CONFIGS) + ["depthwise3x3", "widescope"] + list(EDGES))
def test_direct_conv_tiles(torch, monkeypatch, dtype, budget, target, name):
    """The direct kernels' tilings beyond the default's (dk_global_conv forward and for the
    input gradient, dk_global_kernel_grad): the tallest tiles (few blocks), tiles narrowed to a
    small shared-memory budget (4096 bytes leave dk_global_kernel_grad, whose block sums take
    some, a narrow window; 1024 none), and no window staged at all."""
    from cudeform.cuda import deform_kernel_conv as gpu

    monkeypatch.setattr(gpu, "TARGET_BLOCKS", target)
    if budget is not None:
        monkeypatch.setattr(gpu, "DIRECT_SHARED_BYTES", budget)
    tensors, exact, geo = rounded_case(torch, {**CONFIGS, **LARGE, **EDGES}[name], "global", dtype, seed=39)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=46)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("budget", [2400, 0], ids=["narrow", "unstaged"])
@pytest.mark.parametrize("name", ["dense3x3", "widescope", "multiplier", "gemm_phases"])
def test_resample_launches(torch, monkeypatch, dtype, budget, name):
    """dk_resample (the GEMM path's forward, every global backward) with blocks narrowed to a
    small shared-memory budget, and with the scopes read in place."""
    from cudeform.cuda import deform_kernel_conv as gpu

    monkeypatch.setattr(gpu, "DIRECT_SHARED_BYTES", budget)
    monkeypatch.setattr(gpu, "DIRECT_MAX_REDUCTION", 0)
    tensors, exact, geo = rounded_case(torch, {**LARGE, **EDGES}[name], "global", dtype, seed=40)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=41)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("name", ["dense3x3", "gemm_phases", "big_pad", "wide_strided"])
def test_gemm_path_64bit_coordinates(torch, monkeypatch, dtype, name):
    """dk_im2col's and dk_col2im's 64-bit in-plane arithmetic, which only planes past 2**30
    positions take, forced on small ones (the GEMM path, forward and backward)."""
    from cudeform.cuda import deform_kernel_conv as gpu

    monkeypatch.setattr(gpu, "_small_planes", lambda s, geo: False)
    tensors, exact, geo = rounded_case(torch, {**LARGE, **EDGES}[name], "global", dtype, seed=42)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=43)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("warp_max", [0, None], ids=["block_per_plane", "warp_per_plane"])
@pytest.mark.parametrize("name", ["mma_tiles", "dense3x3"])
def test_bias_grad_launches(torch, monkeypatch, dtype, warp_max, name):
    """plane_sums (the bias gradient, common.cuh) with a warp per plane and with a block per
    plane (forced: long planes take it), on planes of whole 16-byte vectors (mma_tiles, L = 144;
    dense3x3 in fp64) and not (dense3x3 in fp16, L = 84)."""
    from cudeform.cuda import _common

    if warp_max is not None:
        monkeypatch.setattr(_common, "PLANE_WARP_MAX", warp_max)
    tensors, exact, geo = rounded_case(torch, {**LARGE, **MMA}[name], "global", dtype, seed=48)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=49)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("name", ["depthwise3x3", "wide_strided", "huge_dilation", "big_pad"])
def test_direct_path_64bit_units(torch, monkeypatch, dtype, name):
    """dk_global_conv's 64-bit unit indices, which only launches past 2**31 tiles take, forced on
    small ones (staged and unstaged windows)."""
    from cudeform.cuda import deform_kernel_conv as gpu

    monkeypatch.setattr(gpu, "_small_units", lambda units: False)
    tensors, exact, geo = rounded_case(torch, {**LARGE, **EDGES}[name], "global", dtype, seed=44)
    check_against_reference(torch, tensors, exact, geo, dtype, seed=45)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS) + list(LARGE) + list(EDGES))
def test_gpu_matches_cpu_path(dtype, mode, name):
    import cupy

    cfg = {**CONFIGS, **LARGE, **EDGES}[name]
    args, geo = make_case(cfg, mode, seed=34)
    cpu, gpu = on(np, args, dtype), on(cupy, args, dtype)
    tol = 1e-10 if dtype == "float64" else 1e-5
    out_cpu = cudeform.deform_kernel_conv2d(**cpu, **geo)
    assert rel_err(cudeform.deform_kernel_conv2d(**gpu, **geo), out_cpu) < tol
    go = grad_output_for(cfg, seed=35).astype(dtype)
    g_cpu = cudeform.deform_kernel_conv2d_backward(go, **cpu, **geo)
    g_gpu = cudeform.deform_kernel_conv2d_backward(cupy.asarray(go), **gpu, **geo)
    for field, a, b in zip(g_cpu._fields, g_gpu, g_cpu):
        assert rel_err(a, b) < tol, field


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_is_bitwise_repeatable(torch, dtype, mode, deterministic):
    """No atomics anywhere: every sum has a fixed order, in both modes."""
    cfg = LARGE["depthwise3x3"]
    tensors, _, geo = rounded_case(torch, cfg, mode, dtype, seed=36)
    go = torch.randn(cfg["N"], cfg["C_out"], cfg["H"], cfg["W"], device="cuda", dtype=getattr(torch, dtype))
    first = cudeform.deform_kernel_conv2d_backward(go, **tensors, **geo, deterministic=deterministic)
    for _ in range(5):
        again = cudeform.deform_kernel_conv2d_backward(go, **tensors, **geo, deterministic=deterministic)
        for field, a, b in zip(first._fields, first, again):
            assert torch.equal(a, b), field


def test_torch_current_stream(torch):
    """Work is queued on torch's current stream, so no synchronisation is needed around it."""
    tensors, exact, geo = rounded_case(torch, CONFIGS["grouped"], "local", "float32", seed=37)
    with busy_torch_stream(torch):
        x = tensors["input"] * 1.0  # produced on the busy stream
        out = cudeform.deform_kernel_conv2d(**dict(tensors, input=x), **geo)
        result = (out * 1.0).cpu()
    expected = ref.deform_kernel_conv2d(*positional(exact), **geo)
    assert l2_rel(result.double().numpy(), expected) < 1e-5


def test_empty_batch_torch(torch):
    tensors, _, geo = rounded_case(torch, dict(CONFIGS["grouped"], N=0), "global", "float16", seed=38)
    out = cudeform.deform_kernel_conv2d(**tensors, **geo)
    assert out.shape[0] == 0 and out.dtype == torch.float16 and out.is_cuda
    grads = cudeform.deform_kernel_conv2d_backward(torch.zeros_like(out), **tensors, **geo)
    assert not grads.weight.any() and not grads.bias.any()
    assert grads.kernel_offset.shape == tensors["kernel_offset"].shape and grads.input.shape == tensors["input"].shape
