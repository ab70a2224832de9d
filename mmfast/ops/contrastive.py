"""Contrastive-loss tile ops: fake (meta) registration, backend dispatch, and the W=1 custom op.

The kernels compute, for ``l = scale * a @ b.T + bias`` without materialising ``l``:

* ``softmax_stats``: row and column log-sum-exp and softmax-weighted mean logits;
* ``softmax_grads``: ``da = scale * Ga @ b``, ``db = scale * Gb.T @ a`` for
  ``G_ij = row_w_i * exp(l_ij - row_lse_i) + col_w_j * exp(l_ij - col_lse_j)``;
* ``sigmoid_rowsum``: ``sum_j softplus(l_ij)`` per row;
* ``sigmoid_grads``: the gradient of ``sum_ij row_w_i * softplus(l_ij)``.

Backends: ``cpp`` (torch.ops.mmfast.* C++ kernels on CPU tensors), ``triton`` (mmfast.triton
kernels on CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), ``reference`` (explicit logits in
pure torch: the oracle). The positive-pair terms of the losses are O(B*D) and are added in torch
by the callers (mmfast.functional, mmfast.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmfast.ops.registry import Backend, Inputs, OpSpec, register

# ----------------------------------------------------------------------------------------------
# fake (meta) kernels for the C++ ops, so they work with torch.compile and opcheck

def _stat_dtype(a: Tensor) -> torch.dtype:
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    from mmfast import _ext

    if not _ext.has_cpp():
        return

    @torch.library.register_fake("mmfast::contrastive_softmax_fwd")
    def _(a, b, scale, bias):
        dt = _stat_dtype(a)
        m, n = a.shape[0], b.shape[0]
        return (a.new_empty(m, dtype=dt), a.new_empty(m, dtype=dt), a.new_empty(n, dtype=dt),
                a.new_empty(n, dtype=dt))

    @torch.library.register_fake("mmfast::contrastive_softmax_bwd")
    def _(a, b, scale, bias, row_lse, col_lse, a_row_w, a_col_w, b_row_w, b_col_w):
        dt = _stat_dtype(a)
        return a.new_empty(a.shape, dtype=dt), b.new_empty(b.shape, dtype=dt)

    @torch.library.register_fake("mmfast::contrastive_sigmoid_fwd")
    def _(a, b, scale, bias):
        return a.new_empty(a.shape[0], dtype=_stat_dtype(a))

    @torch.library.register_fake("mmfast::contrastive_sigmoid_bwd")
    def _(a, b, scale, bias, row_w):
        dt = _stat_dtype(a)
        return (a.new_empty(a.shape, dtype=dt), b.new_empty(b.shape, dtype=dt), a.new_empty((), dtype=dt),
                a.new_empty((), dtype=dt))

    if hasattr(torch.ops.mmfast, "contrastive_sigmoid_fwd_bwd"):

        @torch.library.register_fake("mmfast::contrastive_sigmoid_fwd_bwd")
        def _(a, b, scale, bias, row_w):
            dt = _stat_dtype(a)
            return (a.new_empty(a.shape[0], dtype=dt), a.new_empty(a.shape, dtype=dt),
                    b.new_empty(b.shape, dtype=dt), a.new_empty((), dtype=dt), a.new_empty((), dtype=dt))


_register_fakes()

# ----------------------------------------------------------------------------------------------
# reference tiles (explicit logits; the oracle)


def _ref_logits(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    dt = _stat_dtype(a)
    logits = scale.to(dt).reshape(()) * (a.to(dt) @ b.to(dt).T)
    return logits + bias.to(dt).reshape(()) if bias is not None else logits


def _ref_softmax_fwd(a, b, scale, bias):
    lg = _ref_logits(a, b, scale, bias)
    return (torch.logsumexp(lg, 1), (lg.softmax(1) * lg).sum(1), torch.logsumexp(lg, 0), (lg.softmax(0) * lg).sum(0))


def _ref_softmax_bwd(a, b, scale, bias, row_lse, col_lse, a_row_w, a_col_w, b_row_w=None, b_col_w=None):
    dt = _stat_dtype(a)
    lg = _ref_logits(a, b, scale, bias)
    pr, pc = torch.exp(lg - row_lse.to(dt)[:, None]), torch.exp(lg - col_lse.to(dt)[None, :])
    ga = a_row_w.to(dt)[:, None] * pr + a_col_w.to(dt)[None, :] * pc
    gb = ga if b_row_w is None else b_row_w.to(dt)[:, None] * pr + b_col_w.to(dt)[None, :] * pc
    s = scale.to(dt).reshape(())
    return s * ga @ b.to(dt), s * gb.T @ a.to(dt)


def _ref_sigmoid_fwd(a, b, scale, bias):
    return torch.nn.functional.softplus(_ref_logits(a, b, scale, bias)).sum(1)


def _ref_sigmoid_bwd(a, b, scale, bias, row_w):
    dt = _stat_dtype(a)
    lg = _ref_logits(a, b, scale, bias)
    g = row_w.to(dt)[:, None] * torch.sigmoid(lg)
    s = scale.to(dt).reshape(())
    dots = a.to(dt) @ b.to(dt).T
    return s * g @ b.to(dt), s * g.T @ a.to(dt), (g * dots).sum(), g.sum()


# ----------------------------------------------------------------------------------------------
# the backend table


@dataclass(frozen=True)
class TileInputs(Inputs):
    """What decides the backend of a tile op: the two feature blocks (``a [M, D]``, ``b [N, D]``)."""

    a: Tensor
    b: Tensor


def _cpp_checks(inputs: TileInputs) -> list[str]:
    reasons = []
    if inputs.a.device.type != "cpu" or inputs.b.device.type != "cpu":
        reasons.append("the C++ kernel takes CPU tensors")
    return reasons


def _cpp_fused_checks(inputs: TileInputs) -> list[str]:
    reasons = _cpp_checks(inputs)
    if not hasattr(torch.ops.mmfast, "contrastive_sigmoid_fwd_bwd"):
        reasons.append("this build of mmfast._C has no contrastive_sigmoid_fwd_bwd")
    return reasons


def _triton_checks(inputs: TileInputs) -> list[str]:
    import os

    try:
        from mmfast.triton import contrastive as tk
    except ImportError as exc:
        return [f"mmfast.triton.contrastive failed to import: {exc}"]
    reasons = list(tk.not_supported_reasons(inputs.a, inputs.b))
    if inputs.a.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        reasons.append("CPU tensors need TRITON_INTERPRET=1")
    return reasons


def _triton(name: str):
    def run(*args):
        from mmfast.triton import contrastive as tk

        return getattr(tk, name)(*args)

    return run


def _cpp(name: str):
    return lambda *args: getattr(torch.ops.mmfast, f"contrastive_{name}")(*args)


def _fwd_then_bwd(fwd, bwd):
    """A backend without a fused forward + gradient pass: its forward, then its backward."""
    def run(a, b, scale, bias, row_w):
        return (fwd(a, b, scale, bias), *bwd(a, b, scale, bias, row_w))

    return run


def _tile_op(kind: str, reference_fwd, reference_bwd) -> OpSpec:
    """``contrastive_<kind>``: forward ``<kind>_fwd`` and backward ``<kind>_bwd`` from the C++ ops
    (``torch.ops.mmfast.contrastive_<kind>_fwd``), the Triton launchers and the reference."""
    return register(OpSpec(f"contrastive_{kind}", {
        "cpp": Backend(_cpp(f"{kind}_fwd"), _cpp(f"{kind}_bwd"), _cpp_checks),
        "triton": Backend(_triton(f"{kind}_fwd"), _triton(f"{kind}_bwd"), _triton_checks),
        "reference": Backend(reference_fwd, reference_bwd),
    }))


#: forward ``(a, b, scale, bias) -> (row_lse, row_mean_logit, col_lse, col_mean_logit)``; backward
#: ``(a, b, scale, bias, row_lse, col_lse, a_row_w, a_col_w, b_row_w, b_col_w) -> (da, db)``
SOFTMAX = _tile_op("softmax", _ref_softmax_fwd, _ref_softmax_bwd)
#: forward ``(a, b, scale, bias) -> rowsum``; backward ``(a, b, scale, bias, row_w) -> (da, db, dscale, dbias)``
SIGMOID = _tile_op("sigmoid", _ref_sigmoid_fwd, _ref_sigmoid_bwd)
#: forward ``(a, b, scale, bias, row_w) -> (rowsum, da, db, dscale, dbias)`` in one tile pass (C++: 3
#: GEMMs instead of 4); no backward of its own (it is one)
SIGMOID_FUSED = register(OpSpec("contrastive_sigmoid_fused", {
    "cpp": Backend(_cpp("sigmoid_fwd_bwd"), check=_cpp_fused_checks),
    "triton": Backend(_fwd_then_bwd(_triton("sigmoid_fwd"), _triton("sigmoid_bwd")), check=_triton_checks),
    "reference": Backend(_fwd_then_bwd(_ref_sigmoid_fwd, _ref_sigmoid_bwd)),
}))


def softmax_stats(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor | None, impl: str | None = None):
    """(row_lse [M], row_mean_logit [M], col_lse [N], col_mean_logit [N]) in fp32 (fp64 for fp64)."""
    return SOFTMAX.backend(SOFTMAX.select(TileInputs(a, b), impl)).forward(a, b, scale, bias)


def softmax_grads(a, b, scale, bias, row_lse, col_lse, a_row_w, a_col_w, b_row_w=None, b_col_w=None,
                  impl: str | None = None) -> tuple[Tensor, Tensor]:
    return SOFTMAX.backend(SOFTMAX.select(TileInputs(a, b), impl)).backward(
        a, b, scale, bias, row_lse, col_lse, a_row_w, a_col_w, b_row_w, b_col_w)


def sigmoid_rowsum(a, b, scale, bias, impl: str | None = None) -> Tensor:
    return SIGMOID.backend(SIGMOID.select(TileInputs(a, b), impl)).forward(a, b, scale, bias)


def sigmoid_grads(a, b, scale, bias, row_w, impl: str | None = None):
    return SIGMOID.backend(SIGMOID.select(TileInputs(a, b), impl)).backward(a, b, scale, bias, row_w)


def sigmoid_rowsum_and_grads(a, b, scale, bias, row_w, impl: str | None = None):
    """``(sigmoid_rowsum(...), *sigmoid_grads(...))`` in one tile pass where the backend has one."""
    return SIGMOID_FUSED.backend(SIGMOID_FUSED.select(TileInputs(a, b), impl)).forward(a, b, scale, bias, row_w)


def resolve_impl(a: Tensor, b: Tensor, impl: str | None) -> str:
    """The backend every tile op of one loss call will use (chosen once, so forward and backward
    run the same kernels). ``impl``: None / "auto" or a backend name (validated here)."""
    return SOFTMAX.select(TileInputs(a, b), impl)
