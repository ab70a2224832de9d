"""Tests of the C++ CPU window-attention ops (csrc/window_attention/) against the pure-torch reference.

* ``torch.ops.mmfast.window_attention_fwd`` / ``_bwd``: float64 forward and every gradient against
  ``torch.autograd.grad`` through :func:`mmfast.reference.window_attention.window_attention`, over
  windows, shifts, maps that need padding, bias / pad_value / cosine attention, both orders, the shift
  mask on and off, and q/k/v layouts (views of a fused qkv, arbitrary strides); float32 and bfloat16
  with :func:`mmfast.testing.assert_accuracy`; bitwise determinism of the reductions across thread
  counts.
* ``torch.ops.mmfast.window_process`` / ``window_process_reverse`` (CPU path) against the reference's
  roll / pad / :func:`window_partition` / :func:`window_reverse`, in float32, float16 and bfloat16.
* Argument errors: RuntimeError naming the argument.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mmfast  # noqa: F401  (registers torch.ops.mmfast.*)
from mmfast.reference.window_attention import (
    relative_position_index,
    window_attention,
    window_partition,
    window_reverse,
)
from mmfast.testing import assert_accuracy

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.mmfast, "window_attention_fwd"),
    reason="mmfast._C is not built (or has no window-attention ops)",
)

F64_TOL = 1e-12  # relative to the reference's max magnitude (observed: ~1e-15)
GRAD_NAMES = ("dq", "dk", "dv", "d_rel_pos_bias", "d_logit_scale", "d_pad_value")


@pytest.fixture(autouse=True)
def _few_threads(at_most_two_threads):
    """Shapes are small and CI cores shared: two threads at most (conftest's at_most_two_threads)."""


# ----------------------------------------------------------------------------------------------
# helpers


def _make_qkv(b: int, h: int, w: int, heads: int, hd: int, layout: str, dtype: torch.dtype):
    """q, k, v leaves in one of three layouts; returns (leaves, (q, k, v))."""
    if layout == "fused":  # views of a fused qkv [B, H, W, 3, heads, hd], as timm's qkv projection gives
        qkv = torch.randn(b, h, w, 3, heads, hd, dtype=dtype).requires_grad_()
        return [qkv], tuple(qkv.unbind(3))
    if layout == "transposed":  # spatial axes swapped, head_dim not unit-stride
        leaves = [torch.randn(b, w, h, hd, heads, dtype=dtype).requires_grad_() for _ in range(3)]
        return leaves, tuple(t.transpose(1, 2).transpose(3, 4) for t in leaves)
    leaves = [torch.randn(b, h, w, heads, hd, dtype=dtype).requires_grad_() for _ in range(3)]
    return leaves, tuple(leaves)


def _rel_err(a: Tensor, b: Tensor | None) -> float:
    if b is None:  # the reference did not use the input (e.g. pad_value with no padding)
        return a.detach().abs().max().item() if a.numel() else 0.0
    scale = max(b.detach().abs().max().item(), 1e-30)
    return (a.detach().double() - b.detach().double()).abs().max().item() / scale


def _kernel(q, k, v, dout, *, window, shift, bias, ls, pad, scale, shift_mask=True, mask_value=-100.0,
            order="roll_pad"):
    args = (bias, ls, pad, list(window), list(shift), scale, shift_mask, mask_value, order == "pad_roll")
    out, lse = torch.ops.mmfast.window_attention_fwd(q, k, v, *args)
    grads = torch.ops.mmfast.window_attention_bwd(dout, q, k, v, out, lse, *args)
    return out, lse, grads


def _reference(q, k, v, dout, *, window, shift, bias, ls, pad, scale, shift_mask=True, mask_value=-100.0,
               order="roll_pad"):
    out = window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias=bias, scale=scale,
                           logit_scale=ls, pad_value=pad, shift_mask=shift_mask, mask_value=mask_value, order=order)
    params = [t for t in (bias, ls, pad) if t is not None]
    got = torch.autograd.grad(out, [q, k, v, *params], dout, allow_unused=True)
    it = iter(got[3:])
    grads = list(got[:3]) + [next(it) if t is not None else None for t in (bias, ls, pad)]
    return out, grads


def _params(window, heads, hd, with_bias, with_pad, cosine, dtype):
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    bias = torch.randn(rows, heads, dtype=dtype).requires_grad_() if with_bias else None
    ls = (1 + 20 * torch.rand(heads, dtype=dtype)).requires_grad_() if cosine else None
    pad = torch.randn(3, heads, hd, dtype=dtype).requires_grad_() if with_pad else None
    return bias, ls, pad


# ----------------------------------------------------------------------------------------------
# float64 against the reference: forward and every gradient

# (B, H, W, heads, head_dim, window, shift, bias, pad_value, cosine, order, shift_mask, layout)
F64_CASES = [
    (1, 14, 14, 2, 16, (7, 7), (0, 0), True, False, False, "roll_pad", True, "fused"),
    (2, 14, 14, 3, 8, (7, 7), (3, 3), True, True, False, "roll_pad", True, "fused"),
    (1, 14, 14, 2, 8, (7, 7), (3, 3), False, False, False, "roll_pad", True, "separate"),
    (1, 13, 20, 2, 16, (7, 7), (3, 3), True, True, False, "roll_pad", True, "fused"),
    (1, 13, 20, 2, 16, (7, 7), (3, 3), True, True, False, "pad_roll", True, "fused"),
    (2, 13, 20, 1, 8, (7, 7), (3, 3), True, True, False, "roll_pad", False, "transposed"),
    (3, 13, 20, 2, 8, (7, 9), (3, 4), True, True, False, "roll_pad", True, "fused"),
    (1, 14, 14, 2, 8, (7, 9), (2, 5), False, True, True, "pad_roll", True, "fused"),
    (1, 13, 20, 3, 8, (7, 9), (3, 4), True, True, True, "pad_roll", True, "transposed"),
    (2, 9, 9, 1, 32, (8, 8), (4, 4), True, True, True, "roll_pad", True, "fused"),
    (1, 9, 9, 2, 8, (8, 8), (4, 4), True, True, True, "pad_roll", False, "separate"),
    (2, 16, 16, 2, 8, (8, 8), (4, 4), True, False, False, "roll_pad", False, "fused"),
    (2, 16, 16, 2, 8, (8, 8), (0, 4), True, False, True, "roll_pad", True, "fused"),
    (2, 9, 9, 3, 8, (3, 3), (1, 1), True, True, False, "roll_pad", True, "fused"),
    (1, 9, 9, 2, 16, (3, 3), (0, 2), False, False, False, "pad_roll", True, "separate"),
    (1, 5, 4, 2, 8, (7, 7), (3, 3), True, True, False, "roll_pad", True, "fused"),  # map smaller than the window
    (1, 5, 6, 1, 16, (7, 7), (3, 2), True, True, True, "pad_roll", True, "fused"),
    (1, 20, 18, 1, 8, (16, 16), (8, 8), True, True, True, "roll_pad", True, "fused"),  # N = 256
    (1, 7, 10, 2, 8, (1, 4), (0, 3), True, True, False, "roll_pad", True, "fused"),  # 1-row windows
    (1, 6, 6, 1, 3, (3, 3), (1, 2), True, True, False, "roll_pad", True, "transposed"),  # odd head_dim
    (1, 9, 9, 1, 64, (7, 7), (3, 3), True, True, True, "roll_pad", True, "fused"),
]


def _case_id(case) -> str:
    b, h, w, heads, hd, win, shift, bias, pad, cos, order, sm, layout = case
    parts = [f"b{b}", f"{h}x{w}", f"h{heads}", f"d{hd}", f"win{win[0]}x{win[1]}", f"s{shift[0]}{shift[1]}"]
    parts += [p for p, on in (("bias", bias), ("pad", pad), ("cos", cos), ("nomask", not sm)) if on]
    return "-".join(parts + [order, layout])


@pytest.mark.parametrize("case", F64_CASES, ids=[_case_id(c) for c in F64_CASES])
def test_float64_matches_reference(case):
    b, h, w, heads, hd, window, shift, with_bias, with_pad, cosine, order, shift_mask, layout = case
    _, (q, k, v) = _make_qkv(b, h, w, heads, hd, layout, torch.float64)
    bias, ls, pad = _params(window, heads, hd, with_bias, with_pad, cosine, torch.float64)
    dout = torch.randn(b, h, w, heads, hd, dtype=torch.float64)
    kw = dict(window=window, shift=shift, bias=bias, ls=ls, pad=pad, scale=0.7 * hd**-0.5, shift_mask=shift_mask,
              order=order)
    out, lse, grads = _kernel(q, k, v, dout, **kw)
    ref, ref_grads = _reference(q, k, v, dout, **kw)

    assert out.shape == ref.shape and out.dtype == torch.float64
    assert lse.shape == (b, h, w, heads) and lse.dtype == torch.float64
    assert _rel_err(out, ref) < F64_TOL
    for name, got, want, given in zip(GRAD_NAMES, grads, ref_grads, (q, k, v, bias, ls, pad)):
        if given is None:
            assert got.numel() == 0, f"{name} of an absent input must be empty"
            continue
        assert got.shape == given.shape, name
        assert _rel_err(got, want) < F64_TOL, f"{name}: rel err {_rel_err(got, want):.2e}"


def test_float64_lse_and_mask_value():
    """lse against a direct computation, with a mask_value small enough that masked keys still count."""
    b, h, w, heads, hd, window, shift = 1, 10, 11, 2, 8, (4, 5), (2, 3)
    q, k, v = (torch.randn(b, h, w, heads, hd, dtype=torch.float64) for _ in range(3))
    bias, _, pad = _params(window, heads, hd, True, True, False, torch.float64)
    dout = torch.randn(b, h, w, heads, hd, dtype=torch.float64)
    kw = dict(window=window, shift=shift, bias=bias, ls=None, pad=pad, scale=0.3, mask_value=-2.5)
    out, lse, grads = _kernel(q, k, v, dout, **kw)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    br, pr = bias.detach().clone().requires_grad_(), pad.detach().clone().requires_grad_()
    ref, ref_grads = _reference(qr, kr, vr, dout, **{**kw, "bias": br, "pad": pr})
    assert _rel_err(out, ref) < F64_TOL
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        if want is not None:
            assert _rel_err(got, want) < F64_TOL, name
    # lse of the first window, recomputed directly: it holds source rows / cols shift + (0..window), has no
    # padding and one shift region (the padded map is at least two windows wide on both axes).
    rows = [(dy + shift[0]) % h for dy in range(window[0])]
    cols = [(dx + shift[1]) % w for dx in range(window[1])]
    qw = q[0][rows][:, cols].reshape(-1, heads, hd)
    kw_ = k[0][rows][:, cols].reshape(-1, heads, hd)
    idx = relative_position_index(window)
    logits = torch.einsum("ihd,jhd->hij", qw * 0.3, kw_) + bias[idx].permute(2, 0, 1)
    want = torch.logsumexp(logits, dim=-1)  # [heads, N]
    got = lse[0][rows][:, cols].reshape(-1, heads).t()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_padded_query_gradient_is_zero_and_empty_map():
    """d pad_value[0] is exactly zero (padded queries are cropped); B = 0 gives empty results."""
    _, (q, k, v) = _make_qkv(2, 9, 9, 2, 8, "fused", torch.float64)
    _, _, pad = _params((7, 7), 2, 8, False, True, False, torch.float64)
    dout = torch.randn(2, 9, 9, 2, 8, dtype=torch.float64)
    _, _, grads = _kernel(q, k, v, dout, window=(7, 7), shift=(3, 3), bias=None, ls=None, pad=pad, scale=0.25)
    assert torch.count_nonzero(grads[5][0]) == 0 and torch.count_nonzero(grads[5][1:]) > 0
    e = torch.randn(0, 9, 9, 2, 8, dtype=torch.float64)
    out, lse, grads = _kernel(e, e, e, e, window=(7, 7), shift=(3, 3), bias=None, ls=None, pad=None, scale=0.25)
    assert out.shape == e.shape and lse.shape == (0, 9, 9, 2) and grads[0].shape == e.shape


def test_backward_is_deterministic_across_thread_counts():
    _, (q, k, v) = _make_qkv(2, 13, 20, 3, 16, "fused", torch.float32)
    bias, ls, pad = _params((7, 7), 3, 16, True, True, True, torch.float32)
    dout = torch.randn(2, 13, 20, 3, 16)
    kw = dict(window=(7, 7), shift=(3, 3), bias=bias, ls=ls, pad=pad, scale=0.25)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(_kernel(q, k, v, dout, **kw))
    for a, b in zip([results[0][0], results[0][1], *results[0][2]], [results[1][0], results[1][1], *results[1][2]]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# float32 / bfloat16: kernel error vs float64 at most 2x plain PyTorch's in the same dtype

LOWP_CASES = [
    (2, 13, 20, 2, 32, (7, 7), (3, 3), True, True, False, "roll_pad", "fused"),
    (1, 14, 14, 3, 16, (7, 9), (2, 5), True, True, True, "pad_roll", "fused"),
    (2, 9, 9, 2, 8, (8, 8), (4, 4), True, False, True, "roll_pad", "transposed"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LOWP_CASES, ids=["v1-pad-shift", "v2-rect-padroll", "v2-transposed"])
def test_low_precision_accuracy(case, dtype):
    b, h, w, heads, hd, window, shift, with_bias, with_pad, cosine, order, layout = case
    leaves, (q, k, v) = _make_qkv(b, h, w, heads, hd, layout, dtype)
    bias, ls, pad = _params(window, heads, hd, with_bias, with_pad, cosine, dtype)
    dout = torch.randn(b, h, w, heads, hd).to(dtype)

    def hi(t):
        return None if t is None else t.detach().double().requires_grad_()

    leaves_hi = [hi(t) for t in leaves]
    if layout == "fused":
        q_hi, k_hi, v_hi = leaves_hi[0].unbind(3)
    elif layout == "transposed":
        q_hi, k_hi, v_hi = (t.transpose(1, 2).transpose(3, 4) for t in leaves_hi)
    else:
        q_hi, k_hi, v_hi = leaves_hi
    kw = dict(window=window, shift=shift, scale=hd**-0.5, order=order)
    out, _, grads = _kernel(q, k, v, dout, bias=bias, ls=ls, pad=pad, **kw)
    ref_lp, grads_lp = _reference(q, k, v, dout, bias=bias, ls=ls, pad=pad, **kw)
    ref_hi, grads_hi = _reference(q_hi, k_hi, v_hi, dout.double(), bias=hi(bias), ls=hi(ls), pad=hi(pad), **kw)

    assert out.dtype == dtype
    assert_accuracy(out, ref_lp, ref_hi, name="out")
    for name, got, lp, high, given in zip(GRAD_NAMES, grads, grads_lp, grads_hi, (q, k, v, bias, ls, pad)):
        if given is None:
            continue
        assert got.dtype == given.dtype, name
        assert_accuracy(got, lp, high, name=name)


def test_float16_runs():
    """float16 inputs compute in float32 like bfloat16; a smoke check of the Half conversions."""
    _, (q, k, v) = _make_qkv(1, 9, 9, 2, 16, "fused", torch.float64)
    bias, _, pad = _params((7, 7), 2, 16, True, True, False, torch.float64)
    dout = torch.randn(1, 9, 9, 2, 16, dtype=torch.float64)
    kw = dict(window=(7, 7), shift=(3, 3), ls=None, scale=0.25)
    half = [t.detach().half() for t in (q, k, v, dout, bias, pad)]
    out, _, grads = _kernel(*half[:4], bias=half[4], pad=half[5], **kw)
    q64, k64, v64, _, b64, p64 = (t.double().requires_grad_() for t in half)
    ref, ref_grads = _reference(q64, k64, v64, half[3].double(), bias=b64, pad=p64, **kw)
    assert out.dtype == torch.float16 and _rel_err(out, ref) < 2e-3
    assert _rel_err(grads[0], ref_grads[0]) < 4e-3


# ----------------------------------------------------------------------------------------------
# window_process / window_process_reverse (CPU)


def _ref_process(x: Tensor, window, shift, order: str, pad: Tensor | None) -> Tensor:
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]

    def do_pad(t):
        padded = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
        if pad is None or (pad_h == 0 and pad_w == 0):
            return padded
        inside = torch.zeros(h + pad_h, w + pad_w, dtype=torch.bool)
        inside[:h, :w] = True
        return torch.where(inside[:, :, None], padded, pad.to(x.dtype))

    back = (-shift[0], -shift[1])
    t = do_pad(torch.roll(x, back, (1, 2))) if order == "roll_pad" else torch.roll(do_pad(x), back, (1, 2))
    return window_partition(t, window).flatten(0, 1)


def _ref_reverse(windows: Tensor, hw, window, shift, order: str) -> Tensor:
    h, w = hw
    hp, wp = h + (-h) % window[0], w + (-w) % window[1]
    nw = (hp // window[0]) * (wp // window[1])
    x = window_reverse(windows.reshape(-1, nw, *windows.shape[1:]), window, (hp, wp))
    if order == "roll_pad":
        return torch.roll(x[:, :h, :w], shift, (1, 2))
    return torch.roll(x, shift, (1, 2))[:, :h, :w]


# (B, H, W, C, window, shift, order, pad_value, x layout)
PROCESS_CASES = [
    (2, 14, 14, 32, (7, 7), (3, 3), "roll_pad", False, "contiguous"),
    (1, 13, 20, 24, (7, 7), (3, 3), "roll_pad", True, "contiguous"),
    (1, 13, 20, 24, (7, 7), (3, 3), "pad_roll", True, "contiguous"),
    (2, 9, 11, 5, (7, 9), (2, 4), "pad_roll", True, "channels_strided"),
    (3, 5, 4, 16, (8, 8), (4, 4), "roll_pad", True, "spatial_transposed"),
    (1, 16, 16, 8, (16, 16), (0, 0), "roll_pad", False, "contiguous"),
]


def _process_input(b, h, w, c, layout, dtype):
    if layout == "channels_strided":
        return torch.randn(b, h, w, 2 * c).to(dtype)[..., ::2]
    if layout == "spatial_transposed":
        return torch.randn(b, w, h, c).to(dtype).transpose(1, 2)
    return torch.randn(b, h, w, c).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", PROCESS_CASES, ids=lambda c: f"{c[1]}x{c[2]}-c{c[3]}-w{c[4]}-s{c[5]}-{c[6]}-{c[8]}")
def test_window_process_matches_reference(case, dtype):
    b, h, w, c, window, shift, order, with_pad, layout = case
    x = _process_input(b, h, w, c, layout, dtype)
    pad = torch.randn(c).to(dtype) if with_pad else None
    ptr = order == "pad_roll"
    win = torch.ops.mmfast.window_process(x, list(window), list(shift), ptr, pad)
    want = _ref_process(x, window, shift, order, pad)
    assert win.dtype == dtype and win.shape == want.shape
    assert torch.equal(win, want)

    windows = torch.randn(want.shape).to(dtype)
    back = torch.ops.mmfast.window_process_reverse(windows, [h, w], list(window), list(shift), ptr)
    assert torch.equal(back, _ref_reverse(windows, (h, w), window, shift, order))
    # reverse undoes process exactly
    assert torch.equal(torch.ops.mmfast.window_process_reverse(win, [h, w], list(window), list(shift), ptr), x)


@pytest.mark.parametrize("order", ["roll_pad", "pad_roll"])
def test_window_process_reverse_is_adjoint(order):
    """<process(x, pad), g> = <x, reverse(g)> + <pad, sum of g over padded tokens>: the backward of
    process is reverse (for x) and windows.sum - reverse.sum (for pad_value), and vice versa."""
    window, shift, ptr = (7, 9), (3, 4), order == "pad_roll"
    x = torch.randn(2, 10, 12, 6, dtype=torch.float64)
    pad = torch.randn(6, dtype=torch.float64)
    windows = torch.ops.mmfast.window_process(x, list(window), list(shift), ptr, pad)
    g = torch.randn_like(windows)
    gx = torch.ops.mmfast.window_process_reverse(g, [10, 12], list(window), list(shift), ptr)
    gpad = g.sum((0, 1)) - gx.sum((0, 1, 2))
    lhs = (windows * g).sum()
    rhs = (x * gx).sum() + (pad * gpad).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # and autograd through the reference agrees
    xr, pr = x.clone().requires_grad_(), pad.clone().requires_grad_()
    dx, dpad = torch.autograd.grad(_ref_process(xr, window, shift, order, pr), [xr, pr], g)
    torch.testing.assert_close(gx, dx, rtol=0, atol=0)
    torch.testing.assert_close(gpad, dpad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# window_process / window_process_reverse (CUDA kernel, csrc/window_attention/window_process_cuda.cu)

# The CPU cases, plus what only the CUDA kernel distinguishes: a Swin-sized map (many blocks), an
# input whose data pointer is not 16-byte aligned (narrower vectors), and C not a multiple of 8.
CUDA_PROCESS_CASES = PROCESS_CASES + [
    (4, 56, 56, 96, (7, 7), (3, 3), "roll_pad", False, "contiguous"),
    (2, 30, 33, 40, (14, 14), (7, 7), "pad_roll", True, "offset"),
    (1, 20, 18, 6, (8, 8), (4, 2), "roll_pad", True, "contiguous"),
]


def _cuda_process_input(b, h, w, c, layout, dtype):
    if layout == "offset":  # storage offset of one element: the kernel must drop to scalar loads
        return torch.randn(b * h * w * c + 1).to(dtype)[1:].view(b, h, w, c).cuda()
    x = _process_input(b, h, w, c, layout, dtype)
    if layout == "contiguous":
        return x.cuda()
    # keep the layout on the GPU: copy the strided storage, then take the same view of it
    base = x._base if x._base is not None else x
    return base.cuda().as_strided(x.shape, x.stride(), x.storage_offset())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CUDA_PROCESS_CASES,
                         ids=lambda c: f"{c[1]}x{c[2]}-c{c[3]}-w{c[4]}-s{c[5]}-{c[6]}-{c[8]}")
def test_cuda_window_process_matches_reference(case, dtype):
    """The CUDA gather is a copy: bitwise equal to the reference in every dtype, forward and reverse,
    for padded maps (with and without pad_value), both orders and strided inputs."""
    b, h, w, c, window, shift, order, with_pad, layout = case
    x = _cuda_process_input(b, h, w, c, layout, dtype)
    assert x.is_cuda
    pad = torch.randn(c).to(dtype).cuda() if with_pad else None
    ptr = order == "pad_roll"
    win = torch.ops.mmfast.window_process(x, list(window), list(shift), ptr, pad)
    want = _ref_process(x.cpu(), window, shift, order, None if pad is None else pad.cpu())
    assert win.is_cuda and win.dtype == dtype and win.shape == want.shape
    assert torch.equal(win.cpu(), want)

    windows = torch.randn(want.shape).to(dtype)
    back = torch.ops.mmfast.window_process_reverse(windows.cuda(), [h, w], list(window), list(shift), ptr)
    assert torch.equal(back.cpu(), _ref_reverse(windows, (h, w), window, shift, order))
    # a strided windows tensor (a view of a wider buffer) takes the reverse's strided path
    wide = torch.randn(*want.shape[:2], 2 * c).to(dtype).cuda()
    back = torch.ops.mmfast.window_process_reverse(wide[..., ::2], [h, w], list(window), list(shift), ptr)
    assert torch.equal(back.cpu(), _ref_reverse(wide[..., ::2].cpu(), (h, w), window, shift, order))
    assert torch.equal(torch.ops.mmfast.window_process_reverse(win, [h, w], list(window), list(shift), ptr), x)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["roll_pad", "pad_roll"])
def test_cuda_window_partition_gradients(order):
    """Through autograd (mmfast.ops.window_process, impl="cuda"): the input and pad_value gradients
    equal the C++ backend's on the same data (fp64 sums, so the comparison is exact to rounding)."""
    from mmfast.ops.window_process import window_partition as fused_partition
    from mmfast.ops.window_process import window_unpartition

    x = torch.randn(2, 10, 13, 8, dtype=torch.float64)
    pad = torch.randn(8, dtype=torch.float64)
    grads = {}
    for impl, dev in (("cpp", "cpu"), ("cuda", "cuda")):
        xd, pd = x.to(dev).requires_grad_(), pad.to(dev).requires_grad_()
        win = fused_partition(xd, (7, 9), (3, 4), order=order, pad_value=pd, impl=impl)
        back = window_unpartition(win * 2.0, (10, 13), (7, 9), (3, 4), order=order, impl=impl)
        torch.testing.assert_close(back, 2.0 * xd, rtol=0, atol=0)
        g = torch.arange(win.numel(), dtype=torch.float64).reshape(win.shape).to(dev) / win.numel()
        grads[impl] = [t.cpu() for t in torch.autograd.grad((win * g).sum() + back.sum(), [xd, pd])]
    for a, e in zip(grads["cuda"], grads["cpp"]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# argument errors


def _attn_args(**over):
    q = torch.randn(1, 8, 8, 2, 4)
    args = dict(q=q, k=q, v=q, rel_pos_bias=None, logit_scale=None, pad_value=None, window_size=[4, 4],
                shift_size=[2, 2], scale=0.5, shift_mask=True, mask_value=-100.0, pad_then_roll=False)
    args.update(over)
    return args


def _fwd(**over):
    a = _attn_args(**over)
    return torch.ops.mmfast.window_attention_fwd(*a.values())


def _bwd(**over):
    a = _attn_args(**{k: v for k, v in over.items() if k not in ("dout", "lse")})
    q = a["q"]
    dout = over.get("dout", torch.zeros_like(q))
    lse = over.get("lse", torch.zeros(q.shape[:4]))
    return torch.ops.mmfast.window_attention_bwd(dout, q, a["k"], a["v"], torch.zeros_like(q), lse,
                                                 *list(a.values())[3:])


ERROR_CASES = [
    ("q_4d", lambda: _fwd(q=torch.randn(1, 8, 8, 8)), "q must be 5-D"),
    ("k_shape", lambda: _fwd(k=torch.randn(1, 8, 8, 2, 5)), "k shape"),
    ("v_dtype", lambda: _fwd(v=torch.randn(1, 8, 8, 2, 4, dtype=torch.float64)), "k and v must have q's dtype"),
    ("q_int", lambda: _fwd(q=torch.ones(1, 8, 8, 2, 4, dtype=torch.int32)), "floating point"),
    ("window_zero", lambda: _fwd(window_size=[0, 4]), "window_size must be >= 1"),
    ("window_len", lambda: _fwd(window_size=[4]), "window_size must have 2 entries"),
    ("shift_ge_window", lambda: _fwd(shift_size=[4, 2]), "shift_size must satisfy 0 <= shift < window_size"),
    ("shift_negative", lambda: _fwd(shift_size=[-1, 0]), "shift_size must satisfy"),
    ("bias_shape", lambda: _fwd(rel_pos_bias=torch.randn(48, 2)), r"rel_pos_bias must be \[\(2\*Wh-1\)"),
    ("bias_heads", lambda: _fwd(rel_pos_bias=torch.randn(49, 3)), "rel_pos_bias must be"),
    ("logit_scale_shape", lambda: _fwd(logit_scale=torch.ones(3)), r"logit_scale must be \[heads\]"),
    ("pad_value_shape", lambda: _fwd(pad_value=torch.zeros(2, 2, 4)), r"pad_value must be \[3, heads, head_dim\]"),
    ("bwd_dout_shape", lambda: _bwd(dout=torch.zeros(1, 8, 8, 2, 5)), "dout shape"),
    ("bwd_lse_shape", lambda: _bwd(lse=torch.zeros(1, 8, 8)), "lse must be"),
    ("process_x_3d", lambda: torch.ops.mmfast.window_process(torch.randn(8, 8, 4), [4, 4], [0, 0], False, None),
     "x must be 4-D"),
    ("process_channels", lambda: torch.ops.mmfast.window_process(torch.randn(1, 8, 8, 4), [4, 4], [0, 0], False,
                                                                 torch.zeros(5)), r"pad_value must be \[C\]"),
    ("process_shift", lambda: torch.ops.mmfast.window_process(torch.randn(1, 8, 8, 4), [4, 4], [0, 4], False, None),
     "shift_size must satisfy"),
    ("reverse_tokens", lambda: torch.ops.mmfast.window_process_reverse(torch.randn(4, 15, 4), [8, 8], [4, 4],
                                                                       [0, 0], False), "windows must have Wh\\*Ww"),
    ("reverse_batch", lambda: torch.ops.mmfast.window_process_reverse(torch.randn(5, 16, 4), [8, 8], [4, 4],
                                                                      [0, 0], False), "windows dim 0"),
    ("reverse_hw", lambda: torch.ops.mmfast.window_process_reverse(torch.randn(4, 16, 4), [0, 8], [4, 4],
                                                                   [0, 0], False), "hw must be >= 1"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_arguments_raise(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
