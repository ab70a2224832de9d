"""mmfast: fused CUDA/C++ and Triton kernels for image-text pretraining.

Import is cheap and never fails for a missing extension or GPU: see ``mmfast.backends()`` and
``python -m mmfast.info``.
"""

from mmfast import functional, tome
from mmfast._ext import backends
from mmfast._version import __version__
from mmfast.nn import (
    ClipLoss,
    SigLipLoss,
    SwinTransformerBlock,
    SwinTransformerV2Block,
    TokenMerger,
    WindowAttention,
    WindowAttentionV2,
)
from mmfast.ops import use_backend

__all__ = ["__version__", "backends", "functional", "tome", "use_backend", "ClipLoss", "SigLipLoss", "WindowAttention",
           "WindowAttentionV2", "SwinTransformerBlock", "SwinTransformerV2Block", "TokenMerger"]
