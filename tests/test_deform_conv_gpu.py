"""deform_conv2d on the GPU: every dtype against float64, PyTorch CUDA tensors and deterministic
mode. (test_deform_conv.py runs its whole suite on CuPy as well; test_large_gpu.py checks the
64-bit indexing.)"""

import numpy as np
import pytest

import cudeform
import reference as ref
from cudeform.testing import peak_extra_memory
from gpu_cases import busy_torch_stream
from helpers import TOLERANCE, l2_rel, rel_err
from test_deform_conv import CONFIGS, make_case, on, out_size, split

pytestmark = pytest.mark.gpu



def rounded_case(torch, cfg, dtype, seed):
    """Inputs in `dtype` as CUDA tensors, and the same values in float64 NumPy."""
    args, geo = make_case(cfg, seed=seed)
    tdtype = getattr(torch, dtype)
    tensors = {k: None if v is None else torch.from_numpy(v).to("cuda", tdtype) for k, v in args.items()}
    exact = {k: None if v is None else v.to(torch.float64).cpu().numpy() for k, v in tensors.items()}
    return tensors, exact, geo


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_dtype_against_float64(torch, dtype, name):
    tensors, exact, geo = rounded_case(torch, CONFIGS[name], dtype, seed=20)
    out = cudeform.deform_conv2d(*split(tensors)[0], **split(tensors)[1], **geo)
    assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, dtype) and out.is_cuda
    expected = ref.deform_conv2d(*split(exact)[0], **split(exact)[1], **geo)
    assert l2_rel(out.double().cpu().numpy(), expected) < TOLERANCE[dtype]

    rng = np.random.default_rng(21)
    grad_exact = torch.from_numpy(rng.standard_normal(expected.shape)).to("cuda", getattr(torch, dtype))
    grads = cudeform.deform_conv2d_backward(grad_exact, *split(tensors)[0], **split(tensors)[1], **geo)
    want = ref.deform_conv2d_backward(grad_exact.double().cpu().numpy(), *split(exact)[0], **split(exact)[1], **geo)
    for field, got, w in zip(grads._fields, grads, want):
        assert got.dtype == getattr(torch, dtype), field
        # The offset gradient differentiates the interpolation: its error grows with the input's.
        tol = TOLERANCE[dtype] * (4 if field == "offset" and dtype in ("float16", "bfloat16") else 1)
        assert l2_rel(got.double().cpu().numpy(), w) < tol, field


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_matches_cpu_path(dtype):
    import cupy

    args, geo = make_case(CONFIGS["grouped"], seed=22)
    cpu = on(np, args, dtype)
    gpu = on(cupy, args, dtype)
    out_cpu = cudeform.deform_conv2d(*split(cpu)[0], **split(cpu)[1], **geo)
    out_gpu = cudeform.deform_conv2d(*split(gpu)[0], **split(gpu)[1], **geo)
    assert rel_err(out_gpu, out_cpu) < (1e-10 if dtype == "float64" else 1e-5)
    go = np.random.default_rng(23).standard_normal(out_cpu.shape).astype(dtype)
    g_cpu = cudeform.deform_conv2d_backward(go, *split(cpu)[0], **split(cpu)[1], **geo)
    g_gpu = cudeform.deform_conv2d_backward(cupy.asarray(go), *split(gpu)[0], **split(gpu)[1], **geo)
    for field, a, b in zip(g_cpu._fields, g_gpu, g_cpu):
        assert rel_err(a, b) < (1e-10 if dtype == "float64" else 1e-5), field


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_deterministic_backward_is_bitwise_and_accurate(torch, dtype):
    cfg = dict(CONFIGS["plain3x3"], N=6, H=9, W=11)
    tensors, exact, geo = rounded_case(torch, cfg, dtype, seed=24)
    # Offsets that pile many samples onto few pixels make the atomics race on one address.
    tensors["offset"] = (tensors["offset"] * 0.1).contiguous()
    exact["offset"] = tensors["offset"].double().cpu().numpy()
    pos, kw = split(tensors)
    go = torch.randn(6, 6, *out_size(cfg), device="cuda", dtype=getattr(torch, dtype))
    first = cudeform.deform_conv2d_backward(go, *pos, **kw, **geo, deterministic=True)
    for _ in range(5):
        again = cudeform.deform_conv2d_backward(go, *pos, **kw, **geo, deterministic=True)
        for field, a, b in zip(first._fields, first, again):
            assert torch.equal(a, b), field
    want = ref.deform_conv2d_backward(go.double().cpu().numpy(), *split(exact)[0], **split(exact)[1], **geo)
    assert l2_rel(first.input.double().cpu().numpy(), want[0]) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_over_images_with_aligned_rows(torch, dtype):
    """H_out * W_out a multiple of 8: the backward's images are gathered in 16-byte vectors
    (the other tests' planes do not divide so), on the reference path and the fused one."""
    cfg = dict(CONFIGS["plain3x3"], N=3, C_in=16, C_out=8, H=8, W=8)
    assert np.prod(out_size(cfg)) % 8 == 0
    tensors, exact, geo = rounded_case(torch, cfg, dtype, seed=40)
    go = torch.randn(3, 8, *out_size(cfg), device="cuda", dtype=getattr(torch, dtype))
    grads = cudeform.deform_conv2d_backward(go, *split(tensors)[0], **split(tensors)[1], **geo)
    want = ref.deform_conv2d_backward(go.double().cpu().numpy(), *split(exact)[0], **split(exact)[1], **geo)
    for field, got, w in zip(grads._fields, grads, want):
        tol = TOLERANCE[dtype] * (4 if field == "offset" and dtype == "float16" else 1)
        assert l2_rel(got.double().cpu().numpy(), w) < tol, field


def test_torch_current_stream(torch):
    """Work is queued on torch's current stream, so no synchronisation is needed around it."""
    tensors, exact, geo = rounded_case(torch, CONFIGS["grouped"], "float32", seed=25)
    with busy_torch_stream(torch):
        x = tensors["input"] * 1.0  # produced on the busy stream
        out = cudeform.deform_conv2d(x, *split(tensors)[0][1:], **split(tensors)[1], **geo)
        result = (out * 1.0).cpu()
    expected = ref.deform_conv2d(*split(exact)[0], **split(exact)[1], **geo)
    assert l2_rel(result.double().numpy(), expected) < 1e-5


def test_torch_requires_grad_and_non_contiguous(torch):
    tensors, exact, geo = rounded_case(torch, CONFIGS["plain3x3"], "float64", seed=26)
    x = tensors["input"].transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    out = cudeform.deform_conv2d(x, *split(tensors)[0][1:], **split(tensors)[1], **geo)
    assert not out.requires_grad
    assert rel_err(out.cpu().numpy(), ref.deform_conv2d(*split(exact)[0], **split(exact)[1], **geo)) < 1e-12


def test_debug_mode_synchronises_and_checks(monkeypatch):
    import cupy

    from cudeform.cuda import _compile

    synced = []
    real = _compile._synchronize
    monkeypatch.setattr(_compile, "_synchronize", lambda: synced.append(1) or real())
    args, geo = make_case(CONFIGS["grouped"], seed=28)
    pos, kw = split(on(cupy, args))
    _compile.set_debug(True)
    try:
        out = cudeform.deform_conv2d(*pos, **kw, **geo)
    finally:
        _compile.set_debug(False)
    assert len(synced) >= 2  # im2col and the bias epilogue of each chunk
    assert rel_err(out, ref.deform_conv2d(*split(args)[0], **split(args)[1], **geo)) < 1e-12


def test_kernel_arguments_are_checked():
    """A kernel's packed parameters take CuPy arrays and NumPy scalars of fixed widths; debug mode
    checks every launch against the first one's types."""
    import cupy

    from cudeform.cuda import _compile
    from cudeform.cuda import deform_conv as gpu

    kernel = gpu._kernel("add_bias", "float32")
    with pytest.raises(TypeError, match="argument 2 is a float"):
        kernel._layout((cupy.zeros(1), cupy.zeros(1), 1.0))
    out, bias = cupy.zeros((2, 3, 4), np.float32), cupy.arange(3, dtype=np.float32)
    _compile.launch(kernel, 6 * _compile.BLOCK, (out, bias, *map(np.int64, (2, 3, 4))))
    np.testing.assert_array_equal(out.get(), np.broadcast_to(np.arange(3, dtype=np.float32)[:, None], (2, 3, 4)))
    _compile.set_debug(True)
    try:
        with pytest.raises(TypeError, match="differ from its first launch"):
            _compile.launch(kernel, 6 * _compile.BLOCK, (out, bias, *map(np.int32, (2, 3, 4))))
    finally:
        _compile.set_debug(False)


@pytest.mark.parametrize("groups", [1, 2])
def test_workspace_is_bounded(torch, monkeypatch, groups):
    """Extra memory (beyond inputs and results) stays within the documented workspace: one
    columns buffer of at most COLUMNS_BYTES, plus one chunk's GEMM buffer."""
    from cudeform.cuda import deform_conv as gpu

    monkeypatch.setattr(gpu, "COLUMNS_BYTES", 6 * 2**20)
    n, c, h, w = 12, 32, 32, 32
    x = torch.randn(n, c, h, w, device="cuda")
    weight = torch.randn(c, c // groups, 3, 3, device="cuda")
    offset = torch.rand(n, 18, h, w, device="cuda")
    mask = torch.rand(n, 9, h, w, device="cuda")
    go = torch.randn(n, c, h, w, device="cuda")
    per_image = c * 9 * h * w * 4  # columns of one image, float32
    images = 6 * 2**20 // per_image
    chunk_output = c * images * h * w * 4

    fwd_extra, out = peak_extra_memory(lambda: cudeform.deform_conv2d(x, offset, weight, padding=1, mask=mask))
    assert out.shape == (n, c, h, w)
    assert fwd_extra <= images * per_image + (chunk_output if groups > 1 else 0) + 2**20
    bwd_extra, _ = peak_extra_memory(lambda: cudeform.deform_conv2d_backward(go, x, offset, weight, padding=1,
                                                                             mask=mask))
    assert bwd_extra <= images * per_image + chunk_output + 2**20


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_torchvision_float64(torch, name, with_mask):
    """Output and all five gradients against torchvision.ops.deform_conv2d (its border rule is
    our default), in float64 on the GPU."""
    torchvision = pytest.importorskip("torchvision")
    args, geo = make_case(CONFIGS[name], seed=29, mask=with_mask)
    leaves = {k: None if v is None else torch.from_numpy(v).cuda().requires_grad_(True) for k, v in args.items()}
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    expected = torchvision.ops.deform_conv2d(
        leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], stride=pair(geo["stride"]),
        padding=pair(geo["padding"]), dilation=pair(geo["dilation"]), mask=leaves["mask"])
    grad_out = torch.randn_like(expected)
    given = [k for k, v in leaves.items() if v is not None]
    expected_grads = torch.autograd.grad(expected, [leaves[k] for k in given], grad_out)
    plain = {k: None if v is None else v.detach() for k, v in leaves.items()}
    out = cudeform.deform_conv2d(*split(plain)[0], **split(plain)[1], **geo)
    assert rel_err(out.cpu().numpy(), expected.detach().cpu().numpy()) < 1e-10
    grads = cudeform.deform_conv2d_backward(grad_out, *split(plain)[0], **split(plain)[1], **geo)
    for k, want in zip(given, expected_grads):
        assert rel_err(getattr(grads, k).cpu().numpy(), want.cpu().numpy()) < 1e-10, k


# Shapes on the fused tensor-core forward (float16/bfloat16 on sm_90; C_in/groups and
# C_in/offset_groups multiples of 8), with deliberately awkward edges: partial tiles of
# positions and of output channels, a half-empty channel stage (32 and 48 channels in stages of
# 64, 136 in three), offset groups that change inside a stage, several tiles of each kind,
# asymmetric geometry.
FUSED_CONFIGS = {
    "fused_plain": dict(N=3, C_in=32, C_out=24, groups=1, G=1, kernel=(3, 3), H=9, W=11,
                        stride=1, padding=1, dilation=1),
    "fused_grouped": dict(N=2, C_in=96, C_out=272, groups=2, G=3, kernel=(3, 2), H=10, W=7,
                          stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
    "fused_offset_groups": dict(N=1, C_in=64, C_out=130, groups=1, G=4, kernel=(1, 3), H=6, W=40,
                                stride=(1, 2), padding=(0, 2), dilation=(1, 3)),
    "fused_long": dict(N=2, C_in=136, C_out=64, groups=1, G=1, kernel=(3, 3), H=20, W=17,
                       stride=1, padding=1, dilation=1),
}


@pytest.fixture
def fused_small(monkeypatch):
    """The fused forward even for shapes too small to fill the GPU (which go to im2col)."""
    from cudeform.cuda import deform_conv as gpu

    monkeypatch.setattr(gpu, "FUSED_MIN_TILES", 0)


def fused_case(torch, cfg, dtype, seed, **kwargs):
    """A case whose forward takes the fused path (asserted: else the test would check the
    im2col path again), as CUDA tensors and in float64."""
    from cudeform.cuda import deform_conv as gpu

    args, geo = make_case(cfg, seed=seed, **kwargs)
    tensors = {k: None if v is None else torch.from_numpy(v).to("cuda", getattr(torch, dtype)) for k, v in args.items()}
    exact = {k: None if v is None else v.to(torch.float64).cpu().numpy() for k, v in tensors.items()}
    conv_geo = cudeform.deform_conv._geometry("deform_conv2d", {"input": tensors["input"], "offset": tensors["offset"],
                                              "weight": tensors["weight"], "bias": tensors["bias"],
                                              "mask": tensors["mask"]}, **geo)
    shape = tuple(tensors["input"].shape)
    assert gpu._fused_applies(conv_geo, shape, cfg["C_out"], dtype)
    assert gpu._fused_plan(conv_geo, shape, cfg["C_out"], gpu.FUSED_FEW_TILES, gpu.FUSED_MIN_TILES) is not None
    return tensors, exact, geo


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", FUSED_CONFIGS)
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("positions", [64, 128])
def test_fused_forward_against_float64(torch, monkeypatch, fused_small, dtype, name, with_mask, positions):
    from cudeform.cuda import deform_conv as gpu

    # The tiles' width: 128 positions unless that leaves SMs idle (these shapes would).
    monkeypatch.setattr(gpu, "FUSED_FEW_TILES", 10**9 if positions == 64 else 0)
    tensors, exact, geo = fused_case(torch, FUSED_CONFIGS[name], dtype, 30, mask=with_mask, bias=with_mask)
    out = cudeform.deform_conv2d(*split(tensors)[0], **split(tensors)[1], **geo)
    assert out.dtype == getattr(torch, dtype)
    expected = ref.deform_conv2d(*split(exact)[0], **split(exact)[1], **geo)
    assert l2_rel(out.double().cpu().numpy(), expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", FUSED_CONFIGS)
def test_fused_forward_matches_im2col(torch, monkeypatch, fused_small, dtype, name):
    """Against the reference backend (im2col and cuBLAS), offsets huge and non-finite among
    them: a non-finite sampling point counts as outside on both paths. Both blend the same
    samples, so only the GEMMs' summation order differs."""
    from cudeform.cuda import deform_conv as gpu

    tensors, _, geo = fused_case(torch, FUSED_CONFIGS[name], dtype, 31)
    flat = tensors["offset"].view(-1)
    picks = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(32))[: 4 * (flat.numel() // 10)]
    for value, part in zip((float("nan"), float("inf"), -float("inf"), 1e4), picks.view(4, -1)):
        flat[part.cuda()] = value
    before = {k: None if v is None else v.clone() for k, v in tensors.items()}
    fused = cudeform.deform_conv2d(*split(tensors)[0], **split(tensors)[1], **geo)
    monkeypatch.setattr(gpu, "FUSED", False)
    plain = cudeform.deform_conv2d(*split(tensors)[0], **split(tensors)[1], **geo)
    assert torch.isfinite(fused).all() and torch.isfinite(plain).all()
    assert l2_rel(fused.double().cpu().numpy(), plain.double().cpu().numpy()) < TOLERANCE[dtype] / 4
    for k, v in before.items():
        assert v is None or torch.equal(tensors[k].view(torch.int16), v.view(torch.int16)), k  # left alone


@pytest.fixture
def fused_backward_calls(monkeypatch):
    """The calls that took the fused backend's backward (asserted by the tests: else they would
    check the reference backward again)."""
    from cudeform.cuda import deform_conv as gpu

    calls = []
    inner = gpu._fused_backward

    def spy(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(gpu, "_fused_backward", spy)
    return calls


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", FUSED_CONFIGS)
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("border_grad", ["torchvision", "mmcv"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_backward_against_float64(torch, fused_small, fused_backward_calls, dtype, name, with_mask,
                                        border_grad, deterministic):
    tensors, exact, geo = fused_case(torch, FUSED_CONFIGS[name], dtype, 34, mask=with_mask, bias=with_mask)
    go = torch.from_numpy(np.random.default_rng(35).standard_normal(
        (FUSED_CONFIGS[name]["N"], FUSED_CONFIGS[name]["C_out"], *out_size(FUSED_CONFIGS[name])))).to("cuda")
    go = go.to(getattr(torch, dtype))
    grads = cudeform.deform_conv2d_backward(go, *split(tensors)[0], **split(tensors)[1], **geo,
                                            border_grad=border_grad, deterministic=deterministic)
    assert fused_backward_calls
    want = ref.deform_conv2d_backward(go.double().cpu().numpy(), *split(exact)[0], **split(exact)[1], **geo,
                                      border_grad=border_grad)
    for field, got, w in zip(grads._fields, grads, want):
        assert (got is None) == (w is None), field
        if got is None:
            continue
        assert got.dtype == getattr(torch, dtype) and got.shape == w.shape, field
        tol = TOLERANCE[dtype] * (4 if field == "offset" else 1)
        assert l2_rel(got.double().cpu().numpy(), w) < tol, field


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", FUSED_CONFIGS)
@pytest.mark.parametrize("border_grad", ["torchvision", "mmcv"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_backward_matches_im2col(torch, monkeypatch, fused_small, fused_backward_calls, dtype, name,
                                       border_grad, deterministic):
    """Against the reference backend in the same mode, with sampling points exactly on the
    border h = -1 or w = -1 (where the two border rules differ) and huge and non-finite
    offsets; the inputs are left unchanged."""
    from cudeform.cuda import deform_conv as gpu

    cfg = FUSED_CONFIGS[name]
    tensors, _, geo = fused_case(torch, cfg, dtype, 36)
    ph, pw = (geo["padding"],) * 2 if isinstance(geo["padding"], int) else geo["padding"]
    # Offset group 0's kernel point (0, 0) samples row y * stride - ph + offset: ph - 1 puts output
    # row 0 on h = -1, and pw - 1 output column 0 on w = -1.
    off = tensors["offset"]
    off[:, 0, 0, :] = ph - 1
    off[:, 1, :, 0] = pw - 1
    flat = off.view(-1)
    picks = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(37))[: 4 * (flat.numel() // 20)]
    for value, part in zip((float("nan"), float("inf"), -float("inf"), 1e4), picks.view(4, -1)):
        flat[part.cuda()] = value
    go = torch.randn(cfg["N"], cfg["C_out"], *out_size(cfg), generator=torch.Generator().manual_seed(38))
    go = go.to("cuda", getattr(torch, dtype))
    before = {k: None if v is None else v.clone() for k, v in tensors.items()}
    modes = dict(border_grad=border_grad, deterministic=deterministic)
    fused = cudeform.deform_conv2d_backward(go, *split(tensors)[0], **split(tensors)[1], **geo, **modes)
    assert fused_backward_calls
    monkeypatch.setattr(gpu, "FUSED", False)
    plain = cudeform.deform_conv2d_backward(go, *split(tensors)[0], **split(tensors)[1], **geo, **modes)
    assert len(fused_backward_calls) == 1
    for field, a, b in zip(fused._fields, fused, plain):
        if a is None:
            continue
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), field
        assert l2_rel(a.double().nan_to_num().cpu().numpy(), b.double().nan_to_num().cpu().numpy()) \
            < TOLERANCE[dtype] / 2, field
    for k, v in before.items():
        assert v is None or torch.equal(tensors[k].view(torch.int16), v.view(torch.int16)), k  # left alone


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["fused_plain", "fused_offset_groups"])
def test_fused_deterministic_backward_is_bitwise(torch, fused_small, fused_backward_calls, dtype, name):
    """Offsets that pile many samples onto few pixels make the atomics race on one address."""
    cfg = FUSED_CONFIGS[name]
    tensors, exact, geo = fused_case(torch, cfg, dtype, 39)
    tensors["offset"] = (tensors["offset"] * 0.1).contiguous()
    exact["offset"] = tensors["offset"].double().cpu().numpy()
    go = torch.randn(cfg["N"], cfg["C_out"], *out_size(cfg), device="cuda", dtype=getattr(torch, dtype))
    first = cudeform.deform_conv2d_backward(go, *split(tensors)[0], **split(tensors)[1], **geo, deterministic=True)
    for _ in range(5):
        again = cudeform.deform_conv2d_backward(go, *split(tensors)[0], **split(tensors)[1], **geo,
                                                deterministic=True)
        for field, a, b in zip(first._fields, first, again):
            assert torch.equal(a, b), field
    assert len(fused_backward_calls) == 6
    want = ref.deform_conv2d_backward(go.double().cpu().numpy(), *split(exact)[0], **split(exact)[1], **geo)
    assert l2_rel(first.input.double().cpu().numpy(), want[0]) < TOLERANCE[dtype]


def test_fused_forward_workspace(torch):
    """The fused forward's extra memory is the channels-last input and the reordered weight:
    nothing proportional to C_in * kh * kw * H_out * W_out."""
    n, c, h, w = 8, 64, 48, 48
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16)
    weight = torch.randn(c, c, 3, 3, device="cuda", dtype=torch.float16)
    offset = torch.rand(n, 18, h, w, device="cuda", dtype=torch.float16)
    mask = torch.rand(n, 9, h, w, device="cuda", dtype=torch.float16)
    from cudeform.cuda import deform_conv as gpu

    geo = cudeform.deform_conv._geometry("deform_conv2d", {"input": x, "offset": offset, "weight": weight,
                                                           "bias": None, "mask": mask}, 1, 1, 1)
    assert gpu._fused_plan(geo, tuple(x.shape), c, gpu.FUSED_FEW_TILES, gpu.FUSED_MIN_TILES) is not None
    extra, out = peak_extra_memory(lambda: cudeform.deform_conv2d(x, offset, weight, padding=1, mask=mask))
    assert out.shape == (n, c, h, w)
    assert extra <= (x.numel() + weight.numel()) * 2 + 2**20


def test_fused_forward_takes_misaligned_weights(torch, fused_small):
    """A weight view that does not start on 16 bytes (the fused path reads 16-byte vectors of
    it) goes by the im2col path, with the same result."""
    tensors, exact, geo = fused_case(torch, FUSED_CONFIGS["fused_plain"], "float16", 33)
    w = tensors["weight"]
    storage = torch.empty(w.numel() + 1, device="cuda", dtype=w.dtype)
    shifted = storage[1:].view(w.shape)
    shifted.copy_(w)
    assert shifted.data_ptr() % 16 != 0
    tensors["weight"] = shifted
    out = cudeform.deform_conv2d(*split(tensors)[0], **split(tensors)[1], **geo)
    expected = ref.deform_conv2d(*split(exact)[0], **split(exact)[1], **geo)
    assert l2_rel(out.double().cpu().numpy(), expected) < TOLERANCE["float16"]
