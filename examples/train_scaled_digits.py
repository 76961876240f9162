"""Deformable convolution against scale: the seeds' "scaled MNIST" experiment, on scikit-learn's
bundled digits (MNIST cannot be downloaded everywhere; ``load_digits`` ships inside scikit-learn).

    pip install ".[examples]" && python examples/train_scaled_digits.py

Data: the 1797 8x8 digits of ``sklearn.datasets.load_digits``, split 2/3 train, 1/3 test
(stratified, fixed seed). Each digit is drawn as a 16x16 square (bilinear, antialiased) at the
centre of a 28x28 canvas: that is the *regular* scale, the only one the networks are trained on.
The *scaled* test set is the same test digits, each drawn at a random size of 16 * s pixels,
s uniform in [0.5, 1.5] (8 to 24 pixels), re-centred on the canvas (fixed seed).

Models (the same small CNN, 5 convolutions and global average pooling):

- ``plain``: five ``nn.Conv2d``.
- ``deformable``: the same, with the last two convolutions (7x7 maps) replaced by
  ``cudeform.torch.DeformConv2dPack`` (DCN v1: offsets predicted from the layer's input by a
  zero-initialised convolution), trained from scratch on the regular scale like ``plain``.
- ``offsets only``: the protocol behind the seeds' numbers (the Keras ``deform-conv``
  experiment, also ported to PyTorch as ``oeway/pytorch-deform-conv``'s ``scaled_mnist.py``):
  the trained plain CNN's weights copied into the deformable CNN and frozen, and only the
  offset convolutions trained, on randomly scaled *training* digits. It has seen scaled digits
  in training, so it is not a like-for-like comparison with ``plain``: it shows what the offsets
  alone can adapt.

Nothing is tuned on the test set: the test digits are used only by the final evaluation.
Prints progress, then the accuracy table beside the seeds' numbers, and saves the deformable
models' state_dicts to ``--out`` (read by ``visualize_offsets.py``).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cudeform.torch as ct

CANVAS = 28  # image side, as MNIST
BASE = 16  # digit side at the training ("regular") scale
SCALE_RANGE = (0.5, 1.5)  # random size factors of the scaled test set (and of the offset training)
# The seeds' table ("scaled MNIST"): (regular, scaled) test accuracy in percent.
PAPER = {"plain": (98.74, 57.01), "deformable": (97.27, 92.55)}
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "deform_digits.pt"
NAMES = {
    "plain": "Regular CNN",
    "deformable": "Deformable CNN",
    "offsets_only": "Deformable CNN, offsets only *",
}


def load_digits_split(seed: int = 0):
    """The 8x8 digits in [0, 1]: (train_images, test_images, train_labels, test_labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    return train_test_split(images, data.target, test_size=1 / 3, stratify=data.target, random_state=seed)


def render(digits: np.ndarray, sizes) -> torch.Tensor:
    """Draw each 8x8 digit as a size x size square at the centre of a CANVAS x CANVAS image."""
    out = torch.zeros(len(digits), 1, CANVAS, CANVAS)
    source = torch.from_numpy(np.ascontiguousarray(digits, dtype=np.float32))[:, None]
    for size in np.unique(sizes):
        chosen = np.flatnonzero(np.asarray(sizes) == size)
        drawn = F.interpolate(source[chosen], size=(int(size), int(size)), mode="bilinear", antialias=True,
                              align_corners=False)
        top = (CANVAS - int(size)) // 2
        out[chosen, :, top:top + int(size), top:top + int(size)] = drawn.clamp(0, 1)
    return out


def random_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Digit sides BASE * s, s uniform in SCALE_RANGE, rounded to whole pixels."""
    return np.rint(BASE * rng.uniform(*SCALE_RANGE, n)).astype(int)


class DigitNet(nn.Module):
    """conv 28x28 -> pool -> conv 14x14 -> pool -> three convs 7x7 -> global average -> linear,
    each convolution followed by batch normalisation and a ReLU. With ``deformable=True`` the
    last two convolutions are ``DeformConv2dPack`` (with a bias, so that a plain DigitNet's
    state_dict loads into it unchanged; their ``conv_offset`` then stays zero)."""

    def __init__(self, deformable: bool = False, width: int = 32):
        super().__init__()
        self.deformable = deformable
        conv = (lambda c_in, c_out: ct.DeformConv2dPack(c_in, c_out, 3, padding=1, bias=True)) if deformable \
            else (lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.conv4 = conv(width, width)
        self.conv5 = conv(width, width)
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(5))
        self.fc = nn.Linear(width, 10)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """conv{i+1}, its batch norm and ReLU."""
        return F.relu(self.norms[i](getattr(self, f"conv{i + 1}")(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of conv4: (N, width, CANVAS / 4, CANVAS / 4)."""
        x = F.max_pool2d(self.block(0, x), 2)
        x = F.max_pool2d(self.block(1, x), 2)
        return self.block(2, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(4, self.block(3, self.features(x)))
        return self.fc(x.mean(dim=(2, 3)))


def fit(model, images, labels, *, epochs, lr, seed, device, name, log, sizes=None, params=None, batch_size=64):
    """Adam on cross-entropy. ``sizes(rng)``, when given, draws a new digit size per image every
    epoch (images are then the 8x8 digits); otherwise images are already rendered. With
    ``params`` only those train, and batch norm keeps its running statistics (eval mode)."""
    optimizer = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = torch.as_tensor(labels)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        x = render(images, sizes(rng)) if sizes is not None else images
        model.train(params is None)  # eval mode keeps batch norm's statistics fixed
        total, correct, loss_sum = 0, 0, 0.0
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            xb, yb = x[batch].to(device), labels[batch].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(yb)
        log(f"[{name}] epoch {epoch:2d}/{epochs}  loss {loss_sum / total:.4f}  "
            f"train accuracy {100 * correct / total:5.1f}%  ({time.perf_counter() - start:.1f} s)")
    return model


@torch.no_grad()
def accuracy(model, images, labels, device) -> float:
    model.eval()
    labels = torch.as_tensor(labels)
    correct = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum())
                  for x, y in zip(images.split(256), labels.split(256)))
    return 100.0 * correct / len(labels)


def format_table(results: dict) -> str:
    """The accuracy table, ours beside the seeds' (a markdown table). The seeds' deformable
    numbers sit on the row trained as they were (offsets only, on scaled training digits)."""
    paper_row = {"plain": PAPER["plain"], "offsets_only": PAPER["deformable"]}
    lines = ["| test accuracy | regular digits | scaled digits | seeds: regular MNIST | seeds: scaled MNIST |",
             "|---|---|---|---|---|"]
    for key, (regular, scaled) in results.items():
        paper = [f"{v:.2f}%" for v in paper_row[key]] if key in paper_row else ["-", "-"]
        lines.append(f"| {NAMES[key]} | {regular:.2f}% | {scaled:.2f}% | " + " | ".join(paper) + " |")
    if "offsets_only" in results:
        lines += ["", "* the regular CNN's weights, frozen; only the offset convolutions trained, on randomly "
                      "scaled training digits (the protocol of the seeds' deformable numbers)."]
    return "\n".join(lines)


def default_device() -> str:
    """CUDA where torch sees a GPU and CuPy (cudeform's GPU path) is installed, else the CPU."""
    import importlib.util

    return "cuda" if torch.cuda.is_available() and importlib.util.find_spec("cupy") else "cpu"


def train(epochs: int = 30, finetune_epochs: int = 15, limit=None, out=DEFAULT_OUT, seed: int = 0, device=None,
          log=print) -> dict:
    """Run the experiment; returns {model: (regular accuracy, scaled accuracy)} and saves the two
    deformable models' state_dicts (and the configuration) to ``out``."""
    if device is None:
        device = default_device()
    start = time.perf_counter()
    train_x, test_x, train_y, test_y = load_digits_split(seed)
    if limit:
        train_x, train_y, test_x, test_y = train_x[:limit], train_y[:limit], test_x[:limit], test_y[:limit]
    regular_train = render(train_x, np.full(len(train_x), BASE))
    regular_test = render(test_x, np.full(len(test_x), BASE))
    scaled_test = render(test_x, random_sizes(len(test_x), np.random.default_rng(seed + 1000)))
    log(f"{len(train_y)} training digits, {len(test_y)} test digits, {CANVAS}x{CANVAS} canvas, on {device}")

    results, models = {}, {}
    for key, deformable in (("plain", False), ("deformable", True)):
        torch.manual_seed(seed)
        model = DigitNet(deformable).to(device)
        fit(model, regular_train, train_y, epochs=epochs, lr=1e-3, seed=seed, device=device, name=key, log=log)
        models[key] = model

    # The seeds' protocol: the plain CNN's weights, frozen; only the offset branches learn,
    # on training digits drawn at random sizes (a new draw every epoch).
    model = DigitNet(deformable=True).to(device)
    missing, unexpected = model.load_state_dict(models["plain"].state_dict(), strict=False)
    assert not unexpected and all("conv_offset" in name for name in missing)  # conv_offset stays zero
    offsets = [p for name, p in model.named_parameters() if "conv_offset" in name]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in offsets:
        p.requires_grad_(True)
    fit(model, train_x, train_y, epochs=finetune_epochs, lr=1e-3, seed=seed + 1, device=device, name="offsets only",
        log=log, sizes=lambda rng: random_sizes(len(train_x), rng), params=offsets)
    models["offsets_only"] = model

    for key, model in models.items():
        results[key] = (accuracy(model, regular_test, test_y, device), accuracy(model, scaled_test, test_y, device))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dicts": {k: {n: t.cpu() for n, t in models[k].state_dict().items()}
                                for k in ("deformable", "offsets_only")},
                "config": {"canvas": CANVAS, "base": BASE, "scale_range": SCALE_RANGE, "seed": seed,
                           "epochs": epochs, "finetune_epochs": finetune_epochs, "limit": limit},
                "results": results}, out)
    log(f"\nTest accuracy ({len(test_y)} digits; scaled: sizes {BASE}*s px, s uniform in "
        f"[{SCALE_RANGE[0]}, {SCALE_RANGE[1]}]), beside the seeds' MNIST numbers:\n")
    log(format_table(results))
    log(f"\nsaved the deformable models to {out}  (total {time.perf_counter() - start:.0f} s)")
    return results


def load_model(path=DEFAULT_OUT, which: str = "offsets_only", device="cpu") -> DigitNet:
    """A deformable DigitNet with the weights saved by :func:`train`."""
    checkpoint = torch.load(path, map_location=device)
    model = DigitNet(deformable=True).to(device)
    model.load_state_dict(checkpoint["state_dicts"][which])
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the two CNNs on regular digits")
    parser.add_argument("--finetune-epochs", type=int, default=15, help="epochs of the offsets-only training")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many training and test digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if torch sees a GPU and CuPy is installed, else cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to save the deformable models")
    args = parser.parse_args(argv)
    return train(args.epochs, args.finetune_epochs, args.limit, args.out, args.seed, args.device)


if __name__ == "__main__":
    main()
