"""Tests of the ToMe token-merging reference (mmfast/reference/tome.py).

The reference is checked against a second, deliberately naive implementation written here: Python
loops per batch item and per token over plain lists, an argmax by linear scan (strict ``>``, so the
lowest index wins an exact tie) and a selection sort (strict ``>``, so the lower A index comes first
on an exact tie of ``node_max``).

Exact index equality needs both sides to see bit-identical scores. For random fp32 metrics the naive
matcher therefore runs on the reference's own fp32 score matrix (masks re-applied by the naive code),
and that matrix is separately checked against naive float64 cosines to a tolerance. For the tie tests
the metric is made of +-1 vectors whose norm is a power of two: every score is then an exact dyadic
number in any precision and summation order, so the naive code computes its scores from the metric
itself and must agree exactly, ties included.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmfast.reference import tome

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# The naive implementation
# ----------------------------------------------------------------------------------------------------


def naive_r(n: int, r: int, class_token: bool, distill_token: bool) -> int:
    """Effective r: min(r, (N - protected) // 2), and 0 when B has no legal destination."""
    r = min(r, (n - int(class_token) - int(distill_token)) // 2)
    legal_b = n // 2 - int(distill_token)
    if legal_b <= 0:
        r = 0
    return max(r, 0)


def naive_cosine(metric: torch.Tensor) -> list[list[list[float]]]:
    """Per batch item, [N_A][N_B] cosine similarities in Python float64 (no masking)."""
    out = []
    for rows in metric.double().tolist():
        unit = []
        for row in rows:
            norm = math.sqrt(sum(v * v for v in row))
            unit.append([v / norm for v in row])
        set_a = [unit[t] for t in range(0, len(unit), 2)]
        set_b = [unit[t] for t in range(1, len(unit), 2)]
        out.append([[sum(p * q for p, q in zip(a, b)) for b in set_b] for a in set_a])
    return out


def naive_mask(scores: list[list[float]], class_token: bool, distill_token: bool) -> list[list[float]]:
    scores = [list(row) for row in scores]
    for i in range(len(scores)):
        for j in range(len(scores[i])):
            if (class_token and i == 0) or (distill_token and j == 0):
                scores[i][j] = NEG_INF
    return scores


def naive_match(
    scores: list[list[float]], r: int, class_token: bool, distill_token: bool
) -> tuple[list[int], list[int], list[int]]:
    """One batch item: (unm, src, dst) from an unmasked [N_A][N_B] score table and the effective r."""
    scores = naive_mask(scores, class_token, distill_token)
    n_a = len(scores)
    if r == 0:
        return list(range(n_a)), [], []
    node_max, node_idx = [], []
    for i in range(n_a):
        best_j = 0
        for j in range(1, len(scores[i])):
            if scores[i][j] > scores[i][best_j]:
                best_j = j
        node_idx.append(best_j)
        node_max.append(scores[i][best_j])
    remaining = list(range(n_a))
    order = []
    while remaining:
        pick = remaining[0]
        for i in remaining[1:]:
            if node_max[i] > node_max[pick]:
                pick = i
        order.append(pick)
        remaining.remove(pick)
    src = order[:r]
    dst = [node_idx[i] for i in src]
    unm = order[r:]
    if class_token:
        unm = sorted(unm)
    return unm, src, dst


def naive_merge(x: torch.Tensor, unm: list[int], src: list[int], dst: list[int], mode: str) -> torch.Tensor:
    """One batch item x [N, C] -> [N - r, C] in float64, one output token at a time."""
    x = x.double()
    n = x.shape[0]
    rows = [x[2 * i] for i in unm]
    for j in range(n // 2):
        group = [x[2 * j + 1]] + [x[2 * s] for s, d in zip(src, dst) if d == j]
        acc = group[0].clone()
        for v in group[1:]:
            if mode == "amax":
                acc = torch.maximum(acc, v)
            else:
                acc = acc + v
        if mode == "mean":
            acc = acc / len(group)
        rows.append(acc)
    return torch.stack(rows)


def naive_unmerge(y: torch.Tensor, n: int, unm: list[int], src: list[int], dst: list[int]) -> torch.Tensor:
    """One batch item y [N - r, C] -> [N, C]."""
    out: list[torch.Tensor | None] = [None] * n
    for k, i in enumerate(unm):
        out[2 * i] = y[k]
    for j in range(n // 2):
        out[2 * j + 1] = y[len(unm) + j]
    for s, d in zip(src, dst):
        out[2 * s] = y[len(unm) + d]
    assert all(t is not None for t in out)
    return torch.stack(out)


def _ref_lists(metric, r, ct, dt):
    unm, src, dst = tome.matching_indices(metric, r, ct, dt)
    return unm.tolist(), src.tolist(), dst.tolist()


def _check_against_naive(metric, x, r, ct, dt, naive_scores, modes=("mean", "sum", "amax")):
    bsz, n, _ = metric.shape
    r_eff = naive_r(n, r, ct, dt)
    assert tome.effective_r(n, r, ct, dt) == r_eff
    unm, src, dst = tome.matching_indices(metric, r, ct, dt)
    n_a = (n + 1) // 2
    assert unm.dtype == src.dtype == dst.dtype == torch.long
    assert unm.shape == (bsz, n_a - r_eff) and src.shape == dst.shape == (bsz, r_eff)
    expected = [naive_match(naive_scores[b], r_eff, ct, dt) for b in range(bsz)]
    assert unm.tolist() == [e[0] for e in expected]
    assert src.tolist() == [e[1] for e in expected]
    assert dst.tolist() == [e[2] for e in expected]

    merge, unmerge = tome.bipartite_soft_matching(metric, r, ct, dt)
    if r_eff == 0:
        assert merge(x) is x and unmerge(x) is x
        return
    for mode in modes:
        got = merge(x, mode=mode)
        assert got.shape == (bsz, n - r_eff, x.shape[-1]) and got.dtype == x.dtype
        want = torch.stack([naive_merge(x[b], *expected[b], mode) for b in range(bsz)])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    y = merge(x)
    back = unmerge(y)
    assert back.shape == x.shape
    want = torch.stack([naive_unmerge(y[b], n, *expected[b]) for b in range(bsz)])
    torch.testing.assert_close(back, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Indices and outputs vs the naive implementation
# ----------------------------------------------------------------------------------------------------

SHAPES = list(itertools.product([1, 7], [17, 197], [64, 80]))
FLAGS = list(itertools.product([False, True], [False, True]))
R_MAX = 10**6  # clamped to (N - protected) // 2


@pytest.mark.parametrize("bsz,n,c", SHAPES)
def test_scores_match_naive_cosine(bsz, n, c):
    metric = torch.randn(bsz, n, c)
    naive = naive_cosine(metric)
    for ct, dt in FLAGS:
        got = tome.similarity_scores(metric, ct, dt)
        assert got.shape == (bsz, (n + 1) // 2, n // 2) and got.dtype == torch.float32
        want = torch.tensor([naive_mask(s, ct, dt) for s in naive], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("r", [0, 1, 8, R_MAX])
@pytest.mark.parametrize("bsz,n,c", SHAPES)
def test_matches_naive_random_fp32(bsz, n, c, r):
    metric = torch.randn(bsz, n, c)
    x = torch.randn(bsz, n, c)
    for ct, dt in FLAGS:
        # Naive matching on the reference's exact fp32 scores (the naive code re-masks them).
        raw = tome.similarity_scores(metric).tolist()
        _check_against_naive(metric, x, r, ct, dt, raw)


def _sign_metric(bsz: int, n: int, c: int, prototypes: int, gen: torch.Generator) -> torch.Tensor:
    """+-1 tokens drawn from a few prototypes: duplicated tokens, exactly representable scores."""
    protos = torch.randint(0, 2, (bsz, prototypes, c), generator=gen).float() * 2 - 1
    pick = torch.randint(0, prototypes, (bsz, n), generator=gen)
    return torch.gather(protos, 1, pick.unsqueeze(-1).expand(bsz, n, c)).contiguous()


@pytest.mark.parametrize("ct,dt", FLAGS)
def test_tied_scores_lowest_index_wins(ct, dt):
    gen = torch.Generator().manual_seed(1)
    metric = _sign_metric(3, 41, 64, 4, gen)  # norm 8: all scores are exact multiples of 1/64
    x = torch.randn(3, 41, 24)
    naive = naive_cosine(metric)
    torch.testing.assert_close(
        tome.similarity_scores(metric, ct, dt).double(),
        torch.tensor([naive_mask(s, ct, dt) for s in naive], dtype=torch.float64),
        rtol=0,
        atol=0,
    )
    for r in [1, 5, 13, R_MAX]:
        _check_against_naive(metric, x, r, ct, dt, naive)


def test_tie_break_by_hand():
    metric = torch.ones(1, 6, 4)  # every score is 1: only the tie-breaks decide
    # A = {0, 2, 4}, B = {1, 3, 5}. All argmaxes -> B 0; order of A by node_max: 0, 1, 2.
    assert _ref_lists(metric, 2, False, False) == ([[2]], [[0, 1]], [[0, 0]])
    # class token: A 0 is -inf, so the order is 1, 2, 0.
    assert _ref_lists(metric, 2, True, False) == ([[0]], [[1, 2]], [[0, 0]])
    # distill token: B 0 is -inf, the lowest remaining B index (1) wins.
    assert _ref_lists(metric, 2, False, True) == ([[2]], [[0, 1]], [[1, 1]])
    assert _ref_lists(metric, 5, True, True) == ([[0]], [[1, 2]], [[1, 1]])  # r clamped to (6 - 2) // 2
    # without a class token the unmerged A tokens keep descending-score order, not index order.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    # A = (1,0), (0,1), (1,0); B = (1,0), (1,1), (0,1); node_max = 1, 1, 1 -> ties by index.
    assert _ref_lists(metric, 1, False, False) == ([[1, 2]], [[0]], [[0]])
    metric[0, 0] = torch.tensor([1.0, 2.0])  # A 0's best is now < 1: it goes last
    assert _ref_lists(metric, 1, False, False) == ([[2, 0]], [[1]], [[2]])
    assert _ref_lists(metric, 1, True, False) == ([[0, 2]], [[1]], [[2]])


@settings(max_examples=60, deadline=None)
@given(
    bsz=st.integers(1, 3),
    n=st.integers(0, 40),
    r=st.integers(0, 25),
    ct=st.booleans(),
    dt=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(bsz=1, n=3, r=1, ct=False, dt=True, seed=0)  # only the distillation token in B: r must be 0
@example(bsz=2, n=2, r=1, ct=False, dt=False, seed=0)
def test_property_tied_small(bsz, n, r, ct, dt, seed):
    gen = torch.Generator().manual_seed(seed)
    metric = _sign_metric(bsz, n, 4, 3, gen)  # norm 2, scores in {-1, -1/2, 0, 1/2, 1}
    x = torch.randn(bsz, n, 5, generator=gen)
    _check_against_naive(metric, x, r, ct, dt, naive_cosine(metric), modes=("mean", "amax"))


def test_effective_r():
    assert tome.effective_r(17, R_MAX) == 8
    assert tome.effective_r(17, R_MAX, True) == 8
    assert tome.effective_r(17, R_MAX, True, True) == 7
    assert tome.effective_r(197, 8, True) == 8
    assert tome.effective_r(2, 5, True) == 0
    assert tome.effective_r(1, 5) == 0
    assert tome.effective_r(0, 5) == 0
    # the one extra rule: with only a distillation token as B, nothing may be merged.
    assert tome.effective_r(3, 5, False, True) == 0
    assert tome.effective_r(5, 5, False, True) == 2


def test_class_token_stays_first():
    metric = torch.randn(4, 197, 32)
    x = torch.randn(4, 197, 16)
    for r in [1, 16, 98]:
        merge, _ = tome.bipartite_soft_matching(metric, r, class_token=True)
        assert torch.equal(merge(x)[:, 0], x[:, 0])


# ----------------------------------------------------------------------------------------------------
# unmerge, merge_wavg, merge_source
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ct", [False, True])
def test_unmerge_of_merge(ct):
    bsz, n = 3, 50
    metric = torch.randn(bsz, n, 16)
    x = torch.randn(bsz, n, 8)
    r = 12
    merge, unmerge = tome.bipartite_soft_matching(metric, r, class_token=ct)
    unm, src, dst = tome.matching_indices(metric, r, class_token=ct)
    y = merge(x)
    back = unmerge(y)
    n_unm = unm.shape[1]
    for b in range(bsz):
        src_b, dst_b = src[b].tolist(), dst[b].tolist()
        dsts = set(dst_b)
        for k, i in enumerate(unm[b].tolist()):
            assert torch.equal(back[b, 2 * i], x[b, 2 * i])
            assert torch.equal(y[b, k], x[b, 2 * i])
        for j in range(n // 2):
            if j in dsts:
                assert torch.equal(back[b, 2 * j + 1], y[b, n_unm + j])
            else:
                assert torch.equal(back[b, 2 * j + 1], x[b, 2 * j + 1])
        for s, d in zip(src_b, dst_b):
            assert torch.equal(back[b, 2 * s], back[b, 2 * d + 1])
            group = [x[b, 2 * d + 1]] + [x[b, 2 * s2] for s2, d2 in zip(src_b, dst_b) if d2 == d]
            torch.testing.assert_close(y[b, n_unm + d], torch.stack(group).mean(0))
    # a tensor that is constant on every merge group is a fixed point of unmerge(merge(., "amax")).
    z = unmerge(merge(x, "amax"))
    assert torch.equal(unmerge(merge(z, "amax")), z)


def test_merge_wavg_and_source_two_merges():
    bsz, n, c = 5, 197, 24
    x = torch.randn(bsz, n, c, dtype=torch.float64)
    metric = torch.randn(bsz, n, 16)
    m1, _ = tome.bipartite_soft_matching(metric, 40, class_token=True)
    x1, s1 = tome.merge_wavg(m1, x)
    src1 = tome.merge_source(m1, x)
    assert x1.shape == (bsz, n - 40, c) and s1.shape == (bsz, n - 40, 1) and src1.shape == (bsz, n - 40, n)
    # second merge on the merged tokens (their features as the metric), passing sizes and sources on.
    m2, _ = tome.bipartite_soft_matching(x1.float(), 50, class_token=True)
    x2, s2 = tome.merge_wavg(m2, x1, s1)
    src2 = tome.merge_source(m2, x1, src1)
    n2 = n - 40 - 50
    assert x2.shape == (bsz, n2, c) and s2.shape == (bsz, n2, 1) and src2.shape == (bsz, n2, n)
    for size in (s1, s2):
        assert torch.equal(size, size.round()) and (size >= 1).all()
        assert torch.equal(size.sum(dim=(1, 2)), torch.full((bsz,), float(n), dtype=size.dtype))
    # the size-weighted mean preserves sum(x * size).
    torch.testing.assert_close((x1 * s1).sum(1), x.sum(1))
    torch.testing.assert_close((x2 * s2).sum(1), x.sum(1))
    for source, size in ((src1, s1), (src2, s2)):
        assert ((source == 0) | (source == 1)).all()
        assert torch.equal(source.sum(1), torch.ones(bsz, n, dtype=source.dtype))
        assert torch.equal(source.sum(2, keepdim=True), size)
    # each merged token is the plain mean of the original tokens in its source row.
    torch.testing.assert_close(x2, (src2 @ x) / s2)
    assert torch.equal(src2[:, 0, 0], torch.ones(bsz, dtype=src2.dtype))  # class token untouched


def test_merge_wavg_default_size_is_mean():
    metric = torch.randn(2, 17, 8)
    x = torch.randn(2, 17, 8)
    merge, _ = tome.bipartite_soft_matching(metric, 6)
    x1, s1 = tome.merge_wavg(merge, x)
    torch.testing.assert_close(x1, merge(x, "mean"))
    assert torch.equal(s1, merge(torch.ones(2, 17, 1), "sum"))


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 9, 4, dtype=torch.float64, generator=gen)
    merge, unmerge = tome.bipartite_soft_matching(metric, 3, class_token=True)
    x = torch.randn(2, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    size = (torch.rand(2, 9, 1, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, s: tome.merge_wavg(merge, a, s), (x, size))
    assert torch.autograd.gradcheck(lambda a: unmerge(merge(a, "mean")), (x,))


def test_proportional_attention_bias():
    size = torch.tensor([[[1.0], [2.0], [5.0]], [[3.0], [1.0], [1.0]]])
    bias = tome.proportional_attention_bias(size)
    assert bias.shape == (2, 1, 1, 3)
    torch.testing.assert_close(bias[:, 0, 0], size[..., 0].log())
    torch.testing.assert_close(tome.proportional_attention_bias(size[..., 0]), bias)
    with pytest.raises(ValueError, match="size"):
        tome.proportional_attention_bias(torch.ones(2, 3, 2))


# ----------------------------------------------------------------------------------------------------
# parse_r
# ----------------------------------------------------------------------------------------------------


def test_parse_r():
    assert tome.parse_r(4, 3) == [3, 3, 3, 3]
    assert tome.parse_r(0, 3) == []
    assert tome.parse_r(5, [1, 2]) == [1, 2, 0, 0, 0]
    assert tome.parse_r(2, [4, 4]) == [4, 4]
    # min = int(8 * 0.5) = 4, max = 12, step = 8 / 3: 4, 6.67, 9.33, 12
    assert tome.parse_r(4, (8, 0.5)) == [4, 6, 9, 12]
    # min = 16, max = 0, step = -8
    assert tome.parse_r(3, (8, -1)) == [16, 8, 0]
    # min = 0, max = 10, step = 2
    assert tome.parse_r(6, (5, 1)) == [0, 2, 4, 6, 8, 10]
    # min = int(4.9) = 4, max = 10, step = 1.5: 4, 5.5, 7, 8.5, 10
    assert tome.parse_r(5, (7, 0.3)) == [4, 5, 7, 8, 10]
    assert tome.parse_r(4, (5, 0)) == tome.parse_r(4, 5) == [5, 5, 5, 5]
    assert tome.parse_r(12, (8, 0.0)) == tome.parse_r(12, 8)
    # one layer: step taken as 0, no division by zero
    assert tome.parse_r(1, (8, 0.5)) == [4]
    assert tome.parse_r(1, (8, -1)) == [16]


def test_parse_r_errors():
    with pytest.raises(ValueError, match=r"\br\b.*3 values.*2 layers"):
        tome.parse_r(2, [1, 2, 3])
    with pytest.raises(ValueError, match=r"\br\b"):
        tome.parse_r(3, -1)
    with pytest.raises(ValueError, match=r"\br\b"):
        tome.parse_r(3, [1, -2])
    with pytest.raises(ValueError, match="inflection"):
        tome.parse_r(3, (8, 1.5))
    with pytest.raises(ValueError, match=r"\(r, inflection\)"):
        tome.parse_r(3, (8, 0.5, 1))
    with pytest.raises(ValueError, match="num_layers"):
        tome.parse_r(-1, 3)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_errors():
    metric = torch.randn(2, 17, 8)
    for bad in (torch.randn(17, 8), torch.randn(1, 2, 17, 8)):
        with pytest.raises(ValueError, match="metric must be 3-D"):
            tome.bipartite_soft_matching(bad, 2)
        with pytest.raises(ValueError, match="metric must be 3-D"):
            tome.matching_indices(bad, 2)
    for fn in (tome.bipartite_soft_matching, tome.matching_indices):
        with pytest.raises(ValueError, match=r"\br must be a non-negative int, got -1"):
            fn(metric, -1)
        with pytest.raises(ValueError, match=r"\br must be"):
            fn(metric, 1.5)
    for r in (0, 4):  # the r == 0 identity path checks shapes too
        merge, unmerge = tome.bipartite_soft_matching(metric, r)
        with pytest.raises(ValueError, match="merge: x has batch 3"):
            merge(torch.randn(3, 17, 8))
        with pytest.raises(ValueError, match="16 tokens"):
            merge(torch.randn(2, 16, 8))
        with pytest.raises(ValueError, match="3-D"):
            merge(torch.randn(2, 17))
        with pytest.raises(ValueError, match="mode"):
            merge(torch.randn(2, 17, 8), mode="median")
        with pytest.raises(ValueError, match="unmerge"):
            unmerge(torch.randn(2, 17 - r + 1, 8))
        with pytest.raises(ValueError, match="merge"):
            tome.merge_wavg(merge, torch.randn(2, 18, 8))
