"""``siglip``: open_clip ``SigLipLoss`` against ``mmfast.SigLipLoss``, forward + backward, one rank.

Same shapes, options and outputs as ``contrastive`` (see :mod:`mmfast.bench.cases.contrastive`), with
a trainable ``logit_bias`` (-10) besides ``logit_scale``; gradients are taken with respect to the
features, the scale and the bias.
"""

from __future__ import annotations

from mmfast.bench.cases import register_case
from mmfast.bench.cases.contrastive import LossCase

__all__ = ["SigLipCase"]


@register_case
class SigLipCase(LossCase):
    """open_clip ``SigLipLoss`` vs ``mmfast.SigLipLoss``, forward + backward, W=1."""

    name = "siglip"
    description = "open_clip SigLipLoss vs mmfast.SigLipLoss, forward+backward (time, peak memory)"
    open_clip_attr = "SigLipLoss"
    mmfast_attr = "SigLipLoss"
    with_bias = True
