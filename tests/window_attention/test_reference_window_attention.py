"""Tests of the window-attention reference (mmfast.reference.window_attention) against timm 1.0.31.

The reference op is composed into whole timm Swin v1 / v2 blocks (norm, qkv on the *unpadded* map,
the op with ``pad_value`` = qkv bias, proj, residual, MLP), with the block's own weights, and
compared forward and backward (input grads and every parameter grad) with the timm block itself.
timm's fused SDPA path is switched off on every v1 block (``attn.fused_attn = False``) so the timm
side is its explicit softmax path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from timm.models import swin_transformer as swin_v1
from timm.models import swin_transformer_v2 as swin_v2
from torch import Tensor

from mmfast.reference.window_attention import (
    effective_window,
    relative_position_index,
    shift_attn_mask,
    swinv2_coords_table,
    swinv2_cpb_table,
    window_attention,
    window_partition,
    window_reverse,
)

DIM, HEADS = 32, 2
F64_TOL = 1e-12  # relative to the tensor's max magnitude (observed: ~2e-15)
F32_TOL = 1e-5  # observed: ~8e-7
CAUGHT = 1e-7  # a perturbed op must miss F64_TOL by orders of magnitude

Op = Callable[..., Tensor]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: see conftest



# ----------------------------------------------------------------------------------------------
# helpers


def _rel_err(a: Tensor, b: Tensor) -> float:
    scale = max(b.detach().abs().max().item(), 1e-30)
    return (a.detach().double() - b.detach().double()).abs().max().item() / scale


def _split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, h, w, _ = qkv.shape
    q, k, v = qkv.view(b, h, w, 3, heads, -1).unbind(3)
    return q, k, v


def _v1_block(feat_hw, window, shift, *, always_partition=False, dtype=torch.float64):
    block = swin_v1.SwinTransformerBlock(
        DIM, feat_hw, num_heads=HEADS, window_size=window, shift_size=shift,
        always_partition=always_partition, mlp_ratio=2.0,
    ).to(dtype)
    block.attn.fused_attn = False
    with torch.no_grad():
        # larger than timm's init (std .02) so that a wrong bias lookup shows up clearly
        block.attn.relative_position_bias_table.normal_(0.0, 1.0)
        block.attn.qkv.bias.normal_(0.0, 0.5)
        block.norm1.weight.normal_(1.0, 0.3)
    return block


def _v1_reference(block, x: Tensor, window, shift, op: Op = window_attention, **op_kwargs) -> Tensor:
    """timm's SwinTransformerBlock.forward, with _attn replaced by the spatial reference op."""
    attn = block.attn
    q, k, v = _split_qkv(attn.qkv(block.norm1(x)), attn.num_heads)
    kwargs = dict(
        window_size=window, shift_size=shift, rel_pos_bias=attn.relative_position_bias_table,
        pad_value=None if attn.qkv.bias is None else attn.qkv.bias.view(3, attn.num_heads, -1),
    )
    kwargs.update(op_kwargs)
    out = op(q, k, v, **kwargs)
    x = x + attn.proj(out.flatten(3))
    return x + block.mlp(block.norm2(x))


def _v2_block(feat_hw, window, shift, *, pretrained_window_size=0, dtype=torch.float64):
    block = swin_v2.SwinTransformerV2Block(
        DIM, feat_hw, num_heads=HEADS, window_size=window, shift_size=shift, mlp_ratio=2.0,
        pretrained_window_size=pretrained_window_size,
    ).to(dtype)
    with torch.no_grad():
        block.attn.q_bias.normal_(0.0, 0.5)
        block.attn.v_bias.normal_(0.0, 0.5)
        # head 1 above timm's clamp (log 100): the clamp must be applied, and its grad is zero
        block.attn.logit_scale.copy_(torch.tensor([math.log(20.0), math.log(300.0)]).view(HEADS, 1, 1))
    return block


def _v2_reference(block, x: Tensor, window, shift, pretrained_window_size=0) -> Tensor:
    """timm's SwinTransformerV2Block.forward (post-norm), with _attn replaced by the reference op."""
    attn = block.attn
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    q, k, v = _split_qkv(F.linear(x, attn.qkv.weight, qkv_bias), attn.num_heads)
    logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().view(attn.num_heads)
    out = window_attention(
        q, k, v, window_size=window, shift_size=shift,
        rel_pos_bias=swinv2_cpb_table(attn.cpb_mlp, window, pretrained_window_size),
        logit_scale=logit_scale, pad_value=qkv_bias.view(3, attn.num_heads, -1),
    )
    x = x + block.norm1(attn.proj(out.flatten(3)))
    return x + block.norm2(block.mlp(x))


def _run(fn: Callable[[Tensor], Tensor], block, x: Tensor, grad_out: Tensor):
    """Forward + backward; returns (output, input grad, {param name: grad})."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad_out)
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def _max_errors(block, reference: Callable[[Tensor], Tensor], x: Tensor) -> dict[str, float]:
    """Relative max errors of the reference composition against the timm block, forward and backward."""
    grad_out = torch.randn_like(x)
    out_t, dx_t, grads_t = _run(block, block, x, grad_out)
    out_r, dx_r, grads_r = _run(reference, block, x, grad_out)
    assert grads_t.keys() == grads_r.keys()
    errors = {"out": _rel_err(out_r, out_t), "x.grad": _rel_err(dx_r, dx_t)}
    errors.update({f"{n}.grad": _rel_err(grads_r[n], grads_t[n]) for n in grads_t})
    return errors


def _assert_matches(errors: dict[str, float], tol: float, must_have: tuple[str, ...]) -> None:
    for name in must_have:
        assert name in errors, f"no gradient reached {name}"
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"reference differs from timm beyond {tol}: {bad}"


V1_GRADS = ("out", "x.grad", "attn.relative_position_bias_table.grad", "attn.qkv.weight.grad",
            "attn.qkv.bias.grad", "norm1.weight.grad")
V2_GRADS = ("out", "x.grad", "attn.logit_scale.grad", "attn.cpb_mlp.0.weight.grad",
            "attn.cpb_mlp.2.weight.grad", "attn.q_bias.grad", "attn.v_bias.grad", "attn.qkv.weight.grad")


# ----------------------------------------------------------------------------------------------
# Swin v1 blocks: forward and backward


# (feature map, batch): 56x56 at batch 1 (one full Swin stage-1 map), a padded 57x57, a padded
# non-square 13x20, a map smaller than every window, and one that is smaller on one axis only.
V1_MAPS = [((56, 56), 1), ((57, 57), 2), ((13, 20), 3), ((5, 6), 2), ((5, 20), 1)]
V1_WINDOWS = [(7, 7), (8, 8), (12, 12), (7, 9)]
V1_SHIFTS = ["none", "half", (3, 2)]


def _shift_for(window, shift):
    if shift == "none":
        return (0, 0)
    if shift == "half":
        return (window[0] // 2, window[1] // 2)
    return shift


@pytest.mark.parametrize("shift", V1_SHIFTS, ids=str)
@pytest.mark.parametrize("window", V1_WINDOWS, ids=str)
@pytest.mark.parametrize("feat_hw,batch", V1_MAPS, ids=str)
def test_v1_block_matches_timm(feat_hw, batch, window, shift):
    target_shift = _shift_for(window, shift)
    block = _v1_block(feat_hw, window, target_shift)
    eff_window, eff_shift = effective_window(feat_hw, window, target_shift)
    assert (eff_window, eff_shift) == (tuple(block.window_size), tuple(block.shift_size))
    x = torch.randn(batch, *feat_hw, DIM, dtype=torch.float64)
    errors = _max_errors(block, lambda t: _v1_reference(block, t, eff_window, eff_shift), x)
    _assert_matches(errors, F64_TOL, V1_GRADS)


@pytest.mark.parametrize("feat_hw,window,shift", [
    ((5, 6), (7, 7), (3, 3)),  # whole map inside one padded window, shifted
    ((5, 20), (7, 9), (3, 2)),
    ((6, 6), (4, 4), (2, 2)),  # always_partition with a map larger than the window: plain padding
])
def test_v1_always_partition_matches_timm(feat_hw, window, shift):
    block = _v1_block(feat_hw, window, shift, always_partition=True)
    eff = effective_window(feat_hw, window, shift, always_partition=True)
    assert eff == (window, shift) == (tuple(block.window_size), tuple(block.shift_size))
    x = torch.randn(2, *feat_hw, DIM, dtype=torch.float64)
    errors = _max_errors(block, lambda t: _v1_reference(block, t, window, shift), x)
    _assert_matches(errors, F64_TOL, V1_GRADS)


def test_v1_block_matches_timm_float32():
    feat_hw, window, shift = (57, 57), (7, 7), (3, 3)
    block = _v1_block(feat_hw, window, shift, dtype=torch.float32)
    x = torch.randn(2, *feat_hw, DIM)
    errors = _max_errors(block, lambda t: _v1_reference(block, t, window, shift), x)
    _assert_matches(errors, F32_TOL, V1_GRADS)


def test_v1_without_qkv_bias_pads_with_zeros():
    feat_hw, window, shift = (13, 20), (7, 9), (3, 4)
    block = swin_v1.SwinTransformerBlock(DIM, feat_hw, num_heads=HEADS, window_size=window,
                                         shift_size=shift, qkv_bias=False, mlp_ratio=2.0).double()
    block.attn.fused_attn = False
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(1, *feat_hw, DIM, dtype=torch.float64)
    errors = _max_errors(block, lambda t: _v1_reference(block, t, window, shift, pad_value=None), x)
    _assert_matches(errors, F64_TOL, ("out", "attn.relative_position_bias_table.grad"))


# ----------------------------------------------------------------------------------------------
# Swin v2 blocks: cosine attention, logit_scale clamp, CPB MLP


@pytest.mark.parametrize("feat_hw,window,shift,pretrained,batch", [
    ((16, 16), (8, 8), (4, 4), 0, 2),  # no padding
    ((13, 20), (7, 9), (3, 2), 0, 2),  # padded, asymmetric window and shift
    ((20, 20), (8, 8), (4, 4), 6, 1),  # padded, pretrained_window_size branch of the coords table
    ((5, 12), (8, 8), (4, 4), 0, 2),  # smaller than the window on one axis: timm clamps to (5, 8)
])
def test_v2_block_matches_timm(feat_hw, window, shift, pretrained, batch):
    block = _v2_block(feat_hw, window, shift, pretrained_window_size=pretrained)
    eff_window, eff_shift = effective_window(feat_hw, window, shift)
    assert (eff_window, eff_shift) == (tuple(block.window_size), tuple(block.shift_size))
    x = torch.randn(batch, *feat_hw, DIM, dtype=torch.float64)
    errors = _max_errors(block, lambda t: _v2_reference(block, t, eff_window, eff_shift, pretrained), x)
    _assert_matches(errors, F64_TOL, V2_GRADS)
    # head 1's logit_scale is above the clamp: no gradient, in timm and here
    assert block.attn.logit_scale.grad.flatten()[1].item() == 0.0


@pytest.mark.parametrize("window,pretrained", [
    ((8, 8), (0, 0)), ((7, 9), (0, 0)), ((1, 3), (0, 0)), ((12, 12), (8, 8)), ((7, 9), (6, 5)),
    ((8, 8), (0, 5)),  # timm only looks at pretrained_window_size[0]: this is the (0, 0) branch
])
def test_swinv2_cpb_table_matches_timm(window, pretrained):
    attn = swin_v2.WindowAttention(DIM, window_size=window, num_heads=HEADS,
                                   pretrained_window_size=pretrained).double()
    coords = swinv2_coords_table(window, pretrained, dtype=torch.float64)
    assert torch.equal(coords, attn.relative_coords_table[0])
    timm_table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, HEADS))
    assert torch.equal(swinv2_cpb_table(attn.cpb_mlp, window, pretrained), timm_table)
    assert torch.equal(relative_position_index(window), attn.relative_position_index)
    if pretrained == (0, 5):
        assert torch.equal(coords, swinv2_coords_table(window, (0, 0), dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# helpers against timm


@pytest.mark.parametrize("window", [(1, 1), (7, 7), (7, 9), (3, 5), (12, 12)], ids=str)
def test_relative_position_index_matches_timm(window):
    index = relative_position_index(window)
    assert torch.equal(index, swin_v1.get_relative_position_index(*window))
    wh, ww = window
    # spot check the (dy, dx) formula: query at the window's last token, key at its first
    assert index[-1, 0].item() == (2 * wh - 2) * (2 * ww - 1) + (2 * ww - 2)


def test_window_partition_and_reverse():
    x = torch.randn(2, 14, 18, 3, 4)
    windows = window_partition(x, (7, 9))
    assert windows.shape == (2, 4, 63, 3, 4)
    timm_windows = swin_v1.window_partition(x.flatten(3), (7, 9))  # [B*nW, Wh, Ww, C]
    assert torch.equal(windows.flatten(3), timm_windows.reshape(2, 4, 63, 12))
    assert torch.equal(window_reverse(windows, (7, 9), (14, 18)), x)
    with pytest.raises(ValueError, match="multiple"):
        window_partition(x, (4, 9))


@pytest.mark.parametrize("feat_hw,window,shift", [
    ((56, 56), (7, 7), (3, 3)), ((57, 57), (7, 7), (3, 3)), ((13, 20), (7, 9), (3, 2)),
    ((13, 20), (7, 9), (3, 0)), ((13, 20), (7, 9), (0, 4)), ((8, 8), (8, 8), (4, 4)),
    ((5, 6), (7, 7), (3, 3)),
])
def test_shift_attn_mask_matches_timm(feat_hw, window, shift):
    block = swin_v1.SwinTransformerBlock(DIM, feat_hw, num_heads=HEADS, window_size=window,
                                         shift_size=shift, always_partition=True, mlp_ratio=1.0)
    padded = tuple(math.ceil(f / w) * w for f, w in zip(feat_hw, window))
    mask = shift_attn_mask(padded, window, shift)
    assert torch.equal(mask, block.attn_mask)
    assert torch.equal(shift_attn_mask(padded, window, (0, 0)), torch.zeros_like(mask))  # timm: None


@pytest.mark.parametrize("feat_hw,window,shift,always_partition", [
    ((56, 56), (7, 7), (3, 3), False), ((7, 7), (7, 7), (3, 3), False), ((5, 20), (7, 9), (3, 4), False),
    ((5, 6), (12, 12), (6, 6), False), ((8, 3), (8, 8), (4, 4), False), ((5, 6), (7, 7), (3, 3), True),
])
def test_effective_window_matches_timm(feat_hw, window, shift, always_partition):
    block = swin_v1.SwinTransformerBlock(DIM, feat_hw, num_heads=HEADS, window_size=window,
                                         shift_size=shift, always_partition=always_partition, mlp_ratio=1.0)
    expected = (tuple(block.window_size), tuple(block.shift_size))
    assert effective_window(feat_hw, window, shift, always_partition=always_partition) == expected


# ----------------------------------------------------------------------------------------------
# the op on its own


def _qkv(b=2, h=13, w=20, heads=HEADS, head_dim=4, dtype=torch.float64):
    return tuple(torch.randn(b, h, w, heads, head_dim, dtype=dtype) for _ in range(3))


def test_pad_roll_vs_roll_pad():
    q, k, v = _qkv()
    table = torch.randn(13 * 17, HEADS, dtype=torch.float64)
    pad_value = torch.randn(3, HEADS, 4, dtype=torch.float64)
    common = dict(window_size=(7, 9), rel_pos_bias=table, pad_value=pad_value)
    # padded (13x20 -> 14x27) and shifted: the orders put the seam in different places
    roll_pad = window_attention(q, k, v, shift_size=(3, 4), **common)
    pad_roll = window_attention(q, k, v, shift_size=(3, 4), order="pad_roll", **common)
    assert _rel_err(pad_roll, roll_pad) > CAUGHT
    # pad_roll is roll_pad on a map padded beforehand (no further padding), then cropped
    padded = [F.pad(t, (0, 0, 0, 0, 0, 7, 0, 1)) for t in (q, k, v)]
    for t, fill in zip(padded, pad_value):
        t[:, 13:] = fill
        t[:, :, 20:] = fill
    expected = window_attention(*padded, shift_size=(3, 4), **common)[:, :13, :20]
    assert _rel_err(pad_roll, expected) < F64_TOL
    # padded but not shifted: identical
    unshifted = window_attention(q, k, v, **common)
    assert torch.equal(window_attention(q, k, v, order="pad_roll", **common), unshifted)
    # shifted but no padding needed: identical
    q, k, v = _qkv(h=14, w=18)
    a = window_attention(q, k, v, shift_size=(3, 4), order="pad_roll", **common)
    assert _rel_err(a, window_attention(q, k, v, shift_size=(3, 4), **common)) < F64_TOL


def test_roll_pad_seam_quirk():
    """timm (roll_pad) on a padded map: region borders sit at Hp - s, the wrap seam at H - s.

    H = 9, window 4, shift 2: Hp = 12. After the roll, original rows 6, 7, 8 and 0 share a window and a
    mask region, so row 0 attends to row 8. pad_roll puts rows 0 and 1 in a region of their own.
    """
    q, k, v = _qkv(b=1, h=9, w=4)
    v.requires_grad_(True)
    kwargs = dict(window_size=(4, 4), shift_size=(2, 0), mask_value=-1e9)
    for order, sees_row_8 in (("roll_pad", True), ("pad_roll", False)):
        out = window_attention(q, k, v, order=order, **kwargs)
        (grad_v,) = torch.autograd.grad(out[:, 0].sum(), v)
        assert (grad_v[:, 8].abs().max().item() > 0) == sees_row_8, order
        assert grad_v[:, 2:6].abs().max().item() == 0, order  # never in row 0's window


def test_half_inputs_compute_in_float32():
    q, k, v = _qkv(dtype=torch.bfloat16)
    table = torch.randn(13 * 17, HEADS, dtype=torch.bfloat16)
    kwargs = dict(window_size=(7, 9), shift_size=(3, 2), rel_pos_bias=table)
    out = window_attention(q, k, v, **kwargs)
    assert out.dtype == torch.bfloat16
    as_fp32 = window_attention(q.float(), k.float(), v.float(), **kwargs)
    assert torch.equal(out, as_fp32.to(torch.bfloat16))


def test_shift_moves_tokens_as_documented():
    # a single-token window makes attention the identity; the shift must be undone exactly
    q, k, v = _qkv(b=1, h=5, w=6)
    out = window_attention(q, k, v, window_size=(1, 1))
    assert torch.equal(out, v)
    # shifting an unpadded map that is one window: tokens keep their own outputs, only regions change
    out = window_attention(q, k, v, window_size=(5, 6), shift_size=(2, 3), mask_value=-1e9)
    # the roll puts the top-left 2x3 block into the last rows/columns, region (2, 2): it attends only
    # to itself
    first = window_attention(q[:, :2, :3], k[:, :2, :3], v[:, :2, :3], window_size=(2, 3))
    assert _rel_err(out[:, :2, :3], first) < F64_TOL


# ----------------------------------------------------------------------------------------------
# the tests can fail: perturbed ops are caught by the timm comparison


def _flipped_bias(q, k, v, *, rel_pos_bias, **kwargs):
    """Bias looked up at (key - query) instead of (query - key): the transposed index."""
    return window_attention(q, k, v, rel_pos_bias=rel_pos_bias.flip(0), **kwargs)


def _dx_major_bias(q, k, v, *, rel_pos_bias, window_size, **kwargs):
    """Table read as if laid out dx-major."""
    wh, ww = window_size
    table = rel_pos_bias.view(2 * wh - 1, 2 * ww - 1, -1).transpose(0, 1).reshape(rel_pos_bias.shape)
    return window_attention(q, k, v, rel_pos_bias=table, window_size=window_size, **kwargs)


@pytest.mark.parametrize("name,op,op_kwargs", [
    ("transposed bias index", _flipped_bias, {}),
    ("dx-major bias table", _dx_major_bias, {}),
    ("weak mask_value", window_attention, {"mask_value": -10.0}),
    ("no shift mask", window_attention, {"shift_mask": False}),
    ("zero pad tokens", window_attention, {"pad_value": None}),
    ("pad_roll order", window_attention, {"order": "pad_roll"}),
    ("wrong scale", window_attention, {"scale": 1.0}),
])
def test_perturbed_reference_is_caught(name, op, op_kwargs):
    feat_hw, window, shift = (13, 20), (7, 9), (3, 2)
    block = _v1_block(feat_hw, window, shift)
    x = torch.randn(1, *feat_hw, DIM, dtype=torch.float64)
    good = _max_errors(block, lambda t: _v1_reference(block, t, window, shift), x)
    _assert_matches(good, F64_TOL, V1_GRADS)
    bad = _max_errors(block, lambda t: _v1_reference(block, t, window, shift, op=op, **op_kwargs), x)
    assert bad["out"] > CAUGHT, f"{name} not caught: {bad['out']:.2e}"


def test_v2_mask_value_matters():
    # v2 logits reach +-logit_scale + 16, so -100 is not -inf there: a kernel using -inf is wrong
    q, k, v = _qkv()
    kwargs = dict(window_size=(7, 9), shift_size=(3, 2), logit_scale=torch.full((HEADS,), 100.0,
                                                                                 dtype=torch.float64))
    ref = window_attention(q, k, v, **kwargs)
    assert _rel_err(window_attention(q, k, v, mask_value=-1e9, **kwargs), ref) > CAUGHT
    # v1-sized logits: -100 and -1e9 agree to float64 precision
    ref = window_attention(q, k, v, window_size=(7, 9), shift_size=(3, 2))
    assert _rel_err(window_attention(q, k, v, window_size=(7, 9), shift_size=(3, 2), mask_value=-1e9),
                    ref) < F64_TOL


# ----------------------------------------------------------------------------------------------
# argument validation


def test_argument_validation():
    q, k, v = _qkv(b=1, h=8, w=8)
    ok = dict(window_size=(4, 4))
    window_attention(q, k, v, **ok)
    cases = [
        ("k shape", dict(k=k[:, :4])),
        ("v shape", dict(v=v[..., :2])),
        ("k must have", dict(k=k.float())),
        ("q must be", dict(q=q[0], k=k[0], v=v[0])),
        ("window_size", dict(window_size=(0, 4))),
        ("window_size", dict(window_size=(4, 4, 4))),
        ("shift_size", dict(shift_size=(4, 0))),
        ("shift_size", dict(shift_size=(-1, 0))),
        ("rel_pos_bias", dict(rel_pos_bias=torch.zeros(48, HEADS, dtype=torch.float64))),
        ("rel_pos_bias", dict(rel_pos_bias=torch.zeros(49, HEADS + 1, dtype=torch.float64))),
        ("logit_scale", dict(logit_scale=torch.ones(HEADS, 1, 1, dtype=torch.float64))),
        ("pad_value", dict(pad_value=torch.zeros(2, HEADS, 4, dtype=torch.float64))),
        ("order", dict(order="shift_pad")),
    ]
    for match, change in cases:
        args = {"q": q, "k": k, "v": v, **ok, **change}
        with pytest.raises(ValueError, match=match):
            window_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    with pytest.raises(ValueError, match="padded_hw"):
        shift_attn_mask((10, 8), (4, 4), (2, 2))
    with pytest.raises(ValueError, match="shift_size"):
        shift_attn_mask((8, 8), (4, 4), (4, 2))
    with pytest.raises(ValueError, match="window_size"):
        effective_window((8, 8), (0, 4))
