"""cudeform.jax: every op under jax.jit equals the core, and jax.grad under jit equals the core's
backward and central finite differences (float64), on the CPU (host callbacks) and, where JAX
has a CUDA device and CuPy works, on the GPU (the CUDA kernels on XLA's stream). On the GPU
also: every dtype against float64, no host callback in the compiled program, and callbacks that
queue their work on XLA's stream without waiting for it. conftest.py turns JAX's preallocation
of GPU memory off."""

import importlib
import re
from pathlib import Path

import numpy as np
import pytest

import cudeform
from helpers import TOLERANCE, l2_rel, rel_err, to_numpy

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
cj = pytest.importorskip("cudeform.jax")

REPO = Path(__file__).resolve().parent.parent


def _jax_device(platform):
    try:
        return jax.devices(platform)[0]
    except RuntimeError:  # JAX's answer for a backend it does not have
        pytest.skip(f"JAX has no {platform} device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The JAX device the ops run on: the CPU (host callbacks) or a CUDA device (the CUDA
    kernels; the gpu mark skips it where CuPy cannot run them)."""
    return _jax_device(request.param)


@pytest.fixture
def gpu():
    return _jax_device("cuda")


def _core_arrays(device, arrays):
    """NumPy ``arrays`` as the core takes them where ``device`` is: NumPy, or CuPy on the GPU."""
    if device.platform == "cpu":
        return arrays
    import cupy

    return {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}


def _assert_same(got, want, device, what=""):
    """Bitwise on the CPU; on the GPU within 1e-12 (float64 sums that atomics accumulate in
    another order)."""
    got, want = np.asarray(got), to_numpy(want)
    assert got.shape == want.shape, what
    if device.platform == "cpu":
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        assert rel_err(got, want) < 1e-12, (what, rel_err(got, want))


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


def _core_params(params):
    return {k: v for k, v in params.items() if k != "border_grad"}


@pytest.fixture(params=list(CASES))
def case(request):
    op, make = CASES[request.param]
    rng = np.random.default_rng(sum(map(ord, request.param)))
    arrays, params = make(rng)
    core_out = getattr(cudeform, op)(**arrays, **_core_params(params))
    weights = rng.standard_normal(core_out.shape)
    return op, arrays, params, core_out, weights, rng


def test_jit_forward_equals_core(case, device):
    op, arrays, params, core_out, _, _ = case
    out = jax.jit(lambda a: getattr(cj, op)(**a, **params))(jax.device_put(arrays, device))
    assert out.dtype == jnp.float64 and out.shape == core_out.shape
    assert out.devices() == {device}
    _assert_same(out, getattr(cudeform, op)(**_core_arrays(device, arrays), **_core_params(params)), device)


def test_grad_equals_core_backward_and_finite_differences(case, device):
    op, arrays, params, _, weights, rng = case
    fn = getattr(cj, op)

    loss = jax.jit(lambda a: jnp.sum(weights * fn(**a, **params)))
    grads = jax.jit(jax.grad(lambda a: jnp.sum(weights * fn(**a, **params))))(jax.device_put(arrays, device))

    # The core's backward where the op ran; None for an argument not given, zeros for the RoIs.
    backward = getattr(cudeform, op + "_backward")
    expected = backward(**_core_arrays(device, dict(arrays, grad_output=weights)), **params)._asdict()
    assert set(grads) == set(arrays)
    for name, a in arrays.items():
        if a is None:
            assert grads[name] is None, name
        elif name == "rois":
            np.testing.assert_array_equal(np.asarray(grads[name]), np.zeros_like(a))
        else:
            assert grads[name].devices() == {device}, name
            _assert_same(grads[name], expected[name], device, name)

    # Central differences along random directions, one argument at a time.
    h = 1e-6
    for name, a in arrays.items():
        if a is None or name == "rois":
            continue
        for _ in range(2):
            v = rng.standard_normal(a.shape)
            plus = jax.device_put(dict(arrays, **{name: a + h * v}), device)
            minus = jax.device_put(dict(arrays, **{name: a - h * v}), device)
            fd = (float(loss(plus)) - float(loss(minus))) / (2 * h)
            analytic = float(np.sum(np.asarray(grads[name]) * v))
            assert abs(fd - analytic) <= 1e-6 * (1 + abs(analytic)), (name, fd, analytic)


def test_eager_calls_compile_once(device, caplog):
    """Op by op (no jit around the op or the gradient), a second call with the same shapes and
    parameters runs what the first compiled: nothing is traced or compiled again."""
    rng = np.random.default_rng(2)
    arrays, params = _conv_v2(rng)
    arrays = jax.device_put(arrays, device)
    grad = jax.grad(lambda a: cj.deform_conv2d(**a, **params).sum())
    jax.block_until_ready(grad(arrays))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        jax.block_until_ready(grad(dict(arrays, input=arrays["input"] + 1)))
    compiled = [r.getMessage() for r in caplog.records if "deform" in r.getMessage() or "lambda" in r.getMessage()]
    assert not compiled, compiled


def test_float32_forward_and_grad():
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(1)
    arrays, params = _conv_v2(rng)
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    out = jax.jit(lambda a: cj.deform_conv2d(**a, **params))(jax.device_put(arrays, cpu))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), cudeform.deform_conv2d(**arrays, **params))
    grads = jax.grad(lambda a: cj.deform_conv2d(**a, **params).sum())(jax.device_put(arrays, cpu))
    expected = cudeform.deform_conv2d_backward(np.ones(out.shape, np.float32), **arrays, **params)
    for name in arrays:
        assert grads[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(grads[name]), getattr(expected, name))


def test_vmap_maps_sequentially(device):
    rng = np.random.default_rng(2)
    arrays, params = _conv_v1(rng)
    xs = np.stack([arrays["input"], 2 * arrays["input"], -arrays["input"]])
    f = lambda x: cj.deform_conv2d(x, arrays["offset"], arrays["weight"], padding=2, dilation=2)
    out = jax.jit(jax.vmap(f))(jax.device_put(xs, device))
    assert out.devices() == {device}
    for i in range(3):
        core = _core_arrays(device, dict(input=xs[i], offset=arrays["offset"], weight=arrays["weight"]))
        _assert_same(out[i], cudeform.deform_conv2d(**core, padding=2, dilation=2), device, i)
    g = jax.grad(lambda xs: jax.vmap(f)(xs).sum())(jax.device_put(xs, device))
    _assert_same(g[1], np.asarray(g[0]), device)  # linear in the input


def test_bad_shapes_raise_at_trace_time():
    rng = np.random.default_rng(3)
    arrays, params = _conv_v1(rng)
    arrays["offset"] = arrays["offset"][:, :, :5]
    with pytest.raises(ValueError, match="deform_conv2d: offset: expected shape"):
        jax.jit(lambda a: cj.deform_conv2d(**a, **params))(arrays)
    with pytest.raises(TypeError, match="deform_conv2d: weight: expected the dtype of input"):
        cj.deform_conv2d(arrays["input"], arrays["offset"], arrays["weight"].astype(np.float32))


def _as(dtype, arrays):
    return {k: None if a is None else jnp.asarray(a, dtype) for k, a in arrays.items()}


def test_half_dtypes_need_the_gpu_path():
    if cj._on_gpu():
        pytest.skip("JAX has a CUDA backend and CuPy works: float16 and bfloat16 run there")
    arrays, params = _conv_v1(np.random.default_rng(5))
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(TypeError, match=r"deform_conv2d: input: expected one of float32, float64 "
                                            rf"\(float16 and bfloat16 need a CUDA backend and CuPy\), got {dtype}"):
            jax.jit(lambda a: cj.deform_conv2d(**a, **params))(_as(dtype, arrays))


@pytest.mark.gpu
def test_gpu_half_dtypes_lowered_for_the_cpu_fail_when_run(gpu):
    """With a CUDA backend the half types pass the trace-time check; placed on the CPU, the
    host path's core refuses them when the computation runs."""
    arrays, params = _conv_v1(np.random.default_rng(5))
    half = jax.device_put(_as("float16", arrays), jax.devices("cpu")[0])
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match="deform_conv2d: input: expected one of float32, float64 on the CPU, got float16"):
        jax.block_until_ready(jax.jit(lambda a: cj.deform_conv2d(**a, **params))(half))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_gpu_every_dtype_against_float64(case, dtype, gpu):
    """Forward and gradients under jit on the GPU in each dtype, against the CPU path in float64
    on the same (rounded) inputs and output gradient."""
    op, arrays, params, _, weights, _ = case
    fn = getattr(cj, op)
    low = jax.device_put(_as(dtype, arrays), gpu)
    w_low = jax.device_put(jnp.asarray(weights, dtype), gpu)
    exact = {k: None if a is None else np.asarray(a, np.float64) for k, a in low.items()}

    def forward_and_grads(a, w):
        out, vjp = jax.vjp(lambda a: fn(**a, **params), a)
        return out, vjp(w)[0]

    out, grads = jax.jit(forward_and_grads)(low, w_low)
    want = getattr(cudeform, op)(**exact, **_core_params(params))
    want_grads = getattr(cudeform, op + "_backward")(np.asarray(w_low, np.float64), **exact, **params)._asdict()
    assert out.dtype == jnp.dtype(dtype) and out.devices() == {gpu}
    assert l2_rel(np.asarray(out, np.float64), want) < TOLERANCE[dtype]
    for name, a in exact.items():
        if a is None or name == "rois":
            continue
        # Offset gradients are differences of samples: a larger relative error in the half
        # types, as in the op tests.
        tol = TOLERANCE[dtype] * (4 if "offset" in name and dtype in ("float16", "bfloat16") else 1)
        assert grads[name].dtype == jnp.dtype(dtype) and grads[name].devices() == {gpu}, name
        assert l2_rel(np.asarray(grads[name], np.float64), want_grads[name]) < tol, name


@pytest.mark.gpu
def test_gpu_program_calls_no_host_callback(case, gpu):
    """The compiled forward and backward reach the core through buffer callbacks only: no host
    callback (pure_callback's), and no conditional left from the choice of platform (XLA would
    read its index on the host)."""
    op, arrays, params, _, weights, _ = case
    fn = getattr(cj, op)
    value_and_grad = jax.jit(jax.value_and_grad(lambda a: jnp.sum(weights * fn(**a, **params))))
    text = value_and_grad.lower(jax.device_put(arrays, gpu)).compile().as_text()
    callbacks = {t for t in re.findall(r'custom_call_target="([^"]+)"', text) if "callback" in t}
    assert callbacks == {"xla_buffer_python_gpu_callback"}, callbacks
    assert not re.search(r"\bconditional\(", text)


@pytest.mark.gpu
def test_gpu_callbacks_queue_on_xla_stream_without_waiting(gpu):
    """Under jit, a test callback keeps XLA's stream busy (a spinning kernel) and only then
    writes the op's input; a probe callback after the op's forward and backward notes whether
    the spin still runs. Three calls in a row, on other inputs, fetched at the end: the op's
    callbacks returned without waiting for the spin (a callback that synchronised the stream or
    the device would have waited), and the results are right without any synchronisation,
    which they would not be if the op's kernels ran on a stream that does not wait for XLA's:
    they would read the input buffer before the spin let it be written."""
    import cupy
    from jax.experimental.buffer_callback import buffer_callback

    from gpu_cases import spin

    rng = np.random.default_rng(4)
    arrays, params = _conv_v2(rng)
    weights = rng.standard_normal(cudeform.deform_conv2d(**arrays, **params).shape)
    busy, still_running = [], []

    def copy_on_xla_stream(ctx, outs, xs, before=lambda: None):
        with cupy.cuda.Device(xs[0].__dlpack_device__()[1]), cupy.cuda.ExternalStream(ctx.stream):
            before()
            for out, x in zip(outs, xs):
                cupy.asarray(out)[...] = cupy.asarray(x)

    def spin_then_copy(ctx, outs, *xs):
        copy_on_xla_stream(ctx, outs, xs, before=lambda: busy.append(spin()))

    def probe(ctx, outs, *xs):
        still_running.append(not busy[-1].done)
        copy_on_xla_stream(ctx, outs, xs)

    def through(callback, *xs):
        return buffer_callback(callback, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs))(*xs)

    @jax.jit
    def step(a):
        (x,) = through(spin_then_copy, a["input"])
        out, vjp = jax.vjp(lambda a: cj.deform_conv2d(**a, **params), dict(a, input=x))
        grads = vjp(jnp.asarray(weights))[0]
        return through(probe, out, *(grads[name] for name in arrays))

    scales = (2.0, -1.0, 0.5)  # the warm-up's input (scale 1) may linger in a reused buffer
    jax.block_until_ready(step(jax.device_put(arrays, gpu)))  # compiles XLA's program and the kernels
    busy.clear()
    still_running.clear()
    results = [step(jax.device_put(dict(arrays, input=s * arrays["input"]), gpu)) for s in scales]
    assert still_running == [True] * len(scales), "a callback waited for the device"
    for s, got in zip(scales, results):
        scaled = dict(arrays, input=s * arrays["input"])
        want = [cudeform.deform_conv2d(**scaled, **params),
                *cudeform.deform_conv2d_backward(weights, **scaled, **params)]
        for name, g, w in zip(("output", *arrays), got, want):
            assert rel_err(np.asarray(g), w) < 1e-10, (s, name)


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
