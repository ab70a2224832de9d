"""Integrations of mmfast into other projects' training code.

* :mod:`mmfast.integrations.open_clip_train`: run open_clip's own trainer (``open_clip_train``) with
  mmfast's ClipLoss / SigLipLoss, ToMe token merging and fused Swin window attention
  (``python -m mmfast.integrations.open_clip_train ...`` / ``mmfast-open-clip-train``), and
  :func:`~mmfast.integrations.open_clip_train.patch_loss_factory` for forks of that trainer.

Importing this package imports nothing else; each integration imports its host library lazily.
"""

__all__ = ["open_clip_train"]
