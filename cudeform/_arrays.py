"""Array interop: what an op receives and what it hands back.

NumPy arrays run on the CPU path and CuPy arrays on the GPU path. Any other object that
speaks DLPack (``__dlpack__`` and ``__dlpack_device__``: a PyTorch tensor, a JAX array) is
taken zero-copy according to its device, and the op's results go back in the caller's
framework, on the same device. Every op goes through :func:`prepare`.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, NamedTuple

import numpy as np

CPU_DTYPES = ("float32", "float64")
GPU_DTYPES = ("float16", "bfloat16", "float32", "float64")

# DLPack device types (dlpack.h: DLDeviceType).
_DL_CPU = 1
_DL_CUDA = 2

CUPY_HINT = "install CuPy with pip install 'cudeform[cuda13]' (CUDA 13) or 'cudeform[cuda12]' (CUDA 12)"


class Device(NamedTuple):
    kind: str  # "cpu" or "cuda"
    index: int

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def cupy_module():
    """Import CuPy, or explain which extra provides it."""
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"this array lives on a CUDA device, which needs CuPy: {CUPY_HINT}") from exc
    return cupy


def _framework(obj: Any) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _locate(op: str, name: str, obj: Any) -> tuple[str, Device]:
    """Framework and device of one argument, without converting it."""
    if isinstance(obj, np.ndarray):
        return "numpy", Device("cpu", 0)
    framework = _framework(obj)
    if framework == "cupy":
        return "cupy", Device("cuda", int(obj.device.id))
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        dev_type, dev_id = obj.__dlpack_device__()
        if int(dev_type) == _DL_CPU:
            return framework, Device("cpu", 0)
        if int(dev_type) == _DL_CUDA:
            return framework, Device("cuda", int(dev_id))
        raise ValueError(
            f"{op}: {name}: expected an array on the CPU or a CUDA device, "
            f"got a {type(obj).__name__} on DLPack device type {int(dev_type)}"
        )
    raise TypeError(
        f"{op}: {name}: expected a NumPy or CuPy array or an object supporting DLPack "
        f"(a PyTorch tensor, a JAX array), got {type(obj).__name__}"
    )


def _convert(obj: Any, framework: str, device: Device) -> tuple[Any, str]:
    """Zero-copy NumPy/CuPy view of ``obj`` and its dtype name.

    bfloat16 has no NumPy or CuPy dtype, so a bfloat16 tensor travels as its int16 bits and
    its logical dtype is carried beside it.
    """
    if framework in ("numpy", "cupy"):
        return obj, obj.dtype.name
    if framework == "torch":
        import torch

        if obj.requires_grad:
            obj = obj.detach()
        if obj.dtype == torch.bfloat16:
            if device.kind == "cpu":
                return None, "bfloat16"
            return cupy_module().from_dlpack(obj.view(torch.int16)), "bfloat16"
        if obj.dtype.is_complex or not obj.dtype.is_floating_point:
            return None, str(obj.dtype).replace("torch.", "")
    if device.kind == "cpu":
        arr = np.from_dlpack(obj)
    else:
        arr = cupy_module().from_dlpack(obj)
    return arr, arr.dtype.name


class Prepared(NamedTuple):
    """The arrays of one call, as NumPy (CPU) or CuPy (GPU) arrays, and how to hand results back."""

    arrays: dict
    device: Device
    dtype: str
    framework: str
    stream_ptr: Any  # the caller's CUDA stream (torch's current stream) or None for CuPy's

    def backend(self, op_module: str):
        """The module that runs ``op_module`` where these arrays live: ``cudeform.cpu.<op>``
        (Numba) or ``cudeform.cuda.<op>`` (CUDA kernels)."""
        return importlib.import_module(f"cudeform.{self.device.kind}.{op_module}")

    def context(self):
        """Context manager that makes this call's device and stream current (a no-op on the CPU)."""
        return _device_context(self.device, self.stream_ptr)

    def wrap(self, result):
        """Return ``result`` (NumPy/CuPy, or None) in the caller's framework."""
        if result is None or self.framework in ("numpy", "cupy"):
            return result
        if self.framework == "torch":
            import torch

            if self.dtype == "bfloat16":
                return torch.from_dlpack(result).view(torch.bfloat16)
            return torch.from_dlpack(result)
        if self.framework in ("jax", "jaxlib"):
            import jax.dlpack

            return jax.dlpack.from_dlpack(result)
        return result


def _caller_stream(framework: str, device: Device, first: Any):
    """Pointer of the stream a torch CUDA call must run on (torch's current one); None means
    CuPy's current stream."""
    if device.kind != "cuda" or framework != "torch":
        return None
    import torch

    return torch.cuda.current_stream(first.device).cuda_stream


@contextlib.contextmanager
def _device_context(device: Device, stream_ptr):
    if device.kind != "cuda":
        yield
        return
    cupy = cupy_module()
    with contextlib.ExitStack() as stack:
        stack.enter_context(cupy.cuda.Device(device.index))
        if stream_ptr is not None:
            stack.enter_context(cupy.cuda.ExternalStream(stream_ptr, device.index))
        yield


def prepare(op: str, **arrays: Any) -> Prepared:
    """Check that the given arrays share one device and one supported floating dtype,
    and take them zero-copy as NumPy or CuPy arrays.

    ``None`` values are passed through. The first non-None argument decides the framework
    of the results. Raises ``TypeError`` for unsupported objects or dtypes and for mixed
    dtypes, and ``ValueError`` for arrays on different devices.
    """
    given = {name: obj for name, obj in arrays.items() if obj is not None}
    located = {name: _locate(op, name, obj) for name, obj in given.items()}
    first_name = next(iter(given))
    framework, device = located[first_name]
    for name, (_, dev) in located.items():
        if dev != device:
            raise ValueError(
                f"{op}: all arrays must be on one device: {first_name} is on {device}, "
                f"{name} is on {dev}"
            )
    stream_ptr = _caller_stream(framework, device, given[first_name])
    allowed = CPU_DTYPES if device.kind == "cpu" else GPU_DTYPES
    out: dict = dict.fromkeys(arrays)
    dtype = None
    with _device_context(device, stream_ptr):
        for name, obj in given.items():
            arr, dt = _convert(obj, located[name][0], device)
            if dt not in allowed:
                where = "on the CPU" if device.kind == "cpu" else "on a CUDA device"
                raise TypeError(f"{op}: {name}: expected one of {', '.join(allowed)} {where}, got {dt}")
            if dtype is None:
                dtype = dt
            elif dt != dtype:
                raise TypeError(
                    f"{op}: all arrays must share one dtype: {first_name} is {dtype}, {name} is {dt}"
                )
            out[name] = arr
    return Prepared(out, device, dtype, framework, stream_ptr)


def array_module(arr: Any):
    """``numpy`` or ``cupy``, whichever ``arr`` belongs to."""
    if isinstance(arr, np.ndarray):
        return np
    if _framework(arr) == "cupy":
        return cupy_module()
    raise TypeError(f"expected a NumPy or CuPy array, got {type(arr).__name__}")
