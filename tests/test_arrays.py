"""Array interop: what goes in and what comes out (what cannot go in: test_validation.py)."""

import numpy as np
import pytest

import cudeform
from cudeform import _arrays


class DLPackOnly:
    """A foreign array that only speaks DLPack, on the CPU."""

    def __init__(self, array, device=(1, 0)):
        self._array = array
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device


def small_case(dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 2, 4, 5)).astype(dtype),
            rng.uniform(-1, 1, (1, 18, 2, 3)).astype(dtype),
            rng.standard_normal((3, 2, 3, 3)).astype(dtype))


def test_numpy_in_numpy_out():
    x, off, w = small_case()
    out = cudeform.deform_conv2d(x, off, w)
    assert isinstance(out, np.ndarray) and out.shape == (1, 3, 2, 3)


def test_dlpack_object_taken_zero_copy():
    x, off, w = small_case()
    p = _arrays.prepare("op", input=DLPackOnly(x), weight=w)
    assert p.device == _arrays.Device("cpu", 0)
    assert np.shares_memory(p.arrays["input"], x)
    out = cudeform.deform_conv2d(DLPackOnly(x), off, w)
    np.testing.assert_array_equal(out, cudeform.deform_conv2d(x, off, w))


def test_optional_none_arguments_pass_through():
    x, _, w = small_case()
    p = _arrays.prepare("op", ("bias",), input=x, bias=None, weight=w)
    assert list(p.arrays) == ["input", "bias", "weight"] and p.arrays["bias"] is None


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


class TestTorch:
    def test_tensor_in_tensor_out(self, torch):
        x, off, w = (torch.from_numpy(a) for a in small_case())
        out = cudeform.deform_conv2d(x, off, w)
        assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.dtype == torch.float64
        np.testing.assert_array_equal(out.numpy(), cudeform.deform_conv2d(*small_case()))
        grads = cudeform.deform_conv2d_backward(torch.ones_like(out), x, off, w)
        assert all(isinstance(g, torch.Tensor) for g in (grads.input, grads.offset, grads.weight))
        assert grads.bias is None and grads.mask is None

    def test_requires_grad_is_detached_not_copied(self, torch):
        x, off, w = (torch.from_numpy(a) for a in small_case())
        x.requires_grad_(True)
        p = _arrays.prepare("op", input=x)
        assert np.shares_memory(p.arrays["input"], x.detach().numpy())
        out = cudeform.deform_conv2d(x, off, w)
        assert not out.requires_grad


@pytest.mark.gpu
def test_torch_cuda_one_pass_matches_the_general_path(torch, monkeypatch):
    """prepare's one-pass route for contiguous torch CUDA tensors gives what its general path gives."""
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    x = torch.randn(2, 3, 4, 5, device="cuda", dtype=torch.bfloat16)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, device="cuda", dtype=torch.bfloat16))
    arrays = {"input": x, "bias": None, "weight": w}
    assert _arrays._torch_cuda_views(("bias",), arrays) is not None
    one_pass = _arrays.prepare("op", ("bias",), **arrays)
    monkeypatch.setattr(_arrays, "_torch_cuda_views", lambda optional, arrays: None)
    general = _arrays.prepare("op", ("bias",), **arrays)
    assert one_pass._replace(arrays=None) == general._replace(arrays=None)
    assert list(one_pass.arrays) == list(general.arrays) == ["input", "bias", "weight"]
    assert one_pass.arrays["bias"] is None and general.arrays["bias"] is None
    for name in ("input", "weight"):
        a, b = one_pass.arrays[name], general.arrays[name]
        assert (a.data.ptr, a.shape, a.dtype) == (b.data.ptr, b.shape, b.dtype) == (
            arrays[name].data_ptr(), tuple(arrays[name].shape), np.uint16)
