"""Pure-torch reference of windowed / shifted-window attention (Swin v1 and v2) on the spatial layout.

This is the oracle the fused kernels are tested against: one op that does the cyclic shift (roll),
the bottom/right padding, the window partition, the relative-position-bias lookup, the shifted-window
region mask, the softmax, the PV product and the reverse (merge, crop, un-roll). It is written to be
obviously correct, not fast.

Semantics of timm 1.0.31 (``timm.models.swin_transformer`` and ``swin_transformer_v2``), which the
default ``order="roll_pad"`` reproduces exactly:

* ``SwinTransformerBlock._attn`` rolls the *unpadded* ``[B, H, W, C]`` map by ``-shift``, then zero-pads
  it at the bottom/right to multiples of the window (``Hp, Wp``), partitions, attends, merges, crops
  back to ``H, W`` and rolls by ``+shift``. Padding happens on the block input *before* the qkv
  projection, so a padded token's q, k and v are the qkv bias (``pad_value`` here). Padded tokens are
  never masked out: they are keys like any other token in their window.
* The shift mask (``get_attn_mask``) is built on the padded ``Hp x Wp`` grid: along each axis the
  positions ``[0, Hp - Wh)``, ``[Hp - Wh, Hp - sh)`` and ``[Hp - sh, Hp)`` are three regions (one region
  when that axis has no shift); tokens of different regions get ``-100`` added to their logit. When the
  map needs padding, these region borders are *not* where the rolled content wraps (``H - sh``), so a
  few wrapped tokens do attend across the seam. The original Swin detection code pads first and then
  rolls the padded map (``order="pad_roll"``), which puts the seam on the region border.
* With no shift at all, timm uses no mask (``attn_mask = None``); :func:`shift_attn_mask` then gives
  all zeros, which is the same thing.
* Small maps: unless ``always_partition=True``, the block clamps the window to the feature map per
  axis and drops the shift on every axis where the map is not larger than the (clamped) window, see
  :func:`effective_window`. A 7 x 7 map with window 7 and shift 3 is therefore not shifted at all.
  The block's relative position bias table is sized for the clamped window.
* v1 logits are ``(q * head_dim**-0.5) @ k^T + bias + mask``. v2 (cosine attention) logits are
  ``exp(clamp(logit_scale, max=log(100))) * cos(q, k) + 16 * sigmoid(cpb_mlp(coords))[index] + mask``,
  with q and k L2-normalised per head (``F.normalize``, eps 1e-12), see :func:`swinv2_cpb_table`.
  Since v2 logits reach +-100 + 16, its ``-100`` mask does not fully suppress masked keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "check_shift",
    "check_window",
    "effective_window",
    "pair",
    "relative_position_index",
    "shift_attn_mask",
    "swinv2_coords_table",
    "swinv2_cpb_table",
    "window_attention",
    "window_partition",
    "window_reverse",
]

_ORDERS = ("roll_pad", "pad_roll")


def pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """Normalise an int or a pair of ints to ``(h, w)``; raise a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_window(window_size: int | tuple[int, int]) -> tuple[int, int]:
    window = pair(window_size, "window_size")
    if min(window) < 1:
        raise ValueError(f"window_size must be >= 1 on both axes, got {window}")
    return window


def check_shift(shift_size: int | tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    shift = pair(shift_size, "shift_size")
    for s, w in zip(shift, window):
        if not 0 <= s < w:
            raise ValueError(f"shift_size must satisfy 0 <= shift < window on both axes, got shift "
                             f"{shift} for window_size {window}")
    return shift


def effective_window(
    feat_hw: tuple[int, int],
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int] = (0, 0),
    *,
    always_partition: bool = False,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (window, shift) a timm Swin block actually uses on a ``feat_hw`` map.

    Same rule as ``SwinTransformerBlock._calc_window_shift`` (v1 and v2, timm 1.0.31) for an explicit
    shift: with ``always_partition`` the target window and shift are used as given (small maps are
    padded up to one window). Otherwise, per axis, ``window = min(feat, window)`` and ``shift = 0``
    where ``feat <= window`` (so a map exactly one window wide is never shifted on that axis).

    Args:
        feat_hw: feature map ``(H, W)``.
        window_size: target window ``(Wh, Ww)`` (or an int).
        shift_size: target shift ``(sh, sw)`` (or an int).
        always_partition: timm's flag of the same name.

    Returns:
        ``((Wh, Ww), (sh, sw))`` to pass to :func:`window_attention`.
    """
    feat = pair(feat_hw, "feat_hw")
    if min(feat) < 1:
        raise ValueError(f"feat_hw must be >= 1 on both axes, got {feat}")
    window = check_window(window_size)
    shift = pair(shift_size, "shift_size")
    if always_partition:
        return window, shift
    clamped = tuple(min(f, w) for f, w in zip(feat, window))
    kept_shift = tuple(0 if f <= w else s for f, w, s in zip(feat, clamped, shift))
    return (clamped[0], clamped[1]), (kept_shift[0], kept_shift[1])


def relative_position_index(
    window_size: int | tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """Index into the relative position bias table for every (query, key) pair of one window.

    Tokens are numbered row-major in the window, ``t = y * Ww + x``. For query ``i`` and key ``j`` with
    ``(dy, dx) = (y_i - y_j, x_i - x_j)`` the index is ``(dy + Wh - 1) * (2 * Ww - 1) + (dx + Ww - 1)``,
    i.e. the table ``[(2*Wh-1)*(2*Ww-1), heads]`` is laid out dy-major.

    Returns:
        LongTensor ``[N, N]``, ``N = Wh * Ww``, values in ``[0, (2*Wh-1)*(2*Ww-1))``.
    """
    wh, ww = check_window(window_size)
    ys, xs = torch.meshgrid(
        torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"
    )
    ys, xs = ys.flatten(), xs.flatten()  # [N] each, row-major token order
    dy = ys[:, None] - ys[None, :]  # [N, N], query minus key
    dx = xs[:, None] - xs[None, :]
    return (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)


def window_partition(x: Tensor, window_size: int | tuple[int, int]) -> Tensor:
    """Cut a map into non-overlapping windows.

    Args:
        x: ``[B, Hp, Wp, *rest]`` with ``Hp % Wh == 0`` and ``Wp % Ww == 0``.
        window_size: ``(Wh, Ww)``.

    Returns:
        ``[B, nW, N, *rest]`` with ``nW = (Hp // Wh) * (Wp // Ww)`` windows in row-major order and
        ``N = Wh * Ww`` tokens per window in row-major order (timm's order, with B kept apart).
    """
    wh, ww = check_window(window_size)
    if x.dim() < 3:
        raise ValueError(f"x must be [B, H, W, ...], got shape {tuple(x.shape)}")
    b, hp, wp = x.shape[:3]
    rest = x.shape[3:]
    if hp % wh or wp % ww:
        raise ValueError(f"x spatial size {(hp, wp)} is not a multiple of window_size {(wh, ww)}")
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, *rest)
    x = x.movedim(3, 2)  # [B, nWh, nWw, Wh, Ww, *rest]
    return x.reshape(b, (hp // wh) * (wp // ww), wh * ww, *rest)


def window_reverse(windows: Tensor, window_size: int | tuple[int, int], padded_hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: ``[B, nW, N, *rest]``.
        window_size: ``(Wh, Ww)``.
        padded_hw: ``(Hp, Wp)``, multiples of the window.

    Returns:
        ``[B, Hp, Wp, *rest]``.
    """
    wh, ww = check_window(window_size)
    hp, wp = pair(padded_hw, "padded_hw")
    if hp % wh or wp % ww:
        raise ValueError(f"padded_hw {(hp, wp)} is not a multiple of window_size {(wh, ww)}")
    b, nw, n = windows.shape[:3]
    rest = windows.shape[3:]
    if nw != (hp // wh) * (wp // ww) or n != wh * ww:
        raise ValueError(f"windows shape {tuple(windows.shape)} does not match padded_hw {(hp, wp)} "
                         f"and window_size {(wh, ww)}")
    x = windows.reshape(b, hp // wh, wp // ww, wh, ww, *rest)
    x = x.movedim(2, 3)  # [B, nWh, Wh, nWw, Ww, *rest]
    return x.reshape(b, hp, wp, *rest)


def _axis_regions(length: int, window: int, shift: int, device: torch.device | str | None) -> Tensor:
    """Shift region (0, 1 or 2) of every position along one padded axis, as timm slices it."""
    pos = torch.arange(length, device=device)
    if shift == 0:
        # timm's slices [-0:] cover the whole axis: one region
        return torch.zeros_like(pos)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def shift_attn_mask(
    padded_hw: tuple[int, int],
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int],
    mask_value: float = -100.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Additive shifted-window mask, equal to timm's ``SwinTransformerBlock.attn_mask``.

    Each position of the padded ``Hp x Wp`` grid gets a region id ``3 * region_h + region_w``, where
    along an axis of length ``L`` with window ``w`` and shift ``s > 0`` the regions are ``[0, L - w)``,
    ``[L - w, L - s)`` and ``[L - s, L)`` (one region when ``s == 0``). A (query, key) pair of one
    window gets ``mask_value`` when their ids differ and 0 otherwise.

    Args:
        padded_hw: ``(Hp, Wp)``, the map size after padding (multiples of the window).
        window_size: ``(Wh, Ww)``.
        shift_size: ``(sh, sw)``, ``0 <= s < w``. All zero gives an all-zero mask (timm: ``None``).
        mask_value: value added to masked logits (timm: -100).

    Returns:
        ``[nW, N, N]`` in ``dtype``, windows and tokens in :func:`window_partition` order.
    """
    window = check_window(window_size)
    shift = check_shift(shift_size, window)
    hp, wp = pair(padded_hw, "padded_hw")
    if hp < 1 or wp < 1 or hp % window[0] or wp % window[1]:
        raise ValueError(f"padded_hw {(hp, wp)} must be positive multiples of window_size {window}")
    region_h = _axis_regions(hp, window[0], shift[0], device)
    region_w = _axis_regions(wp, window[1], shift[1], device)
    region_id = region_h[:, None] * 3 + region_w[None, :]  # [Hp, Wp]
    window_ids = window_partition(region_id[None], window)[0]  # [nW, N]
    differs = window_ids[:, :, None] != window_ids[:, None, :]  # [nW, N(query), N(key)]
    mask = torch.zeros(differs.shape, dtype=dtype, device=device)
    return mask.masked_fill(differs, mask_value)


def swinv2_coords_table(
    window_size: int | tuple[int, int],
    pretrained_window_size: int | tuple[int, int] = (0, 0),
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Swin v2's log-spaced relative coordinates, the input of the CPB MLP.

    For ``dy in [-(Wh-1), Wh-1]`` and ``dx in [-(Ww-1), Ww-1]``: ``c = 8 * (dy, dx) / (n - 1)`` with
    ``n = pretrained_window_size`` when ``pretrained_window_size[0] > 0`` (timm tests only the first
    entry) and ``n = window_size`` otherwise, ``max(n - 1, 1)`` guarding windows of 1; then
    ``sign(c) * log2(|c| + 1) / log2(8)``. Computed in float32 (as timm does) and cast to ``dtype``.

    Returns:
        ``[2*Wh-1, 2*Ww-1, 2]``, dy-major like the bias table.
    """
    wh, ww = check_window(window_size)
    pretrained = pair(pretrained_window_size, "pretrained_window_size")
    norm_h, norm_w = pretrained if pretrained[0] > 0 else (wh, ww)
    dy = torch.arange(-(wh - 1), wh, device=device, dtype=torch.float32)
    dx = torch.arange(-(ww - 1), ww, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # [2Wh-1, 2Ww-1, 2]
    table[..., 0] /= max(norm_h - 1, 1)
    table[..., 1] /= max(norm_w - 1, 1)
    table = table * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.to(dtype)


def swinv2_cpb_table(
    cpb_mlp: nn.Module,
    window_size: int | tuple[int, int],
    pretrained_window_size: int | tuple[int, int] = (0, 0),
) -> Tensor:
    """Swin v2's continuous relative position bias table: ``16 * sigmoid(cpb_mlp(coords))``.

    Args:
        cpb_mlp: timm's ``WindowAttention.cpb_mlp`` (``Linear(2, hidden) -> ReLU -> Linear(hidden, heads)``)
            or any module mapping ``[..., 2] -> [..., heads]``.
        window_size: ``(Wh, Ww)``.
        pretrained_window_size: see :func:`swinv2_coords_table`.

    Returns:
        ``[(2*Wh-1)*(2*Ww-1), heads]`` in the MLP's dtype, ready for ``rel_pos_bias``. timm applies the
        sigmoid after the index gather; being elementwise, that is the same numbers.
    """
    param = next(cpb_mlp.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else None
    coords = swinv2_coords_table(window_size, pretrained_window_size, dtype=dtype, device=device)
    table = cpb_mlp(coords.flatten(0, 1))  # [(2Wh-1)(2Ww-1), heads]
    return 16 * torch.sigmoid(table)


def _pad_bottom_right(x: Tensor, pad_h: int, pad_w: int, fill: Tensor) -> Tensor:
    """Pad ``[B, H, W, heads, head_dim]`` at the bottom/right with ``fill`` ``[heads, head_dim]``."""
    if pad_h == 0 and pad_w == 0:
        return x
    b, h, w = x.shape[:3]
    padded = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    inside = torch.zeros(h + pad_h, w + pad_w, dtype=torch.bool, device=x.device)
    inside[:h, :w] = True
    return torch.where(inside[:, :, None, None], padded, fill)


def _validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: tuple[int, int],
    rel_pos_bias: Tensor | None,
    logit_scale: Tensor | None,
    pad_value: Tensor | None,
    order: str,
) -> None:
    if q.dim() != 5:
        raise ValueError(f"q must be [B, H, W, heads, head_dim], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), "
                             f"got ({t.dtype}, {t.device})")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating point tensor, got {q.dtype}")
    _, h, w, heads, head_dim = q.shape
    if h < 1 or w < 1 or heads < 1 or head_dim < 1:
        raise ValueError(f"q must have non-empty H, W, heads and head_dim, got shape {tuple(q.shape)}")
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    table_rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    if rel_pos_bias is not None and tuple(rel_pos_bias.shape) != (table_rows, heads):
        raise ValueError(f"rel_pos_bias must be [(2*Wh-1)*(2*Ww-1), heads] = {(table_rows, heads)} for "
                         f"window_size {window}, got {tuple(rel_pos_bias.shape)}")
    if logit_scale is not None and tuple(logit_scale.shape) != (heads,):
        raise ValueError(f"logit_scale must be [heads] = {(heads,)}, got {tuple(logit_scale.shape)}")
    if pad_value is not None and tuple(pad_value.shape) != (3, heads, head_dim):
        raise ValueError(f"pad_value must be [3, heads, head_dim] = {(3, heads, head_dim)}, "
                         f"got {tuple(pad_value.shape)}")


def validate_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int],
    rel_pos_bias: Tensor | None,
    logit_scale: Tensor | None,
    pad_value: Tensor | None,
    order: str,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Check every argument of :func:`window_attention` (ValueError naming the argument); return
    the (window, shift) pairs. Kernels reuse this so that every backend rejects the same inputs."""
    window = check_window(window_size)
    shift = check_shift(shift_size, window)
    _validate(q, k, v, window, rel_pos_bias, logit_scale, pad_value, order)
    return window, shift


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int] = (0, 0),
    rel_pos_bias: Tensor | None = None,
    scale: float | None = None,
    logit_scale: Tensor | None = None,
    pad_value: Tensor | None = None,
    shift_mask: bool = True,
    mask_value: float = -100.0,
    order: str = "roll_pad",
) -> Tensor:
    """(Shifted-)window multi-head self-attention on a channels-last spatial map.

    Steps (``order="roll_pad"``, timm): roll the ``H x W`` map by ``-shift``; pad bottom/right to
    ``Hp x Wp`` (multiples of the window) with ``pad_value``; cut into ``nW`` windows of ``N = Wh*Ww``
    tokens; per window and head, ``logits = scale * q @ k^T`` (or ``logit_scale[h] * cos(q, k)``)
    ``+ rel_pos_bias[relative_position_index]`` ``+ shift_attn_mask``; softmax over keys; ``@ v``;
    merge windows, crop to ``H x W``, roll by ``+shift``. ``order="pad_roll"`` pads first, rolls the
    padded map, and un-rolls before cropping (original Swin detection code). The two orders agree
    whenever no padding is needed or there is no shift. Windows never exchange information.

    Args:
        q, k, v: ``[B, H, W, heads, head_dim]``, same shape, dtype and device. Any float dtype; for
            float16/bfloat16 everything is computed in float32 and the output cast back.
        window_size: ``(Wh, Ww)`` (or an int), each ``>= 1``. Used as given: for timm's clamping of
            windows larger than the map see :func:`effective_window`.
        shift_size: ``(sh, sw)`` (or an int), ``0 <= s < w``. Tokens move from ``(y, x)`` to
            ``(y - sh, x - sw)`` (mod the map) before partitioning.
        rel_pos_bias: table ``[(2*Wh-1)*(2*Ww-1), heads]``, row ``(dy+Wh-1)*(2*Ww-1) + (dx+Ww-1)`` for
            ``(dy, dx)`` = query position minus key position (see :func:`relative_position_index`).
            For Swin v2 pass :func:`swinv2_cpb_table`. None = no bias.
        scale: logit multiplier applied to q, default ``head_dim ** -0.5``. Ignored with ``logit_scale``.
        logit_scale: ``[heads]`` Swin v2 cosine attention multiplier, already clamped and exponentiated
            by the caller. When given, q and k are L2-normalised over head_dim (padded tokens too) and
            ``logits = logit_scale[h] * cos(q, k)``.
        pad_value: ``[3, heads, head_dim]``, the q, k, v of padded tokens (timm pads before the qkv
            projection, so they carry the qkv bias). None = zeros. Padded tokens are keys like any other.
        shift_mask: add the shifted-window region mask (:func:`shift_attn_mask`) when shifting.
        mask_value: value of the masked logits (timm: -100, not -inf).
        order: ``"roll_pad"`` (timm) or ``"pad_roll"`` (original Swin detection code).

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype, in the original (un-shifted, cropped) layout.
    """
    window = check_window(window_size)
    shift = check_shift(shift_size, window)
    _validate(q, k, v, window, rel_pos_bias, logit_scale, pad_value, order)
    b, h, w, heads, head_dim = q.shape
    out_dtype = q.dtype
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    if pad_value is None:
        pad_value = torch.zeros(3, heads, head_dim, dtype=compute_dtype, device=q.device)
    pad_value = pad_value.to(compute_dtype)

    pad_h = (window[0] - h % window[0]) % window[0]
    pad_w = (window[1] - w % window[1]) % window[1]
    hp, wp = h + pad_h, w + pad_w
    roll_back = (-shift[0], -shift[1])

    # 1. shift and pad, in the requested order
    maps = []
    for t, fill in zip((q, k, v), pad_value.unbind(0)):
        if order == "roll_pad":
            t = _pad_bottom_right(torch.roll(t, shifts=roll_back, dims=(1, 2)), pad_h, pad_w, fill)
        else:
            t = torch.roll(_pad_bottom_right(t, pad_h, pad_w, fill), shifts=roll_back, dims=(1, 2))
        maps.append(t)  # [B, Hp, Wp, heads, head_dim]

    # 2. partition: [B, nW, N, heads, head_dim] -> [B, nW, heads, N, head_dim]
    qw, kw, vw = (window_partition(t, window).transpose(2, 3) for t in maps)

    # 3. logits [B, nW, heads, N, N]
    if logit_scale is not None:
        cosine = F.normalize(qw, dim=-1) @ F.normalize(kw, dim=-1).transpose(-2, -1)
        logits = cosine * logit_scale.to(compute_dtype)[:, None, None]
    else:
        if scale is None:
            scale = head_dim**-0.5
        logits = (qw * scale) @ kw.transpose(-2, -1)
    if rel_pos_bias is not None:
        index = relative_position_index(window, device=q.device)  # [N, N]
        bias = rel_pos_bias.to(compute_dtype)[index]  # [N, N, heads]
        logits = logits + bias.permute(2, 0, 1)  # broadcast over B and nW
    if shift_mask and any(shift):
        mask = shift_attn_mask((hp, wp), window, shift, mask_value, dtype=compute_dtype, device=q.device)
        logits = logits + mask[:, None]  # [nW, 1, N, N], broadcast over B and heads

    # 4. attention within each window
    out = torch.softmax(logits, dim=-1) @ vw  # [B, nW, heads, N, head_dim]

    # 5. merge windows, crop, un-shift (reverse of step 1)
    out = window_reverse(out.transpose(2, 3), window, (hp, wp))  # [B, Hp, Wp, heads, head_dim]
    if order == "roll_pad":
        out = torch.roll(out[:, :h, :w], shifts=shift, dims=(1, 2))
    else:
        out = torch.roll(out, shifts=shift, dims=(1, 2))[:, :h, :w]
    return out.to(out_dtype)
