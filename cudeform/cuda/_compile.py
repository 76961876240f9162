"""Finding, compiling and launching the CUDA kernels.

The sources are read from the installed package (``cudeform/kernels``, or ``kernels/`` of a
source checkout) and compiled by NVRTC through ``cupy.RawModule``, once per process per
device, with every template instantiation named up front. CuPy's on-disk cache keys on the
source text and the options but not on the files a source ``#include``s, so a digest of the
whole kernels folder is one of the options: editing a header recompiles every module.

Set ``CUDEFORM_DEBUG=1`` (or call :func:`set_debug`) to synchronise and check for errors
after every launch.
"""

from __future__ import annotations

import functools
import hashlib
import os
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
_functions: dict = {}  # (source, device, name expression) -> cupy.RawKernel
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


def options() -> tuple:
    """Our NVRTC options; CuPy adds its include paths, the architecture and its defaults."""
    return ("--std=c++17", f"-I{kernel_dir()}", f"-DCUDEFORM_SOURCES_DIGEST=0x{sources_digest()}")


def template_args(*dtypes: str) -> str:
    return ", ".join(CXX_TYPES[d] for d in dtypes)


def function(op_module, expression: str):
    """The compiled kernel ``expression`` (e.g. ``"dcn_im2col<float>"``) of an op module that
    declares ``SOURCE`` and ``NAME_EXPRESSIONS``, on the current device. The first call on a
    device compiles the whole source (or loads it from CuPy's cache); later calls are a lookup."""
    import cupy

    key = (op_module.SOURCE, cupy.cuda.runtime.getDevice(), expression)
    kernel = _functions.get(key)
    if kernel is None:
        with _lock:
            module = _modules.get(key[:2])
            if module is None:
                code = (kernel_dir() / op_module.SOURCE).read_text()
                module = cupy.RawModule(code=code, options=options(),
                                        name_expressions=tuple(op_module.NAME_EXPRESSIONS))
                module.compile()
                _modules[key[:2]] = module
            kernel = _functions[key] = module.get_function(expression)
    return kernel


def launch(kernel, threads: int, args: tuple, *, block: int = BLOCK, shared_mem: int = 0) -> None:
    """Launch a grid-stride kernel over ``threads`` work items on CuPy's current stream, with
    ``shared_mem`` bytes of dynamic shared memory per block."""
    if threads <= 0:
        return
    grid = min(_MAX_BLOCKS, -(-threads // block))
    kernel((grid,), (block,), args, shared_mem=shared_mem)
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
    opts = assemble_cupy_compiler_options(options()) + (
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
