"""CPU benchmark: cudeform's Numba deform_conv2d (v2, with mask) against dense convolutions
of the same shape: im2col + NumPy matmul (the same BLAS cudeform's GEMMs use), and torch's CPU
conv2d (oneDNN) when torch is installed.

    python benchmarks/bench_deform_conv_cpu.py

Prints median times (ms) and the ratios to each dense convolution, forward and
forward+backward. Goal: within 3x of the dense convolution.
"""

import time

import numpy as np

import cudeform

SHAPES = [(2, 64, 32, 32), (1, 128, 32, 48), (4, 32, 64, 64)]  # (N, C, H, W), 3x3, pad 1
REPEATS = 5


def median_seconds(fn):
    fn()  # warm-up: Numba compiles (or loads its cache) on the first call
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def dense_numpy(x, w):
    n, c, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # n c h w 3 3
    cols = np.ascontiguousarray(win.transpose(0, 1, 4, 5, 2, 3)).reshape(n, c * 9, h * wd)
    return np.matmul(w.reshape(w.shape[0], -1), cols).reshape(n, -1, h, wd)


def torch_timers(x, w):
    """(forward, forward+backward) of torch's conv2d, or Nones without torch."""
    try:
        import torch
    except ImportError:
        return None, None
    tx = torch.from_numpy(x).requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)

    def fwd_bwd():
        out = torch.nn.functional.conv2d(tx, tw, padding=1)
        out.backward(torch.ones_like(out))

    with torch.no_grad():
        fwd = median_seconds(lambda: torch.nn.functional.conv2d(tx, tw, padding=1))
    return fwd, median_seconds(fwd_bwd)


def main():
    rng = np.random.default_rng(0)
    print(f"float32, 3x3, padding 1, with mask; median of {REPEATS}; ms (ratio = cudeform / dense)")
    print("| shape (N,C,H,W) | fwd | im2col+matmul fwd | ratio | torch fwd | ratio | fwd+bwd | torch fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "n/a" if v is None else f"{v * 1e3:.2f}"
    ratio = lambda a, b: "n/a" if b is None else f"{a / b:.1f}"
    for n, c, h, wd in SHAPES:
        x = rng.standard_normal((n, c, h, wd)).astype(np.float32)
        w = (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)
        off = rng.uniform(-1, 1, (n, 18, h, wd)).astype(np.float32)
        mask = rng.uniform(0, 1, (n, 9, h, wd)).astype(np.float32)
        go = np.ones((n, c, h, wd), np.float32)
        fwd = median_seconds(lambda: cudeform.deform_conv2d(x, off, w, padding=1, mask=mask))

        def fwd_bwd():
            cudeform.deform_conv2d(x, off, w, padding=1, mask=mask)
            cudeform.deform_conv2d_backward(go, x, off, w, padding=1, mask=mask)

        both = median_seconds(fwd_bwd)
        dense = median_seconds(lambda: dense_numpy(x, w))
        tfwd, tboth = torch_timers(x, w)
        print(f"| {n},{c},{h},{wd} | {fmt(fwd)} | {fmt(dense)} | {ratio(fwd, dense)} | {fmt(tfwd)} | {ratio(fwd, tfwd)} "
              f"| {fmt(both)} | {fmt(tboth)} | {ratio(both, tboth)} |", flush=True)


if __name__ == "__main__":
    main()
