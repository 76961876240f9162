"""Shared fixtures: every op test runs on NumPy and, where a CUDA device is present, on CuPy."""

import os

import numpy as np
import pytest

# JAX would otherwise take 75% of the GPU's memory when it starts, leaving CuPy's pool (which
# cudeform.jax's GPU path and the CuPy tests allocate from) the rest. Set before any test
# module imports jax.
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


def _cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device
        return False


HAS_CUDA = _cuda_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module a test runs on: NumPy (CPU path) or CuPy (GPU path)."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture
def torch():
    """PyTorch with a CUDA device (GPU tests that go through torch tensors, e.g. for bfloat16)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    return torch
