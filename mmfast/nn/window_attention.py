"""Window attention modules, state_dict-compatible with timm's Swin v1/v2 blocks.

Every module runs the fused op (:func:`mmfast.functional.window_attention`) on the spatial layout:
the qkv projection is applied to the unpadded map, padded tokens get the qkv bias through
``pad_value`` (exactly what timm computes by padding before the projection), and roll, pad,
partition, bias lookup, shift mask, softmax and the reverse all happen inside the kernel.

Attention dropout is not fused: ``forward_spatial`` raises while training with ``attn_drop > 0``
(Swin's default is 0); the windowed ``WindowAttention.forward(x, mask)`` keeps timm's explicit
path, dropout included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import functional as MF
from mmfast.reference import window_attention as ref

__all__ = ["WindowAttention", "WindowAttentionV2", "SwinTransformerBlock", "SwinTransformerV2Block",
           "fused_window_attention_v1", "fused_window_attention_v2", "attention_fusable"]


# ----------------------------------------------------------------------------------------------
# the fused attention of one block, shared by mmfast's modules and the timm patch


def _heads_dims(attn: nn.Module) -> tuple[int, int]:
    heads = attn.num_heads
    return heads, attn.qkv.weight.shape[0] // 3 // heads


def fused_window_attention_v1(attn: nn.Module, x: Tensor, window_size, shift_size, order: str = "roll_pad") -> Tensor:
    """timm v1 ``WindowAttention`` (qkv, proj, relative_position_bias_table, scale) on x [B, H, W, C]."""
    b, h, w, _ = x.shape
    heads, hd = _heads_dims(attn)
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, h, w, 3, heads, hd)
    q, k, v = qkv.unbind(3)
    pad = attn.qkv.bias.view(3, heads, hd) if attn.qkv.bias is not None else None
    out = MF.window_attention(q, k, v, window_size=window_size, shift_size=shift_size,
                              rel_pos_bias=attn.relative_position_bias_table, scale=attn.scale, pad_value=pad,
                              order=order)
    return attn.proj_drop(attn.proj(out.reshape(b, h, w, heads * hd)))


def _v2_qkv_bias(attn: nn.Module) -> Tensor | None:
    if attn.q_bias is None:
        return None
    return torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))


def _v2_table(attn: nn.Module) -> Tensor:
    heads = attn.num_heads
    return 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, heads))


def fused_window_attention_v2(attn: nn.Module, x: Tensor, window_size, shift_size, order: str = "roll_pad") -> Tensor:
    """timm v2 ``WindowAttention`` (cosine attention, clamped logit_scale, CPB MLP) on x [B, H, W, C]."""
    b, h, w, _ = x.shape
    heads, hd = _heads_dims(attn)
    bias = _v2_qkv_bias(attn)
    qkv = F.linear(x, attn.qkv.weight, bias).view(b, h, w, 3, heads, hd)
    q, k, v = qkv.unbind(3)
    logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().view(heads)
    out = MF.window_attention(q, k, v, window_size=window_size, shift_size=shift_size, rel_pos_bias=_v2_table(attn),
                              logit_scale=logit_scale, pad_value=bias.view(3, heads, hd) if bias is not None else None,
                              order=order)
    return attn.proj_drop(attn.proj(out.reshape(b, h, w, heads * hd)))


def attention_fusable(attn: nn.Module) -> bool:
    """Whether the fused kernel can run ``attn`` now: not while training with attention dropout."""
    return not (attn.training and attn.attn_drop.p > 0)


def _check_fusable(attn: nn.Module) -> None:
    if not attention_fusable(attn):
        raise RuntimeError(f"attention dropout (attn_drop={attn.attn_drop.p}) is not supported by the fused "
                           "window-attention kernel; set attn_drop=0 or call .eval()")


# ----------------------------------------------------------------------------------------------
# modules


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias (timm-compatible names).

    ``forward(x [B*nW, N, C], mask=None)`` keeps timm's windowed interface; ``forward_spatial(x [B, H,
    W, C], shift_size)`` is the fused spatial path the blocks use.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, window_size=7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) when head_dim is not given")
        self.dim = dim
        self.window_size = ref.pair(window_size, "window_size")
        self.window_area = self.window_size[0] * self.window_size[1]
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", ref.relative_position_index(self.window_size),
                             persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b_, n, c = x.shape
        if n != self.window_area:
            raise ValueError(f"x must be [B*nW, {self.window_area}, C] for window {self.window_size}, "
                             f"got {tuple(x.shape)}")
        if mask is None and attention_fusable(self):
            # each window is a (Wh, Ww) map with exactly one window: no shift, no padding
            out = fused_window_attention_v1(self, x.view(b_, *self.window_size, c), self.window_size, 0)
            return out.reshape(b_, n, c)
        return self._explicit(x, mask)

    def _explicit(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b_, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, heads)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            if mask.dim() != 3 or mask.shape[1:] != (n, n) or b_ % mask.shape[0]:
                raise ValueError(f"mask must be [nW, {n}, {n}] with nW dividing {b_}, got {tuple(mask.shape)}")
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
        attn = self.attn_drop(attn.softmax(-1))
        out = (attn @ v).transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(out))

    def forward_spatial(self, x: Tensor, shift_size=0, order: str = "roll_pad") -> Tensor:
        """Fused shifted-window attention on x [B, H, W, C] -> [B, H, W, C]."""
        _check_fusable(self)
        return fused_window_attention_v1(self, x, self.window_size, shift_size, order)


class WindowAttentionV2(nn.Module):
    """Swin v2 window attention: cosine attention with a clamped per-head logit scale and the
    log-spaced continuous position bias (timm-compatible names)."""

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, pretrained_window_size=(0, 0)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.window_size = ref.pair(window_size, "window_size")
        self.pretrained_window_size = ref.pair(pretrained_window_size, "pretrained_window_size")
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("relative_coords_table",
                             ref.swinv2_coords_table(self.window_size, self.pretrained_window_size,
                                                     dtype=torch.float32, device="cpu"), persistent=False)
        self.register_buffer("relative_position_index", ref.relative_position_index(self.window_size),
                             persistent=False)

    def forward_spatial(self, x: Tensor, shift_size=0, order: str = "roll_pad") -> Tensor:
        """Fused shifted-window cosine attention on x [B, H, W, C] -> [B, H, W, C]."""
        _check_fusable(self)
        return fused_window_attention_v2(self, x, self.window_size, shift_size, order)


class _Mlp(nn.Module):
    """timm's Mlp parameter layout (fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class _SwinBlockBase(nn.Module):
    """What the v1 and v2 blocks share: the window geometry and the residual forward.

    ``post_norm`` places each branch's norm: v1 normalises the branch input (pre-norm), v2 the branch
    output (post-norm, res-post-norm in the Swin v2 paper).
    """

    post_norm = False

    def _setup_window(self, input_resolution, window_size, shift_size, always_partition):
        if input_resolution is None:
            raise ValueError("input_resolution is required (the feature map size, as in timm)")
        self.input_resolution = ref.pair(input_resolution, "input_resolution")
        self.target_shift_size = ref.pair(shift_size, "shift_size")
        self.always_partition = always_partition
        self.window_size, self.shift_size = ref.effective_window(
            self.input_resolution, ref.pair(window_size, "window_size"), self.target_shift_size,
            always_partition=always_partition)
        self.window_area = self.window_size[0] * self.window_size[1]

    def _attn(self, x: Tensor) -> Tensor:
        return self.attn.forward_spatial(x, self.shift_size)

    def _branch(self, f: Callable[[Tensor], Tensor], norm: nn.Module, x: Tensor) -> Tensor:
        return norm(f(x)) if self.post_norm else f(norm(x))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be channels-last [B, H, W, {self.dim}], got {tuple(x.shape)}")
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._branch(self._attn, self.norm1, x))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self._branch(self.mlp, self.norm2, x))
        return x.reshape(b, h, w, c)


class SwinTransformerBlock(_SwinBlockBase):
    """Swin v1 block with timm's constructor and state_dict; ``forward(x [B, H, W, C])``."""

    def __init__(self, dim: int, input_resolution, num_heads: int = 4, head_dim: int | None = None, window_size=7,
                 shift_size=0, always_partition: bool = False, dynamic_mask: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.dynamic_mask = dynamic_mask
        self._setup_window(input_resolution, window_size, shift_size, always_partition)
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, head_dim=head_dim, window_size=self.window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = _DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.drop_path2 = _DropPath(drop_path) if drop_path > 0 else nn.Identity()


class SwinTransformerV2Block(_SwinBlockBase):
    """Swin v2 block (post-norm, cosine attention, CPB) with timm's constructor and state_dict."""

    post_norm = True

    def __init__(self, dim: int, input_resolution, num_heads: int, window_size=7, shift_size=0,
                 always_partition: bool = False, dynamic_mask: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, pretrained_window_size=0):
        super().__init__()
        self.dim = dim
        self.dynamic_mask = dynamic_mask
        self._setup_window(input_resolution, window_size, shift_size, always_partition)
        self.mlp_ratio = mlp_ratio
        self.attn = WindowAttentionV2(dim, window_size=self.window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                      attn_drop=attn_drop, proj_drop=proj_drop,
                                      pretrained_window_size=ref.pair(pretrained_window_size, "pretrained_window_size"))
        self.norm1 = norm_layer(dim)
        self.drop_path1 = _DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.norm2 = norm_layer(dim)
        self.drop_path2 = _DropPath(drop_path) if drop_path > 0 else nn.Identity()
