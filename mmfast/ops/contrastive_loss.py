"""Single-process (W=1) CLIP and SigLIP losses as torch.library custom ops with fake and autograd
registration, so they work under torch.compile(fullgraph=True) and pass torch.library.opcheck.

The distributed losses (mmfast.distributed.contrastive) use the same tile ops and the same
formulas, with communication in between.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast.ops import contrastive as tiles


def positive_logits(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, dtype) -> Tensor:
    """l_ii = scale * <image_i, text_i> + bias in ``dtype``: the positive pairs, O(B*D)."""
    pos = scale.to(dtype).reshape(()) * (image.to(dtype) * text.to(dtype)).sum(1)
    return pos + bias.to(dtype).reshape(()) if bias is not None else pos


def siglip_loss_value(row_sums: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """The SigLIP loss of these rows from their sums of softplus(l_ij) over every column (every pair
    a negative): minus the positive pairs' logits, over the local batch."""
    pos = positive_logits(image, text, scale, bias, row_sums.dtype)
    return (row_sums.sum() - pos.sum()) / image.shape[0]


@torch.library.custom_op("mmfast::clip_loss_fwd", mutates_args=())
def clip_loss_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, impl: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, row_lse [B], col_lse [B], d loss / d scale) for W=1; all in the accumulation dtype
    (float32, float64 for float64 features), as open_clip's loss is under autocast."""
    rl, re, cl, ce = tiles.softmax_stats(image, text, scale, bias, impl)
    pos = positive_logits(image, text, scale, bias, rl.dtype)
    loss = 0.5 * ((rl - pos).mean() + (cl - pos).mean())
    # d(lse_i - pos_i)/d scale = (E_softmax[l] - pos_i) / scale: the bias cancels.
    dscale = 0.5 * ((re - pos).mean() + (ce - pos).mean()) / scale.to(rl.dtype).reshape(())
    return loss, rl, cl, dscale


@clip_loss_fwd.register_fake
def _(image, text, scale, bias, impl):
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    b = image.shape[0]
    return image.new_empty((), dtype=dt), image.new_empty(b, dtype=dt), image.new_empty(b, dtype=dt), \
        image.new_empty((), dtype=dt)


@torch.library.custom_op("mmfast::clip_loss_bwd", mutates_args=())
def clip_loss_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, row_lse: Tensor,
                  col_lse: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    """(d image, d text) of the W=1 CLIP loss times ``grad``."""
    n = image.shape[0]
    dt = row_lse.dtype
    w = (grad.to(dt) * (0.5 / n)).expand(n).contiguous()
    d_image, d_text = tiles.softmax_grads(image, text, scale, bias, row_lse, col_lse, w, w, None, None, impl)
    # -pos_i appears in both directions with weight 0.5/n each.
    c = grad.to(dt) * scale.to(dt).reshape(()) / n
    d_image = d_image - c * text.to(dt)
    d_text = d_text - c * image.to(dt)
    return d_image.to(image.dtype), d_text.to(text.dtype)


@clip_loss_bwd.register_fake
def _(grad, image, text, scale, bias, row_lse, col_lse, impl):
    return torch.empty_like(image), torch.empty_like(text)


def _clip_setup(ctx, inputs, output):
    image, text, scale, bias, impl = inputs
    _, rl, cl, dscale = output
    ctx.save_for_backward(image, text, scale, bias if bias is not None else None, rl, cl, dscale)
    ctx.has_bias = bias is not None
    ctx.impl = impl


def _clip_backward(ctx, g_loss, g_rl, g_cl, g_ds):
    image, text, scale, bias, rl, cl, dscale = ctx.saved_tensors
    d_image, d_text = clip_loss_bwd(g_loss, image, text, scale, bias, rl, cl, ctx.impl)
    d_scale = (g_loss.to(dscale.dtype) * dscale).reshape(scale.shape).to(scale.dtype)
    # A constant added to every logit cancels in the softmax: d loss / d bias = 0 exactly.
    d_bias = torch.zeros_like(bias) if ctx.has_bias else None
    return d_image, d_text, d_scale, d_bias, None


clip_loss_fwd.register_autograd(_clip_backward, setup_context=_clip_setup)


@torch.library.custom_op("mmfast::siglip_loss_fwd", mutates_args=())
def siglip_loss_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, impl: str) -> Tensor:
    """SigLIP loss for W=1: (sum_ij softplus(l_ij) - sum_i l_ii) / B, in the accumulation dtype."""
    return siglip_loss_value(tiles.sigmoid_rowsum(image, text, scale, bias, impl), image, text, scale, bias)


@siglip_loss_fwd.register_fake
def _(image, text, scale, bias, impl):
    return image.new_empty((), dtype=torch.float64 if image.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("mmfast::siglip_loss_bwd", mutates_args=())
def siglip_loss_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, impl: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d image, d text, d scale, d bias) of the W=1 SigLIP loss times ``grad``."""
    n = image.shape[0]
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    g = grad.to(dt)
    w = (g / n).expand(n).contiguous()
    parts = tiles.sigmoid_grads(image, text, scale, bias, w, impl)
    return tuple(t.to(like) for t, like in zip(_siglip_finish(g, image, text, scale, bias, parts),
                                                _grad_dtypes(image, text, scale, bias)))


def _grad_dtypes(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None) -> tuple[torch.dtype, ...]:
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    return image.dtype, text.dtype, scale.dtype, bias.dtype if bias is not None else dt


def _siglip_finish(g: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None,
                   parts: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss gradients (times ``g``, in the compute dtype) from the tile pass's (da, db, sum G a.b,
    sum G) for row weights ``g / n``: every pair as a negative, minus the positive pairs' terms."""
    n = image.shape[0]
    dt = g.dtype
    d_image, d_text, d_scale, d_bias = parts
    s = scale.to(dt).reshape(())
    c = g / n
    d_image = d_image - c * s * text.to(dt)
    d_text = d_text - c * s * image.to(dt)
    d_scale = d_scale - c * (image.to(dt) * text.to(dt)).sum()
    d_bias = d_bias - g
    return d_image, d_text, d_scale.reshape(scale.shape), d_bias.reshape(bias.shape if bias is not None else ())


@siglip_loss_bwd.register_fake
def _(grad, image, text, scale, bias, impl):
    return (torch.empty_like(image), torch.empty_like(text), torch.empty_like(scale),
            torch.empty_like(bias) if bias is not None else scale.new_empty(()))


def _siglip_setup(ctx, inputs, output):
    image, text, scale, bias, impl = inputs
    ctx.save_for_backward(image, text, scale, bias)
    ctx.has_bias = bias is not None
    ctx.impl = impl


def _siglip_backward(ctx, g):
    image, text, scale, bias = ctx.saved_tensors
    d_image, d_text, d_scale, d_bias = siglip_loss_bwd(g, image, text, scale, bias, ctx.impl)
    return d_image, d_text, d_scale, d_bias if ctx.has_bias else None, None


siglip_loss_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)


@torch.library.custom_op("mmfast::siglip_loss_fwd_grad", mutates_args=())
def siglip_loss_fwd_grad(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, impl: str
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The W=1 SigLIP loss and its gradients for a unit upstream gradient, from one tile pass (the
    C++ backend forms the logits once: 3 GEMMs, against 1 + 3 for forward then backward). Returns
    (loss, d image, d text, d scale, d bias), the gradients in the compute dtype."""
    n = image.shape[0]
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    one = torch.ones((), dtype=dt, device=image.device)
    w = (one / n).expand(n).contiguous()
    rows, *parts = tiles.sigmoid_rowsum_and_grads(image, text, scale, bias, w, impl)
    pos = positive_logits(image, text, scale, bias, rows.dtype)
    loss = (rows.sum() - pos.sum()) / n
    return (loss, *_siglip_finish(one, image, text, scale, bias, tuple(parts)))


@siglip_loss_fwd_grad.register_fake
def _(image, text, scale, bias, impl):
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    return (image.new_empty((), dtype=dt), image.new_empty(image.shape, dtype=dt),
            text.new_empty(text.shape, dtype=dt), scale.new_empty(scale.shape, dtype=dt),
            image.new_empty(bias.shape if bias is not None else (), dtype=dt))


def _fwd_grad_setup(ctx, inputs, output):
    image, text, scale, bias, impl = inputs
    ctx.dtypes = _grad_dtypes(image, text, scale, bias)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*output[1:])


def _fwd_grad_backward(ctx, g, *unused):
    grads = [(g.to(d.dtype) * d).to(like) for d, like in zip(ctx.saved_tensors, ctx.dtypes)]
    return grads[0], grads[1], grads[2], grads[3] if ctx.has_bias else None, None


siglip_loss_fwd_grad.register_autograd(_fwd_grad_backward, setup_context=_fwd_grad_setup)


def siglip_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, impl: str) -> Tensor:
    """The W=1 SigLIP loss: forward only when no gradient is wanted, else forward and gradients in
    one pass (saved for the backward, which only scales them)."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (image, text, scale, bias))
    if wants_grad:
        return siglip_loss_fwd_grad(image, text, scale, bias, impl)[0]
    return siglip_loss_fwd(image, text, scale, bias, impl)
