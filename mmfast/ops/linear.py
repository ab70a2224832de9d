"""Linear layers with a fused epilogue for CPU inference (``mmfast.functional.linear``; the ToMe
patches' merging blocks run their linears through it).

On CPU, in float32, when no gradient is needed, ``linear_wb(x, weight, bias, gelu=...)`` runs oneDNN's
matmul with the bias (and the exact-erf GELU of ``fc1 -> GELU``) applied in the GEMM's epilogue
(``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits for the same
pattern). Against ``F.linear`` + ``F.gelu`` that removes the bias broadcast copy and the separate
GELU pass, and oneDNN's sgemm is faster than the default BLAS at the small, shrinking token counts
of a merged ViT (measured on this project's CPU machine: ``python -m mmfast.bench tome``).
Everywhere else (training, CUDA, other dtypes, a torch build without the op) it is exactly
``F.linear`` (+ ``F.gelu``), and so it is under
``mmfast.use_backend("reference")`` (or ``use_backend("reference", ops=["fused_linear"])``).

The results differ from ``F.linear``'s by rounding only (a different GEMM summation order: a few
ulps); the availability of the op is probed once, against ``F.linear``, on first use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.ops import registry

__all__ = ["linear_wb", "onednn_available"]

_PROBE: dict[str, bool] = {}


def onednn_available() -> bool:
    """Whether oneDNN's fused linear runs here and agrees with ``F.linear`` (probed once)."""
    if "ok" not in _PROBE:
        ok = False
        try:
            if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
                g = torch.Generator().manual_seed(0)
                x, w, b = (torch.randn(5, 24, generator=g), torch.randn(40, 24, generator=g),
                           torch.randn(40, generator=g))
                with torch.no_grad():
                    y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                    z = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
                ok = (torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
                      and torch.allclose(z, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5))
        except Exception:  # noqa: BLE001 - any failure means: not available
            ok = False
        _PROBE["ok"] = ok
    return _PROBE["ok"]


def _fusable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # Under torch.compile, Inductor makes the same oneDNN fusion itself, and only for weights it can
    # treat as graph constants: calling the op directly would break its weight prepacking.
    return (not torch.compiler.is_compiling()
            and registry.forced_backend("fused_linear") != "reference"
            and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and onednn_available())


def linear_wb(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` (then exact GELU if ``gelu``), fused by oneDNN on CPU fp32 inference."""
    if _fusable(x, weight, bias):
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
