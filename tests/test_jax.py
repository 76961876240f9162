"""cudeform.jax: every op under jax.jit equals the core, and jax.grad under jit equals the core's
backward and central finite differences (float64, CPU)."""

import importlib
import re
from pathlib import Path

import numpy as np
import pytest

import cudeform

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
cj = pytest.importorskip("cudeform.jax")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def x64():
    """float64 for the finite differences; the previous setting is restored afterwards."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _offsets(rng, shape, spread=2):
    """Offsets an integer plus a fraction in [0.1, 0.9]: sampling positions stay away from the
    integer kinks of bilinear interpolation (and from the borders at -1 and H)."""
    return rng.integers(-spread, spread + 1, shape) + rng.uniform(0.1, 0.9, shape) * rng.choice([-1, 1], shape)


def _rois(rng, r, n, size):
    x1 = rng.uniform(0, size / 2, r)
    y1 = rng.uniform(0, size / 2, r)
    return np.stack([rng.integers(0, n, r).astype(float), x1, y1, x1 + rng.uniform(2, size / 2, r),
                     y1 + rng.uniform(2, size / 2, r)], axis=1)


# Each case: (jax function, core forward, core backward, arrays by name, non-array parameters).

def _conv_v2(rng):
    arrays = dict(input=rng.standard_normal((2, 4, 5, 5)), offset=_offsets(rng, (2, 36, 5, 3)),
                  weight=rng.standard_normal((4, 2, 3, 3)), bias=rng.standard_normal(4),
                  mask=rng.uniform(0.2, 1.0, (2, 18, 5, 3)))
    return arrays, dict(stride=(1, 2), padding=1)


def _conv_v1(rng):
    arrays = dict(input=rng.standard_normal((1, 3, 6, 6)), offset=_offsets(rng, (1, 18, 6, 6)),
                  weight=rng.standard_normal((2, 3, 3, 3)), bias=None)
    return arrays, dict(padding=2, dilation=2, border_grad="mmcv")


def _roi_modulated(rng):
    arrays = dict(input=rng.standard_normal((2, 3, 7, 8)), rois=_rois(rng, 3, 2, 14),
                  offset=rng.uniform(-1, 1, (3, 2, 2, 3)), mask=rng.uniform(0.2, 1.0, (3, 1, 2, 3)))
    return arrays, dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, gamma=0.1)


def _roi_plain(rng):
    arrays = dict(input=rng.standard_normal((2, 3, 7, 8)), rois=_rois(rng, 3, 2, 8))
    return arrays, dict(output_size=2)


def _psroi(rng):
    arrays = dict(input=rng.standard_normal((2, 8, 7, 7)), rois=_rois(rng, 3, 2, 14),
                  offset=rng.uniform(-1, 1, (3, 2, 3, 3)))
    return arrays, dict(output_dim=2, pooled_size=3, group_size=2, sample_per_part=2, spatial_scale=0.5,
                        trans_std=0.1)


def _psroi_plain(rng):
    arrays = dict(input=rng.standard_normal((1, 2, 6, 6)), rois=_rois(rng, 2, 1, 6))
    return arrays, dict(output_dim=2, pooled_size=2)


def _kconv_global(rng):
    arrays = dict(input=rng.standard_normal((2, 4, 6, 6)), weight=rng.standard_normal((4, 2, 5, 5)),
                  kernel_offset=_offsets(rng, (2, 36), spread=1), bias=rng.standard_normal(4))
    return arrays, dict(kernel_size=3, padding=1, groups=2)


def _kconv_local(rng):
    arrays = dict(input=rng.standard_normal((1, 2, 5, 5)), weight=rng.standard_normal((3, 2, 5, 5)),
                  kernel_offset=_offsets(rng, (1, 18, 3, 3), spread=1))
    return arrays, dict(kernel_size=3, stride=2, padding=1)


CASES = {
    "deform_conv2d_v2": ("deform_conv2d", _conv_v2),
    "deform_conv2d_v1": ("deform_conv2d", _conv_v1),
    "deform_roi_pool_modulated": ("deform_roi_pool", _roi_modulated),
    "deform_roi_pool_plain": ("deform_roi_pool", _roi_plain),
    "deform_psroi_pool": ("deform_psroi_pool", _psroi),
    "deform_psroi_pool_plain": ("deform_psroi_pool", _psroi_plain),
    "deform_kernel_conv2d_global": ("deform_kernel_conv2d", _kconv_global),
    "deform_kernel_conv2d_local": ("deform_kernel_conv2d", _kconv_local),
}


@pytest.fixture(params=list(CASES))
def case(request):
    op, make = CASES[request.param]
    rng = np.random.default_rng(sum(map(ord, request.param)))
    arrays, params = make(rng)
    core_params = {k: v for k, v in params.items() if k != "border_grad"}
    core_out = getattr(cudeform, op)(**arrays, **core_params)
    weights = rng.standard_normal(core_out.shape)
    return op, arrays, params, core_out, weights, rng


def test_jit_forward_equals_core(case):
    op, arrays, params, core_out, _, _ = case
    out = jax.jit(lambda a: getattr(cj, op)(**a, **params))(arrays)
    assert out.dtype == jnp.float64 and out.shape == core_out.shape
    np.testing.assert_array_equal(np.asarray(out), core_out)


def test_grad_equals_core_backward_and_finite_differences(case):
    op, arrays, params, _, weights, rng = case
    fn = getattr(cj, op)

    loss = jax.jit(lambda a: jnp.sum(weights * fn(**a, **params)))
    grads = jax.jit(jax.grad(lambda a: jnp.sum(weights * fn(**a, **params))))(arrays)

    # The core's backward, exactly; None for an argument not given, zeros for the RoIs.
    expected = getattr(cudeform, op + "_backward")(weights, **arrays, **params)._asdict()
    assert set(grads) == set(arrays)
    for name, a in arrays.items():
        if a is None:
            assert grads[name] is None, name
        elif name == "rois":
            np.testing.assert_array_equal(np.asarray(grads[name]), np.zeros_like(a))
        else:
            np.testing.assert_array_equal(np.asarray(grads[name]), expected[name], err_msg=name)

    # Central differences along random directions, one argument at a time.
    h = 1e-6
    for name, a in arrays.items():
        if a is None or name == "rois":
            continue
        for _ in range(2):
            v = rng.standard_normal(a.shape)
            plus = dict(arrays, **{name: a + h * v})
            minus = dict(arrays, **{name: a - h * v})
            fd = (float(loss(plus)) - float(loss(minus))) / (2 * h)
            analytic = float(np.sum(np.asarray(grads[name]) * v))
            assert abs(fd - analytic) <= 1e-6 * (1 + abs(analytic)), (name, fd, analytic)


def test_float32_forward_and_grad():
    rng = np.random.default_rng(1)
    arrays, params = _conv_v2(rng)
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    out = jax.jit(lambda a: cj.deform_conv2d(**a, **params))(arrays)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), cudeform.deform_conv2d(**arrays, **params))
    grads = jax.grad(lambda a: cj.deform_conv2d(**a, **params).sum())(arrays)
    expected = cudeform.deform_conv2d_backward(np.ones(out.shape, np.float32), **arrays, **params)
    for name in arrays:
        assert grads[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(grads[name]), getattr(expected, name))


def test_vmap_maps_sequentially():
    rng = np.random.default_rng(2)
    arrays, params = _conv_v1(rng)
    xs = np.stack([arrays["input"], 2 * arrays["input"], -arrays["input"]])
    f = lambda x: cj.deform_conv2d(x, arrays["offset"], arrays["weight"], padding=2, dilation=2)
    out = jax.jit(jax.vmap(f))(xs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(out[i]), cudeform.deform_conv2d(
            xs[i], arrays["offset"], arrays["weight"], padding=2, dilation=2))
    g = jax.grad(lambda xs: jax.vmap(f)(xs).sum())(xs)
    np.testing.assert_array_equal(np.asarray(g[1]), np.asarray(g[0]))  # linear in the input


def test_bad_shapes_raise_at_trace_time():
    rng = np.random.default_rng(3)
    arrays, params = _conv_v1(rng)
    arrays["offset"] = arrays["offset"][:, :, :5]
    with pytest.raises(ValueError, match="deform_conv2d: offset: expected shape"):
        jax.jit(lambda a: cj.deform_conv2d(**a, **params))(arrays)
    with pytest.raises(TypeError, match="deform_conv2d: weight: expected the dtype of input"):
        cj.deform_conv2d(arrays["input"], arrays["offset"], arrays["weight"].astype(np.float32))


def test_example_trains(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    losses = importlib.import_module("jax_example").main(steps=4)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "step" in capsys.readouterr().out


def test_readme_snippet():
    """The README's JAX example runs as written."""
    section = (REPO / "README.md").read_text().split("\n## JAX\n", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(snippet, "README.md (JAX)", "exec"), {})
