"""What both exchange schemes of the distributed losses share: the header exchange every call starts
with, global offsets, the online log-sum-exp merge, the CLIP gradient weights for each open_clip flag
combination, and the per-column logit bound that lets one all-reduce combine column statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.distributed.groups import GroupLayout

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
EXCHANGES = ("gather", "ring", "auto")
# B, D, dtype code, ok, max |image row|, exchange code, memory budget of "auto" (bytes), labels given
_HEADER = 8


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 features, else float32: the dtype of every statistic and gradient sum."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _info_device(group, like: Tensor | None) -> torch.device:
    if like is not None and like.device.type != "meta":
        return like.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def report_bad_input(group, like: Tensor | None) -> None:
    """Take part in the header exchange with a 'bad input' flag, so the other ranks raise too."""
    dev = _info_device(group, like)
    info = torch.tensor([0, 0, -1, 0, 0, -1, 0, -1], dtype=torch.float64, device=dev)
    out = torch.empty(dist.get_world_size(group) * _HEADER, dtype=torch.float64, device=dev)
    dist.all_gather_into_tensor(out, info, group=group)


@dataclass(frozen=True)
class Header:
    """What every rank learned from the header exchange (identical on every rank)."""

    sizes: list[int]  # local batch size of every rank
    dim: int
    image_norm_max: Tensor  # float64 scalar: max |image row| over every rank (bounds the logits)
    exchange: str  # as requested: "gather", "ring" or "auto" (the same on every rank)
    budget: float  # smallest "auto" memory budget (bytes) over the ranks
    labelled: bool = False  # every rank passed labels

    @property
    def offsets(self) -> list[int]:
        return offsets(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)


def exchange_header(image: Tensor, text: Tensor, layout: GroupLayout, exchange: str, budget: float,
                    labelled: bool = False) -> Header:
    """All-gather (B, D, dtype, ok, max |image row|, exchange, budget, labels given) from every rank
    (one collective); raise the same error on every rank when they disagree, so a bad input on one
    rank never leaves the others blocked in a later collective. Values are float64 (integers below
    2**53 are exact)."""
    dev = image.device
    fields = [float(image.shape[0]), float(image.shape[1]), float(_DTYPE_CODES.get(image.dtype, -1)), 1.0]
    info = torch.cat([torch.tensor(fields, dtype=torch.float64, device=dev),
                      torch.linalg.vector_norm(image.detach(), dim=1).max().double().reshape(1),
                      torch.tensor([float(EXCHANGES.index(exchange)), float(budget), float(labelled)],
                                   dtype=torch.float64, device=dev)])
    out = torch.empty(layout.world_size * _HEADER, dtype=torch.float64, device=dev)
    dist.all_gather_into_tensor(out, info, group=layout.group)
    table = out.view(layout.world_size, _HEADER)
    rows = table[:, :4].long().tolist()
    bad = [r for r, row in enumerate(rows) if not row[3]]
    if bad:
        raise ValueError(f"bad contrastive-loss input on rank(s) {bad} (see the error raised there)")
    if len({row[1] for row in rows}) != 1:
        raise ValueError(f"embedding size D differs across ranks: {[row[1] for row in rows]}")
    if len({row[2] for row in rows}) != 1:
        raise ValueError("feature dtype differs across ranks")
    codes = table[:, 5].long().tolist()
    if len(set(codes)) != 1:
        raise ValueError(f"exchange differs across ranks: {[EXCHANGES[c] for c in codes]}")
    flags = table[:, 7].long().tolist()
    if len(set(flags)) != 1:
        raise ValueError(f"labels were passed on rank(s) {[r for r, f in enumerate(flags) if f]} and not on rank(s) "
                         f"{[r for r, f in enumerate(flags) if not f]}: pass them on every rank or on none")
    sizes = [row[0] for row in rows]
    if min(sizes) < 1:
        raise ValueError(f"every rank needs at least one sample; local batch sizes are {sizes}")
    return Header(sizes, rows[0][1], table[:, 4].max(), EXCHANGES[codes[0]], table[:, 6].min().item(),
                  bool(flags[0]))


def offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def unpad(padded: Tensor, sizes: list[int], ranks: list[int]) -> Tensor:
    """The real rows of ``padded``: blocks of ``max(sizes)`` rows, one per rank of ``ranks`` in that
    order, rank ``r``'s first ``sizes[r]`` rows real (``padded`` itself when no block is padded)."""
    bmax = max(sizes)
    if all(sizes[r] == bmax for r in ranks):
        return padded
    idx = [r0 * bmax + i for r0, r in enumerate(ranks) for i in range(sizes[r])]
    return padded.index_select(0, torch.tensor(idx, device=padded.device))


def merge_lse(lse_a: Tensor | None, el_a: Tensor | None, lse_b: Tensor, el_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two (log-sum-exp, softmax-mean logit) partials of the same rows over disjoint columns."""
    if lse_a is None:
        return lse_b, el_b
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse), torch.exp(lse_b - lse)
    return lse, wa * el_a + wb * el_b


def logit_bound(text: Tensor, scale: Tensor, bias: Tensor | None, image_norm_max: Tensor) -> Tensor:
    """Per column j, ``|scale| * max_i |image_i| * |text_j| + bias`` (float64): no logit of column j
    exceeds it (Cauchy-Schwarz), and every rank computes the same value from the same texts."""
    # the norms in the features' precision (fp32 accumulation): a bound needs no more, and no fp64
    # copy of the block is made
    norms = torch.linalg.vector_norm(text.detach(), dim=1, dtype=None if text.dtype == torch.float64 else
                                     torch.float32).double()
    bound = scale.detach().double().abs().reshape(()) * image_norm_max * norms
    return bound + bias.detach().double().reshape(()) if bias is not None else bound


@dataclass
class ClipWeights:
    """Weights of P_row (row-indexed: this rank's rows) and P_col (column-indexed: every column) in
    the gradient of the image rows (a) and of the text columns (b); ``b_* is None`` means the same as
    ``a_*``. ``scale`` multiplies both gradients after the tiles."""

    a_row: Tensor
    a_col: Tensor
    b_row: Tensor | None
    b_col: Tensor | None
    scale: Tensor


def clip_weights(grad: Tensor, sizes: list[int], layout: GroupLayout, local_loss: bool,
                 gather_with_grad: bool, dt: torch.dtype) -> ClipWeights:
    """open_clip's per-rank gradient semantics for each flag combination (see
    mmfast.reference.contrastive.simulate_ranks). May run one collective (upstream gradients)."""
    r, dev = layout.rank, grad.device
    n_total, b_r = sum(sizes), sizes[r]
    g = grad.to(dt).reshape(())
    owner_b = torch.repeat_interleave(torch.tensor(sizes, dtype=dt, device=dev), torch.tensor(sizes, device=dev))
    if local_loss and not gather_with_grad:
        a_row = torch.full((b_r,), 0.5 / b_r, dtype=dt, device=dev)
        return ClipWeights(a_row, torch.zeros(n_total, dtype=dt, device=dev), torch.zeros(b_r, dtype=dt, device=dev),
                           0.5 / owner_b, g)
    if local_loss:
        gs = torch.empty(layout.world_size, dtype=dt, device=dev)
        dist.all_gather_into_tensor(gs, g.reshape(1).contiguous(), group=layout.group)
        g_owner = torch.repeat_interleave(gs, torch.tensor(sizes, device=dev))
        a_row = torch.full((b_r,), 0.5 / b_r, dtype=dt, device=dev) * g
        return ClipWeights(a_row, 0.5 / owner_b * g_owner, None, None, torch.ones((), dtype=dt, device=dev))
    if gather_with_grad:  # every rank's loss is the same global loss: the all-gather sums W copies
        g = g.clone()
        dist.all_reduce(g, group=layout.group)
    a_row = torch.full((b_r,), 0.5 / n_total, dtype=dt, device=dev)
    return ClipWeights(a_row, torch.full((n_total,), 0.5 / n_total, dtype=dt, device=dev), None, None, g)


def clip_loss_terms(row_lse: Tensor, row_el: Tensor, pos: Tensor) -> Tensor:
    """The scalars a rank contributes to the global loss: sum(row_lse - pos), sum(row_el - pos) and
    sum(pos) over its rows (summed over ranks in the column-statistics all-reduce)."""
    return torch.stack([(row_lse - pos).sum(), (row_el - pos).sum(), pos.sum()])


def clip_finish(header: Header, rank: int, local_loss: bool, scale: Tensor, row_terms: Tensor,
                row_terms_all: Tensor, col_lse: Tensor, col_el: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d scale) of this rank from its row terms, the summed row terms of every rank
    and the global column statistics; ``pos``: the positive logit (with labels, the mean over the
    positives) of this rank's columns."""
    dt = col_lse.dtype
    s = scale.to(dt).reshape(())
    if local_loss:
        r, off = rank, header.offsets[rank]
        mine = slice(off, off + header.sizes[r])
        b_r = header.sizes[r]
        loss = 0.5 * (row_terms[0] + (col_lse[mine] - pos).sum()) / b_r
        dscale = 0.5 * (row_terms[1] + (col_el[mine] - pos).sum()) / b_r / s
        return loss, dscale
    n = header.total
    tot = row_terms_all.to(dt)
    loss = 0.5 * (tot[0] + col_lse.sum() - tot[2]) / n
    dscale = 0.5 * (tot[1] + col_el.sum() - tot[2]) / n / s
    return loss, dscale


def clip_grads_out(w: ClipWeights, rank: int, header: Header, image: Tensor, text: Tensor, scale: Tensor,
                   bias: Tensor | None, grad: Tensor, dscale: Tensor, d_image: Tensor, d_text: Tensor,
                   positives: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """What the CLIP backward returns for (image, text, scale, bias): the positive pairs' terms (-l_ii
    in the row and the column terms: both on this rank; ``positives=False`` where the caller added
    them, as the labelled loss does) and the final scale applied to the tile gradients ``d_image`` /
    ``d_text`` in place (buffers the caller owns; no [B, D] temporary), in the inputs' dtypes."""
    dt = d_image.dtype
    off = header.offsets[rank]
    mine = slice(off, off + header.sizes[rank])
    neg_s = -scale.to(dt).reshape(())
    b_row = w.a_row if w.b_row is None else w.b_row
    b_col = w.a_col if w.b_col is None else w.b_col
    if positives:
        d_image.addcmul_(((w.a_row + w.a_col[mine]) * neg_s)[:, None], text.to(dt))
        d_text.addcmul_(((b_row + b_col[mine]) * neg_s)[:, None], image.to(dt))
    d_image.mul_(w.scale)
    d_text.mul_(w.scale)
    d_scale = (grad.to(dt).reshape(()) * dscale).reshape(scale.shape).to(scale.dtype)
    return d_image.to(image.dtype), d_text.to(text.dtype), d_scale, None if bias is None else torch.zeros_like(bias)


def siglip_grads_out(g: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, d_image: Tensor,
                     d_text: Tensor, d_scale: Tensor, d_bias: Tensor, labelled=None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """What the SigLIP backward returns for (image, text, scale, bias): the positive pairs' terms (row
    weights ``g / B``) added to the tile gradients (``d_image`` / ``d_text`` in place), in the inputs'
    dtypes. ``labelled``: the :class:`~mmfast.distributed.labels.SigLipPositiveGrads` of a labelled
    call (the text terms are in ``d_text`` already; the rest it gives)."""
    dt = d_image.dtype
    c = g / image.shape[0]
    neg_cs = -(c * scale.to(dt).reshape(()))
    image_l = image.to(dt)
    if labelled is not None:
        # sum over this rank's rows of the positives' logits: scale * image_i . T[y_i] + c_i * bias
        t_rows = labelled.image_part()
        d_image.addcmul_(t_rows, neg_cs)
        d_scale = d_scale - c * torch.dot(image_l.reshape(-1), t_rows.reshape(-1))
        d_bias = d_bias - c * labelled.lab.row_count.sum()
    else:
        text_l = text.to(dt)
        d_image.addcmul_(text_l, neg_cs)
        d_text.addcmul_(image_l, neg_cs)
        d_scale = d_scale - c * torch.dot(image_l.reshape(-1), text_l.reshape(-1))
        d_bias = d_bias - g
    return (d_image.to(image.dtype), d_text.to(text.dtype), d_scale.reshape(scale.shape).to(scale.dtype),
            None if bias is None else d_bias.reshape(bias.shape).to(bias.dtype))
