"""Small helpers shared by the tests."""

import numpy as np

from cudeform.testing import gradcheck


def to_numpy(a):
    if a is None:
        return None
    return a.get() if hasattr(a, "get") else np.asarray(a)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual, expected = to_numpy(actual).astype(np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max(initial=0.0)
    diff = np.abs(actual - expected).max(initial=0.0)
    return diff / scale if scale else diff


def assert_grads_match(grads, expected, tol=1e-10, dtype=None):
    """Every field of a gradients named tuple against the reference's gradients in order: None
    where the reference has none, else the same shape (and ``dtype``, when given) and a
    relative error below ``tol``."""
    assert len(grads) == len(expected)
    for field, got, want in zip(grads._fields, grads, expected):
        if want is None:
            assert got is None, field
        else:
            assert got.shape == want.shape, field
            assert dtype is None or got.dtype == dtype, field
            assert rel_err(got, want) < tol, field


def assert_gradcheck(xp, forward, backward, args, geo, checked, **options):
    """cudeform.testing.gradcheck passes for ``args`` (``xp`` arrays) and checks exactly the
    arguments ``checked``. On the GPU it checks 150 elements per argument: each element costs
    two forward calls, and every one of them a few kernel launches."""
    result = gradcheck(forward, backward, args, kwargs=geo, max_elements=150 if xp is not np else None, **options)
    assert result.ok, str(result)
    assert set(result.checked) == checked


# Relative L2 error of a result computed in a dtype, against float64 on the same inputs.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


def l2_rel(actual, expected):
    actual = np.asarray(actual, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))
