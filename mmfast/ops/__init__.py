"""torch.library custom ops (fake + autograd registration) and device dispatch.

Importing this package registers every op (``torch.ops.mmfast.*``)."""

from mmfast.ops import contrastive, contrastive_loss, tome, window_attention, window_process  # noqa: F401
from mmfast.ops.registry import BACKENDS, use_backend

__all__ = ["BACKENDS", "use_backend"]
