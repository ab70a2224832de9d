"""Drop-in torch modules."""

from mmfast.nn.contrastive import ClipLoss, SigLipLoss
from mmfast.nn.token_merger import TokenMerger
from mmfast.nn.window_attention import (
    SwinTransformerBlock,
    SwinTransformerV2Block,
    WindowAttention,
    WindowAttentionV2,
)

__all__ = ["ClipLoss", "SigLipLoss", "WindowAttention", "WindowAttentionV2", "SwinTransformerBlock",
           "SwinTransformerV2Block", "TokenMerger"]
