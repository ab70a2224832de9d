"""The attention-op baselines of the ``window`` case: timm's steps, flash-attn and FlexAttention written out
in plain torch (no timm needed: they run on an offline GPU box too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# attention op baselines (plain torch, no timm needed: they run on an offline GPU box too)


def window_geometry(h: int, w: int, window: tuple[int, int]) -> tuple[int, int, int, int]:
    """(pad_h, pad_w, nW, N) of an ``h x w`` map cut into ``window`` windows (padding bottom/right)."""
    wh, ww = window
    pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
    return pad_h, pad_w, ((h + pad_h) // wh) * ((w + pad_w) // ww), wh * ww


def _to_windows(qkv: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """timm's roll + pad + ``window_partition`` of the qkv map: ``[B, H, W, 3, h, d] -> [B, nW, N, 3, h, d]``."""
    b, h, w = qkv.shape[:3]
    rest = qkv.shape[3:]
    wh, ww = window
    if any(shift):
        qkv = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h, pad_w, nw, n = window_geometry(h, w, window)
    x = qkv.reshape(b, h, w, -1)
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // wh, wh, wp // ww, ww, x.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nw, n, *rest)


def _from_windows(out: torch.Tensor, hw: tuple[int, int], window: tuple[int, int],
                  shift: tuple[int, int]) -> torch.Tensor:
    """timm's ``window_reverse`` + crop + roll back: ``[B, nW, N, h, d] -> [B, H, W, h, d]``."""
    b, _, _, heads, hd = out.shape
    h, w = hw
    wh, ww = window
    pad_h, pad_w, _, _ = window_geometry(h, w, window)
    hp, wp = h + pad_h, w + pad_w
    x = out.reshape(b, hp // wh, wp // ww, wh, ww, heads * hd).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, heads, hd)[:, :h, :w]
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x


def window_buffers(hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], dtype: torch.dtype,
                   device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What timm keeps as buffers: ``relative_position_index`` ``[N * N]`` and ``attn_mask`` ``[nW, N, N]``."""
    from mmfast.reference import window_attention as ref

    index = ref.relative_position_index(window, device=device).view(-1)
    mask = None
    if any(shift):
        pad_h, pad_w, _, _ = window_geometry(*hw, window)
        mask = ref.shift_attn_mask((hw[0] + pad_h, hw[1] + pad_w), window, shift, -100.0, dtype=dtype,
                                   device=device)
    return index, mask


def timm_style_window_attention(qkv: torch.Tensor, table: torch.Tensor | None, window: tuple[int, int],
                                shift: tuple[int, int], scale: float, sdpa: bool = False,
                                buffers: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """timm's window attention steps on a qkv map ``[B, H, W, 3, heads, hd]`` -> ``[B, H, W, heads, hd]``.

    ``sdpa=False``: ``WindowAttention``'s explicit path; ``sdpa=True``: its SDPA path with the dense
    ``attn_mask`` (bias + shift mask expanded to ``[B * nW, heads, N, N]``). Padded tokens are zeros.
    ``buffers``: :func:`window_buffers` (made once, as timm's buffers are; computed here when None).
    """
    b, h, w, _, heads, hd = qkv.shape
    index, mask = buffers if buffers is not None else window_buffers((h, w), window, shift, qkv.dtype, qkv.device)
    win = _to_windows(qkv, window, shift)  # [B, nW, N, 3, heads, hd]
    nw, n = win.shape[1], win.shape[2]
    q, k, v = win.reshape(b * nw, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B*nW, heads, N, hd]
    bias = None
    if table is not None:  # timm's _get_rel_pos_bias()
        bias = table[index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    if sdpa:
        attn_mask = bias
        if mask is not None:
            full = mask.view(1, nw, 1, n, n).expand(b, -1, heads, -1, -1).reshape(-1, heads, n, n)
            attn_mask = full if attn_mask is None else attn_mask + full
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    else:
        attn = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        if mask is not None:
            attn = (attn.view(-1, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
        out = attn.softmax(dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, nw, n, heads, hd)
    return _from_windows(out, (h, w), window, shift)


def flash_unavailable_reason() -> str | None:
    """None when mmfast's ``flash_attn`` backend (the optional flash-attn package) can run here, else why not."""
    from mmfast.ops.registry import backend_unavailable_reason

    return backend_unavailable_reason("flash_attn")


def flash_config(cfg: dict[str, Any]) -> bool:
    """Whether flash-attn can run a configuration: the attention op, no bias, no shift (so no shift
    mask), fp16/bf16, head_dim a multiple of 8 up to 256 (the ViTDet/DITO shapes)."""
    hd = cfg.get("dim", 0) // max(cfg.get("heads", 1), 1)
    return (cfg["level"] == "attn" and not cfg.get("bias", True) and not cfg.get("shift", 0)
            and cfg["dtype"] in ("float16", "bfloat16") and 0 < hd <= 256 and hd % 8 == 0)


def flash_window_attention(qkv: torch.Tensor, window: tuple[int, int], shift: tuple[int, int],
                           scale: float) -> torch.Tensor:
    """Window attention with no bias and no mask as a user writes it with flash-attn, without mmfast:
    timm's roll + pad + partition of the qkv map ``[B, H, W, 3, heads, hd]`` (plain torch), one
    ``flash_attn.flash_attn_func`` on ``[B * nW, N, heads, hd]``, reverse + crop + roll back.
    Padded tokens are zeros (as in :func:`timm_style_window_attention`)."""
    import flash_attn

    b, h, w, _, heads, hd = qkv.shape
    win = _to_windows(qkv, window, shift)  # [B, nW, N, 3, heads, hd]
    nw, n = win.shape[1], win.shape[2]
    q, k, v = win.reshape(b * nw, n, 3, heads, hd).unbind(2)  # [B*nW, N, heads, hd]
    out = flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)
    if isinstance(out, tuple):
        out = out[0]
    return _from_windows(out.reshape(b, nw, n, heads, hd), (h, w), window, shift)


def flex_window_attention(hw: tuple[int, int], heads: int, window: tuple[int, int], shift: tuple[int, int],
                          scale: float, has_bias: bool, device: str) -> Callable[..., torch.Tensor]:
    """A compiled ``fn(qkv, table) -> out`` doing the window attention with FlexAttention (module docstring)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.device(device)
    _, _, nw, n = window_geometry(*hw, window)
    length = nw * n
    block_mask = create_block_mask(lambda b, h, q, k: q // n == k // n, None, None, length, length, device=dev)
    index, mask = window_buffers(hw, window, shift, torch.float32, dev)

    def attend(qkv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, _, _, _, _, hd = qkv.shape
        win = _to_windows(qkv, window, shift)  # [B, nW, N, 3, heads, hd]
        q, k, v = win.reshape(b, length, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, L, hd]

        def score_mod(score, bb, hh, qi, ki):
            iq, ik = qi % n, ki % n
            if bias is not None:
                score = score + bias[hh, iq, ik]
            if mask is not None:
                score = score + mask[qi // n, iq, ik]
            return score

        mod = score_mod if (bias is not None or mask is not None) else None
        out = flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale)
        return _from_windows(out.transpose(1, 2).reshape(b, nw, n, heads, hd), hw, window, shift)

    compiled = torch.compile(attend, dynamic=False)

    def run(qkv: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
        # the bias [heads, N, N] is gathered outside the compiled region and passed in as a graph input
        # (Inductor's CPU FlexAttention rejects buffers computed inside the graph in the score_mod)
        bias = table[index].view(n, n, heads).permute(2, 0, 1).contiguous() if has_bias and table is not None else None
        return compiled(qkv, bias)

    return run
