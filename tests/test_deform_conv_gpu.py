"""deform_conv2d on the GPU: every dtype against float64, PyTorch CUDA tensors, deterministic
mode and 64-bit indexing. (test_deform_conv.py runs its whole suite on CuPy as well.)"""

import numpy as np
import pytest

import cudeform
import reference as ref
from helpers import rel_err, to_numpy
from test_deform_conv import CONFIGS, make_case, on, out_size, split

pytestmark = pytest.mark.gpu

# Relative L2 error of a result computed in a dtype, against float64 on the same inputs.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


def l2_rel(actual, expected):
    actual = np.asarray(actual, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    return torch


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


def test_torch_current_stream(torch):
    """Work is queued on torch's current stream, so no synchronisation is needed around it."""
    tensors, exact, geo = rounded_case(torch, CONFIGS["grouped"], "float32", seed=25)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(3):
            big = big @ big / 64  # keep the stream busy so that a wrong stream would race
        x = tensors["input"] * 1.0  # produced on `stream`
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


def test_index_arithmetic_past_int32():
    """One image of 2**31 + ... elements (fp16, 1x1 kernel): channel 63 starts past 2**31."""
    import cupy

    c, h, w = 64, 5800, 5800
    assert c * h * w > 2**31
    rng = np.random.default_rng(27)
    x = cupy.random.default_rng(0).standard_normal((1, c, h, w), dtype=cupy.float32).astype(cupy.float16)
    offset = cupy.asarray(rng.uniform(-0.5, 0.5, (1, 2, h, w)).astype(np.float16))
    weight = cupy.asarray(rng.standard_normal((2, c, 1, 1)).astype(np.float16))
    out = cudeform.deform_conv2d(x, offset, weight)
    assert out.shape == (1, 2, h, w)
    # Check the last row's outputs against the reference on the slab of input they read.
    rows = x[0, :, h - 2:, :].get().astype(np.float64)[None]
    off_last = offset[:, :, h - 1:, :].get().astype(np.float64)
    # The reference on a 2-row slab: sample rows h-2 and h-1 live at slab rows 0 and 1.
    off_slab = off_last.copy()
    off_slab[:, 0] += 1  # slab row 1 is row h - 1
    expected = ref.deform_conv2d(rows, off_slab, weight.get().astype(np.float64))
    del x
    assert l2_rel(out[0, :, h - 1, :].get().astype(np.float64), expected[0, :, 0, :]) < 2e-3
