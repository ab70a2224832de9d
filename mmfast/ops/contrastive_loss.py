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


class ClassSums:
    """The label classes of one batch whose sample ``i`` is the pair (image_i, text_i) with label
    ``labels[i]``: ``inv`` [B] the class of each sample, ``counts`` [K] the class sizes, ``image`` and
    ``text`` [K, D] the feature sums of each class, all in ``dt``. Every positive-pair term of the
    labelled losses factorises through them (pair (i, j) is positive when ``inv[i] == inv[j]``):
    sum_{j in P(i)} l_ij = scale * image_i . text[inv_i] + counts[inv_i] * bias, so no B x B mask
    or tile term is needed, only O(K * D) sums."""

    def __init__(self, image: Tensor, text: Tensor, labels: Tensor, dt: torch.dtype):
        _, self.inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        k = counts.shape[0]
        self.counts = counts.to(dt)
        self.image = image.new_zeros(k, image.shape[1], dtype=dt).index_add_(0, self.inv, image.to(dt))
        self.text = text.new_zeros(k, text.shape[1], dtype=dt).index_add_(0, self.inv, text.to(dt))

    def dots(self) -> Tensor:
        """[K]: image[k] . text[k], the sum of <image_i, text_j> over the pairs of class k."""
        return (self.image * self.text).sum(1)

    def per_sample(self, sums: Tensor, coef: Tensor) -> Tensor:
        """[B, D]: ``coef[k] * sums[k]`` for each sample's class ``k`` (``coef`` [K] or a scalar; the one
        [B, D] temporary)."""
        return (sums * coef.reshape(-1, 1)).index_select(0, self.inv)


def labelled_positive_sum(cs: ClassSums, scale: Tensor, bias: Tensor | None, n: int, mean: bool) -> Tensor:
    """Sum over rows of the positive logits: with ``mean`` each row's mean over its positives (CLIP,
    the same for both directions), else their sum (SigLIP)."""
    s = scale.to(cs.counts.dtype).reshape(())
    dots = cs.dots()
    total = s * ((dots / cs.counts).sum() if mean else dots.sum())
    if bias is not None:
        total = total + bias.to(cs.counts.dtype).reshape(()) * (n if mean else (cs.counts * cs.counts).sum())
    return total


@torch.library.custom_op("mmfast::clip_loss_fwd", mutates_args=())
def clip_loss_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, labels: Tensor | None,
                  impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, row_lse [B], col_lse [B], d loss / d scale) for W=1; all in the accumulation dtype
    (float32, float64 for float64 features), as open_clip's loss is under autocast. With ``labels``
    [B] int64 every pair of equal labels is a positive, each row's target uniform over them."""
    rl, re, cl, ce = tiles.softmax_stats(image, text, scale, bias, impl)
    if labels is not None:
        n = image.shape[0]
        p = labelled_positive_sum(ClassSums(image, text, labels, rl.dtype), scale, bias, n, mean=True)
        loss = 0.5 * ((rl.sum() - p) + (cl.sum() - p)) / n
        dscale = 0.5 * ((re.sum() - p) + (ce.sum() - p)) / n / scale.to(rl.dtype).reshape(())
        return loss, rl, cl, dscale
    pos = positive_logits(image, text, scale, bias, rl.dtype)
    loss = 0.5 * ((rl - pos).mean() + (cl - pos).mean())
    # d(lse_i - pos_i)/d scale = (E_softmax[l] - pos_i) / scale: the bias cancels.
    dscale = 0.5 * ((re - pos).mean() + (ce - pos).mean()) / scale.to(rl.dtype).reshape(())
    return loss, rl, cl, dscale


@clip_loss_fwd.register_fake
def _(image, text, scale, bias, labels, impl):
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    b = image.shape[0]
    return image.new_empty((), dtype=dt), image.new_empty(b, dtype=dt), image.new_empty(b, dtype=dt), \
        image.new_empty((), dtype=dt)


@torch.library.custom_op("mmfast::clip_loss_bwd", mutates_args=())
def clip_loss_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None,
                  labels: Tensor | None, row_lse: Tensor, col_lse: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    """(d image, d text) of the W=1 CLIP loss times ``grad``."""
    n = image.shape[0]
    dt = row_lse.dtype
    w = (grad.to(dt) * (0.5 / n)).expand(n).contiguous()
    d_image, d_text = tiles.softmax_grads(image, text, scale, bias, row_lse, col_lse, w, w, None, None, impl)
    # -pos_i appears in both directions with weight 0.5/n each.
    c = grad.to(dt) * scale.to(dt).reshape(()) / n
    if labels is not None:
        # the mean over the positives of a row and of a column: c * (class sum / class size)
        cs = ClassSums(image, text, labels, dt)
        d_image.sub_(cs.per_sample(cs.text, c / cs.counts))
        d_text.sub_(cs.per_sample(cs.image, c / cs.counts))
        return d_image.to(image.dtype), d_text.to(text.dtype)
    d_image = d_image - c * text.to(dt)
    d_text = d_text - c * image.to(dt)
    return d_image.to(image.dtype), d_text.to(text.dtype)


@clip_loss_bwd.register_fake
def _(grad, image, text, scale, bias, labels, row_lse, col_lse, impl):
    return torch.empty_like(image), torch.empty_like(text)


def _clip_setup(ctx, inputs, output):
    image, text, scale, bias, labels, impl = inputs
    _, rl, cl, dscale = output
    ctx.save_for_backward(image, text, scale, bias, labels, rl, cl, dscale)
    ctx.has_bias = bias is not None
    ctx.impl = impl


def _clip_backward(ctx, g_loss, g_rl, g_cl, g_ds):
    image, text, scale, bias, labels, rl, cl, dscale = ctx.saved_tensors
    d_image, d_text = clip_loss_bwd(g_loss, image, text, scale, bias, labels, rl, cl, ctx.impl)
    d_scale = (g_loss.to(dscale.dtype) * dscale).reshape(scale.shape).to(scale.dtype)
    # A constant added to every logit cancels in the softmax: d loss / d bias = 0 exactly.
    d_bias = torch.zeros_like(bias) if ctx.has_bias else None
    return d_image, d_text, d_scale, d_bias, None, None


clip_loss_fwd.register_autograd(_clip_backward, setup_context=_clip_setup)


@torch.library.custom_op("mmfast::siglip_loss_fwd", mutates_args=())
def siglip_loss_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, labels: Tensor | None,
                    impl: str) -> Tensor:
    """SigLIP loss for W=1: (sum_ij softplus(l_ij) - sum_{positive ij} l_ij) / B, in the accumulation
    dtype; the positives are the diagonal, or with ``labels`` every pair of equal labels."""
    rows = tiles.sigmoid_rowsum(image, text, scale, bias, impl)
    if labels is None:
        return siglip_loss_value(rows, image, text, scale, bias)
    cs = ClassSums(image, text, labels, rows.dtype)
    return (rows.sum() - labelled_positive_sum(cs, scale, bias, image.shape[0], mean=False)) / image.shape[0]


@siglip_loss_fwd.register_fake
def _(image, text, scale, bias, labels, impl):
    return image.new_empty((), dtype=torch.float64 if image.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("mmfast::siglip_loss_bwd", mutates_args=())
def siglip_loss_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None,
                    labels: Tensor | None, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d image, d text, d scale, d bias) of the W=1 SigLIP loss times ``grad``."""
    n = image.shape[0]
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    g = grad.to(dt)
    w = (g / n).expand(n).contiguous()
    parts = tiles.sigmoid_grads(image, text, scale, bias, w, impl)
    return tuple(t.to(like) for t, like in zip(_siglip_finish(g, image, text, scale, bias, labels, parts),
                                                _grad_dtypes(image, text, scale, bias)))


def _grad_dtypes(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None) -> tuple[torch.dtype, ...]:
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    return image.dtype, text.dtype, scale.dtype, bias.dtype if bias is not None else dt


def _siglip_finish(g: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None,
                   labels: Tensor | None, parts: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss gradients (times ``g``, in the compute dtype) from the tile pass's (da, db, sum G a.b,
    sum G) for row weights ``g / n``: every pair as a negative, minus the positive pairs' terms."""
    n = image.shape[0]
    dt = g.dtype
    d_image, d_text, d_scale, d_bias = parts
    s = scale.to(dt).reshape(())
    c = g / n
    if labels is None:
        d_image = d_image - c * s * text.to(dt)
        d_text = d_text - c * s * image.to(dt)
        d_scale = d_scale - c * (image.to(dt) * text.to(dt)).sum()
        d_bias = d_bias - g
    else:
        # sum over the positives (i, j) of l_ij: through the class sums (ClassSums)
        cs = ClassSums(image, text, labels, dt)
        d_image = d_image.sub_(cs.per_sample(cs.text, c * s))
        d_text = d_text.sub_(cs.per_sample(cs.image, c * s))
        d_scale = d_scale - c * cs.dots().sum()
        d_bias = d_bias - c * (cs.counts * cs.counts).sum()
    return d_image, d_text, d_scale.reshape(scale.shape), d_bias.reshape(bias.shape if bias is not None else ())


@siglip_loss_bwd.register_fake
def _(grad, image, text, scale, bias, labels, impl):
    return (torch.empty_like(image), torch.empty_like(text), torch.empty_like(scale),
            torch.empty_like(bias) if bias is not None else scale.new_empty(()))


def _siglip_setup(ctx, inputs, output):
    image, text, scale, bias, labels, impl = inputs
    ctx.save_for_backward(image, text, scale, bias, labels)
    ctx.has_bias = bias is not None
    ctx.impl = impl


def _siglip_backward(ctx, g):
    image, text, scale, bias, labels = ctx.saved_tensors
    d_image, d_text, d_scale, d_bias = siglip_loss_bwd(g, image, text, scale, bias, labels, ctx.impl)
    return d_image, d_text, d_scale, d_bias if ctx.has_bias else None, None, None


siglip_loss_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)


@torch.library.custom_op("mmfast::siglip_loss_fwd_grad", mutates_args=())
def siglip_loss_fwd_grad(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, labels: Tensor | None,
                         impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The W=1 SigLIP loss and its gradients for a unit upstream gradient, from one tile pass (the
    C++ backend forms the logits once: 3 GEMMs, against 1 + 3 for forward then backward). Returns
    (loss, d image, d text, d scale, d bias), the gradients in the compute dtype."""
    n = image.shape[0]
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    one = torch.ones((), dtype=dt, device=image.device)
    w = (one / n).expand(n).contiguous()
    rows, *parts = tiles.sigmoid_rowsum_and_grads(image, text, scale, bias, w, impl)
    if labels is None:
        loss = siglip_loss_value(rows, image, text, scale, bias)
    else:
        cs = ClassSums(image, text, labels, rows.dtype)
        loss = (rows.sum() - labelled_positive_sum(cs, scale, bias, n, mean=False)) / n
    return (loss, *_siglip_finish(one, image, text, scale, bias, labels, tuple(parts)))


@siglip_loss_fwd_grad.register_fake
def _(image, text, scale, bias, labels, impl):
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    return (image.new_empty((), dtype=dt), image.new_empty(image.shape, dtype=dt),
            text.new_empty(text.shape, dtype=dt), scale.new_empty(scale.shape, dtype=dt),
            image.new_empty(bias.shape if bias is not None else (), dtype=dt))


def _fwd_grad_setup(ctx, inputs, output):
    image, text, scale, bias, labels, impl = inputs
    ctx.dtypes = _grad_dtypes(image, text, scale, bias)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*output[1:])


def _fwd_grad_backward(ctx, g, *unused):
    grads = [(g.to(d.dtype) * d).to(like) for d, like in zip(ctx.saved_tensors, ctx.dtypes)]
    return grads[0], grads[1], grads[2], grads[3] if ctx.has_bias else None, None, None


siglip_loss_fwd_grad.register_autograd(_fwd_grad_backward, setup_context=_fwd_grad_setup)


def siglip_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, impl: str,
                labels: Tensor | None = None) -> Tensor:
    """The W=1 SigLIP loss: forward only when no gradient is wanted, else forward and gradients in
    one pass (saved for the backward, which only scales them)."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (image, text, scale, bias))
    if wants_grad:
        return siglip_loss_fwd_grad(image, text, scale, bias, labels, impl)[0]
    return siglip_loss_fwd(image, text, scale, bias, labels, impl)
