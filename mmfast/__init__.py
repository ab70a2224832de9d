"""mmfast: fused CUDA/C++ and Triton kernels for image-text pretraining."""

from mmfast._ext import backends
from mmfast._version import __version__

__all__ = ["__version__", "backends"]
