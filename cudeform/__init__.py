"""cudeform: deformable operators for NumPy, CuPy, PyTorch and JAX arrays.

Every op has a forward function and a backward function that returns a named tuple of
gradients. Arrays run where they live: NumPy on the CPU (Numba), CuPy and CUDA tensors on
the GPU (CUDA kernels compiled at run time by NVRTC).
"""

from .deform_conv import DeformConv2dGrads, deform_conv2d, deform_conv2d_backward
from .deform_kernel_conv import DeformKernelConv2dGrads, deform_kernel_conv2d, deform_kernel_conv2d_backward
from .deform_roi_pool import (
    DeformPSRoIPoolGrads,
    DeformRoIPoolGrads,
    deform_psroi_pool,
    deform_psroi_pool_backward,
    deform_roi_pool,
    deform_roi_pool_backward,
)
from . import testing

__version__ = "0.1.0"

__all__ = [
    "DeformConv2dGrads",
    "deform_conv2d",
    "deform_conv2d_backward",
    "DeformKernelConv2dGrads",
    "deform_kernel_conv2d",
    "deform_kernel_conv2d_backward",
    "DeformRoIPoolGrads",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "DeformPSRoIPoolGrads",
    "deform_psroi_pool",
    "deform_psroi_pool_backward",
    "testing",
]
