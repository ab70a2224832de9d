"""The small CLIP of the reference trainer: a windowed ViT with ToMe, a text transformer, a logit scale.

Image tower (DITO-style ViT on a ``G x G`` patch grid, ``G = image_size // patch_size``):

* patch embedding (a strided conv) plus a learned absolute position embedding, kept as a
  ``[B, G, G, C]`` map;
* ``depth - global_blocks`` window blocks: multi-head self-attention inside ``window x window``
  windows with a learned relative-position-bias table per block; every second block is *shifted*
  (the op rolls the grid by half a window, ``shift_size=(w // 2, w // 2)``, and masks the wrapped
  regions) unless ``shift=False``;
* ``global_blocks`` global blocks on the flattened tokens, each with ToMe token merging after its
  attention (``bipartite_soft_matching`` on the mean key over heads, then ``merge_wavg``), and
  proportional attention (``log(size)`` added to the logits of every key) once tokens carry sizes.
  Merging destroys the grid, so it only happens after the windowed part;
* size-weighted mean pooling (the mean over the original patches), LayerNorm, linear projection.

Text tower: token + position embeddings, pre-LN transformer blocks (causal by default, or
bidirectional with a key-padding mask), the feature at the EOS token, LayerNorm, projection.

The three accelerated ops are reached ONLY through :data:`FUSED_OPS` (``mmfast.functional``) or
:data:`REFERENCE_OPS` (``mmfast.reference``, the ``--baseline`` of the trainer), both bound here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmfast.functional
from mmfast.reference import tome as _ref_tome
from mmfast.reference import window_attention as _ref_window

__all__ = [
    "CLIP",
    "FUSED_OPS",
    "Ops",
    "REFERENCE_OPS",
    "TextTransformer",
    "VisionTransformer",
    "fused_ops_status",
]


@dataclass(frozen=True)
class Ops:
    """The window-attention and token-merging ops a model calls (fused or reference)."""

    name: str
    window_attention: Callable[..., Tensor]
    bipartite_soft_matching: Callable[..., tuple[Callable[..., Tensor], Callable[..., Tensor]]]
    merge_wavg: Callable[..., tuple[Tensor, Tensor]]


def fused_ops_status(device_type: str = "cpu") -> dict[str, str]:
    """The backend each fused op runs on ``device_type`` tensors (see ``python -m mmfast.info``)."""
    from mmfast.ops import registry

    names = {"window_attention": "window_attention", "bipartite_soft_matching": "tome_match",
             "merge_wavg": "tome_merge_wavg", "clip/siglip loss": "contrastive_softmax"}
    return {k: registry.get(v).auto_backend(device_type) for k, v in names.items()}


#: The mmfast ops (fused kernels behind ``mmfast.functional``).
FUSED_OPS = Ops("mmfast", mmfast.functional.window_attention, mmfast.functional.bipartite_soft_matching,
                mmfast.functional.merge_wavg)
#: The pure-torch oracles of ``mmfast.reference`` (``--baseline``).
REFERENCE_OPS = Ops("reference", _ref_window.window_attention, _ref_tome.bipartite_soft_matching,
                    _ref_tome.merge_wavg)


class Mlp(nn.Sequential):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class WindowBlock(nn.Module):
    """Pre-LN block with (shifted-)window attention on a ``[B, H, W, C]`` map."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, ops: Ops):
        super().__init__()
        self.heads, self.ops = heads, ops
        self.window, self.shift = (window, window), (shift, shift)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.rel_pos_bias, std=0.02)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, H, W, C]`` -> same shape."""
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, h, w, 3, self.heads, c // self.heads)
        q, k, v = qkv.unbind(3)
        out = self.ops.window_attention(q, k, v, window_size=self.window, shift_size=self.shift,
                                        rel_pos_bias=self.rel_pos_bias)
        x = x + self.proj(out.reshape(b, h, w, c))
        return x + self.mlp(self.norm2(x))


class GlobalBlock(nn.Module):
    """Pre-LN block with global attention, proportional attention and ToMe merging of ``r`` tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, r: int, ops: Ops):
        super().__init__()
        self.heads, self.r, self.ops = heads, r, ops
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x``: ``[B, N, C]``, ``size``: ``[B, N, 1]`` or None (all ones) -> merged ``x`` and ``size``."""
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # proportional attention: a token standing for s patches counts s times as a key
        bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, c))
        if self.r > 0:
            merge, _ = self.ops.bipartite_soft_matching(k.mean(dim=1), self.r, class_token=False)
            x, size = self.ops.merge_wavg(merge, x, size)
        return x + self.mlp(self.norm2(x)), size


class VisionTransformer(nn.Module):
    """The image tower (module docstring). ``images`` ``[B, 3, S, S]`` -> features ``[B, embed_dim]``."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, window_size: int, shift: bool, global_blocks: int, tome_r: int,
                 embed_dim: int, ops: Ops):
        super().__init__()
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(self.grid, self.grid, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        n_window = depth - global_blocks
        self.window_blocks = nn.ModuleList(
            WindowBlock(width, heads, window_size, window_size // 2 if shift and i % 2 == 1 else 0, mlp_ratio, ops)
            for i in range(n_window))
        self.global_blocks = nn.ModuleList(GlobalBlock(width, heads, mlp_ratio, tome_r, ops)
                                           for _ in range(global_blocks))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        """``images``: ``[B, 3, S, S]`` -> ``[B, embed_dim]`` (not normalised)."""
        x = self.patch_embed(images).permute(0, 2, 3, 1) + self.pos_embed  # [B, G, G, C]
        for blk in self.window_blocks:
            x = blk(x)
        x = x.flatten(1, 2)  # [B, N, C]
        size = None
        for blk in self.global_blocks:
            x, size = blk(x, size)
        pooled = x.mean(dim=1) if size is None else (x * size).sum(dim=1) / size.sum(dim=1)
        return self.proj(self.norm(pooled))


class TextBlock(nn.Module):
    """Pre-LN transformer block with a boolean attention mask (True = may attend)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: ``[B, L, C]``; ``mask``: bool, broadcastable to ``[B, heads, L, L]``."""
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """The text tower. ``tokens`` ``[B, L]`` (``pad_id`` padded, one ``eos_id`` per row) -> ``[B, embed_dim]``."""

    def __init__(self, *, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, embed_dim: int, causal: bool, pad_id: int, eos_id: int):
        super().__init__()
        self.causal, self.pad_id, self.eos_id = causal, pad_id, eos_id
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        nn.init.normal_(self.pos_embed, std=0.01)
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens``: ``[B, L]`` int64 -> ``[B, embed_dim]`` (not normalised)."""
        b, n = tokens.shape
        x = self.token_embed(tokens) + self.pos_embed[:n]
        if self.causal:
            # the EOS feature only sees tokens before it: padding after EOS never matters
            mask = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        else:
            mask = (tokens != self.pad_id)[:, None, None, :]  # [B, 1, 1, L]: no attention to padding
        for blk in self.blocks:
            x = blk(x, mask)
        eos = (tokens == self.eos_id).int().argmax(dim=1)  # first EOS of each row
        return self.proj(self.norm(x[torch.arange(b, device=x.device), eos]))


class CLIP(nn.Module):
    """Image tower + text tower + learnable ``logit_scale`` (log space) and, for SigLIP, ``logit_bias``."""

    def __init__(self, *, vision: dict, text: dict, embed_dim: int, loss: str, ops: Ops):
        super().__init__()
        self.visual = VisionTransformer(**vision, embed_dim=embed_dim, ops=ops)
        self.text = TextTransformer(**text, embed_dim=embed_dim)
        siglip = loss == "siglip"
        # SigLIP paper: t' = log 10, b = -10; CLIP: t = 1 / 0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image features ``[B, embed_dim]``."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """L2-normalised text features ``[B, embed_dim]``."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(image_features, text_features, logit_scale.exp(), logit_bias)`` as the losses take them."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp(), self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Keep ``exp(logit_scale)`` in ``[1, max_scale]`` (open_clip clamps after every step)."""
        self.logit_scale.clamp_(0.0, math.log(max_scale))


def build_model(cfg, vocab_size: int, context_length: int, pad_id: int, eos_id: int, ops: Ops) -> CLIP:
    """The :class:`CLIP` described by a :class:`mmfast.train.config.TrainConfig`."""
    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth,
                  heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, window_size=cfg.window_size, shift=cfg.shift,
                  global_blocks=cfg.global_blocks, tome_r=cfg.tome_r)
    text = dict(vocab_size=vocab_size, context_length=context_length, width=cfg.text_width, depth=cfg.text_depth,
                heads=cfg.text_heads, mlp_ratio=cfg.mlp_ratio, causal=not cfg.text_bidirectional, pad_id=pad_id,
                eos_id=eos_id)
    return CLIP(vision=vision, text=text, embed_dim=cfg.embed_dim, loss=cfg.loss, ops=ops)
