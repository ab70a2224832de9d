"""Coverage of issue 4's shape / dtype matrix for ``mmfast.functional.window_attention``.

Issue 4 asks for "window sizes up to at least 16x16 tokens (N=256), rectangular windows, asymmetric
shifts, head dims 32, 64, 96 and 128, and fp32, fp16 and bf16". Every test here goes through the
public entry point with a forced backend (``impl="cpp"`` or ``impl="triton"``), checks with a spy on
the op's backend table that the forward and the backward really ran on that backend, and compares the
output and the gradients (dq, dk, dv, the relative-position-bias table, pad_value, and logit_scale
for Swin v2 cosine attention with a CPB-MLP table) against autograd through the float64 oracle
:func:`mmfast.reference.window_attention.window_attention`, with the accuracy rule
:func:`mmfast.testing.assert_accuracy`: kernel error <= 2x the error of plain PyTorch in the same
dtype (the reference run on the same low-precision inputs) + a few-ulp floor.

* C++ (CPU): a covering set, not the cartesian product: every window ((16, 16), (12, 12), (7, 9),
  (16, 8)) with every head dim (32, 64, 96, 128), the dtypes laid out as a Latin square so that every
  head dim meets fp32, fp16 and bf16; the 16 x 16 window with shift 0, half-window and asymmetric
  shifts; feature maps that need padding; plus Swin v2 cosine cases in all three dtypes.
* Triton (the interpreter on CPU, TRITON_INTERPRET=1 from conftest.py): a 16 x 16 window with
  head_dim 128 (fp32), head_dim 96 (fp32, not a power of two) and fp16 with head_dim 64, one or two
  windows each; Swin v2 cosine cases in fp32 and fp16. bfloat16 runs on a CUDA GPU only (marked
  ``gpu``): the interpreter rounds float32 to bfloat16 toward zero, see ``TRITON_BF16_CASES``.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

import mmfast  # noqa: F401  (registers torch.ops.mmfast.*)
from mmfast import _ext
from mmfast.functional import window_attention as fused_window_attention
from mmfast.ops import window_attention as wa_ops
from mmfast.reference.window_attention import swinv2_cpb_table, window_attention
from mmfast.testing import assert_accuracy

HAS_CPP = _ext.has_cpp() and hasattr(torch.ops.mmfast, "window_attention_fwd")
HAS_TRITON, TRITON_HOW = _ext.triton_status()

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_NAMES = ("dq", "dk", "dv", "d_rel_pos_bias", "d_logit_scale", "d_pad_value")


@pytest.fixture(autouse=True)
def _two_threads(at_most_two_threads):
    """Shapes are small and CI cores shared: two threads at most (conftest's at_most_two_threads)."""


@pytest.fixture
def backend_calls(monkeypatch):
    """Counts the calls of every kernel backend's forward / backward (``"cpp-fwd"``, ...)."""
    counts: collections.Counter[str] = collections.Counter()

    def spy(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, entry in list(wa_ops.WINDOW.backends.items()):
        backward = None if entry.backward is None else spy(entry.backward, f"{name}-bwd")
        monkeypatch.setitem(wa_ops.WINDOW.backends, name,
                            dataclasses.replace(entry, forward=spy(entry.forward, f"{name}-fwd"), backward=backward))
    return counts


# ----------------------------------------------------------------------------------------------
# helpers


def _cpb_table(window: tuple[int, int], heads: int) -> Tensor:
    """A Swin v2 continuous-position-bias table (16 * sigmoid(MLP(log coords))), float64."""
    mlp = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, heads, bias=False)).double()
    with torch.no_grad():
        return swinv2_cpb_table(mlp, window)


def _inputs(b, h, w, heads, hd, window, dtype, *, cosine: bool, pad: bool) -> dict[str, Tensor | None]:
    """Leaves in ``dtype`` (q, k, v, rel_pos_bias, logit_scale, pad_value) and dout."""
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    if cosine:  # Swin v2: CPB-MLP table, logit_scale = exp(clamp(log(10 .. 40), max=log(100)))
        bias = _cpb_table(window, heads)
        ls = torch.exp(torch.log(torch.linspace(10.0, 40.0, heads, dtype=torch.float64)).clamp(max=math.log(100)))
    else:
        bias, ls = torch.randn(rows, heads, dtype=torch.float64), None
    t = dict(q=torch.randn(b, h, w, heads, hd, dtype=torch.float64),
             k=torch.randn(b, h, w, heads, hd, dtype=torch.float64),
             v=torch.randn(b, h, w, heads, hd, dtype=torch.float64),
             rel_pos_bias=bias, logit_scale=ls,
             pad_value=torch.randn(3, heads, hd, dtype=torch.float64) if pad else None,
             dout=torch.randn(b, h, w, heads, hd, dtype=torch.float64))
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


LEAF_NAMES = ("q", "k", "v", "rel_pos_bias", "logit_scale", "pad_value")


def _run(fn, tensors, dtype, **kw) -> tuple[Tensor, list[Tensor | None]]:
    """Output and the six gradients of ``fn`` on fresh leaves cast to ``dtype`` (None for absent inputs)."""
    leaves = {n: None if tensors[n] is None else tensors[n].detach().to(dtype).requires_grad_() for n in LEAF_NAMES}
    out = fn(leaves["q"], leaves["k"], leaves["v"], rel_pos_bias=leaves["rel_pos_bias"],
             logit_scale=leaves["logit_scale"], pad_value=leaves["pad_value"], **kw)
    given = [leaves[n] for n in LEAF_NAMES if leaves[n] is not None]
    got = iter(torch.autograd.grad(out, given, tensors["dout"].to(out.dtype), allow_unused=True))
    grads = [None if leaves[n] is None else next(got) for n in LEAF_NAMES]
    # an input the function did not use (the reference's pad_value on a map that needs no padding) gets zeros
    grads = [torch.zeros_like(leaves[n]) if g is None and leaves[n] is not None else g
             for n, g in zip(LEAF_NAMES, grads)]
    return out.detach(), grads


def _check(impl, tensors, dtype, counts, **kw) -> None:
    def kernel(*a, **k):
        return fused_window_attention(*a, impl=impl, **k)

    out, grads = _run(kernel, tensors, dtype, **kw)
    assert counts == {f"{impl}-fwd": 1, f"{impl}-bwd": 1}, f"backends called: {dict(counts)}"
    low_out, low_grads = _run(window_attention, tensors, dtype, **kw)  # plain PyTorch, same dtype
    high_out, high_grads = _run(window_attention, tensors, torch.float64, **kw)

    assert out.dtype == dtype and out.shape == tensors["q"].shape
    assert_accuracy(out, low_out, high_out, name="out")
    for name, g, lo, hi, leaf in zip(GRAD_NAMES, grads, low_grads, high_grads, LEAF_NAMES):
        if tensors[leaf] is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == tensors[leaf].shape, name
        assert_accuracy(g, lo, hi, name=name)


# ----------------------------------------------------------------------------------------------
# C++ backend: the covering set
#
# Windows x head dims, all 16 pairs; dtype = DTYPE_CYCLE[(window index + head-dim index) % 3], a Latin
# square, so every head dim (and every window) meets fp32, fp16 and bf16. Maps need padding on both
# axes except where noted.

# window -> feature map (H, W), padded to a multiple of the window
MAPS = {(16, 16): (18, 20), (12, 12): (14, 26), (7, 9): (10, 20), (16, 8): (18, 12)}
WINDOWS = list(MAPS)
HEAD_DIMS = (32, 64, 96, 128)
DTYPE_CYCLE = ("fp32", "fp16", "bf16")
# shift per (window, head dim): 0, half-window and asymmetric (sh != sw, or one axis only) for each window
SHIFTS = {
    (16, 16): {32: (0, 0), 64: (8, 8), 96: (3, 5), 128: (11, 2)},
    (12, 12): {32: (6, 6), 64: (0, 0), 96: (2, 7), 128: (0, 5)},
    (7, 9): {32: (3, 4), 64: (0, 0), 96: (5, 2), 128: (3, 4)},
    (16, 8): {32: (8, 4), 64: (3, 5), 96: (0, 0), 128: (12, 1)},
}

# (B, H, W, heads, head_dim, window, shift, dtype, cosine, pad_value, order)
CPP_CASES = []
for _i, _win in enumerate(WINDOWS):
    for _j, _hd in enumerate(HEAD_DIMS):
        CPP_CASES.append((1 + (_i + _j) % 2, *MAPS[_win], 1 + (_j % 2), _hd, _win, SHIFTS[_win][_hd],
                          DTYPE_CYCLE[(_i + _j) % 3], False, _j % 2 == 0, "roll_pad"))
CPP_CASES += [
    # the 16 x 16 window with each shift kind in fp16 / bf16 as well
    (1, 18, 20, 2, 64, (16, 16), (3, 5), "bf16", False, True, "roll_pad"),
    (1, 18, 20, 1, 128, (16, 16), (0, 0), "fp16", False, True, "roll_pad"),
    (1, 18, 20, 1, 96, (16, 16), (8, 8), "bf16", False, False, "pad_roll"),
    # Swin v2: cosine attention, logit_scale and a CPB-MLP bias table, every dtype
    (1, 18, 20, 2, 32, (16, 16), (8, 8), "fp32", True, True, "roll_pad"),
    (1, 18, 20, 1, 128, (16, 16), (3, 5), "fp16", True, False, "roll_pad"),
    (2, 10, 20, 2, 96, (7, 9), (5, 2), "bf16", True, True, "roll_pad"),
    (1, 14, 26, 2, 64, (12, 12), (6, 6), "fp32", True, False, "pad_roll"),
    (1, 18, 12, 1, 64, (16, 8), (3, 5), "bf16", True, True, "roll_pad"),
]


def _case_id(case) -> str:
    b, h, w, heads, hd, win, shift, dtype, cosine, pad, order = case
    parts = [dtype, f"win{win[0]}x{win[1]}", f"d{hd}", f"s{shift[0]}-{shift[1]}", f"b{b}", f"{h}x{w}", f"h{heads}"]
    parts += [p for p, on in (("v2cos", cosine), ("pad", pad), ("pad_roll", order == "pad_roll")) if on]
    return "-".join(parts)


def test_cpp_cases_cover_the_matrix():
    """The covering set is what the module docstring says it is."""
    seen = {(c[5], c[4]) for c in CPP_CASES}
    assert seen >= {(w, d) for w in WINDOWS for d in HEAD_DIMS}
    assert {(c[7], c[4]) for c in CPP_CASES} >= {(t, d) for t in DTYPES for d in HEAD_DIMS}
    shifts16 = {c[6] for c in CPP_CASES if c[5] == (16, 16)}
    assert (0, 0) in shifts16 and (8, 8) in shifts16 and any(s[0] != s[1] for s in shifts16)
    assert {c[7] for c in CPP_CASES if c[8]} == set(DTYPES)  # Swin v2 in every dtype
    for _b, h, w, _heads, _hd, win, shift, *_ in CPP_CASES:
        assert h % win[0] and w % win[1], "every map needs padding"
        assert all(0 <= s < n for s, n in zip(shift, win))


@pytest.mark.skipif(not HAS_CPP, reason="mmfast._C is not built (or has no window-attention ops)")
@pytest.mark.parametrize("case", CPP_CASES, ids=[_case_id(c) for c in CPP_CASES])
def test_cpp_matches_float64_reference(case, backend_calls):
    b, h, w, heads, hd, window, shift, dtype, cosine, pad, order = case
    tensors = _inputs(b, h, w, heads, hd, window, DTYPES[dtype], cosine=cosine, pad=pad)
    _check("cpp", tensors, DTYPES[dtype], backend_calls, window_size=window, shift_size=shift, order=order)


# ----------------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU: one or two windows, one head, B = 1)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (H, W, head_dim, window, shift, dtype, cosine, pad_value)
TRITON_CASES = {
    "fp32-win16x16-d128-s3-5-pad": (16, 20, 128, (16, 16), (3, 5), "fp32", False, True),
    "fp32-win16x16-d128-s8-8-v2cos": (18, 16, 128, (16, 16), (8, 8), "fp32", True, True),
    "fp32-win12x12-d96-s6-6-v2cos": (12, 14, 96, (12, 12), (6, 6), "fp32", True, False),
    "fp16-win16x16-d96-s0-0-pad": (18, 16, 96, (16, 16), (0, 0), "fp16", False, True),
    "fp16-win16x8-d64-s8-4-pad": (16, 10, 64, (16, 8), (8, 4), "fp16", False, True),
    "fp16-win7x9-d32-s5-2-v2cos-pad": (7, 11, 32, (7, 9), (5, 2), "fp16", True, True),
}
# bfloat16 needs a GPU: the interpreter converts float32 to bfloat16 by truncation (round toward zero)
# instead of round-to-nearest-even, about twice plain PyTorch's rounding error, so the accuracy rule
# cannot hold there whatever the kernel does.
TRITON_BF16_CASES = {
    "bf16-win16x16-d128-s3-5-pad": (16, 20, 128, (16, 16), (3, 5), "bf16", False, True),
    "bf16-win12x12-d96-s6-6-v2cos": (12, 14, 96, (12, 12), (6, 6), "bf16", True, False),
    "bf16-win16x8-d64-s8-4-pad": (16, 10, 64, (16, 8), (8, 4), "bf16", False, True),
}


def _triton_case(h, w, hd, window, shift, dtype, cosine, pad, counts):
    from mmfast.triton import window_attention as tk

    tensors = _inputs(1, h, w, 1, hd, window, DTYPES[dtype], cosine=cosine, pad=pad)
    tensors = {k: None if v is None else v.to(TRITON_DEVICE) for k, v in tensors.items()}
    assert tk.not_supported_reasons(tensors["q"], tensors["k"], tensors["v"], window, shift,
                                    rel_pos_bias=tensors["rel_pos_bias"], logit_scale=tensors["logit_scale"],
                                    pad_value=tensors["pad_value"]) == []
    _check("triton", tensors, DTYPES[dtype], counts, window_size=window, shift_size=shift)


@pytest.mark.skipif(not HAS_TRITON, reason=f"Triton cannot run here: {TRITON_HOW}")
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_float64_reference(case, backend_calls):
    _triton_case(*TRITON_CASES[case], backend_calls)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason=f"Triton cannot run here: {TRITON_HOW}")
@pytest.mark.parametrize("case", list(TRITON_BF16_CASES))
def test_triton_bf16_matches_float64_reference(case, backend_calls):
    _triton_case(*TRITON_BF16_CASES[case], backend_calls)


@pytest.mark.skipif(not HAS_TRITON, reason=f"Triton cannot run here: {TRITON_HOW}")
def test_triton_accepts_the_issue_matrix():
    """not_supported_reasons has nothing against any (window, head dim, dtype) the issue requires."""
    from mmfast.triton import window_attention as tk

    for window in WINDOWS:
        for hd in HEAD_DIMS:
            for dtype in DTYPES.values():
                q = torch.empty(1, *MAPS[window], 2, hd, dtype=dtype, device=TRITON_DEVICE)
                bias = torch.empty((2 * window[0] - 1) * (2 * window[1] - 1), 2, dtype=dtype, device=q.device)
                for shift in {(0, 0), (window[0] // 2, window[1] // 2), (window[0] - 1, 1)}:
                    assert tk.not_supported_reasons(q, q, q, window, shift, rel_pos_bias=bias,
                                                    logit_scale=torch.ones(2, dtype=dtype, device=q.device)) == []
