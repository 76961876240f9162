"""Finding, compiling and launching the CUDA kernels.

The sources are read from the installed package (``cudeform/kernels``, or ``kernels/`` of a
source checkout) and compiled by NVRTC through ``cupy.RawModule``, once per process per
device, with every template instantiation named up front. CuPy's on-disk cache keys on the
source text and the options but not on the files a source ``#include``s, so a digest of the
whole kernels folder is one of the options: editing a header recompiles every module.

Kernels are launched through the CUDA driver with their arguments packed into one buffer
whose layout each kernel learns at its first launch: CuPy's RawKernel call converts every
argument on every launch, 10 us of host time for dcn_im2col's 23 arguments, which is more than
a small kernel runs.

Set ``CUDEFORM_DEBUG=1`` (or call :func:`set_debug`) to synchronise and check for errors
after every launch (and check each launch's argument types against the kernel's layout).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import threading
from pathlib import Path

import numpy as np

from .. import _arrays

BLOCK = 256
_MAX_BLOCKS = 65535  # grid-stride loops cover the rest
WARP = 32  # WARP_SIZE in common.cuh
MAX_ABS_THREADS = 1024 * BLOCK  # the deterministic max-abs passes: enough to fill the GPU, each reading many elements
_lock = threading.Lock()
_modules: dict = {}  # (source, device) -> cupy.RawModule
_functions: dict = {}  # (source, device, name expression) -> Kernel
_debug = os.environ.get("CUDEFORM_DEBUG", "") not in ("", "0")

STORAGE_DTYPES = _arrays.STORAGE_DTYPES  # host modules take every dtype table from here
# C++ storage type of each dtype name (bfloat16 travels in uint16 CuPy arrays: see _arrays).
CXX_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ACC_DTYPES = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64}


def set_debug(enabled: bool) -> None:
    """Synchronise the device and raise on the first error after every kernel launch."""
    global _debug
    _debug = bool(enabled)


@functools.lru_cache(maxsize=None)
def kernel_dir() -> Path:
    """The folder of the ``.cu``/``.cuh`` sources: inside the installed package, or the
    ``kernels/`` folder of a source checkout (editable installs)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise RuntimeError(f"cudeform's CUDA sources are missing: no kernels/common.cuh next to {package}")


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(kernel_dir().iterdir()):
        if path.suffix in (".cu", ".cuh"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def options(arch: int) -> tuple:
    """Our NVRTC options for a device of compute capability ``arch`` (e.g. 90); CuPy adds its
    include paths, the architecture and its defaults. On sm_90 the target is sm_90a, whose
    wgmma instructions the Hopper kernels use (NVRTC takes sm_90a over CuPy's -arch=sm_90)."""
    target = ("-arch=sm_90a",) if arch == 90 else ()
    return ("--std=c++17", f"-I{kernel_dir()}", f"-DCUDEFORM_SOURCES_DIGEST=0x{sources_digest()}", *target)


def template_args(*dtypes: str) -> str:
    return ", ".join(CXX_TYPES[d] for d in dtypes)


@functools.lru_cache(maxsize=None)
def _device_getter():
    import cupy

    return cupy.cuda.runtime.getDevice


def current_device() -> int:
    """CuPy's current device: the lookup of every launch, so without the import statement and
    attribute chain (microseconds a call)."""
    return _device_getter()()


def function(op_module, expression: str, *, dynamic_shared: int = 0) -> "Kernel":
    """The compiled kernel ``expression`` (e.g. ``"dcn_im2col<float>"``) of an op module that
    declares ``SOURCE`` and ``NAME_EXPRESSIONS``, on the current device. The first call on a
    device compiles the whole source (or loads it from CuPy's cache); later calls are a lookup.
    ``dynamic_shared``: the most dynamic shared memory the kernel is launched with, in bytes
    (above 48 KiB a kernel must opt in, once)."""
    key = (op_module.SOURCE, current_device(), expression)
    kernel = _functions.get(key)
    if kernel is None:
        import cupy

        with _lock:
            module = _modules.get(key[:2])
            if module is None:
                code = (kernel_dir() / op_module.SOURCE).read_text()
                module = cupy.RawModule(code=code, options=options(_compute_capability(key[1])),
                                        name_expressions=tuple(op_module.NAME_EXPRESSIONS))
                module.compile()
                _modules[key[:2]] = module
            raw = module.get_function(expression)
            if dynamic_shared > 48 * 1024:
                raw.max_dynamic_shared_size_bytes = dynamic_shared
            kernel = _functions[key] = Kernel(raw, expression)
    return kernel


def typed(op_module, name: str, dtype: str, *, dynamic_shared: int = 0) -> "Kernel":
    """:func:`function` for the instantiation ``name<T>``, T the C++ storage type of ``dtype``."""
    return function(op_module, f"{name}<{CXX_TYPES[dtype]}>", dynamic_shared=dynamic_shared)


# struct codes of the kernel argument types: a CuPy array passes its device pointer. Native
# alignment ("@") lays the fields out as the kernel's parameters are.
_ARG_CODES = {np.dtype(np.int32): "i", np.dtype(np.int64): "q", np.dtype(np.uint32): "I",
              np.dtype(np.uint64): "Q", np.dtype(np.float32): "f", np.dtype(np.float64): "d"}
_CU_LAUNCH_PARAM_END, _CU_LAUNCH_PARAM_BUFFER_POINTER, _CU_LAUNCH_PARAM_BUFFER_SIZE = 0, 1, 2


class Pointer(int):
    """A device address passed as a pointer argument: a part of a workspace array, without the
    CuPy view (slicing an array costs microseconds of host time)."""


class Kernel:
    """A compiled kernel and its parameter buffer (made at the first launch, which fixes the
    argument types: NumPy scalars of _ARG_CODES's dtypes, and CuPy arrays or Pointers for
    pointers)."""

    def __init__(self, function, expression: str):
        import cupy
        from cupy_backends.cuda.api import driver

        self.function = function  # a cupy.RawKernel, which keeps its module loaded
        self.ptr = function.kernel.ptr  # the CUfunction on the current device
        self.expression = expression
        self.launch_kernel = driver.launchKernel
        self.array_type = cupy.ndarray
        self.current_stream = cupy.cuda.get_current_stream
        self.layout = None  # struct format of the packed arguments
        self.pointers = ()  # the positions of the pointer arguments in it
        self.lock = threading.Lock()  # the buffer is shared by the threads that launch this kernel

    def _layout(self, args: tuple) -> str:
        codes = []
        for i, a in enumerate(args):
            if isinstance(a, (self.array_type, Pointer)):
                codes.append("P")
            elif isinstance(a, np.generic) and a.dtype in _ARG_CODES:
                codes.append(_ARG_CODES[a.dtype])
            else:
                raise TypeError(f"{self.expression}: argument {i} is a {type(a).__name__}; expected a CuPy array, "
                                f"a Pointer or a NumPy scalar of {', '.join(d.name for d in _ARG_CODES)}")
        return "@" + "".join(codes)

    def _prepare(self, args: tuple) -> None:
        layout = self._layout(args)
        size = struct.calcsize(layout)
        self.buffer = np.zeros(max(size, 8), np.uint8)
        self.size = np.array([size], np.uint64)  # a size_t the driver reads through a pointer
        self.extra = np.array([_CU_LAUNCH_PARAM_BUFFER_POINTER, self.buffer.ctypes.data,
                               _CU_LAUNCH_PARAM_BUFFER_SIZE, self.size.ctypes.data, _CU_LAUNCH_PARAM_END], np.uint64)
        self.extra_ptr = int(self.extra.ctypes.data)
        self.pointers = tuple(i for i, code in enumerate(layout[1:]) if code == "P")
        self.layout = layout

    def __call__(self, grid: int, block: int, args: tuple, shared_mem: int) -> None:
        if self.layout is None:
            with self.lock:
                if self.layout is None:
                    self._prepare(args)
        elif _debug and self._layout(args) != self.layout:
            raise TypeError(f"{self.expression}: argument types {self._layout(args)} differ from its first "
                            f"launch's {self.layout}")
        # Only the pointer positions need converting: testing every argument's type cost more
        # than the packing.
        values = list(args)
        for i in self.pointers:
            if type(values[i]) is not Pointer:
                values[i] = values[i].data.ptr
        with self.lock:
            struct.pack_into(self.layout, self.buffer, 0, *values)
            self.launch_kernel(self.ptr, grid, 1, 1, block, 1, 1, shared_mem, self.current_stream().ptr, 0,
                               self.extra_ptr)


@functools.lru_cache(maxsize=None)
def _compute_capability(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).compute_capability)


def has_tensor_cores() -> bool:
    """Whether the current device runs the mma.sync kernels of tensor_core.cuh (sm_80+)."""
    return _compute_capability(current_device()) >= 80


def has_wgmma() -> bool:
    """Whether the current device runs the wgmma kernels of tensor_core.cuh (sm_90, compiled
    for sm_90a)."""
    return _compute_capability(current_device()) == 90


def launch(kernel: Kernel, threads: int, args: tuple, *, block: int = BLOCK, shared_mem: int = 0) -> None:
    """Launch a grid-stride kernel over ``threads`` work items on CuPy's current stream, with
    ``shared_mem`` bytes of dynamic shared memory per block."""
    if threads <= 0:
        return
    kernel(min(_MAX_BLOCKS, -(-threads // block)), block, args, shared_mem)
    if _debug:
        _synchronize()


def _synchronize() -> None:
    """Wait for the current stream: an asynchronous kernel error surfaces here, at its launch."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def compile_for_arch(op_module, arch: str) -> bytes:
    """Compile an op module's source with NVRTC for ``sm_<arch>`` without a GPU, with the
    options CuPy's RawModule uses at run time. Raises ``RuntimeError`` with the compiler log."""
    from cupy._core.core import assemble_cupy_compiler_options  # CuPy's own include paths
    from cupy_backends.cuda.libs import nvrtc

    code = (kernel_dir() / op_module.SOURCE).read_text()
    opts = assemble_cupy_compiler_options(options(int(arch))) + (
        f"-arch=sm_{arch}", "--device-as-default-execution-space", "-ftz=true",
    )
    prog = nvrtc.createProgram(code, op_module.SOURCE, [], [])
    try:
        for expression in op_module.NAME_EXPRESSIONS:
            nvrtc.addNameExpression(prog, expression)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"{op_module.SOURCE} for sm_{arch}:\n{nvrtc.getProgramLog(prog)}") from exc
        for expression in op_module.NAME_EXPRESSIONS:
            nvrtc.getLoweredName(prog, expression)
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
