"""cudeform in one page: a modulated deformable convolution (DCN v2), its gradients, and a
numerical check of those gradients. Runs on NumPy (CPU); repeats on CuPy when a GPU is there.

    python examples/quickstart.py
"""

import numpy as np

import cudeform


def run(xp, where):
    rng = np.random.default_rng(0)
    n, c_in, c_out, h, w = 2, 8, 16, 12, 12
    x = xp.asarray(rng.standard_normal((n, c_in, h, w)))
    weight = xp.asarray(rng.standard_normal((c_out, c_in, 3, 3)) * 0.1)
    bias = xp.zeros(c_out)
    # One (dy, dx) per kernel point and output pixel, and one mask value per kernel point.
    offset = xp.asarray(rng.uniform(-1.0, 1.0, (n, 2 * 9, h, w)))
    mask = xp.asarray(rng.uniform(0.0, 1.0, (n, 9, h, w)))

    out = cudeform.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    grads = cudeform.deform_conv2d_backward(xp.ones_like(out), x, offset, weight, bias, padding=1, mask=mask)
    print(f"[{where}] output {tuple(out.shape)}, |output| = {float(xp.abs(out).mean()):.4f}")
    print(f"[{where}] gradients: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in grads._asdict().items()))

    # The analytic backward against central finite differences, on a small float64 case.
    small = dict(input=x[:1, :2, :5, :5], offset=offset[:1, :, :3, :3], weight=weight[:3, :2],
                 mask=mask[:1, :, :3, :3])
    result = cudeform.testing.gradcheck(cudeform.deform_conv2d, cudeform.deform_conv2d_backward, small)
    print(f"[{where}] {result}")


def main():
    run(np, "cpu")
    try:
        import cupy

        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        run(cupy, "gpu")
    else:
        print("[gpu] skipped: no CuPy or no CUDA device (pip install 'cudeform[cuda13]' on a GPU machine)")


if __name__ == "__main__":
    main()
