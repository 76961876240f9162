"""Every GPU op on tiny shapes, once per case, for NVIDIA compute-sanitizer (run by .ci/sanitize).

    python tests/sanitize_driver.py all     # memcheck: every case of gpu_cases.CASES, forward and
                                            # both backward modes, in every dtype; again with
                                            # non-finite offsets; conv and DK again in chunks
    python tests/sanitize_driver.py shared  # racecheck, synccheck: the ops whose kernels use
                                            # shared memory or warp shuffles (forward, and the
                                            # backward in the mode that launches them), float32
                                            # and float64; global DK's tensor-core path in
                                            # float16

CuPy's memory pool is off, so that memcheck sees each array's own bounds (inside a pooled block
an access past an array's end is invisible). bfloat16 goes through PyTorch tensors, whose
allocator .ci/sanitize runs uncached (PYTORCH_NO_CUDA_MEMORY_CACHING=1) for the same reason.
"""

import contextlib
import sys

import numpy as np

from gpu_cases import CASES

DTYPES = ("float64", "float32", "float16", "bfloat16")
# The ops that launch dk_global_conv (global DK's direct forward, at any kernel height and at
# the compiled height 3; the stride-1 input gradient of "dk_global_direct_3x3"), and whose
# backwards launch plane_sums (a bias), dk_resample, dk_global_kernel_grad and
# dk_global_resample_grad (global DK), dk_local_weight_grad (local DK), droi_backward (with an offset or a mask) and
# dpsroi_backward (warp shuffles). The accumulator (float or double) sets their shared layouts.
SHARED = ("deform_conv2d", "dk_global_direct", "dk_global_direct_3x3", "dk_global_gemm", "dk_local", "deform_roi_pool",
          "deform_psroi_pool")
# The deterministic backwards with shared memory or warp shuffles of their own: deform_conv2d's
# max-abs pass (dcn_col2im_max_abs) and deform_roi_pool's gathered input gradient
# (droi_transpose_grad_output, droi_gather_input_grad).
SHARED_DETERMINISTIC = ("deform_conv2d", "deform_roi_pool_sampled")
SHARED_DTYPES = ("float32", "float64")
# Global DK's tensor-core path, which only the half types take: the forward (dk_mma_operands,
# dk_global_mma: shared tiles filled by cp.async) and the backward through the resampling
# (dk_resample_grad_sums' staged rows, dk_resample_grad_offsets' block sums); deform_conv2d's
# fused forward (dcn_fused_operands, dcn_fused_wgmma) and its backward's shuffles
# (dcn_col2im_cl, in both modes) and shared tiles (dcn_input_grad_cl).
SHARED_HALF = ("dk_global_gemm", "deform_conv2d_fused")
CHUNKED = ("deform_conv2d", "deform_conv2d_v1", "dk_global_gemm")


def on_device(case, dtype):
    """The case's arguments and grad_output on the GPU in ``dtype``."""
    if dtype != "bfloat16":
        import cupy

        return case.on(cupy, dtype)
    import torch

    def tensor(a):
        return None if a is None else torch.from_numpy(a).to("cuda", torch.bfloat16)

    return {k: tensor(v) for k, v in case.args.items()}, tensor(case.grad_output)


def with_nonfinite_offsets(case):
    """The case with NaN, +Inf and -Inf among its offsets, or None if it has none."""
    name = "kernel_offset" if "kernel_offset" in case.args else "offset"
    if case.args[name] is None:
        return None
    offset = case.args[name].copy()
    flat = offset.reshape(-1)
    flat[::3], flat[1::7], flat[2::11] = np.nan, np.inf, -np.inf
    return case._replace(args=dict(case.args, **{name: offset}))


def exercise(label, case, dtype, forward=True, modes=(False, True)):
    """Forward (optionally) and the backward in each mode; synchronises after each so that an
    asynchronous error surfaces at its call."""
    import cupy

    arrays, grad_output = on_device(case, dtype)
    print(label, dtype, flush=True)
    if forward:
        case.forward(**arrays, **case.geo)
    for deterministic in modes:
        case.backward(grad_output, **arrays, **case.geo, deterministic=deterministic)
    cupy.cuda.runtime.deviceSynchronize()
    return forward + len(modes)


@contextlib.contextmanager
def one_image_per_chunk():
    """Columns workspaces of one image: several chunks, and chunks that start past image 0."""
    from cudeform.cuda import deform_conv, deform_kernel_conv

    saved = deform_conv.COLUMNS_BYTES, deform_kernel_conv.COLUMNS_BYTES
    deform_conv.COLUMNS_BYTES = deform_kernel_conv.COLUMNS_BYTES = 1
    try:
        yield
    finally:
        deform_conv.COLUMNS_BYTES, deform_kernel_conv.COLUMNS_BYTES = saved


def main(selection):
    import cupy

    from cudeform.cuda import deform_conv

    cupy.cuda.set_allocator(None)
    deform_conv.FUSED_MIN_TILES = 0  # the fused forward at these tiny shapes too
    calls = 0
    if selection == "all":
        for dtype in DTYPES:
            if dtype == "bfloat16" and not torch_cuda():
                print("bfloat16 skipped: no PyTorch with CUDA", flush=True)
                continue
            for name, case in CASES.items():
                calls += exercise(name, case, dtype)
                nonfinite = with_nonfinite_offsets(case)
                if nonfinite is not None:
                    calls += exercise(f"{name} (non-finite offsets)", nonfinite, dtype)
        with one_image_per_chunk():
            for name in CHUNKED:
                calls += exercise(f"{name} (one image per chunk)", CASES[name], "float32")
    elif selection == "shared":
        for dtype in SHARED_DTYPES:
            for name in SHARED:
                calls += exercise(name, CASES[name], dtype, modes=(False,))
            for name in SHARED_DETERMINISTIC:
                calls += exercise(f"{name} (deterministic)", CASES[name], dtype, forward=False, modes=(True,))
        for name in SHARED_HALF:
            calls += exercise(f"{name} (tensor cores)", CASES[name], "float16", modes=(False, True))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} all|shared (got {selection!r})")
    print(f"sanitize driver: {calls} calls ({selection})", flush=True)


def torch_cuda():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
