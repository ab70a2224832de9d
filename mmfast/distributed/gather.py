"""The ``gather`` exchange: every rank ends the forward pass with every text of the world (fewest bytes).

Images stay on their rank; text features travel. Rank r = (group k, position p) computes the tiles of
its image rows against every text column, and:

forward:  its texts are all-gathered over its ``column`` (the ranks at position p of every group: one
          per node, the network), then that column block is all-gathered inside the group
          (``intra``: NVLink), asynchronously, while the tiles of the column block are computed. Each
          remote text crosses the network into a node once, not once per rank of the node. CLIP then
          combines the column log-sum-exp partials of every rank in one all-reduce of 2N floats.
backward: the mirror: text-gradient partials are reduce-scattered inside the group (asynchronously,
          while the column block's tiles are computed), then over the column. Image gradients are
          complete locally.

Elements sent per rank per step: (W-1)*B*D forward + (W-1)*B*D backward, plus O(W*B) for the
statistics: half of open_clip's local_loss + gather_with_grad (4(W-1)*B*D); of that only
(W/g - 1)*B*D each way crosses the network. The texts of the world and their gradient partials are
kept: O(W*B*D) per rank (the ``ring`` exchange keeps O(g*B*D)). Unequal local batch sizes are
supported (blocks are padded to the largest one for the collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.distributed import common
from mmfast.distributed.comm import combine_column_stats, reduce_scatter
from mmfast.distributed.groups import GroupLayout
from mmfast.distributed.labels import ClipPositiveGrads, ClipPositives, SigLipPositives
from mmfast.ops import contrastive as tiles
from mmfast.ops.contrastive_loss import positive_logits, siglip_loss_value


def column_ranks(layout: GroupLayout) -> list[int]:
    g = layout.group_size
    return [j * g + layout.position for j in range(layout.num_groups)]


class _TextExchange:
    """Texts of every rank: the column block first, everything when the group gather arrives."""

    def __init__(self, text: Tensor, sizes: list[int], layout: GroupLayout):
        self.layout, self.sizes = layout, sizes
        self.bmax = max(sizes)
        self.uneven = len(set(sizes)) > 1
        g, k = layout.group_size, layout.num_groups
        local = text.detach()
        if self.uneven and local.shape[0] < self.bmax:
            local = torch.cat([local, local.new_zeros(self.bmax - local.shape[0], local.shape[1])])
        local = local.contiguous()
        if layout.column is not None:
            col = local.new_empty(k * self.bmax, local.shape[1])
            dist.all_gather_into_tensor(col, local, group=layout.column)
        else:
            col = local
        self.column_block = col  # texts of ranks j * g + p, j = 0..k-1
        self._work = None
        if layout.intra is not None:
            self.by_position = col.new_empty(g * k * self.bmax, col.shape[1])  # [g (position), k, bmax, D]
            self._work = dist.all_gather_into_tensor(self.by_position, col, group=layout.intra, async_op=True)
        else:
            self.by_position = col

    def compact(self, padded: Tensor, ranks: list[int]) -> Tensor:
        """Rows of ``ranks`` without padding, from blocks of ``bmax`` rows in the order of ``ranks``."""
        return common.unpad(padded, self.sizes, ranks) if self.uneven else padded

    def own(self) -> Tensor:
        """The texts of this rank's column (ranks j * g + p), compact, in that rank order."""
        return self.compact(self.column_block, column_ranks(self.layout))

    def wait_all(self) -> Tensor:
        """Every rank's texts, compact, in rank order."""
        g, k, d = self.layout.group_size, self.layout.num_groups, self.column_block.shape[1]
        if self._work is not None:
            self._work.wait()
            self._work = None
        # [g (position), k (group), bmax, D] -> rank order j * g + q
        full = self.by_position.view(g, k, self.bmax, d).transpose(0, 1).reshape(g * k * self.bmax, d)
        return self.compact(full, list(range(self.layout.world_size)))


def _column_split(layout: GroupLayout, sizes: list[int], device) -> tuple[Tensor, Tensor]:
    """Global column indices of (this rank's column block, every other column), each ascending."""
    offs = common.offsets(sizes)
    mine = set(column_ranks(layout))
    own = [offs[r] + i for r in sorted(mine) for i in range(sizes[r])]
    other = [offs[r] + i for r in range(len(sizes)) if r not in mine for i in range(sizes[r])]
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return as_t(own), as_t(other)


def _reduce_text_grads(partial: Tensor, sizes: list[int], layout: GroupLayout, own_partial_fn) -> Tensor:
    """Sum text-gradient partials [N, D] of every rank into the owner's [B_r, D].

    ``partial`` holds this rank's partials for every column except its column block's (zeros there),
    which ``own_partial_fn()`` computes ([column-block rows, D]) while the group reduce-scatter runs.
    """
    g, k, bmax = layout.group_size, layout.num_groups, max(sizes)
    d = partial.shape[1]
    ranks = column_ranks(layout)

    def padded_blocks(rows: Tensor, order: list[int]) -> Tensor:
        """[len(order) * bmax, D]: rank blocks of ``rows`` (compact, global column order of ``order``)."""
        out = rows.new_zeros(len(order) * bmax, d)
        row = 0
        for i, r in enumerate(order):
            out[i * bmax:i * bmax + sizes[r]] = rows[row:row + sizes[r]]
            row += sizes[r]
        return out

    pending = None
    if layout.intra is not None:
        full = padded_blocks(partial, list(range(layout.world_size)))  # rank order j * g + q
        by_pos = full.view(k, g, bmax, d).transpose(0, 1).reshape(g * k * bmax, d)  # [g (dest position), k, ...]
        pending = reduce_scatter(by_pos, layout.intra, async_op=True)
    own = padded_blocks(own_partial_fn(), ranks)  # [k * bmax, D]: computed while the group reduce-scatter runs
    if pending is not None:
        own = own + pending.wait()
    mine = reduce_scatter(own, layout.column) if layout.column is not None else own
    return mine[: sizes[layout.rank]]


class ClipGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, layout, header, local_loss, gather_with_grad, impl, lab=None):
        sizes = header.sizes
        ex = _TextExchange(text, sizes, layout)
        own_cols, other_cols = _column_split(layout, sizes, image.device)
        pp = None if lab is None else ClipPositives(lab, image, header.total)
        # the column block's tiles run while the group all-gather is in flight
        own = ex.own()
        rl, re, cl_own, ce_own = tiles.softmax_stats(image, own, scale, bias, impl)
        if pp is not None:
            pp.add(own_cols, own)
        own = None
        texts = ex.wait_all()
        dt = rl.dtype
        col_lse = torch.full((header.total,), float("-inf"), dtype=dt, device=image.device)
        col_el = torch.zeros(header.total, dtype=dt, device=image.device)
        col_lse[own_cols], col_el[own_cols] = cl_own, ce_own
        if other_cols.numel():
            block = texts.index_select(0, other_cols)
            rl2, re2, cl2, ce2 = tiles.softmax_stats(image, block, scale, bias, impl)
            rl, re = common.merge_lse(rl, re, rl2, re2)
            col_lse[other_cols], col_el[other_cols] = cl2, ce2
            if pp is not None:
                pp.add(other_cols, block)
            block = None
        pos = positive_logits(image, text, scale, bias, dt) if pp is None else pp.row_means(image, scale, bias)
        row_terms = common.clip_loss_terms(rl, re, pos)
        shift = common.logit_bound(texts, scale, bias, header.image_norm_max)
        extra = row_terms if pp is None else torch.cat([row_terms, pp.col_dots])
        col_lse, col_el, extra_all = combine_column_stats(col_lse, col_el, shift, extra, layout.group)
        col_pos = pos
        if pp is not None:  # the mean positive logit of this rank's text columns
            off = header.offsets[layout.rank]
            col_pos = pp.col_means(extra_all[3:], scale, bias)[off:off + sizes[layout.rank]]
        loss, dscale = common.clip_finish(header, layout.rank, local_loss, scale, row_terms, extra_all[:3],
                                          col_lse, col_el, col_pos)
        ctx.save_for_backward(image, texts, scale, bias, rl, col_lse, dscale)
        ctx.meta = (layout, header, local_loss, gather_with_grad, impl, lab)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, texts, scale, bias, rl, col_lse, dscale = ctx.saved_tensors
        layout, header, local_loss, gwg, impl, lab = ctx.meta
        sizes, r, dt, dev = header.sizes, layout.rank, rl.dtype, image.device
        w = common.clip_weights(grad, sizes, layout, local_loss, gwg, dt)
        own_cols, other_cols = _column_split(layout, sizes, dev)
        d = image.shape[1]
        partial = torch.zeros(header.total, d, dtype=image.dtype, device=dev)
        d_image = torch.zeros(sizes[r], d, dtype=dt, device=dev)
        pg = None if lab is None else ClipPositiveGrads(lab, image, w)
        s = scale.to(dt).reshape(())

        def grads(cols):
            block = texts.index_select(0, cols)
            d_i, d_t = tiles.softmax_grads(
                image, block, scale, bias, rl, col_lse[cols], w.a_row, w.a_col[cols],
                w.b_row, None if w.b_col is None else w.b_col[cols], impl)
            d_image.add_(d_i)
            if pg is not None:
                d_t.sub_(pg.text_part(cols, block).mul_(s))
            return d_t.to(image.dtype)

        if other_cols.numel():
            partial.index_copy_(0, other_cols, grads(other_cols))
        # the column block's tiles run while the group reduce-scatter is in flight
        d_text = _reduce_text_grads(partial, sizes, layout, lambda: grads(own_cols)).to(dt)
        if pg is not None:
            d_image.sub_(pg.image_part().mul_(s))
        off = header.offsets[r]
        return (*common.clip_grads_out(w, r, header, image, texts[off:off + sizes[r]], scale, bias, grad, dscale,
                                       d_image, d_text, positives=pg is None), None, None, None, None, None, None)


class SigLipGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, layout, header, impl, lab=None):
        ex = _TextExchange(text, header.sizes, layout)
        own_cols, other_cols = _column_split(layout, header.sizes, image.device)
        sp = None if lab is None else SigLipPositives(lab, image)
        own = ex.own()
        rows = tiles.sigmoid_rowsum(image, own, scale, bias, impl)
        if sp is not None:
            sp.add(own_cols, own)
        own = None
        texts = ex.wait_all()
        if other_cols.numel():
            block = texts.index_select(0, other_cols)
            rows = rows + tiles.sigmoid_rowsum(image, block, scale, bias, impl)
            if sp is not None:
                sp.add(other_cols, block)
            block = None
        loss = siglip_loss_value(rows, image, text, scale, bias) if sp is None else sp.loss(rows, image, scale, bias)
        ctx.save_for_backward(image, texts, scale, bias)
        ctx.meta = (layout, header, impl, lab)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, texts, scale, bias = ctx.saved_tensors
        layout, header, impl, lab = ctx.meta
        sizes, r = header.sizes, layout.rank
        dt = common.compute_dtype(image)
        b_r, d, dev = sizes[r], image.shape[1], image.device
        g = grad.to(dt).reshape(())
        w = (g / b_r).expand(b_r).contiguous()
        own_cols, other_cols = _column_split(layout, sizes, dev)
        partial = torch.zeros(header.total, d, dtype=image.dtype, device=dev)
        acc = [torch.zeros(b_r, d, dtype=dt, device=dev), torch.zeros((), dtype=dt, device=dev),
               torch.zeros((), dtype=dt, device=dev)]

        sp = None if lab is None else SigLipPositives(lab, image)
        cs = g / b_r * scale.to(dt).reshape(())

        def run(cols):
            block = texts.index_select(0, cols)
            d_i, d_t, d_s, d_b = tiles.sigmoid_grads(image, block, scale, bias, w, impl)
            acc[0] += d_i
            acc[1] += d_s
            acc[2] += d_b
            if sp is not None:
                d_t.sub_(sp.text_part(cols, block).mul_(cs))
            return d_t.to(image.dtype)

        if other_cols.numel():
            partial.index_copy_(0, other_cols, run(other_cols))
        d_text = _reduce_text_grads(partial, sizes, layout, lambda: run(own_cols)).to(dt)
        off = header.offsets[r]
        return (*common.siglip_grads_out(g, image, texts[off:off + b_r], scale, bias, acc[0], d_text, acc[1], acc[2],
                                         sp), None, None, None, None)
