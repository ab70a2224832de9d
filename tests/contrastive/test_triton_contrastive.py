"""Tests of the Triton contrastive kernels (mmfast.triton.contrastive).

Without a GPU they run on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), with the interpreter's tiny tiles and a small program count, so that every path
is exercised: several row blocks per forward program (persistent loop + column-partial merge), column
splits (row-partial merge), backward splits, one-chunk and multi-chunk D. Oracles, on the same inputs:

* float64 plain torch with explicit logits (``ref_high``), and the same computation in the inputs'
  precision (``ref_lowp``: fp32, or plain fp16 torch with fp16 logits), via ``assert_accuracy``;
* the C++ CPU ops ``torch.ops.mmfast.contrastive_*``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mmfast  # noqa: F401 - registers torch.ops.mmfast
from mmfast.testing import assert_accuracy, max_abs_err

tc = pytest.importorskip("mmfast.triton.contrastive")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEV = torch.device("cpu" if INTERPRET else "cuda")

# (M, N, D, scale, with bias): M, N in {1, 7, 33, 70} with M != N, D in {1, 8, 19, 64}
CASES = [
    (1, 1, 1, 1.0, False),
    (7, 33, 8, 100.0, True),
    (33, 7, 19, 1.0, True),
    (70, 33, 64, 100.0, False),
    (33, 70, 19, 100.0, True),
    (1, 70, 64, 1.0, True),
    (70, 1, 8, 100.0, True),
    (7, 7, 1, 100.0, False),
]
HALF_CASES = [CASES[1], CASES[2], CASES[3], CASES[6]]


def _ids(case) -> str:
    M, N, D, s, b = case
    return f"M{M}-N{N}-D{D}-s{s:g}-{'bias' if b else 'nobias'}"


def make_inputs(M, N, D, scale, with_bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, D, generator=g, dtype=torch.float64)
    b = torch.randn(N, D, generator=g, dtype=torch.float64)
    if scale >= 10:  # CLIP-like: unit features with a large temperature
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    s = torch.tensor([scale], dtype=torch.float32, device=DEV)
    bias = torch.tensor([-2.5], dtype=torch.float32, device=DEV) if with_bias else None
    return a.to(dtype).to(DEV), b.to(dtype).to(DEV), s, bias


# ----------------------------------------------------------------------------------- plain-torch refs


def logits(a, b, scale, bias, dtype):
    """Explicit logits computed entirely in ``dtype`` (float64: the exact reference)."""
    a, b = a.cpu().to(dtype), b.cpu().to(dtype)
    lg = (a @ b.T) * scale.cpu().to(dtype)
    return lg + bias.cpu().to(dtype) if bias is not None else lg


def ref_softmax_fwd(a, b, scale, bias, dtype):
    lg = logits(a, b, scale, bias, dtype)
    return (
        torch.logsumexp(lg, 1),
        (torch.softmax(lg, 1) * lg).sum(1),
        torch.logsumexp(lg, 0),
        (torch.softmax(lg, 0) * lg).sum(0),
    )


def ref_softmax_bwd(a, b, scale, bias, row_lse, col_lse, arw, acw, brw, bcw, dtype):
    lg = logits(a, b, scale, bias, dtype)
    c = lambda t: t.cpu().to(dtype)
    pr, pc = (lg - c(row_lse)[:, None]).exp(), (lg - c(col_lse)[None, :]).exp()
    ga = c(arw)[:, None] * pr + c(acw)[None, :] * pc
    gb = c(brw)[:, None] * pr + c(bcw)[None, :] * pc
    sc = c(scale)
    return sc * (ga @ c(b)), sc * (gb.T @ c(a))


def ref_sigmoid_fwd(a, b, scale, bias, dtype):
    return F.softplus(logits(a, b, scale, bias, dtype)).sum(1)


def ref_sigmoid_bwd(a, b, scale, bias, row_w, dtype):
    c_a, c_b = a.cpu().to(dtype), b.cpu().to(dtype)
    dots = c_a @ c_b.T
    lg = logits(a, b, scale, bias, dtype)
    g = row_w.cpu().to(dtype)[:, None] * torch.sigmoid(lg)
    sc = scale.cpu().to(dtype)
    return sc * (g @ c_b), sc * (g.T @ c_a), (g * dots).sum(), g.sum()


def cpp(name, *args):
    """The C++ CPU op on CPU copies of the arguments."""
    op = getattr(torch.ops.mmfast, f"contrastive_{name}")
    return op(*(x.cpu() if torch.is_tensor(x) else x for x in args))


def close_to_cpp(out, ref, name, rel=2e-5):
    """Kernel agrees with the C++ op to ``rel`` of the reference's magnitude."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    tol = rel * max(1.0, ref.abs().max().item()) if ref.numel() else 0.0
    err = max_abs_err(out, ref)
    assert err <= tol, f"{name}: differs from torch.ops.mmfast by {err:.3e} > {tol:.3e}"


def check(out, lowp, high, name):
    assert out.dtype == torch.float32, f"{name}: dtype {out.dtype}"
    assert out.device == DEV, f"{name}: device {out.device}"
    assert_accuracy(out.cpu(), lowp, high, name=name)


SOFTMAX_FWD_NAMES = ("row_lse", "row_mean", "col_lse", "col_mean")
SIGMOID_BWD_NAMES = ("da", "db", "dscale", "dbias")


def check_softmax_fwd(a, b, s, bias, dtype):
    """softmax_fwd against float64 and plain ``dtype`` torch; (kernel outputs, float64 outputs)."""
    out = tc.softmax_fwd(a, b, s, bias)
    hi = ref_softmax_fwd(a, b, s, bias, torch.float64)
    lo = ref_softmax_fwd(a, b, s, bias, dtype)  # half: fp16 / bf16 matmul and logsumexp
    for o, h, lw, nm in zip(out, hi, lo, SOFTMAX_FWD_NAMES):
        check(o, lw, h, nm)
    return out, hi


def check_sigmoid_bwd(a, b, s, bias, row_w, dtype):
    """sigmoid_bwd against float64 and plain ``dtype`` torch; the kernel's outputs."""
    res = tc.sigmoid_bwd(a, b, s, bias, row_w)
    hi = ref_sigmoid_bwd(a, b, s, bias, row_w, torch.float64)
    lo = ref_sigmoid_bwd(a, b, s, bias, row_w, dtype)
    for o, h, lw, nm in zip(res, hi, lo, SIGMOID_BWD_NAMES):
        check(o, lw, h, nm)
    return res


# ------------------------------------------------------------------------------------------ fp32


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_softmax_fp32(case):
    M, N, D, scale, with_bias = case
    a, b, s, bias = make_inputs(*case)
    out, _ = check_softmax_fwd(a, b, s, bias, torch.float32)
    for o, c, nm in zip(out, cpp("softmax_fwd", a, b, s, bias), SOFTMAX_FWD_NAMES):
        assert o.shape == (M if nm.startswith("row") else N,)
        close_to_cpp(o, c, nm)

    # backward at the kernel's own statistics, random signed weights, with and without b's own
    row_lse, col_lse = out[0], out[2]
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(n, generator=g).to(DEV) for n in (M, N, M, N)]
    for separate in (False, True):
        bw = (w[2], w[3]) if separate else (None, None)
        ref_bw = (w[2], w[3]) if separate else (w[0], w[1])
        da, db = tc.softmax_bwd(a, b, s, bias, row_lse, col_lse, w[0], w[1], *bw)
        assert da.shape == (M, D) and db.shape == (N, D)
        args = (a, b, s, bias, row_lse, col_lse, w[0], w[1], *ref_bw)
        hi_g = ref_softmax_bwd(*args, torch.float64)
        lo_g = ref_softmax_bwd(*args, torch.float32)
        cpp_g = cpp("softmax_bwd", a, b, s, bias, row_lse, col_lse, w[0], w[1], *bw)
        for o, h, lw, c, nm in zip((da, db), hi_g, lo_g, cpp_g, ("da", "db")):
            check(o, lw, h, f"{nm} separate={separate}")
            close_to_cpp(o, c, nm, rel=1e-4)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_sigmoid_fp32(case):
    M, N, D, scale, with_bias = case
    a, b, s, bias = make_inputs(*case)
    out = tc.sigmoid_fwd(a, b, s, bias)
    assert out.shape == (M,)
    lo, hi = ref_sigmoid_fwd(a, b, s, bias, torch.float32), ref_sigmoid_fwd(a, b, s, bias, torch.float64)
    check(out, lo, hi, "sums")
    close_to_cpp(out, cpp("sigmoid_fwd", a, b, s, bias), "sums")

    row_w = torch.randn(M, generator=torch.Generator().manual_seed(2)).to(DEV)
    res = check_sigmoid_bwd(a, b, s, bias, row_w, torch.float32)
    assert res[0].shape == (M, D) and res[1].shape == (N, D)
    assert res[2].dim() == 0 and res[3].dim() == 0
    for o, c, nm in zip(res, cpp("sigmoid_bwd", a, b, s, bias, row_w), SIGMOID_BWD_NAMES):
        close_to_cpp(o, c, nm, rel=1e-4)


# ------------------------------------------------------------------------------------------ fp16


@pytest.mark.parametrize("case", HALF_CASES, ids=_ids)
def test_softmax_fp16(case):
    M, N, D, scale, with_bias = case
    a, b, s, bias = make_inputs(*case, dtype=torch.float16)
    _, hi = check_softmax_fwd(a, b, s, bias, torch.float16)

    row_lse, col_lse = hi[0].float().to(DEV), hi[2].float().to(DEV)
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(n, generator=g).to(DEV) for n in (M, N, M, N)]
    da, db = tc.softmax_bwd(a, b, s, bias, row_lse, col_lse, *w)
    args = (a, b, s, bias, row_lse, col_lse, *w)
    hi_g = ref_softmax_bwd(*args, torch.float64)
    lo_g = ref_softmax_bwd(*args, torch.float16)
    check(da, lo_g[0], hi_g[0], "da")
    check(db, lo_g[1], hi_g[1], "db")


@pytest.mark.parametrize("case", HALF_CASES, ids=_ids)
def test_sigmoid_fp16(case):
    M, N, D, scale, with_bias = case
    a, b, s, bias = make_inputs(*case, dtype=torch.float16)
    out = tc.sigmoid_fwd(a, b, s, bias)
    lo, hi = ref_sigmoid_fwd(a, b, s, bias, torch.float16), ref_sigmoid_fwd(a, b, s, bias, torch.float64)
    check(out, lo, hi, "sums")
    row_w = torch.randn(M, generator=torch.Generator().manual_seed(4)).to(DEV)
    check_sigmoid_bwd(a, b, s, bias, row_w, torch.float16)


def test_fp16_tiny_weights_do_not_underflow():
    """Gradient weights ~1e-9 (a mean loss over a big batch, no loss scaler): G is far below fp16's
    smallest subnormal, so plain fp16 loses the gradient entirely; the kernel's per-row power-of-two
    scaling keeps fp16 accuracy."""
    M, N, D = 33, 19, 19
    a, b, s, bias = make_inputs(M, N, D, 10.0, True, dtype=torch.float16)
    hi = ref_softmax_fwd(a, b, s, bias, torch.float64)
    row_lse, col_lse = hi[0].float().to(DEV), hi[2].float().to(DEV)
    g = torch.Generator().manual_seed(5)
    w = [(torch.rand(n, generator=g) * 1e-9).to(DEV) for n in (M, N)]
    da, db = tc.softmax_bwd(a, b, s, bias, row_lse, col_lse, *w)
    ref = ref_softmax_bwd(a, b, s, bias, row_lse, col_lse, *w, *w, torch.float64)
    lo = ref_softmax_bwd(a, b, s, bias, row_lse, col_lse, *w, *w, torch.float16)
    for o, h, lw in zip((da, db), ref, lo):
        rel = max_abs_err(o, h) / h.abs().max().item()
        assert rel < 5e-3, rel
        assert max_abs_err(lw, h) / h.abs().max().item() > 0.5  # the stress is real: plain fp16 fails

    row_w = (torch.rand(M, generator=g) * 1e-9).to(DEV)
    res = tc.sigmoid_bwd(a, b, s, bias, row_w)
    ref = ref_sigmoid_bwd(a, b, s, bias, row_w, torch.float64)
    for o, h in zip(res[:2], ref[:2]):
        assert max_abs_err(o, h) / h.abs().max().item() < 5e-3


def test_bf16_runs():
    """bf16 inputs (in the interpreter the tiles are upcast to fp32: bf16 arithmetic is wrong there)."""
    a, b, s, bias = make_inputs(33, 19, 19, 100.0, True, dtype=torch.bfloat16)
    check_softmax_fwd(a, b, s, bias, torch.bfloat16)
    check_sigmoid_bwd(a, b, s, bias, torch.randn(33).to(DEV), torch.bfloat16)


# -------------------------------------------------------------------------- launch shapes and layout


def _configs():
    base = tc.default_config("fwd", torch.empty(1, device=DEV))
    return {
        "one-program": dataclasses.replace(base, target_programs=1),  # direct outputs, no merges
        "rows-only": dataclasses.replace(base, target_programs=2, block_n=64),  # S_c == 1, persistent
        "many": dataclasses.replace(base, target_programs=64, max_splits=8),  # S_r = R, S_c = C
        "single-d": dataclasses.replace(base, single_d_max=32, max_splits=1),  # D=19 in one chunk
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_launch_configs(name):
    cfg = _configs()[name]
    M, N, D = 70, 37, 19
    a, b, s, bias = make_inputs(M, N, D, 1.0, True)
    out = tc.softmax_fwd(a, b, s, bias, config=cfg)
    ref = ref_softmax_fwd(a, b, s, bias, torch.float64)
    for o, r, nm in zip(out, ref, SOFTMAX_FWD_NAMES):
        assert max_abs_err(o, r) < 1e-5 * max(1.0, r.abs().max().item()), nm
    w = [torch.randn(n).to(DEV) for n in (M, N)]
    da, db = tc.softmax_bwd(a, b, s, bias, out[0], out[2], *w, config=cfg)
    ref = ref_softmax_bwd(a, b, s, bias, out[0], out[2], *w, *w, torch.float64)
    for o, r in zip((da, db), ref):
        assert max_abs_err(o, r) < 1e-5 * max(1.0, r.abs().max().item())
    sums = tc.sigmoid_fwd(a, b, s, bias, config=cfg)
    assert max_abs_err(sums, ref_sigmoid_fwd(a, b, s, bias, torch.float64)) < 1e-4


def test_fwd_grid_is_persistent_and_bounded():
    """The forward launches at most ~target programs however large the batch, and its scratch is
    linear in M + N (never M x N)."""
    cfg = tc.ContrastiveConfig(128, 128, 64, 128, 8, 3, target_programs=264, max_splits=8)  # H200-like
    for M, N in [(1024, 65536), (32768, 32768), (65536, 65536), (262144, 8192), (7, 5)]:
        s_r, s_c, per = tc._fwd_grid(M, N, cfg)
        R, C = math.ceil(M / 128), math.ceil(N / 128)
        assert 1 <= s_r <= min(R, 264) and 1 <= s_c <= C and s_r * s_c <= 264
        assert per * s_c >= C and per * (s_c - 1) < C  # every split non-empty, all columns covered
        scratch = tc.softmax_fwd_scratch_numel(M, N, cfg)
        assert scratch <= 2 * 264 * (M + N)
        if M * N >= 1 << 24:
            assert scratch < M * N / 16


@pytest.mark.parametrize("M,N,D", [(70, 70, 8), (70, 53, 19)])
def test_no_m_by_n_allocation(monkeypatch, M, N, D):
    """Record every tensor the launchers allocate: nothing is M x N, and the forward allocates exactly
    its outputs plus the documented scratch."""
    sizes: list[int] = []
    for fname in ("empty", "zeros", "full", "empty_like", "zeros_like", "ones", "empty_strided"):
        orig = getattr(torch, fname)

        def spy(*args, __orig=orig, **kwargs):
            t = __orig(*args, **kwargs)
            sizes.append(t.numel())
            return t

        monkeypatch.setattr(torch, fname, spy)
    a, b, s, bias = make_inputs(M, N, D, 1.0, True)
    # GPU default tiles (128) would cover these sizes with one program and no partials: small tiles
    cfg = tc.default_config("fwd", a) if INTERPRET else tc.ContrastiveConfig(16, 16, 16, 16, 1, 1, 4, 3)
    sizes.clear()
    out = tc.softmax_fwd(a, b, s, bias, config=cfg)
    assert sum(sizes) == 2 * (M + N) + tc.softmax_fwd_scratch_numel(M, N, cfg)
    assert tc.softmax_fwd_scratch_numel(M, N, cfg) > 0  # the partial paths ran
    assert max(sizes) < M * N
    w = torch.randn(M).to(DEV)
    for fn in (
        lambda: tc.softmax_bwd(a, b, s, bias, out[0], out[2], w, torch.randn(N).to(DEV)),
        lambda: tc.sigmoid_fwd(a, b, s, bias),
        lambda: tc.sigmoid_bwd(a, b, s, bias, w),
    ):
        sizes.clear()
        fn()
        assert max(sizes) < M * N, max(sizes)


def test_row_strided_inputs():
    """Row strides other than D (slices of wider tensors, every other row) are read in place."""
    M, N, D = 33, 21, 19
    wide_a = torch.randn(M, D + 5).to(DEV)
    tall_b = torch.randn(2 * N, D).to(DEV)
    a, b = wide_a[:, 2 : 2 + D], tall_b[::2]
    assert a.stride(0) == D + 5 and b.stride(0) == 2 * D
    s, bias = torch.tensor([3.0], device=DEV), torch.tensor([0.5], device=DEV)
    out = tc.softmax_fwd(a, b, s, bias)
    ref = tc.softmax_fwd(a.contiguous(), b.contiguous(), s, bias)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    w = torch.randn(M).to(DEV)
    ref = tc.sigmoid_bwd(a.contiguous(), b.contiguous(), s, bias, w)
    for o, r in zip(tc.sigmoid_bwd(a, b, s, bias, w), ref):
        assert torch.equal(o, r)


def test_scalars_as_zero_dim_and_float64_tensors():
    a, b, s, bias = make_inputs(7, 33, 8, 3.0, True)
    ref = tc.sigmoid_fwd(a, b, s, bias)
    out = tc.sigmoid_fwd(a, b, s.reshape(()).double(), bias.reshape(()).double())
    assert max_abs_err(out, ref) < 1e-5


def test_backward_is_deterministic():
    a, b, s, bias = make_inputs(70, 33, 19, 10.0, True)
    fw = tc.softmax_fwd(a, b, s, bias)
    w = (torch.randn(70).to(DEV), torch.randn(33).to(DEV))
    r1 = tc.softmax_bwd(a, b, s, bias, fw[0], fw[2], *w)
    r2 = tc.softmax_bwd(a, b, s, bias, fw[0], fw[2], *w)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))


# -------------------------------------------------------------------------------- numerics and errors


def test_extreme_logits_sigmoid():
    """softplus / sigmoid of logits of either sign and large magnitude: no overflow, no NaN."""
    for scale, bias_v in ((100.0, -60.0), (100.0, 0.0), (100.0, 60.0), (1.0, -30.0)):
        a, b, s, _ = make_inputs(7, 33, 8, scale, False)
        bias = torch.tensor([bias_v], device=DEV)
        out = tc.sigmoid_fwd(a, b, s, bias)
        ref = ref_sigmoid_fwd(a, b, s, bias, torch.float64)
        assert torch.isfinite(out).all()
        assert max_abs_err(out, ref) <= 1e-6 * max(1.0, ref.abs().max().item())
        if bias_v < 0:  # tiny softplus values keep their relative accuracy (accurate log1p)
            assert ((out.cpu().double() - ref).abs() <= 1e-5 * ref).all()
        w = torch.randn(7).to(DEV)
        res = tc.sigmoid_bwd(a, b, s, bias, w)
        assert all(torch.isfinite(r).all() for r in res)
        hi = ref_sigmoid_bwd(a, b, s, bias, w, torch.float64)
        for o, h in zip(res, hi):
            assert max_abs_err(o, h) <= 1e-5 * max(1.0, h.abs().max().item())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
def test_nan_and_inf_propagate():
    M, N, D = 33, 21, 19
    a, b, s, bias = make_inputs(M, N, D, 1.0, True)
    a_nan = a.clone()
    a_nan[5, 3] = float("nan")
    rl, rm, cl, cm = tc.softmax_fwd(a_nan, b, s, bias)
    assert rl[5].isnan() and rm[5].isnan() and cl.isnan().all() and cm.isnan().all()
    assert torch.isfinite(torch.cat([rl[:5], rl[6:]])).all()
    sums = tc.sigmoid_fwd(a_nan, b, s, bias)
    assert sums[5].isnan() and torch.isfinite(torch.cat([sums[:5], sums[6:]])).all()
    da, db, dsc, dbi = tc.sigmoid_bwd(a_nan, b, s, bias, torch.ones(M, device=DEV))
    assert da[5].isnan().all() and db.isnan().all() and dsc.isnan() and dbi.isnan()

    b_inf = b.clone()
    b_inf[4, 0] = float("inf")
    rl, _, cl, _ = tc.softmax_fwd(a, b_inf, s, bias)
    assert not torch.isfinite(cl[4]) and not torch.isfinite(rl).all()
    w = torch.randn(M).to(DEV)
    da, db = tc.softmax_bwd(a, b, s, bias, rl * float("nan"), cl, w, torch.randn(N).to(DEV))
    assert da.isnan().any() and db.isnan().any()


def test_bad_shapes_raise_value_errors_naming_the_argument():
    a, b, s, bias = make_inputs(7, 5, 8, 1.0, True)
    with pytest.raises(ValueError, match=r"\ba must be 2-D"):
        tc.softmax_fwd(a[0], b, s)
    with pytest.raises(ValueError, match=r"\bb must have at least one row"):
        tc.sigmoid_fwd(a, b[:0], s)
    with pytest.raises(ValueError, match="D=8.*D=7"):
        tc.softmax_fwd(a, b[:, :7], s)
    with pytest.raises(ValueError, match="scale"):
        tc.softmax_fwd(a, b, torch.ones(2, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        tc.sigmoid_fwd(a, b, s, torch.ones(1, 2, device=DEV))
    with pytest.raises(ValueError, match="scale"):
        tc.sigmoid_fwd(a, b, 2.0)
    rl, cl = torch.zeros(7, device=DEV), torch.zeros(5, device=DEV)
    with pytest.raises(ValueError, match=r"col_lse must have shape \[5\]"):
        tc.softmax_bwd(a, b, s, bias, rl, rl, rl, cl)
    with pytest.raises(ValueError, match=r"a_col_w must have shape \[5\]"):
        tc.softmax_bwd(a, b, s, bias, rl, cl, rl, rl)
    with pytest.raises(ValueError, match="b_row_w and b_col_w"):
        tc.softmax_bwd(a, b, s, bias, rl, cl, rl, cl, rl, None)
    with pytest.raises(ValueError, match=r"row_w must have shape \[7\]"):
        tc.sigmoid_bwd(a, b, s, bias, cl)


def test_not_supported_reasons():
    a, b, s, _ = make_inputs(7, 5, 8, 1.0, False)
    assert tc.not_supported_reasons(a, b) == []
    assert any("float64" in r for r in tc.not_supported_reasons(a.double(), b.double()))
    assert any("dtype" in r for r in tc.not_supported_reasons(a.to(torch.int32), b.to(torch.int32)))
    assert any("differ" in r for r in tc.not_supported_reasons(a, b.half()))
    at = torch.randn(8, 7, device=DEV).t()  # [7, 8] with last-dim stride 7
    assert any("stride" in r for r in tc.not_supported_reasons(at, b))
    meta = torch.empty(7, 8, device="meta")
    assert any("device" in r or "CPU" in r or "CUDA" in r for r in tc.not_supported_reasons(meta, b))
    with pytest.raises(ValueError, match="stride"):
        tc.softmax_fwd(at, b, s)
    with pytest.raises(ValueError, match="float64"):
        tc.sigmoid_fwd(a.double(), b.double(), s)


# ------------------------------------------------------------------------------ GPU (skipped on CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_clip_sizes(dtype):
    """Realistic sizes on a GPU: multi-chunk D (RMW accumulator), several row blocks per forward
    program, backward splits; accuracy against fp64 by the plain-torch rule, and determinism."""
    if INTERPRET:
        pytest.skip("GPU sizes are too slow for the interpreter")
    M, N, D = 300, 2500, 768
    a, b, s, bias = make_inputs(M, N, D, 100.0, True, dtype=dtype)
    out, _ = check_softmax_fwd(a, b, s, bias, dtype)
    w = [torch.randn(n, device=DEV) / (2 * M) for n in (M, N)]
    da, db = tc.softmax_bwd(a, b, s, bias, out[0], out[2], *w)
    args = (a, b, s, bias, out[0], out[2], *w, *w)
    hi_g, lo_g = ref_softmax_bwd(*args, torch.float64), ref_softmax_bwd(*args, dtype)
    for o, h, lw, nm in zip((da, db), hi_g, lo_g, "ab"):
        check(o, lw, h, f"d{nm}")
    again = tc.softmax_bwd(a, b, s, bias, out[0], out[2], *w)
    assert torch.equal(da, again[0]) and torch.equal(db, again[1])
    check_sigmoid_bwd(a, b, s, bias, torch.randn(M, device=DEV), dtype)
    sums = tc.sigmoid_fwd(a, b, s, bias)
    check(sums, ref_sigmoid_fwd(a, b, s, bias, dtype), ref_sigmoid_fwd(a, b, s, bias, torch.float64), "sums")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [96, 128])
def test_gpu_persistent_rows_and_fp32_single_chunk(dtype, D):
    """Paths the GPU default tiles leave unexercised at small sizes: a persistent forward with
    several row blocks per program (few programs, M ~ 1000: the barrier-protected column partial
    read-modify-write), and fp32 D in (64, 128] (must take multi-chunk tiles that fit in shared
    memory, see default_config)."""
    if INTERPRET:
        pytest.skip("GPU sizes are too slow for the interpreter")
    import dataclasses

    M, N = 1000, 777
    a, b, s, bias = make_inputs(M, N, D, 30.0, True, dtype=dtype)
    cfg = dataclasses.replace(tc.default_config("fwd", a), target_programs=4)
    hi = ref_softmax_fwd(a, b, s, bias, torch.float64)
    lo = ref_softmax_fwd(a.to(DEV), b.to(DEV), s, bias, dtype)
    for config in (cfg, None):
        out = tc.softmax_fwd(a, b, s, bias, config=config)
        for o, h, lw, nm in zip(out, hi, lo, SOFTMAX_FWD_NAMES):
            check(o, lw.cpu(), h, f"{nm} target_programs={'4' if config else 'default'}")
