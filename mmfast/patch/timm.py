"""Patch built timm models in place to use mmfast's fused window attention, and revert.

The patches swap the class of each recognised block for a subclass whose attention runs the fused
kernel; parameters, buffers and the state_dict are untouched, so ``revert_*`` restores the model
exactly and checkpoints stay interchangeable with timm.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import functional as MF
from mmfast.nn.window_attention import attention_fusable, fused_window_attention_v1, fused_window_attention_v2
from mmfast.patch.classes import PatchedModule, is_patched, restore_class, swap_class

__all__ = ["apply_window_attention", "revert_window_attention", "apply_windowed_vit", "revert_windowed_vit",
           "swin_block_classes", "count_patched"]

FAMILY = "window"
_ATTRS = ("_mmfast_window", "_mmfast_grid", "_mmfast_shift", "_mmfast_prefix")


def swin_block_classes() -> tuple[type, type]:
    """timm's Swin v1 and v2 block classes (the ones :func:`apply_window_attention` patches)."""
    try:
        from timm.models import swin_transformer as v1
        from timm.models import swin_transformer_v2 as v2
    except ImportError as exc:  # pragma: no cover - timm is a test dependency
        raise ImportError("mmfast.patch.timm needs timm installed") from exc
    return v1.SwinTransformerBlock, v2.SwinTransformerV2Block


def count_patched(model: nn.Module) -> int:
    """How many modules of ``model`` carry a patch of this module (Swin or windowed-ViT)."""
    return sum(is_patched(m, FAMILY) for m in model.modules())


def _tracing() -> bool:
    """torch.jit.trace or FX symbolic tracing (torch.compile and torch.export keep the fused op)."""
    return torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


class _SwinBlock(PatchedModule):
    """A timm Swin block whose ``_attn`` (roll, pad, partition, attention, reverse, un-roll) is one
    fused op. TorchScript compiles timm's own ``_attn`` (kept on the class as ``_mmfast_timm_attn``)
    and FX / ``torch.jit.trace`` record it, as timm falls back from its fused attention when
    scripting: the fused op's Python dispatch is neither scriptable nor symbolically traceable."""

    family = FAMILY
    _mmfast_fused = None  # the fused function for this block version (a staticmethod)

    @classmethod
    def _mmfast_namespace(cls, orig: type) -> dict:
        # timm's function under its own name: TorchScript names a compiled method after the function
        timm_attn = orig._attn
        alias = types.FunctionType(timm_attn.__code__, timm_attn.__globals__, "_mmfast_timm_attn",
                                   timm_attn.__defaults__, timm_attn.__closure__)
        alias.__qualname__ = f"{orig.__qualname__}._mmfast_timm_attn"
        alias.__annotations__ = dict(timm_attn.__annotations__)
        return {"_mmfast_timm_attn": alias}

    def _attn(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._mmfast_timm_attn(x)
        return self._mmfast_fused_attn(x)

    @torch.jit.unused
    def _mmfast_fused_attn(self, x: Tensor) -> Tensor:
        if _tracing() or not attention_fusable(self.attn):  # attention dropout while training: timm's path
            return super()._attn(x)
        return self._mmfast_fused(self.attn, x, self.window_size, self.shift_size)


class _SwinV1Block(_SwinBlock):
    _mmfast_fused = staticmethod(fused_window_attention_v1)


class _SwinV2Block(_SwinBlock):
    _mmfast_fused = staticmethod(fused_window_attention_v2)


def apply_window_attention(model: nn.Module) -> nn.Module:
    """Swap every timm Swin v1/v2 block of ``model`` (in place) to the fused window attention.

    Returns the model. Raises TypeError when the model has no timm Swin block. Blocks whose
    attention uses dropout run timm's path while training (with a warning at patch time).
    """
    v1, v2 = swin_block_classes()
    mixins = {v1: _SwinV1Block, v2: _SwinV2Block}
    n = 0
    for m in model.modules():
        mixin = mixins.get(type(m))
        if mixin is not None:
            if getattr(m.attn, "attn_drop", None) is not None and m.attn.attn_drop.p > 0:
                warnings.warn("a Swin block uses attention dropout: it runs timm's unfused path while training",
                              stacklevel=2)
            swap_class(m, mixin)
            n += 1
    if n == 0 and not count_patched(model):
        raise TypeError(f"apply_window_attention: {type(model).__name__} has no timm SwinTransformerBlock or "
                        "SwinTransformerV2Block")
    return model


def _revert(model: nn.Module) -> int:
    return sum(restore_class(m, FAMILY, _ATTRS) for m in model.modules())


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


class _WindowedBlock(PatchedModule):
    """A timm ViT ``Block`` whose attention runs inside windows of the token grid (ViTDet)."""

    family = FAMILY

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("windowed blocks take no attn_mask / is_causal")
        y = _windowed_attention(self.attn, self.norm1(x), self._mmfast_grid, self._mmfast_prefix, self._mmfast_window)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _ShiftedWindowViT(PatchedModule):
    """A timm ``VisionTransformer`` that also runs on the token grid rolled by half a window (DITO)."""

    family = FAMILY

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
        swap_class(blk, _WindowedBlock)
        blk._mmfast_grid, blk._mmfast_prefix, blk._mmfast_window = grid, model.num_prefix_tokens, window
    if shift:
        swap_class(model, _ShiftedWindowViT)
        model._mmfast_grid = grid
        model._mmfast_shift = (window[0] // 2, window[1] // 2)
    return model


def revert_windowed_vit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_windowed_vit` in place."""
    _revert(model)
    return model
