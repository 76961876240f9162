"""GPU benchmark of deform_roi_pool and deform_psroi_pool against torchvision's RoIAlign kernels.

    python benchmarks/bench_deform_roi_pool.py

deform_roi_pool (with offsets and mask, and without: then it is roi_align) against
torchvision.ops.roi_align(aligned=True) on 2 images, 256 channels, 100x152 features (stride 8),
1000 RoIs, 7x7 output, sampling_ratio 2; deform_psroi_pool with offsets at R-FCN sizes (7x7
output, group_size 7, output_dim 21: 21*49 input channels, 300 RoIs, sample_per_part 4)
against torchvision.ops.ps_roi_align with the same 4x4 samples per bin. Median ms of the
forward and of forward+backward (CUDA events, as bench_deform_conv.py), and of cudeform's
backward alone in its default and its deterministic mode (the bar: deterministic within 1.5x
of the default); prints a Markdown table.
"""

import datetime

import torch

import cudeform
from bench_deform_conv import median_ms, use_torch_allocator

STRIDE = 8


def random_rois(n_rois, n_images, height, width, gen):
    """Boxes in image coordinates, 16 to 400 pixels a side, some crossing the border."""
    img_h, img_w = height * STRIDE, width * STRIDE
    size = torch.rand(n_rois, 2, device="cuda", generator=gen) * 384 + 16
    image = torch.tensor([img_w, img_h], device="cuda", dtype=torch.float32)
    corner = torch.rand(n_rois, 2, device="cuda", generator=gen) * image - size / 4
    batch = torch.randint(0, n_images, (n_rois, 1), device="cuda", generator=gen).float()
    return torch.cat([batch, corner, corner + size], dim=1)


def timings(cd_fwd, cd_bwd, tv_fwd, leaf, go):
    """(cudeform fwd, fwd+bwd, torchvision fwd, fwd+bwd, cudeform bwd, deterministic bwd) in
    median ms; ``cd_bwd(deterministic)``."""
    def cd_both():
        cd_fwd()
        cd_bwd(False)

    def tv_both():
        leaf.grad = None
        tv_fwd(leaf).backward(go)

    with torch.no_grad():
        tv = median_ms(lambda: tv_fwd(leaf.detach()))
    return (median_ms(cd_fwd), median_ms(cd_both), tv, median_ms(tv_both), median_ms(lambda: cd_bwd(False)),
            median_ms(lambda: cd_bwd(True)))


def bench(kind, dtype):
    import torchvision

    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, w = 2, 100, 152
    if kind == "psroi":
        c, r, k = 21 * 49, 300, 7
    else:
        c, r, k = 256, 1000, 7
    x = torch.randn(n, c, h, w, device="cuda", dtype=dt, generator=gen)
    rois = random_rois(r, n, h, w, gen).to(dt)
    leaf = x.clone().requires_grad_(True)
    scale = 1.0 / STRIDE
    if kind == "psroi":
        offset = (torch.rand(r, 2, k, k, device="cuda", generator=gen) * 2 - 1).to(dt)
        go = torch.randn(r, 21, k, k, device="cuda", dtype=dt, generator=gen)
        geo = dict(output_dim=21, pooled_size=k, group_size=k, sample_per_part=4, spatial_scale=scale)
        return timings(
            lambda: cudeform.deform_psroi_pool(x, rois, offset, **geo),
            lambda det: cudeform.deform_psroi_pool_backward(go, x, rois, offset, **geo, deterministic=det),
            lambda t: torchvision.ops.ps_roi_align(t, rois, k, scale, 4), leaf, go)
    offset = mask = None
    if kind == "deform":
        offset = (torch.rand(r, 2, k, k, device="cuda", generator=gen) * 2 - 1).to(dt)
        mask = torch.rand(r, 1, k, k, device="cuda", generator=gen).to(dt)
    go = torch.randn(r, c, k, k, device="cuda", dtype=dt, generator=gen)
    geo = dict(output_size=k, spatial_scale=scale, sampling_ratio=2)
    return timings(
        lambda: cudeform.deform_roi_pool(x, rois, offset, **geo, mask=mask),
        lambda det: cudeform.deform_roi_pool_backward(go, x, rois, offset, **geo, mask=mask, deterministic=det),
        lambda t: torchvision.ops.roi_align(t, rois, k, scale, 2, aligned=True), leaf, go)


ROWS = [
    ("deform", "deform_roi_pool, offset + mask", "roi_align"),
    ("plain", "deform_roi_pool, no offset", "roi_align"),
    ("psroi", "deform_psroi_pool, offset", "ps_roi_align"),
]


def main():
    use_torch_allocator()
    print(f"\n{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"cudeform {cudeform.__version__}; median ms")
    print("| op | dtype | torchvision peer | cudeform fwd | tv fwd | fwd vs tv | cudeform fwd+bwd | tv fwd+bwd "
          "| f+b vs tv | cudeform bwd | det bwd | det vs default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, label, peer in ROWS:
        for dtype in ("float16", "float32"):
            cd_f, cd_b, tv_f, tv_b, bwd, det_bwd = bench(kind, dtype)
            print(f"| {label} | {dtype} | {peer} | {cd_f:.3f} | {tv_f:.3f} | {cd_f / tv_f:.2f} | {cd_b:.3f} "
                  f"| {tv_b:.3f} | {cd_b / tv_b:.2f} | {bwd:.3f} | {det_bwd:.3f} | {det_bwd / bwd:.2f} |", flush=True)


if __name__ == "__main__":
    main()
