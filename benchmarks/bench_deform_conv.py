"""GPU benchmark of deform_conv2d (v2, with mask; 3x3, stride 1, padding 1): cudeform against
torchvision.ops.deform_conv2d and cuDNN's dense conv2d of the same shape, in one run.

    python benchmarks/bench_deform_conv.py [--quick]

For each shape and dtype: forward and forward+backward times (CUDA events; cudeform,
torchvision and the dense convolution take turns, five rounds of 20 calls, the smallest round
median counts: see timed_ms), the forward's device time alone (the torch profiler's kernel
times: short calls are host-bound, and the events then time the host) and the forward+backward's
likewise, cudeform's reference backend (im2col and cuBLAS, NCHW) beside its default (for the half
types on sm_90: the fused tensor-core forward and the channels-last backward), the ratios
cudeform/torchvision and cudeform/dense, the peak extra memory of each forward (beyond its
inputs and output), and cudeform's backward alone in its default and its deterministic mode
(the bar: deterministic within 1.5x of the default). CuPy allocates through PyTorch's caching
allocator here, so one counter sees both libraries. Prints a Markdown table.
"""

import argparse
import datetime

import cupy
import numpy as np
import torch
import torch.nn.functional as F

import cudeform
from cudeform.testing import peak_extra_memory

SPEC_SHAPES = [(16, 128, 64, 64), (16, 256, 32, 32), (16, 512, 16, 16), (2, 256, 100, 152)]
DETECTION_SHAPES = [(2, 128, 100, 152), (2, 256, 50, 76), (2, 512, 25, 38)]
DTYPES = ["float16", "bfloat16", "float32"]


def use_torch_allocator():
    def malloc(size, device):
        return torch.cuda.caching_allocator_alloc(size, device, torch.cuda.current_stream(device))

    cupy.cuda.set_allocator(cupy.cuda.memory.PythonFunctionAllocator(
        malloc, lambda ptr, device: torch.cuda.caching_allocator_delete(ptr)).malloc)


def timed_ms(fns: dict, warmup=3, reps=20, rounds=5) -> dict:
    """Device time of one call of each function: calls queued back to back (as in a training
    loop, where the host prepares the next launch while the device works), events around each.
    The functions take turns, a round of ``reps`` calls each, so that all of them meet the same
    conditions (clocks, a busy host); each gets the smallest of its ``rounds`` round medians."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    medians = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            torch.cuda.synchronize()
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            medians[name].append(float(np.median([start.elapsed_time(end) for start, end in events])))
    return {name: min(values) for name, values in medians.items()}


def device_ms(fn, reps=20):
    """The device time of one call of fn: the sum of its kernels' times (torch profiler)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / reps / 1000


def reference_backend(fn):
    """fn on cudeform's im2col + cuBLAS path (the fused forward and the channels-last backward
    switched off)."""
    from cudeform.cuda import deform_conv as gpu

    def run():
        gpu.FUSED = False
        try:
            return fn()
        finally:
            gpu.FUSED = True
    return run


def median_ms(fn, **kw):
    """:func:`timed_ms` of one function."""
    return timed_ms({"fn": fn}, **kw)["fn"]


def extra_mib(fn):
    """Peak memory during fn() beyond what existed before it and what it returns, in MiB."""
    return peak_extra_memory(fn)[0] / 2**20


def bench_shape(shape, dtype):
    import torchvision

    n, c, h, w = shape
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt, generator=gen)
    weight = (torch.randn(c, c, 3, 3, device="cuda", dtype=dt, generator=gen) / (3 * c**0.5)).to(dt)
    bias = torch.randn(c, device="cuda", dtype=dt, generator=gen)
    offset = (torch.rand(n, 18, h, w, device="cuda", generator=gen) * 4 - 2).to(dt)
    mask = torch.rand(n, 9, h, w, device="cuda", generator=gen).to(dt)
    go = torch.randn(n, c, h, w, device="cuda", dtype=dt, generator=gen)
    cd_fwd = lambda: cudeform.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    def cd_bwd(deterministic=False):
        return cudeform.deform_conv2d_backward(go, x, offset, weight, bias, padding=1, mask=mask,
                                               deterministic=deterministic)

    def cd_both():
        cd_fwd()
        return cd_bwd()

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, offset, weight, bias, mask)]
    tv_fwd = lambda: torchvision.ops.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], padding=1,
                                                   mask=leaves[4])

    def tv_fwd_no_grad():
        with torch.no_grad():
            return tv_fwd()

    def tv_both():
        tv_fwd().backward(go)

    dx, dw, db = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    dense_fwd = lambda: F.conv2d(dx, dw, db, padding=1)

    def dense_fwd_no_grad():
        with torch.no_grad():
            return dense_fwd()

    def dense_both():
        dense_fwd().backward(go)

    fns = {"cd fwd": cd_fwd, "im2col fwd": reference_backend(cd_fwd), "cd both": cd_both,
           "im2col both": reference_backend(cd_both), "cd bwd": cd_bwd,
           "cd det bwd": lambda: cd_bwd(deterministic=True),
           "dense fwd": dense_fwd_no_grad, "dense both": dense_both}
    try:
        tv_fwd_no_grad()
        fns.update({"tv fwd": tv_fwd_no_grad, "tv both": tv_both})
    except RuntimeError:  # torchvision has no bfloat16 kernels
        pass
    t = timed_ms(fns)
    row = {"cd": (t["cd fwd"], t["cd both"], extra_mib(cd_fwd)), "cd bwd": (t["cd bwd"], t["cd det bwd"]),
           "im2col": (t["im2col fwd"], t["im2col both"]), "device": (device_ms(cd_fwd), device_ms(dense_fwd_no_grad)),
           "device both": (device_ms(cd_both), device_ms(dense_both)),
           "tv": (t["tv fwd"], t["tv both"], extra_mib(tv_fwd_no_grad)) if "tv fwd" in t else None,
           "dense": (t["dense fwd"], t["dense both"], None)}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, fp16 and fp32 only")
    args = parser.parse_args()
    use_torch_allocator()
    torch.backends.cudnn.benchmark = True
    # Exact float32 everywhere, as SPEC.md's anchors were measured (cudeform's float32 is exact).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SPEC_SHAPES + DETECTION_SHAPES
    dtypes = DTYPES
    if args.quick:
        shapes, dtypes = [SPEC_SHAPES[1], DETECTION_SHAPES[0]], ["float16", "float32"]
    name = torch.cuda.get_device_name()
    print(f"\n{name}, {datetime.date.today()}, torch {torch.__version__}, "
          f"cudeform {cudeform.__version__}; "
          f"3x3, stride 1, padding 1, with mask and bias; ms, smallest of 5 interleaved round medians of 20 calls")
    print("| shape (N,C,H,W) | dtype | cudeform fwd | im2col fwd | tv fwd | dense fwd | fwd vs tv | fwd vs dense "
          "| device fwd vs dense | cudeform fwd+bwd | im2col fwd+bwd | tv fwd+bwd | dense fwd+bwd | f+b vs tv "
          "| f+b vs dense | device f+b vs dense | cudeform fwd extra MiB | tv fwd extra MiB | cudeform bwd | det bwd "
          "| det vs default |")
    print("|---" * 21 + "|")
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)
    ratio = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.2f}"
    for shape in shapes:
        for dtype in dtypes:
            r = bench_shape(shape, dtype)
            cd, tv, dense, bwd = r["cd"], r["tv"] or (None, None, None), r["dense"], r["cd bwd"]
            device, both = r["device"], r["device both"]
            print(f"| {','.join(map(str, shape))} | {dtype} | {fmt(cd[0])} | {fmt(r['im2col'][0])} | {fmt(tv[0])} "
                  f"| {fmt(dense[0])} | {ratio(cd[0], tv[0])} | {ratio(cd[0], dense[0])} "
                  f"| {ratio(device[0], device[1])} ({device[0] * 1000:.0f} us) | {fmt(cd[1])} | {fmt(r['im2col'][1])} "
                  f"| {fmt(tv[1])} | {fmt(dense[1])} | {ratio(cd[1], tv[1])} | {ratio(cd[1], dense[1])} "
                  f"| {ratio(both[0], both[1])} ({both[0] * 1000:.0f} us) "
                  f"| {fmt(cd[2], '.0f')} | {fmt(tv[2], '.0f')} | {fmt(bwd[0])} | {fmt(bwd[1])} "
                  f"| {ratio(bwd[1], bwd[0])} |", flush=True)


if __name__ == "__main__":
    main()
