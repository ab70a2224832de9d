"""ToMe patches (mmfast.tome) against a clean-room reference forward, plus API and exactness checks.

The reference below is written from the algorithm, patch-free: explicit attention softmax with
``+ log(size)`` on the keys, the pure-torch bipartite matching of :mod:`mmfast.reference.tome` and
its ``merge_wavg`` / ``merge_source``, applied to the SAME model's weights (it calls the model's own
linear / norm / LayerScale / drop-path modules, never a block's or attention's forward). It tracks
``size`` (ones at the start) and ``source`` in every layer, so it also checks that the patch's lazy
``size=None`` start changes nothing.

Tolerances (fp32): the patch runs fused SDPA (blockwise, online softmax) where the reference runs
an explicit softmax, and the fused C++ merge kernel where the reference runs scatter_reduce; both
reorder fp32 sums (~1e-7 relative per op), compounded over the layers. The matchings themselves
are compared EXACTLY (source matrices and sizes equal), so a tolerance can never hide a different
merge; the outputs are then compared at rtol=atol=1e-4 (whole ViT-S/B, 12 layers; measured max
difference ~2e-6 on outputs of magnitude ~2-3) or 1e-5 (tiny models). The matchings are robust to
those differences: the smallest decision margins of the random-init ViT-S / ViT-B-32 runs (the gap
between the r-th and (r+1)-th best edge score, and between a merged token's best and second-best
destination) measured 2.4e-4 and 6.6e-4, two orders of magnitude above the numerical noise.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from mmfast import tome  # noqa: E402
from mmfast.nn.token_merger import TokenMerger  # noqa: E402
from mmfast.reference import tome as ref  # noqa: E402


def _open_clip():
    """open_clip, or a skip of the test that needs it (the timm tests here run without it)."""
    return pytest.importorskip("open_clip", reason="needs open_clip")


# ------------------------------------------------------------------------------------------------
# clean-room reference


def ref_merge(x, metric, r, size, source, num_prefix):
    """One reference merge, prefix tokens protected: with P prefix tokens, tokens 0..P-2 are set
    aside and [token P-1, patches...] is matched with class_token=True (P=1: the full sequence)."""
    if num_prefix == 0:
        m, _ = ref.bipartite_soft_matching(metric, r)
        src = ref.merge_source(m, x, source)
        x, size = ref.merge_wavg(m, x, size)
        return x, size, src
    k = num_prefix - 1
    m, _ = ref.bipartite_soft_matching(metric[:, k:], r, class_token=True)
    src = ref.merge_source(m, x[:, k:], source[:, k:])
    xm, sm = ref.merge_wavg(m, x[:, k:], size[:, k:])
    return torch.cat([x[:, :k], xm], 1), torch.cat([size[:, :k], sm], 1), torch.cat([source[:, :k], src], 1)


def ref_softmax_attention(q, k, v, scale, size, prop_attn):
    logits = (q @ k.transpose(-2, -1)) * scale
    if prop_attn:
        logits = logits + size[:, None, None, :, 0].log()
    return logits.softmax(dim=-1) @ v


def ref_timm_forward(model: VisionTransformer, img, r_list, prop_attn=True):
    """Reference ToMe forward of a timm ViT: (logits, size, source)."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    b, n, _ = x.shape
    size = x.new_ones(b, n, 1)
    source = torch.eye(n, dtype=x.dtype).expand(b, n, n)
    for blk, r in zip(model.blocks, r_list):
        a = blk.attn
        h = blk.norm1(x)
        n = h.shape[1]
        q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        o = ref_softmax_attention(q, k, v, a.head_dim ** -0.5, size, prop_attn)
        o = a.proj(a.norm(o.transpose(1, 2).reshape(b, n, -1)))
        x = x + blk.drop_path1(blk.ls1(o))
        if r:
            x, size, source = ref_merge(x, k.mean(dim=1), r, size, source, p)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = model.norm(x)
    if model.global_pool == "avg":
        feat = (x[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)
    else:
        assert model.global_pool == "token"
        feat = x[:, 0]
    return model.head(model.fc_norm(feat)), size, source


def ref_open_clip_forward(visual, img, r_list, prop_attn=True):
    """Reference ToMe forward of an open_clip VisionTransformer: (pooled, tokens, size, source)."""
    x = visual._embeds(img)
    b, n, c = x.shape
    size = x.new_ones(b, n, 1)
    source = torch.eye(n, dtype=x.dtype).expand(b, n, n)
    for blk, r in zip(visual.transformer.resblocks, r_list):
        mha = blk.attn
        heads, n = mha.num_heads, x.shape[1]
        hd = c // heads
        h = blk.ln_1(x)
        q, k, v = (h @ mha.in_proj_weight.t() + mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in (q, k, v))
        o = ref_softmax_attention(q, k, v, 1 / math.sqrt(hd), size, prop_attn)
        o = mha.out_proj(o.transpose(1, 2).reshape(b, n, c))
        x = x + blk.ls_1(o)
        if r:
            x, size, source = ref_merge(x, k.mean(dim=1), r, size, source, 1)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    x = visual.ln_post(x)
    if visual.pool_type == "avg":
        pooled = (x[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
    else:
        pooled = x[:, 0]
    return pooled @ visual.proj, x[:, 1:], size, source


def tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=4, num_classes=7, mlp_ratio=2.0)
    args.update(kw)
    return VisionTransformer(**args).eval()


def tiny_open_clip(**kw):
    OCViT = _open_clip().transformer.VisionTransformer  # noqa: N806

    args = dict(image_size=32, patch_size=4, width=48, layers=3, heads=4, mlp_ratio=2.0, output_dim=16)
    args.update(kw)
    return OCViT(**args).eval()


def assert_close(a, b, tol, what):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------
# whole models: timm ViT-S/16 and open_clip ViT-B-32, random init


@pytest.fixture(scope="module")
def vit_s():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = model(img)
    return model, img, y


@pytest.fixture(scope="module")
def clip_b32():
    torch.manual_seed(0)
    open_clip = _open_clip()
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = model.visual(img)
    return model, img, y


@torch.no_grad()
def test_timm_vit_s_r0_bitwise_and_remove(vit_s):
    model, img, y = vit_s
    try:
        assert tome.apply_patch(model, r=0) is model
        assert tome.is_patched(model) and type(model).__name__ == "ToMeVisionTransformer"
        assert torch.equal(model(img), y)
    finally:
        tome.remove_patch(model)
    assert type(model) is VisionTransformer
    assert all(type(b) is timm.models.vision_transformer.Block for b in model.blocks)
    assert not any(k.startswith("_tome") for m in model.modules() for k in m.__dict__)
    assert torch.equal(model(img), y)


@torch.no_grad()
def test_timm_vit_s_matches_reference_r8(vit_s):
    model, img, _ = vit_s
    want, want_size, want_src = ref_timm_forward(model, img, [8] * 12)
    try:
        tome.apply_patch(model, r=8, trace_source=True)
        tokens, state = model.forward_features_tome(img)
        got = model.forward_head(tokens, size=state.size)  # what model(img) runs
    finally:
        tome.remove_patch(model)
    assert tokens.shape == (2, 197 - 96, 384)
    assert torch.equal(state.source, want_src) and torch.equal(state.size, want_size)
    assert_close(got, want, 1e-4, "ViT-S/16 r=8 vs reference")


@torch.no_grad()
def test_open_clip_b32_r0_bitwise_matches_reference_and_clip_dispatch(clip_b32):
    model, img, y = clip_b32
    open_clip = _open_clip()
    visual = model.visual
    assert visual.transformer.batch_first
    want, _, want_size, want_src = ref_open_clip_forward(visual, img, [8] * 12)
    try:
        tome.apply_patch(model, r=0)  # the CLIP model: its .visual is patched, r forwards to it
        assert tome.is_patched(model) and tome.is_patched(visual)
        assert torch.equal(visual(img), y)
        tome.apply_patch(model, r=8, trace_source=True)
        assert model.r == visual.r == 8 and model.tome_r_per_layer == [8] * 12
        tokens, state = visual.forward_features_tome(img)
        got = visual.tome_pool(tokens, state.size)[0] @ visual.proj  # what visual(img) runs
    finally:
        tome.remove_patch(model)
    assert type(model) is open_clip.model.CLIP and type(visual) is open_clip.transformer.VisionTransformer
    assert torch.equal(state.source, want_src) and torch.equal(state.size, want_size)
    # 50 tokens, r=8 clamped to (N - 1) // 2 once few remain: ToMe's clamp
    assert state.size.shape[1] == 2 and state.size[0, 1, 0] == 49
    assert_close(got, want, 1e-4, "open_clip ViT-B-32 r=8 vs reference")
    assert torch.equal(visual(img), y)


# ------------------------------------------------------------------------------------------------
# tiny models: configurations


def _patched_features(model, img, r):
    """Patch ``model`` with source tracing, check that r = 0 leaves its output unchanged, then run
    ``forward_features_tome`` with ``r``: (tokens, state)."""
    y0 = model(img)
    tome.apply_patch(model, r=0, trace_source=True)
    assert torch.equal(model(img), y0)
    model.r = r
    return model.forward_features_tome(img)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kw", [dict(init_values=0.5, qk_norm=True), dict(init_values=1e-5), dict(qk_norm=True)],
                         ids=["ls0.5-qknorm", "ls1e-5", "qknorm"])
@torch.no_grad()
def test_layerscale_qknorm_match_reference(kw, fused):
    model = tiny_vit(**kw)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    img = torch.randn(2, 3, 32, 32)
    tokens, state = _patched_features(model, img, 6)
    want, want_size, want_src = ref_timm_forward(model, img, [6] * 3)
    assert tokens.shape[1] == 65 - 18
    assert torch.equal(state.source, want_src) and torch.equal(state.size, want_size)
    assert_close(model(img), want, 1e-5, f"{kw} fused={fused}")


@torch.no_grad()
def test_prop_attn_off_matches_reference():
    model = tiny_vit()
    img = torch.randn(2, 3, 32, 32)
    tome.apply_patch(model, r=5, prop_attn=False)
    assert_close(model(img), ref_timm_forward(model, img, [5] * 3, prop_attn=False)[0], 1e-5, "prop_attn=False")
    tome.apply_patch(model, r=5, prop_attn=True)  # re-patching updates the settings
    assert_close(model(img), ref_timm_forward(model, img, [5] * 3)[0], 1e-5, "prop_attn=True")


@pytest.mark.parametrize("class_token, reg_tokens, pool", [(True, 4, "token"), (False, 4, "avg"), (True, 1, "avg")])
@torch.no_grad()
def test_register_tokens_never_merged(class_token, reg_tokens, pool):
    model = tiny_vit(class_token=class_token, reg_tokens=reg_tokens, global_pool=pool, depth=4)
    p = model.num_prefix_tokens
    img = torch.randn(2, 3, 32, 32)
    tokens, state = _patched_features(model, img, 10)
    n0 = 64 + p
    assert tokens.shape[1] == n0 - 40
    eye = torch.eye(n0)[:p].expand(2, p, n0)
    assert torch.equal(state.source[:, :p], eye), "prefix tokens must stay themselves, in order"
    assert torch.equal(state.source[:, p:, :p], torch.zeros(2, tokens.shape[1] - p, p))
    assert torch.equal(state.size[:, :p], torch.ones(2, p, 1))
    want, want_size, want_src = ref_timm_forward(model, img, [10] * 4)
    assert torch.equal(state.source, want_src) and torch.equal(state.size, want_size)
    assert_close(model(img), want, 1e-5, "register tokens")


@torch.no_grad()
def test_deit_distilled_prefix_tokens():
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=4,
                                       num_classes=5).eval()
    img = torch.randn(2, 3, 32, 32)
    tokens, state = _patched_features(model, img, 8)
    assert tokens.shape[1] == 66 - 16 and model(img).shape == (2, 5)
    assert torch.equal(state.source[:, :2], torch.eye(66)[:2].expand(2, 2, 66)), "class and distill tokens kept"


def test_single_prefix_split_equals_class_token(monkeypatch):
    """One prefix token: the generic split path and the direct class_token=True call are identical."""
    torch.manual_seed(1)
    x, metric = torch.randn(3, 23, 16), torch.randn(3, 23, 8)
    size = torch.randint(1, 4, (3, 23, 1)).float()
    src = (torch.rand(3, 23, 40) > 0.7).float()
    for args in [(None, None), (size, src)]:
        direct = tome.merge_tokens(x, metric, 7, *args, num_prefix_tokens=1, trace_source=True, split_prefix=False)
        split = tome.merge_tokens(x, metric, 7, *args, num_prefix_tokens=1, trace_source=True, split_prefix=True)
        for a, b in zip(direct, split):
            assert torch.equal(a, b)
    # and through a whole model
    model = tiny_vit()
    img = torch.randn(2, 3, 32, 32)
    tome.apply_patch(model, r=6, trace_source=True)
    with torch.no_grad():
        y_direct, s_direct = model(img), model.forward_features_tome(img)[1]
        orig = tome.merge_tokens
        monkeypatch.setattr(tome, "merge_tokens", lambda *a, **k: orig(*a, **k, split_prefix=True))
        y_split, s_split = model(img), model.forward_features_tome(img)[1]
    assert torch.equal(y_direct, y_split) and torch.equal(s_direct.source, s_split.source)


def test_literal_patch_only_matching_would_differ():
    """Why the stand-in: matching only the patch tokens with class_token=False is a different split."""
    torch.manual_seed(2)
    x = torch.randn(1, 17, 8)
    direct = tome.merge_tokens(x, x, 4, num_prefix_tokens=1, trace_source=True)[2]
    m, _ = ref.bipartite_soft_matching(x[:, 1:], 4, class_token=False)
    literal = ref.merge_source(m, x[:, 1:], torch.eye(17)[1:].unsqueeze(0))
    assert not torch.equal(direct[:, 1:], literal)


@pytest.mark.parametrize("class_token", [True, False])
@torch.no_grad()
def test_global_pool_avg_is_size_weighted(class_token):
    model = tiny_vit(global_pool="avg", class_token=class_token)
    img = torch.randn(2, 3, 32, 32)
    tome.apply_patch(model, r=8)
    got = model(img)
    assert_close(got, ref_timm_forward(model, img, [8] * 3)[0], 1e-5, "avg pool")
    tokens, state = model.forward_features_tome(img)
    p = model.num_prefix_tokens
    unweighted = model.head(model.fc_norm(tokens[:, p:].mean(1)))
    assert not torch.allclose(got, unweighted, atol=1e-4)
    assert torch.equal(model.forward_head(tokens, size=state.size), got)


@pytest.mark.parametrize("pool", ["avgmax", "max", "map"])
def test_unsupported_pools_raise(pool):
    model = tiny_vit(global_pool=pool, class_token=pool == "map")
    with pytest.raises(ValueError, match=pool):
        tome.apply_patch(model, r=2)
    assert not tome.is_patched(model) and type(model.blocks[0]) is timm.models.vision_transformer.Block


@torch.no_grad()
def test_trace_source_is_valid():
    model = tiny_vit(depth=4)
    img = torch.randn(2, 3, 32, 32)
    tome.apply_patch(model, r=(6, 0.5), trace_source=True)
    tokens, state = model.forward_features_tome(img)
    src, size = state.source, state.size
    assert src.shape == (2, tokens.shape[1], 65)
    assert set(src.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(src.sum(1), torch.ones(2, 65)), "every original token is in exactly one token"
    assert torch.equal(src.sum(2, keepdim=True), size), "a token's size is its number of original tokens"
    # without tracing there is no source; with r=0 the source is the identity
    tome.apply_patch(model, r=0, trace_source=True)
    assert torch.equal(model.forward_features_tome(img)[1].source, torch.eye(65).expand(2, 65, 65))
    tome.apply_patch(model, r=3, trace_source=False)
    assert model.forward_features_tome(img)[1].source is None


@torch.no_grad()
def test_batch_independence():
    model = tiny_vit(depth=4, init_values=0.5)
    tome.apply_patch(model, r=7, trace_source=True)
    img = torch.randn(3, 3, 32, 32)
    y3, s3 = model(img), model.forward_features_tome(img)[1]
    for i in range(3):
        y1, s1 = model(img[i:i + 1]), model.forward_features_tome(img[i:i + 1])[1]
        assert torch.equal(s1.source, s3.source[i:i + 1]) and torch.equal(s1.size, s3.size[i:i + 1])
        assert_close(y1, y3[i:i + 1], 1e-5, f"sample {i}, batch 1 vs 3")


def test_drop_path_training_and_backward():
    model = tiny_vit(drop_path_rate=0.5, init_values=0.5).train()
    img = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    y0 = model(img)
    tome.apply_patch(model, r=0)
    torch.manual_seed(3)
    assert torch.equal(model(img), y0), "r=0 in training (drop path draws) is the unpatched model"
    model.r = 6
    torch.manual_seed(4)
    got = model(img)
    torch.manual_seed(4)
    want = ref_timm_forward(model, img, [6] * 3)[0]
    assert_close(got, want, 1e-5, "training with drop path")
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g_got, g_want):
        assert_close(a, b, 1e-4, "gradients")


@torch.no_grad()
def test_grad_checkpointing_path_and_mask_rules():
    model = tiny_vit()
    img = torch.randn(2, 3, 32, 32)
    y0 = model(img)
    tome.apply_patch(model, r=4)
    want = model(img)
    model.set_grad_checkpointing(True)
    assert torch.equal(model(img), want)
    model.set_grad_checkpointing(False)
    mask = torch.zeros(65, 65)
    with pytest.raises(ValueError, match="attn_mask"):
        model(img, attn_mask=mask)
    model.r = 0
    assert torch.equal(model(img), y0)
    tome.remove_patch(model)
    y_mask = model(img, attn_mask=mask)
    tome.apply_patch(model, r=0)
    assert torch.equal(model(img, attn_mask=mask), y_mask)


@torch.no_grad()
def test_blocks_without_state():
    model = tiny_vit()
    img = torch.randn(1, 3, 32, 32)
    want = model.forward_intermediates(img, intermediates_only=True)
    tome.apply_patch(model, r=0)
    got = model.forward_intermediates(img, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    model.r = 2
    with pytest.raises(RuntimeError, match="without a ToMeState"):
        model.forward_intermediates(img)


def test_r_setter_and_bad_r():
    model = tiny_vit(depth=4)
    tome.apply_patch(model, r=3)
    assert model.r == 3 and model.tome_r_per_layer == [3] * 4
    model.r = [5, 1]
    assert model.r == [5, 1] and model.tome_r_per_layer == [5, 1, 0, 0]
    model.r = (4, 1.0)
    assert model.tome_r_per_layer == tome.parse_r(4, (4, 1.0)) == [0, 2, 5, 8]
    assert tome.parse_r is ref.parse_r
    for bad, match in [([1] * 5, "r is a list of 5"), (-1, "r must be"), ((2, 3.0), "inflection"), ("x", "r must")]:
        with pytest.raises(ValueError, match=match):
            model.r = bad
    assert model.tome_r_per_layer == [0, 2, 5, 8], "a rejected r leaves the schedule unchanged"
    fresh = tiny_vit(depth=2)
    with pytest.raises(ValueError, match="r is a list"):
        tome.apply_patch(fresh, r=[1, 2, 3])
    assert not tome.is_patched(fresh)


def test_unsupported_models_and_blocks():
    with pytest.raises(TypeError, match="unsupported model type torch.nn.modules.linear.Linear"):
        tome.apply_patch(nn.Linear(2, 2))

    class MyBlock(timm.models.vision_transformer.Block):
        pass

    for model, match in [(tiny_vit(block_fn=MyBlock), "MyBlock"),
                         (tiny_vit(block_fn=timm.models.vision_transformer.ResPostBlock), "ResPostBlock"),
                         (tiny_vit(attn_layer="diff"), "DiffAttention"),
                         (tiny_open_clip(qk_norm=True), "CustomResidualAttentionBlock")]:
        with pytest.raises(TypeError, match=match):
            tome.apply_patch(model, r=1)
        assert not any(tome.is_patched(m) for m in model.modules()), "nothing is patched on error"
    model = tiny_vit()
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(TypeError, match="block 1 has attention torch.nn.modules.linear.Identity"):
        tome.apply_patch(model)
    assert tome.remove_patch(nn.Linear(2, 2)) is not None  # not patched: a no-op


@pytest.mark.parametrize("pool", ["tok", "avg"])
@torch.no_grad()
def test_open_clip_tiny_pools_tokens_layerscale(pool):
    visual = tiny_open_clip(pool_type=pool, output_tokens=True, ls_init_value=0.5)
    img = torch.randn(2, 3, 32, 32)
    p0, t0 = visual(img)
    tome.apply_patch(visual, r=0)
    p1, t1 = visual(img)
    assert torch.equal(p0, p1) and torch.equal(t0, t1)
    visual.r = [6, 6, 0]
    want, want_tokens, _, _ = ref_open_clip_forward(visual, img, [6, 6, 0])
    pooled, tokens = visual(img)
    assert tokens.shape == (2, 64 - 12, 48)
    assert_close(pooled, want, 1e-5, f"open_clip pool {pool}")
    assert_close(tokens, want_tokens, 1e-5, "open_clip tokens")
    visual.transformer.grad_checkpointing = True
    assert torch.equal(visual(img)[0], pooled)
    tome.remove_patch(visual)
    assert torch.equal(visual(img)[0], p0)


def test_compile_aot_eager():
    model = tiny_vit(depth=2)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(img)
        tome.apply_patch(model, r=6)
        want = model(img)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # one graph: no break anywhere
        assert_close(compiled(img), want, 1e-6, "compiled r=6")
        model.r = 0  # a Python int per block: dynamo guards on it and recompiles
        assert torch.equal(compiled(img), y0)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "train"])
def test_compile_fullgraph_every_mode_matches_eager(mode):
    # the patched model as one graph under no_grad, inference_mode and in training (forward and every
    # parameter's gradient), equal to eager
    torch.manual_seed(3)
    model = tiny_vit(depth=2)
    tome.apply_patch(model, r=6)
    img = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    if mode == "train":
        model.train()
        params = list(model.parameters())
        got = compiled(img)
        got_g = torch.autograd.grad(got.sum(), params)
        want = model(img)
        want_g = torch.autograd.grad(want.sum(), params)
        for g, w in zip(got_g, want_g):
            assert_close(g, w, 1e-5, "compiled gradient")
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            got, want = compiled(img), model(img)
    assert_close(got, want, 1e-6, f"compiled {mode}")
    torch._dynamo.reset()


def test_compile_inductor_inference_mode_matches_eager():
    # Inductor itself (the default backend): the ToMe ops stay opaque custom ops in its graph
    torch.manual_seed(4)
    model = tiny_vit(depth=2)
    tome.apply_patch(model, r=6)
    img = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.inference_mode():
        got, want = torch.compile(model)(img), model(img)
    assert_close(got, want, 1e-5, "inductor")
    torch._dynamo.reset()


def test_token_merger():
    torch.manual_seed(5)
    x, metric = torch.randn(2, 21, 12), torch.randn(2, 21, 6)
    tm = TokenMerger(5, class_token=True)
    assert "r=5" in repr(tm) and not list(tm.parameters())
    got, size = tm(x, metric)
    m, _ = ref.bipartite_soft_matching(metric, 5, class_token=True)
    want, want_size = ref.merge_wavg(m, x)
    assert_close(got, want, 1e-6, "TokenMerger")
    assert torch.equal(size, want_size) and got.shape == (2, 16, 12)
    # metric defaults to x; sizes chain; prop=True weights by size, prop=False does not
    s_in = torch.randint(1, 5, (2, 21, 1)).float()
    m, _ = ref.bipartite_soft_matching(x, 4, distill_token=True)
    wx, ws = ref.merge_wavg(m, x, s_in)
    px, ps = TokenMerger(4, distill_token=True, prop=True)(x, size=s_in)
    assert_close(px, wx, 1e-6, "prop=True")
    assert torch.equal(ps, ws)
    ux, us = TokenMerger(4, distill_token=True, prop=False)(x, size=s_in)
    assert_close(ux, m(x, mode="mean"), 1e-6, "prop=False")
    assert torch.equal(us, ws)
    assert torch.equal(TokenMerger(0)(x)[0], x)
    x.requires_grad_(True)
    out, out_size = TokenMerger(3)(x)
    (out * out_size).sum().backward()
    assert_close(x.grad, torch.ones_like(x), 1e-6, "size-weighted sums pass a gradient of 1 to every token")
    with pytest.raises(ValueError, match="r must be"):
        TokenMerger(-1)
    with pytest.raises(ValueError, match="metric"):
        tm(x, torch.randn(2, 20, 6))


@pytest.mark.skipif(not hasattr(torch.ops.mmfast, "tome_attention"), reason="mmfast._C without tome_attention")
@pytest.mark.parametrize("fused", [True, False])
def test_cpu_inference_uses_the_fused_attention_kernel(monkeypatch, fused):
    """Under no_grad on CPU every merging block's attention is the C++ kernel (whatever timm's
    fused_attn says), equal to the reference patch; with gradients it is never used."""
    from mmfast.ops import tome as mt

    calls = []
    entry = mt.ATTENTION.backend("cpp")

    def counting(*args):
        calls.append(args[0].shape)
        return entry.forward(*args)

    monkeypatch.setitem(mt.ATTENTION.backends, "cpp", dataclasses.replace(entry, forward=counting))
    model = tiny_vit(depth=4)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    img = torch.randn(3, 3, 32, 32)
    tome.apply_patch(model, r=6, trace_source=True)
    with torch.no_grad():
        got, state = model(img), model.forward_features_tome(img)[1]
    assert len(calls) == 2 * 4, "one kernel call per merging block and forward"
    with torch.no_grad():
        want, want_size, want_src = ref_timm_forward(model, img, [6] * 4)
    assert torch.equal(state.source, want_src) and torch.equal(state.size, want_size)
    assert_close(got, want, 1e-5, "fused attention vs reference patch")
    calls.clear()
    model(img).sum().backward()  # gradients wanted: the differentiable path
    assert not calls


@pytest.mark.skipif(not hasattr(torch.ops.mmfast, "tome_attention"), reason="mmfast._C without tome_attention")
def test_open_clip_cpu_inference_uses_the_fused_attention_kernel(monkeypatch):
    from mmfast.ops import tome as mt

    calls = []
    entry = mt.ATTENTION.backend("cpp")
    monkeypatch.setitem(mt.ATTENTION.backends, "cpp",
                        dataclasses.replace(entry, forward=lambda *a: calls.append(1) or entry.forward(*a)))
    torch.manual_seed(0)
    visual = tiny_open_clip()
    img = torch.randn(2, 3, 32, 32)
    tome.apply_patch(visual, r=5, trace_source=True)
    with torch.no_grad():
        tokens, state = visual.forward_features_tome(img)
        got = visual.tome_pool(tokens, state.size)[0] @ visual.proj
        want, _, want_size, want_src = ref_open_clip_forward(visual, img, [5] * 3)
    assert len(calls) == 3
    assert torch.equal(state.source, want_src) and torch.equal(state.size, want_size)
    assert_close(got, want, 1e-5, "open_clip fused attention vs reference")
    calls.clear()
    visual(img).sum().backward()
    assert not calls, "with gradients the differentiable path runs"


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_cpu_inference_merging_blocks_use_fused_linears(monkeypatch, kind):
    """Merging blocks route qkv, proj, fc1+GELU and fc2 through mmfast.ops.linear (oneDNN epilogues
    on CPU inference; exactly F.linear otherwise); the outputs stay equal to the reference patch."""
    from mmfast.ops import linear as L

    if not L.onednn_available():
        pytest.skip("oneDNN's fused linear is not usable here")
    taken = []
    real = L._fusable
    monkeypatch.setattr(L, "_fusable", lambda *a: taken.append(real(*a)) or taken[-1])
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)
    model = tiny_vit(depth=3) if kind == "timm" else tiny_open_clip()
    tome.apply_patch(model, r=5, trace_source=True)
    with torch.no_grad():
        if kind == "timm":
            got, state = model(img), model.forward_features_tome(img)[1]
            want, want_size, want_src = ref_timm_forward(model, img, [5] * 3)
        else:
            tokens, state = model.forward_features_tome(img)
            got = model.tome_pool(tokens, state.size)[0] @ model.proj
            want, _, want_size, want_src = ref_open_clip_forward(model, img, [5] * 3)
    assert taken and all(taken), "every linear of a merging block takes the fused path under no_grad"
    assert len(taken) >= 4 * 3
    assert torch.equal(state.source, want_src) and torch.equal(state.size, want_size)
    assert_close(got, want, 1e-5, f"{kind} with fused linears vs reference")
