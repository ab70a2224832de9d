"""Token merging ops: fused matching and size-weighted merge, with dispatch and autograd.

``bipartite_soft_matching`` returns ToMe-compatible ``(merge, unmerge)`` callables that carry the
matching (``unm_idx``, ``src_idx``, ``dst_idx``), so that :func:`merge_wavg` can run the fused merge
kernel (one read and one write of x, fp32 accumulation, deterministic segmented sums) instead of
ToMe's chain of gathers, scatter_reduce and divides. Any other use of ``merge(x, mode)`` runs the
reference gather/scatter path with the same indices, so the semantics are ToMe's in every case.

``proportional_attention`` is ToMe's attention with the ``log(size)`` key bias computed straight
from the fused qkv projection output; on CPU, when no gradient is needed, it runs one C++ kernel
(``mmfast::tome_attention``: no q/k/v copies, no materialised bias, output in the projection's
layout). Everywhere else (CUDA, training) the patches keep SDPA with an additive mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from mmfast.ops.registry import Backend, Inputs, OpSpec, register
from mmfast.reference import tome as ref


def _has(op: str) -> bool:
    return hasattr(torch.ops.mmfast, op)


@dataclass(frozen=True)
class TokenInputs(Inputs):
    """What decides the backend of matching and merging: the metric (matching) or the tokens (merge)."""

    x: Tensor


@dataclass(frozen=True)
class AttnInputs(Inputs):
    """What decides the backend of proportional attention."""

    qkv: Tensor
    log_size: Tensor | None
    num_heads: int
    needs_grad: bool


def _cpp_checks(inputs: Inputs) -> list[str]:
    reasons = []
    if inputs.device.type != "cpu":
        reasons.append("the C++ kernel takes CPU tensors")
    if not _has("tome_match"):
        reasons.append("this build of mmfast._C has no tome kernels")
    return reasons


def _triton_checks(inputs: TokenInputs) -> list[str]:
    try:
        from mmfast.triton import tome as tk
    except Exception as exc:  # noqa: BLE001 - reported as a reason
        return [f"mmfast.triton.tome failed to import: {exc}"]
    reasons = list(tk.not_supported_reasons(inputs.x))
    if inputs.x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        reasons.append("CPU tensors need TRITON_INTERPRET=1")
    return reasons


def _match_cpp(metric, r, class_token, distill_token):
    return torch.ops.mmfast.tome_match(metric, r, class_token, distill_token)


def _match_triton(metric, r, class_token, distill_token):
    from mmfast.triton import tome as tk

    return tk.tome_match(metric, r, class_token=class_token, distill_token=distill_token)


def _merge_cpp(x, size, unm, src, dst):
    return torch.ops.mmfast.tome_merge_wavg(x, size, unm, src, dst)


def _merge_triton(x, size, unm, src, dst):
    from mmfast.triton import tome as tk

    return tk.tome_merge_wavg(x, size, unm, src, dst)


def _merge_bwd_cpp(gx, gs, x, size, unm, src, dst):
    return torch.ops.mmfast.tome_merge_wavg_bwd(gx, gs, x, size, unm, src, dst)


def _merge_bwd_triton(gx, gs, x, size, unm, src, dst):
    from mmfast.triton import tome as tk

    return tk.tome_merge_wavg_bwd(gx, gs, x, size, unm, src, dst)


def _register_fakes() -> None:
    if not _has("tome_match"):
        return

    @torch.library.register_fake("mmfast::tome_match")
    def _(metric, r, class_token=False, distill_token=False):
        b, n, _ = metric.shape
        r_eff = ref.effective_r(n, r, class_token, distill_token)
        n_a = (n + 1) // 2
        idx = dict(dtype=torch.int64, device=metric.device)
        return metric.new_empty(b, n_a - r_eff, **idx), metric.new_empty(b, r_eff, **idx), \
            metric.new_empty(b, r_eff, **idx)


    @torch.library.register_fake("mmfast::tome_attention")
    def _(qkv, log_size, num_heads, scale):
        b, n, c3 = qkv.shape
        return qkv.new_empty(b, n, c3 // 3)


_register_fakes()

def _ref_merge(x, size, unm, src, dst):
    return ref.merge_wavg(lambda t, mode="mean": ref.merge_by_indices(t, unm, src, dst, mode), x, size)


# matching: ``(metric, r, class_token, distill_token) -> (unm_idx, src_idx, dst_idx)``, no gradient.
MATCH = register(OpSpec("tome_match", {
    "cpp": Backend(_match_cpp, check=_cpp_checks),
    "triton": Backend(_match_triton, check=_triton_checks),
    "reference": Backend(ref.matching_indices),
}))
# size-weighted merge: forward ``(x, size, unm, src, dst) -> (x', size')``; backward
# ``(grad_x', grad_size', x, size, unm, src, dst) -> (grad_x, grad_size)`` (the kernels run inside
# mmfast::tome_merge_fused, the reference is differentiable torch).
MERGE = register(OpSpec("tome_merge_wavg", {
    "cpp": Backend(_merge_cpp, _merge_bwd_cpp, _cpp_checks),
    "triton": Backend(_merge_triton, _merge_bwd_triton, _triton_checks),
    "reference": Backend(_ref_merge),
}))


def _needs_grad(qkv: Tensor, log_size: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (qkv.requires_grad or (log_size is not None and log_size.requires_grad))


def _attn_cpp_checks(inputs: AttnInputs) -> list[str]:
    reasons = _cpp_checks(inputs)
    if not _has("tome_attention"):
        reasons.append("this build of mmfast._C has no tome_attention kernel")
    if inputs.needs_grad:
        reasons.append("the fused kernel has no backward (inference only) and these inputs require grad")
    return reasons


def _attn_reference(qkv: Tensor, log_size: Tensor | None, num_heads: int, scale: float) -> Tensor:
    b, n, c3 = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * scale) @ k.transpose(-2, -1)
    if log_size is not None:
        logits = logits + log_size[:, None, None, :].to(logits.dtype)
    return (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c3 // 3)


def _attn_cpp(qkv: Tensor, log_size: Tensor | None, num_heads: int, scale: float) -> Tensor:
    return torch.ops.mmfast.tome_attention(qkv, log_size, num_heads, scale)


# ``(qkv, log_size, num_heads, scale) -> out``; the C++ kernel has no backward, so its check admits
# only inputs that need no gradient, and the differentiable reference takes the rest.
ATTENTION = register(OpSpec("tome_attention", {
    "cpp": Backend(_attn_cpp, check=_attn_cpp_checks),
    "reference": Backend(_attn_reference),
}))


def proportional_attention(qkv: Tensor, log_size: Tensor | None, num_heads: int, scale: float | None = None,
                           impl: str | None = None) -> Tensor:
    """ToMe's proportional attention from a fused qkv projection output.

    Args:
        qkv: ``[B, N, 3 * C]``, the last dim laid out ``[3, num_heads, head_dim]`` (timm's and
            open_clip's ``qkv`` linear output).
        log_size: ``[B, N]`` key bias (``log`` of the token sizes) or ``None``.
        num_heads: heads; ``C`` must be divisible by it.
        scale: logit scale, default ``head_dim ** -0.5``.
        impl: backend (``cpp``: inference only, CPU; ``reference``: differentiable torch).

    Returns:
        ``[B, N, C]``: ``softmax((q * scale) @ k^T + log_size) @ v`` with the heads concatenated.
    """
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, N, 3 * C], got shape {tuple(qkv.shape)}")
    if num_heads <= 0 or qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"qkv's last dim ({qkv.shape[2]}) must be 3 * num_heads * head_dim, num_heads={num_heads}")
    if log_size is not None and (log_size.dim() != 2 or tuple(log_size.shape) != tuple(qkv.shape[:2])):
        raise ValueError(f"log_size must be [B, N] = {list(qkv.shape[:2])}, got {tuple(log_size.shape)}")
    scale = float(scale) if scale is not None else (qkv.shape[2] // (3 * num_heads)) ** -0.5
    inputs = AttnInputs(qkv, log_size, num_heads, _needs_grad(qkv, log_size))
    return ATTENTION.backend(ATTENTION.select(inputs, impl)).forward(qkv, log_size, num_heads, scale)


def fused_attention_or_none(qkv: Tensor, log_size: Tensor | None, num_heads: int, scale: float) -> Tensor | None:
    """What the ToMe patches call: the C++ kernel's output when it applies to these inputs (CPU, no
    gradient needed, not forced to the reference by ``impl``/``use_backend``, kernel built), else
    ``None`` and the caller runs its own (SDPA or explicit) attention."""
    if qkv.device.type != "cpu" or _needs_grad(qkv, log_size):
        return None
    backend = ATTENTION.select(AttnInputs(qkv, log_size, num_heads, False))
    if backend == "reference":
        return None
    return ATTENTION.backend(backend).forward(qkv, log_size, num_heads, scale)


class Merge:
    """``merge(x, mode="mean") -> [B, N - r, C]`` with ToMe's semantics; holds its matching."""

    def __init__(self, unm_idx: Tensor | None, src_idx: Tensor | None, dst_idx: Tensor | None, batch: int,
                 num_tokens: int, r: int, impl: str | None):
        self.unm_idx, self.src_idx, self.dst_idx = unm_idx, src_idx, dst_idx
        self.batch, self.num_tokens, self.r, self.impl = batch, num_tokens, r, impl

    def _check(self, x: Tensor, n: int, what: str) -> None:
        if x.dim() != 3 or x.shape[0] != self.batch or x.shape[1] != n:
            raise ValueError(f"{what}: x must be [{self.batch}, {n}, C] to match the metric, got {tuple(x.shape)}")

    def __call__(self, x: Tensor, mode: str = "mean") -> Tensor:
        if mode not in ref.MERGE_MODES:
            raise ValueError(f"mode must be one of {ref.MERGE_MODES}, got {mode!r}")
        self._check(x, self.num_tokens, "merge")
        if self.r == 0:
            return x
        return ref.merge_by_indices(x, self.unm_idx, self.src_idx, self.dst_idx, mode)


class Unmerge:
    """``unmerge(x [B, N - r, C]) -> [B, N, C]``: every merged token gets its destination's value."""

    def __init__(self, merge: Merge):
        self.m = merge

    def __call__(self, x: Tensor) -> Tensor:
        m = self.m
        m._check(x, m.num_tokens - m.r, "unmerge")
        if m.r == 0:
            return x
        return ref.unmerge_by_indices(x, m.unm_idx, m.src_idx, m.dst_idx, m.num_tokens)


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False, distill_token: bool = False,
                            impl: str | None = None) -> tuple[Merge, Unmerge]:
    bsz, n, _ = ref.check_metric(metric)
    r = ref.effective_r(n, r, class_token, distill_token)
    if r == 0:
        m = Merge(None, None, None, bsz, n, 0, impl)
        return m, Unmerge(m)
    backend = MATCH.select(TokenInputs(metric), impl)
    with torch.no_grad():
        unm, src, dst = MATCH.backend(backend).forward(metric.detach(), r, class_token, distill_token)
    m = Merge(unm, src, dst, bsz, n, r, impl)
    return m, Unmerge(m)


@torch.library.custom_op("mmfast::tome_merge_fused", mutates_args=())
def tome_merge_op(x: Tensor, size: Tensor | None, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, impl: str
                  ) -> tuple[Tensor, Tensor]:
    """(merged x [B, N - r, C] in x.dtype, merged size [B, N - r, 1])."""
    out, new_size = MERGE.backend(impl).forward(x, size, unm_idx, src_idx, dst_idx)
    return out.to(x.dtype), new_size


@tome_merge_op.register_fake
def _(x, size, unm_idx, src_idx, dst_idx, impl):
    b, n, c = x.shape
    m = n - src_idx.shape[1]
    sdt = size.dtype if size is not None else x.dtype
    return x.new_empty(b, m, c), x.new_empty(b, m, 1, dtype=sdt)


@torch.library.custom_op("mmfast::tome_merge_fused_backward", mutates_args=())
def tome_merge_backward_op(grad_x: Tensor, grad_size: Tensor | None, x: Tensor, size: Tensor | None,
                           unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    gx, gs = MERGE.backend(impl).backward(grad_x, grad_size, x, size, unm_idx, src_idx, dst_idx)
    return gx.to(x.dtype), (gs.to(size.dtype) if size is not None else x.new_empty(0))


@tome_merge_backward_op.register_fake
def _(grad_x, grad_size, x, size, unm_idx, src_idx, dst_idx, impl):
    return torch.empty_like(x), (torch.empty_like(size) if size is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, size, unm, src, dst, impl = inputs
    ctx.save_for_backward(x, size, unm, src, dst)
    ctx.impl = impl


def _backward(ctx, grad_x, grad_size):
    x, size, unm, src, dst = ctx.saved_tensors
    gx, gs = tome_merge_backward_op(grad_x.contiguous(), grad_size.contiguous() if grad_size is not None else None,
                                    x, size, unm, src, dst, ctx.impl)
    return gx, (gs if size is not None else None), None, None, None, None


tome_merge_op.register_autograd(_backward, setup_context=_setup)


def merge_wavg(merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted merge: (x', size') = (merge(x * size, "sum") / merge(size, "sum"), merge(size, "sum")).

    Runs the fused kernel when ``merge`` comes from :func:`bipartite_soft_matching`; any other
    ToMe-style callable takes the reference path.
    """
    if not isinstance(merge, Merge):
        return ref.merge_wavg(merge, x, size)
    merge._check(x, merge.num_tokens, "merge_wavg")
    if size is not None and (size.dim() != 3 or size.shape[:2] != x.shape[:2] or size.shape[2] != 1):
        raise ValueError(f"size must be [{x.shape[0]}, {x.shape[1]}, 1], got {tuple(size.shape)}")
    if merge.r == 0:
        return x, (size if size is not None else x.new_ones(x.shape[0], x.shape[1], 1))
    backend = MERGE.select(TokenInputs(x), merge.impl)
    entry = MERGE.backend(backend)
    if entry.backward is None:  # differentiable torch: runs outside the custom op
        return entry.forward(x, size, merge.unm_idx, merge.src_idx, merge.dst_idx)
    return tome_merge_op(x, size, merge.unm_idx, merge.src_idx, merge.dst_idx, backend)


def merge_source(merge, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Which original tokens each merged token holds: [B, N - r, N0] 0/1 (ToMe's merge_source)."""
    return ref.merge_source(merge, x, source)
