"""cudeform: deformable operators for NumPy, CuPy, PyTorch and JAX arrays.

Every op has a forward function and a backward function that returns a named tuple of
gradients. Arrays run where they live: NumPy on the CPU (Numba), CuPy and CUDA tensors on
the GPU (CUDA kernels compiled at run time by NVRTC).
"""

from .deform_conv import DeformConv2dGrads, deform_conv2d, deform_conv2d_backward
from . import testing

__version__ = "0.1.0"

__all__ = [
    "DeformConv2dGrads",
    "deform_conv2d",
    "deform_conv2d_backward",
    "testing",
]
