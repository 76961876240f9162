"""Small cases of every op and every GPU code path, shared by the GPU robustness tests
(threads, CUDA graph capture, a second device) and the sanitizer driver (.ci/sanitize).

Each case is built from the op tests' own case builders. Shapes pick the paths by themselves
(no patched thresholds), so that the cases can run side by side in threads.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import numpy as np

import cudeform
import test_deform_conv as tdc
import test_deform_kernel_conv as tdk
import test_deform_roi_pool as tdr
from helpers import rel_err, to_numpy


class Case(NamedTuple):
    forward: Callable
    backward: Callable
    args: dict  # float64 NumPy arrays (or None), by argument name
    geo: dict
    grad_output: np.ndarray

    def on(self, xp, dtype="float64") -> tuple[dict, Any]:
        """The arguments and grad_output as ``xp`` arrays of ``dtype``."""
        return tdc.on(xp, self.args, dtype), xp.asarray(self.grad_output.astype(dtype))

    def run(self, arrays, grad_output, deterministic) -> list:
        """[output, *gradients] of one forward and one backward."""
        out = self.forward(**arrays, **self.geo)
        return [out, *self.backward(grad_output, **arrays, **self.geo, deterministic=deterministic)]


def _conv(cfg, **kw):
    args, geo = tdc.make_case(cfg, seed=50, **kw)
    go = np.random.default_rng(51).standard_normal((cfg["N"], cfg["C_out"], *tdc.out_size(cfg)))
    return Case(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, args, geo, go)


def _dk(cfg, mode):
    args, geo = tdk.make_case(cfg, mode, seed=52)
    return Case(cudeform.deform_kernel_conv2d, cudeform.deform_kernel_conv2d_backward, args, geo,
                tdk.grad_output_for(cfg, seed=53))


def _pool(op, args, geo):
    forward, backward, _, _, _ = tdr.OPS[op]
    # RoIs whose batch index is out of range or NaN pool zeros on the GPU (the CPU raises).
    args["rois"][:3, 0] = [args["input"].shape[0], -1.0, np.nan]
    go = np.random.default_rng(54).standard_normal((args["rois"].shape[0], *tdr.output_shape(op, args, geo)))
    return Case(forward, backward, args, geo, go)


# A global DK convolution with Cg * K > DIRECT_MAX_REDUCTION (72 > 64) takes the GEMM path; its
# 12 images make 108 (image, kernel point) rows, more than dk_resample_grad_sums' three stages
# of 32 in flight; in the half types its 8 output channels (a 16-byte vector) send the input
# gradient through dk_global_mma's transposed convolution.
DK_GEMM = dict(N=12, C_in=8, C_out=8, groups=1, G=2, kernel=(3, 3), scope=(4, 5), H=7, W=8, stride=1, padding=1,
               dilation=1)
# A scope (9 x 8) wider than one float64 shared-memory tile of the local weight gradient.
DK_WIDE_SCOPE = dict(N=2, C_in=4, C_out=4, groups=2, G=2, kernel=(3, 2), scope=(9, 8), H=20, W=19, stride=1,
                     padding=(1, 0), dilation=(2, 1))

# Whole 16-byte vectors of channels per group and per offset group: in the half types on sm_90
# the forward is dcn_fused_wgmma (an offset group of 32 channels, half of a weight group's 64).
DCN_FUSED = dict(N=2, C_in=64, C_out=24, groups=1, G=2, kernel=(3, 3), H=7, W=9, stride=1, padding=1, dilation=1)

# Cases that call cuBLAS: CuPy refuses cuBLAS calls while a stream captures a CUDA graph
# (NotImplementedError), so these cannot be captured (a known limitation, see README).
USES_CUBLAS = ("deform_conv2d", "deform_conv2d_v1", "deform_conv2d_fused", "dk_global_gemm")

CASES = {
    "deform_conv2d": _conv(tdc.CONFIGS["grouped"]),
    "deform_conv2d_v1": _conv(tdc.CONFIGS["plain3x3"], mask=False, bias=False),
    "deform_conv2d_fused": _conv(DCN_FUSED),  # its backward: dcn_col2im_cl, 4 threads a position
    "dk_global_direct": _dk(tdk.CONFIGS["depthwise"], "global"),
    "dk_global_direct_3x3": _dk(tdk.CONFIGS["plain"], "global"),  # dk_global_conv's compiled height
    "dk_global_gemm": _dk(DK_GEMM, "global"),
    "dk_local": _dk(DK_WIDE_SCOPE, "local"),
    # deform_roi_pool's deterministic input gradient: in fixed point with sampling_ratio 0
    # ("adaptive"), gathered with sampling_ratio 2 ("fixed"), there with droi_backward for the
    # offset and mask sums or without it.
    "deform_roi_pool": _pool("roi", *tdr.roi_case(tdr.ROI_CONFIGS["adaptive"], seed=55)),
    "deform_roi_pool_sampled": _pool("roi", *tdr.roi_case(tdr.ROI_CONFIGS["fixed"], seed=59)),
    "deform_roi_pool_plain": _pool("roi", *tdr.roi_case(tdr.ROI_CONFIGS["fixed"], seed=56, offset=False, mask=False)),
    "deform_psroi_pool": _pool("psroi", *tdr.ps_case(tdr.PS_CONFIGS["rfcn"], seed=57)),
    "deform_psroi_pool_plain": _pool("psroi", *tdr.ps_case(tdr.PS_CONFIGS["plain"], seed=58, offset=False)),
}

# The cases whose deterministic backward gathers deform_roi_pool's input gradient (outside a
# CUDA graph capture: inside one it goes through fixed point).
GATHERED_ROI_CASES = ("deform_roi_pool_sampled", "deform_roi_pool_plain")


def assert_same_results(got, want, exact, what=""):
    """Lists of results (None or arrays) agree: bitwise when ``exact``, else within 1e-12
    (a float64 sum accumulated by atomics in another order)."""
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, (what, i)
            continue
        a, b = to_numpy(a), to_numpy(b)
        assert a.shape == b.shape, (what, i)
        if exact:
            assert np.array_equal(a, b), (what, i)
        else:
            assert rel_err(a, b) < 1e-12, (what, i, rel_err(a, b))


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def spin():
    """Queue on CuPy's current stream a kernel that keeps it busy for a quarter of a second or
    so, and return the event recorded behind it."""
    import cupy

    cupy.RawKernel(_SPIN, "spin")((1,), (1,), (np.int64(500_000_000),))
    return cupy.cuda.get_current_stream().record()


def run_behind_busy_stream(run, stream):
    """Run ``run()`` on ``stream`` right after a kernel that keeps the stream busy (``spin``),
    and assert that ``run()`` returned while that kernel still ran: a call that synchronised
    the stream or the device (``.get()``, ``int()`` of a device array, a blocking copy) would
    have waited for it. Returns ``run()``'s results once the stream is done."""
    with stream:
        run()  # compile every kernel first
        stream.synchronize()
        busy = spin()
        results = run()
        still_running = not busy.done
        stream.synchronize()
    assert still_running, "the call waited for the device"
    return results


@contextlib.contextmanager
def busy_torch_stream(torch):
    """A new torch stream, made current, with large matmuls still queued on it: work that went
    to another stream instead of the current one would race with them (and read inputs that
    the stream has not produced yet)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(3):
            big = big @ big / 64
        yield stream


def capture_and_replay(run, stream):
    """Run ``run()`` (which returns CuPy arrays) while ``stream`` captures a CUDA graph, then
    replay the graph into its results, first set to NaN. Returns the replayed results.

    The capture is the proof that ``run`` never synchronises: in the global capture mode, any
    synchronisation (of the stream, the device or through a blocking copy such as ``.get()``,
    ``int()`` or ``float()`` of a device array), any cudaMalloc (a memory pool that must grow)
    and any use of the legacy default stream fails with an error, from any thread, instead of
    passing silently. The replay proves that the work went to the current stream: work
    queued elsewhere is not in the graph, and its results would stay NaN.
    """
    import cupy

    cupy.cuda.runtime.deviceSynchronize()  # the inputs, queued on other streams, are ready
    with stream:
        run()  # compile every kernel and fill this stream's memory pool: no cudaMalloc below
        stream.synchronize()
        stream.begin_capture(cupy.cuda.runtime.streamCaptureModeGlobal)
        error = None
        try:
            results = run()
        except Exception as exc:
            error = exc
        try:
            graph = stream.end_capture()
        except Exception as exc:  # an invalidated capture (reported again if run() raised)
            error = error or exc
        if error is not None:
            raise AssertionError(f"a call that is illegal during stream capture (a synchronisation, a blocking "
                                 f"copy or a cudaMalloc): {error!r}") from error
        for result in results:
            if result is not None:
                result.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
    return results
