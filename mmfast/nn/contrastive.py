"""Drop-in replacements for open_clip.loss.ClipLoss and SigLipLoss."""

from __future__ import annotations

from torch import Tensor, nn

from mmfast import functional as F


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``: same constructor, forward and return value, the
    same loss and gradients on every rank, with tiled kernels and a grouped all-gather.

    Extra keywords: ``group`` (process group, None = WORLD), ``group_size`` (ranks per all-gather
    group; None = ranks per node), ``exchange`` ("auto", "gather" or "ring": see
    :func:`mmfast.functional.clip_loss`), ``impl`` (backend: "auto", "cpp", "triton", "reference").
    ``cache_labels`` is accepted and has nothing to cache (labels are never materialised).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, group=None,
                 group_size: int | None = None, exchange: str = "auto", impl: str = "auto"):
        super().__init__()
        F.check_exchange(exchange)
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by mmfast.ClipLoss; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.group = group
        self.group_size = group_size
        self.exchange = exchange
        self.impl = impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None, output_dict: bool = False, *, labels: Tensor | None = None):
        """``labels``: None (open_clip's loss) or [B] int64, every pair of equal labels a positive
        (see :func:`mmfast.functional.clip_loss`)."""
        return F.clip_loss(image_features, text_features, logit_scale, logit_bias, local_loss=self.local_loss,
                           gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size,
                           group=self.group, group_size=self.group_size, exchange=self.exchange,
                           impl=self.impl, output_dict=output_dict, labels=labels)


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss`` (every ``dist_impl`` gives open_clip's numbers)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, *, group=None, group_size: int | None = None,
                 exchange: str = "auto", impl: str = "auto"):
        super().__init__()
        F.check_exchange(exchange)
        if dist_impl is not None and dist_impl not in F.SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {F.SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        self.group = group
        self.group_size = group_size
        self.exchange = exchange
        self.impl = impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None, output_dict: bool = False, *, labels: Tensor | None = None):
        """``labels``: None (open_clip's loss) or [B] int64, target +1 for every pair of equal labels
        (see :func:`mmfast.functional.siglip_loss`)."""
        return F.siglip_loss(image_features, text_features, logit_scale, logit_bias, rank=self.rank,
                             world_size=self.world_size, dist_impl=self.dist_impl, group=self.group,
                             group_size=self.group_size, exchange=self.exchange, impl=self.impl,
                             output_dict=output_dict, labels=labels)
