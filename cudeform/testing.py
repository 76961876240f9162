"""Numerical gradient verification for ops with a hand-written backward.

:func:`gradcheck` compares an analytic backward with central finite differences of the
forward, in float64, for every differentiable argument, and reports the worst element.
It works for NumPy and CuPy arrays, so the same check runs on the CPU and on the GPU::

    import numpy as np, cudeform
    rng = np.random.default_rng(0)
    inputs = dict(input=rng.normal(size=(1, 2, 5, 5)),
                  offset=rng.uniform(-1, 1, (1, 18, 3, 3)),
                  weight=rng.normal(size=(3, 2, 3, 3)))
    cudeform.testing.gradcheck(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, inputs)

Pick random inputs away from kinks (for a bilinear sampler: non-integer sampling
positions); a finite difference across a kink does not estimate a derivative.

:func:`peak_extra_memory` measures the workspace a call needs on a CUDA device (PyTorch's
memory statistics), for tests and benchmarks of memory bounds.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np

from . import _validate as check
from ._arrays import array_module


class GradcheckError(AssertionError):
    """Raised by :func:`gradcheck` when an analytic gradient disagrees with finite differences."""


class Worst(NamedTuple):
    """The element of one argument whose analytic gradient is furthest from the numeric one."""

    argument: str
    index: tuple
    analytic: float
    numeric: float
    error: float  # |analytic - numeric| / (atol + rtol * |numeric|); <= 1 passes


class GradcheckResult(NamedTuple):
    ok: bool
    worst: dict  # argument name -> Worst
    checked: dict  # argument name -> number of elements checked

    def __str__(self) -> str:
        lines = [f"gradcheck {'passed' if self.ok else 'FAILED'}"]
        for name, w in self.worst.items():
            lines.append(
                f"  {name}: {self.checked[name]} elements, worst at {w.index}: "
                f"analytic {w.analytic:.10g}, numeric {w.numeric:.10g} (error {w.error:.3g} of tolerance)"
            )
        return "\n".join(lines)


def _grad_of(grads: Any, name: str):
    if isinstance(grads, Mapping):
        return grads.get(name)
    return getattr(grads, name, None)


def gradcheck(
    forward: Callable,
    backward: Callable,
    inputs: Mapping[str, Any],
    *,
    wrt=None,
    kwargs: Mapping[str, Any] | None = None,
    eps: float = 1e-6,
    atol: float = 1e-7,
    rtol: float = 1e-6,
    max_elements: int | None = None,
    seed: int = 0,
    raise_exception: bool = True,
) -> GradcheckResult:
    """Check ``backward`` against central finite differences of ``forward``.

    Args:
        forward: ``forward(**inputs, **kwargs) -> output``.
        backward: ``backward(grad_output, **inputs, **kwargs)`` returning a named tuple (or
            mapping) with one gradient per argument name, like ``deform_conv2d_backward``.
        inputs: argument name -> float64 NumPy or CuPy array (or None, passed through).
        wrt: names to check; default every array in ``inputs`` whose gradient the backward
            returns.
        kwargs: non-array keyword arguments for both functions (stride, padding, ...).
        eps: finite-difference step.
        atol, rtol: an element passes when ``|analytic - numeric| <= atol + rtol * |numeric|``.
        max_elements: check at most this many randomly chosen elements per argument
            (default: all).
        seed: seed of the random ``grad_output`` and of the element choice.
        raise_exception: raise :class:`GradcheckError` on failure (else return the result).

    Returns:
        GradcheckResult(ok, worst, checked), with the worst element of every argument:
        its index, analytic and numeric values and its error relative to the tolerance.

    The loss differentiated is ``sum(grad_output * forward(...))`` for a random
    ``grad_output``, so every output element is covered. The caller's arrays are not
    modified. Each checked element costs two forward calls.
    """
    op = "gradcheck"
    for name, function in (("forward", forward), ("backward", backward)):
        if not callable(function):
            check.fail(op, name, "a callable", repr(function), TypeError)
    if not isinstance(inputs, Mapping):
        check.fail(op, "inputs", "a mapping of argument names to arrays", type(inputs).__name__, TypeError)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        check.fail(op, "kwargs", "a mapping of argument names to values", type(kwargs).__name__, TypeError)
    kwargs = dict(kwargs or {})
    arrays = {k: v for k, v in inputs.items() if v is not None}
    for name, arr in arrays.items():
        xp = array_module(arr, op, f"inputs[{name!r}]")
        if arr.dtype != xp.float64:
            check.fail(op, f"inputs[{name!r}]", "float64", arr.dtype, TypeError)
    if wrt is not None:
        if isinstance(wrt, str) or not isinstance(wrt, Iterable):
            check.fail(op, "wrt", "a list of argument names", repr(wrt), TypeError)
        wrt = list(wrt)
        for name in wrt:
            if name not in arrays:
                check.fail(op, "wrt", f"names of arrays in inputs ({', '.join(arrays)})", repr(name))
    check.real(op, "eps", eps, positive=True)
    check.real(op, "atol", atol, nonnegative=True)
    check.real(op, "rtol", rtol, nonnegative=True)
    if max_elements is not None:
        check.integer(op, "max_elements", max_elements, minimum=1)
    check.integer(op, "seed", seed, minimum=0)
    check.boolean(op, "raise_exception", raise_exception)
    work = {k: (v.copy() if k in arrays else v) for k, v in inputs.items()}
    out = forward(**work, **kwargs)
    xp = array_module(out, op, "forward's output")
    rng = np.random.default_rng(seed)
    grad_output = xp.asarray(rng.standard_normal(out.shape))
    grads = backward(grad_output, **work, **kwargs)
    names = wrt if wrt is not None else [k for k in arrays if _grad_of(grads, k) is not None]

    def loss() -> float:
        return float(xp.sum(grad_output * forward(**work, **kwargs)))

    worst, checked, ok = {}, {}, True
    for name in names:
        analytic_full = _grad_of(grads, name)
        if analytic_full is None:
            check.fail(op, "backward", f"to return a gradient for {name!r}", None)
        analytic = np.asarray(analytic_full.get() if hasattr(analytic_full, "get") else analytic_full).ravel()
        flat = work[name].reshape(-1)  # a view: work arrays are fresh contiguous copies
        indices = np.arange(flat.size)
        if max_elements is not None and flat.size > max_elements:
            indices = np.sort(rng.choice(flat.size, size=max_elements, replace=False))
        best = None
        for idx in indices:
            original = float(flat[idx])
            flat[idx] = original + eps
            plus = loss()
            flat[idx] = original - eps
            minus = loss()
            flat[idx] = original
            numeric = (plus - minus) / (2 * eps)
            a = float(analytic[idx])
            err = abs(a - numeric) / (atol + rtol * abs(numeric))
            if best is None or err > best.error:
                best = Worst(name, tuple(int(i) for i in np.unravel_index(idx, work[name].shape)), a, numeric, err)
        if best is not None:
            worst[name] = best
            ok = ok and best.error <= 1.0
        checked[name] = len(indices)
    result = GradcheckResult(ok, worst, checked)
    if not ok and raise_exception:
        raise GradcheckError(str(result))
    return result


def peak_extra_memory(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Call ``fn()`` and return (bytes, its result), where bytes is the peak of PyTorch's CUDA
    memory during the call beyond what was allocated before it and what is still allocated
    after it (its results): the workspace the call needed. cudeform's calls on torch tensors
    allocate through PyTorch, so their workspaces count. Resets the peak statistics of the
    current device; needs PyTorch with CUDA."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    return torch.cuda.max_memory_allocated() - before - kept, result
