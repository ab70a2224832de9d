"""The ``ring`` exchange: per-rank loss memory O(g*B*D + W*B), flat in the world size.

Ranks form ``k = W / g`` groups of ``g`` consecutive ranks; rank r = (group j, position p). The
*piece* of a rank is its (padded) texts; a group's *block* is the pieces of its g ranks. Images stay
on their rank. Every tile op runs on one column chunk of one piece at a time (``B x R`` tiles
against this rank's images, below), so at most one group member's chunk and one chunk-sized
gradient are in the tiles' hands.

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

column chunks: each pass above runs once per column chunk of the pieces (:func:`chunking`: ``c``
          chunks of ``R`` rows, ``R >= CHUNK_ROWS``, ``c <= MAX_CHUNKS``), so that every buffer that
          travels or waits (ring pieces, other members' pieces, partials, sums) and the kernel's tile
          is a chunk's, ``R*D``; the image gradient is accumulated over the chunks, the text
          gradient filled chunk by chunk.

Peak per rank (backward, the C++ tiles, ``c = 4`` chunks): the image gradient, one kernel call's
image-row gradient and the text gradient (``B*D`` each), then per chunk the ring piece, one other
member's piece or the next ring piece, the sum in flight, the kernel's tile and its chunk of text
gradient (``R*D`` each, the tile ``B*R``): about 4.5 B*D in the steady state (k >= 3), 4.25 at
k = 2, 4 at k = 1 (measured at B=1024, D=512 fp32: 9.1, 8.5 and 8.0 MiB); plus O(W*B) statistics.
Without the chunks (one pass over whole pieces) it was 8, 7 and 6 B*D.

Elements sent per rank and step: forward (W-1)*B*D (as ``gather``); backward (W-1)*B*D of texts again
plus (W-1)*B*D of gradients (in the accumulation dtype: (g-1)*B*D of partials in the group and
(k-1)*B*D of sums on the ring), in ``c`` times as many messages of a chunk each (plus the padding of
the last chunk where ``c`` does not divide B). Saved for backward: the inputs, the row log-sum-exp
[B] and the column log-sum-exp [N]: no texts of other ranks.

A rank whose tile compute raises keeps taking part in every exchange (with its work skipped and zero
partials sent), so the others finish the pass; then every rank raises (the failing one with its own
error). Nothing hangs.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.distributed import common
from mmfast.distributed.comm import RingChannel, combine_column_stats, p2p
from mmfast.distributed.groups import GroupLayout
from mmfast.distributed.labels import ClipPositiveGrads, ClipPositives, SigLipPositives
from mmfast.ops import contrastive as tiles
from mmfast.ops.contrastive_loss import positive_logits, siglip_loss_value

_TEXT_TAG, _GRAD_TAG, _PIECE_TAG, _PART_TAG = 11, 12, 13, 14


class RingFailure(RuntimeError):
    """Raised on every rank when the tile compute of some rank failed during a ring pass."""


#: The ring cuts every piece into column chunks and runs one whole pass of the walk per chunk: what
#: is in flight (the next ring piece, the gradient sum) and the kernel's tile shrink with the chunk,
#: so the buffers that depend on the number of groups are a fraction of a piece. A chunk has at least
#: ``CHUNK_ROWS`` rows (the tiles stay efficient) and ``CHUNK_BYTES`` of features (each message's
#: fixed latency, ~5 us, stays small beside its transfer: 5 us at 50 GB/s is 250 KB), and there are
#: at most ``MAX_CHUNKS``. Each chunk costs one more message per step: where the ring is bound by
#: latency, fewer chunks are faster and hold more memory (docs/scaling.md has both at W = 512).
CHUNK_ROWS = 256
CHUNK_BYTES = 512 * 1024
MAX_CHUNKS = 4


def chunking(bmax: int, row_bytes: int) -> tuple[int, int]:
    """``(chunks, rows)``: into how many column chunks the ring cuts pieces of ``bmax`` rows of
    ``row_bytes`` each, and the rows of one chunk (``chunks * rows >= bmax``). The most chunks the
    limits allow, fewer where fewer divide ``bmax`` evenly (no padding sent); where none does, the
    most, with the tail zero padded."""
    most = max(1, min(MAX_CHUNKS, bmax // CHUNK_ROWS, bmax * row_bytes // CHUNK_BYTES))
    c = next((c for c in range(most, 1, -1) if bmax % c == 0), most)
    return c, -(-bmax // c)


class _Plan:
    """Geometry of one call: the order of the pieces, their columns and padding, the peers. The walk
    runs on the plan of one column chunk (:meth:`chunk`), which adds the chunk's ``sizes``, ``offs``,
    ``bmax`` and first row ``lo``."""

    def __init__(self, layout: GroupLayout, sizes: list[int], text: Tensor):
        self.layout = layout
        self.g, self.k, self.j, self.p = layout.group_size, layout.num_groups, layout.group_index, layout.position
        self.chunks, self.rows = chunking(max(sizes), text.shape[1] * text.element_size())
        self._sizes, self._offs = sizes, common.offsets(sizes)
        self.channel = None
        if layout.column is not None:
            ranks = [self._global(jj * self.g + self.p) for jj in range(self.k)]
            self.channel = RingChannel(layout.column, ranks, self.j)
        # the other members of the group, in the order their pieces are worked on
        self.others = [(self.p + i) % self.g for i in range(1, self.g)]
        self.peer = {q: self._global(self.j * self.g + q) for q in self.others}

    def chunk(self, i: int) -> _Plan:
        """This plan for column chunk ``i``: rows ``[i * rows, (i + 1) * rows)`` of every piece."""
        c = copy.copy(self)
        c.lo = lo = i * self.rows
        c.sizes = [min(max(s - lo, 0), self.rows) for s in self._sizes]
        c.offs = [o + lo for o in self._offs]
        c.bmax = self.rows
        return c

    def piece(self, text: Tensor) -> Tensor:
        """This rank's rows of the chunk, ``[bmax, D]`` (a view of ``text``, or a padded copy)."""
        return self.pad(text[self.lo:self.lo + self.bmax])

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
    """The ring backward, one pass per column chunk: ``piece_grads(cols, piece)`` returns this rank's
    text-gradient partial of one piece (its rows, accumulation dtype) and accumulates everything else
    itself. Returns this rank's summed text gradient, ``[chunks * rows, D]`` (rows past its batch:
    padding)."""
    if plan.chunks == 1:
        cp = plan.chunk(0)
        return _chunk_text_grads(cp, cp.piece(text), guard, piece_grads)
    d_text = text.new_empty((plan.chunks * plan.rows, text.shape[1]), dtype=common.compute_dtype(text))
    for i in range(plan.chunks):
        cp = plan.chunk(i)
        d_text[cp.lo:cp.lo + cp.bmax].copy_(_chunk_text_grads(cp, cp.piece(text), guard, piece_grads))
    return d_text


def _chunk_text_grads(plan: _Plan, text: Tensor, guard: _Guard, piece_grads) -> Tensor:
    """One column chunk's pass of :func:`_ring_text_grads`; ``text``: this rank's rows of the chunk."""
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
        piece = holder.pop()
        part = guard.run(piece_grads, cols, piece) if piece.shape[0] else None
        piece = None
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
    def forward(ctx, image, text, scale, bias, layout, header, local_loss, gather_with_grad, impl, lab=None):
        plan = _Plan(layout, header.sizes, text)
        dt, dev, n = common.compute_dtype(image), image.device, header.total
        col_lse = torch.full((n,), float("-inf"), dtype=dt, device=dev)
        col_el = torch.zeros(n, dtype=dt, device=dev)
        shift = torch.zeros(n, dtype=torch.float64, device=dev)
        rows = [None, None]
        guard = _Guard()
        pp = None if lab is None else ClipPositives(lab, image, n)

        def tile(cols, block):
            rl, re, cl, ce = tiles.softmax_stats(image, block, scale, bias, impl)
            rows[0], rows[1] = common.merge_lse(rows[0], rows[1], rl, re)
            col_lse[cols], col_el[cols] = cl, ce
            if pp is not None:
                pp.add(cols, block)

        for i in range(plan.chunks):
            cp = plan.chunk(i)
            for _, src, q, holder in _walk(cp, cp.piece(text.detach()), own_last=False):
                piece = holder.pop()
                if piece.shape[0]:
                    cols = cp.columns(src, q)
                    shift[cols] = common.logit_bound(piece, scale, bias, header.image_norm_max)
                    guard.run(tile, cols, piece)
                piece = None
        pos = positive_logits(image, text, scale, bias, dt) if pp is None else pp.row_means(image, scale, bias)
        if guard.error is None:
            row_terms = common.clip_loss_terms(rows[0], rows[1], pos)
        else:
            row_terms = torch.zeros(3, dtype=dt, device=dev)
            col_lse.fill_(float("-inf"))
        extra = torch.cat([row_terms.double(), guard.flag(dev)] + ([] if pp is None else [pp.col_dots.double()]))
        col_lse, col_el, extra_all = combine_column_stats(col_lse, col_el, shift, extra, layout.group)
        guard.raise_if_failed(extra_all[3].item(), "forward pass")
        col_pos = pos
        if pp is not None:  # the mean positive logit of this rank's text columns
            off = header.offsets[layout.rank]
            col_pos = pp.col_means(extra_all[4:], scale, bias)[off:off + text.shape[0]]
        loss, dscale = common.clip_finish(header, layout.rank, local_loss, scale, row_terms, extra_all[:3],
                                          col_lse, col_el, col_pos)
        ctx.save_for_backward(image, text, scale, bias, rows[0], col_lse, dscale)
        ctx.meta = (layout, header, local_loss, gather_with_grad, impl, lab)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias, rl, col_lse, dscale = ctx.saved_tensors
        layout, header, local_loss, gwg, impl, lab = ctx.meta
        plan = _Plan(layout, header.sizes, text)
        dt, dev = rl.dtype, image.device
        w = common.clip_weights(grad, header.sizes, layout, local_loss, gwg, dt)
        d_image = torch.zeros(image.shape, dtype=dt, device=dev)
        guard = _Guard()
        pg = None if lab is None else ClipPositiveGrads(lab, image, w)
        s = scale.to(dt).reshape(())

        def piece_grads(cols, piece):
            d_i, d_t = tiles.softmax_grads(image, piece, scale, bias, rl, col_lse[cols], w.a_row, w.a_col[cols],
                                           w.b_row, None if w.b_col is None else w.b_col[cols], impl)
            d_image.add_(d_i)
            if pg is not None:
                d_t.sub_(pg.text_part(cols, piece).mul_(s))
            return d_t

        d_text = _ring_text_grads(plan, text.detach(), guard, piece_grads)
        failed = guard.flag(dev)
        dist.all_reduce(failed, group=layout.group)
        guard.raise_if_failed(failed.item(), "backward pass")
        if pg is not None:
            d_image.sub_(pg.image_part().mul_(s))
        return (*common.clip_grads_out(w, layout.rank, header, image, text, scale, bias, grad, dscale, d_image,
                                       d_text[:text.shape[0]], positives=pg is None), None, None, None, None, None,
                None)


class SigLipRingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, layout, header, impl, lab=None):
        plan = _Plan(layout, header.sizes, text)
        dt, dev = common.compute_dtype(image), image.device
        total = [torch.zeros(image.shape[0], dtype=dt, device=dev)]
        guard = _Guard()
        sp = None if lab is None else SigLipPositives(lab, image)

        def tile(cols, block):
            total[0] = total[0] + tiles.sigmoid_rowsum(image, block, scale, bias, impl)
            if sp is not None:
                sp.add(cols, block)

        for i in range(plan.chunks):
            cp = plan.chunk(i)
            for _, src, q, holder in _walk(cp, cp.piece(text.detach()), own_last=False):
                piece = holder.pop()
                if piece.shape[0]:
                    guard.run(tile, cp.columns(src, q), piece)
                piece = None
        failed = guard.flag(dev)
        dist.all_reduce(failed, group=layout.group)
        guard.raise_if_failed(failed.item(), "forward pass")
        if sp is None:
            loss = siglip_loss_value(total[0], image, text, scale, bias)
        else:
            loss = sp.loss(total[0], image, scale, bias)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.meta = (layout, header, impl, lab)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias = ctx.saved_tensors
        layout, header, impl, lab = ctx.meta
        plan = _Plan(layout, header.sizes, text)
        dt, dev = common.compute_dtype(image), image.device
        b_r = image.shape[0]
        g = grad.to(dt).reshape(())
        w = (g / b_r).expand(b_r).contiguous()
        acc = [torch.zeros(image.shape, dtype=dt, device=dev), torch.zeros((), dtype=dt, device=dev),
               torch.zeros((), dtype=dt, device=dev)]
        guard = _Guard()
        sp = None if lab is None else SigLipPositives(lab, image)
        cs = g / b_r * scale.to(dt).reshape(())

        def piece_grads(cols, piece):
            d_i, d_t, d_s, d_b = tiles.sigmoid_grads(image, piece, scale, bias, w, impl)
            acc[0] += d_i
            acc[1] += d_s
            acc[2] += d_b
            if sp is not None:
                d_t.sub_(sp.text_part(cols, piece).mul_(cs))
            return d_t

        d_text = _ring_text_grads(plan, text.detach(), guard, piece_grads)
        failed = guard.flag(dev)
        dist.all_reduce(failed, group=layout.group)
        guard.raise_if_failed(failed.item(), "backward pass")
        return (*common.siglip_grads_out(g, image, text, scale, bias, acc[0], d_text[:b_r], acc[1], acc[2], sp),
                None, None, None, None)
