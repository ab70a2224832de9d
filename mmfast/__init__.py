"""mmfast: fused CUDA/C++ and Triton kernels for image-text pretraining.

Import is cheap and never fails for a missing extension or GPU: see ``mmfast.backends()`` and
``python -m mmfast.info``.
"""

import importlib

from mmfast import _ext, functional, tome
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

# Subpackages that the imports above do not load (or load only as a side effect) load on first access.
_LAZY = ("patch", "distributed", "reference", "bench", "train", "integrations", "info", "testing")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "triton" and _ext.ensure_triton_package() is None:
        return importlib.import_module(f"{__name__}.triton")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
