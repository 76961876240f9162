"""Where a deformable CNN looks: the sampling points of its two deformable layers for one output
position, on small, regular and large digits (the deformable-convolution paper's figure of
sampling locations on small and large objects).

    python examples/visualize_offsets.py     # trains the model first if it is not there yet

The model is the one ``train_scaled_digits.py`` saves (by default the "offsets only" model:
a regular CNN whose deformable layers learned offsets on randomly scaled digits). For the output
position at the centre of the last layer's 7x7 map (green), the 3x3 kernel of conv5 samples 9
points of conv4's output at its learned offsets; at each of those, conv4's own 3x3 kernel
samples 9 points of its input, at conv4's offsets there (interpolated bilinearly between output
positions): 81 points (red), mapped from the 7x7 feature grid to image pixels (a feature pixel
covers 4x4 image pixels after two 2x2 poolings). Grey dots: the same two kernels without
offsets (a regular 5x5 grid, 4 pixels apart). The spread is the points' RMS distance from the
green unit.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_scaled_digits as digits  # noqa: E402

DEFAULT_PNG = Path(__file__).resolve().parent / "output" / "offsets.png"
SIZES = (9, 16, 23)  # small (s = 0.56), regular (the training size), large (s = 1.44)
CLASSES = (3, 4, 7)  # the first test digit of each of these classes


def _kernel(layer) -> np.ndarray:
    """The (dy, dx) of each kernel point relative to an output position, as (kh * kw, 2)."""
    (kh, kw), (dh, dw), (ph, pw) = layer.kernel_size, layer.dilation, layer.padding
    return np.array([(a * dh - ph, b * dw - pw) for a in range(kh) for b in range(kw)], dtype=np.float64)


def _bilinear(field: np.ndarray, y: float, x: float) -> np.ndarray:
    """field (C, H, W) at the fractional position (y, x), clamped into the grid."""
    h, w = field.shape[1:]
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = min(int(y), h - 2), min(int(x), w - 2)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * field[:, y0, x0] + (1 - fy) * fx * field[:, y0, x0 + 1]
            + fy * (1 - fx) * field[:, y0 + 1, x0] + fy * fx * field[:, y0 + 1, x0 + 1])


@torch.no_grad()
def sampling_points(model: digits.DigitNet, image: torch.Tensor, position=None):
    """For one output position of conv5 (default: the centre), the 81 sampling points of conv5
    composed with conv4 in image pixel coordinates (y, x), with and without the offsets, the
    unit's own position, and the predicted class. image: (1, 1, H, W)."""
    model.eval()
    x3 = model.features(image)  # conv4's input
    x4 = model.block(3, x3)  # conv5's input
    # Offset channels are (dy, dx) pairs per kernel point (stride 1 here, so no scaling).
    off4 = model.conv4.conv_offset(x3)[0].double().numpy()
    off5 = model.conv5.conv_offset(x4)[0].double().numpy()
    predicted = int(model(image).argmax(1))
    grid = x3.shape[-1]
    position = (grid // 2, grid // 2) if position is None else position
    k4, k5 = _kernel(model.conv4), _kernel(model.conv5)
    deformed, regular = [], []
    for k in range(len(k5)):
        p5 = np.array(position, dtype=np.float64) + k5[k] + off5[2 * k:2 * k + 2, position[0], position[1]]
        r5 = np.array(position, dtype=np.float64) + k5[k]
        o4 = _bilinear(off4, *p5).reshape(-1, 2)
        deformed.append(p5 + k4 + o4)
        regular.append(r5 + k4)
    to_image = image.shape[-1] / grid  # feature pixel u covers image pixels [4u, 4u + 3]
    pixels = lambda points: (np.concatenate(points) + 0.5) * to_image - 0.5  # noqa: E731
    unit = (np.array(position, dtype=np.float64) + 0.5) * to_image - 0.5
    return pixels(deformed), pixels(regular), unit, predicted


def spread(deformed: np.ndarray, unit: np.ndarray) -> float:
    """RMS distance of the sampling points from the unit, in image pixels."""
    return float(np.sqrt(((deformed - unit) ** 2).sum(1).mean()))


def mean_spreads(model, images: np.ndarray, sizes=SIZES) -> dict:
    """{size: mean spread over the given 8x8 digits drawn at that size}, plus "none": the
    spread of the points without offsets."""
    result = {}
    for size in sizes:
        values = []
        for i in range(len(images)):
            deformed, _, unit, _ = sampling_points(model, digits.render(images[i:i + 1], [size]))
            values.append(spread(deformed, unit))
        result[size] = float(np.mean(values))
    _, regular, unit, _ = sampling_points(model, digits.render(images[:1], [sizes[0]]))
    result["none"] = spread(regular, unit)
    return result


def draw(model, png=DEFAULT_PNG, seed: int = 0, sizes=SIZES, classes=CLASSES, n_mean: int = 100) -> Path:
    """Draw the sampling points for the first test digit of each class at each size into png,
    with the mean spread over the first n_mean test digits at each size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, test_x, _, test_y = digits.load_digits_split(seed)
    picks = [int(np.flatnonzero(test_y == c)[0]) for c in classes]
    fig, axes = plt.subplots(len(picks), len(sizes), figsize=(2.2 * len(sizes), 2.35 * len(picks)), squeeze=False)
    for row, index in enumerate(picks):
        for col, size in enumerate(sizes):
            image = digits.render(test_x[index:index + 1], [size])
            deformed, regular, unit, predicted = sampling_points(model, image)
            ax = axes[row, col]
            ax.set_facecolor("0.3")  # outside the image
            ax.imshow(image[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.scatter(regular[:, 1], regular[:, 0], s=6, c="0.6", marker="o", linewidths=0)
            ax.scatter(deformed[:, 1], deformed[:, 0], s=7, c="red", alpha=0.7, linewidths=0)
            ax.scatter([unit[1]], [unit[0]], s=40, c="lime", marker="*", linewidths=0)
            ax.set_xlim(-4.5, image.shape[-1] + 3.5)
            ax.set_ylim(image.shape[-1] + 3.5, -4.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{size} px, predicted {predicted}\nspread {spread(deformed, unit):.1f} px", fontsize=8)
    means = mean_spreads(model, test_x[:n_mean], sizes)
    summary = ", ".join(f"{size} px: {means[size]:.1f}" for size in sizes)
    print(f"mean spread over {min(n_mean, len(test_x))} test digits: {summary}; without offsets: {means['none']:.1f} px")
    fig.suptitle("Sampling points of conv5 then conv4 for the centre unit\n"
                 "red: learned offsets, grey: without offsets", fontsize=9)
    fig.text(0.5, 0.005, f"mean spread over {min(n_mean, len(test_x))} test digits: {summary}; "
             f"without offsets {means['none']:.1f}", ha="center", va="bottom", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=digits.DEFAULT_OUT,
                        help="the file saved by train_scaled_digits.py (trained first if missing)")
    parser.add_argument("--which", default="offsets_only", choices=["offsets_only", "deformable"],
                        help="which of the saved deformable models to draw")
    parser.add_argument("--out", type=Path, default=DEFAULT_PNG, help="the PNG to write")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"{args.model} not found: training it first")
        digits.train(out=args.model)
    model = digits.load_model(args.model, args.which)
    seed = torch.load(args.model, map_location="cpu")["config"]["seed"]
    png = draw(model, args.out, seed=seed)
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    main()
