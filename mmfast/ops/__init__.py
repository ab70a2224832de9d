"""torch.library custom ops (fake + autograd registration) and device dispatch."""

from mmfast.ops.registry import BACKENDS, use_backend

__all__ = ["BACKENDS", "use_backend"]
