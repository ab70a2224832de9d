"""The labelled W=1 losses (``labels=`` on ClipLoss / SigLipLoss / functional): every backend against
the dense labelled references in fp64 (exact up to rounding), the accuracy rule in fp32 / bf16 / fp16,
float64 gradcheck, opcheck, torch.compile, distinct labels equal to the plain loss, bad labels."""

from __future__ import annotations

import os

import pytest
import torch

import mmfast
from mmfast import _ext
from mmfast.reference import contrastive as R
from mmfast.testing import assert_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLS = ["reference"] + (["cpp"] if _ext.has_cpp() else [])
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_cpp = pytest.mark.skipif(not _ext.has_cpp(), reason="C++ extension not built")


def _inputs(b, d, classes, dtype=torch.float64, scale=14.3, bias=-2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, classes, (b,), generator=g) * 5 - 3  # negatives too
    s = torch.tensor(scale, dtype=torch.float64)
    bb = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    return [x.to(dtype) for x in (i, t, s)] + [None if bb is None else bb.to(dtype)], labels


def _dense(kind, i, t, s, b, labels):
    if kind == "clip":
        return R.clip_loss_labelled(i, t, i, t, s, b, labels, labels)
    return R.siglip_loss_labelled(i, t, s, b, labels, labels)


def _ours(kind, impl="auto"):
    mod = mmfast.ClipLoss(impl=impl) if kind == "clip" else mmfast.SigLipLoss(impl=impl)
    return lambda i, t, s, b, labels: mod(i, t, s, b, labels=labels)


def _loss_and_grads(fn, ins, labels):
    leaves = [x.clone().requires_grad_() for x in ins if x is not None]
    args = leaves + [None] * (4 - len(leaves))
    loss = fn(*args, labels)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _fp64_close(got, want):
    # fp64: summation-order rounding of O(scale) terms
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12 * max(1.0, y.abs().max().item()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("b,d,classes", [(1, 8, 1), (7, 5, 2), (64, 33, 10), (257, 16, 257), (130, 8, 1)])
@pytest.mark.parametrize("bias", [None, -3.0])
def test_matches_dense_reference_float64(impl, kind, b, d, classes, bias):
    ins, labels = _inputs(b, d, classes, bias=bias, scale=30.0)
    if kind == "siglip" and bias is None:
        ins[3] = None
    want = _loss_and_grads(lambda *a: _dense(kind, *a), ins, labels)
    got = _loss_and_grads(_ours(kind, impl), ins, labels)
    _fp64_close([got[0], *got[1]], [want[0], *want[1]])


@pytest.mark.skipif(not TRITON, reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_triton_backend_with_labels(kind):
    ins64, labels = _inputs(37, 12, 6, scale=30.0, bias=-4.0, seed=5)
    hi = _loss_and_grads(lambda *a: _dense(kind, *a), ins64, labels)
    low = [x.float() for x in ins64]
    lo = _loss_and_grads(lambda *a: _dense(kind, *a), low, labels)
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    got = _loss_and_grads(_ours(kind, "triton"), [x.to(dev) for x in low], labels.to(dev))
    assert_accuracy(got[0].cpu(), lo[0], hi[0], name=f"{kind} triton loss")
    for name, x, y, z in zip(("d_image", "d_text", "d_scale", "d_bias"), got[1], lo[1], hi[1]):
        if kind == "clip" and name == "d_bias":
            assert x.abs().item() == 0.0
            continue
        assert_accuracy(x.cpu(), y, z, name=f"{kind} triton {name}")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_accuracy_rule_low_precision(dtype, kind):
    # error against fp64 at most 2x the dense labelled loss's own error in ``dtype`` (STYLE.md)
    ins64, labels = _inputs(300, 96, 40, scale=50.0, bias=-8.0, seed=3)
    hi = _loss_and_grads(lambda *a: _dense(kind, *a), ins64, labels)
    low = [x.to(dtype) for x in ins64]
    lo = _loss_and_grads(lambda *a: _dense(kind, *a), low, labels)
    got = _loss_and_grads(_ours(kind, "cpp"), low, labels)
    assert got[0].dtype == torch.float32
    assert_accuracy(got[0], lo[0], hi[0], name=f"{kind} loss {dtype}")
    for name, x, y, z in zip(("d_image", "d_text", "d_scale"), got[1], lo[1], hi[1]):
        assert x.dtype == y.dtype
        assert_accuracy(x, y, z, name=f"{kind} {name} {dtype}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcheck_float64(impl, kind):
    ins, labels = _inputs(6, 3, 3, scale=3.0, bias=-1.0, seed=2)
    fn = mmfast.functional.clip_loss if kind == "clip" else mmfast.functional.siglip_loss
    leaves = tuple(x.clone().requires_grad_() for x in ins)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, labels=labels, impl=impl), leaves)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_distinct_labels_are_the_plain_loss(impl, kind):
    ins, _ = _inputs(45, 16, 1, scale=20.0, bias=-3.0, seed=4)
    labels = torch.randperm(45) * 7 - 100
    got = _loss_and_grads(_ours(kind, impl), ins, labels)
    plain = _loss_and_grads(_ours(kind, impl), ins, None)
    _fp64_close([got[0], *got[1]], [plain[0], *plain[1]])
    # and equal labels are not: every pair positive changes the loss
    same = _loss_and_grads(_ours(kind, impl), ins, torch.zeros(45, dtype=torch.int64))
    assert (same[0] - plain[0]).abs() > 1e-3


@needs_cpp
def test_opcheck_with_labels():
    from mmfast.ops import contrastive_loss as cl

    ins, labels = _inputs(9, 5, 3, dtype=torch.float32, seed=1)
    i, t, s, b = (x.requires_grad_() for x in ins)
    for op in (cl.clip_loss_fwd, cl.siglip_loss_fwd):
        torch.library.opcheck(op, (i, t, s, b, labels, "cpp"))
    torch.library.opcheck(cl.siglip_loss_fwd_grad, (i.detach(), t.detach(), s.detach(), b.detach(), labels, "cpp"),
                          test_utils=("test_schema", "test_faketensor"))


@needs_cpp
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_torch_compile_fullgraph_with_labels(kind):
    ins, labels = _inputs(23, 8, 5, dtype=torch.float32, seed=6)
    fn = _ours(kind, "cpp")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(compiled, ins, labels)
    want = _loss_and_grads(fn, ins, labels)
    torch.testing.assert_close(got[0], want[0])
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y)


def test_output_dict_and_functional_keyword():
    ins, labels = _inputs(10, 4, 3)
    out = mmfast.ClipLoss()(*ins, output_dict=True, labels=labels)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], mmfast.functional.clip_loss(*ins, labels=labels))
    with pytest.raises(TypeError):  # keyword-only
        mmfast.ClipLoss()(*ins, False, labels)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("bad,error,match", [
    (lambda lab: lab.int(), TypeError, "labels must be int64, got torch.int32"),
    (lambda lab: lab.float(), TypeError, "labels must be int64, got torch.float32"),
    (lambda lab: lab[:-1], ValueError, r"labels must have shape \(10,\) \(one per local sample\), got \(9,\)"),
    (lambda lab: lab[:, None], ValueError, r"labels must have shape \(10,\)"),
    (lambda lab: lab.tolist(), TypeError, "labels must be None or an int64 torch.Tensor, got list"),
    (lambda lab: lab.to("meta"), ValueError, "labels are on meta but the features are on cpu"),
])
def test_bad_labels(kind, bad, error, match):
    ins, labels = _inputs(10, 4, 3)
    with pytest.raises(error, match=match):
        _ours(kind)(*ins, bad(labels))


@pytest.mark.parametrize("impl", IMPLS)
def test_clip_with_identical_duplicate_texts_is_the_plain_loss_siglip_is_not(impl):
    # duplicate captions through a deterministic text tower give identical text features; then for
    # CLIP the labelled loss equals the plain one (the duplicates' equal logits make the two targets'
    # cross-entropies sum to the same per class), and so do the parameter gradients (the duplicates'
    # text gradients summed); SigLIP's differs (+1 against -1 on the duplicates' pairs)
    ins, labels = _inputs(40, 8, 6, scale=20.0, bias=-3.0, seed=8)
    i, t, s, b = ins
    first = {}
    rep = torch.tensor([first.setdefault(v, k) for k, v in enumerate(labels.tolist())])
    t = t[rep]  # every text equal to its class's first one
    for kind in ("clip", "siglip"):
        lab = _loss_and_grads(_ours(kind, impl), [i, t, s, b], labels)
        plain = _loss_and_grads(_ours(kind, impl), [i, t, s, b], None)
        sum_by_class = [torch.zeros(40, 8, dtype=torch.float64).index_add_(0, rep, g[1][1]) for g in (lab, plain)]
        if kind == "clip":
            torch.testing.assert_close(lab[0], plain[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(sum_by_class[0], sum_by_class[1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(lab[1][0], plain[1][0], rtol=1e-10, atol=1e-12)  # the images' too
        else:
            assert (lab[0] - plain[0]).abs() > 1e-2
