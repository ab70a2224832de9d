"""Pure-torch references of the CLIP (softmax) and SigLIP (sigmoid) contrastive losses.

These functions are the readable oracle that the fused kernels and the distributed implementation
are tested against. They describe what ONE rank computes, given the rows it owns and the columns it
sees, and they also work for several ranks with unequal local batch sizes.

Notation: ``s`` is ``logit_scale`` (already exponentiated, as open_clip's models return it), ``b`` is
``logit_bias``, ``I`` / ``T`` are image / text features (normally L2-normalised, not required).

CLIP (open_clip ``ClipLoss``), per rank::

    logits_i2t = s * image_rows @ text_cols.T + b          # (R, N)
    logits_t2i = s * text_rows @ image_cols.T + b          # (R, N)
    positive of row i = column label_offset + i
    loss = (CE_mean(logits_i2t) + CE_mean(logits_t2i)) / 2

* one rank: rows = cols = local features, ``label_offset = 0``;
* open_clip ``local_loss=True``: rows = local features, cols = every rank's features concatenated in
  rank order, ``label_offset`` = number of samples on earlier ranks;
* open_clip ``local_loss=False`` (global): rows = cols = every rank's features, ``label_offset = 0``
  (every rank computes the same value).

A constant ``b`` does not change a softmax cross-entropy; it is accepted because open_clip accepts it.

SigLIP (open_clip ``SigLipLoss``), per rank with ``B`` local samples::

    logits = s * image_features @ text_cols.T + b          # (B, N)
    labels = +1 at (i, positive_offset + i), -1 elsewhere
    loss = -sum(logsigmoid(labels * logits)) / B

With ``text_cols`` = every rank's texts and ``positive_offset`` = the rank's first global index, this is
exactly open_clip's distributed sum ``_loss(I_r, T_r) + sum_{q != r} _loss(I_r, T_q, negative_only)``.

Dtypes: the losses are computed in float32, or in float64 when any feature input is float64
(float16 / bfloat16 inputs are upcast, differentiably); the results are in that computation dtype.

:func:`simulate_ranks` reproduces, in one process, what every rank of an open_clip job computes and
which gradients land on that rank before any DDP averaging (see its docstring for the rules).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "clip_logits",
    "clip_loss",
    "clip_loss_labelled",
    "clip_loss_lse",
    "positive_mask",
    "siglip_logits",
    "siglip_loss",
    "siglip_loss_labelled",
    "simulate_ranks",
]


# --------------------------------------------------------------------------------------------- helpers


def _compute_dtype(*features: Tensor) -> torch.dtype:
    """float64 when any feature tensor is float64, else float32."""
    return torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32


def _scalar(x: Tensor | float, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    """``x`` as a 0-dim tensor of ``dtype`` (differentiable when ``x`` is a tensor)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must hold a single value, got shape {tuple(x.shape)}")
        return x.to(dtype=dtype).reshape(())
    return torch.tensor(float(x), dtype=dtype, device=device)


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (samples, dim), got shape {tuple(t.shape)}")


def _check_clip_shapes(image_rows: Tensor, text_rows: Tensor, image_cols: Tensor, text_cols: Tensor) -> None:
    for name, t in (("image_rows", image_rows), ("text_rows", text_rows),
                    ("image_cols", image_cols), ("text_cols", text_cols)):
        _check_2d(name, t)
    if image_rows.shape != text_rows.shape:
        raise ValueError(f"image_rows {tuple(image_rows.shape)} != text_rows {tuple(text_rows.shape)}")
    if image_cols.shape != text_cols.shape:
        raise ValueError(f"image_cols {tuple(image_cols.shape)} != text_cols {tuple(text_cols.shape)}")
    if image_rows.shape[1] != image_cols.shape[1]:
        raise ValueError(f"feature dims differ: rows {image_rows.shape[1]}, cols {image_cols.shape[1]}")


# ------------------------------------------------------------------------------------------------ CLIP


def clip_logits(image_rows: Tensor, text_rows: Tensor, image_cols: Tensor, text_cols: Tensor,
                logit_scale: Tensor | float, logit_bias: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """The two CLIP logit matrices of one rank.

    Args:
        image_rows, text_rows: ``(R, D)`` the features whose rows this rank owns.
        image_cols, text_cols: ``(N, D)`` the features this rank sees as columns.
        logit_scale: scalar ``s`` (a 0-dim / 1-element tensor or a float), already exponentiated.
        logit_bias: optional scalar ``b``.

    Returns:
        ``(logits_i2t, logits_t2i)``, both ``(R, N)`` in the computation dtype:
        ``s * image_rows @ text_cols.T + b`` and ``s * text_rows @ image_cols.T + b``.
    """
    _check_clip_shapes(image_rows, text_rows, image_cols, text_cols)
    dtype = _compute_dtype(image_rows, text_rows, image_cols, text_cols)
    device = image_rows.device
    s = _scalar(logit_scale, dtype, device, "logit_scale")
    logits_i2t = s * (image_rows.to(dtype) @ text_cols.to(dtype).T)
    logits_t2i = s * (text_rows.to(dtype) @ image_cols.to(dtype).T)
    if logit_bias is not None:
        b = _scalar(logit_bias, dtype, device, "logit_bias")
        logits_i2t = logits_i2t + b
        logits_t2i = logits_t2i + b
    return logits_i2t, logits_t2i


def clip_loss(image_rows: Tensor, text_rows: Tensor, image_cols: Tensor, text_cols: Tensor,
              logit_scale: Tensor | float, logit_bias: Tensor | float | None = None, label_offset: int = 0) -> Tensor:
    """CLIP softmax contrastive loss of one rank.

    Args:
        image_rows, text_rows: ``(R, D)`` rows owned by this rank.
        image_cols, text_cols: ``(N, D)`` columns seen by this rank (``N >= label_offset + R``).
        logit_scale: scalar ``s``, already exponentiated.
        logit_bias: optional scalar ``b`` (has no effect on the value of a softmax cross-entropy).
        label_offset: the positive of row ``i`` is column ``label_offset + i``.

    Returns:
        0-dim tensor in the computation dtype (float32, or float64 for float64 inputs):
        ``(mean_i CE(logits_i2t[i], label_offset + i) + mean_i CE(logits_t2i[i], label_offset + i)) / 2``.
    """
    logits_i2t, logits_t2i = clip_logits(
        image_rows, text_rows, image_cols, text_cols, logit_scale, logit_bias
    )
    rows, cols = logits_i2t.shape
    if label_offset < 0 or label_offset + rows > cols:
        raise ValueError(f"label_offset {label_offset} with {rows} rows does not fit in {cols} columns")
    labels = torch.arange(label_offset, label_offset + rows, device=logits_i2t.device)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def positive_mask(row_labels: Tensor, col_labels: Tensor, rows: int, cols: int, device: torch.device) -> Tensor:
    """``(R, N)`` bool: pair ``(i, j)`` is positive when ``row_labels[i] == col_labels[j]``, after
    checking the labels (int64, 1-D, ``R`` and ``N`` of them, on ``device``)."""
    for name, labels, n in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if not isinstance(labels, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of int64 labels, got {type(labels).__name__}")
        if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"{name} must be an int64 tensor of shape ({n},), got {labels.dtype} of shape "
                             f"{tuple(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"{name} must be on {device} (the features' device), got {labels.device}")
    return row_labels[:, None] == col_labels[None, :]


def clip_loss_labelled(image_rows: Tensor, text_rows: Tensor, image_cols: Tensor, text_cols: Tensor,
                       logit_scale: Tensor | float, logit_bias: Tensor | float | None, row_labels: Tensor,
                       col_labels: Tensor) -> Tensor:
    """CLIP loss with labels, dense: pair ``(i, j)`` is positive when ``row_labels[i] ==
    col_labels[j]`` (the labels of the rows' samples and of the columns' samples).

    Each image row's target is the uniform distribution over its positive text columns, and each text
    row's over its positive image columns; the loss is the mean over rows of the cross-entropy against
    that target, the two directions averaged::

        loss = (mean_i [lse_j l_ij - mean_{j in P(i)} l_ij] + the same for the text rows) / 2

    With every label distinct and ``col_labels[label_offset + i] == row_labels[i]`` this is
    :func:`clip_loss` exactly. Every row needs a positive (``ValueError`` otherwise; a row's own pair
    is one when its labels travel with its features).
    """
    logits_i2t, logits_t2i = clip_logits(image_rows, text_rows, image_cols, text_cols, logit_scale, logit_bias)
    rows, cols = logits_i2t.shape
    mask = positive_mask(row_labels, col_labels, rows, cols, logits_i2t.device)
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError(f"row(s) {torch.nonzero(counts == 0).flatten().tolist()} have no positive column: "
                         "every row label must appear among col_labels")
    target = mask.to(logits_i2t.dtype) / counts[:, None]
    ce = [torch.logsumexp(lg, 1) - (target * lg).sum(1) for lg in (logits_i2t, logits_t2i)]
    return (ce[0].mean() + ce[1].mean()) / 2


def clip_loss_lse(image_rows: Tensor, text_rows: Tensor, image_cols: Tensor, text_cols: Tensor,
                  logit_scale: Tensor | float, logit_bias: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Log-sum-exp of every row of the two CLIP logit matrices (what a fused kernel saves for backward).

    Args: as :func:`clip_logits` (rows ``(R, D)``, cols ``(N, D)``).

    Returns:
        ``(row_lse, col_lse)``, both ``(R,)`` in the computation dtype:
        ``row_lse[i] = logsumexp_j(s * image_rows[i] . text_cols[j] + b)`` and
        ``col_lse[i] = logsumexp_j(s * text_rows[i] . image_cols[j] + b)``.
        In the one-rank square case (rows = cols) ``col_lse[j] = logsumexp_i(s * I_i . T_j + b)``, the
        log-sum-exp of column ``j`` of the image->text matrix. The loss follows as
        ``((row_lse - pos_i2t).mean() + (col_lse - pos_t2i).mean()) / 2`` with ``pos_*[i]`` the logit
        at column ``label_offset + i``.
    """
    logits_i2t, logits_t2i = clip_logits(
        image_rows, text_rows, image_cols, text_cols, logit_scale, logit_bias
    )
    return torch.logsumexp(logits_i2t, dim=1), torch.logsumexp(logits_t2i, dim=1)


# ---------------------------------------------------------------------------------------------- SigLIP


def siglip_logits(image_features: Tensor, text_cols: Tensor, logit_scale: Tensor | float,
                  logit_bias: Tensor | float | None) -> Tensor:
    """``s * image_features @ text_cols.T + b``: ``(B, D) x (N, D) -> (B, N)`` in the computation dtype."""
    _check_2d("image_features", image_features)
    _check_2d("text_cols", text_cols)
    if image_features.shape[1] != text_cols.shape[1]:
        raise ValueError(f"feature dims differ: {image_features.shape[1]} vs {text_cols.shape[1]}")
    dtype = _compute_dtype(image_features, text_cols)
    device = image_features.device
    s = _scalar(logit_scale, dtype, device, "logit_scale")
    logits = s * (image_features.to(dtype) @ text_cols.to(dtype).T)
    if logit_bias is not None:
        logits = logits + _scalar(logit_bias, dtype, device, "logit_bias")
    return logits


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                logit_bias: Tensor | float | None, text_cols: Tensor | None = None, positive_offset: int = 0) -> Tensor:
    """SigLIP sigmoid contrastive loss of one rank (open_clip ``SigLipLoss`` semantics).

    Args:
        image_features: ``(B, D)`` this rank's images (the rows).
        text_features: ``(B, D)`` this rank's texts, the positives of the rows.
        logit_scale: scalar ``s``, already exponentiated.
        logit_bias: scalar ``b`` or None (no bias).
        text_cols: ``(N, D)`` every text this rank scores against, or None for ``text_features`` (one
            rank). When given, ``text_cols[positive_offset : positive_offset + B]`` must equal
            ``text_features`` (checked); the loss is computed from ``text_cols``, so gradients reach
            ``text_features`` only through ``text_cols`` (build it with ``torch.cat`` from the same tensor).
        positive_offset: the positive of image ``i`` is text column ``positive_offset + i``.

    Returns:
        0-dim tensor in the computation dtype:
        ``-sum_{i,j} logsigmoid(label_ij * logits_ij) / B``, label ``+1`` at ``(i, positive_offset + i)``
        and ``-1`` elsewhere. Note the division by the LOCAL ``B``, not by ``N``.
    """
    _check_2d("text_features", text_features)
    if text_features.shape != image_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} != text_features {tuple(text_features.shape)}"
        )
    batch = image_features.shape[0]
    if text_cols is None:
        if positive_offset != 0:
            raise ValueError("positive_offset needs text_cols")
        text_cols = text_features
    else:
        if positive_offset < 0 or positive_offset + batch > text_cols.shape[0]:
            raise ValueError(
                f"positive_offset {positive_offset} with {batch} rows does not fit in "
                f"{text_cols.shape[0]} columns"
            )
        own_block = text_cols[positive_offset : positive_offset + batch].detach()
        dtype = _compute_dtype(own_block, text_features)
        if not torch.equal(own_block.to(dtype), text_features.detach().to(dtype)):
            raise ValueError("text_cols[positive_offset : positive_offset + B] must equal text_features")
    logits = siglip_logits(image_features, text_cols, logit_scale, logit_bias)
    signs = -torch.ones_like(logits)
    rows = torch.arange(batch, device=logits.device)
    signs[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch


def siglip_loss_labelled(image_features: Tensor, text_cols: Tensor, logit_scale: Tensor | float,
                         logit_bias: Tensor | float | None, row_labels: Tensor, col_labels: Tensor) -> Tensor:
    """SigLIP loss with labels, dense: the target of pair ``(i, j)`` is ``+1`` when ``row_labels[i] ==
    col_labels[j]`` and ``-1`` otherwise; ``-sum_ij logsigmoid(target_ij * logits_ij) / B`` (open_clip's
    normalisation, the local ``B``). With every label distinct it is :func:`siglip_loss` exactly."""
    logits = siglip_logits(image_features, text_cols, logit_scale, logit_bias)
    mask = positive_mask(row_labels, col_labels, logits.shape[0], logits.shape[1], logits.device)
    signs = torch.where(mask, 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


# ---------------------------------------------------------------------------------- rank simulation


def simulate_ranks(loss_name: Literal["clip", "siglip"], features_per_rank: list[tuple[Tensor, Tensor]],
                   logit_scale: Tensor | float, logit_bias: Tensor | float | None, *, local_loss: bool = False,
                   gather_with_grad: bool = False, labels_per_rank: list[Tensor] | None = None
                   ) -> list[dict[str, Any]]:
    """Simulate, in one process, every rank of an open_clip job and the gradients each rank receives.

    Args:
        loss_name: ``"clip"`` (open_clip ``ClipLoss``) or ``"siglip"`` (``SigLipLoss``, any ``dist_impl``).
        features_per_rank: ``W`` pairs ``(image_features_r, text_features_r)``, each ``(B_r, D)``,
            ``B_r >= 1``; the ``B_r`` may differ (open_clip itself needs equal sizes).
        logit_scale: scalar ``s``, already exponentiated; every rank holds a replica.
        logit_bias: scalar ``b`` or None.
        local_loss, gather_with_grad: the ``ClipLoss`` flags; must stay False for ``"siglip"``, whose
            gradient routing does not depend on any flag.
        labels_per_rank: ``W`` int64 tensors ``(B_r,)`` (the labels of each rank's samples) for the
            labelled losses (:func:`clip_loss_labelled`, :func:`siglip_loss_labelled`: pair (i, j) of
            the global batch is positive when the labels are equal), or None for the diagonal.

    Returns:
        One dict per rank: ``{"loss": 0-dim tensor (detached), "grads": (d_image_r, d_text_r, d_scale,
        d_bias)}``, the gradients that rank's backward leaves in its own leaves before any DDP
        averaging. The loss is in the computation dtype (see the module docstring); ``d_image_r`` /
        ``d_text_r`` are shaped and typed like rank ``r``'s features; ``d_scale`` / ``d_bias`` are shaped
        and typed like ``logit_scale`` / ``logit_bias`` (0-dim in the computation dtype when a float is
        given); ``d_bias`` is None when ``logit_bias`` is None.

    Gradient routing (``loss_q`` is rank ``q``'s loss, ``F_r`` rank ``r``'s image or text features):

    * ``W == 1``: open_clip gathers nothing whatever the flags: the plain one-rank loss.
    * clip, global, no gather_with_grad: every rank's columns are the gathered features with its OWN
      slot replaced by its grad-carrying local tensor; ``d F_r = d loss_r / d F_r`` through that slot only.
    * clip, local_loss, no gather_with_grad: the gathered columns carry no gradient at all (not even
      the own slot); ``d F_r = d loss_r / d F_r`` through the rows only.
    * clip, gather_with_grad (global or local): ``torch.distributed.nn.all_gather`` sums gradients back
      to the owner: ``d F_r = sum_q d loss_q / d F_r`` (global: ``W`` times the one-loss gradient).
    * siglip (bidir / shift / reduce / gather): text blocks travel with gradient back to their owner,
      images stay local: ``d I_r = d loss_r / d I_r``, ``d T_r = sum_q d loss_q / d T_r``.
    * ``d_scale`` / ``d_bias`` are always per rank: ``d loss_r / d s``.
    """
    if loss_name not in ("clip", "siglip"):
        raise ValueError(f"loss_name must be 'clip' or 'siglip', got {loss_name!r}")
    if loss_name == "siglip" and (local_loss or gather_with_grad):
        raise ValueError("local_loss / gather_with_grad are ClipLoss flags; leave them False for siglip")
    world = len(features_per_rank)
    if world == 0:
        raise ValueError("features_per_rank is empty")
    for r, (img, txt) in enumerate(features_per_rank):
        _check_2d(f"image_features[{r}]", img)
        if img.shape != txt.shape or img.shape[0] == 0:
            raise ValueError(
                f"rank {r}: image {tuple(img.shape)} and text {tuple(txt.shape)} must match, with B_r >= 1"
            )

    if labels_per_rank is not None and len(labels_per_rank) != world:
        raise ValueError(f"labels_per_rank has {len(labels_per_rank)} entries for {world} ranks")
    all_labels = None if labels_per_rank is None else torch.cat(list(labels_per_rank))

    # One leaf per owner for features (shared by all ranks' losses), one replica of s / b per rank.
    images = [img.detach().clone().requires_grad_(True) for img, _ in features_per_rank]
    texts = [txt.detach().clone().requires_grad_(True) for _, txt in features_per_rank]
    dtype = _compute_dtype(*images, *texts)
    device = images[0].device

    def replica(x: Tensor | float) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().clone().requires_grad_(True)
        return torch.tensor(float(x), dtype=dtype, device=device, requires_grad=True)

    scales = [replica(logit_scale) for _ in range(world)]
    biases = [None if logit_bias is None else replica(logit_bias) for _ in range(world)]
    starts = [0]
    for img in images[:-1]:
        starts.append(starts[-1] + img.shape[0])

    def gathered(feats: list[Tensor], r: int) -> Tensor:
        """What rank ``r`` holds after open_clip's gather_features, with its gradient routing."""
        if gather_with_grad:
            return torch.cat(feats)  # every slot sends its gradient back to its owner
        if local_loss:
            return torch.cat([f.detach() for f in feats])  # dist.all_gather: no slot carries gradient
        return torch.cat([f if q == r else f.detach() for q, f in enumerate(feats)])  # own slot only

    losses: list[Tensor] = []
    for r in range(world):
        # rank r's rows and columns, the column of row 0's positive, the rows' labels
        own_labels = None if all_labels is None else labels_per_rank[r]
        if loss_name == "siglip":
            rows, cols, offset = (images[r], texts[r]), (None, torch.cat(texts)), starts[r]
        elif world == 1:
            rows, cols, offset = (images[0], texts[0]), (images[0], texts[0]), 0
        elif local_loss:
            rows, cols, offset = (images[r], texts[r]), (gathered(images, r), gathered(texts, r)), starts[r]
        else:
            rows = cols = (gathered(images, r), gathered(texts, r))
            offset, own_labels = 0, all_labels
        if loss_name == "siglip" and all_labels is None:
            loss = siglip_loss(*rows, scales[r], biases[r], text_cols=cols[1], positive_offset=offset)
        elif loss_name == "siglip":
            loss = siglip_loss_labelled(rows[0], cols[1], scales[r], biases[r], own_labels, all_labels)
        elif all_labels is None:
            loss = clip_loss(*rows, *cols, scales[r], biases[r], label_offset=offset)
        else:
            loss = clip_loss_labelled(*rows, *cols, scales[r], biases[r], own_labels, all_labels)
        losses.append(loss)

    # Rank q's loss only reaches leaves that the real communication would route to, so one backward of
    # the sum yields every rank's gradients at once (each replica of s / b sees only its own rank's loss).
    leaves = [*images, *texts, *scales, *[b for b in biases if b is not None]]
    grads = torch.autograd.grad(torch.stack(losses).sum(), leaves, allow_unused=True)
    grads = tuple(torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True))
    g_img, g_txt = grads[:world], grads[world : 2 * world]
    g_scale = grads[2 * world : 3 * world]
    g_bias: tuple[Tensor | None, ...] = grads[3 * world :] if logit_bias is not None else (None,) * world
    return [
        {"loss": losses[r].detach(), "grads": (g_img[r], g_txt[r], g_scale[r], g_bias[r])}
        for r in range(world)
    ]

