"""The public functional API of mmfast."""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.ops.registry import BACKENDS

__all__ = ["clip_loss", "siglip_loss"]

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _as_scalar_tensor(value, name: str, like: Tensor) -> Tensor:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor or a real number, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    if value.device != like.device:
        if value.device.type == "cpu":
            value = value.to(like.device)
        else:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value


def _check_features(image: Tensor, text: Tensor) -> None:
    for name, t in (("image_features", image), ("text_features", text)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
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

    if impl not in ("auto",) + BACKENDS:
        raise ValueError(f"impl must be one of {('auto',) + BACKENDS}, got {impl!r}")
    return tiles.resolve_impl(image, text, None if impl == "auto" else impl)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
              logit_bias: Tensor | float | None = None, *, local_loss: bool = False,
              gather_with_grad: bool = False, rank: int = 0, world_size: int = 1, group=None,
              group_size: int | None = None, impl: str = "auto", output_dict: bool = False
              ) -> Tensor | dict[str, Tensor]:
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
        impl: "auto", "cpp", "triton", "cuda" or "reference" (forces a backend).
        output_dict: return {"contrastive_loss": loss}.
    Returns:
        the loss (0-dim, in the features' dtype, accumulated in fp32).
    """
    from mmfast.distributed.groups import validate_group_size

    _check_features(image_features, text_features)
    scale = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias = None if logit_bias is None else _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    _check_scale(scale, bias)
    _check_world(rank, world_size, group)
    group_size = validate_group_size(group_size, world_size)
    backend = _resolve(impl, image_features, text_features)
    if world_size == 1:
        from mmfast.ops.contrastive_loss import clip_loss_fwd

        loss = clip_loss_fwd(image_features, text_features, scale, bias, backend)[0]
    else:
        from mmfast.distributed.contrastive import clip_loss_distributed

        loss = clip_loss_distributed(image_features, text_features, scale, bias, group=group,
                                     group_size=group_size, local_loss=local_loss,
                                     gather_with_grad=gather_with_grad, impl=backend)
    return {"contrastive_loss": loss} if output_dict else loss


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                logit_bias: Tensor | float | None, *, rank: int = 0, world_size: int = 1,
                dist_impl: str | None = None, group=None, group_size: int | None = None,
                impl: str = "auto", output_dict: bool = False) -> Tensor | dict[str, Tensor]:
    """SigLIP's pairwise sigmoid loss, exact and tiled: -sum log sigmoid(y_ij l_ij) / B_local.

    Same conventions as open_clip's SigLipLoss. ``dist_impl`` ("bidir", "shift", "reduce",
    "gather", None = "bidir") is accepted for compatibility: every choice gives the same value and
    gradients as open_clip's, and mmfast always uses its grouped exchange.
    """
    from mmfast.distributed.groups import validate_group_size

    if dist_impl is not None and dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
    _check_features(image_features, text_features)
    scale = _as_scalar_tensor(logit_scale, "logit_scale", image_features)
    bias = None if logit_bias is None else _as_scalar_tensor(logit_bias, "logit_bias", image_features)
    _check_scale(scale, bias)
    _check_world(rank, world_size, group)
    group_size = validate_group_size(group_size, world_size)
    backend = _resolve(impl, image_features, text_features)
    if world_size == 1:
        from mmfast.ops.contrastive_loss import siglip_loss_fwd

        loss = siglip_loss_fwd(image_features, text_features, scale, bias, backend)
    else:
        from mmfast.distributed.contrastive import siglip_loss_distributed

        loss = siglip_loss_distributed(image_features, text_features, scale, bias, group=group,
                                       group_size=group_size, impl=backend)
    return {"contrastive_loss": loss} if output_dict else loss
