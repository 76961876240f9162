"""Array interop: what an op receives and what it hands back.

NumPy arrays run on the CPU path and CuPy arrays on the GPU path. Any other object that
speaks DLPack (``__dlpack__`` and ``__dlpack_device__``: a PyTorch tensor, a JAX array) is
taken zero-copy according to its device, and the op's results go back in the caller's
framework, on the same device. Every op goes through :func:`prepare`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import threading
from typing import Any, NamedTuple

import numpy as np

from . import _validate as check

CPU_DTYPES = ("float32", "float64")
GPU_DTYPES = ("float16", "bfloat16", "float32", "float64")

# DLPack device types (dlpack.h: DLDeviceType).
_DL_CPU = 1
_DL_CUDA = 2

CUPY_HINT = 'pip install "cudeform[cuda13]" (CUDA 13) or "cudeform[cuda12]" (CUDA 12)'


class Device(NamedTuple):
    kind: str  # "cpu" or "cuda"
    index: int

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def cupy_module():
    """CuPy, imported on first use (:func:`prepare` has made sure that it works)."""
    import cupy

    return cupy


@functools.lru_cache(maxsize=None)
def _cuda_unavailable() -> str:
    """Why CuPy cannot run the kernels in this process, or "" when it can (asked once): an
    array on a CUDA device can come from PyTorch or JAX where CuPy is missing or was built
    for another CUDA."""
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except ImportError:
        return "CuPy is not installed"
    except Exception as exc:  # whatever CuPy's CUDA runtime raised: the user needs to see it
        return f"CuPy cannot use CUDA ({type(exc).__name__}: {exc})"
    return ""


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


_FRAMEWORKS: dict = {}  # type -> the top-level module that defines it


def _framework(obj: Any) -> str:
    kind = type(obj)
    framework = _FRAMEWORKS.get(kind)
    if framework is None:
        framework = _FRAMEWORKS[kind] = kind.__module__.split(".", 1)[0]
    return framework


def _locate(op: str, name: str, obj: Any) -> tuple[str, Device]:
    """Framework and device of one argument, without converting it."""
    if isinstance(obj, np.ndarray):
        return "numpy", Device("cpu", 0)
    if isinstance(obj, Storage):
        return "cupy", Device("cuda", int(obj.array.device.id))
    framework = _framework(obj)
    if framework == "cupy":
        return "cupy", Device("cuda", int(obj.device.id))
    if framework == "torch" and (obj.is_cuda or obj.is_cpu):  # faster than __dlpack_device__
        return "torch", Device("cuda", obj.get_device()) if obj.is_cuda else Device("cpu", 0)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        dev_type, dev_id = obj.__dlpack_device__()
        if int(dev_type) == _DL_CPU:
            return framework, Device("cpu", 0)
        if int(dev_type) == _DL_CUDA:
            return framework, Device("cuda", int(dev_id))
        check.fail(op, name, "an array on the CPU or a CUDA device",
                   f"a {_type_name(obj)} on DLPack device type {int(dev_type)}")
    check.fail(op, name, "a NumPy or CuPy array or an object supporting DLPack (a PyTorch tensor, a JAX array)",
               _type_name(obj), TypeError)


# How each dtype is stored in NumPy/CuPy arrays: bfloat16 has no NumPy or CuPy dtype and
# travels as its 16 bits, its logical dtype carried beside it.
STORAGE_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64}


class Storage(NamedTuple):
    """A C-contiguous CuPy array and the dtype it stores (a name of GPU_DTYPES): how an adapter
    that views a framework's device buffers itself (cudeform.jax) hands them to an op, bfloat16
    included, which has no CuPy dtype. Results come back as CuPy arrays of the storage dtype."""

    array: Any
    dtype: str


@functools.lru_cache(maxsize=None)
def _cupy_view_types() -> tuple:
    cupy = cupy_module()
    return cupy.cuda.UnownedMemory, cupy.cuda.MemoryPointer, cupy.ndarray


_STORAGE_NUMPY_DTYPES = {name: np.dtype(storage) for name, storage in STORAGE_DTYPES.items()}


def cupy_view(ptr: int, shape: tuple, dtype: str, device_index: int, owner: Any):
    """Zero-copy CuPy array of ``dtype``'s storage dtype over the C-contiguous device memory at
    ``ptr`` on CUDA device ``device_index``, which ``owner`` keeps alive. (Every GPU call on
    torch tensors makes several: the types are looked up once.)"""
    unowned, pointer, ndarray = _cupy_view_types()
    storage = _STORAGE_NUMPY_DTYPES[dtype]
    memory = unowned(ptr, math.prod(shape) * storage.itemsize, owner, device_index)
    return ndarray(shape, storage, pointer(memory, 0))


@functools.lru_cache(maxsize=None)
def _torch_dtypes() -> dict:
    """torch dtype -> our dtype name, for the dtypes the GPU path takes."""
    import torch

    return {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
            torch.float64: "float64"}


@functools.lru_cache(maxsize=None)
def _torch_dtype(name: str):
    return next(k for k, v in _torch_dtypes().items() if v == name)


def _from_torch(t: Any, device: Device) -> tuple[Any, str]:
    """NumPy/CuPy view of a torch tensor made C-contiguous (by torch, on its current stream,
    only if it is not). On the GPU this skips DLPack's per-tensor stream handshake, which
    costs more than a small kernel: the op runs on the tensor's current stream anyway (see
    _caller_stream)."""
    dtype = _torch_dtypes().get(t.dtype) or str(t.dtype).replace("torch.", "")
    if dtype not in GPU_DTYPES:
        return None, dtype
    # Each torch call costs microseconds: skip the ones with nothing to do (a view of the
    # memory needs no detach).
    if not t.is_contiguous():
        t = t.detach().contiguous()
    if device.kind == "cpu":
        return (None if dtype == "bfloat16" else t.detach().numpy()), dtype
    return cupy_view(t.data_ptr(), tuple(t.shape), dtype, device.index, t), dtype


def _convert(obj: Any, framework: str, device: Device) -> tuple[Any, str]:
    """C-contiguous NumPy/CuPy array of ``obj`` (a zero-copy view when it already is
    contiguous, else a copy: the caller's array is never modified) and its dtype name (None
    where unsupported). Every kernel may then assume dense row-major arrays."""
    if isinstance(obj, Storage):
        return obj.array, obj.dtype
    if framework == "torch":
        return _from_torch(obj, device)
    if framework not in ("numpy", "cupy"):
        obj = np.from_dlpack(obj) if device.kind == "cpu" else cupy_module().from_dlpack(obj)
    if not obj.flags.c_contiguous:
        obj = np.ascontiguousarray(obj) if device.kind == "cpu" else _cupy_contiguous(obj, device)
    return obj, obj.dtype.name


def _cupy_contiguous(arr: Any, device: Device):
    cupy = cupy_module()
    with cupy.cuda.Device(device.index):
        return cupy.ascontiguousarray(arr)


class _TorchAllocator:
    """Serves CuPy's allocations from PyTorch's caching allocator during a call on torch CUDA
    tensors: workspaces come from the memory pool the caller's framework manages, on its
    current stream, and an output that a backend did not make with :func:`empty` goes back as a
    view of the torch tensor that holds its memory, without a DLPack round trip."""

    def __init__(self):
        self.live: dict = {}  # device pointer -> the torch uint8 tensor that owns it

    def malloc(self, size: int, device_id: int) -> int:
        if size == 0:
            return 0
        import torch

        block = torch.empty(size, dtype=torch.uint8, device=_torch_device(device_id))
        ptr = block.data_ptr()
        self.live[ptr] = block
        return ptr

    def free(self, ptr: int, device_id: int) -> None:
        self.live.pop(ptr, None)

    def tensor(self, arr: Any, dtype: str):
        """The torch tensor viewing ``arr``'s memory, or None if that memory is not ours."""
        memory = arr.data
        block = self.live.get(memory.mem.ptr)
        if block is None or not arr.flags.c_contiguous:
            return None
        start = memory.ptr - memory.mem.ptr
        if start or block.numel() != arr.nbytes:  # else the whole block: skip the slice
            block = block[start:start + arr.nbytes]
        return block.view(_torch_dtype(dtype)).view(arr.shape)


_torch_allocator = _TorchAllocator()


@functools.lru_cache(maxsize=None)
def _backend(kind: str, op_module: str):
    return importlib.import_module(f"cudeform.{kind}.{op_module}")


class Prepared(NamedTuple):
    """The arrays of one call, as NumPy (CPU) or CuPy (GPU) arrays, and how to hand results back."""

    arrays: dict
    device: Device
    dtype: str
    framework: str
    stream_ptr: Any  # the caller's CUDA stream (torch's current stream) or None for CuPy's
    tensors: Any = None  # torch CUDA callers: device pointer -> the tensor that empty() made there

    def backend(self, op_module: str):
        """The module that runs ``op_module`` where these arrays live: ``cudeform.cpu.<op>``
        (Numba) or ``cudeform.cuda.<op>`` (CUDA kernels)."""
        return _backend(self.device.kind, op_module)

    def context(self):
        """Context manager that makes this call's device and stream current (a no-op on the CPU),
        and for torch callers, torch's memory pool CuPy's allocator."""
        return _DeviceContext(self.device, self.stream_ptr, self.framework == "torch", self.tensors)

    def wrap(self, result):
        """Return ``result`` (NumPy/CuPy, or None) in the caller's framework."""
        if result is None or self.framework in ("numpy", "cupy"):
            return result
        if self.framework == "torch":
            import torch

            if self.device.kind == "cpu":
                return torch.from_numpy(result)
            tensor = self.tensors.get(result.data.ptr)
            if tensor is not None and tensor.shape == result.shape:
                return tensor
            tensor = _torch_allocator.tensor(result, self.dtype)
            if tensor is None:  # an empty result, which needed no memory
                tensor = torch.empty(result.shape, dtype=_torch_dtype(self.dtype),
                                     device=_torch_device(self.device.index))
            return tensor
        if self.framework in ("jax", "jaxlib"):
            import jax.dlpack

            return jax.dlpack.from_dlpack(result)
        return result


def _caller_stream(framework: str, device: Device):
    """Pointer of the stream a torch CUDA call must run on (torch's current one); None means
    CuPy's current stream."""
    if device.kind != "cuda" or framework != "torch":
        return None
    return _torch_raw_stream()(device.index)


@functools.lru_cache(maxsize=None)
def _torch_raw_stream():
    """device index -> the pointer of torch's current stream there. torch.cuda.current_stream
    builds a Stream object per call (4 us of a small op's ~150 us); the raw lookup is what
    torch's own compiled code calls, and the public route stays where it is missing."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw if raw is not None else lambda index: torch.cuda.current_stream(index).cuda_stream


@functools.lru_cache(maxsize=None)
def _torch_malloc():
    cupy = cupy_module()
    return cupy.cuda.memory.PythonFunctionAllocator(_torch_allocator.malloc, _torch_allocator.free).malloc


class _StreamHandle:
    """A raw CUDA stream pointer, offered through the CUDA stream protocol."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def _cupy_stream(ptr: int):
    """A CuPy view of a caller's stream (torch's streams and XLA's live as long as the process,
    mostly), made on the stream's device."""
    return cupy_module().cuda.Stream.from_external(_StreamHandle(ptr))


_call = threading.local()  # .tensors, .device: the torch CUDA call in progress on this thread (see empty)


def _bound_devices() -> set:
    """The devices whose context this thread has bound (by _DeviceContext)."""
    bound = getattr(_call, "bound", None)
    if bound is None:
        bound = _call.bound = set()
    return bound


class _DeviceContext:
    """Makes a call's device current, and the caller's stream (where given) and for torch
    callers torch's memory pool and :func:`empty`'s tensors: a plain class rather than an
    ExitStack, since it runs on every call. A device or stream that is current already is
    left as it is (entering it costs microseconds)."""

    def __init__(self, device: Device, stream_ptr, torch_pool: bool, tensors: dict | None = None):
        self.device, self.stream_ptr, self.torch_pool, self.tensors = device, stream_ptr, torch_pool, tensors
        self.entered: list = []
        self.previous = None

    def _enter(self, context) -> None:
        context.__enter__()
        self.entered.append(context)

    def __enter__(self):
        if self.device.kind == "cuda":
            cuda = cupy_module().cuda
            if cuda.runtime.getDevice() != self.device.index:
                self._enter(cuda.Device(self.device.index))
            elif self.device.index not in _bound_devices():
                # The device is current but this thread may not have its context yet (PyTorch's
                # autograd threads, for one): the kernels launch through the driver API, which
                # needs it, and setDevice binds it.
                cuda.runtime.setDevice(self.device.index)
                _call.bound.add(self.device.index)
            if self.stream_ptr is not None and cuda.get_current_stream().ptr != self.stream_ptr:
                self._enter(_cupy_stream(self.stream_ptr))
            if self.torch_pool:
                self._enter(_TorchPool())
            if self.tensors is not None:
                self.previous = getattr(_call, "tensors", None), getattr(_call, "device", None)
                _call.tensors, _call.device = self.tensors, _torch_device(self.device.index)
        return self

    def __exit__(self, *exc):
        if self.tensors is not None:
            _call.tensors, _call.device = self.previous
        for context in reversed(self.entered):
            context.__exit__(*exc)
        self.entered = []
        return False


class _TorchPool:
    """``cupy.cuda.using_allocator(torch's pool)`` through the thread-local allocator functions
    it wraps: its generator-based context costs ~2 us a call. CuPy versions without those
    functions get using_allocator itself."""

    def __enter__(self):
        memory = cupy_module().cuda.memory
        if not hasattr(memory, "_set_thread_local_allocator"):
            self.context = cupy_module().cuda.using_allocator(_torch_malloc())
            return self.context.__enter__()
        self.context = None
        self.previous = memory._get_thread_local_allocator()
        memory._set_thread_local_allocator(_torch_malloc())

    def __exit__(self, *exc):
        if self.context is not None:
            return self.context.__exit__(*exc)
        cupy_module().cuda.memory._set_thread_local_allocator(self.previous)
        return False


@functools.lru_cache(maxsize=None)
def _torch_device(index: int):
    import torch

    return torch.device("cuda", index)


def empty(shape: tuple | int, dtype: str):
    """An uninitialised CuPy array of ``dtype`` (a name of GPU_DTYPES, stored as STORAGE_DTYPES
    says), for a GPU backend's result or workspace. Inside a torch caller's call it views a new
    torch tensor of that dtype, which :meth:`Prepared.wrap` hands back as it is: cheaper than
    CuPy's allocation through torch's pool plus a view of the bytes (a small call spends more
    host time than its kernels take)."""
    tensors = getattr(_call, "tensors", None)
    if tensors is None:
        return cupy_module().empty(shape, STORAGE_DTYPES[dtype])
    import torch

    shape = (shape,) if type(shape) is int else tuple(shape)
    t = torch.empty(shape, dtype=_torch_dtype(dtype), device=_call.device)
    ptr = t.data_ptr()
    tensors[ptr] = t
    return cupy_view(ptr, shape, dtype, _call.device.index, t)


def on_stream(device_index: int, stream_ptr: int):
    """Context manager that makes CUDA device ``device_index`` and the stream at ``stream_ptr``
    CuPy's current ones (CuPy's memory pool stays): for an adapter that runs ops on a
    framework's stream (cudeform.jax, on XLA's), handing them :class:`Storage` arrays."""
    return _DeviceContext(Device("cuda", device_index), stream_ptr, torch_pool=False)


_NO_CONTEXT = contextlib.nullcontext()  # reusable, and cheaper than a new one per call


@functools.lru_cache(maxsize=None)
def _cuda_device(index: int) -> Device:
    return Device("cuda", index)


def _torch_cuda_views(optional: tuple, arrays: dict) -> Prepared | None:
    """:func:`prepare`'s result in one pass for the common case of a torch caller: every given
    array a C-contiguous CUDA tensor, all of one GPU dtype on one device, CuPy usable (None
    otherwise, and the general path checks and explains): a small fp16 forward's five tensors
    take ~16 us here against ~22 us through the general path (H200 host), while its kernels
    run for less than 60 us."""
    views = dict.fromkeys(arrays)
    key = None
    for name, t in arrays.items():
        if t is None:
            if name not in optional:
                return None
            continue
        if _framework(t) != "torch" or not t.is_cuda or not t.is_contiguous():
            return None
        if key is None:
            key = (t.dtype, t.get_device())
        elif key != (t.dtype, t.get_device()):
            return None
        views[name] = t
    dtype = _torch_dtypes().get(key[0]) if key else None
    if dtype is None or _cuda_unavailable():
        return None
    device = _cuda_device(key[1])
    for name, t in views.items():
        if t is not None:
            views[name] = cupy_view(t.data_ptr(), tuple(t.shape), dtype, device.index, t)
    return Prepared(views, device, dtype, "torch", _caller_stream("torch", device), {})


def prepare(op: str, optional: tuple = (), **arrays: Any) -> Prepared:
    """Check that the given arrays share one device and one supported floating dtype,
    and take them as C-contiguous NumPy or CuPy arrays: zero-copy views, or copies of the
    non-contiguous ones (never modifying the caller's arrays).

    ``None`` is accepted (and passed through) for the names in ``optional`` only. The first
    array decides the framework of the results; messages compare the others with ``input``
    (the first one, for callers without an ``input``). Raises ``TypeError`` for a missing
    array, unsupported objects or dtypes and mixed dtypes, and ``ValueError`` for arrays on
    different devices or on a CUDA device that CuPy cannot reach.
    """
    common = _torch_cuda_views(optional, arrays)
    if common is not None:
        return common
    for name, obj in arrays.items():
        if obj is None and name not in optional:
            check.fail(op, name, "an array", None, TypeError)
    given = {name: obj for name, obj in arrays.items() if obj is not None}
    located = {name: _locate(op, name, obj) for name, obj in given.items()}
    first_name = next(iter(given))
    reference = "input" if "input" in given else first_name
    device = located[reference][1]
    for name, (_, dev) in located.items():
        if dev != device:
            check.fail(op, name, f"an array on the device of {reference} ({device})", f"one on {dev}")
    if device.kind == "cuda" and _cuda_unavailable():
        check.fail(op, reference, f"an array on the CPU, since {_cuda_unavailable()} (for CUDA arrays: {CUPY_HINT})",
                   f"a {_type_name(given[reference])} on {device}")
    framework = located[first_name][0]
    stream_ptr = _caller_stream(framework, device)
    allowed = CPU_DTYPES if device.kind == "cpu" else GPU_DTYPES
    out: dict = dict.fromkeys(arrays)
    dtypes: dict = {}
    # DLPack's exchange may enqueue work on the consumer's current stream: make it the caller's.
    # CuPy arrays and torch tensors are viewed directly and need no context.
    dlpack = device.kind == "cuda" and any(fw not in ("cupy", "torch") for fw, _ in located.values())
    with _DeviceContext(device, stream_ptr, framework == "torch") if dlpack else _NO_CONTEXT:
        for name, obj in given.items():
            out[name], dtypes[name] = _convert(obj, located[name][0], device)
            if dtypes[name] not in allowed:
                where = "on the CPU" if device.kind == "cpu" else "on a CUDA device"
                check.fail(op, name, f"one of {', '.join(allowed)} {where}", dtypes[name], TypeError)
    dtype = dtypes[reference]
    for name, dt in dtypes.items():
        if dt != dtype:
            check.fail(op, name, f"the dtype of {reference} ({dtype})", dt, TypeError)
    return Prepared(out, device, dtype, framework, stream_ptr,
                    {} if framework == "torch" and device.kind == "cuda" else None)


def array_module(arr: Any, op: str, name: str):
    """``numpy`` or ``cupy``, whichever ``arr`` (argument ``name`` of ``op``) belongs to."""
    if isinstance(arr, np.ndarray):
        return np
    if _framework(arr) == "cupy":
        return cupy_module()
    check.fail(op, name, "a NumPy or CuPy array", _type_name(arr), TypeError)
