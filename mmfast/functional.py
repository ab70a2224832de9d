"""The public functional API of mmfast."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.reference.tome import effective_r, parse_r, proportional_attention_bias  # noqa: F401 - public here

__all__ = ["clip_loss", "siglip_loss", "window_attention", "bipartite_soft_matching", "merge_wavg", "merge_source",
           "proportional_attention", "fused_proportional_attention", "proportional_attention_bias", "effective_r",
           "parse_r", "linear", "window_partition", "window_unpartition"]

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
EXCHANGES = ("auto", "gather", "ring")


def check_exchange(exchange) -> None:
    """Raise ValueError unless ``exchange`` is one of :data:`EXCHANGES`."""
    if not isinstance(exchange, str) or exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")


def _check_float_tensor(value, name: str, shape_ok: Callable[[Tensor], bool], shape: str,
                        kind: str = "a tensor") -> None:
    """In this order: TypeError unless ``value`` is a tensor (``kind`` names what else was allowed),
    ValueError unless ``shape_ok(value)`` (``shape`` describes it), TypeError unless it is floating point."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not shape_ok(value):
        raise ValueError(f"{name} must be {shape}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")


def _as_scalar_tensor(value, name: str, like: Tensor) -> Tensor:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    _check_float_tensor(value, name, lambda x: x.numel() == 1, "a scalar (one element)",
                        kind="a tensor or a real number")
    if value.device != like.device:
        if value.device.type == "cpu":
            value = value.to(like.device)
        else:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value


def _check_features(image: Tensor, text: Tensor) -> None:
    for name, t in (("image_features", image), ("text_features", text)):
        _check_float_tensor(t, name, lambda x: x.dim() == 2, "2-D [batch, dim]")
        if t.shape[0] < 1:
            raise ValueError(f"{name} has an empty batch")
    if image.shape != text.shape:
        raise ValueError(f"image_features {tuple(image.shape)} and text_features {tuple(text.shape)} must have the "
                         "same [batch, dim] shape")
    if image.dtype != text.dtype:
        raise TypeError(f"image_features ({image.dtype}) and text_features ({text.dtype}) dtypes differ")
    if image.device != text.device:
        raise ValueError(f"image_features ({image.device}) and text_features ({text.device}) are on different devices")


def _check_scale(scale: Tensor, bias: Tensor | None) -> None:
    # One host sync: a non-finite or zero scale would silently give NaN gradients. Skipped while
    # torch.compile traces (a data-dependent check cannot be part of a graph).
    if torch.compiler.is_compiling():
        return
    vals = torch.stack([scale.detach().reshape(()).float()] +
                       ([bias.detach().reshape(()).float()] if bias is not None else [])).tolist()
    if not (vals[0] == vals[0] and abs(vals[0]) != float("inf")) or vals[0] == 0.0:
        raise ValueError(f"logit_scale must be finite and non-zero, got {vals[0]}")
    if bias is not None and not (vals[1] == vals[1] and abs(vals[1]) != float("inf")):
        raise ValueError(f"logit_bias must be finite, got {vals[1]}")


def _check_world(rank: int, world_size: int, group) -> None:
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialized")
        pg_world, pg_rank = dist.get_world_size(group), dist.get_rank(group)
        if (pg_world, pg_rank) != (world_size, rank):
            raise ValueError(f"rank={rank}, world_size={world_size} disagree with the process group "
                             f"(rank {pg_rank} of {pg_world})")


def _resolve(impl: str, image: Tensor, text: Tensor) -> str:
    from mmfast.ops import contrastive as tiles

    return tiles.resolve_impl(image, text, impl)


def _check_labels(labels, image: Tensor) -> None:
    """``labels``: None or one int64 label per local sample, on the features' device (any value,
    negatives included, is a label)."""
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be None or an int64 torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape != (image.shape[0],):
        raise ValueError(f"labels must have shape ({image.shape[0]},) (one per local sample), got "
                         f"{tuple(labels.shape)}")
    if labels.device != image.device:
        raise ValueError(f"labels are on {labels.device} but the features are on {image.device}")


def _prepare(image, text, logit_scale, logit_bias, rank, world_size, group, group_size, impl, exchange,
             labels=None):
    """Validate everything; (scale, bias, group_size, backend).

    With several ranks, a bad input on one rank is reported to the others through the size exchange
    every loss call starts with, so every rank raises instead of the others blocking in a collective.
    """
    from mmfast.distributed.groups import validate_group_size

    _check_world(rank, world_size, group)  # configuration: the same on every rank
    group_size = validate_group_size(group_size, world_size)
    if world_size > 1:
        from mmfast.distributed.groups import get_layout

        get_layout(group, group_size)  # collective on first use: every rank, before anything can fail
    try:
        check_exchange(exchange)
        _check_features(image, text)
        scale = _as_scalar_tensor(logit_scale, "logit_scale", image)
        bias = None if logit_bias is None else _as_scalar_tensor(logit_bias, "logit_bias", image)
        _check_scale(scale, bias)
        _check_labels(labels, image)
        backend = _resolve(impl, image, text)
    except (ValueError, TypeError, RuntimeError) as exc:
        if world_size > 1:
            from mmfast.distributed.contrastive import report_bad_input

            report_bad_input(group, image if isinstance(image, Tensor) else None)
        raise exc
    return scale, bias, group_size, backend


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
              logit_bias: Tensor | float | None = None, *, local_loss: bool = False,
              gather_with_grad: bool = False, rank: int = 0, world_size: int = 1, group=None,
              group_size: int | None = None, exchange: str = "auto", impl: str = "auto",
              output_dict: bool = False, labels: Tensor | None = None) -> Tensor | dict[str, Tensor]:
    """CLIP's symmetric InfoNCE loss, exact, tiled (the B x (W*B) logits never exist).

    Args:
        image_features, text_features: [B, D] local features (fp32/fp16/bf16/fp64, same dtype and
            device). Usually L2-normalised, not required. B may differ across ranks.
        logit_scale: the (already exponentiated) temperature, a 1-element tensor or a number.
        logit_bias: optional 1-element tensor added to every logit (its gradient is exactly 0).
        local_loss, gather_with_grad, rank, world_size: open_clip's ClipLoss semantics; the loss
            value and the gradients on every rank equal open_clip's for every combination.
        group: process group (None = WORLD). group_size: ranks per all-gather group (must divide
            world_size; None = LOCAL_WORLD_SIZE from torchrun, else world_size).
        exchange: "gather" (every rank gathers every text: fewest bytes, O(W*B*D) memory per rank),
            "ring" (gather inside groups, ring between them: O(group_size*B*D + W*B) memory per rank,
            1.5x the bytes) or "auto" (the ring when the gather would need more than the memory
            budget of mmfast.distributed.contrastive.set_memory_budget, default 512 MiB).
            The same on every rank; the loss and gradients are the same for each.
        impl: "auto", "cpp", "triton" or "reference" (forces a backend; see ``python -m mmfast.info``).
        output_dict: return {"contrastive_loss": loss}.
        labels: None (the positive of sample i is its own pair: open_clip's loss), or [B] int64, one
            label per local sample: over the global batch, image i and text j are a positive pair
            when their labels are equal. Each row's target is then uniform over its positives (each
            image row over the texts with its label, each text row over the images), the loss the
            mean over rows of the cross-entropy against it, the two directions averaged as above;
            with every label distinct it is the plain loss. Every value is a label (negatives too).
            On several ranks, every rank passes labels or none does.
    Returns:
        the loss: 0-dim float32 (float64 for float64 features), as open_clip's loss is under
        autocast; gradients come back in the features' dtype.
    """
    scale, bias, group_size, backend = _prepare(image_features, text_features, logit_scale, logit_bias, rank,
                                                world_size, group, group_size, impl, exchange, labels)
    if world_size == 1:
        from mmfast.ops.contrastive_loss import clip_loss_fwd

        loss = clip_loss_fwd(image_features, text_features, scale, bias, labels, backend)[0]
    else:
        from mmfast.distributed.contrastive import clip_loss_distributed

        loss = clip_loss_distributed(image_features, text_features, scale, bias, group=group,
                                     group_size=group_size, local_loss=local_loss,
                                     gather_with_grad=gather_with_grad, impl=backend, exchange=exchange,
                                     labels=labels)
    return {"contrastive_loss": loss} if output_dict else loss


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                logit_bias: Tensor | float | None, *, rank: int = 0, world_size: int = 1,
                dist_impl: str | None = None, group=None, group_size: int | None = None,
                exchange: str = "auto", impl: str = "auto", output_dict: bool = False,
                labels: Tensor | None = None) -> Tensor | dict[str, Tensor]:
    """SigLIP's pairwise sigmoid loss, exact and tiled: -sum log sigmoid(y_ij l_ij) / B_local.

    Same conventions as open_clip's SigLipLoss. ``dist_impl`` ("bidir", "shift", "reduce",
    "gather", None = "bidir") is accepted for compatibility: every choice gives the same value and
    gradients as open_clip's, and mmfast always uses its grouped exchange (``exchange``: as in
    :func:`clip_loss`). ``labels`` ([B] int64 or None): the target y_ij is +1 when the labels of
    image i and text j (over the global batch) are equal, -1 otherwise; None is the diagonal.
    """
    if dist_impl is not None and dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
    scale, bias, group_size, backend = _prepare(image_features, text_features, logit_scale, logit_bias, rank,
                                                world_size, group, group_size, impl, exchange, labels)
    if world_size == 1:
        from mmfast.ops.contrastive_loss import siglip_loss

        loss = siglip_loss(image_features, text_features, scale, bias, backend, labels)
    else:
        from mmfast.distributed.contrastive import siglip_loss_distributed

        loss = siglip_loss_distributed(image_features, text_features, scale, bias, group=group,
                                       group_size=group_size, impl=backend, exchange=exchange, labels=labels)
    return {"contrastive_loss": loss} if output_dict else loss


# ------------------------------------------------------------------------------------------------
# window attention


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, window_size: int | tuple[int, int],
                     shift_size: int | tuple[int, int] = 0, rel_pos_bias: Tensor | None = None,
                     scale: float | None = None, logit_scale: Tensor | None = None,
                     pad_value: Tensor | None = None, shift_mask: bool = True, mask_value: float = -100.0,
                     order: str = "roll_pad", impl: str = "auto") -> Tensor:
    """Windowed / shifted-window attention on the spatial layout, fused into one kernel.

    Args:
        q, k, v: [B, H, W, heads, head_dim], channels-last spatial layout, same dtype (fp32, fp16,
            bf16, fp64) and device. Any strides: views of one fused qkv tensor [B, H, W, 3, heads,
            head_dim] (``qkv.unbind(3)``) are read in place.
        window_size: (Wh, Ww) or an int. shift_size: (sy, sx) or an int, 0 <= s < window.
        rel_pos_bias: the relative position bias table [(2Wh-1)*(2Ww-1), heads], looked up by
            (dy, dx) = query - key in-window offsets (timm's layout); None for no bias.
        scale: logit multiplier, default head_dim ** -0.5 (ignored when logit_scale is given).
        logit_scale: Swin v2 cosine attention: [heads] multipliers (clamped and exponentiated by
            the caller); q and k are L2-normalised per head.
        pad_value: [3, heads, head_dim] q, k, v of padded tokens. timm pads before the qkv
            projection, so its padded tokens carry the qkv bias; None means zeros. Padded tokens
            are keys like any other (not masked), as in timm and ViTDet.
        shift_mask: mask attention across the regions that the cyclic shift joined (with
            ``mask_value``, timm's -100 added to the logits).
        order: "roll_pad" (timm: roll the unpadded map, then pad bottom/right; the mask regions
            are laid out on the padded grid) or "pad_roll" (the original Swin detection code).
        impl: "auto", "cpp", "triton", "flash_attn", "reference" (see mmfast.backends()). "flash_attn"
            (optional flash-attn package, CUDA, fp16/bf16) takes no rel_pos_bias, no logit_scale and no
            shift mask in effect; when "auto" uses it: mmfast.ops.window_attention.set_flash_attn_policy.
    Returns:
        [B, H, W, heads, head_dim] in q's dtype, in the original (un-shifted, cropped) layout.
    """
    from mmfast.ops.window_attention import window_attention as _wa

    return _wa(q, k, v, window_size=window_size, shift_size=shift_size, rel_pos_bias=rel_pos_bias, scale=scale,
               logit_scale=logit_scale, pad_value=pad_value, shift_mask=shift_mask, mask_value=mask_value,
               order=order, impl=impl)


def window_partition(x: Tensor, window_size: int | tuple[int, int], shift_size: int | tuple[int, int] = 0, *,
                     order: str = "roll_pad", pad_value: Tensor | None = None, impl: str = "auto") -> Tensor:
    """Cyclic shift + pad + window partition of ``x [B, H, W, C]`` in one copy (differentiable):
    ``[B * nW, Wh * Ww, C]``. Padded tokens get ``pad_value`` ([C]) or zeros. For the unfused paths
    that need explicit windows (a custom attention, a mask of their own)."""
    from mmfast.ops.window_process import window_partition as _wp

    return _wp(x, window_size, shift_size, order=order, pad_value=pad_value, impl=impl)


def window_unpartition(windows: Tensor, hw: tuple[int, int], window_size: int | tuple[int, int],
                       shift_size: int | tuple[int, int] = 0, *, order: str = "roll_pad", impl: str = "auto") -> Tensor:
    """Inverse of :func:`window_partition`: reverse partition, crop to ``hw`` and un-shift."""
    from mmfast.ops.window_process import window_unpartition as _wu

    return _wu(windows, hw, window_size, shift_size, order=order, impl=impl)


# ------------------------------------------------------------------------------------------------
# token merging


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False, distill_token: bool = False):
    """ToMe's bipartite soft matching. Returns ``(merge, unmerge)`` callables; see
    mmfast.tome for the exact semantics (alternate split, cosine similarity, protected class row
    and distillation column, top-r edges by score with index tie-breaks, r clamped to
    (N - protected) // 2)."""
    from mmfast.ops.tome import bipartite_soft_matching as _bsm

    return _bsm(metric, r, class_token=class_token, distill_token=distill_token)


def merge_wavg(merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: returns (merged x, merged size). Fused when ``merge`` comes
    from :func:`bipartite_soft_matching`."""
    from mmfast.ops.tome import merge_wavg as _mw

    return _mw(merge, x, size)


def merge_source(merge, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Track which original tokens each merged token holds ([B, N', N0] 0/1 matrix)."""
    from mmfast.ops.tome import merge_source as _ms

    return _ms(merge, x, source)


def proportional_attention(qkv: Tensor, log_size: Tensor | None, num_heads: int, scale: float | None = None,
                           impl: str | None = None) -> Tensor:
    """ToMe's proportional attention from a fused qkv projection output ``[B, N, 3 * C]`` (last dim
    laid out ``[3, heads, head_dim]``) with the ``[B, N]`` key bias ``log_size`` (or ``None``):
    ``softmax((q * scale) @ k^T + log_size) @ v``, heads concatenated, ``[B, N, C]``. On CPU, when
    no gradient is needed, one C++ kernel (no q/k/v copies, no mask tensor); otherwise the
    differentiable torch path. ``impl``: ``"cpp"`` or ``"reference"`` to force one."""
    from mmfast.ops.tome import proportional_attention as _pa

    return _pa(qkv, log_size, num_heads, scale=scale, impl=impl)


def fused_proportional_attention(qkv: Tensor, log_size: Tensor | None, num_heads: int, scale: float
                                 ) -> Tensor | None:
    """:func:`proportional_attention` when a fused kernel takes these inputs (today: CPU, no gradient
    needed, the C++ kernel built, not forced to the reference), else ``None``: the caller runs its
    own attention (the ToMe patches keep SDPA with an additive mask, which is faster than the
    explicit differentiable path)."""
    from mmfast.ops.tome import fused_attention_or_none

    return fused_attention_or_none(qkv, log_size, num_heads, scale)


# ------------------------------------------------------------------------------------------------
# linear layers


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, then the exact (erf) GELU with ``gelu=True``. On CPU float32
    inference one oneDNN GEMM with the bias (and GELU) in its epilogue (:mod:`mmfast.ops.linear`);
    everywhere else, and under ``use_backend("reference", ops=["fused_linear"])``, exactly
    ``F.linear`` (+ ``F.gelu``)."""
    from mmfast.ops.linear import linear_wb

    return linear_wb(x, weight, bias, gelu)
