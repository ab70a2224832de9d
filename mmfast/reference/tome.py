"""Pure-torch reference of ToMe token merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Written from the algorithm as described in the paper and in mmfast's specification (not from ToMe's
code). This is the oracle the fused merging kernels are compared against, so the selection rules
below, tie-breaks included, are part of the contract.

Bipartite soft matching of ``N`` tokens with metric ``[B, N, C]``:

1. ``protected = class_token + distill_token``; the effective ``r`` is
   ``min(r, (N - protected) // 2)`` (see :func:`effective_r` for the one extra degenerate case).
   When it is 0, ``merge`` and ``unmerge`` return their input object unchanged.
2. The metric is normalised along the last dim (``metric / metric.norm(dim=-1, keepdim=True)``,
   so a zero-norm token gives NaN similarities: callers must not pass one). Tokens are split
   alternately: set A = tokens ``0, 2, 4, ...`` (``N_A = (N + 1) // 2`` of them), set
   B = tokens ``1, 3, 5, ...`` (``N_B = N // 2``). ``scores = A @ B^T``, ``[B, N_A, N_B]``.
3. ``class_token``: row 0 of ``scores`` (the class token, A's token 0) is ``-inf``, so it is never
   merged. ``distill_token``: column 0 (B's token 0 = token 1) is ``-inf``, so nothing merges into it.
4. Each A token's best destination ``node_idx`` is the argmax over B (exact tie: LOWEST B index)
   and ``node_max`` its score. A tokens are ordered by ``node_max`` descending, exact ties by LOWER
   A index first (a stable sort). The first ``r`` are merged (``src_idx``), their destinations are
   ``dst_idx = node_idx[src_idx]``, the rest stay (``unm_idx``).
5. Order of the unmerged A tokens (ToMe's behaviour, kept on purpose): with ``class_token`` they are
   re-sorted into ascending A index, so the class token stays at output index 0 and the spatial
   order of the survivors is kept; WITHOUT ``class_token`` they stay in descending-``node_max`` order.
6. ``merge(x)`` returns ``cat([x_A[unm_idx], x_B reduced with its sources], dim=1)``, i.e. the
   ``N_A - r`` unmerged A tokens followed by all ``N_B`` B tokens. B token ``j`` is reduced with
   every src merged into it with ``torch.Tensor.scatter_reduce(..., include_self=True)``.

All indices are positions INSIDE their set (A index ``i`` is token ``2 i``, B index ``j`` is token
``2 j + 1``), and int64.

Caveat of these semantics with ``distill_token``: after a merge the distillation token is B's first
token, at output index ``N_A - r``, not at index 1, so a later layer that passes
``distill_token=True`` protects whatever token now sits at index 1. Callers that merge in several
layers with a distillation token must move it back to index 1 themselves.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "MERGE_MODES",
    "as_count",
    "check_metric",
    "bipartite_soft_matching",
    "effective_r",
    "matching_indices",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "proportional_attention_bias",
    "similarity_scores",
]

#: Reductions accepted by ``merge(x, mode)``: those of ``torch.Tensor.scatter_reduce``.
MERGE_MODES = ("sum", "prod", "mean", "amax", "amin")

MergeFn = Callable[..., torch.Tensor]
UnmergeFn = Callable[[torch.Tensor], torch.Tensor]


def as_count(value: object, name: str) -> int:
    """``value`` as a non-negative Python int; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative int, got bool {value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be a non-negative int, got {out}")
    return out


def check_metric(metric: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(metric, torch.Tensor):
        raise TypeError(f"metric must be a torch.Tensor, got {type(metric).__name__}")
    if metric.dim() != 3:
        raise ValueError(f"metric must be 3-D [B, N, C], got shape {tuple(metric.shape)}")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be a floating-point tensor, got {metric.dtype}")
    b, n, c = metric.shape
    return b, n, c


def effective_r(num_tokens: int, r: int, class_token: bool = False, distill_token: bool = False) -> int:
    """The number of tokens a bipartite matching of ``num_tokens`` tokens actually merges.

    ``min(r, (num_tokens - class_token - distill_token) // 2)``, floored at 0. One extra rule: when
    ``distill_token`` leaves B with no legal destination (``num_tokens // 2 - distill_token <= 0``,
    which only happens for ``num_tokens == 3`` with a distillation token and no class token) the
    result is 0, since the formula alone would merge into the protected distillation token.

    Raises ``ValueError`` (naming ``r``) for a negative or non-integer ``r``.
    """
    r = as_count(r, "r")
    n = as_count(num_tokens, "num_tokens")
    protected = int(bool(class_token)) + int(bool(distill_token))
    r = min(r, (n - protected) // 2)
    if n // 2 - int(bool(distill_token)) <= 0:
        r = 0
    return max(r, 0)


def similarity_scores(
    metric: torch.Tensor, class_token: bool = False, distill_token: bool = False
) -> torch.Tensor:
    """Masked cosine similarities of set A (even tokens) to set B (odd tokens).

    ``metric``: ``[B, N, C]``. Returns ``[B, N_A, N_B]`` in ``metric``'s dtype, with
    ``N_A = (N + 1) // 2``, ``N_B = N // 2``: ``scores[b, i, j] = <m_{2i}, m_{2j+1}>`` of the rows of
    ``metric / metric.norm(dim=-1, keepdim=True)``; row 0 is ``-inf`` if ``class_token``, column 0
    is ``-inf`` if ``distill_token``. Differentiable w.r.t. ``metric`` (the matching itself is not).
    """
    check_metric(metric)
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token and scores.shape[1] > 0:
        scores = scores.clone()
        scores[:, 0, :] = float("-inf")
    if distill_token and scores.shape[2] > 0:
        scores = scores.clone()
        scores[:, :, 0] = float("-inf")
    return scores


def matching_indices(
    metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bipartite soft matching as indices (what the fused kernels are compared against).

    ``metric``: ``[B, N, C]``. With ``r`` the effective r (:func:`effective_r`) and
    ``N_A = (N + 1) // 2``, returns int64 tensors on ``metric``'s device:

    * ``unm_idx`` ``[B, N_A - r]``: A indices of the unmerged A tokens, in output order (ascending
      with ``class_token``; descending ``node_max``, ties lower index first, without it).
    * ``src_idx`` ``[B, r]``: A indices of the merged A tokens, by descending ``node_max`` (ties:
      lower A index first).
    * ``dst_idx`` ``[B, r]``: B index each ``src_idx`` token merges into (argmax, ties: lowest).

    When the effective r is 0 this returns ``unm_idx = arange(N_A)`` and empty ``src_idx`` and
    ``dst_idx`` without computing scores; the callables of :func:`bipartite_soft_matching` then
    return their input unchanged (original interleaved token order), which is NOT what gathering
    with these indices would give, so kernels must special-case r == 0 the same way.
    """
    bsz, n, _ = check_metric(metric)
    r = effective_r(n, r, class_token, distill_token)
    n_a = (n + 1) // 2
    dev = metric.device
    if r == 0:
        unm = torch.arange(n_a, device=dev).expand(bsz, n_a).contiguous()
        empty = torch.empty(bsz, 0, dtype=torch.long, device=dev)
        return unm, empty, empty.clone()
    with torch.no_grad():
        scores = similarity_scores(metric, class_token, distill_token)
        # torch.argmax returns the first maximal index: the lowest-index tie-break.
        node_idx = scores.argmax(dim=-1)  # [B, N_A]
        node_max = scores.gather(-1, node_idx.unsqueeze(-1)).squeeze(-1)  # [B, N_A]
        # stable descending sort keeps equal node_max values in ascending A index order.
        order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices  # [B, N_A]
        src_idx = order[:, :r]
        unm_idx = order[:, r:]
        dst_idx = node_idx.gather(1, src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx.contiguous(), src_idx.contiguous(), dst_idx.contiguous()


def _check_tokens(x: torch.Tensor, bsz: int, n: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{what}: x must be 3-D [B, N, C], got shape {tuple(x.shape)}")
    if x.shape[0] != bsz or x.shape[1] != n:
        raise ValueError(
            f"{what}: x has batch {x.shape[0]} and {x.shape[1]} tokens but the matching was built for "
            f"batch {bsz} and {n} tokens (shape {tuple(x.shape)})"
        )


def _check_mode(mode: str) -> None:
    if mode not in MERGE_MODES:
        raise ValueError(f"merge: mode must be one of {MERGE_MODES}, got {mode!r}")


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False
) -> tuple[MergeFn, UnmergeFn]:
    """Build ToMe's ``(merge, unmerge)`` callables from ``metric`` ``[B, N, C]``.

    ``merge(x [B, N, C'], mode="mean") -> [B, N - r, C']``: the unmerged A tokens (order of
    :func:`matching_indices`) then the ``N_B`` B tokens, each B token reduced with the src tokens
    merged into it by ``scatter_reduce(reduce=mode, include_self=True)``; ``mode`` is one of
    :data:`MERGE_MODES`. ``C'`` is free (e.g. ``N`` for the source matrix).

    ``unmerge(x [B, N - r, C']) -> [B, N, C']``: B tokens back to the odd positions, unmerged A
    tokens back to their even positions, every merged src token gets a copy of its destination.

    ``r`` is clamped by :func:`effective_r`; when that is 0 both callables return ``x`` itself
    (after the shape checks). Both raise ``ValueError`` when ``x``'s batch or token count disagrees
    with ``metric``. The matching is computed once, here, without autograd; the callables are
    differentiable w.r.t. ``x``.
    """
    bsz, n, _ = check_metric(metric)
    r = effective_r(n, r, class_token, distill_token)
    if r == 0:

        def merge_identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
            _check_mode(mode)
            _check_tokens(x, bsz, n, "merge")
            return x

        def unmerge_identity(x: torch.Tensor) -> torch.Tensor:
            _check_tokens(x, bsz, n, "unmerge")
            return x

        return merge_identity, unmerge_identity

    unm_idx, src_idx, dst_idx = matching_indices(metric, r, class_token, distill_token)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        _check_mode(mode)
        _check_tokens(x, bsz, n, "merge")
        return merge_by_indices(x, unm_idx, src_idx, dst_idx, mode)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, bsz, n - r, "unmerge")
        return unmerge_by_indices(x, unm_idx, src_idx, dst_idx, n)

    return merge, unmerge


def merge_by_indices(
    x: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, mode: str = "mean"
) -> torch.Tensor:
    """ToMe's merge from the indices of :func:`matching_indices`: ``x [B, N, C] -> [B, N - r, C]``,
    the unmerged A tokens, then the B tokens each reduced with their src tokens
    (``scatter_reduce(reduce=mode, include_self=True)``)."""
    bsz, _, c = x.shape
    n_unm, r = unm_idx.shape[1], src_idx.shape[1]
    a, b = x[:, ::2], x[:, 1::2]
    unm = a.gather(1, unm_idx.unsqueeze(-1).expand(bsz, n_unm, c))
    src = a.gather(1, src_idx.unsqueeze(-1).expand(bsz, r, c))
    dst_index = dst_idx.unsqueeze(-1).expand(bsz, r, c)
    dst = b.scatter_reduce(1, dst_index, src, reduce=mode, include_self=True)
    return torch.cat([unm, dst], dim=1)


def unmerge_by_indices(
    x: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Inverse layout of :func:`merge_by_indices`: ``[B, N - r, C] -> [B, N, C]``; every merged src
    token gets a copy of its destination."""
    bsz, _, c = x.shape
    n_unm, r = unm_idx.shape[1], src_idx.shape[1]
    n_a = (num_tokens + 1) // 2
    unm, dst = x[:, :n_unm], x[:, n_unm:]
    src = dst.gather(1, dst_idx.unsqueeze(-1).expand(bsz, r, c))
    a = x.new_zeros(bsz, n_a, c)
    a = a.scatter(1, unm_idx.unsqueeze(-1).expand(bsz, n_unm, c), unm)
    a = a.scatter(1, src_idx.unsqueeze(-1).expand(bsz, r, c), src)
    out = x.new_empty(bsz, num_tokens, c)
    out[:, ::2] = a
    out[:, 1::2] = dst
    return out


def merge_wavg(
    merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge.

    ``x``: ``[B, N, C]``; ``size``: ``[B, N, 1]`` token sizes (how many original tokens each one
    stands for), ones when ``None``. Returns ``(merge(x * size, "sum") / merge(size, "sum"),
    merge(size, "sum"))``, shapes ``[B, N - r, C]`` and ``[B, N - r, 1]``.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Track which original tokens each merged token contains.

    ``x``: ``[B, N, C]`` (only its batch, token count, dtype and device are used); ``source``:
    ``[B, N, N0]`` 0/1 matrix (row ``t``: the original tokens inside token ``t``), the identity
    ``[B, N, N]`` when ``None``. Returns ``merge(source, mode="amax")``, ``[B, N - r, N0]``.
    """
    if source is None:
        bsz, n = x.shape[0], x.shape[1]
        source = torch.eye(n, dtype=x.dtype, device=x.device).expand(bsz, n, n).contiguous()
    return merge(source, mode="amax")


def parse_r(num_layers: int, r: int | Sequence[int] | tuple[int, float]) -> list[int]:
    """Per-layer merge schedule of length ``num_layers``.

    * ``int``: ``[r] * num_layers`` (the same as ``(r, 0.0)``).
    * ``list`` (any non-tuple sequence) of non-negative ints: padded with zeros to ``num_layers``;
      a list LONGER than ``num_layers`` raises ``ValueError`` naming ``r`` (never silently cut).
    * ``tuple (r, inflection)``, ``-1 <= inflection <= 1``: a linear schedule with
      ``min_val = int(r * (1 - inflection))``, ``max_val = 2 * r - min_val``,
      ``step = (max_val - min_val) / (num_layers - 1)``, entries ``int(min_val + step * i)``.
      Inflection 1 ramps up from 0 to ``2 r``, -1 ramps down, 0 is constant. With
      ``num_layers == 1`` the step is taken as 0, so the schedule is ``[min_val]`` (the first entry
      of every longer schedule), with no division by zero. An inflection outside ``[-1, 1]`` would
      give negative entries and raises ``ValueError``.

    ``num_layers`` must be a non-negative int; ``r`` values non-negative ints.
    """
    num_layers = as_count(num_layers, "num_layers")
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r, inflection), got {r!r}")
        base = as_count(r[0], "r")
        inflection = r[1]
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)):
            raise ValueError(f"r's inflection must be a number in [-1, 1], got {inflection!r}")
        if not -1.0 <= float(inflection) <= 1.0:
            raise ValueError(f"r's inflection must be in [-1, 1], got {inflection!r}")
        min_val = int(base * (1 - inflection))
        max_val = 2 * base - min_val
        step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
        return [int(min_val + step * i) for i in range(num_layers)]
    if isinstance(r, Sequence) and not isinstance(r, (str, bytes)):
        values = [as_count(v, "r") for v in r]
        if len(values) > num_layers:
            raise ValueError(
                f"r is a list of {len(values)} values but the model has only {num_layers} layers"
            )
        return values + [0] * (num_layers - len(values))
    return [as_count(r, "r")] * num_layers


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """ToMe's proportional attention term: ``log(size)`` along the key axis.

    ``size``: ``[B, N, 1]`` (or ``[B, N]``) token sizes. Returns ``[B, 1, 1, N]``, to be added to
    attention logits ``[B, heads, N_query, N]`` before the softmax (a size-0 key gives ``-inf``).
    """
    if size.dim() == 3:
        if size.shape[-1] != 1:
            raise ValueError(f"size must be [B, N, 1] or [B, N], got shape {tuple(size.shape)}")
        size = size[..., 0]
    elif size.dim() != 2:
        raise ValueError(f"size must be [B, N, 1] or [B, N], got shape {tuple(size.shape)}")
    return size.log()[:, None, None, :]
