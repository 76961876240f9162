"""Small helpers shared by the tests."""

import numpy as np


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
