"""The ``ring`` exchange: per-rank loss memory O(g*B*D + W*B), flat in the world size.

Ranks form ``k = W / g`` groups of ``g`` consecutive ranks; rank r = (group j, position p). The
*piece* of a rank is its (padded) texts; a group's *block* is the pieces of its g ranks. Images stay
on their rank. Every tile op runs on one piece at a time (``B x B`` tiles against this rank's
images), so at most one group member's piece and one piece-sized gradient are in the tiles' hands.

step s:   rank (j, p) holds the piece of rank (j - s, p), its *ring piece*. It sends the ring piece
          to the other members of its group and receives theirs (one batch of point-to-point ops:
          together they hold group j - s's block), runs the tiles of the others' pieces, then (while
          the ring piece moves one step on along the ``column`` ring, (j, p) -> (j + 1, p), and the
          next one arrives) the tiles of its ring piece. Two ring pieces are alive at a time (double
          buffering); the exchange is posted once the other members' pieces are done with.
forward:  s = 0 .. k-1 (own block first, nothing to wait for). Row statistics merge online; column
          statistics (O(N) scalars) are combined at the end in one all-reduce, with the loss terms
          and an error flag.
backward: the same walk, tiles recomputed, in the order s = 1 .. k-1, then 0: the own block last.
          The text-gradient partials of the other members' pieces are sent to them before the ring
          piece's tiles (one batch: the group's partials both ways), and added, with the sum that
          arrived from the previous group, into one buffer, to which the ring piece's own partial is
          added. That sum travels on along the column ring, one step behind the texts: it starts at
          the group after the owner (s = 1) and arrives at the owner after k - 1 hops, when the owner
          runs its own block, so nothing is kept from step to step but the sum in flight. A final
          one-scalar all-reduce tells every rank whether any rank failed.

Peak per rank (backward, B = bmax, the C++ tiles): the image gradient, the ring piece, one other
member's piece or the next ring piece, the sum in flight, the kernel's tile and gradients:
about 8 B*D in the steady state (k >= 3), 7 at k = 2, 6 at k = 1; plus O(W*B) statistics.

Elements sent per rank and step: forward (W-1)*B*D (as ``gather``); backward (W-1)*B*D of texts again
plus (W-1)*B*D of gradients (in the accumulation dtype: (g-1)*B*D of partials in the group and
(k-1)*B*D of sums on the ring). Saved for backward: the inputs, the row log-sum-exp [B] and the
column log-sum-exp [N]: no texts of other ranks.

A rank whose tile compute raises keeps taking part in every exchange (with its work skipped and zero
partials sent), so the others finish the pass; then every rank raises (the failing one with its own
error). Nothing hangs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.distributed import common
from mmfast.distributed.comm import RingChannel, combine_column_stats, p2p
from mmfast.distributed.groups import GroupLayout
from mmfast.ops import contrastive as tiles
from mmfast.ops.contrastive_loss import positive_logits

_TEXT_TAG, _GRAD_TAG, _PIECE_TAG, _PART_TAG = 11, 12, 13, 14


class RingFailure(RuntimeError):
    """Raised on every rank when the tile compute of some rank failed during a ring pass."""


class _Plan:
    """Geometry of one call: the order of the pieces, their columns and padding, the peers."""

    def __init__(self, layout: GroupLayout, sizes: list[int]):
        self.layout, self.sizes = layout, sizes
        self.g, self.k, self.j, self.p = layout.group_size, layout.num_groups, layout.group_index, layout.position
        self.bmax = max(sizes)
        self.offs = common.offsets(sizes)
        self.channel = None
        if layout.column is not None:
            ranks = [self._global(jj * self.g + self.p) for jj in range(self.k)]
            self.channel = RingChannel(layout.column, ranks, self.j)
        # the other members of the group, in the order their pieces are worked on
        self.others = [(self.p + i) % self.g for i in range(1, self.g)]
        self.peer = {q: self._global(self.j * self.g + q) for q in self.others}

    def _global(self, r: int) -> int:
        return r if self.layout.group is None else dist.get_global_rank(self.layout.group, r)

    def source(self, s: int) -> int:
        """The group whose block this rank works on at step s."""
        return (self.j - s) % self.k

    def owner(self, src: int, q: int) -> int:
        return src * self.g + q

    def columns(self, src: int, q: int) -> slice:
        r = self.owner(src, q)
        return slice(self.offs[r], self.offs[r] + self.sizes[r])

    def pad(self, t: Tensor) -> Tensor:
        """Rows -> [bmax, ...], zero padded."""
        if t.shape[0] < self.bmax:
            t = torch.cat([t, t.new_zeros(self.bmax - t.shape[0], *t.shape[1:])])
        return t.contiguous()

    def order(self, own_last: bool) -> list[int]:
        return list(range(1, self.k)) + [0] if own_last else list(range(self.k))


def _walk(plan: _Plan, text: Tensor, own_last: bool):
    """Yield ``(s, src, q, holder)`` for every piece of every group block in this rank's order (per
    step the other members' pieces, then the ring piece, ``q == plan.p``, always the last of its
    step); ``holder.pop()`` gives the piece's rows. The generator keeps no reference to a piece it
    has handed over, so the caller frees it when done; work the caller does after the ring piece
    (its end of step) overlaps the ring's next hop."""
    order = plan.order(own_last)
    nxt = None
    if order[0] != 0:  # own block last: the first ring piece comes from the previous group
        nxt = plan.channel.exchange(text, torch.empty_like(text), tag=_TEXT_TAG)
    for i, s in enumerate(order):
        src = plan.source(s)
        if s == 0:
            cur = text
        else:
            cur, nxt = nxt.wait(), None
        pieces = None
        if plan.others:
            pieces = p2p(plan.layout.intra, [(plan.peer[q], cur) for q in plan.others],
                         [(plan.peer[q], torch.empty_like(cur)) for q in plan.others], tag=_PIECE_TAG)
            got = pieces.wait()
            got.reverse()
            for q in plan.others:
                holder = [got.pop()[:plan.sizes[plan.owner(src, q)]]]
                yield s, src, q, holder
        if i + 1 < len(order) and order[i + 1] != 0:  # the next ring piece: posted now, received later
            nxt = plan.channel.exchange(cur, torch.empty_like(cur), tag=_TEXT_TAG)
        del pieces
        holder = [cur[:plan.sizes[plan.owner(src, plan.p)]]]
        cur = None
        yield s, src, plan.p, holder


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


def _ring_text_grads(plan: _Plan, text: Tensor, guard: _Guard, piece_grads) -> Tensor:
    """The ring backward: ``piece_grads(cols, piece)`` returns this rank's text-gradient partial of
    one piece (its rows, accumulation dtype) and accumulates everything else itself. Returns this
    rank's summed text gradient, padded to [bmax, D]."""
    dev, d = text.device, text.shape[1]
    acc_dtype = common.compute_dtype(text)
    parts: list[Tensor] = []
    incoming = None  # the gradient sum of the next ring piece, travelling from the previous group
    for s, src, q, holder in _walk(plan, text, own_last=True):
        if incoming is not None:
            incoming.release_sends()  # the sum sent at the end of the last step has arrived
        total = None
        if q == plan.p:
            # before the ring piece's tiles: what the others computed of it (the partials, mine to
            # their owners in the same batch) and the sum of the groups before, in one buffer
            if parts:
                got = p2p(plan.layout.intra, [(plan.peer[o], t) for o, t in zip(plan.others, parts)],
                          [(plan.peer[o], torch.empty_like(parts[0])) for o in plan.others], tag=_PART_TAG).wait()
                parts = []
                total = got.pop(0)
                while got:
                    total.add_(got.pop())
            if incoming is not None:
                t = incoming.wait()
                incoming = None
                total = t if total is None else total.add_(t)
                t = None
        cols = plan.columns(src, q)
        part = guard.run(piece_grads, cols, holder.pop())
        if part is None:
            part = torch.zeros(cols.stop - cols.start, d, dtype=acc_dtype, device=dev)
        part = plan.pad(part.to(acc_dtype))
        if q != plan.p:
            parts.append(part)
            part = None
            continue
        mine = part if total is None else total.add_(part)
        part = total = None
        if s == 0:
            return mine  # the own block comes last: the sum from every other group is in
        # the sum moves on one step behind the texts; the last hop brings it to its owner
        incoming = plan.channel.exchange(mine, torch.empty_like(mine), tag=_GRAD_TAG)
        mine = None
    raise AssertionError("unreachable: the walk ends with the own block")


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

        for _, src, q, holder in _walk(plan, plan.pad(text.detach()), own_last=False):
            piece = holder.pop()
            cols = plan.columns(src, q)
            shift[cols] = common.logit_bound(piece, scale, bias, header.image_norm_max)
            guard.run(tile, cols, piece)
            piece = None
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

        def piece_grads(cols, piece):
            d_i, d_t = tiles.softmax_grads(image, piece, scale, bias, rl, col_lse[cols], w.a_row, w.a_col[cols],
                                           w.b_row, None if w.b_col is None else w.b_col[cols], impl)
            d_image.add_(d_i)
            return d_t

        d_text = _ring_text_grads(plan, plan.pad(text.detach()), guard, piece_grads)
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

        for _, _, _, holder in _walk(plan, plan.pad(text.detach()), own_last=False):
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

        def piece_grads(cols, piece):
            d_i, d_t, d_s, d_b = tiles.sigmoid_grads(image, piece, scale, bias, w, impl)
            acc[0] += d_i
            acc[1] += d_s
            acc[2] += d_b
            return d_t

        d_text = _ring_text_grads(plan, plan.pad(text.detach()), guard, piece_grads)
        failed = guard.flag(dev)
        dist.all_reduce(failed, group=layout.group)
        guard.raise_if_failed(failed.item(), "backward pass")
        d_image, d_text, d_scale, d_bias = common.siglip_positive_grads(
            g, image, text, scale, acc[0], d_text[:b_r], acc[1], acc[2])
        return (d_image.to(image.dtype), d_text.to(text.dtype), d_scale.reshape(scale.shape).to(scale.dtype),
                d_bias.reshape(bias.shape).to(bias.dtype) if has_bias else None, None, None, None)
