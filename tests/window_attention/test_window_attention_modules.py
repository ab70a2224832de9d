"""mmfast's Swin modules and timm patches against timm itself (TIMM_FUSED_ATTN=0), weights
copied across, forward and backward, for every CPU backend of the fused op."""

from __future__ import annotations

import os

os.environ.setdefault("TIMM_FUSED_ATTN", "0")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import swin_transformer as tswin  # noqa: E402
from timm.models import swin_transformer_v2 as tswin2  # noqa: E402

import mmfast  # noqa: E402
from mmfast import _ext  # noqa: E402
from mmfast.patch import timm as mpatch  # noqa: E402

IMPLS = ["reference"] + (["cpp"] if _ext.has_cpp() and hasattr(torch.ops.mmfast, "window_attention_fwd") else [])

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: see conftest



def _no_fused(model):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def _compare(ref_model, our_model, x, impl, tol):
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1 = ref_model(x1)
    with mmfast.use_backend(impl):
        y2 = our_model(x2)
    scale = y1.detach().abs().max().item()
    assert (y1 - y2).abs().max().item() <= tol * max(scale, 1.0)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    with mmfast.use_backend(impl):
        (y2 * g).sum().backward()
    assert (x1.grad - x2.grad).abs().max().item() <= tol * max(x1.grad.abs().max().item(), 1.0)
    p1 = dict(ref_model.named_parameters())
    for name, p in our_model.named_parameters():
        q = p1[name]
        assert p.grad is not None, name
        assert (p.grad - q.grad).abs().max().item() <= tol * max(q.grad.abs().max().item(), 1.0), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hw,window,shift", [
    ((14, 14), 7, 3), ((13, 20), (7, 9), (3, 4)), ((9, 9), 4, 2), ((5, 6), 7, 3), ((16, 16), 8, 0),
    ((57, 57), 7, 3), ((24, 30), 12, 6), ((16, 16), 8, (4, 1)),
])
def test_swin_block_v1_state_dict_and_numbers(impl, hw, window, shift):
    torch.manual_seed(0)
    kw = dict(dim=32, input_resolution=hw, num_heads=2, window_size=window, shift_size=shift)
    ref = _no_fused(tswin.SwinTransformerBlock(**kw)).double()
    ours = mmfast.SwinTransformerBlock(**kw).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.window_size == ref.window_size and ours.shift_size == ref.shift_size
    x = torch.randn(2, *hw, 32, dtype=torch.float64)
    _compare(ref, ours, x, impl, 1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hw,window,shift", [((8, 8), 4, 2), ((10, 7), 4, 2)])
def test_swin_block_v2_state_dict_and_numbers(impl, hw, window, shift):
    torch.manual_seed(0)
    kw = dict(dim=32, input_resolution=hw, num_heads=2, window_size=window, shift_size=shift)
    ref = _no_fused(tswin2.SwinTransformerV2Block(**kw)).double()
    with torch.no_grad():
        ref.attn.logit_scale.uniform_(1.0, 5.0)  # one head above the clamp too
        ref.attn.logit_scale[0] = 5.0
        ref.attn.q_bias.normal_()
        ref.attn.v_bias.normal_()
    ours = mmfast.SwinTransformerV2Block(**kw).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, *hw, 32, dtype=torch.float64)
    _compare(ref, ours, x, impl, 1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_window_attention_windowed_interface(impl):
    torch.manual_seed(0)
    ref = _no_fused(tswin.WindowAttention(32, num_heads=4, window_size=(7, 7))).double()
    ours = mmfast.WindowAttention(32, num_heads=4, window_size=(7, 7)).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(6, 49, 32, dtype=torch.float64)
    _compare(ref, ours, x, impl, 1e-10)
    mask = torch.zeros(3, 49, 49, dtype=torch.float64)
    mask[1, :20, 20:] = -100.0
    assert torch.allclose(ref(x, mask), ours(x, mask), atol=1e-12)
    with pytest.raises(ValueError, match="mask must be"):
        ours(x, mask[:, :10])


@pytest.mark.parametrize("impl", IMPLS)
def test_patched_swin_tiny_whole_model(impl):
    torch.manual_seed(0)
    ref = _no_fused(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10)).eval()
    ours = _no_fused(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10)).eval()
    ours.load_state_dict(ref.state_dict())
    mpatch.apply_window_attention(ours)
    assert sum(type(m).__name__.startswith("MMFast") for m in ours.modules()) == 12
    x = torch.randn(1, 3, 224, 224)
    # fp32 through 12 blocks: reassociated sums differ from timm's at ~1e-6 relative
    _compare(ref, ours, x, impl, 2e-4)
    mpatch.revert_window_attention(ours)
    assert not any(type(m).__name__.startswith("MMFast") for m in ours.modules())
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_patched_swin_v2_model(impl):
    torch.manual_seed(0)
    kw = dict(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=5)
    ref = _no_fused(tswin2.SwinTransformerV2(**kw)).double().eval()
    ours = _no_fused(tswin2.SwinTransformerV2(**kw)).double().eval()
    ours.load_state_dict(ref.state_dict())
    mpatch.apply_window_attention(ours)
    _compare(ref, ours, torch.randn(2, 3, 64, 64, dtype=torch.float64), impl, 1e-9)


def test_patch_errors():
    with pytest.raises(TypeError, match="no timm SwinTransformerBlock"):
        mpatch.apply_window_attention(torch.nn.Linear(2, 2))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    with pytest.raises(ValueError, match="global_blocks"):
        mpatch.apply_windowed_vit(vit, window_size=7, global_blocks=[5])
    with pytest.raises(TypeError, match="VisionTransformer"):
        mpatch.apply_windowed_vit(torch.nn.Linear(2, 2))
    blk = mmfast.SwinTransformerBlock(dim=32, input_resolution=(8, 8), num_heads=2, window_size=4)
    with pytest.raises(ValueError, match="channels-last"):
        blk(torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        mmfast.WindowAttention(30, num_heads=4)


def _explicit_windowed_vit(model, x, window, global_blocks, shift):
    """Independent ViTDet-style forward written with explicit pad/partition/attention."""
    import torch.nn.functional as F

    def win_attn(attn, xn, grid):
        b, n, c = xn.shape
        p = n - grid[0] * grid[1]
        heads, hd = attn.num_heads, attn.head_dim
        qkv = attn.qkv(xn).view(b, n, 3, heads, hd)
        q, k, v = qkv.unbind(2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = torch.empty(b, n, heads, hd, dtype=xn.dtype)
        # prefix tokens: global
        if p:
            a = torch.einsum("bphd,bnhd->bhpn", q[:, :p], k) * attn.scale
            out[:, :p] = torch.einsum("bhpn,bnhd->bphd", a.softmax(-1), v)
        h, w = grid
        wh, ww = window
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        xg = F.pad(xn[:, p:].reshape(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h))
        qkv_g = attn.qkv(xg).view(b, hp, wp, 3, heads, hd)
        qg, kg, vg = qkv_g.unbind(3)
        qg, kg = attn.q_norm(qg), attn.k_norm(kg)
        og = torch.empty(b, hp, wp, heads, hd, dtype=xn.dtype)
        for i in range(0, hp, wh):
            for j in range(0, wp, ww):
                sl = (slice(None), slice(i, i + wh), slice(j, j + ww))
                qq, kk, vv = (t[sl].reshape(b, wh * ww, heads, hd) for t in (qg, kg, vg))
                a = torch.einsum("bqhd,bkhd->bhqk", qq, kk) * attn.scale
                og[sl] = torch.einsum("bhqk,bkhd->bqhd", a.softmax(-1), vv).reshape(b, wh, ww, heads, hd)
        out[:, p:] = og[:, :h, :w].reshape(b, h * w, heads, hd)
        return attn.proj(attn.norm(out.reshape(b, n, heads * hd)))

    grid = tuple(model.patch_embed.grid_size)

    def run_blocks(t):
        for i, blk in enumerate(model.blocks):
            if i in global_blocks:
                t = blk(t)
            else:
                t = t + blk.ls1(win_attn(blk.attn, blk.norm1(t), grid))
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        return model.norm(t)

    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    if not shift:
        return run_blocks(t)
    s = (window[0] // 2, window[1] // 2)
    p = model.num_prefix_tokens
    b, _, c = t.shape
    rolled = torch.roll(t[:, p:].reshape(b, *grid, c), (-s[0], -s[1]), (1, 2)).reshape(b, -1, c)
    t2 = torch.cat([t[:, :p], rolled], 1)
    a, bb = run_blocks(t), run_blocks(t2)
    back = torch.roll(bb[:, p:].reshape(b, *grid, c), s, (1, 2)).reshape(b, -1, c)
    return 0.5 * (a + torch.cat([bb[:, :p], back], 1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [False, True])
def test_windowed_vit(impl, shift):
    torch.manual_seed(0)
    kw = dict(img_size=80, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0, qk_norm=True,
              init_values=0.5)
    model = _no_fused(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)).double().eval()
    x = torch.randn(2, 3, 80, 80, dtype=torch.float64)
    with torch.no_grad():
        expected = _explicit_windowed_vit(model, x, (4, 4), {2}, shift)
        plain = model.forward_features(x)
        mpatch.apply_windowed_vit(model, window_size=4, global_blocks=[-1], shift=shift)
        with mmfast.use_backend(impl):
            got = model.forward_features(x)
        assert (got - expected).abs().max().item() < 1e-10
        mpatch.revert_windowed_vit(model)
        assert torch.equal(model.forward_features(x), plain)
        # every block global and no shift: exactly the unpatched model
        mpatch.apply_windowed_vit(model, window_size=4, global_blocks=[0, 1, 2], shift=False)
        assert torch.equal(model.forward_features(x), plain)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("cosine", [False, True])
def test_functional_backends_through_custom_op(impl, cosine):
    # Every kernel backend reached through mmfast.functional.window_attention (the custom op with
    # its registered autograd) against the reference, fp32, tiny odd shape with padding + shift.
    if impl == "cpp" and "cpp" not in IMPLS:
        pytest.skip("C++ extension without window attention")
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    b, h, w, heads, hd, win, shift = 2, 7, 5, 2, 8, (3, 3), (1, 2)
    qkv = torch.randn(b, h, w, 3, heads, hd, dtype=torch.float64)
    table = torch.randn((2 * win[0] - 1) * (2 * win[1] - 1), heads, dtype=torch.float64)
    pad = torch.randn(3, heads, hd, dtype=torch.float64)
    ls = torch.tensor([3.0, 7.0], dtype=torch.float64) if cosine else None

    # the Triton kernels take CUDA tensors on a GPU host, CPU tensors under the interpreter
    dev = "cuda" if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

    def run(backend, dtype):
        d = dev if backend == impl else "cpu"
        leaves = [t.detach().to(d, dtype).requires_grad_() for t in (qkv, table, pad)]
        lsd = ls.to(d, dtype).requires_grad_() if ls is not None else None
        q, k, v = leaves[0].unbind(3)
        out = mmfast.functional.window_attention(q, k, v, window_size=win, shift_size=shift, rel_pos_bias=leaves[1],
                                                 pad_value=leaves[2], logit_scale=lsd, impl=backend)
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(d, dtype)
        grads = torch.autograd.grad((out * g).sum(), leaves + ([lsd] if lsd is not None else []))
        return [t.cpu() for t in [out, *grads]]

    want = run("reference", torch.float64)
    low = run("reference", torch.float32)
    got = run(impl, torch.float32)
    from mmfast.testing import assert_accuracy

    for name, x, y, z in zip(("out", "d_qkv", "d_table", "d_pad", "d_logit_scale"), got, low, want):
        assert_accuracy(x, y, z, name=f"{impl} {name}")


@pytest.mark.skipif("cpp" not in IMPLS, reason="C++ extension without window attention")
def test_opcheck_and_compile_without_recompiles():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 7, 5, 2, 8).unbind(0)
    table = torch.randn(25, 2, requires_grad=True)
    pad = torch.randn(3, 2, 8, requires_grad=True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), table, None, pad, [3, 3], [1, 2], 0.35,
            True, -100.0, False, "cpp")
    torch.library.opcheck(torch.ops.mmfast.window_attention.default, args)

    blk = mmfast.SwinTransformerBlock(dim=32, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(blk, fullgraph=True, dynamic=True, backend="aot_eager")
    # the first size is non-square: dynamo duck-sizes equal dims into one symbol, and a square first
    # call would recompile once for the generic case (a shape guard, not the op)
    for hw in [(13, 20), (14, 14), (21, 9)]:
        x = torch.randn(2, *hw, 32)
        with mmfast.use_backend("cpp"):
            assert torch.allclose(compiled(x), blk(x), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.skipif("cpp" not in IMPLS, reason="C++ extension without window attention")
def test_opcheck_cpp_kernel_ops():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 7, 5, 2, 8, dtype=torch.float64).unbind(0)
    table, pad, ls = torch.randn(25, 2, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64), None
    fwd_args = (q, k, v, table, ls, pad, [3, 3], [1, 2], 0.35, True, -100.0, False)
    torch.library.opcheck(torch.ops.mmfast.window_attention_fwd.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.mmfast.window_attention_fwd(*fwd_args)
    torch.library.opcheck(torch.ops.mmfast.window_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse) + fwd_args[3:],
                          test_utils=("test_schema", "test_faketensor"))
    x = torch.randn(2, 7, 5, 6)
    torch.library.opcheck(torch.ops.mmfast.window_process.default, (x, [3, 3], [1, 2], False, None),
                          test_utils=("test_schema", "test_faketensor"))
    win = torch.ops.mmfast.window_process(x, [3, 3], [1, 2], False, None)
    torch.library.opcheck(torch.ops.mmfast.window_process_reverse.default, (win, [7, 5], [3, 3], [1, 2], False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpp" not in IMPLS, reason="C++ extension without window attention")
@pytest.mark.parametrize("cosine", [False, True])
def test_gradcheck_float64(cosine):
    torch.manual_seed(0)
    qkv = torch.randn(1, 4, 5, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    table = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    pad = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([2.0, 5.0], dtype=torch.float64, requires_grad=True)

    def f(qkv, table, pad, ls):
        q, k, v = qkv.unbind(3)
        return mmfast.functional.window_attention(q, k, v, window_size=2, shift_size=(1, 0), rel_pos_bias=table,
                                                  pad_value=pad, logit_scale=ls if cosine else None, impl="cpp")

    assert torch.autograd.gradcheck(f, (qkv, table, pad, ls))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", ["roll_pad", "pad_roll"])
def test_window_partition_roundtrip_and_grads(impl, order):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 7, 5, dtype=torch.float64, requires_grad=True)
    pad = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with mmfast.use_backend(impl):
        win = mmfast.functional.window_partition(x, (4, 3), (1, 2), order=order, pad_value=pad)
        back = mmfast.functional.window_unpartition(win, (9, 7), (4, 3), (1, 2), order=order)
    assert win.shape == (2 * 3 * 3, 12, 5)
    assert torch.equal(back, x)
    # explicit roll/pad/partition of the reference helpers
    from mmfast.reference import window_attention as ref

    xs = torch.roll(x, (-1, -2), (1, 2)) if order == "roll_pad" else x
    padded = pad.expand(2, 12, 9, 5).clone()
    padded[:, :9, :7] = xs
    if order == "pad_roll":
        padded = torch.roll(padded, (-1, -2), (1, 2))
    want = ref.window_partition(padded, (4, 3)).reshape(-1, 12, 5)
    assert torch.equal(win, want)
    g = torch.randn_like(win)
    gx, gp = torch.autograd.grad((win * g).sum(), (x, pad))
    wx, wp = torch.autograd.grad((want * g).sum(), (x, pad))
    assert torch.allclose(gx, wx) and torch.allclose(gp, wp)
    with pytest.raises(ValueError, match="channels-last"):
        mmfast.functional.window_partition(x[0], 4)


@pytest.mark.skipif("cpp" not in IMPLS, reason="C++ extension without window attention")
def test_patched_timm_compiles_fullgraph_without_recompiles():
    torch.manual_seed(0)
    blk = tswin.SwinTransformerBlock(dim=32, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3,
                                     dynamic_mask=True)
    mpatch.apply_window_attention(blk)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(blk, fullgraph=True, dynamic=True, backend="aot_eager")
    for hw in [(13, 20), (14, 14), (21, 9)]:  # non-square first: see the test above
        x = torch.randn(2, *hw, 32)
        assert torch.allclose(compiled(x), blk(x), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10).eval()
    mpatch.apply_window_attention(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x), atol=1e-4)
