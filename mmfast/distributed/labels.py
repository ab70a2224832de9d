"""Labels in the distributed losses: what each rank needs to know of the global batch's labels.

Pair (i, j) of the global batch is positive when ``labels[i] == labels[j]``. Every positive-pair term
of the labelled losses factorises through *class sums*: for an image row i of this rank,
``sum_{j in P(i)} l_ij = scale * image_i . T[y_i] + c_i * bias`` with ``T[y]`` the sum of the global
texts of label y and ``c_i`` the size of its class; the gradients are class sums too. So the labels
are exchanged once per call (one all-gather of ``W * B`` integers: every rank then knows every
column's label and class size), and as text blocks pass through the tile loops of a scheme, each
rank adds them into the sums of *its own* classes (``K <= B`` of them, ``[K, D]``) and reads its own
images' class sums at the blocks' labels. Nothing of size B x N is formed, and beyond the O(N)
integers a rank keeps O(B*D).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.distributed import common
from mmfast.distributed.groups import GroupLayout

#: rows per slice when a [rows, D] temporary is formed from a block (a bound on its size)
_SLICE_ROWS = 1024


class GlobalLabels:
    """This rank's view of the global batch's labels (built collectively: every rank, once per call).

    ``col_class[j]``: the class of this rank of global column j's label, ``K`` (a zero row of every
    sum) where this rank has no sample of that label; ``col_count[j]``: the global size of column
    j's class; ``inv`` / ``row_count``: this rank's samples' classes and global class sizes."""

    def __init__(self, labels: Tensor, sizes: list[int], offset: int, layout: GroupLayout, dt: torch.dtype):
        bmax = max(sizes)
        mine = labels.contiguous()
        if mine.shape[0] < bmax:
            mine = torch.cat([mine, mine.new_zeros(bmax - mine.shape[0])])
        padded = mine.new_empty(layout.world_size * bmax)
        dist.all_gather_into_tensor(padded, mine, group=layout.group)
        everyone = common.unpad(padded, sizes, list(range(layout.world_size)))
        _, col_inv, counts = torch.unique(everyone, return_inverse=True, return_counts=True)
        self.col_count = counts.to(dt).index_select(0, col_inv)  # [N]
        keys, self.inv = torch.unique(labels, return_inverse=True)
        self.k = keys.shape[0]
        at = torch.searchsorted(keys, everyone).clamp_(max=self.k - 1)
        self.col_class = torch.where(keys.index_select(0, at) == everyone, at, self.k)  # [N]
        self.row_count = self.col_count[offset:offset + labels.shape[0]]
        self.dt = dt

    def sums(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """``[K + 1, D]``: the class sums of this rank's rows ``x`` (times ``weight [B]``), row K zero."""
        x = x.to(self.dt) if weight is None else x.to(self.dt) * weight[:, None]
        return x.new_zeros(self.k + 1, x.shape[1]).index_add_(0, self.inv, x)

    def zeros(self, d: int, device) -> Tensor:
        return torch.zeros(self.k + 1, d, dtype=self.dt, device=device)

    def add_columns(self, acc: Tensor, cols, block: Tensor, weight: Tensor | None = None) -> None:
        """``acc[K + 1, D] +=`` the texts ``block`` of global columns ``cols`` (times ``weight``), each
        into its label's class of this rank (none where this rank has no such label)."""
        cls = self.col_class[cols]
        for lo in range(0, block.shape[0], _SLICE_ROWS):
            part = block[lo:lo + _SLICE_ROWS].to(self.dt)
            if weight is not None:
                part = part * weight[lo:lo + _SLICE_ROWS, None]
            acc.index_add_(0, cls[lo:lo + _SLICE_ROWS], part)

    def column_dots(self, sums: Tensor, cols, block: Tensor) -> Tensor:
        """``[len(cols)]``: ``block_j . sums[class of column j]`` (0 where this rank has no such label)."""
        cls = self.col_class[cols]
        out = []
        for lo in range(0, block.shape[0], _SLICE_ROWS):
            part = block[lo:lo + _SLICE_ROWS].to(self.dt)
            out.append((part * sums.index_select(0, cls[lo:lo + _SLICE_ROWS])).sum(1))
        return torch.cat(out) if out else block.new_zeros(0, dtype=self.dt)

    def at_columns(self, sums: Tensor, cols, coef: Tensor | None = None) -> Tensor:
        """``[len(cols), D]``: ``sums[class of column j]`` (times ``coef [len(cols)]``)."""
        out = sums.index_select(0, self.col_class[cols])
        return out if coef is None else out.mul_(coef[:, None])

    def at_rows(self, sums: Tensor, coef: Tensor | None = None) -> Tensor:
        """``[B, D]``: ``sums[class of row i]`` (times ``coef [B]``)."""
        out = sums.index_select(0, self.inv)
        return out if coef is None else out.mul_(coef[:, None])


class ClipPositives:
    """Forward of the labelled CLIP loss on one rank: the text blocks of every global column pass
    through :meth:`add` (each column once); then :meth:`row_means` is each image row's mean logit
    over its positive texts and, after the column partials are summed over the ranks,
    :meth:`col_means` each text column's over its positive images."""

    def __init__(self, lab: GlobalLabels, image: Tensor, n: int):
        self.lab = lab
        self.image_sums = lab.sums(image)  # A: this rank's images per class
        self.text_sums = lab.zeros(image.shape[1], image.device)  # T: the global texts per class
        self.col_dots = torch.zeros(n, dtype=lab.dt, device=image.device)  # this rank's part of b_j . A[y_j]

    def add(self, cols, block: Tensor) -> None:
        self.lab.add_columns(self.text_sums, cols, block)
        self.col_dots[cols] = self.lab.column_dots(self.image_sums, cols, block)

    def row_means(self, image: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        lab = self.lab
        dots = (image.to(lab.dt) * lab.at_rows(self.text_sums)).sum(1)
        mean = scale.to(lab.dt).reshape(()) * dots / lab.row_count
        return mean if bias is None else mean + bias.to(lab.dt).reshape(())

    def col_means(self, col_dots_all: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        lab = self.lab
        mean = scale.to(lab.dt).reshape(()) * col_dots_all.to(lab.dt) / lab.col_count
        return mean if bias is None else mean + bias.to(lab.dt).reshape(())


class ClipPositiveGrads:
    """Backward of the labelled CLIP loss on one rank, for the weights ``w``
    (:class:`~mmfast.distributed.common.ClipWeights`): the positive part of the logit gradient is
    ``-[y_i == y_j] (row_w_i / c_i + col_w_j / c_j)``. :meth:`text_part` is this rank's share of it
    for a block of text columns (times -scale: to add to their partials), and once every column has
    passed, :meth:`image_part` this rank's image rows'."""

    def __init__(self, lab: GlobalLabels, image: Tensor, w):
        self.lab, self.w = lab, w
        d = image.shape[1]
        b_row = w.a_row if w.b_row is None else w.b_row
        self.b_col = w.a_col if w.b_col is None else w.b_col
        self.image_sums = lab.sums(image)
        self.image_row_w = lab.sums(image, b_row.to(lab.dt) / lab.row_count)
        self.text_sums = lab.zeros(d, image.device)
        self.text_col_w = lab.zeros(d, image.device)

    def text_part(self, cols, block: Tensor) -> Tensor:
        """``[len(cols), D]``: sum over this rank's images i of label y_j of (b_row_i / c_i + b_col_j /
        c_j) a_i; it also adds the block into the sums :meth:`image_part` needs."""
        lab, c = self.lab, self.lab.col_count[cols]
        lab.add_columns(self.text_sums, cols, block)
        lab.add_columns(self.text_col_w, cols, block, self.w.a_col[cols].to(lab.dt) / c)
        out = lab.at_columns(self.image_sums, cols, self.b_col[cols].to(lab.dt) / c)
        return out.add_(lab.at_columns(self.image_row_w, cols))

    def image_part(self) -> Tensor:
        """``[B, D]``: sum over the global texts j of label y_i of (a_row_i / c_i + a_col_j / c_j) b_j."""
        lab = self.lab
        out = lab.at_rows(self.text_sums, self.w.a_row.to(lab.dt) / lab.row_count)
        return out.add_(lab.at_rows(self.text_col_w))


class SigLipPositives:
    """The labelled SigLIP loss on one rank: the text blocks of every global column pass through
    :meth:`add` (forward and again in backward); :meth:`row_sums` is the sum of each image row's
    positive logits, :meth:`text_part` the positive pairs' share of a text block's gradient (times
    -scale * g / B) and :meth:`image_part` the image rows'."""

    def __init__(self, lab: GlobalLabels, image: Tensor):
        self.lab = lab
        self.image_sums = lab.sums(image)
        self.text_sums = lab.zeros(image.shape[1], image.device)

    def add(self, cols, block: Tensor) -> None:
        self.lab.add_columns(self.text_sums, cols, block)

    def row_sums(self, image: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        lab = self.lab
        total = scale.to(lab.dt).reshape(()) * (image.to(lab.dt) * lab.at_rows(self.text_sums)).sum(1)
        return total if bias is None else total + bias.to(lab.dt).reshape(()) * lab.row_count

    def loss(self, row_sums: Tensor, image: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        """This rank's loss from its rows' sums of softplus(l_ij) over every column."""
        return (row_sums.sum() - self.row_sums(image, scale, bias).sum()) / image.shape[0]

    def text_part(self, cols, block: Tensor) -> Tensor:
        self.add(cols, block)
        return self.lab.at_columns(self.image_sums, cols)

    def image_part(self) -> Tensor:
        return self.lab.at_rows(self.text_sums)
