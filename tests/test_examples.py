"""The examples run: the quickstart, and the scaled-digits training and offset drawing in a fast mode."""

import importlib
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="needs a source checkout")


@pytest.fixture
def examples(monkeypatch):
    """Import an example module by name (examples/ is not a package)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


def test_quickstart_main(examples, capsys):
    examples("quickstart").main()
    out = capsys.readouterr().out
    assert "[cpu] output (2, 16, 12, 12)" in out
    assert "[cpu] gradcheck passed" in out


def test_scaled_digits_train_and_visualize(examples, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    train = examples("train_scaled_digits")
    visualize = examples("visualize_offsets")

    model_path = tmp_path / "deform_digits.pt"
    results = train.main(["--epochs", "1", "--finetune-epochs", "1", "--limit", "200", "--device", "cpu",
                          "--out", str(model_path)])
    out = capsys.readouterr().out
    assert "[plain] epoch  1/1" in out and "[offsets only] epoch  1/1" in out  # progress
    for row in ("| Regular CNN |", "| Deformable CNN |", "| Deformable CNN, offsets only * |"):
        assert row in out
    assert "98.74%" in out and "92.55%" in out  # the seeds' numbers beside ours
    assert set(results) == {"plain", "deformable", "offsets_only"}
    assert all(0 <= a <= 100 for pair in results.values() for a in pair)
    assert model_path.is_file()
    for which in ("deformable", "offsets_only"):
        train.load_model(model_path, which)

    png = tmp_path / "offsets.png"
    assert visualize.main(["--model", str(model_path), "--out", str(png)]) == png
    assert png.stat().st_size > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300 and pixels[..., :3].std() > 0.1
    assert (np.abs(pixels[..., 0] - pixels[..., 1]) > 0.5).any()  # red sampling points were drawn


def test_sampling_points_without_offsets_form_the_regular_grid(examples):
    torch = pytest.importorskip("torch")
    train = examples("train_scaled_digits")
    visualize = examples("visualize_offsets")

    torch.manual_seed(0)
    model = train.DigitNet(deformable=True)  # conv_offset starts at zero: no deformation
    image = torch.rand(1, 1, train.CANVAS, train.CANVAS)
    deformed, regular, unit, _ = visualize.sampling_points(model, image)
    assert deformed.shape == regular.shape == (81, 2)
    np.testing.assert_allclose(deformed, regular)
    np.testing.assert_allclose(unit, [13.5, 13.5])  # feature pixel 3 of 7 covers image pixels 12..15
    # Two 3x3 kernels composed: a 5x5 grid, 4 image pixels apart, around the unit.
    assert sorted(set(regular[:, 0])) == [5.5, 9.5, 13.5, 17.5, 21.5]

    with torch.no_grad():  # a constant offset of conv5 shifts every point by 4 * that offset
        model.conv5.conv_offset.bias[0::2] = 0.5  # dy of each kernel point
    deformed, regular, _, _ = visualize.sampling_points(model, image)
    np.testing.assert_allclose(deformed - regular, np.tile([2.0, 0.0], (81, 1)))
