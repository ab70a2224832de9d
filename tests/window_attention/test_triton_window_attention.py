"""Tests of the Triton window-attention kernels (``mmfast.triton.window_attention``).

Forward and every gradient (q, k, v, rel_pos_bias, logit_scale, pad_value) are compared with autograd
through the pure-torch oracle ``mmfast.reference.window_attention.window_attention`` in float64.
Without a GPU the kernels run on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py), which is slow: shapes are tiny and odd (7 x 5 maps, 3 x 3 and 2 x 3 windows, head_dim
8 and 12). bfloat16 is not tested here (the interpreter handles it wrongly); it runs the same fp32
math as float16 after the upcast on load.
"""

from __future__ import annotations

import re

import pytest
import torch

from mmfast._ext import triton_status
from mmfast.reference.window_attention import window_attention
from mmfast.testing import assert_accuracy

_OK, _HOW = triton_status()
pytestmark = [pytest.mark.skipif(not _OK, reason=f"Triton cannot run here: {_HOW}"),
              pytest.mark.usefixtures("one_thread")]

if _OK:
    from mmfast.triton import window_attention as wa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32_TOL = 2e-5  # max error relative to the reference's max magnitude (observed: <= ~3e-6)
GRAD_NAMES = ("dq", "dk", "dv", "d_rel_pos_bias", "d_logit_scale", "d_pad_value")



# ----------------------------------------------------------------------------------------------
# helpers


def _inputs(b, h, w, heads, hd, window, *, bias, cosine, pad, fused=False, dtype=torch.float64):
    """q, k, v, rel_pos_bias, logit_scale, pad_value, dout (float64 on DEVICE, or ``dtype``)."""
    if fused:
        qkv = torch.randn(b, h, w, 3, heads, hd, dtype=dtype, device=DEVICE)
        q, k, v = qkv.unbind(3)
    else:
        q, k, v = (torch.randn(b, h, w, heads, hd, dtype=dtype, device=DEVICE) for _ in range(3))
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    rel_pos_bias = torch.randn(rows, heads, dtype=dtype, device=DEVICE) if bias else None
    logit_scale = torch.rand(heads, dtype=dtype, device=DEVICE) * 9 + 1 if cosine else None
    pad_value = torch.randn(3, heads, hd, dtype=dtype, device=DEVICE) if pad else None
    dout = torch.randn(b, h, w, heads, hd, dtype=dtype, device=DEVICE)
    return q, k, v, rel_pos_bias, logit_scale, pad_value, dout


def _reference(q, k, v, rel_pos_bias, logit_scale, pad_value, dout, dtype=None, **kw):
    """Output and the six gradients (zeros where the reference gives None) via autograd."""
    leaves = [None if t is None else (t.to(dtype) if dtype else t).detach().clone().requires_grad_()
              for t in (q, k, v, rel_pos_bias, logit_scale, pad_value)]
    out = window_attention(*leaves[:3], rel_pos_bias=leaves[3], logit_scale=leaves[4], pad_value=leaves[5],
                           **kw)
    out.backward(dout.to(out.dtype))
    grads = [None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t)) for t in leaves]
    return out.detach(), grads


def _kernel(q, k, v, rel_pos_bias, logit_scale, pad_value, dout, dtype=torch.float32, deterministic=False,
            **kw):
    cast = [None if t is None else t.to(dtype) for t in (q, k, v, rel_pos_bias, logit_scale, pad_value, dout)]
    q, k, v, rel_pos_bias, logit_scale, pad_value, dout = cast
    out, lse = wa.window_attention_fwd(q, k, v, rel_pos_bias, logit_scale, pad_value, **kw)
    grads = wa.window_attention_bwd(dout, q, k, v, out, lse, rel_pos_bias, logit_scale, pad_value,
                                    deterministic=deterministic, **kw)
    return out, lse, grads


def _rel_err(a, b) -> float:
    scale = max(b.detach().abs().max().item(), 1e-30)
    return (a.detach().double() - b.detach().double()).abs().max().item() / scale


def _check_close(out, grads, ref_out, ref_grads, tol=F32_TOL):
    errors = {"out": _rel_err(out, ref_out)}
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert (g is None) == (r is None), f"{name}: kernel gives {g!r:.20}, reference {r!r:.20}"
        if r is not None:
            assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != reference {tuple(r.shape)}"
            errors[name] = _rel_err(g, r) if r.abs().max() > 0 else g.abs().max().item()
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: { {k: f'{e:.1e}' for k, e in errors.items()} })"


# ----------------------------------------------------------------------------------------------
# float32 against the float64 reference

# (B, H, W, heads, head_dim, window, shift, bias, cosine, pad, order, shift_mask, extra kwargs)
CASES = {
    "no-shift": (1, 6, 6, 1, 8, (3, 3), (0, 0), True, False, False, "roll_pad", True, {}),
    "shift11-no-padding": (1, 6, 6, 2, 8, (3, 3), (1, 1), True, False, True, "roll_pad", True, {}),
    "padding-shift12": (1, 7, 5, 2, 12, (3, 3), (1, 2), True, False, True, "roll_pad", True, {}),
    "padding-shift12-pad_roll": (1, 7, 5, 2, 12, (3, 3), (1, 2), True, False, True, "pad_roll", True, {}),
    "rect-window": (2, 7, 5, 1, 8, (2, 3), (1, 2), True, False, True, "roll_pad", True, {"scale": 0.7}),
    "rect-window-cosine-pad_roll": (1, 7, 5, 2, 8, (2, 3), (1, 1), True, True, True, "pad_roll", True, {}),
    "map-smaller-than-window": (2, 2, 2, 2, 8, (3, 3), (1, 1), True, False, True, "roll_pad", True, {}),
    "map-smaller-cosine-pad_roll": (1, 2, 1, 1, 12, (3, 3), (2, 1), True, True, True, "pad_roll", True, {}),
    "cosine-shift12": (1, 7, 5, 2, 12, (3, 3), (1, 2), True, True, True, "roll_pad", True, {}),
    "mask-off": (1, 7, 5, 2, 8, (3, 3), (1, 1), True, False, True, "roll_pad", False, {}),
    "soft-mask-shift-h-only": (1, 7, 5, 1, 8, (3, 3), (2, 0), True, False, True, "pad_roll", True,
                               {"mask_value": -2.5}),
    "no-bias-no-pad": (1, 7, 5, 2, 8, (3, 3), (1, 1), False, False, False, "roll_pad", True, {}),
    "cosine-no-bias-no-pad": (1, 7, 5, 1, 12, (3, 3), (2, 1), False, True, False, "pad_roll", True, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case):
    b, h, w, heads, hd, window, shift, bias, cosine, pad, order, mask, extra = CASES[case]
    tensors = _inputs(b, h, w, heads, hd, window, bias=bias, cosine=cosine, pad=pad)
    kw = dict(window_size=window, shift_size=shift, order=order, shift_mask=mask, **extra)
    ref_out, ref_grads = _reference(*tensors, **kw)
    out, lse, grads = _kernel(*tensors, **kw)
    assert out.dtype == torch.float32 and out.shape == (b, h, w, heads, hd)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, w, heads) and torch.isfinite(lse).all()
    _check_close(out, grads, ref_out, ref_grads)
    if pad:
        assert torch.equal(grads[5][0], torch.zeros_like(grads[5][0]))  # padded queries are cropped away


def test_fused_qkv_strided_views():
    """q, k, v as views of one [B, H, W, 3, heads, hd] tensor, dout non-contiguous; inputs untouched."""
    window, shift = (3, 3), (1, 1)
    q, k, v, bias, ls, pad, _ = _inputs(2, 7, 5, 2, 8, window, bias=True, cosine=False, pad=True, fused=True,
                                        dtype=torch.float32)
    dout = torch.randn(2, 5, 7, 2, 8, device=DEVICE).transpose(1, 2)  # [B, H, W, heads, hd], strided
    assert not q.is_contiguous() and not dout.is_contiguous()
    qkv_before = q._base.clone()
    kw = dict(window_size=window, shift_size=shift)
    ref_out, ref_grads = _reference(q.double(), k.double(), v.double(), bias.double(), None, pad.double(),
                                    dout.double(), **kw)
    out, lse = wa.window_attention_fwd(q, k, v, bias, None, pad, **kw)
    grads = wa.window_attention_bwd(dout, q, k, v, out, lse, bias, None, pad, **kw)
    _check_close(out, grads, ref_out, ref_grads)
    assert torch.equal(q._base, qkv_before)
    dq, dk, dv = grads[:3]
    assert dq._base is not None and dq._base is dk._base is dv._base
    assert dq._base.shape == (2, 7, 5, 3, 2, 8)


def test_several_blocks_per_window_and_groups(monkeypatch):
    """A 4 x 5 window with 16-token blocks (2 blocks per window), 2 windows per dk/dv program."""
    monkeypatch.setattr(wa, "MAX_BLOCK", 16)
    monkeypatch.setattr(wa, "WINDOWS_PER_PROGRAM", 3)
    window, shift = (4, 5), (2, 1)
    tensors = _inputs(1, 9, 7, 1, 8, window, bias=True, cosine=True, pad=True)
    kw = dict(window_size=window, shift_size=shift)
    ref_out, ref_grads = _reference(*tensors, **kw)
    q, k, v, bias, ls, pad, dout = (t.float() for t in tensors)
    out, lse = wa.window_attention_fwd(q, k, v, bias, ls, pad, **kw)
    for det in (False, True):
        grads = wa.window_attention_bwd(dout, q, k, v, out, lse, bias, ls, pad, deterministic=det, **kw)
        _check_close(out, grads, ref_out, ref_grads)


def test_deterministic_mode(monkeypatch):
    """deterministic=True: bitwise identical twice, and equal to the default (atomics) to tolerance."""
    monkeypatch.setattr(wa, "WINDOWS_PER_PROGRAM", 3)
    window, shift = (3, 3), (1, 1)
    q, k, v, bias, ls, pad, dout = (t.float() for t in _inputs(1, 7, 7, 2, 8, window, bias=True, cosine=True,
                                                               pad=True))
    kw = dict(window_size=window, shift_size=shift)
    out, lse = wa.window_attention_fwd(q, k, v, bias, ls, pad, **kw)
    first, second, default = (
        wa.window_attention_bwd(dout, q, k, v, out, lse, bias, ls, pad, deterministic=det, **kw)
        for det in (True, True, False)
    )
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name
    for name, a, b in zip(GRAD_NAMES, first, default):
        assert _rel_err(b, a) <= F32_TOL, name


# ----------------------------------------------------------------------------------------------
# float16 with the accuracy rule


@pytest.mark.parametrize("cosine", [False, True], ids=["v1", "cosine"])
def test_fp16_accuracy(cosine):
    window, shift = (3, 3), (1, 2)
    tensors = _inputs(1, 7, 5, 2, 12, window, bias=True, cosine=cosine, pad=True, dtype=torch.float16)
    kw = dict(window_size=window, shift_size=shift)
    out, _, grads = _kernel(*tensors, dtype=torch.float16, **kw)
    low_out, low_grads = _reference(*tensors, **kw)  # float16 in and out (computed in float32 inside)
    high_out, high_grads = _reference(*tensors, dtype=torch.float64, **kw)
    assert out.dtype == torch.float16
    assert_accuracy(out, low_out, high_out, name="out")
    for name, g, lo, hi in zip(GRAD_NAMES, grads, low_grads, high_grads):
        if hi is not None:
            assert g.dtype == torch.float16, name
            assert_accuracy(g, lo, hi, name=name)


# ----------------------------------------------------------------------------------------------
# argument checking


def _good_args():
    q, k, v = (torch.randn(1, 5, 5, 2, 8, device=DEVICE) for _ in range(3))
    return dict(q=q, k=k, v=v, rel_pos_bias=torch.randn(25, 2, device=DEVICE),
                logit_scale=None, pad_value=torch.zeros(3, 2, 8, device=DEVICE),
                window_size=(3, 3), shift_size=(1, 1), order="roll_pad")


BAD = {
    "window-too-large": ({"window_size": (17, 17), "rel_pos_bias": None}, r"window_size .*at most 256"),
    "window-not-pair": ({"window_size": (3, 3, 3)}, "window_size must be"),
    "head_dim": ({"q": torch.randn(1, 5, 5, 2, 160), "k": torch.randn(1, 5, 5, 2, 160),
                  "v": torch.randn(1, 5, 5, 2, 160), "pad_value": None}, "head_dim 160"),
    "k-shape": ({"k": torch.randn(1, 5, 4, 2, 8)}, "k shape"),
    "v-dtype": ({"v": torch.randn(1, 5, 5, 2, 8).half()}, "v must have q's dtype"),
    "q-float64": ({"q": torch.randn(1, 5, 5, 2, 8).double(), "k": torch.randn(1, 5, 5, 2, 8).double(),
                   "v": torch.randn(1, 5, 5, 2, 8).double()}, "q dtype torch.float64"),
    "q-rank": ({"q": torch.randn(5, 5, 2, 8)}, r"q must be \[B, H, W, heads, head_dim\]"),
    "rel_pos_bias-shape": ({"rel_pos_bias": torch.randn(24, 2)}, "rel_pos_bias must have shape"),
    "logit_scale-shape": ({"logit_scale": torch.ones(3)}, "logit_scale must have shape"),
    "pad_value-shape": ({"pad_value": torch.zeros(2, 2, 8)}, "pad_value must have shape"),
    "shift_size": ({"shift_size": (3, 0)}, "shift_size must satisfy"),
    "order": ({"order": "pad_then_roll"}, "order must be one of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise(case):
    change, message = BAD[case]
    args = _good_args()
    args.update({k: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for k, t in change.items()})
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    params = [args.pop(n) for n in ("rel_pos_bias", "logit_scale", "pad_value")]
    reasons = wa.not_supported_reasons(q, k, v, args["window_size"], args["shift_size"], rel_pos_bias=params[0],
                                       logit_scale=params[1], pad_value=params[2], order=args["order"])
    assert any(re.search(message, r) for r in reasons), reasons
    with pytest.raises(ValueError, match=message):
        wa.window_attention_fwd(q, k, v, *params, **args)
    with pytest.raises(ValueError, match=message):
        wa.window_attention_bwd(q, q, k, v, q, torch.zeros(q.shape[:4]), *params, **args)


def test_bad_backward_inputs_raise():
    args = _good_args()
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    params = [args.pop(n) for n in ("rel_pos_bias", "logit_scale", "pad_value")]
    lse = torch.zeros(q.shape[:4], device=DEVICE)
    with pytest.raises(ValueError, match="dout must be"):
        wa.window_attention_bwd(q[:, :4], q, k, v, q, lse, *params, **args)
    with pytest.raises(ValueError, match="out must be"):
        wa.window_attention_bwd(q, q, k, v, q[..., :4], lse, *params, **args)
    with pytest.raises(ValueError, match="lse must be"):
        wa.window_attention_bwd(q, q, k, v, q, lse.double(), *params, **args)


def test_supported_inputs_have_no_reasons():
    args = _good_args()
    assert wa.not_supported_reasons(args["q"], args["k"], args["v"], (3, 3), (1, 1),
                                    rel_pos_bias=args["rel_pos_bias"], pad_value=args["pad_value"]) == []
    q = torch.randn(1, 20, 20, 1, 128, device=DEVICE)
    assert wa.not_supported_reasons(q, q, q, (16, 16), (8, 8), order="pad_roll") == []
    assert wa.not_supported_reasons(q, q, q, (8, 32)) == []  # 256 tokens, rectangular
