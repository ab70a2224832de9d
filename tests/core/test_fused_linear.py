"""mmfast.ops.linear (mmfast.functional.linear; the patches' module form): oneDNN fused bias/GELU
linears used by the ToMe blocks on CPU inference.

Accuracy: the fused GEMM sums in a different order than the default BLAS, so results are compared
with STYLE.md's rule (within 2x plain PyTorch's fp32 error against float64); every fallback
(gradients wanted, other dtypes, forced reference, a non-plain layer) must be exactly F.linear.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.ops import linear as L
from mmfast.patch.tome_core import linear
from mmfast.patch.tome_timm import plain_gelu_mlp
from mmfast.testing import assert_accuracy

needs_onednn = pytest.mark.skipif(not L.onednn_available(), reason="oneDNN's _linear_pointwise is not usable here")


@pytest.fixture
def spy(monkeypatch):
    """Records whether each call took the fused path."""
    taken = []
    real = L._fusable

    def wrapped(*args):
        ok = real(*args)
        taken.append(ok)
        return ok

    monkeypatch.setattr(L, "_fusable", wrapped)
    return taken


def test_onednn_probe_matches_build():
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        assert L.onednn_available(), "oneDNN is built into torch here: the fused linear should be usable"


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 8), (3, 17, 40), (2, 197, 64)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_accuracy(spy, shape, gelu, bias):
    torch.manual_seed(0)
    layer = nn.Linear(shape[-1], 48, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        got = linear(x, layer, gelu=gelu)
        low = F.linear(x, layer.weight, layer.bias)
        high = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
        if gelu:
            low, high = F.gelu(low), F.gelu(high)
    assert spy == [True]
    assert got.shape == low.shape and got.dtype == torch.float32
    assert_accuracy(got, low, high, name=f"fused linear {shape} gelu={gelu} bias={bias}")


def test_fallbacks_are_exactly_f_linear(spy):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24)
    x = torch.randn(2, 5, 16)
    want = F.gelu(F.linear(x, layer.weight, layer.bias))
    # gradients wanted (the parameters require grad): plain F.linear, and gradients flow
    got = linear(x, layer, gelu=True)
    assert torch.equal(got, want) and got.requires_grad
    got.sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        with mmfast.use_backend("reference", ops=["fused_linear"]):
            assert torch.equal(linear(x, layer, gelu=True), want)
        with mmfast.use_backend("reference"):
            assert torch.equal(linear(x, layer), F.linear(x, layer.weight, layer.bias))
        h = x.half()
        assert torch.equal(L.linear_wb(h, layer.weight.half(), layer.bias.half()),
                           F.linear(h, layer.weight.half(), layer.bias.half()))
    assert spy == [False] * 4


def test_hooks_and_subclasses_are_respected():
    seen = []

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    sub = Scaled(8, 8)
    hooked = nn.Linear(8, 8)
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(linear(x, sub), sub(x))
        linear(x, hooked)
    assert seen == [torch.Size([3, 8])], "a hooked Linear runs its own forward (hooks fire)"


def test_plain_gelu_mlp():
    from timm.layers import Mlp

    assert plain_gelu_mlp(Mlp(8, 16).eval())
    assert plain_gelu_mlp(Mlp(8, 16, drop=0.1).eval()), "dropout is inactive in eval"
    assert not plain_gelu_mlp(Mlp(8, 16, drop=0.1).train())
    assert not plain_gelu_mlp(Mlp(8, 16, act_layer=lambda: nn.GELU(approximate="tanh")))
    assert not plain_gelu_mlp(Mlp(8, 16, act_layer=nn.ReLU))
    assert not plain_gelu_mlp(Mlp(8, 16, norm_layer=nn.LayerNorm))
    assert not plain_gelu_mlp(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)))


def test_functional_linear_is_the_fused_linear(spy):
    torch.manual_seed(0)
    w, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(4, 8)
    with torch.no_grad():
        got = mmfast.functional.linear(x, w, b, gelu=True)
    assert spy == [True] or not L.onednn_available()
    assert_accuracy(got, F.gelu(F.linear(x, w, b)), F.gelu(F.linear(x.double(), w.double(), b.double())),
                    name="functional.linear")
