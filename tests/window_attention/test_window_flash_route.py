"""The optional flash-attn route of window attention (backend ``flash_attn``), on CPU.

flash-attn cannot be built on a CPU-only machine, so a stand-in ``flash_attn`` module is put in
``sys.modules``: its ``flash_attn_func`` is ``F.scaled_dot_product_attention`` on flash-attn's layout
([batch, seqlen, nheads, headdim]) and records each call. The registry's cached status, the device
types and the dtypes of the route are patched with monkeypatch, so everything is undone after each
test. What this proves: mmfast's partition -> flash_attn_func -> unpartition route has the
reference's semantics (padding with pad_value, both orders, shift without mask), gradients flow,
dispatch and its policy, and the errors. What it cannot prove: flash-attn's own kernels (GPU only).
"""

from __future__ import annotations

import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import _ext
from mmfast.ops import registry
from mmfast.ops import window_attention as wa
from mmfast.reference import window_attention as ref

HAS_CPP_KERNEL = _ext.has_cpp() and hasattr(torch.ops.mmfast, "window_attention_fwd")
CPU_DEFAULT = "cpp" if HAS_CPP_KERNEL else "reference"


def _fake_flash_module(calls: list, with_func: bool = True) -> types.ModuleType:
    mod = types.ModuleType("flash_attn")
    mod.__version__ = "0.0.0+mmfast-test-stand-in"

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        calls.append({"shape": tuple(q.shape), "dtype": q.dtype, "dropout_p": dropout_p,
                      "softmax_scale": softmax_scale, "causal": causal, **kwargs})
        assert q.shape == k.shape == v.shape and q.dim() == 4
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    if with_func:
        mod.flash_attn_func = flash_attn_func
    return mod


@pytest.fixture(autouse=True)
def _policy(monkeypatch):
    # every test starts from the documented default and leaves the module as it found it
    monkeypatch.setitem(wa._FLASH_POLICY, "value", "auto")
    monkeypatch.setattr(wa.WINDOW, "_warned", wa.WINDOW._warned)  # the one-time CPU reference warning


@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in flash_attn, counted as available, allowed on CPU and in fp32/fp64 too. Yields its calls."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module(calls))
    monkeypatch.setitem(registry._STATUS, "flash_attn", None)
    monkeypatch.setattr(wa, "_FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(wa, "_FLASH_DTYPES", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    return calls


def _inputs(hw, heads=3, hd=8, b=2, dtype=torch.float64, pad=True, fused=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fused:  # views of one qkv map, as the patches pass them
        qkv = torch.randn(b, *hw, 3, heads, hd, generator=g, dtype=dtype).requires_grad_()
        q, k, v = qkv.unbind(3)
        leaves = [qkv]
    else:
        q, k, v = (torch.randn(b, *hw, heads, hd, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
        leaves = [q, k, v]
    pad_value = torch.randn(3, heads, hd, generator=g, dtype=dtype).requires_grad_() if pad else None
    if pad_value is not None:
        leaves.append(pad_value)
    return q, k, v, pad_value, leaves


CASES = [((14, 14), (7, 7)), ((13, 20), (7, 9)), ((5, 6), (7, 7)), ((14, 14), (8, 8)), ((13, 20), (8, 8)),
         ((5, 6), (7, 9))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("order", ["roll_pad", "pad_roll"])
@pytest.mark.parametrize("shifted", [False, True], ids=["shift0", "shift-nomask"])
@pytest.mark.parametrize("hw,window", CASES, ids=[f"{h}x{w}-w{a}x{b}" for (h, w), (a, b) in CASES])
def test_forced_flash_route_matches_reference(fake_flash, hw, window, shifted, order, dtype):
    shift = (window[0] // 2, window[1] // 2) if shifted else (0, 0)
    pad = hw[0] % 2 == 1 or shifted  # with and without pad_value across the cases
    q, k, v, pad_value, leaves = _inputs(hw, dtype=dtype, pad=pad)
    kw = dict(window_size=window, shift_size=shift, pad_value=pad_value, shift_mask=False, order=order)
    out = mmfast.functional.window_attention(q, k, v, impl="flash_attn", **kw)
    want = ref.window_attention(q, k, v, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    gout = torch.randn_like(out)
    # with no padded token pad_value is not used (the reference leaves it out of the graph)
    got_g = torch.autograd.grad(out, leaves, gout, allow_unused=True)
    want_g = torch.autograd.grad(want, leaves, gout, allow_unused=True)
    for leaf, a, b in zip(leaves, got_g, want_g):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    # one flash_attn_func call on [B * nW, Wh * Ww, heads, head_dim], no dropout, not causal
    n_win = 2 * (-(-hw[0] // window[0])) * (-(-hw[1] // window[1]))
    assert len(fake_flash) == 1
    call = fake_flash[0]
    assert call["shape"] == (n_win, window[0] * window[1], 3, 8)
    assert call["dropout_p"] == 0.0 and call["causal"] is False
    assert call["softmax_scale"] == pytest.approx(8**-0.5)


def test_fused_qkv_views_scale_and_deterministic(fake_flash, monkeypatch):
    q, k, v, pad_value, leaves = _inputs((9, 11), heads=2, hd=16, fused=True)
    kw = dict(window_size=(4, 5), shift_size=(2, 1), pad_value=pad_value, scale=0.3, shift_mask=False)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = mmfast.functional.window_attention(q, k, v, impl="flash_attn", **kw)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    want = ref.window_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, gout), torch.autograd.grad(want, leaves, gout)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fake_flash[0]["softmax_scale"] == 0.3 and fake_flash[0]["deterministic"] is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_through_the_route(fake_flash, monkeypatch, dtype):
    monkeypatch.setattr(wa, "_FLASH_DTYPES", (torch.float16, torch.bfloat16))  # the real tuple
    q, k, v, pad_value, _ = _inputs((14, 14), heads=2, hd=32, dtype=torch.float32)
    q, k, v, pad_value = (t.detach().to(dtype) for t in (q, k, v, pad_value))
    out = mmfast.functional.window_attention(q, k, v, window_size=8, pad_value=pad_value, impl="flash_attn")
    want = ref.window_attention(q.double(), k.double(), v.double(), window_size=8, pad_value=pad_value.double())
    assert out.dtype == dtype and fake_flash[0]["dtype"] == dtype
    assert (out.double() - want).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_use_backend_context_forces_only_the_attention(fake_flash):
    # a context forcing flash_attn for every op must not reach the partition op the route calls
    q, k, v, _, _ = _inputs((7, 9), pad=False)
    with mmfast.use_backend("flash_attn"):
        out = mmfast.functional.window_attention(q, k, v, window_size=(4, 3))
    with mmfast.use_backend("flash_attn", ops=["window_attention"]):
        out2 = mmfast.functional.window_attention(q, k, v, window_size=(4, 3))
    want = ref.window_attention(q, k, v, window_size=(4, 3))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out2, want, rtol=1e-12, atol=1e-12)
    assert len(fake_flash) == 2


def _select(q, k, v, window=(7, 7), shift=(0, 0), bias=None, logit_scale=None, shift_mask=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time "runs the reference on CPU" warning
        return wa.WINDOW.select(wa.WindowInputs(q, k, v, window, shift, bias, logit_scale, shift_mask))


def test_auto_dispatch_follows_policy_and_inputs(fake_flash, monkeypatch):
    q, k, v, _, _ = _inputs((14, 14), pad=False)
    table = torch.zeros(169, 3, dtype=torch.float64)
    cpp_status = registry._STATUS["cpp"]
    # default "auto": after our own kernel, before the reference
    assert wa.flash_attn_policy() == "auto"
    assert _select(q, k, v) == ("cpp" if HAS_CPP_KERNEL else "flash_attn")
    monkeypatch.setitem(registry._STATUS, "cpp", "disabled for this test")
    assert _select(q, k, v) == "flash_attn"
    assert _select(q, k, v, bias=table) == "reference"
    assert _select(q, k, v, shift=(3, 3)) == "reference"  # shift mask in effect
    assert _select(q, k, v, shift=(3, 3), shift_mask=False) == "flash_attn"
    monkeypatch.setitem(registry._STATUS, "cpp", cpp_status)
    # "always": first, for qualifying inputs only
    prev = wa.set_flash_attn_policy("always")
    assert prev == "auto" and wa.flash_attn_policy() == "always"
    assert _select(q, k, v) == "flash_attn"
    assert _select(q, k, v, logit_scale=torch.ones(3, dtype=torch.float64)) == CPU_DEFAULT
    assert _select(q.float(), k.float(), v.float()) == "flash_attn"
    monkeypatch.setattr(wa, "_FLASH_DTYPES", (torch.float16, torch.bfloat16))
    assert _select(q, k, v) == CPU_DEFAULT  # fp64 does not qualify
    monkeypatch.setattr(wa, "_FLASH_DTYPES", (torch.float32, torch.float64))
    # the whole call goes through it
    out = mmfast.functional.window_attention(q, k, v, window_size=7)
    assert len(fake_flash) == 1
    torch.testing.assert_close(out, ref.window_attention(q, k, v, window_size=7), rtol=1e-12, atol=1e-12)
    # auto_backend (no inputs to check) never reports the input-dependent flash_attn
    assert wa.WINDOW.auto_backend("cpu") == CPU_DEFAULT
    # device types outside _FLASH_DEVICE_TYPES never see it
    monkeypatch.setattr(wa, "_FLASH_DEVICE_TYPES", ("cuda",))
    assert _select(q, k, v) == CPU_DEFAULT
    monkeypatch.setattr(wa, "_FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    # "never": only when forced
    wa.set_flash_attn_policy("never")
    assert _select(q, k, v) == CPU_DEFAULT
    monkeypatch.setitem(registry._STATUS, "cpp", "disabled for this test")
    assert _select(q, k, v) == "reference"
    assert wa.WINDOW.select(wa.WindowInputs(q, k, v, (7, 7), (0, 0), None, None, True), "flash_attn") == "flash_attn"
    with pytest.raises(ValueError, match="policy must be one of"):
        wa.set_flash_attn_policy("sometimes")


def test_policy_from_environment(monkeypatch):
    for value, want in (("never", "never"), ("ALWAYS", "always"), ("", "auto"), ("auto", "auto")):
        monkeypatch.setenv("MMFAST_WINDOW_FLASH", value)
        assert wa._policy_from_env() == want
    monkeypatch.setenv("MMFAST_WINDOW_FLASH", "fast")
    with pytest.warns(RuntimeWarning, match="MMFAST_WINDOW_FLASH"):
        assert wa._policy_from_env() == "auto"
    monkeypatch.delenv("MMFAST_WINDOW_FLASH")
    assert wa._policy_from_env() == "auto"


@pytest.mark.parametrize("kind,match", [
    ("bias", "rel_pos_bias is given"),
    ("logit_scale", "logit_scale is given"),
    ("shift_mask", r"the shift mask is in effect \(shift_size \(3, 3\)"),
    ("head_dim12", "head_dim <= 256 and a multiple of 8, got 12"),
    ("head_dim264", "head_dim <= 256 and a multiple of 8, got 264"),
    ("dtype", "flash-attn takes float16 / bfloat16, got float64"),
    ("device", "flash-attn takes tensors on cuda, got cpu"),
])
def test_forced_flash_route_errors_name_the_reason(fake_flash, monkeypatch, kind, match):
    hd = {"head_dim12": 12, "head_dim264": 264}.get(kind, 8)
    q, k, v, _, _ = _inputs((7, 7), heads=3, hd=hd, b=1, pad=False)
    kw: dict = dict(window_size=7)
    if kind == "bias":
        kw["rel_pos_bias"] = torch.zeros(169, 3, dtype=torch.float64)
    elif kind == "logit_scale":
        kw["logit_scale"] = torch.ones(3, dtype=torch.float64)
    elif kind == "shift_mask":
        kw["shift_size"] = 3
    elif kind == "dtype":
        monkeypatch.setattr(wa, "_FLASH_DTYPES", (torch.float16, torch.bfloat16))
    elif kind == "device":
        monkeypatch.setattr(wa, "_FLASH_DEVICE_TYPES", ("cuda",))
    with pytest.raises(RuntimeError,
                       match=r"impl='flash_attn' cannot run these inputs\. inputs: q=.*\| flash_attn: .*" + match):
        mmfast.functional.window_attention(q, k, v, impl="flash_attn", **kw)
    assert not fake_flash


def test_several_reasons_listed_together(fake_flash):
    q, k, v, _, _ = _inputs((7, 7), hd=12, b=1, pad=False)
    with pytest.raises(RuntimeError) as info:
        mmfast.functional.window_attention(q, k, v, window_size=7, shift_size=3, impl="flash_attn",
                                           rel_pos_bias=torch.zeros(169, 3, dtype=torch.float64),
                                           logit_scale=torch.ones(3, dtype=torch.float64))
    msg = str(info.value)
    for part in ("head_dim", "rel_pos_bias", "logit_scale", "shift mask"):
        assert part in msg, msg


def test_too_many_windows_for_flash_grid(fake_flash, monkeypatch):
    monkeypatch.setattr(wa, "_FLASH_MAX_WINDOWS", 7)
    q, k, v, _, _ = _inputs((8, 8), b=2, pad=False)
    assert wa.flash_attn_reasons(q, k, v, (4, 4)) == ["8 windows (B * nW) in one call: flash-attn's grid takes "
                                                      "at most 7"]
    assert wa.flash_attn_reasons(q, k, v, (8, 4)) == []


def test_unavailable_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails even where flash-attn is installed
    ok, detail = _ext.flash_attn_status()
    assert not ok and "flash_attn is not installed" in detail and "ModuleNotFoundError" in detail
    b = _ext.backends()["flash_attn"]
    assert b == {"available": False, "detail": detail}
    monkeypatch.setitem(registry._STATUS, "flash_attn", detail)
    q, k, v, _, _ = _inputs((7, 7), b=1, pad=False)
    with pytest.raises(RuntimeError,
                       match=r"impl='flash_attn' cannot run these inputs.* flash_attn: flash_attn is not installed"):
        mmfast.functional.window_attention(q, k, v, window_size=7, impl="flash_attn")
    # "always" with no flash_attn: auto quietly uses the others
    monkeypatch.setitem(wa._FLASH_POLICY, "value", "always")
    assert _select(q, k, v) == CPU_DEFAULT
    # a flash_attn without flash_attn_func is not usable either
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_module([], with_func=False))
    ok, detail = _ext.flash_attn_status()
    assert not ok and "has no flash_attn_func" in detail


def test_process_status_matches_this_install():
    # read once at import, as every backend: what this process saw
    ok, detail = _ext.flash_attn_status()
    assert registry.backend_unavailable_reason("flash_attn") == (None if ok else detail)
    assert "flash_attn" in registry.BACKENDS and set(mmfast.backends()) >= {"flash_attn"}


def test_available_with_the_stand_in(fake_flash):
    ok, detail = _ext.flash_attn_status()
    assert ok and detail == "flash_attn 0.0.0+mmfast-test-stand-in"
    assert _ext.backends()["flash_attn"] == {"available": True, "detail": detail}


def test_info_lists_the_backend():
    res = subprocess.run([sys.executable, "-m", "mmfast.info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    line = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("flash_attn ")]
    assert len(line) == 1, res.stdout
    ok, detail = _ext.flash_attn_status()
    assert ("yes" if ok else "no") in line[0] and detail in line[0]
    assert "window_attention" in res.stdout


# ------------------------------------------------------------------------------------------------
# the benchmark case's flash-attn providers


def test_bench_flash_providers(fake_flash, monkeypatch):
    from mmfast.bench.cases import window as wcase

    case = wcase.WindowCase()
    opts = case.options(["--shapes", "gpu"])
    vit = [c for c in case.configs("cpu", True, opts) if c.get("stage") == "vitdet14"]
    swin = [c for c in case.configs("cpu", True, opts) if c.get("stage") == "s1"]
    assert vit and swin and all(wcase.flash_config(c) for c in vit) and not any(wcase.flash_config(c) for c in swin)
    names = lambda cfg, dev, o=opts: [p.name for p in case.providers(cfg, dev, o)]  # noqa: E731
    # CUDA with flash_attn: both providers on the no-bias windowed-ViT configurations only
    assert {"flash-attn", "mmfast[flash_attn]"} <= set(names(vit[0], "cuda"))
    assert not {"flash-attn", "mmfast[flash_attn]"} & set(names(swin[0], "cuda"))
    # --impl flash_attn: one mmfast[flash_attn], and never on a configuration it cannot run
    o2 = case.options(["--shapes", "gpu", "--impl", "auto,flash_attn"])
    assert names(vit[0], "cuda", o2).count("mmfast[flash_attn]") == 1
    assert "mmfast[flash_attn]" not in names(swin[0], "cuda", o2)
    # CPU: not offered, with a note
    assert not {"flash-attn", "mmfast[flash_attn]"} & set(names(vit[0], "cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert any("flash-attn runs on CUDA only" in n for n in case.check(opts))
    # without flash_attn: not offered, the note says why
    monkeypatch.setitem(registry._STATUS, "flash_attn", "flash_attn is not installed (test)")
    assert not {"flash-attn", "mmfast[flash_attn]"} & set(names(vit[0], "cuda"))
    assert any("flash_attn is not installed (test)" in n for n in case.check(opts))


def test_bench_flash_window_attention_matches_reference(fake_flash):
    # the "flash-attn" provider's function (plain-torch partition, zero padding) against the reference
    from mmfast.bench.cases.window import flash_window_attention

    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 13, 20, 3, 2, 8, generator=g, dtype=torch.float64)
    for window, shift in (((7, 7), (0, 0)), ((7, 9), (3, 4)), ((16, 16), (0, 0))):
        out = flash_window_attention(qkv, window, shift, 0.25)
        q, k, v = qkv.unbind(3)
        want = ref.window_attention(q, k, v, window_size=window, shift_size=shift, scale=0.25, shift_mask=False)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# the real thing (benchmarks/gpu_check.sh runs `pytest -m gpu`); skipped without flash-attn


@pytest.mark.gpu
@pytest.mark.optional_dep("flash_attn")
@pytest.mark.parametrize("order", ["roll_pad", "pad_roll"])
def test_real_flash_attn_on_cuda(order):
    why = registry.backend_unavailable_reason("flash_attn")
    if why is not None:
        pytest.skip(why)
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (8, 0):
        pytest.skip("flash-attn 2 needs sm80+")
    g = torch.Generator(device=dev).manual_seed(0)
    b, hw, heads, hd, window = 2, (30, 33), 4, 64, (14, 14)  # padded to 42 x 42, ViTDet-style windows
    qkv = torch.randn(b, *hw, 3, heads, hd, generator=g, device=dev).to(torch.bfloat16).requires_grad_()
    pad = torch.randn(3, heads, hd, generator=g, device=dev).to(torch.bfloat16).requires_grad_()
    q, k, v = qkv.unbind(3)
    for shift, shift_mask in (((0, 0), True), ((7, 7), False)):
        kw = dict(window_size=window, shift_size=shift, pad_value=pad, shift_mask=shift_mask, order=order)
        out = mmfast.functional.window_attention(q, k, v, impl="flash_attn", **kw)
        leaves = [x.detach().double().requires_grad_() for x in (qkv, pad)]
        want = ref.window_attention(*leaves[0].unbind(3), **{**kw, "pad_value": leaves[1]})
        assert out.dtype == torch.bfloat16
        assert (out.double() - want).abs().max().item() < 3e-2
        gout = torch.randn(out.shape, generator=g, device=dev).to(torch.bfloat16)
        got = torch.autograd.grad(out, [qkv, pad], gout)
        exp = torch.autograd.grad(want, leaves, gout.double())
        for a, e in zip(got, exp):
            assert (a.double() - e).abs().max().item() <= 3e-2 * max(1.0, e.abs().max().item())
