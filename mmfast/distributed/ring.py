"""The ``ring`` exchange: per-rank loss memory O(g*B*D + W*B), flat in the world size.

Ranks form ``k = W / g`` groups of ``g`` consecutive ranks; rank r = (group j, position p). A *group
block* is the texts of one group's g ranks. Images stay on their rank.

forward:  at step s = 0..k-1 rank (j, p) holds the texts of rank (j - s, p) (its *piece*). The group
          all-gathers its pieces into the group block of group j - s (``intra``), and computes its
          image rows against it. Meanwhile the piece moves one step along the ``column`` ring
          (rank (j, p) sends to (j + 1, p), receives from (j - 1, p): asynchronous send/recv), and the
          next block's all-gather runs: two blocks are alive at a time. Row statistics merge online;
          column statistics (O(N) scalars) are combined at the end in one all-reduce, with the loss
          terms and an error flag.
backward: the same ring, tiles recomputed. The text-gradient partials of a block are reduce-scattered
          inside the group to the position that carries the piece, added to the piece's running sum,
          and the sum travels on with the piece (one step behind the texts: it starts at the group
          after the owner and arrives back at the owner after k - 1 steps, which then adds its own
          partial). A final one-scalar all-reduce tells every rank whether any rank failed.

Elements sent per rank and step: forward (W-1)*B*D (as ``gather``); backward (W-1)*B*D of texts again
plus (W-1)*B*D of gradient sums (in the accumulation dtype). Saved for backward: the inputs, the row
log-sum-exp [B] and the column log-sum-exp [N]: no texts of other ranks.

A rank whose tile compute raises keeps taking part in every exchange (with its work skipped), so the
others finish the pass; then every rank raises (the failing one with its own error). Nothing hangs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.distributed import common
from mmfast.distributed.comm import RingChannel, combine_column_stats, reduce_scatter
from mmfast.distributed.groups import GroupLayout
from mmfast.ops import contrastive as tiles
from mmfast.ops.contrastive_loss import positive_logits

_TEXT_TAG, _GRAD_TAG = 11, 12


class RingFailure(RuntimeError):
    """Raised on every rank when the tile compute of some rank failed during a ring pass."""


class _Plan:
    """Geometry of one call: block columns, padding, the column ring."""

    def __init__(self, layout: GroupLayout, sizes: list[int]):
        self.layout, self.sizes = layout, sizes
        self.g, self.k, self.j = layout.group_size, layout.num_groups, layout.group_index
        self.bmax = max(sizes)
        self.uneven = len(set(sizes)) > 1
        self.offs = common.offsets(sizes)
        self.channel = None
        if layout.column is not None:
            ranks = [self._global(jj * self.g + layout.position) for jj in range(self.k)]
            self.channel = RingChannel(layout.column, ranks, self.j)

    def _global(self, r: int) -> int:
        return r if self.layout.group is None else dist.get_global_rank(self.layout.group, r)

    def source(self, s: int) -> int:
        """The group whose block this rank works on at step s."""
        return (self.j - s) % self.k

    def columns(self, src: int) -> slice:
        r0 = src * self.g
        return slice(self.offs[r0], self.offs[r0 + self.g - 1] + self.sizes[r0 + self.g - 1])

    def pad_local(self, t: Tensor) -> Tensor:
        if t.shape[0] < self.bmax:
            t = torch.cat([t, t.new_zeros(self.bmax - t.shape[0], *t.shape[1:])])
        return t.contiguous()

    def compact(self, block: Tensor, src: int) -> Tensor:
        """[g * bmax, D] padded block of group ``src`` -> its rows without padding."""
        if not self.uneven:
            return block
        return torch.cat([block[q * self.bmax:q * self.bmax + self.sizes[src * self.g + q]] for q in range(self.g)])

    def pad_block(self, rows: Tensor, src: int) -> Tensor:
        """Compact rows of group ``src``'s block -> [g * bmax, D] padded by rank."""
        if not self.uneven:
            return rows.contiguous()
        out = rows.new_zeros(self.g * self.bmax, rows.shape[1])
        row = 0
        for q in range(self.g):
            n = self.sizes[src * self.g + q]
            out[q * self.bmax:q * self.bmax + n] = rows[row:row + n]
            row += n
        return out


def _gather_block(piece: Tensor, layout: GroupLayout, async_op: bool):
    if layout.intra is None:
        return piece
    out = piece.new_empty(layout.group_size * piece.shape[0], *piece.shape[1:])
    work = dist.all_gather_into_tensor(out, piece, group=layout.intra, async_op=async_op)
    return (work, out) if async_op else out


def _blocks(plan: _Plan, piece: Tensor):
    """Yield (step, source group, holder) for s = 0..k-1, where ``holder.pop()`` gives the compact
    group block: the generator keeps no reference, so the caller frees the block when it is done.

    One group (g = 1): the next piece is received while the caller computes on the current one (two
    pieces alive). Groups of g > 1: the next piece is received one step earlier, so that its group
    all-gather also runs while the caller computes (two blocks and two pieces alive)."""
    k, layout = plan.k, plan.layout
    if layout.intra is None:
        for s in range(k):
            nxt = plan.channel.exchange(piece, torch.empty_like(piece), tag=_TEXT_TAG) if s + 1 < k else None
            yield s, plan.source(s), [plan.compact(piece, plan.source(s))]
            if nxt is not None:
                piece = nxt.wait()
                nxt = None
        return
    nxt = plan.channel.exchange(piece, torch.empty_like(piece), tag=_TEXT_TAG) if k > 1 else None
    block = _gather_block(piece, layout, async_op=False)
    for s in range(k):
        gathering = None
        if s + 1 < k:
            piece = nxt.wait()
            nxt = plan.channel.exchange(piece, torch.empty_like(piece), tag=_TEXT_TAG) if s + 2 < k else None
            gathering = _gather_block(piece, layout, async_op=True)
        holder = [plan.compact(block, plan.source(s))]
        block = None
        yield s, plan.source(s), holder
        if gathering is not None:
            gathering[0].wait()
            block = gathering[1]


class _Guard:
    """Runs the tile work of one rank; after a failure it skips the rest but the exchanges go on."""

    def __init__(self):
        self.error: BaseException | None = None

    def run(self, fn, *args):
        if self.error is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised after the pass, on every rank
            self.error = exc
            return None

    def flag(self, device, dtype=torch.float64) -> Tensor:
        return torch.tensor([1.0 if self.error is not None else 0.0], dtype=dtype, device=device)

    def raise_if_failed(self, failed_ranks: float, what: str) -> None:
        if self.error is not None:
            raise self.error
        if failed_ranks > 0:
            raise RingFailure(f"the {what} of the distributed contrastive loss failed on {int(failed_ranks)} "
                              "other rank(s) (see the error raised there)")


def _ring_text_grads(plan: _Plan, piece: Tensor, guard: _Guard, block_grads) -> Tensor:
    """The ring backward: ``block_grads(src, cols, block)`` returns the text-gradient partial of this
    rank for a block (compact rows, accumulation dtype) and accumulates everything else itself.
    Returns this rank's summed text gradient, padded to [bmax, D]."""
    layout, k = plan.layout, plan.k
    dev, d = piece.device, piece.shape[1]
    acc_dtype = common.compute_dtype(piece)
    own = running = None
    incoming = None
    for s, src, holder in _blocks(plan, piece):
        cols = plan.columns(src)
        part = guard.run(block_grads, src, cols, holder.pop())
        if part is None:
            part = torch.zeros(cols.stop - cols.start, d, dtype=acc_dtype, device=dev)
        padded = plan.pad_block(part.to(acc_dtype), src)
        mine = reduce_scatter(padded, layout.intra) if layout.intra is not None else padded
        del part, padded  # no reference outlives its step (the next step's buffers are allocated below)
        if s == 0:
            own, mine = mine, None
            continue
        running = mine if incoming is None else mine.add_(incoming.wait())
        mine = None
        # the sum moves on with the piece; the last hop (s = k-1) brings it back to its owner
        incoming = plan.channel.exchange(running, torch.empty_like(running), tag=_GRAD_TAG)
        running = None
    if k > 1:
        own = own + incoming.wait()
    return own


class ClipRingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, layout, header, local_loss, gather_with_grad, impl):
        plan = _Plan(layout, header.sizes)
        dt, dev, n = common.compute_dtype(image), image.device, header.total
        col_lse = torch.full((n,), float("-inf"), dtype=dt, device=dev)
        col_el = torch.zeros(n, dtype=dt, device=dev)
        shift = torch.zeros(n, dtype=torch.float64, device=dev)
        rows = [None, None]
        guard = _Guard()

        def tile(cols, block):
            rl, re, cl, ce = tiles.softmax_stats(image, block, scale, bias, impl)
            rows[0], rows[1] = common.merge_lse(rows[0], rows[1], rl, re)
            col_lse[cols], col_el[cols] = cl, ce

        for _, src, holder in _blocks(plan, plan.pad_local(text.detach())):
            block = holder.pop()
            cols = plan.columns(src)
            shift[cols] = common.logit_bound(block, scale, bias, header.image_norm_max)
            guard.run(tile, cols, block)
            block = None
        pos = positive_logits(image, text, scale, bias, dt)
        if guard.error is None:
            row_terms = common.clip_loss_terms(rows[0], rows[1], pos)
        else:
            row_terms = torch.zeros(3, dtype=dt, device=dev)
            col_lse.fill_(float("-inf"))
        extra = torch.cat([row_terms.double(), guard.flag(dev)])
        col_lse, col_el, extra_all = combine_column_stats(col_lse, col_el, shift, extra, layout.group)
        guard.raise_if_failed(extra_all[3].item(), "forward pass")
        loss, dscale = common.clip_finish(header, layout.rank, local_loss, scale, row_terms, extra_all[:3],
                                          col_lse, col_el, pos)
        ctx.save_for_backward(image, text, scale, bias, rows[0], col_lse, dscale)
        ctx.meta = (layout, header, local_loss, gather_with_grad, impl, bias is not None)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias, rl, col_lse, dscale = ctx.saved_tensors
        layout, header, local_loss, gwg, impl, has_bias = ctx.meta
        plan = _Plan(layout, header.sizes)
        dt, dev = rl.dtype, image.device
        w = common.clip_weights(grad, header.sizes, layout, local_loss, gwg, dt)
        d_image = torch.zeros(image.shape, dtype=dt, device=dev)
        guard = _Guard()

        def block_grads(src, cols, block):
            d_i, d_t = tiles.softmax_grads(image, block, scale, bias, rl, col_lse[cols], w.a_row, w.a_col[cols],
                                           w.b_row, None if w.b_col is None else w.b_col[cols], impl)
            d_image.add_(d_i)
            return d_t

        d_text = _ring_text_grads(plan, plan.pad_local(text.detach()), guard, block_grads)
        failed = guard.flag(dev)
        dist.all_reduce(failed, group=layout.group)
        guard.raise_if_failed(failed.item(), "backward pass")
        d_image, d_text = common.clip_positive_grads(w, layout.rank, header, image, text, scale, d_image,
                                                     d_text[:text.shape[0]])
        d_scale = (grad.to(dt).reshape(()) * dscale).reshape(scale.shape).to(scale.dtype)
        d_bias = torch.zeros_like(bias) if has_bias else None
        return d_image.to(image.dtype), d_text.to(text.dtype), d_scale, d_bias, None, None, None, None, None


class SigLipRingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, layout, header, impl):
        plan = _Plan(layout, header.sizes)
        dt, dev = common.compute_dtype(image), image.device
        total = [torch.zeros(image.shape[0], dtype=dt, device=dev)]
        guard = _Guard()

        def tile(block):
            total[0] = total[0] + tiles.sigmoid_rowsum(image, block, scale, bias, impl)

        for _, _, holder in _blocks(plan, plan.pad_local(text.detach())):
            guard.run(tile, holder.pop())
        failed = guard.flag(dev)
        dist.all_reduce(failed, group=layout.group)
        guard.raise_if_failed(failed.item(), "forward pass")
        pos = positive_logits(image, text, scale, bias, dt)
        loss = (total[0].sum() - pos.sum()) / image.shape[0]
        ctx.save_for_backward(image, text, scale, bias)
        ctx.meta = (layout, header, impl, bias is not None)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias = ctx.saved_tensors
        layout, header, impl, has_bias = ctx.meta
        plan = _Plan(layout, header.sizes)
        dt, dev = common.compute_dtype(image), image.device
        b_r = image.shape[0]
        g = grad.to(dt).reshape(())
        w = (g / b_r).expand(b_r).contiguous()
        acc = [torch.zeros(image.shape, dtype=dt, device=dev), torch.zeros((), dtype=dt, device=dev),
               torch.zeros((), dtype=dt, device=dev)]
        guard = _Guard()

        def block_grads(src, cols, block):
            d_i, d_t, d_s, d_b = tiles.sigmoid_grads(image, block, scale, bias, w, impl)
            acc[0] += d_i
            acc[1] += d_s
            acc[2] += d_b
            return d_t

        d_text = _ring_text_grads(plan, plan.pad_local(text.detach()), guard, block_grads)
        failed = guard.flag(dev)
        dist.all_reduce(failed, group=layout.group)
        guard.raise_if_failed(failed.item(), "backward pass")
        d_image, d_text, d_scale, d_bias = common.siglip_positive_grads(
            g, image, text, scale, acc[0], d_text[:b_r], acc[1], acc[2])
        return (d_image.to(image.dtype), d_text.to(text.dtype), d_scale.reshape(scale.shape).to(scale.dtype),
                d_bias.reshape(bias.shape).to(bias.dtype) if has_bias else None, None, None, None)
