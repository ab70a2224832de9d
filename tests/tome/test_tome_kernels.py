"""Tests of the fused ToMe kernels against mmfast.reference.tome.

Backends: the C++ CPU ops (``torch.ops.mmfast.tome_*``, csrc/tome/tome_cpu.cpp) and the Triton
kernels (``mmfast.triton.tome``: on a CUDA GPU when there is one, else on CPU tensors under the
interpreter that conftest.py enables, with tiny shapes because it is slow).

What is asserted:

* matching indices EQUAL to ``reference.tome.matching_indices`` for random fp32 metrics (and for
  fp16 / bf16 with the C++ kernel, which computes its scores with the reference's own ATen calls),
  and for metrics made of +-1 prototypes, whose scores are exact dyadic numbers in any precision and
  summation order, so that every exact tie must be broken as the reference breaks it. For Triton
  with fp16, where the guarantee is "equal up to near-ties", a mismatch must be explained by scores
  within one fp16 ulp;
* the merge: sizes bitwise equal, fp32 outputs within a few ulp, half outputs by the accuracy rule
  of STYLE.md (``mmfast.testing.assert_accuracy``), gradients by float64 gradcheck (C++) and against
  autograd through the reference (both backends);
* determinism (two runs, and for C++ two thread counts, give the same bits) and argument errors.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfast import _ext
from mmfast.reference import tome as ref
from mmfast.testing import assert_accuracy

R_MAX = 10**6  # clamped to (N - protected) // 2
FLAGS = list(itertools.product([False, True], [False, True]))

HAS_CPP = _ext.has_cpp() and hasattr(torch.ops.mmfast, "tome_match")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    from mmfast.triton import tome as tk

    TRITON_OK = not tk.not_supported_reasons(torch.empty(1, device=TRITON_DEVICE))
except ImportError:  # pragma: no cover
    tk = None
    TRITON_OK = False

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="mmfast._C without the tome kernels")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton cannot run here (no GPU, no interpreter)")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]


def _dev(impl: str) -> str:
    return "cpu" if impl == "cpp" else TRITON_DEVICE


def _match(impl: str, metric, r, ct=False, dt=False):
    if impl == "cpp":
        return torch.ops.mmfast.tome_match(metric, r, ct, dt)
    # The Triton launcher takes the effective count (the op layer clamps it, as the C++ op does itself).
    r = ref.effective_r(metric.shape[1], r, ct, dt)
    return tk.tome_match(metric, r, class_token=ct, distill_token=dt)


def _merge_wavg(impl: str, x, size, idx):
    if impl == "cpp":
        return torch.ops.mmfast.tome_merge_wavg(x, size, *idx)
    return tk.tome_merge_wavg(x, size, *idx)


def _merge_wavg_bwd(impl: str, g, gs, x, size, idx):
    if impl == "cpp":
        return torch.ops.mmfast.tome_merge_wavg_bwd(g, gs, x, size, *idx)
    return tk.tome_merge_wavg_bwd(g, gs, x, size, *idx)


def _assert_same_indices(got, want, what: str) -> None:
    for name, g, w in zip(("unm_idx", "src_idx", "dst_idx"), got, want):
        assert g.dtype == torch.int64 and g.shape == w.shape, f"{what}: {name} {g.dtype} {tuple(g.shape)}"
        assert torch.equal(g.cpu(), w.cpu()), f"{what}: {name} differs from the reference"


def _sign_metric(bsz: int, n: int, c: int, prototypes: int, gen: torch.Generator) -> torch.Tensor:
    """+-1 tokens drawn from a few prototypes: duplicated tokens and exact (dyadic) scores when c is
    a power of 4 (norm sqrt(c) is then a power of two)."""
    protos = torch.randint(0, 2, (bsz, prototypes, c), generator=gen).float() * 2 - 1
    pick = torch.randint(0, prototypes, (bsz, n), generator=gen)
    return torch.gather(protos, 1, pick.unsqueeze(-1).expand(bsz, n, c)).contiguous()


# ----------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------


def _check_match_random(impl: str, bsz: int, n: int, c: int) -> None:
    metric = torch.randn(bsz, n, c, device=_dev(impl))
    for r, (ct, dt) in itertools.product([0, 1, 8, R_MAX], FLAGS):
        _assert_same_indices(
            _match(impl, metric, r, ct, dt), ref.matching_indices(metric, r, ct, dt), f"r={r} ct={ct} dt={dt}"
        )


@needs_cpp
@pytest.mark.parametrize("bsz,n,c", list(itertools.product([1, 3], [17, 65, 197], [8, 64])))
def test_cpp_match_random_fp32_exact(bsz, n, c):
    _check_match_random("cpp", bsz, n, c)


@needs_triton
@pytest.mark.parametrize("bsz,n,c", list(itertools.product([1, 3], [17, 65], [8, 64])))
def test_triton_match_random_fp32_exact(bsz, n, c):
    _check_match_random("triton", bsz, n, c)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_match_tied_scores(impl, dtype):
    # norm 4 (c=16): every score is a multiple of 1/16, exact in fp16 and in any summation order.
    gen = torch.Generator().manual_seed(1)
    metric = _sign_metric(3, 41, 16, 4, gen).to(device=_dev(impl), dtype=dtype)
    for r, (ct, dt) in itertools.product([1, 5, 13, R_MAX], FLAGS):
        want = ref.matching_indices(metric, r, ct, dt)
        _assert_same_indices(_match(impl, metric, r, ct, dt), want, f"r={r} ct={ct} dt={dt}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_match_tie_break_by_hand(impl):
    dev = _dev(impl)
    metric = torch.ones(1, 6, 4, device=dev)  # every score is 1: only the tie-breaks decide
    for r, ct, dt in [(2, False, False), (2, True, False), (2, False, True), (5, True, True)]:
        _assert_same_indices(_match(impl, metric, r, ct, dt), ref.matching_indices(metric, r, ct, dt), "ones")
    assert [t.tolist() for t in _match(impl, metric, 2, True, False)] == [[[0]], [[1, 2]], [[0, 0]]]
    rows = [[1.0, 2.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    metric = torch.tensor([rows], device=dev)
    assert [t.tolist() for t in _match(impl, metric, 1)] == [[[2, 0]], [[1]], [[2]]]
    assert [t.tolist() for t in _match(impl, metric, 1, True)] == [[[0, 2]], [[1]], [[2]]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 / 0
@pytest.mark.parametrize("impl", BACKENDS)
def test_match_zero_norm_token_like_reference(impl):
    # A zero token gives NaN scores; torch.argmax/sort rank NaN first, and so must the kernels.
    metric = torch.randn(2, 17, 8, device=_dev(impl))
    metric[0, 4] = 0
    metric[1, 7] = 0
    for r, ct in [(3, False), (8, True)]:
        _assert_same_indices(_match(impl, metric, r, ct), ref.matching_indices(metric, r, ct), "nan")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_match_other_dtypes_exact(dtype):
    metric = torch.randn(3, 197, 64).to(dtype)
    for r, (ct, dt) in itertools.product([8, R_MAX], FLAGS):
        want = ref.matching_indices(metric, r, ct, dt)
        _assert_same_indices(_match("cpp", metric, r, ct, dt), want, f"{dtype} r={r}")


@needs_cpp
def test_cpp_match_wide_and_long_exact():
    # C=768: the GEMM splits K; N=1201: the score tile is split along A rows (N_A * N_B > 2**18).
    for bsz, n, c in [(2, 197, 768), (1, 1201, 32)]:
        metric = torch.randn(bsz, n, c)
        want = ref.matching_indices(metric, 64, True)
        _assert_same_indices(_match("cpp", metric, 64, True), want, f"{n}x{c}")


def _assert_equal_up_to_near_ties(metric, got, r, ct, dt, tol):
    """``got`` is a valid matching of the reference's scores where every decision that differs from
    the reference's is between scores within ``tol`` (a near-tie)."""
    scores = ref.similarity_scores(metric, ct, dt).float().cpu()
    unm, src, dst = (t.cpu() for t in got)
    n_a = scores.shape[1]
    best = scores.max(dim=-1).values
    for b in range(scores.shape[0]):
        assert sorted(unm[b].tolist() + src[b].tolist()) == list(range(n_a))
        s_b = best[b]
        chosen = scores[b, src[b], dst[b]]
        assert (chosen >= s_b[src[b]] - tol).all(), "a dst is not a (near-)argmax"
        if r and unm.shape[1]:
            keys = s_b[src[b]]
            assert (keys[1:] <= keys[:-1] + tol).all(), "src order is not (near-)descending"
            assert s_b[unm[b]].max() <= keys.min() + tol, "an unmerged token beats a merged one"
        if ct:
            assert unm[b].tolist() == sorted(unm[b].tolist())
        else:
            keys = s_b[unm[b]]
            assert (keys[1:] <= keys[:-1] + tol).all()


@needs_triton
def test_triton_match_fp16_equal_up_to_near_ties():
    metric = torch.randn(3, 65, 64, device=TRITON_DEVICE).half()
    for r, (ct, dt) in itertools.product([8, R_MAX], FLAGS):
        r_eff = ref.effective_r(65, r, ct, dt)
        # the checker itself: the reference's own matching passes it with no slack.
        _assert_equal_up_to_near_ties(metric, ref.matching_indices(metric, r, ct, dt), r_eff, ct, dt, tol=0.0)
        got = _match("triton", metric, r, ct, dt)
        _assert_equal_up_to_near_ties(metric, got, r_eff, ct, dt, tol=2**-10)


# ----------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------


def _check_merge_fp32(impl: str, bsz: int, n: int, c: int, rs=(0, 1, 8, R_MAX)) -> None:
    dev = _dev(impl)
    metric = torch.randn(bsz, n, 8, device=dev)
    x = torch.randn(bsz, n, c, device=dev)
    sizes = [
        None,
        torch.randint(1, 6, (bsz, n, 1), device=dev).float(),
        torch.rand(bsz, n, 1, device=dev) * 3 + 0.25,
    ]
    eps = torch.finfo(torch.float32).eps
    for r, ct in itertools.product(rs, [False, True]):
        # the reference runs on CPU: CUDA's scatter_reduce sums with atomics, in no fixed order
        merge, _ = ref.bipartite_soft_matching(metric.cpu(), r, ct)
        idx = ref.matching_indices(metric, r, ct)
        for size in sizes:
            got_x, got_s = (t.cpu() for t in _merge_wavg(impl, x, size, idx))
            want_x, want_s = ref.merge_wavg(merge, x.cpu(), None if size is None else size.cpu())
            assert got_s.dtype == want_s.dtype and torch.equal(got_s, want_s), f"sizes r={r} ct={ct}"
            # a few ulp of the inputs' magnitude (the kernel uses fma, the reference mul then add).
            torch.testing.assert_close(got_x, want_x, rtol=0, atol=4 * eps * x.abs().max().item())


@needs_cpp
@pytest.mark.parametrize("bsz,n,c", list(itertools.product([1, 3], [17, 65, 197], [8, 64])))
def test_cpp_merge_wavg_fp32(bsz, n, c):
    _check_merge_fp32("cpp", bsz, n, c)


@needs_triton
@pytest.mark.parametrize("bsz,n,c", [(1, 17, 8), (3, 65, 64), (3, 17, 24)])
def test_triton_merge_wavg_fp32(bsz, n, c):
    _check_merge_fp32("triton", bsz, n, c, rs=(0, 8, R_MAX))


def _check_merge_half(impl: str, dtype: torch.dtype) -> None:
    dev = _dev(impl)
    bsz, n, c = 3, 65, 40
    metric = torch.randn(bsz, n, 8, device=dev)
    x = torch.randn(bsz, n, c, device=dev)
    size = torch.randint(1, 6, (bsz, n, 1), device=dev).float()
    for r in (8, R_MAX):
        merge, _ = ref.bipartite_soft_matching(metric, r, True)
        idx = ref.matching_indices(metric, r, True)
        for s in (None, size):
            s_low = s.to(dtype) if s is not None else None
            got_x, got_s = _merge_wavg(impl, x.to(dtype), s_low, idx)
            low_x, low_s = ref.merge_wavg(merge, x.to(dtype), s_low)
            high_x, high_s = ref.merge_wavg(merge, x.double(), s.double() if s is not None else None)
            assert got_x.dtype == dtype and got_s.dtype == dtype
            assert torch.equal(got_s, low_s)  # integer sizes: exact in any precision
            assert_accuracy(got_x, low_x, high_x, name=f"{impl} {dtype} merge_wavg r={r}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_merge_wavg_fp16(impl):
    _check_merge_half(impl, torch.float16)


@needs_cpp
def test_cpp_merge_wavg_bf16():
    _check_merge_half("cpp", torch.bfloat16)


def test_public_merge_modes_and_source():
    # every mode but the size-weighted mean is the reference's gather + scatter_reduce (no kernel
    # has them): the matching's Merge against ToMe's own merge, r = 0 (the identity) included
    from mmfast.ops import tome as ops_tome

    bsz, n = 3, 33
    metric = torch.randn(bsz, n, 8)
    x = torch.randn(bsz, n, 12)
    for r in (0, 5, R_MAX):
        merge, _ = ref.bipartite_soft_matching(metric, r, True)
        ours, _ = ops_tome.bipartite_soft_matching(metric, r, True)
        for mode in ref.MERGE_MODES:
            got, want = ours(x, mode), merge(x, mode)
            if mode in ("amax", "amin"):
                assert torch.equal(got, want), mode
            else:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # merge_source: amax of the 0/1 source matrix, exact.
        eye = torch.eye(n).expand(bsz, n, n).contiguous()
        assert torch.equal(ours(eye, "amax"), ref.merge_source(merge, x))
        with pytest.raises(ValueError, match="mode must be one of"):
            ours(x, "median")


@pytest.mark.parametrize("impl", BACKENDS)
def test_degenerate_shapes(impl):
    # empty batch, N < 4 (with protected tokens r clamps to 0: the identity), C == 0.
    dev = _dev(impl)
    shapes = [(0, 9, 3), (2, 1, 3), (2, 3, 3), (2, 5, 3), (2, 9, 0)]
    for (bsz, n, c), (ct, dt) in itertools.product(shapes, FLAGS):
        metric = torch.randn(bsz, n, 4, device=dev)
        x = torch.randn(bsz, n, c, device=dev)
        want = ref.matching_indices(metric, 3, ct, dt)
        _assert_same_indices(_match(impl, metric, 3, ct, dt), want, f"B={bsz} N={n} ct={ct} dt={dt}")
        merge, _ = ref.bipartite_soft_matching(metric, 3, ct, dt)
        got_x, got_s = _merge_wavg(impl, x, None, want)
        want_x, want_s = ref.merge_wavg(merge, x)
        assert got_x.shape == want_x.shape and torch.equal(got_x, want_x) and torch.equal(got_s, want_s)


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------


class _CppMergeWavg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, unm, src, dst):
        ctx.save_for_backward(x, size, unm, src, dst)
        return torch.ops.mmfast.tome_merge_wavg(x, size, unm, src, dst)

    @staticmethod
    def backward(ctx, grad_x, grad_size):
        x, size, unm, src, dst = ctx.saved_tensors
        gx, gs = torch.ops.mmfast.tome_merge_wavg_bwd(grad_x, grad_size, x, size, unm, src, dst)
        return gx, (gs if size is not None else None), None, None, None


@needs_cpp
@pytest.mark.parametrize("r", [0, 3])
def test_cpp_merge_wavg_gradcheck(r):
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 9, 4, dtype=torch.float64, generator=gen)
    idx = ref.matching_indices(metric, r, class_token=True)
    x = torch.randn(2, 9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    size = (torch.rand(2, 9, 1, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, s: _CppMergeWavg.apply(a, s, *idx), (x, size))
    assert torch.autograd.gradcheck(lambda a: _CppMergeWavg.apply(a, None, *idx), (x,))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("with_size,with_gsize", [(True, True), (True, False), (False, False)])
def test_merge_wavg_bwd_vs_autograd(impl, with_size, with_gsize):
    dev = _dev(impl)
    bsz, n, c = 2, 17, 20
    metric = torch.randn(bsz, n, 8, device=dev)
    x = torch.randn(bsz, n, c, device=dev)
    size = torch.rand(bsz, n, 1, device=dev) * 2 + 0.5 if with_size else None
    for r in (0, 5, R_MAX):
        merge, _ = ref.bipartite_soft_matching(metric, r, True)
        idx = ref.matching_indices(metric, r, True)
        xs = x.clone().requires_grad_()
        ss = size.clone().requires_grad_() if with_size else None
        out_x, out_s = ref.merge_wavg(merge, xs, ss)
        g = torch.randn_like(out_x)
        gs = torch.randn_like(out_s) if with_gsize else None
        outputs, grads = ([out_x, out_s], [g, gs]) if with_gsize else ([out_x], [g])
        want = torch.autograd.grad(outputs, [xs] + ([ss] if with_size else []), grads)
        got_x, got_s = _merge_wavg_bwd(impl, g, gs, x, size, idx)
        torch.testing.assert_close(got_x, want[0], rtol=1e-5, atol=1e-6)
        assert got_s.shape == (bsz, n, 1)
        if with_size:
            torch.testing.assert_close(got_s, want[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------


def _run_all(impl: str, metric, x, size, g, gs):
    idx = _match(impl, metric, 20, True)
    out = _merge_wavg(impl, x, size, idx)
    grads = _merge_wavg_bwd(impl, g, gs, x, size, idx)
    return [*idx, *out, *grads]


@pytest.mark.parametrize("impl", BACKENDS)
def test_deterministic(impl):
    dev = _dev(impl)
    # C++: big enough that the loops are split across threads (then run again on one thread).
    bsz, n, c = (8, 197, 256) if impl == "cpp" else (2, 65, 48)
    metric, x = torch.randn(bsz, n, 16, device=dev), torch.randn(bsz, n, c, device=dev)
    size = torch.rand(bsz, n, 1, device=dev) + 0.5
    g, gs = torch.randn(bsz, n - 20, c, device=dev), torch.randn(bsz, n - 20, 1, device=dev)
    first = _run_all(impl, metric, x, size, g, gs)
    threads = torch.get_num_threads()
    try:
        if impl == "cpp":
            torch.set_num_threads(1)  # another partition of the work: the same bits
        second = _run_all(impl, metric, x, size, g, gs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Errors and support reasons
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
def test_bad_inputs(impl):
    dev = _dev(impl)
    metric = torch.randn(2, 17, 8, device=dev)
    x = torch.randn(2, 17, 4, device=dev)
    idx = ref.matching_indices(metric, 4)
    with pytest.raises(ValueError, match="metric"):
        _match(impl, metric[0], 4)
    with pytest.raises(ValueError, match="metric"):
        _match(impl, torch.ones(2, 17, 8, dtype=torch.long, device=dev), 4)
    with pytest.raises(ValueError, match=r"\br\b"):
        _match(impl, metric, -1)
    with pytest.raises(ValueError, match=r"\bx\b"):
        _merge_wavg(impl, x[:, :15], None, idx)
    with pytest.raises(ValueError, match=r"\bx\b"):
        _merge_wavg(impl, x[0], None, idx)
    with pytest.raises(ValueError, match="size"):
        _merge_wavg(impl, x, torch.ones(2, 17, 2, device=dev), idx)
    with pytest.raises(ValueError, match="unm_idx"):
        _merge_wavg(impl, x, None, (idx[0].int(), idx[1], idx[2]))
    with pytest.raises(ValueError, match="dst_idx"):
        _merge_wavg(impl, x, None, (idx[0], idx[1], idx[2][:, :2]))
    with pytest.raises(ValueError, match="batch"):
        _merge_wavg(impl, x, None, (idx[0][:1], idx[1], idx[2]))
    with pytest.raises(ValueError, match="grad_x_out"):
        _merge_wavg_bwd(impl, torch.randn(2, 17, 4, device=dev), None, x, None, idx)


@needs_cpp
def test_cpp_rejects_invalid_index_values():
    x = torch.randn(2, 17, 4)
    unm, src, dst = ref.matching_indices(torch.randn(2, 17, 8), 4)
    bad_src = src.clone()
    bad_src[1, 0] = unm[1, 0]  # an A token both unmerged and merged
    with pytest.raises(ValueError, match="exactly once"):
        torch.ops.mmfast.tome_merge_wavg(x, None, unm, bad_src, dst)
    with pytest.raises(ValueError, match="dst_idx"):
        torch.ops.mmfast.tome_merge_wavg(x, None, unm, src, dst + 8)


@needs_cpp
def test_cpp_op_schemas():
    metric, x = torch.randn(2, 17, 8), torch.randn(2, 17, 4)
    idx = torch.ops.mmfast.tome_match(metric, 4, True, False)
    g, gs = torch.randn(2, 13, 4), torch.randn(2, 13, 1)
    for op, args in [
        (torch.ops.mmfast.tome_match.default, (metric, 4, True, False)),
        (torch.ops.mmfast.tome_merge_wavg.default, (x, None, *idx)),
        (torch.ops.mmfast.tome_merge_wavg_bwd.default, (g, gs, x, torch.ones(2, 17, 1), *idx)),
    ]:
        torch.library.opcheck(op, args, test_utils="test_schema")


@needs_triton
def test_triton_not_supported_reasons():
    dev = TRITON_DEVICE
    x = torch.randn(2, 17, 4, device=dev)
    idx = ref.matching_indices(torch.randn(2, 17, 8, device=dev), 4)
    assert tk.tome_match_not_supported_reasons(x, 4) == []
    assert tk.tome_merge_wavg_not_supported_reasons(x, None, *idx) == []
    reasons = tk.tome_match_not_supported_reasons(x.double(), 4)
    assert reasons and "float64" in reasons[0]
    with pytest.raises(RuntimeError, match="float64"):
        tk.tome_match(x.double(), 4)
    with pytest.raises(RuntimeError, match="float64"):
        tk.tome_merge_wavg(x.double(), None, *idx)
    if dev == "cpu":
        reasons = tk.tome_merge_wavg_not_supported_reasons(x.bfloat16(), None, *idx)
        assert any("bfloat16" in s for s in reasons)
    wide = torch.empty(1, 3, tk.MAX_BWD_C + 1, device=dev)
    assert any("features" in s for s in tk.tome_merge_wavg_bwd_not_supported_reasons(wide, None, wide))


@pytest.mark.skipif(not hasattr(torch.ops.mmfast, "tome_match"), reason="C++ extension without ToMe kernels")
@pytest.mark.parametrize("b,n,c", [(64, 577, 64), (7, 577, 80), (64, 197, 80)])
@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
def test_cpp_matching_and_merge_issue_grid(b, n, c, class_token, distill_token):
    # The issue's full-size grid (B up to 64, N up to 577, head dims 64 and 80) on the C++ kernels.
    from mmfast.reference import tome as ref

    g = torch.Generator().manual_seed(b * n + c)
    metric = torch.randn(b, n, c, generator=g)
    x = torch.randn(b, n, c, generator=g)
    for r in (1, 8, n):
        want = ref.matching_indices(metric, r, class_token, distill_token)
        got = torch.ops.mmfast.tome_match(metric, r, class_token, distill_token)
        for w_, g_ in zip(want, got):
            assert torch.equal(w_, g_)
        if want[1].shape[1] == 0:
            continue
        merge, _ = ref.bipartite_soft_matching(metric, r, class_token, distill_token)
        xw, sw = ref.merge_wavg(merge, x)
        xg, sg = torch.ops.mmfast.tome_merge_wavg(x, None, *got)
        assert torch.equal(sg, sw)
        assert torch.allclose(xg, xw, rtol=0, atol=4 * torch.finfo(torch.float32).eps * xw.abs().max().item())


# ------------------------------------------------------------------------------------------------
# proportional attention (C++ inference kernel) vs the explicit torch path

HAS_ATTN = HAS_CPP and hasattr(torch.ops.mmfast, "tome_attention")
needs_attn = pytest.mark.skipif(not HAS_ATTN, reason="mmfast._C without tome_attention")
ATTN_SHAPES = [(1, 1, 1, 8), (1, 5, 2, 20), (2, 17, 3, 8), (2, 33, 4, 80), (3, 197, 12, 64), (1, 50, 6, 96)]


def _attn_ref(qkv, log_size, heads, scale):
    from mmfast.ops.tome import _attn_reference

    return _attn_reference(qkv, log_size, heads, scale)


def _attn_inputs(b, n, h, d, dtype, amp=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, n, 3 * h * d, generator=g) * amp).to(dtype)
    sizes = torch.randint(1, 9, (b, n), generator=g).float()
    return qkv, sizes.log().to(dtype)


@needs_attn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpp_proportional_attention_accuracy(shape, dtype, bias):
    # STYLE.md's rule: within 2x the error of plain PyTorch in the same dtype, against float64
    # (the kernel computes in float32 for every non-float64 input).
    b, n, h, d = shape
    qkv, ls = _attn_inputs(b, n, h, d, dtype)
    ls = ls if bias else None
    scale = d ** -0.5
    with torch.no_grad():
        got = torch.ops.mmfast.tome_attention(qkv, ls, h, scale)
        low = _attn_ref(qkv, ls, h, scale)
        high = _attn_ref(qkv.double(), None if ls is None else ls.double(), h, scale)
    assert got.dtype == dtype and got.shape == (b, n, h * d)
    assert_accuracy(got, low, high.to(torch.float32) if dtype != torch.float32 else high,
                    name=f"tome_attention {shape} {dtype} bias={bias}")


@needs_attn
@pytest.mark.parametrize("shape", ATTN_SHAPES[:5])
def test_cpp_proportional_attention_fp64_and_large_logits(shape):
    b, n, h, d = shape
    qkv, ls = _attn_inputs(b, n, h, d, torch.float64, amp=6.0, seed=3)  # logits up to ~1e3: softmax must be stable
    got = torch.ops.mmfast.tome_attention(qkv, ls, h, 0.7)
    torch.testing.assert_close(got, _attn_ref(qkv, ls, h, 0.7), rtol=1e-12, atol=1e-12)
    qkv32 = qkv.float()
    got32 = torch.ops.mmfast.tome_attention(qkv32, ls.float(), h, 0.7)
    assert torch.isfinite(got32).all()
    assert_accuracy(got32, _attn_ref(qkv32, ls.float(), h, 0.7), _attn_ref(qkv, ls, h, 0.7), name="large logits")


@needs_attn
def test_cpp_proportional_attention_strided_and_batch_independent():
    qkv, ls = _attn_inputs(4, 29, 3, 16, torch.float32)
    wide = torch.cat([qkv, torch.randn(4, 29, 5)], dim=2)[:, :, : qkv.shape[2]]  # row stride != 3C
    assert not wide.is_contiguous()
    full = torch.ops.mmfast.tome_attention(qkv, ls, 3, 0.25)
    assert torch.equal(torch.ops.mmfast.tome_attention(wide, ls, 3, 0.25), full)
    for i in range(4):
        one = torch.ops.mmfast.tome_attention(qkv[i:i + 1], ls[i:i + 1], 3, 0.25)
        assert torch.equal(one, full[i:i + 1]), "per-item results must not depend on the batch"


@needs_attn
def test_proportional_attention_dispatch_and_grad_fallback():
    from mmfast.ops import tome as mt

    qkv, ls = _attn_inputs(2, 11, 2, 8, torch.float32)
    from mmfast import functional as MF

    with torch.no_grad():
        assert mt.ATTENTION.select(mt.AttnInputs(qkv, ls, 2, False)) == "cpp"
        want = torch.ops.mmfast.tome_attention(qkv, ls, 2, 8 ** -0.5)
        assert torch.equal(MF.proportional_attention(qkv, ls, 2), want)
        assert torch.equal(MF.proportional_attention(qkv, ls, 2, impl="reference"), _attn_ref(qkv, ls, 2, 8 ** -0.5))
    leaf = qkv.clone().requires_grad_()
    # auto: the kernel has no backward, so a differentiable call takes the torch path (gradients flow)
    out = mt.proportional_attention(leaf, ls, 2)
    assert out.requires_grad
    out.square().sum().backward()
    want = qkv.clone().requires_grad_()
    _attn_ref(want, ls, 2, 8 ** -0.5).square().sum().backward()
    torch.testing.assert_close(leaf.grad, want.grad)
    with pytest.raises(RuntimeError, match="no backward"):
        mt.proportional_attention(leaf, ls, 2, impl="cpp")


@needs_attn
def test_proportional_attention_bad_inputs():
    from mmfast.ops import tome as mt

    qkv, ls = _attn_inputs(2, 11, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="qkv must be"):
        mt.proportional_attention(qkv[0], None, 2)
    with pytest.raises(ValueError, match="num_heads"):
        mt.proportional_attention(qkv, None, 5)
    with pytest.raises(ValueError, match="log_size must be"):
        mt.proportional_attention(qkv, ls[:, :5], 2)
    with pytest.raises(RuntimeError, match="log_size must be"):
        torch.ops.mmfast.tome_attention(qkv, ls[:1], 2, 1.0)
    with pytest.raises(RuntimeError, match="num_heads"):
        torch.ops.mmfast.tome_attention(qkv, None, 0, 1.0)
    with pytest.raises(RuntimeError, match="float32, float64"):
        torch.ops.mmfast.tome_attention(qkv.to(torch.int32), None, 2, 1.0)


@needs_attn
def test_cpp_tome_attention_opcheck():
    qkv, ls = _attn_inputs(2, 9, 2, 8, torch.float32)
    for args in [(qkv, ls, 2, 0.3), (qkv, None, 2, 0.3)]:
        torch.library.opcheck(torch.ops.mmfast.tome_attention.default, args,
                              test_utils=("test_schema", "test_faketensor"))


@needs_triton
def test_triton_match_takes_only_an_effective_r():
    # The kernel layer does not clamp: a count the matching cannot make is an error, not a wrong answer.
    metric = torch.randn(2, 9, 8, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="effective_r"):
        tk.tome_match(metric, 5)
    with pytest.raises(ValueError, match="effective_r"):
        tk.tome_match(torch.randn(1, 3, 8, device=TRITON_DEVICE), 1, distill_token=True)
    assert tk.tome_match(metric, ref.effective_r(9, 5))[1].shape == (2, 4)


def test_kernel_module_imports():
    assert tk is not None, "mmfast.triton.tome must import in the test environment"
