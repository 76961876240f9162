"""JAX adapter: cudeform's ops as differentiable JAX functions (``jax.custom_vjp``).

Every function here takes the arguments of the op of the same name in :mod:`cudeform` (arrays
first, then the non-array parameters as Python values, which are static) and works under
``jax.jit``, ``jax.grad``/``jax.vjp`` and ``jax.vmap``. The output shape is computed in Python
from the input shapes by the core's own shape checks, so bad shapes raise the core's
``ValueError`` at trace time. Where the op runs is picked when JAX lowers it for its platform
(``jax.lax.platform_dependent``):

- **CUDA backend (with CuPy working): on the device.** The forward and the backward run the
  CUDA kernels through
  ``jax.experimental.buffer_callback``: the callback views JAX's device buffers as CuPy arrays
  (zero-copy) and queues the kernels on XLA's stream, so nothing is copied to the host and
  nothing synchronises; XLA orders the op with the rest of the computation. The core allocates
  its results (and workspaces) itself, from CuPy's memory pool, so each result is then copied
  into the output buffer that XLA allocated: one device-to-device copy of the result's size,
  on the same stream (one more read and write of the result). CuPy's pool reuses a freed
  block only for work on the stream it was freed on, so nothing overwrites it while XLA's
  stream may still read it.
- **Every other backend (CPU, TPU, ROCm, and CUDA where CuPy cannot run): on the host.** The
  callbacks hand NumPy arrays to the core through ``jax.pure_callback``, and it runs its CPU
  (Numba) path; on an accelerator, JAX copies the arguments to the host and the result back.

Limits:

- **Memory on the GPU.** By default JAX preallocates 75% of the GPU's memory for XLA, and
  CuPy's pool (the op's workspaces and results) gets only the rest; a large op can then fail
  with CuPy's ``OutOfMemoryError``. Set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (or a smaller
  ``XLA_PYTHON_CLIENT_MEM_FRACTION``) before JAX starts, so that both allocate on demand. CuPy's
  pool keeps the blocks it has freed for its next calls; ``cupy.get_default_memory_pool()
  .free_all_blocks()`` hands them back to the driver. The workspaces are those the core's
  functions document (the columns buffers of the convolutions, float32 accumulators for the
  half types' gradients).
- dtypes: on a CUDA backend float16, bfloat16, float32 and float64; on the host path float32
  and float64. float64 needs ``jax_enable_x64``. All arrays of one call share one dtype (RoIs
  included). Without the device path (no CUDA backend, or no CuPy), float16 and bfloat16 raise
  ``TypeError`` at trace time; with it, a half-precision call lowered for the CPU fails when
  it runs, with the core's ``TypeError`` inside JAX's runtime error.
- Gradients: arguments that were not given (None) get none and are not computed; RoIs get
  zero cotangents. There is no forward-mode (``jax.jvp``/``jacfwd``) and no second derivative
  (a ``custom_vjp`` backward is not itself differentiable here).
- ``jax.vmap`` maps the callback sequentially (``vmap_method="sequential"``): one call of the
  core per mapped element. The ops take a batch dimension of their own (N, or R RoIs), which
  is the fast way to batch.
- Errors found while the op runs (a RoI batch index outside [0, N) on the CPU, or on the GPU
  with ``CUDEFORM_DEBUG=1``) surface as the runtime error that JAX raises for a failed
  callback.
- ``deform_conv2d``'s offset gradient follows ``border_grad`` (see
  :func:`cudeform.deform_conv2d_backward`). The backwards run in the core's default mode: the
  CPU path is deterministic, the GPU path accumulates some gradients with atomics and is not
  bitwise reproducible from run to run.
- The GPU callbacks are not ``command_buffer_compatible``: XLA runs them eagerly, outside the
  CUDA graphs it may build around them. Tested on one GPU; computations sharded over several
  devices are untested.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

import cudeform as _core

from . import _arrays
from . import _validate as check
from .deform_conv import BORDER_GRADS
from .deform_conv import _geometry as _conv_geometry
from .deform_kernel_conv import _geometry as _kconv_geometry
from .deform_roi_pool import _psroi_geometry, _roi_geometry

__all__ = ["deform_conv2d", "deform_roi_pool", "deform_psroi_pool", "deform_kernel_conv2d"]


@functools.lru_cache(maxsize=None)
def _on_gpu() -> bool:
    """Whether ops lowered for a CUDA backend run the CUDA kernels (asked once): JAX has a CUDA
    backend and CuPy can use the GPU. Otherwise every backend takes the host path."""
    try:
        jax.devices("cuda")
    except RuntimeError:  # JAX's answer for a backend it does not have
        return False
    return not _arrays._cuda_unavailable()


def _dtype(op: str, names: Sequence[str], arrays: Sequence) -> np.dtype:
    dtype = np.dtype(arrays[0].dtype)
    allowed = _arrays.GPU_DTYPES if _on_gpu() else _arrays.CPU_DTYPES
    if dtype.name not in allowed:
        where = "" if _on_gpu() else " (float16 and bfloat16 need a CUDA backend and CuPy)"
        check.fail(op, names[0], f"one of {', '.join(allowed)}{where}", dtype, TypeError)
    for name, a in zip(names, arrays):
        if a is not None and np.dtype(a.dtype) != dtype:
            check.fail(op, name, f"the dtype of {names[0]} ({dtype})", np.dtype(a.dtype), TypeError)
    return dtype


def _host(a):
    # A copy: the callback's arrays are read-only views of JAX's buffers, and Numba compiles (and
    # caches) a separate specialisation of every kernel for read-only arrays. The copy is cheap
    # beside the op and shares the compiled kernels with plain NumPy calls.
    return None if a is None else np.array(a)


def _device_view(buffer, dtype: str, device_index: int):
    """CuPy view of a buffer_callback buffer (dense row-major, as XLA hands them)."""
    return _arrays.cupy_view(buffer.__cuda_array_interface__["data"][0], buffer.shape, dtype, device_index, buffer)


@dataclasses.dataclass(frozen=True)
class _Compute:
    """One core function on the arrays of ``names`` (None where not given) with the static
    keyword ``params``; a backward (``wanted`` given) returns the gradients of those arguments
    only. Hashable by value, so that equal calls share one compiled dispatcher."""

    fn: Callable
    names: tuple[str, ...]
    params: tuple
    wanted: tuple[int, ...] | None = None

    def __call__(self, *xs) -> tuple:
        if self.wanted is None:
            return (self.fn(**dict(zip(self.names, xs)), **dict(self.params)),)
        grads = self.fn(xs[0], **dict(zip(self.names, xs[1:])), **dict(self.params))._asdict()
        return tuple(grads[self.names[i]] for i in self.wanted)


@functools.lru_cache(maxsize=256)
def _dispatcher(compute: _Compute, results: tuple, dtype: np.dtype) -> Callable:
    """The jitted function giving the arrays that ``results`` (ShapeDtypeStructs) describe, as
    ``compute(*args)`` gives them in one ``dtype``. On a CUDA backend ``compute`` gets CuPy
    views of JAX's device buffers and runs on XLA's stream; elsewhere it gets NumPy copies, in
    a host callback. Cached: evaluated op by op (an un-jitted ``jax.grad``), a fresh jit would
    trace and compile on every call."""

    def on_host(*xs):
        return tuple(np.asarray(r, dtype) for r in compute(*map(_host, xs)))

    def on_device(ctx, outs, *xs):
        name = dtype.name
        index = outs[0].__dlpack_device__()[1]  # XLA's device ordinal, CUDA's device index
        with _arrays.on_stream(index, ctx.stream):
            got = compute(*(None if x is None else _arrays.Storage(_device_view(x, name, index), name) for x in xs))
            for out, r in zip(outs, got):
                # The core's results are fresh C-contiguous arrays: one memcpy each, on XLA's stream.
                _device_view(out, name, index).data.copy_from_device_async(r.data, r.nbytes)

    branches = {"default": lambda *a: jax.pure_callback(on_host, results, *a, vmap_method="sequential")}
    if _on_gpu():
        branches["cuda"] = lambda *a: buffer_callback(on_device, results, vmap_method="sequential")(*a)
    # Under jit, so that the branch follows the platform the arguments' computation is lowered
    # for: evaluated op by op, platform_dependent's index has no operands and runs on the
    # default device, which picks the CUDA branch for arrays on the CPU.
    return jax.jit(lambda *a: jax.lax.platform_dependent(*a, **branches))


def _make_op(op: str, names: tuple[str, ...], no_grad: frozenset, core_forward: Callable,
             core_backward: Callable, out_shape: Callable) -> Callable:
    """A ``custom_vjp`` function ``f(params, arrays)`` for one core op.

    ``arrays`` is a tuple of the op's array arguments in the order of ``names`` (None where not
    given); ``params`` a tuple of ``(name, value)`` keyword arguments of the core op (static).
    ``out_shape(arrays_by_name, params_dict)`` gives the output's shape.
    """

    def forward(params, arrays):
        dtype = _dtype(op, names, arrays)
        shape = out_shape(dict(zip(names, arrays)), dict(params))
        dispatch = _dispatcher(_Compute(core_forward, names, params), (jax.ShapeDtypeStruct(shape, dtype),), dtype)
        return dispatch(*arrays)[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f(params, arrays):
        return forward(params, arrays)

    def f_fwd(params, arrays):
        return forward(params, arrays), arrays

    def f_bwd(params, arrays, grad_output):
        dtype = np.dtype(arrays[0].dtype)
        # Only the given, differentiable arguments get a gradient computed and returned.
        wanted = tuple(i for i, (n, a) in enumerate(zip(names, arrays)) if a is not None and n not in no_grad)
        results = tuple(jax.ShapeDtypeStruct(arrays[i].shape, dtype) for i in wanted)
        dispatch = _dispatcher(_Compute(core_backward, names, params, wanted), results, dtype)
        grads = iter(dispatch(grad_output.astype(dtype), *arrays))
        cotangents = tuple(
            None if a is None else jnp.zeros_like(a) if n in no_grad else next(grads)
            for n, a in zip(names, arrays)
        )
        return (cotangents,)

    f.defvjp(f_fwd, f_bwd)
    return f


# deform_conv2d

def _conv_shape(a, kw):
    geo = _conv_geometry("deform_conv2d", a, kw["stride"], kw["padding"], kw["dilation"])
    return (a["input"].shape[0], a["weight"].shape[0], *geo.out_size)


def _conv_backward(grad_output, *, border_grad, **kwargs):
    return _core.deform_conv2d_backward(grad_output, border_grad=border_grad, **kwargs)


def _conv_forward(*, border_grad, **kwargs):
    return _core.deform_conv2d(**kwargs)


_deform_conv2d = _make_op("deform_conv2d", ("input", "offset", "weight", "bias", "mask"), frozenset(),
                          _conv_forward, _conv_backward, _conv_shape)


def deform_conv2d(input, offset, weight, bias=None, *, stride=1, padding=0, dilation=1, mask=None,
                  border_grad="torchvision"):
    """Differentiable :func:`cudeform.deform_conv2d` (DCN v1; v2 when ``mask`` is given).

    Shapes: input (N, C_in, H, W); offset (N, 2 * G * kh * kw, H_out, W_out), (dy, dx) pairs;
    weight (C_out, C_in / groups, kh, kw); bias (C_out,); mask (N, G * kh * kw, H_out, W_out),
    used as given; output (N, C_out, H_out, W_out). ``border_grad`` picks the offset gradient's
    convention at the image border, as in :func:`cudeform.deform_conv2d_backward`. Runs on a
    CUDA device or on the host (see the module's docstring).
    """
    op = "deform_conv2d"
    check.choice(op, "border_grad", border_grad, BORDER_GRADS)
    params = (("stride", check.int_pair(op, "stride", stride, minimum=1)),
              ("padding", check.int_pair(op, "padding", padding, minimum=0)),
              ("dilation", check.int_pair(op, "dilation", dilation, minimum=1)),
              ("border_grad", border_grad))
    return _deform_conv2d(params, (input, offset, weight, bias, mask))


# deform_roi_pool

def _roi_shape(a, kw):
    geo = _roi_geometry("deform_roi_pool", a, kw["output_size"], kw["spatial_scale"], kw["sampling_ratio"],
                        kw["gamma"])
    return (a["rois"].shape[0], a["input"].shape[1], *geo.output_size)


_deform_roi_pool = _make_op("deform_roi_pool", ("input", "rois", "offset", "mask"), frozenset({"rois"}),
                            _core.deform_roi_pool, _core.deform_roi_pool_backward, _roi_shape)


def deform_roi_pool(input, rois, offset=None, *, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                    mask=None):
    """Differentiable :func:`cudeform.deform_roi_pool` (mmcv's deformable RoI pooling; modulated
    when ``mask`` is given).

    Shapes: input (N, C, H, W); rois (R, 5), rows ``[batch_index, x1, y1, x2, y2]``, same dtype
    as input, zero cotangent; offset (R, 2, ph, pw), channel 0 moving x and channel 1 moving y,
    in units of ``gamma`` times the RoI's size; mask (R, 1, ph, pw); output (R, C, ph, pw).
    Runs on a CUDA device or on the host (see the module's docstring).
    """
    op = "deform_roi_pool"
    params = (("output_size", check.int_pair(op, "output_size", output_size, minimum=1)),
              ("spatial_scale", check.real(op, "spatial_scale", spatial_scale, positive=True)),
              ("sampling_ratio", check.integer(op, "sampling_ratio", sampling_ratio, minimum=0)),
              ("gamma", check.real(op, "gamma", gamma)))
    return _deform_roi_pool(params, (input, rois, offset, mask))


# deform_psroi_pool

def _psroi_shape(a, kw):
    geo = _psroi_geometry("deform_psroi_pool", a, **kw)
    return (a["rois"].shape[0], geo.output_dim, geo.pooled_size, geo.pooled_size)


_deform_psroi_pool = _make_op("deform_psroi_pool", ("input", "rois", "offset"), frozenset({"rois"}),
                              _core.deform_psroi_pool, _core.deform_psroi_pool_backward, _psroi_shape)


def deform_psroi_pool(input, rois, offset=None, *, output_dim, pooled_size, group_size=1, part_size=None,
                      sample_per_part=4, spatial_scale=1.0, trans_std=0.1):
    """Differentiable :func:`cudeform.deform_psroi_pool` (MSRA's deformable position-sensitive
    RoI pooling, R-FCN).

    Shapes: input (N, output_dim * group_size**2, H, W); rois (R, 5) as for
    :func:`deform_roi_pool`, zero cotangent; offset (R, 2 * num_classes, part_size, part_size);
    output (R, output_dim, pooled_size, pooled_size). Runs on a CUDA device or on the host (see
    the module's docstring).
    """
    op = "deform_psroi_pool"
    params = (("output_dim", check.integer(op, "output_dim", output_dim, minimum=1)),
              ("pooled_size", check.integer(op, "pooled_size", pooled_size, minimum=1)),
              ("group_size", check.integer(op, "group_size", group_size, minimum=1)),
              ("part_size", None if part_size is None else check.integer(op, "part_size", part_size, minimum=1)),
              ("sample_per_part", check.integer(op, "sample_per_part", sample_per_part, minimum=1)),
              ("spatial_scale", check.real(op, "spatial_scale", spatial_scale, positive=True)),
              ("trans_std", check.real(op, "trans_std", trans_std)))
    return _deform_psroi_pool(params, (input, rois, offset))


# deform_kernel_conv2d

def _kconv_shape(a, kw):
    geo = _kconv_geometry("deform_kernel_conv2d", a, **kw)
    return (a["input"].shape[0], a["weight"].shape[0], *geo.out_size)


_deform_kernel_conv2d = _make_op("deform_kernel_conv2d", ("input", "weight", "kernel_offset", "bias"), frozenset(),
                                 _core.deform_kernel_conv2d, _core.deform_kernel_conv2d_backward, _kconv_shape)


def deform_kernel_conv2d(input, weight, kernel_offset, bias=None, *, kernel_size, stride=1, padding=0, dilation=1,
                         groups=1):
    """Differentiable :func:`cudeform.deform_kernel_conv2d` (Deformable Kernels, global or local).

    Shapes: input (N, C_in, H, W); weight (C_out, C_in / groups, S_h, S_w), the kernel scope;
    kernel_offset (N, 2 * G * kh * kw) for global DK or (N, 2 * G * kh * kw, H_out, W_out) for
    local DK, (dh, dw) pairs in scope cells; bias (C_out,); output (N, C_out, H_out, W_out).
    Runs on a CUDA device or on the host (see the module's docstring).
    """
    op = "deform_kernel_conv2d"
    params = (("kernel_size", check.int_pair(op, "kernel_size", kernel_size, minimum=1)),
              ("stride", check.int_pair(op, "stride", stride, minimum=1)),
              ("padding", check.int_pair(op, "padding", padding, minimum=0)),
              ("dilation", check.int_pair(op, "dilation", dilation, minimum=1)),
              ("groups", check.integer(op, "groups", groups, minimum=1)))
    return _deform_kernel_conv2d(params, (input, weight, kernel_offset, bias))
