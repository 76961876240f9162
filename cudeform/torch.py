"""PyTorch adapter: cudeform's ops as differentiable ``torch.ops.cudeform`` custom ops, and layers.

Importing this module registers every op with ``torch.library.custom_op`` (namespace
``cudeform``): a fake implementation (shapes and dtypes only, for ``torch.compile`` and meta
tensors), an autograd formula and autocast rules. The functions below are thin wrappers that
accept cudeform's signatures (an int or a pair for sizes) and call those ops; the layers build
on the functions. They run on CPU tensors (float32, float64) and CUDA tensors (float16,
bfloat16, float32, float64); on CUDA the kernels run on torch's current stream, and outputs
and workspaces come from torch's caching allocator.

``torch.compile`` sees each call as one opaque node (its fake implementation gives the
output's shape), so a model using these ops compiles without graph breaks inside them, with
any backend.

Gradients:

- The backward of op ``X`` is itself a custom op, ``torch.ops.cudeform.X_backward``, so that
  compiled backward graphs keep it as one node. It has no derivative of its own: double
  backward is not supported.
- Arguments that were not given (bias, mask, offset) get None; RoIs get none.
- Under ``torch.use_deterministic_algorithms(True)`` the backwards run in their bitwise
  reproducible mode (``deterministic=True`` of the array API; the CPU is always deterministic).
- :func:`deform_conv2d` takes ``border_grad`` (see ``cudeform.deform_conv2d_backward``); the
  layers use the default, torchvision's convention.

Mixed precision:

- float16 and bfloat16 CUDA tensors run natively (accumulating in float32); torchvision's
  ``deform_conv2d``, by contrast, computes them in float32.
- Under ``torch.autocast("cuda", dtype=d)`` every op (and its backward) casts its
  floating-point tensor arguments to ``d``, float64 excepted as autocast does, and runs in
  ``d``, as ``conv2d`` does; gradients flow back to the original dtypes through the casts.
  All arguments of one op share one dtype, so RoI coordinates are cast too: in bfloat16 they
  are rounded to 8 significant bits (a step of 4 pixels between 512 and 1024). Where that
  matters, run the RoI ops outside autocast on float32 tensors.
- The functions below apply these casts themselves before calling the op, so that a
  compiled graph records them (see ``_cast_in_wrapper``); ``torch.ops.cudeform.*`` called
  directly gets the same casts from the dispatcher.
- Under ``torch.autocast("cpu")`` the ops run in float32, since the CPU path has no
  half-precision types: float16 and bfloat16 arguments (the outputs of other ops under CPU
  autocast) are cast up to float32, and float32 ones are left alone.
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import init

import cudeform as _core

from . import _validate as check
from .deform_conv import BORDER_GRADS
from .deform_conv import _geometry as _conv_geometry
from .deform_kernel_conv import _geometry as _kconv_geometry
from .deform_roi_pool import _psroi_geometry, _roi_geometry

__all__ = [
    "deform_conv2d",
    "deform_roi_pool",
    "deform_psroi_pool",
    "deform_kernel_conv2d",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "DeformPSRoIPool",
    "DeformKernelConv2d",
]

_LIB = torch.library.Library("cudeform", "FRAGMENT")


# Op registration. Every op's schema lists its tensor arguments first, then the non-tensor
# ones; its backward op takes (grad_output, *the op's arguments, deterministic) and returns
# the gradients of the differentiable tensor arguments that were given, in order (a custom op
# cannot return None, so the list just leaves out the others).

def _given(grads) -> list[Tensor]:
    return [g for g in grads if g is not None]


def _register_autograd(op, backward_op, differentiable: tuple[bool, ...]) -> None:
    """Connect ``op`` to ``backward_op``; ``differentiable`` says which of the op's leading
    tensor arguments get gradients."""
    n = len(differentiable)

    @backward_op.register_fake
    def _(grad_output, *args):
        return [t.new_empty(t.shape) for d, t in zip(differentiable, args[:n]) if d and t is not None]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n])
        ctx.params = inputs[n:]

    def backward(ctx, grad_output):
        tensors = ctx.saved_tensors
        grads = iter(backward_op(grad_output, *tensors, *ctx.params, torch.are_deterministic_algorithms_enabled()))
        return (*(next(grads) if d and t is not None else None for d, t in zip(differentiable, tensors)),
                *(None for _ in ctx.params))

    op.register_autograd(backward, setup_context=setup_context)


def _autocast_dtype(device_type: str) -> torch.dtype:
    # The CPU path has float32 and float64 only, whatever CPU autocast's dtype.
    return torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)


def _autocast(args: tuple, device_type: str) -> tuple:
    """Autocast's rule for an op's arguments: floating-point tensors of the autocast device,
    float64 excepted, go to the autocast dtype."""
    dtype = _autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.device.type == device_type
                 and a.dtype != torch.float64 else a for a in args)


def _cast_in_wrapper(*args):
    """The autocast rule applied by the public functions before they call an op, besides the
    rule registered at the op's Autocast key (which serves direct ``torch.ops.cudeform``
    calls). Traced by torch.compile, these casts become nodes of the graph, so a graph
    compiled under float16 autocast differs from one under bfloat16: with the casts left to the
    dispatcher the two graphs were identical, and inductor's AOTAutograd cache, whose key
    says whether autocast is on but not its dtype, handed the float16 program to a bfloat16
    run (torch 2.11)."""
    device_type = args[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return args
    return _autocast(args, device_type)


def _register_autocast(name: str) -> None:
    """Autocast rules for ``torch.ops.cudeform.<name>`` on CPU and CUDA.
    ``torch.library.register_autocast`` casts to one dtype fixed at registration; these ops
    follow the dtype of the autocast region, as conv2d does, so the rule is registered as torch
    registers its own: a kernel at the Autocast key that casts, then calls the op with that key
    excluded."""
    overload = getattr(torch.ops.cudeform, name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        def kernel(keyset, *args, device_type=device_type, key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))):
                return overload(*_autocast(args, device_type))

        _LIB.impl(name, kernel, key, with_keyset=True)


# deform_conv2d

@torch.library.custom_op("cudeform::deform_conv2d", mutates_args=())
def _deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], border_grad: str) -> Tensor:
    return _core.deform_conv2d(input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation,
                               mask=mask)


@_deform_conv2d.register_fake
def _(input, offset, weight, bias, mask, stride, padding, dilation, border_grad):
    arrays = dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    geo = _conv_geometry("deform_conv2d", arrays, stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0], *geo.out_size))


@torch.library.custom_op("cudeform::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward(grad_output: Tensor, input: Tensor, offset: Tensor, weight: Tensor,
                            bias: Optional[Tensor], mask: Optional[Tensor], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int], border_grad: str,
                            deterministic: bool) -> list[Tensor]:
    return _given(_core.deform_conv2d_backward(grad_output, input, offset, weight, bias, stride=stride,
                                               padding=padding, dilation=dilation, mask=mask,
                                               border_grad=border_grad, deterministic=deterministic))


_register_autograd(_deform_conv2d, _deform_conv2d_backward, (True, True, True, True, True))


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1,
                  padding=0, dilation=1, mask: Optional[Tensor] = None, border_grad: str = "torchvision") -> Tensor:
    """Differentiable :func:`cudeform.deform_conv2d` (DCN v1; v2 when ``mask`` is given).

    Shapes: input (N, C_in, H, W); offset (N, 2 * G * kh * kw, H_out, W_out), (dy, dx) pairs;
    weight (C_out, C_in / groups, kh, kw); bias (C_out,); mask (N, G * kh * kw, H_out, W_out),
    used as given; output (N, C_out, H_out, W_out). ``border_grad`` picks the offset gradient's
    convention at the image border, as in :func:`cudeform.deform_conv2d_backward`.
    """
    op = "deform_conv2d"
    check.choice(op, "border_grad", border_grad, BORDER_GRADS)
    input, offset, weight, bias, mask = _cast_in_wrapper(input, offset, weight, bias, mask)
    return _deform_conv2d(input, offset, weight, bias, mask, check.int_pair(op, "stride", stride, minimum=1),
                          check.int_pair(op, "padding", padding, minimum=0),
                          check.int_pair(op, "dilation", dilation, minimum=1), border_grad)


# deform_roi_pool

@torch.library.custom_op("cudeform::deform_roi_pool", mutates_args=())
def _deform_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor], mask: Optional[Tensor],
                     output_size: Sequence[int], spatial_scale: float, sampling_ratio: int, gamma: float) -> Tensor:
    return _core.deform_roi_pool(input, rois, offset, output_size=output_size, spatial_scale=spatial_scale,
                                sampling_ratio=sampling_ratio, gamma=gamma, mask=mask)


@_deform_roi_pool.register_fake
def _(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma):
    arrays = dict(input=input, rois=rois, offset=offset, mask=mask)
    geo = _roi_geometry("deform_roi_pool", arrays, output_size, spatial_scale, sampling_ratio, gamma)
    return input.new_empty((rois.shape[0], input.shape[1], *geo.output_size))


@torch.library.custom_op("cudeform::deform_roi_pool_backward", mutates_args=())
def _deform_roi_pool_backward(grad_output: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor],
                              mask: Optional[Tensor], output_size: Sequence[int], spatial_scale: float,
                              sampling_ratio: int, gamma: float, deterministic: bool) -> list[Tensor]:
    return _given(_core.deform_roi_pool_backward(grad_output, input, rois, offset, output_size=output_size,
                                                spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                                gamma=gamma, mask=mask, deterministic=deterministic))


_register_autograd(_deform_roi_pool, _deform_roi_pool_backward, (True, False, True, True))


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor] = None, *, output_size,
                    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                    mask: Optional[Tensor] = None) -> Tensor:
    """Differentiable :func:`cudeform.deform_roi_pool` (mmcv's deformable RoI pooling; modulated
    when ``mask`` is given).

    Shapes: input (N, C, H, W); rois (R, 5), rows ``[batch_index, x1, y1, x2, y2]`` in image
    coordinates, same dtype as input, no gradient; offset (R, 2, ph, pw), channel 0 moving x
    and channel 1 moving y, in units of ``gamma`` times the RoI's size; mask (R, 1, ph, pw);
    output (R, C, ph, pw).
    """
    input, rois, offset, mask = _cast_in_wrapper(input, rois, offset, mask)
    return _deform_roi_pool(input, rois, offset, mask,
                            check.int_pair("deform_roi_pool", "output_size", output_size, minimum=1),
                            spatial_scale, sampling_ratio, gamma)


# deform_psroi_pool

@torch.library.custom_op("cudeform::deform_psroi_pool", mutates_args=())
def _deform_psroi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor], output_dim: int, pooled_size: int,
                       group_size: int, part_size: Optional[int], sample_per_part: int, spatial_scale: float,
                       trans_std: float) -> Tensor:
    return _core.deform_psroi_pool(input, rois, offset, output_dim=output_dim, pooled_size=pooled_size,
                                  group_size=group_size, part_size=part_size, sample_per_part=sample_per_part,
                                  spatial_scale=spatial_scale, trans_std=trans_std)


@_deform_psroi_pool.register_fake
def _(input, rois, offset, output_dim, pooled_size, group_size, part_size, sample_per_part, spatial_scale,
      trans_std):
    geo = _psroi_geometry("deform_psroi_pool", dict(input=input, rois=rois, offset=offset), output_dim,
                               pooled_size, group_size, part_size, sample_per_part, spatial_scale, trans_std)
    return input.new_empty((rois.shape[0], geo.output_dim, geo.pooled_size, geo.pooled_size))


@torch.library.custom_op("cudeform::deform_psroi_pool_backward", mutates_args=())
def _deform_psroi_pool_backward(grad_output: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor],
                                output_dim: int, pooled_size: int, group_size: int, part_size: Optional[int],
                                sample_per_part: int, spatial_scale: float, trans_std: float,
                                deterministic: bool) -> list[Tensor]:
    return _given(_core.deform_psroi_pool_backward(grad_output, input, rois, offset, output_dim=output_dim,
                                                  pooled_size=pooled_size, group_size=group_size,
                                                  part_size=part_size, sample_per_part=sample_per_part,
                                                  spatial_scale=spatial_scale, trans_std=trans_std,
                                                  deterministic=deterministic))


_register_autograd(_deform_psroi_pool, _deform_psroi_pool_backward, (True, False, True))


def deform_psroi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor] = None, *, output_dim: int,
                      pooled_size: int, group_size: int = 1, part_size: Optional[int] = None,
                      sample_per_part: int = 4, spatial_scale: float = 1.0, trans_std: float = 0.1) -> Tensor:
    """Differentiable :func:`cudeform.deform_psroi_pool` (MSRA's deformable position-sensitive
    RoI pooling, R-FCN).

    Shapes: input (N, output_dim * group_size**2, H, W); rois (R, 5) as for
    :func:`deform_roi_pool`, no gradient; offset (R, 2 * num_classes, part_size, part_size),
    channel ``2 * cls`` moving x and ``2 * cls + 1`` moving y, in units of ``trans_std``
    times the RoI's size; output (R, output_dim, pooled_size, pooled_size).
    """
    input, rois, offset = _cast_in_wrapper(input, rois, offset)
    return _deform_psroi_pool(input, rois, offset, output_dim, pooled_size, group_size, part_size,
                              sample_per_part, spatial_scale, trans_std)


# deform_kernel_conv2d

@torch.library.custom_op("cudeform::deform_kernel_conv2d", mutates_args=())
def _deform_kernel_conv2d(input: Tensor, weight: Tensor, kernel_offset: Tensor, bias: Optional[Tensor],
                          kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], groups: int) -> Tensor:
    return _core.deform_kernel_conv2d(input, weight, kernel_offset, bias, kernel_size=kernel_size, stride=stride,
                                       padding=padding, dilation=dilation, groups=groups)


@_deform_kernel_conv2d.register_fake
def _(input, weight, kernel_offset, bias, kernel_size, stride, padding, dilation, groups):
    arrays = dict(input=input, weight=weight, kernel_offset=kernel_offset, bias=bias)
    geo = _kconv_geometry("deform_kernel_conv2d", arrays, kernel_size, stride, padding, dilation, groups)
    return input.new_empty((input.shape[0], weight.shape[0], *geo.out_size))


@torch.library.custom_op("cudeform::deform_kernel_conv2d_backward", mutates_args=())
def _deform_kernel_conv2d_backward(grad_output: Tensor, input: Tensor, weight: Tensor, kernel_offset: Tensor,
                                   bias: Optional[Tensor], kernel_size: Sequence[int], stride: Sequence[int],
                                   padding: Sequence[int], dilation: Sequence[int], groups: int,
                                   deterministic: bool) -> list[Tensor]:
    return _given(_core.deform_kernel_conv2d_backward(grad_output, input, weight, kernel_offset, bias,
                                                       kernel_size=kernel_size, stride=stride, padding=padding,
                                                       dilation=dilation, groups=groups,
                                                       deterministic=deterministic))


_register_autograd(_deform_kernel_conv2d, _deform_kernel_conv2d_backward, (True, True, True, True))


def deform_kernel_conv2d(input: Tensor, weight: Tensor, kernel_offset: Tensor, bias: Optional[Tensor] = None, *,
                         kernel_size, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Differentiable :func:`cudeform.deform_kernel_conv2d` (Deformable Kernels, global or local).

    Shapes: input (N, C_in, H, W); weight (C_out, C_in / groups, S_h, S_w), the kernel scope,
    at least ``kernel_size``; kernel_offset (N, 2 * G * kh * kw) for global DK or
    (N, 2 * G * kh * kw, H_out, W_out) for local DK, (dh, dw) pairs in scope cells, offset
    group g holding output channels ``[g * C_out/G, (g+1) * C_out/G)``; bias (C_out,);
    output (N, C_out, H_out, W_out).
    """
    op = "deform_kernel_conv2d"
    input, weight, kernel_offset, bias = _cast_in_wrapper(input, weight, kernel_offset, bias)
    return _deform_kernel_conv2d(input, weight, kernel_offset, bias,
                                 check.int_pair(op, "kernel_size", kernel_size, minimum=1),
                                 check.int_pair(op, "stride", stride, minimum=1),
                                 check.int_pair(op, "padding", padding, minimum=0),
                                 check.int_pair(op, "dilation", dilation, minimum=1), groups)


for _name in ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool", "deform_kernel_conv2d"):
    _register_autocast(_name)
    _register_autocast(_name + "_backward")


# Layers

def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias: an offset branch that starts with no deformation."""
    init.zeros_(module.weight)
    init.zeros_(module.bias)
    return module


def _divides(layer: str, name: str, value: int, what: str, total: int) -> None:
    if total % value:
        raise ValueError(f"{layer}: {name}: expected a divisor of {what} = {total}, got {value}")


class DeformConv2d(nn.Module):
    """Deformable convolution with given offsets (and mask): ``torchvision.ops.DeformConv2d``'s
    arguments, parameters (``weight``, ``bias``), initialisation and ``state_dict``, so weights
    move both ways.

    Args:
        in_channels, out_channels: C_in and C_out.
        kernel_size, stride, padding, dilation: an int or an (h, w) pair.
        groups: weight groups, dividing C_in and C_out.
        bias: whether to add a learnable bias.

    ``forward(input, offset, mask=None)``: input (N, C_in, H, W); offset
    (N, 2 * G * kh * kw, H_out, W_out), (dy, dx) pairs, G offset groups (any divisor of C_in);
    mask (N, G * kh * kw, H_out, W_out) or None; returns (N, C_out, H_out, W_out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        layer = type(self).__name__
        _divides(layer, "groups", groups, "in_channels", in_channels)
        _divides(layer, "groups", groups, "out_channels", out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = check.int_pair(layer, "kernel_size", kernel_size, minimum=1)
        self.stride = check.int_pair(layer, "stride", stride, minimum=1)
        self.padding = check.int_pair(layer, "padding", padding, minimum=0)
        self.dilation = check.int_pair(layer, "dilation", dilation, minimum=1)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's (and nn.Conv2d's) initialisation, drawing the same random numbers."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        return s + (", bias=False" if self.bias is None else "")


class DeformConv2dPack(DeformConv2d):
    """Deformable convolution (DCN v1) that predicts its offsets from its input, as mmcv's
    ``DeformConv2dPack`` (same arguments and defaults, parameter names and ``state_dict``).

    ``conv_offset`` is an ``nn.Conv2d(in_channels, 2 * deform_groups * kh * kw)`` with the
    layer's kernel size, stride, padding and dilation, zero-initialised: at initialisation the
    layer is an ordinary ``nn.Conv2d`` with ``weight`` and ``bias``.

    Args: as :class:`DeformConv2d`, plus ``deform_groups`` (offset groups G, dividing
    in_channels); ``bias`` defaults to False, as mmcv's.

    ``forward(input)``: input (N, C_in, H, W); returns (N, C_out, H_out, W_out).
    """

    _per_point = 2  # conv_offset channels per kernel point and offset group: dy, dx

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        _divides(type(self).__name__, "deform_groups", deform_groups, "in_channels", in_channels)
        self.deform_groups = deform_groups
        points = deform_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = _zero(nn.Conv2d(in_channels, self._per_point * points, self.kernel_size, self.stride,
                                           self.padding, self.dilation))

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input, self.conv_offset(input))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", deform_groups={self.deform_groups}"


class ModulatedDeformConv2dPack(DeformConv2dPack):
    """Modulated deformable convolution (DCN v2) that predicts its offsets and mask from its
    input, as mmcv's ``ModulatedDeformConv2dPack`` (same arguments and defaults, parameter
    names and ``state_dict``).

    ``conv_offset`` is an ``nn.Conv2d(in_channels, 3 * deform_groups * kh * kw)``, zero-
    initialised; its first ``2 * deform_groups * kh * kw`` channels are the offsets and the rest,
    through a sigmoid, the mask. At initialisation the mask is 0.5 everywhere: the layer is an
    ordinary convolution with half of ``weight``, plus ``bias``.

    Args: as :class:`DeformConv2dPack`; ``bias`` defaults to True, as mmcv's.

    ``forward(input)``: input (N, C_in, H, W); returns (N, C_out, H_out, W_out).
    """

    _per_point = 3  # dy, dx and the mask

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups,
                         bias)

    def forward(self, input: Tensor) -> Tensor:
        # mmcv chunks conv_offset's output in three and concatenates the first two: the same
        # channels as this split, so its checkpoints load.
        points = self.conv_offset.out_channels // 3  # deform_groups * kh * kw
        offset, mask = self.conv_offset(input).split([2 * points, points], dim=1)
        return DeformConv2d.forward(self, input, offset, torch.sigmoid(mask))


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling with given offsets (and mask), as mmcv's ``DeformRoIPool``.

    Args:
        output_size: (ph, pw), an int or a pair.
        spatial_scale: the feature map's scale relative to the image.
        sampling_ratio: samples per bin each way; 0 adapts it to the RoI size.
        gamma: the offsets' scale.

    ``forward(input, rois, offset=None, mask=None)``: input (N, C, H, W); rois (R, 5), rows
    ``[batch_index, x1, y1, x2, y2]``; offset (R, 2, ph, pw), channel 0 moving x, in units of
    ``gamma`` times the RoI's size; mask (R, 1, ph, pw); returns (R, C, ph, pw).
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__()
        self.output_size = check.int_pair(type(self).__name__, "output_size", output_size, minimum=1)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        return deform_roi_pool(input, rois, offset, output_size=self.output_size, spatial_scale=self.spatial_scale,
                               sampling_ratio=self.sampling_ratio, gamma=self.gamma, mask=mask)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


def _fc_branch(in_features: int, hidden: int, out_features: int, depth: int) -> nn.Sequential:
    """``depth`` Linear layers with ReLUs between them, the last one zero-initialised; the
    module indices are mmcv's, so its checkpoints load."""
    layers: list[nn.Module] = []
    for i in range(depth - 1):
        layers += [nn.Linear(hidden if i else in_features, hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, _zero(nn.Linear(hidden, out_features)))


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its offsets, as mmcv's ``DeformRoIPoolPack`` (same
    arguments, parameter names and ``state_dict``).

    The RoIs are pooled without offsets first; ``offset_fc`` (three Linear layers on those
    flattened features, the last zero-initialised) turns them into the (R, 2, ph, pw) offsets,
    and the RoIs are pooled again with them. At initialisation the layer is plain RoI pooling.

    Args: as :class:`DeformRoIPool`, plus ``output_channels`` (C, the input's channels) and
    ``deform_fc_channels`` (the hidden layers' width).

    ``forward(input, rois)``: input (N, C, H, W); rois (R, 5); returns (R, C, ph, pw).
    """

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_branch(bins * output_channels, deform_fc_channels, 2 * bins, depth=3)

    def _plain(self, input: Tensor, rois: Tensor) -> Tensor:
        """The RoIs pooled without offsets, flattened: (R, C * ph * pw)."""
        if input.shape[1] != self.output_channels:
            raise ValueError(f"{type(self).__name__}: input: expected output_channels = {self.output_channels} "
                             f"channels, got shape {tuple(input.shape)}")
        return super().forward(input, rois).flatten(1)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        offset = self.offset_fc(self._plain(input, rois)).view(-1, 2, *self.output_size)
        return super().forward(input, rois, offset)


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Modulated deformable RoI pooling that predicts its offsets and mask, as mmcv's
    ``ModulatedDeformRoIPoolPack`` (same arguments, parameter names and ``state_dict``).

    As :class:`DeformRoIPoolPack`, plus ``mask_fc`` (two Linear layers on the plain pooled
    features, the last zero-initialised, then a sigmoid) giving the (R, 1, ph, pw) mask that
    multiplies each bin. At initialisation the layer is plain RoI pooling times 0.5.

    ``forward(input, rois)``: input (N, C, H, W); rois (R, 5); returns (R, C, ph, pw).
    """

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = nn.Sequential(*_fc_branch(bins * output_channels, deform_fc_channels, bins, depth=2),
                                     nn.Sigmoid())

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        plain = self._plain(input, rois)
        offset = self.offset_fc(plain).view(-1, 2, *self.output_size)
        mask = self.mask_fc(plain).view(-1, 1, *self.output_size)
        return DeformRoIPool.forward(self, input, rois, offset, mask)


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling (R-FCN) with given offsets, as MSRA's
    ``DeformablePSROIPooling``.

    Args:
        output_dim: output channels.
        pooled_size: k, the output is k x k.
        group_size: the position-sensitive grid; 1 is plain deformable RoI pooling.
        part_size: the offsets' grid; default pooled_size.
        sample_per_part: samples per bin each way.
        spatial_scale: the feature map's scale relative to the image.
        trans_std: the offsets' scale.

    ``forward(input, rois, offset=None)``: input (N, output_dim * group_size**2, H, W); rois
    (R, 5); offset (R, 2 * num_classes, part_size, part_size) or None; returns
    (R, output_dim, pooled_size, pooled_size).
    """

    def __init__(self, output_dim: int, pooled_size: int, group_size: int = 1, part_size: Optional[int] = None,
                 sample_per_part: int = 4, spatial_scale: float = 1.0, trans_std: float = 0.1):
        super().__init__()
        self.output_dim = output_dim
        self.pooled_size = pooled_size
        self.group_size = group_size
        self.part_size = pooled_size if part_size is None else part_size
        self.sample_per_part = sample_per_part
        self.spatial_scale = float(spatial_scale)
        self.trans_std = float(trans_std)

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return deform_psroi_pool(input, rois, offset, output_dim=self.output_dim, pooled_size=self.pooled_size,
                                 group_size=self.group_size, part_size=self.part_size,
                                 sample_per_part=self.sample_per_part, spatial_scale=self.spatial_scale,
                                 trans_std=self.trans_std)

    def extra_repr(self) -> str:
        return (f"output_dim={self.output_dim}, pooled_size={self.pooled_size}, group_size={self.group_size}, "
                f"part_size={self.part_size}, sample_per_part={self.sample_per_part}, "
                f"spatial_scale={self.spatial_scale}, trans_std={self.trans_std}")


class DeformKernelConv2d(nn.Module):
    """Deformable Kernels convolution (Gao et al.) that predicts its kernel offsets from its input.

    ``weight`` (C_out, C_in / groups, S_h, S_w) is the kernel scope; each output samples a
    ``kernel_size`` kernel from it, centred and moved by the offsets. The offset branch is
    zero-initialised, so at initialisation the layer is an ordinary convolution with the
    scope's centre (when ``S - kernel_size`` is even):

    - ``mode="global"``: ``fc_offset``, an ``nn.Linear(in_channels, 2 * G * kh * kw)`` on the
      input averaged over space; one kernel per image.
    - ``mode="local"``: ``conv_offset``, an ``nn.Conv2d(in_channels, 2 * G * kh * kw)`` with the
      layer's kernel size, stride, padding and dilation; one kernel per output position.

    Args:
        in_channels, out_channels: C_in and C_out.
        kernel_size, stride, padding, dilation: an int or an (h, w) pair.
        groups: weight groups, dividing C_in and C_out (C_in for depthwise).
        bias: whether to add a learnable bias.
        scope_size: (S_h, S_w), an int or a pair, at least kernel_size; default kernel_size.
        deform_groups: offset groups G, dividing out_channels.
        mode: "global" or "local".

    ``forward(input)``: input (N, C_in, H, W); returns (N, C_out, H_out, W_out).
    """

    MODES = ("global", "local")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, scope_size=None, deform_groups: int = 1,
                 mode: str = "local"):
        super().__init__()
        layer = type(self).__name__
        check.choice(layer, "mode", mode, self.MODES)
        _divides(layer, "groups", groups, "in_channels", in_channels)
        _divides(layer, "groups", groups, "out_channels", out_channels)
        _divides(layer, "deform_groups", deform_groups, "out_channels", out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = check.int_pair(layer, "kernel_size", kernel_size, minimum=1)
        self.scope_size = self.kernel_size if scope_size is None else check.int_pair(
            layer, "scope_size", scope_size, minimum=1)
        if min(s - k for s, k in zip(self.scope_size, self.kernel_size)) < 0:
            check.fail(layer, "scope_size", f"at least kernel_size = {self.kernel_size}", self.scope_size)
        self.stride = check.int_pair(layer, "stride", stride, minimum=1)
        self.padding = check.int_pair(layer, "padding", padding, minimum=0)
        self.dilation = check.int_pair(layer, "dilation", dilation, minimum=1)
        self.groups = groups
        self.deform_groups = deform_groups
        self.mode = mode
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.scope_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        channels = 2 * deform_groups * self.kernel_size[0] * self.kernel_size[1]
        if mode == "global":
            self.fc_offset = _zero(nn.Linear(in_channels, channels))
        else:
            self.conv_offset = _zero(nn.Conv2d(in_channels, channels, self.kernel_size, self.stride, self.padding,
                                               self.dilation))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation for a ``kernel_size`` kernel: the fan-in is that of the
        kernel actually applied, not of the larger scope, so the layer starts at a convolution's
        output scale."""
        bound = 1 / math.sqrt(self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1])
        init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        if self.mode == "global":
            kernel_offset = self.fc_offset(input.mean(dim=(2, 3)))
        else:
            kernel_offset = self.conv_offset(input)
        return deform_kernel_conv2d(input, self.weight, kernel_offset, self.bias, kernel_size=self.kernel_size,
                                    stride=self.stride, padding=self.padding, dilation=self.dilation,
                                    groups=self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"scope_size={self.scope_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, deform_groups={self.deform_groups}, "
                f"mode={self.mode!r}" + (", bias=False" if self.bias is None else ""))
