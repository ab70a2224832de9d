"""Exact CLIP and SigLIP losses across ranks with a grouped all-gather.

Images stay on their rank; text features travel. Rank r = (group k, position p) computes the tiles of
its image rows against every text column, and:

forward:  its texts are all-gathered over its ``column`` (the ranks at position p of every group: one
          per node, the network), then that column block is all-gathered inside the group
          (``intra``: NVLink), asynchronously, while the tiles of the column block are computed. Each
          remote text crosses the network into a node once, not once per rank of the node. CLIP also
          combines the column log-sum-exp partials of every rank (two all-reduces of N floats).
backward: the mirror: text-gradient partials are reduce-scattered inside the group (asynchronously,
          while the column block's tiles are computed), then over the column. Image gradients are
          complete locally.

Elements sent per rank per step: (W-1)*B*D forward + (W-1)*B*D backward, plus O(W*B) for the
log-sum-exp exchange: half of open_clip's local_loss + gather_with_grad (4(W-1)*B*D); of that only
(W/g - 1)*B*D each way crosses the network. Unequal local batch sizes are supported (blocks are
padded to the largest one for the collectives).

Gradient semantics are open_clip's, per flag (see mmfast.reference.contrastive.simulate_ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.distributed.groups import GroupLayout, get_layout
from mmfast.ops import contrastive as tiles
from mmfast.ops.contrastive_loss import positive_logits

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _info_device(group, like: Tensor | None) -> torch.device:
    if like is not None and like.device.type != "meta":
        return like.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def report_bad_input(group, like: Tensor | None) -> None:
    """Take part in the size exchange with a 'bad input' flag, so the other ranks raise too."""
    dev = _info_device(group, like)
    info = torch.tensor([0, 0, -1, 0], dtype=torch.int64, device=dev)
    out = torch.empty(dist.get_world_size(group) * 4, dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(out, info, group=group)


def exchange_sizes(image: Tensor, text: Tensor, layout: GroupLayout) -> list[int]:
    """All-gather (B, D, dtype, ok) from every rank; raise the same error on every rank when they
    disagree, so a bad input on one rank never leaves the others blocked in a later collective."""
    ok = 1  # inputs were validated on this rank before the exchange
    info = torch.tensor([image.shape[0], image.shape[1], _DTYPE_CODES.get(image.dtype, -1), ok],
                        dtype=torch.int64, device=image.device)
    out = torch.empty(layout.world_size * 4, dtype=torch.int64, device=image.device)
    dist.all_gather_into_tensor(out, info, group=layout.group)
    rows = out.view(layout.world_size, 4).tolist()
    bad = [r for r, row in enumerate(rows) if not row[3]]
    if bad:
        raise ValueError(f"bad contrastive-loss input on rank(s) {bad} (see the error raised there)")
    if len({row[1] for row in rows}) != 1:
        raise ValueError(f"embedding size D differs across ranks: {[row[1] for row in rows]}")
    if len({row[2] for row in rows}) != 1:
        raise ValueError("feature dtype differs across ranks")
    sizes = [row[0] for row in rows]
    if min(sizes) < 1:
        raise ValueError(f"every rank needs at least one sample; local batch sizes are {sizes}")
    return sizes


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
        if not self.uneven:
            return padded
        idx = [r0 * self.bmax + i for r0, r in enumerate(ranks) for i in range(self.sizes[r])]
        return padded.index_select(0, torch.tensor(idx, device=padded.device))

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


def column_ranks(layout: GroupLayout) -> list[int]:
    g = layout.group_size
    return [j * g + layout.position for j in range(layout.num_groups)]


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def _column_split(layout: GroupLayout, sizes: list[int], device) -> tuple[Tensor, Tensor]:
    """Global column indices of (this rank's column block, every other column), each ascending."""
    offs = _offsets(sizes)
    mine = set(column_ranks(layout))
    own = [offs[r] + i for r in sorted(mine) for i in range(sizes[r])]
    other = [offs[r] + i for r in range(len(sizes)) if r not in mine for i in range(sizes[r])]
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return as_t(own), as_t(other)


def _merge_lse(lse_a: Tensor, el_a: Tensor, lse_b: Tensor, el_b: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse), torch.exp(lse_b - lse)
    return lse, wa * el_a + wb * el_b


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

    work = None
    if layout.intra is not None:
        full = padded_blocks(partial, list(range(layout.world_size)))  # rank order j * g + q
        by_pos = full.view(k, g, bmax, d).transpose(0, 1).contiguous()  # [g (dest position), k, bmax, D]
        grp = by_pos.new_empty(k * bmax, d)
        work = dist.reduce_scatter_tensor(grp, by_pos.view(g * k * bmax, d), group=layout.intra, async_op=True)
    own = padded_blocks(own_partial_fn(), ranks)  # [k * bmax, D]: computed while the group reduce-scatter runs
    if work is not None:
        work.wait()
        own = own + grp
    if layout.column is not None:
        mine = own.new_empty(bmax, d)
        dist.reduce_scatter_tensor(mine, own.contiguous(), group=layout.column)
    else:
        mine = own
    return mine[: sizes[layout.rank]]


class _ClipDistFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, layout, local_loss, gather_with_grad, impl):
        sizes = exchange_sizes(image, text, layout)
        r = layout.rank
        offs = _offsets(sizes)
        n_total = sum(sizes)
        ex = _TextExchange(text, sizes, layout)
        own_cols, other_cols = _column_split(layout, sizes, image.device)
        # the column block's tiles run while the group all-gather is in flight
        rl, re, cl_own, ce_own = tiles.softmax_stats(image, ex.own(), scale, bias, impl)
        texts = ex.wait_all()
        dt = rl.dtype
        col_lse = torch.full((n_total,), float("-inf"), dtype=dt, device=image.device)
        col_el = torch.zeros(n_total, dtype=dt, device=image.device)
        col_lse[own_cols], col_el[own_cols] = cl_own, ce_own
        if other_cols.numel():
            rl2, re2, cl2, ce2 = tiles.softmax_stats(image, texts.index_select(0, other_cols), scale, bias, impl)
            rl, re = _merge_lse(rl, re, rl2, re2)
            col_lse[other_cols], col_el[other_cols] = cl2, ce2
        # Column statistics over every rank's rows: max, then rescaled sums (O(N) floats).
        gmax = col_lse.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=layout.group)
        w = torch.exp(col_lse - gmax)
        sums = torch.stack([w, w * col_el])
        dist.all_reduce(sums, group=layout.group)
        col_lse = gmax + torch.log(sums[0])
        col_el = sums[1] / sums[0]

        b_r = sizes[r]
        mine = slice(offs[r], offs[r] + b_r)
        pos = positive_logits(image, text, scale, bias, dt)
        s = scale.to(dt).reshape(())
        row_term = (rl - pos).sum(), (re - pos).sum()
        col_term = (col_lse[mine] - pos).sum(), (col_el[mine] - pos).sum()
        if local_loss:
            loss = 0.5 * (row_term[0] + col_term[0]) / b_r
            dscale = 0.5 * (row_term[1] + col_term[1]) / b_r / s
        else:
            both = torch.stack([row_term[0] + col_term[0], row_term[1] + col_term[1]])
            dist.all_reduce(both, group=layout.group)
            loss = 0.5 * both[0] / n_total
            dscale = 0.5 * both[1] / n_total / s
        ctx.save_for_backward(image, texts, scale, bias, rl, col_lse, dscale)
        ctx.meta = (layout, sizes, local_loss, gather_with_grad, impl, bias is not None)
        ctx.mark_non_differentiable()
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, texts, scale, bias, rl, col_lse, dscale = ctx.saved_tensors
        layout, sizes, local_loss, gwg, impl, has_bias = ctx.meta
        r, dt = layout.rank, rl.dtype
        offs = _offsets(sizes)
        n_total, b_r = sum(sizes), sizes[r]
        g = grad.to(dt).reshape(())
        dev = image.device
        owner_b = torch.tensor([sizes[q] for q in range(len(sizes)) for _ in range(sizes[q])], dtype=dt,
                               device=dev)
        # Weights of P_row (row-indexed, this rank's rows) and P_col (column-indexed) in the
        # gradient of the image rows (a) and of the text columns (b); `scale_*` multiplies after.
        scale_img = scale_txt = g
        if local_loss and not gwg:
            a_row = torch.full((b_r,), 0.5 / b_r, dtype=dt, device=dev)
            a_col = torch.zeros(n_total, dtype=dt, device=dev)
            b_row = torch.zeros(b_r, dtype=dt, device=dev)
            b_col = 0.5 / owner_b
        elif local_loss and gwg:
            gs = torch.empty(layout.world_size, dtype=dt, device=dev)
            dist.all_gather_into_tensor(gs, g.reshape(1).contiguous(), group=layout.group)
            g_owner = torch.repeat_interleave(gs, torch.tensor(sizes, device=dev))
            a_row = torch.full((b_r,), 0.5 / b_r, dtype=dt, device=dev) * g
            a_col = 0.5 / owner_b * g_owner
            b_row, b_col = a_row, a_col
            scale_img = scale_txt = torch.ones((), dtype=dt, device=dev)
        else:
            if gwg:  # every rank's loss is the same global loss: the all-gather sums W copies
                g = g.clone()
                dist.all_reduce(g, group=layout.group)
                scale_img = scale_txt = g
            a_row = torch.full((b_r,), 0.5 / n_total, dtype=dt, device=dev)
            a_col = torch.full((n_total,), 0.5 / n_total, dtype=dt, device=dev)
            b_row, b_col = a_row, a_col
        same = b_row is a_row and b_col is a_col
        own_cols, other_cols = _column_split(layout, sizes, dev)
        d = image.shape[1]
        partial = torch.zeros(n_total, d, dtype=image.dtype, device=dev)
        d_image = torch.zeros(b_r, d, dtype=dt, device=dev)

        def grads(cols):
            d_i, d_t = tiles.softmax_grads(
                image, texts.index_select(0, cols), scale, bias, rl, col_lse[cols], a_row, a_col[cols],
                None if same else b_row, None if same else b_col[cols], impl)
            d_image.add_(d_i)
            return d_t.to(image.dtype)

        if other_cols.numel():
            partial.index_copy_(0, other_cols, grads(other_cols))
        # the column block's tiles run while the group reduce-scatter is in flight
        d_text = _reduce_text_grads(partial, sizes, layout, lambda: grads(own_cols)).to(dt)
        # Positive pairs (i, offs[r] + i) are on this rank: -l_ii in the row and the column terms.
        mine = slice(offs[r], offs[r] + b_r)
        s = scale.to(dt).reshape(())
        text_l, image_l = texts[mine].to(dt), image.to(dt)
        d_image -= s * (a_row + a_col[mine])[:, None] * text_l
        d_text -= s * (b_row + b_col[mine])[:, None] * image_l
        d_image, d_text = d_image * scale_img, d_text * scale_txt
        d_scale = (grad.to(dt).reshape(()) * dscale).reshape(scale.shape).to(scale.dtype)
        d_bias = torch.zeros_like(bias) if has_bias else None
        return d_image.to(image.dtype), d_text.to(image.dtype), d_scale, d_bias, None, None, None, None


class _SigLipDistFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, layout, impl):
        sizes = exchange_sizes(image, text, layout)
        ex = _TextExchange(text, sizes, layout)
        rows = tiles.sigmoid_rowsum(image, ex.own(), scale, bias, impl)
        texts = ex.wait_all()
        _, other_cols = _column_split(layout, sizes, image.device)
        if other_cols.numel():
            rows = rows + tiles.sigmoid_rowsum(image, texts.index_select(0, other_cols), scale, bias, impl)
        pos = positive_logits(image, text, scale, bias, rows.dtype)
        loss = (rows.sum() - pos.sum()) / image.shape[0]
        ctx.save_for_backward(image, texts, scale, bias)
        ctx.meta = (layout, sizes, impl, bias is not None)
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, texts, scale, bias = ctx.saved_tensors
        layout, sizes, impl, has_bias = ctx.meta
        r = layout.rank
        dt = torch.float64 if image.dtype == torch.float64 else torch.float32
        offs = _offsets(sizes)
        n_total, b_r, d = sum(sizes), sizes[r], image.shape[1]
        dev = image.device
        g = grad.to(dt).reshape(())
        w = (g / b_r).expand(b_r).contiguous()
        own_cols, other_cols = _column_split(layout, sizes, dev)
        partial = torch.zeros(n_total, d, dtype=image.dtype, device=dev)
        acc = {"d_image": torch.zeros(b_r, d, dtype=dt, device=dev),
               "d_scale": torch.zeros((), dtype=dt, device=dev), "d_bias": torch.zeros((), dtype=dt, device=dev)}

        def run(cols):
            d_i, d_t, d_s, d_b = tiles.sigmoid_grads(image, texts.index_select(0, cols), scale, bias, w, impl)
            acc["d_image"] += d_i
            acc["d_scale"] += d_s
            acc["d_bias"] += d_b
            return d_t.to(image.dtype)

        if other_cols.numel():
            partial.index_copy_(0, other_cols, run(other_cols))
        d_text = _reduce_text_grads(partial, sizes, layout, lambda: run(own_cols)).to(dt)
        mine = slice(offs[r], offs[r] + b_r)
        s = scale.to(dt).reshape(())
        text_l, image_l = texts[mine].to(dt), image.to(dt)
        c = g / b_r
        d_image = acc["d_image"] - c * s * text_l
        d_text = d_text - c * s * image_l
        d_scale = acc["d_scale"] - c * (image_l * text_l).sum()
        d_bias = acc["d_bias"] - g
        return (d_image.to(image.dtype), d_text.to(image.dtype), d_scale.reshape(scale.shape).to(scale.dtype),
                d_bias.reshape(bias.shape).to(bias.dtype) if has_bias else None, None, None)


def clip_loss_distributed(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, *, group,
                          group_size: int, local_loss: bool, gather_with_grad: bool, impl: str) -> Tensor:
    layout = get_layout(group, group_size)
    return _ClipDistFn.apply(image, text, scale, bias, layout, local_loss, gather_with_grad, impl)


def siglip_loss_distributed(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, *, group,
                            group_size: int, impl: str) -> Tensor:
    layout = get_layout(group, group_size)
    return _SigLipDistFn.apply(image, text, scale, bias, layout, impl)
