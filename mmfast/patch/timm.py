"""Patch built timm models in place to use mmfast's fused window attention, and revert.

The patches swap the class of each recognised block for a subclass whose attention runs the fused
kernel; parameters, buffers and the state_dict are untouched, so ``revert_*`` restores the model
exactly and checkpoints stay interchangeable with timm.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import functional as MF
from mmfast.nn.window_attention import _fusable, fused_window_attention_v1, fused_window_attention_v2

__all__ = ["apply_window_attention", "revert_window_attention", "apply_windowed_vit", "revert_windowed_vit"]

_PATCHED: dict[type, type] = {}


def _patched_class(cls: type, make) -> type:
    if cls not in _PATCHED:
        sub = make(cls)
        sub.__name__ = sub.__qualname__ = "MMFast" + cls.__name__
        sub._mmfast_original = cls
        _PATCHED[cls] = sub
    return _PATCHED[cls]


def _swin_classes():
    try:
        from timm.models import swin_transformer as v1
        from timm.models import swin_transformer_v2 as v2
    except ImportError as exc:  # pragma: no cover - timm is a test dependency
        raise ImportError("mmfast.patch.timm needs timm installed") from exc
    return {v1.SwinTransformerBlock: fused_window_attention_v1, v2.SwinTransformerV2Block: fused_window_attention_v2}


def _make_swin(fused):
    def make(cls):
        class Fused(cls):
            def _attn(self, x: Tensor) -> Tensor:
                if not _fusable(self.attn):  # attention dropout while training: timm's own path
                    return cls._attn(self, x)
                return fused(self.attn, x, self.window_size, self.shift_size)

        return Fused

    return make


def apply_window_attention(model: nn.Module) -> nn.Module:
    """Swap every timm Swin v1/v2 block of ``model`` (in place) to the fused window attention.

    Returns the model. Raises TypeError when the model has no timm Swin block. Blocks whose
    attention uses dropout run timm's path while training (with a warning at patch time).
    """
    classes = _swin_classes()
    n = 0
    for m in model.modules():
        for cls, fused in classes.items():
            if type(m) is cls:
                if getattr(m.attn, "attn_drop", None) is not None and m.attn.attn_drop.p > 0:
                    warnings.warn("a Swin block uses attention dropout: it runs timm's unfused path while training",
                                  stacklevel=2)
                m.__class__ = _patched_class(cls, _make_swin(fused))
                n += 1
    if n == 0 and not any(type(m) in _PATCHED.values() for m in model.modules()):
        raise TypeError(f"apply_window_attention: {type(model).__name__} has no timm SwinTransformerBlock or "
                        "SwinTransformerV2Block")
    return model


def _revert(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        orig = getattr(type(m), "_mmfast_original", None)
        if orig is not None and type(m) is _PATCHED.get(orig):
            m.__class__ = orig
            for attr in ("_mmfast_window", "_mmfast_grid", "_mmfast_shift"):
                if attr in m.__dict__:
                    delattr(m, attr)
            n += 1
    return n


def revert_window_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_window_attention` (and :func:`apply_windowed_vit`) in place."""
    _revert(model)
    return model


# ----------------------------------------------------------------------------------------------
# windowed ViT (ViTDet-style window blocks + global blocks, DITO shifted-window learning)


def _windowed_attention(attn: nn.Module, x: Tensor, grid: tuple[int, int], prefix: int, window) -> Tensor:
    """timm ``Attention`` with patch tokens attending inside windows of the token grid.

    Patch tokens are padded to whole windows (padded tokens carry the qkv bias after q/k norm, as
    in ViTDet, where the block input is padded after norm1) and attend only inside their window;
    prefix tokens (class, register) attend to every token.
    """
    b, n, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    h, w = grid
    qkv = attn.qkv(x).view(b, n, 3, heads, hd)
    q, k, v = qkv.unbind(2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pad = None
    if attn.qkv.bias is not None:
        qb, kb, vb = attn.qkv.bias.view(3, heads, hd).unbind(0)
        pad = torch.stack([attn.q_norm(qb), attn.k_norm(kb), vb])
    gq, gk, gv = (t[:, prefix:].reshape(b, h, w, heads, hd) for t in (q, k, v))
    out_grid = MF.window_attention(gq, gk, gv, window_size=window, shift_size=0, scale=attn.scale, pad_value=pad)
    out = out_grid.reshape(b, h * w, heads * hd)
    if prefix:
        pq = q[:, :prefix].transpose(1, 2)
        pref = F.scaled_dot_product_attention(pq, k.transpose(1, 2), v.transpose(1, 2), scale=attn.scale)
        out = torch.cat([pref.transpose(1, 2).reshape(b, prefix, heads * hd), out], 1)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _make_window_block(cls):
    class Windowed(cls):
        def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if attn_mask is not None or is_causal:
                raise ValueError("windowed blocks take no attn_mask / is_causal")
            y = _windowed_attention(self.attn, self.norm1(x), self._mmfast_grid, self._mmfast_prefix,
                                    self._mmfast_window)
            x = x + self.drop_path1(self.ls1(y))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    return Windowed


def _make_shift_vit(cls):
    class ShiftedWindowViT(cls):
        def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if attn_mask is not None or is_causal:
                raise ValueError("a windowed ViT takes no attn_mask / is_causal")
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            p, (h, w), s = self.num_prefix_tokens, self._mmfast_grid, self._mmfast_shift
            b, _, c = x.shape
            grid = x[:, p:].reshape(b, h, w, c)
            rolled = torch.roll(grid, shifts=(-s[0], -s[1]), dims=(1, 2)).reshape(b, h * w, c)
            # both passes in one batch: every block (and kernel) runs once on 2B samples
            x = torch.cat([x, torch.cat([x[:, :p], rolled], 1)], 0)
            x = self.norm(self.blocks(x))
            plain, shifted = x[:b], x[b:]
            back = torch.roll(shifted[:, p:].reshape(b, h, w, c), shifts=s, dims=(1, 2)).reshape(b, h * w, c)
            return 0.5 * (plain + torch.cat([shifted[:, :p], back], 1))

    return ShiftedWindowViT


def apply_windowed_vit(model: nn.Module, window_size=14, global_blocks=(), shift: bool = False) -> nn.Module:
    """Turn a timm ``VisionTransformer`` into a ViTDet-style windowed backbone, in place.

    Blocks whose index is not in ``global_blocks`` attend inside ``window_size`` windows of the
    token grid (padding to whole windows). With ``shift=True`` (DITO's shifted-window learning)
    the backbone also runs on the token grid rolled by half a window, in the same batch, and the
    two outputs are un-rolled and averaged. Revert with :func:`revert_windowed_vit`.
    """
    try:
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as exc:  # pragma: no cover
        raise ImportError("apply_windowed_vit needs timm installed") from exc
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"apply_windowed_vit expects a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model.patch_embed, "dynamic_img_size", False):
        raise ValueError("apply_windowed_vit: dynamic_img_size models are not supported (the grid must be fixed)")
    window = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
    if len(window) != 2 or min(window) < 1:
        raise ValueError(f"window_size must be a positive int or pair, got {window_size!r}")
    depth = len(model.blocks)
    global_set = {int(i) % depth if -depth <= int(i) < depth else -1 for i in global_blocks}
    if -1 in global_set:
        raise ValueError(f"global_blocks must be block indices in [-{depth}, {depth}), got {list(global_blocks)}")
    grid = tuple(model.patch_embed.grid_size)
    for i, blk in enumerate(model.blocks):
        if i in global_set:
            continue
        if type(blk) is not Block:
            raise TypeError(f"block {i} is {type(blk).__name__}; apply_windowed_vit supports timm Block only")
        blk.__class__ = _patched_class(Block, _make_window_block)
        blk._mmfast_grid, blk._mmfast_prefix, blk._mmfast_window = grid, model.num_prefix_tokens, window
    if shift:
        model.__class__ = _patched_class(type(model), _make_shift_vit)
        model._mmfast_grid = grid
        model._mmfast_shift = (window[0] // 2, window[1] // 2)
    return model


def revert_windowed_vit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_windowed_vit` in place."""
    _revert(model)
    for attr in ("_mmfast_grid", "_mmfast_prefix", "_mmfast_window", "_mmfast_shift"):
        for m in model.modules():
            if attr in m.__dict__:
                delattr(m, attr)
    return model
