"""Single-process contrastive losses: every backend against open_clip and the references,
fp64 exactness, the fp32/bf16 accuracy rule, gradcheck, opcheck, torch.compile, the memory bound
and bad input."""

from __future__ import annotations

import os

import pytest
import torch

import mmfast
from mmfast import _ext
from mmfast.testing import assert_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: see conftest


# open_clip is the baseline of the drop-in tests, imported where they need it: the kernel tests here
# also run where open_clip is not installed (the GPU machine's stack)
def OCClipLoss(*args, **kwargs):  # noqa: N802 - stands in for the class
    return pytest.importorskip("open_clip.loss", reason="needs open_clip").ClipLoss(*args, **kwargs)


def OCSigLipLoss(*args, **kwargs):  # noqa: N802 - stands in for the class
    return pytest.importorskip("open_clip.loss", reason="needs open_clip").SigLipLoss(*args, **kwargs)

needs_cpp = pytest.mark.skipif(not _ext.has_cpp(), reason="C++ extension not built")
CPU_IMPLS = ["reference"] + (["cpp"] if _ext.has_cpp() else [])



def _inputs(b, d, dtype=torch.float64, scale=14.3, bias=-2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    t = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    s = torch.tensor(scale, dtype=dtype)
    bb = None if bias is None else torch.tensor(bias, dtype=dtype)
    return i, t, s, bb


def _loss_and_grads(fn, i, t, s, b):
    leaves = [x.clone().requires_grad_() for x in (i, t, s)] + ([b.clone().requires_grad_()] if b is not None else [])
    loss = fn(*leaves[:3], leaves[3] if b is not None else None)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("b", [1, 7, 64, 257])
@pytest.mark.parametrize("d", [8, 64, 129])
@pytest.mark.parametrize("scale,bias", [(1.0, None), (100.0, -10.0)])
def test_clip_and_siglip_match_open_clip_float64(impl, b, d, scale, bias):
    i, t, s, bb = _inputs(b, d, scale=scale, bias=bias)
    cases = [(OCClipLoss(), mmfast.ClipLoss(impl=impl), bb)]
    sig_bias = bb if bb is not None else torch.tensor(-10.0, dtype=torch.float64)
    cases.append((OCSigLipLoss(), mmfast.SigLipLoss(impl=impl), sig_bias))
    for ref_mod, our_mod, bias_t in cases:
        lr, gr = _loss_and_grads(ref_mod, i, t, s, bias_t)
        lo, go = _loss_and_grads(our_mod, i, t, s, bias_t)
        # fp64: differences are summation-order rounding, relative to O(scale) terms
        tol = 1e-12 * max(scale, 1.0) * 10
        assert abs(lo.item() - lr.item()) <= tol * max(1.0, abs(lr.item()))
        for x, y in zip(go, gr):
            assert (x - y).abs().max().item() <= tol * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_output_dict(impl):
    i, t, s, b = _inputs(5, 8)
    out = mmfast.ClipLoss(impl=impl)(i, t, s, b, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert torch.allclose(out["contrastive_loss"], OCClipLoss()(i, t, s, b))
    out = mmfast.SigLipLoss(impl=impl)(i, t, s, b, output_dict=True)
    assert torch.allclose(out["contrastive_loss"], OCSigLipLoss()(i, t, s, b))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_accuracy_rule_low_precision(dtype, kind):
    # The accuracy rule (STYLE.md): error vs fp64 at most 2x open_clip's own error in `dtype`.
    i64, t64, s64, b64 = _inputs(300, 96, scale=50.0, bias=-8.0, seed=3)
    ref_mod = OCClipLoss() if kind == "clip" else OCSigLipLoss()
    our_mod = mmfast.ClipLoss(impl="cpp") if kind == "clip" else mmfast.SigLipLoss(impl="cpp")
    l_hi, g_hi = _loss_and_grads(ref_mod, i64, t64, s64, b64)
    low = [x.to(dtype) for x in (i64, t64, s64, b64)]
    l_lo, g_lo = _loss_and_grads(ref_mod, *low)
    l_ours, g_ours = _loss_and_grads(our_mod, *low)
    assert l_ours.dtype == torch.float32  # accumulated and returned in fp32, like open_clip under autocast
    assert_accuracy(l_ours, l_lo, l_hi, name=f"{kind} loss {dtype}")
    for name, x, y, z in zip(("d_image", "d_text", "d_scale"), g_ours, g_lo, g_hi):
        assert_accuracy(x, y, z, name=f"{kind} {name} {dtype}")


@needs_cpp
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcheck_float64(kind):
    i, t, s, b = _inputs(5, 3, scale=3.0, bias=-1.0)
    fn = mmfast.functional.clip_loss if kind == "clip" else mmfast.functional.siglip_loss
    ins = tuple(x.clone().requires_grad_() for x in (i, t, s, b))
    assert torch.autograd.gradcheck(lambda *a: fn(*a, impl="cpp"), ins)


@needs_cpp
def test_opcheck_tile_ops_and_loss_ops():
    a = torch.randn(9, 5)
    bm = torch.randn(13, 5)
    s, b = torch.tensor(3.0), torch.tensor(-0.5)
    rl, re, cl, ce = torch.ops.mmfast.contrastive_softmax_fwd(a, bm, s, b)
    w1, w2 = torch.rand(9), torch.rand(13)
    checks = [
        (torch.ops.mmfast.contrastive_softmax_fwd.default, (a, bm, s, b)),
        (torch.ops.mmfast.contrastive_softmax_bwd.default, (a, bm, s, b, rl, cl, w1, w2, None, None)),
        (torch.ops.mmfast.contrastive_softmax_bwd.default, (a, bm, s, None, rl, cl, w1, w2, w1 * 2, w2 * 0)),
        (torch.ops.mmfast.contrastive_sigmoid_fwd.default, (a, bm, s, b)),
        (torch.ops.mmfast.contrastive_sigmoid_bwd.default, (a, bm, s, b, w1)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    i, t, s2, b2 = _inputs(6, 4, dtype=torch.float32)
    for op in (torch.ops.mmfast.clip_loss_fwd.default, torch.ops.mmfast.siglip_loss_fwd.default):
        args = (i.requires_grad_(), t.requires_grad_(), s2.requires_grad_(), b2.requires_grad_(), None, "cpp")
        torch.library.opcheck(op, args)


@needs_cpp
def test_torch_compile_fullgraph():
    i, t, s, b = _inputs(11, 8, dtype=torch.float32)
    mod = mmfast.ClipLoss(impl="cpp")
    compiled = torch.compile(lambda *a: mod(*a), fullgraph=True, backend="aot_eager")
    li, gi = _loss_and_grads(compiled, i, t, s, b)
    le, ge = _loss_and_grads(mod, i, t, s, b)
    assert torch.allclose(li, le)
    for x, y in zip(gi, ge):
        assert torch.allclose(x, y, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_logit_matrix_never_allocated(kind):
    from mmfast.bench.memory import cpu_peak_extra_memory

    n, d = 4096, 32
    i, t, s, b = _inputs(n, d, dtype=torch.float32)
    i.requires_grad_()
    t.requires_grad_()
    mod = mmfast.ClipLoss(impl="cpp") if kind == "clip" else mmfast.SigLipLoss(impl="cpp")

    def step():
        loss = mod(i, t, s, b)
        loss.backward()
        return loss

    stats = cpu_peak_extra_memory(step)
    full = n * n * 4  # one fp32 logit matrix: 64 MiB
    assert stats.events > 0
    assert stats.peak_extra_bytes < full / 8, f"peak {stats.peak_extra_bytes / 2**20:.1f} MiB"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bad_input(kind):
    mod = mmfast.ClipLoss() if kind == "clip" else mmfast.SigLipLoss()
    i, t, s, b = _inputs(4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="text_features"):
        mod(i, t[:3], s, b)
    with pytest.raises(ValueError, match="text_features"):
        mod(i, t[:, :5], s, b)
    with pytest.raises(ValueError, match="image_features must be 2-D"):
        mod(i[None], t, s, b)
    with pytest.raises(TypeError, match="dtypes differ"):
        mod(i, t.double(), s, b)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        mod(i, t, torch.ones(2), b)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        mod(i, t, torch.tensor(float("inf")), b)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        mod(i, t, s, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="impl must be one of"):
        mmfast.functional.clip_loss(i, t, s, impl="fast")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        mmfast.functional.clip_loss(i, t, s, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        mmfast.functional.clip_loss(i, t, s, rank=3, world_size=2)


def test_nonfinite_features_propagate():
    i, t, s, b = _inputs(4, 8, dtype=torch.float32)
    i[1, 2] = float("nan")
    assert torch.isnan(mmfast.ClipLoss()(i, t, s, b))
    assert torch.isnan(mmfast.SigLipLoss()(i, t, s, b))


def test_forced_unavailable_backend_is_an_error():
    i, t, s, b = _inputs(4, 8, dtype=torch.float32)
    # no contrastive op has a CUDA entry in its backend table: an argument error naming the table
    with pytest.raises(ValueError, match=r"impl='cuda' is not a backend of this op \(it has cpp, triton, reference\)"):
        mmfast.ClipLoss(impl="cuda")(i, t, s, b)
    if os.environ.get("TRITON_INTERPRET") != "1":  # a backend in the table that cannot take CPU tensors
        with pytest.raises(RuntimeError, match=r"impl='triton' cannot run these inputs\. inputs: "
                                               r"a=float32\[4, 8\] on cpu, b=float32\[4, 8\] on cpu; "
                                               r"backends: cpp: .* \| triton: .*CUDA.* \| reference: can run"):
            mmfast.SigLipLoss(impl="triton")(i, t, s, b)
    with mmfast.use_backend("reference"):
        ref = mmfast.ClipLoss()(i, t, s, b)
    assert torch.allclose(ref, OCClipLoss()(i, t, s, b), atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_triton_backend_through_the_loss(kind):
    # The Triton kernels under the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU),
    # reached through the public module: tiny odd shapes, fp32, against open_clip in fp64.
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    i64, t64, s64, b64 = _inputs(19, 12, scale=30.0, bias=-4.0, seed=5)
    ref_mod = OCClipLoss() if kind == "clip" else OCSigLipLoss()
    our_mod = mmfast.ClipLoss(impl="triton") if kind == "clip" else mmfast.SigLipLoss(impl="triton")
    l_hi, g_hi = _loss_and_grads(ref_mod, i64, t64, s64, b64)
    low = [x.float() for x in (i64, t64, s64, b64)]
    l_lo, g_lo = _loss_and_grads(ref_mod, *low)
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"  # the kernels' device
    l_tr, g_tr = _loss_and_grads(our_mod, *[x.to(dev) for x in low])
    l_tr, g_tr = l_tr.cpu(), [g.cpu() for g in g_tr]
    assert_accuracy(l_tr, l_lo, l_hi, name=f"{kind} triton loss")
    for name, x, y, z in zip(("d_image", "d_text", "d_scale", "d_bias"), g_tr, g_lo, g_hi):
        if kind == "clip" and name == "d_bias":
            assert x.abs().item() == 0.0
            continue
        assert_accuracy(x, y, z, name=f"{kind} triton {name}")


# ------------------------------------------------------------------------------------------------
# SigLIP W=1: forward and gradients in one tile pass when gradients are wanted


@pytest.mark.skipif(not hasattr(torch.ops.mmfast, "contrastive_sigmoid_fwd_bwd"), reason="no C++ fused pass")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,n,d", [(1, 1, 8), (7, 5, 19), (64, 1100, 33)])
def test_cpp_sigmoid_fwd_bwd_equals_fwd_then_bwd(dtype, m, n, d):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(m, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    s, bias = torch.tensor(7.0, dtype=dtype), torch.tensor(-3.0, dtype=dtype)
    w = torch.rand(m, generator=g, dtype=dtype)
    fused = torch.ops.mmfast.contrastive_sigmoid_fwd_bwd(a, b, s, bias, w)
    want = (torch.ops.mmfast.contrastive_sigmoid_fwd(a, b, s, bias),
            *torch.ops.mmfast.contrastive_sigmoid_bwd(a, b, s, bias, w))
    for x, y, name in zip(fused, want, ("rowsum", "da", "db", "dscale", "dbias")):
        assert torch.equal(x, y), f"{name}: the fused pass must do the same arithmetic as forward + backward"
    torch.library.opcheck(torch.ops.mmfast.contrastive_sigmoid_fwd_bwd.default, (a, b, s, bias, w),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_siglip_fused_forward_gradients_equal_separate_backward(monkeypatch, impl, with_bias):
    from mmfast.ops import contrastive_loss as cl

    i, t, s, b = _inputs(37, 24, dtype=torch.float32, scale=10.0, bias=-5.0, seed=3)
    b = b if with_bias else None
    calls = []
    real = cl.siglip_loss_fwd_grad
    monkeypatch.setattr(cl, "siglip_loss_fwd_grad", lambda *a: calls.append(1) or real(*a))
    leaves = [x.clone().requires_grad_() for x in (i, t, s)] + ([b.clone().requires_grad_()] if with_bias else [])
    loss = mmfast.functional.siglip_loss(*leaves[:3], leaves[3] if with_bias else None, impl=impl)
    assert calls == [1], "a differentiable call runs the fused forward + gradient op"
    got = torch.autograd.grad(loss * 3.7, leaves)
    # the separate backward: forward op, then backward op with the upstream gradient inside
    sep = [x.clone().requires_grad_() for x in leaves]
    loss2 = cl.siglip_loss_fwd(sep[0], sep[1], sep[2], sep[3] if with_bias else None, None, impl)
    assert torch.equal(loss.detach(), loss2.detach())
    want = torch.autograd.grad(loss2 * 3.7, sep)
    for x, y in zip(got, want):
        # the upstream 3.7 applied after (fused) vs inside (separate) the tile sums: a few ulps of the magnitude
        torch.testing.assert_close(x, y, rtol=0, atol=8 * torch.finfo(torch.float32).eps * y.abs().max().item())
    with torch.no_grad():
        calls.clear()
        mmfast.functional.siglip_loss(*leaves[:3], leaves[3] if with_bias else None, impl=impl)
        assert not calls, "without gradients only the forward runs"


def test_siglip_fused_forward_gradient_dtypes_and_opcheck():
    from mmfast.ops import contrastive_loss as cl

    i, t, s, b = _inputs(9, 16, dtype=torch.float32, seed=4)
    leaves = [i.bfloat16().requires_grad_(), t.bfloat16().requires_grad_(), s.requires_grad_(), b.requires_grad_()]
    loss = mmfast.functional.siglip_loss(*leaves)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, leaves)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    args = (i, t, s.detach(), b.detach(), None, "cpp" if _ext.has_cpp() else "reference")
    torch.library.opcheck(cl.siglip_loss_fwd_grad, args, test_utils=("test_schema", "test_faketensor"))
