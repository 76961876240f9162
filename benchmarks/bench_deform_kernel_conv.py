"""GPU benchmark of deform_kernel_conv2d (global and local DK; a 3x3 kernel in a 4x4 scope,
stride 1, padding 1, with bias): against cuDNN's dense conv2d and cudeform's deform_conv2d
(v1) of the same shape, in one run.

    python benchmarks/bench_deform_kernel_conv.py

For each shape and dtype: median forward and forward+backward times (CUDA events, as in
bench_deform_conv.py), the ratios to dense and to deform_conv2d, and each cudeform op's
backward alone in its default and its deterministic mode. Prints a Markdown table. The bars
(issue 5): global DK within 1.5x of dense; local DK depthwise within 2x of deform_conv2d
depthwise; (issue 7) a deterministic backward within 1.5x of the default.
"""

import datetime

import torch
import torch.nn.functional as F

import cudeform
from bench_deform_conv import median_ms, use_torch_allocator

# name, N, C, H, W, groups
SHAPES = [("depthwise", 16, 256, 56, 56, 256), ("dense", 16, 256, 32, 32, 1)]
DTYPES = ["float16", "float32"]
SCOPE = 4


def bench_shape(n, c, h, w, groups, dtype):
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, device="cuda", generator=gen)  # noqa: E731
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt, generator=gen)
    cg = c // groups
    scope = (torch.randn(c, cg, SCOPE, SCOPE, device="cuda", generator=gen) / (3 * cg**0.5)).to(dt)
    weight = scope[:, :, :3, :3].contiguous()  # for dense and deform_conv2d
    bias = torch.randn(c, device="cuda", dtype=dt, generator=gen)
    go = torch.randn(n, c, h, w, device="cuda", dtype=dt, generator=gen)
    geo = dict(kernel_size=3, padding=1, groups=groups)
    kernel_offsets = {"global DK": (rand(n, 18) * 2 - 1).to(dt), "local DK": (rand(n, 18, h, w) * 2 - 1).to(dt)}
    rows = {}
    for name, off in kernel_offsets.items():
        def fwd(off=off):
            return cudeform.deform_kernel_conv2d(x, scope, off, bias, **geo)

        def bwd(off=off, deterministic=False):
            return cudeform.deform_kernel_conv2d_backward(go, x, scope, off, bias, **geo, deterministic=deterministic)

        def both(off=off):
            fwd(off)
            return bwd(off)

        rows[name] = (median_ms(fwd), median_ms(both), median_ms(bwd), median_ms(lambda: bwd(deterministic=True)))

    offset = (rand(n, 18, h, w) * 4 - 2).to(dt)

    def dcn_fwd():
        return cudeform.deform_conv2d(x, offset, weight, bias, padding=1)

    def dcn_bwd(deterministic=False):
        return cudeform.deform_conv2d_backward(go, x, offset, weight, bias, padding=1, deterministic=deterministic)

    def dcn_both():
        dcn_fwd()
        return dcn_bwd()

    rows["deform_conv2d"] = (median_ms(dcn_fwd), median_ms(dcn_both), median_ms(dcn_bwd),
                             median_ms(lambda: dcn_bwd(deterministic=True)))

    dx, dw, db = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))

    def dense_fwd():
        return F.conv2d(dx, dw, db, padding=1, groups=groups)

    def dense_both():
        dense_fwd().backward(go)

    with torch.no_grad():
        dense_fwd_ms = median_ms(dense_fwd)
    rows["dense (cuDNN)"] = (dense_fwd_ms, median_ms(dense_both), None, None)
    return rows


def main():
    use_torch_allocator()
    torch.backends.cudnn.benchmark = True
    # Exact float32 everywhere (cudeform's float32 GEMMs are exact).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"\n{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"cudeform {cudeform.__version__}; 3x3 kernel, {SCOPE}x{SCOPE} scope, stride 1, padding 1, "
          f"with bias; median ms")
    print("| shape (N,C,H,W) | groups | dtype | op | fwd | fwd vs dense | fwd vs deform_conv2d "
          "| fwd+bwd | f+b vs dense | f+b vs deform_conv2d | bwd | det bwd | det vs default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for _, n, c, h, w, groups in SHAPES:
        for dtype in DTYPES:
            rows = bench_shape(n, c, h, w, groups, dtype)
            dense, dcn = rows["dense (cuDNN)"], rows["deform_conv2d"]
            for op, (f, fb, b, det) in rows.items():
                bwd = "n/a | n/a | n/a" if b is None else f"{b:.3f} | {det:.3f} | {det / b:.2f}"
                print(f"| {n},{c},{h},{w} | {groups} | {dtype} | {op} | {f:.3f} | {f / dense[0]:.2f} "
                      f"| {f / dcn[0]:.2f} | {fb:.3f} | {fb / dense[1]:.2f} | {fb / dcn[1]:.2f} | {bwd} |", flush=True)


if __name__ == "__main__":
    main()
