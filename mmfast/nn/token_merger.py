"""``TokenMerger``: one ToMe merge step as a module, e.g. in a vision-language connector."""

from __future__ import annotations

from torch import Tensor, nn

from mmfast import functional as MF
from mmfast.reference.tome import as_count

__all__ = ["TokenMerger"]


class TokenMerger(nn.Module):
    """Merge ``r`` tokens of ``x`` by ToMe's bipartite soft matching (no parameters).

    Args:
        r: tokens to remove per call (clamped as in ToMe to ``(N - protected) // 2``).
        class_token: never merge token 0 (ToMe's ``class_token``).
        distill_token: never merge into token 1 (ToMe's ``distill_token``; see the caveat in
            :mod:`mmfast.reference.tome` about its position after a merge).
        prop: proportional merging. ``True``: a merged token is the average of its parts weighted
            by their ``size`` (ToMe's ``merge_wavg``: the mean over the original tokens, what
            proportional attention downstream assumes). ``False``: the parts of each merge count
            equally whatever their size. The two agree when ``size`` is ``None`` (all sizes 1).

    ``forward(x [B, N, C], metric=None, size=None) -> (x [B, N - r', C], size [B, N - r', 1])``,
    with ``metric`` ``[B, N, C']`` the matching features (``x`` when ``None``; the matching itself
    takes no gradient, the merge does) and ``size`` ``[B, N, 1]`` the incoming token sizes (ones
    when ``None``). The returned size is always the sum of the merged sizes. The result is
    ``[unmerged A tokens, B tokens]`` in ToMe's order (see :mod:`mmfast.reference.tome`).
    """

    def __init__(self, r: int, class_token: bool = False, distill_token: bool = False, prop: bool = False) -> None:
        super().__init__()
        self.r = as_count(r, "r")
        self.class_token = bool(class_token)
        self.distill_token = bool(distill_token)
        self.prop = bool(prop)

    def extra_repr(self) -> str:
        return f"r={self.r}, class_token={self.class_token}, distill_token={self.distill_token}, prop={self.prop}"

    def forward(self, x: Tensor, metric: Tensor | None = None, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.dim() != 3:
            raise ValueError(f"TokenMerger: x must be [B, N, C], got shape {tuple(x.shape)}")
        metric = x if metric is None else metric
        if metric.dim() != 3 or metric.shape[:2] != x.shape[:2]:
            raise ValueError(f"TokenMerger: metric must be [B, N, C'] with x's B and N {tuple(x.shape[:2])}, "
                             f"got {tuple(metric.shape)}")
        if size is not None and (size.dim() != 3 or size.shape[:2] != x.shape[:2] or size.shape[2] != 1):
            raise ValueError(f"TokenMerger: size must be [{x.shape[0]}, {x.shape[1]}, 1], got {tuple(size.shape)}")
        merge, _ = MF.bipartite_soft_matching(metric, self.r, class_token=self.class_token,
                                              distill_token=self.distill_token)
        if self.prop or size is None:
            return MF.merge_wavg(merge, x, size)
        return merge(x, mode="mean"), merge(size, mode="sum")
