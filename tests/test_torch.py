"""cudeform.torch: the custom ops under autograd (gradcheck), opcheck, torch.compile and
autocast, and the layers (torchvision state_dict compatibility, initialisation)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import cudeform  # noqa: E402
import cudeform.torch as ct  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# CUDA tests: the gpu marker skips them without CuPy and a device; torch must see one too.
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch has no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _rois(n: int) -> np.ndarray:
    """Three RoIs in image coordinates: inside, across the low border, across the high one."""
    return np.array([[0, 1.3, 0.7, 6.1, 5.2],
                     [n - 1, -2.1, 1.9, 4.4, 7.3],
                     [0, 3.7, -1.4, 13.5, 9.9]])


def _case(name: str, variant: str) -> tuple[dict, dict]:
    """Float64 NumPy arguments of op ``name`` (tensors) and its non-tensor arguments, all of the
    op's schema, in canonical form. ``variant``: "full" gives every optional tensor, "bare" none
    (for deform_kernel_conv2d: "full" is local DK with a bias, "bare" global DK without).
    Offsets are random, so no sampling point sits on an integer (a kink of the bilinear sampler)."""
    rng = np.random.default_rng(0)
    full = variant == "full"
    if name == "deform_conv2d":  # 2 weight groups, 2 offset groups, a 2x3 kernel, asymmetric geometry
        tensors = dict(input=rng.standard_normal((1, 4, 4, 6)), offset=rng.uniform(-2, 2, (1, 24, 3, 2)),
                       weight=rng.standard_normal((2, 2, 2, 3)),
                       bias=rng.standard_normal(2) if full else None,
                       mask=rng.uniform(0, 1, (1, 12, 3, 2)) if full else None)
        params = dict(stride=[2, 1], padding=[1, 0], dilation=[1, 2], border_grad="torchvision")
    elif name == "deform_roi_pool":
        tensors = dict(input=rng.standard_normal((2, 2, 5, 6)), rois=_rois(2),
                       offset=rng.uniform(-1, 1, (3, 2, 2, 3)) if full else None,
                       mask=rng.uniform(0, 1, (3, 1, 2, 3)) if full else None)
        params = dict(output_size=[2, 3], spatial_scale=0.5, sampling_ratio=2, gamma=0.3)
    elif name == "deform_psroi_pool":  # position-sensitive: output_dim 2 on a 2x2 group grid
        tensors = dict(input=rng.standard_normal((2, 8, 4, 5)), rois=_rois(2),
                       offset=rng.uniform(-1, 1, (3, 2, 2, 2)) if full else None)
        params = dict(output_dim=2, pooled_size=3, group_size=2, part_size=2, sample_per_part=2,
                      spatial_scale=0.5, trans_std=0.2)
    elif name == "deform_kernel_conv2d":  # 2x3 kernel from a 3x4 scope, 2 weight and 2 offset groups
        shape = (1, 24, 3, 2) if full else (1, 24)
        tensors = dict(input=rng.standard_normal((1, 4, 4, 5)), weight=rng.standard_normal((4, 2, 3, 4)),
                       kernel_offset=rng.uniform(-1.5, 1.5, shape), bias=rng.standard_normal(4) if full else None)
        params = dict(kernel_size=[2, 3], stride=[2, 2], padding=[1, 0], dilation=[1, 1], groups=2)
    return tensors, params


OPS = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool", "deform_kernel_conv2d")
CASES = [(op, variant) for op in OPS for variant in ("full", "bare")]
NOT_DIFFERENTIABLE = {"rois"}


def tensors_on(arrays: dict, device, dtype=torch.float64, requires_grad=False) -> dict:
    return {k: None if v is None else torch.from_numpy(v).to(device, dtype).requires_grad_(
        requires_grad and k not in NOT_DIFFERENTIABLE) for k, v in arrays.items()}


def op_args(name: str, tensors: dict, params: dict) -> tuple:
    """The positional arguments of torch.ops.cudeform.<name>, in schema order."""
    named = {**tensors, **params}
    return tuple(named[a.name] for a in getattr(torch.ops.cudeform, name).default._schema.arguments)


def call(name: str, tensors: dict, params: dict):
    """The public function of cudeform.torch, by keyword."""
    return getattr(ct, name)(**tensors, **params)


# gradcheck, opcheck, and the functions against the array API

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,variant", CASES)
def test_gradcheck(name, variant, device):
    arrays, params = _case(name, variant)
    tensors = tensors_on(arrays, device, requires_grad=True)
    names = list(tensors)

    def fn(*args):
        return call(name, dict(zip(names, args)), params)

    # The CUDA backward accumulates with atomics: the same gradient twice may differ in the last bits.
    assert torch.autograd.gradcheck(fn, tuple(tensors.values()), nondet_tol=1e-10 if device == "cuda" else 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,variant", CASES)
def test_opcheck(name, variant, device):
    arrays, params = _case(name, variant)
    tensors = tensors_on(arrays, device, requires_grad=True)
    op = getattr(torch.ops.cudeform, name).default
    torch.library.opcheck(op, op_args(name, tensors, params))
    plain = {k: None if t is None else t.detach() for k, t in tensors.items()}
    grad_output = torch.randn_like(op(*op_args(name, plain, params)))
    backward = getattr(torch.ops.cudeform, name + "_backward").default
    torch.library.opcheck(backward, (grad_output, *op_args(name, plain, params), False))


@pytest.mark.parametrize("name,variant", CASES)
def test_functions_match_the_array_api(name, variant):
    arrays, params = _case(name, variant)
    tensors = tensors_on(arrays, "cpu", requires_grad=True)
    out = call(name, tensors, params)
    core_params = {k: v for k, v in params.items() if k != "border_grad"}
    expected = getattr(cudeform, name)(**arrays, **core_params)
    np.testing.assert_array_equal(out.detach().numpy(), expected)

    grad_output = np.random.default_rng(1).standard_normal(out.shape)
    given = [k for k, t in tensors.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [tensors[k] for k in given], torch.from_numpy(grad_output))
    expected = getattr(cudeform, name + "_backward")(grad_output, **arrays, **core_params)
    for k, g in zip(given, grads):
        np.testing.assert_array_equal(g.numpy(), getattr(expected, k))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a larger tensor)."""
    return torch.stack([t.detach(), torch.zeros_like(t)], dim=-1)[..., 0].requires_grad_(t.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_arguments(name, device):
    arrays, params = _case(name, "full")
    results = []
    for layout in (lambda t: t, _strided):
        tensors = tensors_on(arrays, device, requires_grad=True)
        tensors = {k: None if t is None else layout(t) for k, t in tensors.items()}
        out = call(name, tensors, params)
        # out.sum()'s gradient: a stride-0 tensor.
        grad_output = torch.ones((), dtype=out.dtype, device=device).expand_as(out)
        inputs = [t for t in tensors.values() if t is not None and t.requires_grad]
        results.append((out, *torch.autograd.grad(out, inputs, grad_output)))
    torch.testing.assert_close(results[1], results[0])


def test_arguments_not_given_get_no_gradient():
    arrays, params = _case("deform_conv2d", "bare")
    tensors = tensors_on(arrays, "cpu", requires_grad=True)
    layer = ct.DeformConv2d(4, 2, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False).double()
    layer(tensors["input"], tensors["offset"]).sum().backward()
    assert layer.bias is None and layer.weight.grad is not None and tensors["offset"].grad is not None


class _Calls(TorchDispatchMode):
    """Records the cudeform ops dispatched while it is active, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cudeform":
            self.calls.append((func.__name__, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", OPS)
def test_deterministic_algorithms_reach_the_backward(name, deterministic):
    arrays, params = _case(name, "full")
    tensors = tensors_on(arrays, "cpu", requires_grad=True)
    out = call(name, tensors, params)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with _Calls() as mode:
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    (backward_call,) = [args for op, args in mode.calls if op.startswith(name + "_backward")]
    assert backward_call[-1] is deterministic


def test_border_grad_reaches_the_backward():
    # Zero offsets with padding: the border points sit at exactly -1, where the conventions differ.
    x = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    grads = {}
    for convention in ("torchvision", "mmcv"):
        offset = torch.zeros(1, 18, 3, 3, dtype=torch.float64, requires_grad=True)
        ct.deform_conv2d(x, offset, weight, padding=1, border_grad=convention).sum().backward()
        expected = cudeform.deform_conv2d_backward(np.ones((1, 1, 3, 3)), x.numpy(), offset.detach().numpy(),
                                                   weight.numpy(), padding=1, border_grad=convention).offset
        np.testing.assert_array_equal(offset.grad.numpy(), expected)
        grads[convention] = offset.grad
    assert not torch.equal(grads["torchvision"], grads["mmcv"])


def test_bad_arguments_raise_named_errors():
    arrays, params = _case("deform_conv2d", "full")
    tensors = tensors_on(arrays, "cpu")
    with pytest.raises(ValueError, match="border_grad"):
        call("deform_conv2d", tensors, {**params, "border_grad": "caffe"})
    with pytest.raises(ValueError, match="offset"):
        call("deform_conv2d", {**tensors, "offset": tensors["offset"][:, :, :2]}, params)
    with pytest.raises(ValueError, match="DeformConv2dPack: deform_groups"):
        ct.DeformConv2dPack(4, 2, 3, deform_groups=3)


@pytest.mark.parametrize("op,emptied,shape,whole", [
    ("deform_conv2d", ("input", "offset", "mask"), (0, 2, 3, 2), "weight"),
    ("deform_roi_pool", ("rois", "offset", "mask"), (0, 2, 2, 3), "input"),
])
def test_empty_batches(op, emptied, shape, whole):
    """With no images (no RoIs), the output is empty and the argument kept whole gets a zero
    gradient."""
    arrays, params = _case(op, "full")
    tensors = tensors_on(arrays, "cpu", requires_grad=True)
    tensors.update({name: tensors[name][:0] for name in emptied})
    out = call(op, tensors, params)
    out.sum().backward()
    assert out.shape == shape and tensors[whole].grad.abs().sum() == 0


# torch.compile

class _EveryOp(nn.Module):
    """A small model that uses every op, through the layers."""

    def __init__(self):
        super().__init__()
        self.dcn = ct.ModulatedDeformConv2dPack(2, 4, 3, padding=1, deform_groups=2)
        self.dk_local = ct.DeformKernelConv2d(4, 4, 3, padding=1, groups=2, scope_size=5)
        self.dk_global = ct.DeformKernelConv2d(4, 4, 3, padding=1, scope_size=4, mode="global")
        self.roi = ct.ModulatedDeformRoIPoolPack((2, 3), 4, deform_fc_channels=8, spatial_scale=0.5,
                                                 sampling_ratio=2)
        self.psroi = ct.DeformPSRoIPool(output_dim=1, pooled_size=2, group_size=2, sample_per_part=2,
                                        spatial_scale=0.5)
        self.ps_offset = nn.Parameter(torch.zeros(3, 2, 2, 2))

    def forward(self, x, rois):
        y = F.relu(self.dcn(x))
        y = self.dk_global(F.relu(self.dk_local(y)))
        return self.roi(y, rois), self.psroi(y, rois, self.ps_offset)


def _compiled_matches_eager(device, backend, autocast=None):
    """The model compiled with ``backend`` against eager mode, outputs and gradients; with
    ``autocast`` (a dtype), a float32 model run under autocast, else a float64 one."""
    torch.manual_seed(0)
    dtype = torch.float64 if autocast is None else torch.float32
    model = _EveryOp().to(device, dtype)
    with torch.no_grad():  # away from the zero-initialised offset branches, which sample on kinks
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(2, 2, 6, 7, dtype=dtype, device=device, requires_grad=True)
    rois = torch.from_numpy(_rois(2)).to(device, dtype)

    def run(m):
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            outs = m(x, rois)
        loss = sum(o.float().square().sum() for o in outs)
        return (*outs, *torch.autograd.grad(loss, [x, *model.parameters()]))

    expected = run(model)
    # fullgraph: any graph break, inside an op or around it, is an error.
    got = run(torch.compile(model, backend=backend, fullgraph=True))
    if autocast is None:
        torch.testing.assert_close(got, expected)
        return
    # Compiled code may round half-precision intermediates differently: compare each tensor to
    # the half type's precision, relative to its largest element.
    tolerance = 2e-2 if autocast == torch.float16 else 6e-2
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        assert (g.double() - e.double()).abs().max() <= tolerance * e.double().abs().max()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager_cpu(backend):
    _compiled_matches_eager("cpu", backend)


def test_compile_under_cpu_autocast():
    # The offset branches' convolutions give bfloat16 under CPU autocast; the ops take them in float32.
    _compiled_matches_eager("cpu", "aot_eager", autocast=torch.bfloat16)


@pytest.mark.parametrize("autocast", [
    None,
    torch.float16,
    # After the float16 case: the bfloat16 graph must not be the float16 one from inductor's caches.
    torch.bfloat16,
])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch has no CUDA device")
def test_compile_matches_eager_cuda(autocast):
    _compiled_matches_eager("cuda", "inductor", autocast)


# Layers

def test_deform_conv2d_initialises_as_nn_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), groups=2)
    torch.manual_seed(0)
    layer = ct.DeformConv2d(4, 6, (3, 2), groups=2)
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == [(k, v.shape) for k, v in conv.state_dict().items()]
    torch.testing.assert_close(layer.state_dict(), conv.state_dict(), rtol=0, atol=0)


def test_deform_conv2d_state_dict_round_trips_with_torchvision():
    torchvision = pytest.importorskip("torchvision")
    config = dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                  groups=2)
    torch.manual_seed(0)
    theirs = torchvision.ops.DeformConv2d(**config).double()
    torch.manual_seed(0)
    ours = ct.DeformConv2d(**config).double()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)  # same initialisation

    torch.manual_seed(1)
    theirs = torchvision.ops.DeformConv2d(**config).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    offset = torch.empty(2, 2 * 2 * 6, 4, 6, dtype=torch.float64).uniform_(-2, 2)
    mask = torch.rand(2, 2 * 6, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x, offset, mask), theirs(x, offset, mask))
    torch.testing.assert_close(ours(x, offset), theirs(x, offset))
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs)


CONV_GEOMETRY = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)


@pytest.mark.parametrize("pack,per_point,scale", [(ct.DeformConv2dPack, 2, 1.0),
                                                  (ct.ModulatedDeformConv2dPack, 3, 0.5)])
def test_conv_packs_start_as_an_ordinary_convolution(pack, per_point, scale):
    torch.manual_seed(0)
    layer = pack(4, 6, (3, 2), deform_groups=2, bias=True, **CONV_GEOMETRY).double()
    assert set(layer.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert layer.conv_offset.out_channels == per_point * 2 * 3 * 2
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    out = layer(x)
    # A modulated layer starts with its mask at sigmoid(0) = 0.5.
    torch.testing.assert_close(out, F.conv2d(x, scale * layer.weight, layer.bias, **CONV_GEOMETRY))
    out.square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0  # training can move the offsets


def test_deform_roi_pool_layers():
    torch.manual_seed(0)
    arrays, params = _case("deform_roi_pool", "full")
    t = tensors_on(arrays, "cpu")
    geometry = dict(spatial_scale=0.5, sampling_ratio=2, gamma=0.3)
    plain = ct.DeformRoIPool((2, 3), **geometry)
    torch.testing.assert_close(plain(t["input"], t["rois"], t["offset"], t["mask"]), call("deform_roi_pool", t, params))
    without_offset = plain(t["input"], t["rois"])

    pack = ct.DeformRoIPoolPack((2, 3), 2, deform_fc_channels=5, **geometry).double()
    modulated = ct.ModulatedDeformRoIPoolPack((2, 3), 2, deform_fc_channels=5, **geometry).double()
    # mmcv's parameter names, so its checkpoints load.
    assert [k for k in pack.state_dict() if k.endswith("weight")] == \
        ["offset_fc.0.weight", "offset_fc.2.weight", "offset_fc.4.weight"]
    assert [k for k in modulated.state_dict() if k.startswith("mask_fc") and k.endswith("weight")] == \
        ["mask_fc.0.weight", "mask_fc.2.weight"]
    x = t["input"].clone().requires_grad_()
    for layer, scale in ((pack, 1.0), (modulated, 0.5)):
        out = layer(x, t["rois"])
        torch.testing.assert_close(out, scale * without_offset)  # zero-initialised branches
        out.square().sum().backward()
        assert layer.offset_fc[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="output_channels"):
        pack(t["input"][:, :1], t["rois"])


def test_deform_psroi_pool_layer():
    arrays, params = _case("deform_psroi_pool", "full")
    t = tensors_on(arrays, "cpu")
    layer = ct.DeformPSRoIPool(**{k: v for k, v in params.items()})
    torch.testing.assert_close(layer(t["input"], t["rois"], t["offset"]), call("deform_psroi_pool", t, params))


@pytest.mark.parametrize("mode,branch", [("local", "conv_offset"), ("global", "fc_offset")])
def test_deform_kernel_conv2d_starts_as_an_ordinary_convolution(mode, branch):
    torch.manual_seed(0)
    layer = ct.DeformKernelConv2d(4, 6, (3, 2), scope_size=(5, 4), mode=mode, **CONV_GEOMETRY).double()
    assert set(layer.state_dict()) == {"weight", "bias", f"{branch}.weight", f"{branch}.bias"}
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    out = layer(x)
    centre = layer.weight[:, :, 1:4, 1:3]  # the 3x2 kernel centred in the 5x4 scope
    torch.testing.assert_close(out, F.conv2d(x, centre, layer.bias, **CONV_GEOMETRY))
    out.square().sum().backward()
    assert getattr(layer, branch).weight.grad.abs().sum() > 0


# Autocast and half precision

def _float_tensors(tensors: dict, dtype) -> dict:
    return {k: None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
            for k, t in tensors.items()}


@pytest.mark.parametrize("name,variant", CASES)
def test_cpu_autocast_runs_in_float32(name, variant):
    arrays, params = _case(name, variant)
    tensors = tensors_on(arrays, "cpu", torch.float32, requires_grad=True)
    halves = _float_tensors(tensors, torch.bfloat16)  # as a bfloat16 layer under CPU autocast hands them on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = call(name, tensors, params)
        upcast = call(name, halves, params)
        upcast.sum().backward()
    assert same.dtype == upcast.dtype == torch.float32
    torch.testing.assert_close(same, call(name, tensors, params), rtol=0, atol=0)
    torch.testing.assert_close(upcast, call(name, _float_tensors(halves, torch.float32), params), rtol=0, atol=0)
    assert all(t.grad.dtype == torch.bfloat16 for t in halves.values() if t is not None and t.requires_grad)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "native"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch has no CUDA device")
def test_cuda_half_precision(name, dtype, autocast):
    """Under autocast, float32 arguments run in the autocast dtype; without it, half-precision
    tensors run natively. Either way the result is the float32 one on the same rounded inputs,
    to the half type's precision, and gradients reach the arguments in their own dtype."""
    arrays, params = _case(name, "full")
    tensors = tensors_on(arrays, "cuda", torch.float32, requires_grad=True)
    rounded = _float_tensors(_float_tensors(tensors, dtype), torch.float32)
    expected = call(name, rounded, params)
    if autocast:
        with torch.autocast("cuda", dtype=dtype):
            out = call(name, tensors, params)
        leaves = tensors
    else:
        leaves = _float_tensors(tensors, dtype)
        out = call(name, leaves, params)
    assert out.dtype == dtype
    scale = expected.abs().max().item()
    tolerance = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tolerance * scale)
    out.float().square().sum().backward()
    for t in leaves.values():
        if t is not None and t.requires_grad:
            assert t.grad.dtype == t.dtype and torch.isfinite(t.grad).all()


# CUDA specifics

@pytest.mark.parametrize("name", OPS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch has no CUDA device")
def test_cuda_deterministic_backward_is_bitwise_reproducible(name):
    arrays, params = _case(name, "full")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = []
        for _ in range(2):
            tensors = tensors_on(arrays, "cuda", torch.float32, requires_grad=True)
            out = call(name, tensors, params)
            grads.append(torch.autograd.grad(out.square().sum(), [t for t in tensors.values()
                                                                  if t is not None and t.requires_grad]))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch has no CUDA device")
def test_cuda_runs_on_the_current_stream(name):
    arrays, params = _case(name, "full")
    tensors = tensors_on(arrays, "cuda", requires_grad=True)
    expected = call(name, tensors, params)
    expected_grads = torch.autograd.grad(expected.square().sum(), tensors["input"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = call(name, tensors, params)
        grads = torch.autograd.grad(out.square().sum(), tensors["input"])
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grads, expected_grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch has no CUDA device")
def test_cuda_layers_match_cpu():
    torch.manual_seed(0)
    model = _EveryOp().double()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    rois = torch.from_numpy(_rois(2))
    expected = model(x, rois)
    got = model.cuda()(x.cuda(), rois.cuda())
    torch.testing.assert_close([g.cpu() for g in got], list(expected))


# Packaging and the README

def test_import_cudeform_does_not_import_torch():
    code = "import sys, cudeform; assert 'torch' not in sys.modules, 'import cudeform imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_readme_snippet():
    """The README's PyTorch example runs as written."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## PyTorch\n", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(snippet, "README.md (PyTorch)", "exec"), {})
