"""Triton kernels of ToMe token merging: fused bipartite matching and the size-weighted merge.

Installed as ``mmfast.triton.tome``. The oracle is :mod:`mmfast.reference.tome`; every function here
returns what the reference returns for the same inputs (indices exactly, values to rounding).

* :func:`tome_match` -- ``matching_indices``. One program per (batch item, block of ``BLOCK_A`` A
  tokens) normalises its rows, walks the B tokens in tiles of ``BLOCK_B`` and keeps an online row max
  and argmax, so the ``[N_A, N_B]`` score matrix never goes to memory. The selection (the stable
  descending sort of the ``[B, N_A]`` row maxima, the split into src / unmerged tokens and the
  class-token re-sort) is the reference's own torch code on that small vector.
* :func:`tome_merge_wavg` / :func:`tome_merge_wavg_bwd` -- ``merge_wavg`` and its gradient. One
  program per output token reads its own input token and the src tokens merged into it, found through a per-item
  CSR (srcs stably sorted by destination, offsets by ``searchsorted``) built with a few small torch
  ops, with no host synchronisation. Each output row, and in the backward each input-gradient row,
  is written by exactly one program: no atomics, bitwise-reproducible results. x is read once and
  written once (the backward re-reads a group's rows once more, while they are in cache).

Exactness of the matching. The row norms are the reference's own ``metric.norm(dim=-1)`` and the
kernel divides with a correctly rounded division and rounds to the metric's dtype, so the normalised
rows are bit-identical to the reference's. The dot products are accumulated in fp32 from exact
products (``input_precision="ieee"``: no TF32), then rounded to the metric's dtype as the reference's
score matrix is. Only their summation order differs from the reference's GEMM, by at most a few fp32
ulps (``|error| <= C * 2**-24`` for unit rows). So: for fp32 inputs the indices equal the reference's
unless two competing scores (a row's best two, or two rows' maxima at the sort positions that
matter) lie within that margin, which random inputs essentially never produce (the tests check
exact equality); exact ties (duplicated tokens, dyadic scores) are computed exactly and broken as
the reference breaks them. For fp16/bf16 inputs the fp32 sums can round to a neighbouring half value
when they sit within that margin of a rounding boundary, so an argmax or an order may differ only
between scores within one half-precision ulp of each other (near-ties).

Supported: fp16, bf16 and fp32 on CUDA tensors, or fp16 and fp32 on CPU tensors under the
interpreter (``TRITON_INTERPRET=1``; bf16 is computed wrongly there). See the
``*_not_supported_reasons`` functions.
"""

from __future__ import annotations

import torch

from ._device import interpreting as _interpreted
from ._device import jit as _jit
from ._device import on_tensor_device, tl, triton

__all__ = [
    "not_supported_reasons",
    "tome_match",
    "tome_match_not_supported_reasons",
    "tome_merge_wavg",
    "tome_merge_wavg_bwd",
    "tome_merge_wavg_bwd_not_supported_reasons",
    "tome_merge_wavg_not_supported_reasons",
]

#: Largest feature size of the backward, which keeps a whole row in one block (the size gradient is
#: a dot product over the row).
MAX_BWD_C = 8192

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@_jit
def _tome_match_kernel(
    m_ptr,
    norm_ptr,
    max_ptr,
    idx_ptr,
    n_a,
    n_b,
    c,
    stride_mb,
    stride_mn,
    stride_mc,
    stride_nb,
    stride_nn,
    CLASS_TOKEN: tl.constexpr,
    DISTILL_TOKEN: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < n_a
    m_base = m_ptr + pid_b * stride_mb
    tok_a = (2 * offs_a).to(tl.int64)
    norm_a = tl.load(norm_ptr + pid_b * stride_nb + tok_a * stride_nn, mask=mask_a, other=1.0).to(tl.float32)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int32)
    for b0 in range(0, n_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < n_b
        tok_b = (2 * offs_b + 1).to(tl.int64)
        norm_b = tl.load(norm_ptr + pid_b * stride_nb + tok_b * stride_nn, mask=mask_b, other=1.0).to(
            tl.float32
        )
        acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for c0 in range(0, c, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c
            a = tl.load(
                m_base + tok_a[:, None] * stride_mn + offs_c[None, :] * stride_mc,
                mask=mask_a[:, None] & mask_c[None, :],
                other=0.0,
            )
            b = tl.load(
                m_base + tok_b[:, None] * stride_mn + offs_c[None, :] * stride_mc,
                mask=mask_b[:, None] & mask_c[None, :],
                other=0.0,
            )
            # The reference's normalised rows: metric / norm, correctly rounded, in the metric's dtype.
            # Products of half values are exact in fp32, so an fp32 ieee dot of the upcast rows is the
            # half dot with fp32 accumulation (and avoids the interpreter's broken bf16 dot).
            a = tl.math.div_rn(a.to(tl.float32), norm_a[:, None]).to(m_ptr.dtype.element_ty).to(tl.float32)
            b = tl.math.div_rn(b.to(tl.float32), norm_b[:, None]).to(m_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        # The reference's score matrix is in the metric's dtype: round, then compare exactly.
        s = acc.to(m_ptr.dtype.element_ty).to(tl.float32)
        # NaN (a zero-norm token) ranks above every number, as in torch.argmax and torch.sort.
        s = tl.where(s != s, float("inf"), s)
        col_ok = mask_b
        if DISTILL_TOKEN:
            col_ok = col_ok & (offs_b != 0)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if CLASS_TOKEN:
            s = tl.where((offs_a == 0)[:, None], float("-inf"), s)
        tile_max = tl.max(s, axis=1)
        # Lowest index among the tile's maxima; an all -inf row (the class token) gets the tile's first
        # column, which tile 0 keeps: index 0, as torch.argmax gives.
        tile_idx = tl.min(tl.where(s == tile_max[:, None], offs_b[None, :], n_b + BLOCK_B), axis=1)
        # Strict >: an equal maximum in a later tile (higher indices) never replaces an earlier one.
        upd = tile_max > best
        best = tl.where(upd, tile_max, best)
        best_idx = tl.where(upd, tile_idx, best_idx)
    out = pid_b * n_a + offs_a
    tl.store(max_ptr + out, best, mask=mask_a)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=mask_a)


@_jit
def _group_of_rows(own_ptr, off_ptr, n_rows, n_out, BLOCK_T: tl.constexpr):
    """This program's BLOCK_T output tokens (rows ``b * n_out + t``) and their groups: output token t
    of item b is input token ``own`` reduced with the ``cnt`` src tokens ``src_tok[b, beg:beg + cnt]``
    (the CSR of :func:`_groups`). Returns ``(rows, mask_t, b, t, own, beg, cnt)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = rows < n_rows
    b = rows // n_out
    t = rows % n_out
    own = tl.load(own_ptr + rows, mask=mask_t, other=0)
    beg = tl.load(off_ptr + b * (n_out + 1) + t, mask=mask_t, other=0)
    cnt = tl.load(off_ptr + b * (n_out + 1) + t + 1, mask=mask_t, other=0) - beg
    return rows, mask_t, b, t, own, beg, cnt


@_jit
def _group_member(k, tok_base, cnt2, mask_t2, x_base, size_base, mask_c, stride_xn, stride_sn,
                  HAS_SIZE: tl.constexpr):
    """The k-th src token of every group of the block: ``(live, tok, x row, size)``, each [BLOCK_T, 1]
    but the row. The size is 1 without HAS_SIZE, and 0 where the group has fewer than k + 1 srcs.

    Everything is a [BLOCK_T, 1] column (token index, liveness, size), never a 1-D row: Triton 3.6's
    layout pass gave a 1-D masked load inside the callers' loops a mask layout that differs from its
    pointer's, and failed ("mask type matches ptr type") for sm_90a."""
    live = mask_t2 & (k < cnt2)
    tok = tl.load(tok_base + k, mask=live, other=0)
    v = tl.load(x_base + tok * stride_xn, mask=live & mask_c[None, :], other=0.0).to(tl.float32)
    s = live.to(tl.float32)
    if HAS_SIZE:
        s = tl.load(size_base + tok * stride_sn, mask=live, other=0.0).to(tl.float32)
    return live, tok, v, s


@_jit
def _group_wavg(x_own, s_own, tok_base, cnt, mask_t, x_base, size_base, mask_c, stride_xn, stride_sn,
                HAS_SIZE: tl.constexpr):
    """Size-weighted mean of each group (fp32 [BLOCK_T, BLOCK_C]) and its summed size ([BLOCK_T, 1]),
    from its own row ``x_own`` (size ``s_own``) and its srcs, added in merge order."""
    acc = x_own * s_own[:, None]
    cnt2 = cnt[:, None]
    mask_t2 = mask_t[:, None]
    s_sum2 = s_own[:, None]
    for k in range(0, tl.max(cnt, axis=0)):
        _, _, v, s = _group_member(k, tok_base, cnt2, mask_t2, x_base, size_base, mask_c, stride_xn, stride_sn,
                                   HAS_SIZE)
        acc += v * s
        s_sum2 += s
    return tl.math.div_rn(acc, tl.zeros_like(acc) + s_sum2), s_sum2


@_jit
def _tome_merge_wavg_kernel(
    x_ptr,
    size_ptr,
    out_ptr,
    size_out_ptr,
    own_ptr,
    off_ptr,
    src_tok_ptr,
    n_rows,
    n_out,
    r,
    c,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_sb,
    stride_sn,
    HAS_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # A program owns BLOCK_T output tokens x BLOCK_C features; the block steps through the k-th src
    # of every token at once.
    rows, mask_t, b, t, own, beg, cnt = _group_of_rows(own_ptr, off_ptr, n_rows, n_out, BLOCK_T)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < c
    x_base = x_ptr + b[:, None] * stride_xb + offs_c[None, :] * stride_xc
    x_own = tl.load(x_base + own[:, None] * stride_xn, mask=mask_t[:, None] & mask_c[None, :], other=0.0)
    s_own = tl.full([BLOCK_T], 1.0, tl.float32)
    if HAS_SIZE:
        s_own = tl.load(size_ptr + b * stride_sb + own * stride_sn, mask=mask_t, other=1.0).to(tl.float32)
    out, s_sum2 = _group_wavg(x_own.to(tl.float32), s_own, (src_tok_ptr + b * r + beg)[:, None], cnt, mask_t,
                              x_base, (size_ptr + b * stride_sb)[:, None], mask_c, stride_xn, stride_sn, HAS_SIZE)
    tl.store(size_out_ptr + rows, tl.sum(s_sum2, axis=1), mask=mask_t & (pid_c == 0))
    out_ptrs = out_ptr + rows[:, None] * c + offs_c[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])


@_jit
def _tome_merge_wavg_bwd_kernel(
    gout_ptr,
    gsize_ptr,
    x_ptr,
    size_ptr,
    gx_ptr,
    gs_ptr,
    own_ptr,
    off_ptr,
    src_tok_ptr,
    n_rows,
    n,
    n_out,
    r,
    c,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_sb,
    stride_sn,
    stride_gb,
    stride_gn,
    stride_gc,
    stride_gsb,
    stride_gsn,
    HAS_SIZE: tl.constexpr,
    HAS_GSIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out_t = sum_i s_i x_i / S_t over the group of output token t, so with q = g_t / S_t:
    #   grad_x_i = s_i q   and   grad_s_i = <q, x_i - out_t> + grad_size_out_t.
    # Whole rows are one block (the size gradient is a dot over the row); out_t is recomputed here
    # and each member's gradient is written by this program only.
    rows, mask_t, b, t, own, beg, cnt = _group_of_rows(own_ptr, off_ptr, n_rows, n_out, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < c
    m2 = mask_t[:, None] & mask_c[None, :]
    x_base = x_ptr + b[:, None] * stride_xb + offs_c[None, :] * stride_xc
    gx_base = gx_ptr + b[:, None] * n * c + offs_c[None, :]
    x_own = tl.load(x_base + own[:, None] * stride_xn, mask=m2, other=0.0).to(tl.float32)
    s_own = tl.full([BLOCK_T], 1.0, tl.float32)
    if HAS_SIZE:
        s_own = tl.load(size_ptr + b * stride_sb + own * stride_sn, mask=mask_t, other=1.0).to(tl.float32)
    tok_base = (src_tok_ptr + b * r + beg)[:, None]
    size_base = (size_ptr + b * stride_sb)[:, None]
    out, s_sum2 = _group_wavg(x_own, s_own, tok_base, cnt, mask_t, x_base, size_base, mask_c, stride_xn,
                              stride_sn, HAS_SIZE)
    g = tl.load(
        gout_ptr + b[:, None] * stride_gb + t[:, None] * stride_gn + offs_c[None, :] * stride_gc, mask=m2
    )
    q = tl.math.div_rn(g.to(tl.float32), tl.zeros_like(out) + s_sum2)
    q = tl.where(m2, q, 0.0)
    gsz = tl.zeros([BLOCK_T], tl.float32)
    if HAS_GSIZE:
        gsz = tl.load(gsize_ptr + b * stride_gsb + t * stride_gsn, mask=mask_t, other=0.0).to(tl.float32)
    tl.store(gx_base + own[:, None] * c, (q * s_own[:, None]).to(gx_ptr.dtype.element_ty), mask=m2)
    tl.store(gs_ptr + b * n + own, tl.sum(q * (x_own - out), axis=1) + gsz, mask=mask_t)
    gs_base = (gs_ptr + b * n)[:, None]
    gsz2 = gsz[:, None]
    cnt2 = cnt[:, None]
    mask_t2 = mask_t[:, None]
    for k in range(0, tl.max(cnt, axis=0)):
        live, tok, v, s = _group_member(k, tok_base, cnt2, mask_t2, x_base, size_base, mask_c, stride_xn,
                                        stride_sn, HAS_SIZE)
        tl.store(gx_base + tok * c, (q * s).to(gx_ptr.dtype.element_ty), mask=live & mask_c[None, :])
        tl.store(gs_base + tok, tl.sum(q * (v - out), axis=1, keep_dims=True) + gsz2, mask=live)


# ----------------------------------------------------------------------------------------------------
# What the kernels support, and argument checks
# ----------------------------------------------------------------------------------------------------


def _tensor_reasons(name: str, t: torch.Tensor | None) -> list[str]:
    if t is None or not isinstance(t, torch.Tensor):
        return []
    reasons = []
    if _interpreted():
        if t.device.type != "cpu":
            reasons.append(f"{name} is on {t.device}, but the Triton interpreter runs on CPU tensors")
    elif t.device.type != "cuda":
        reasons.append(f"{name} is on {t.device}; Triton needs a CUDA tensor (or TRITON_INTERPRET=1)")
    if t.is_floating_point():
        if t.dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        elif t.dtype == torch.bfloat16 and _interpreted():
            reasons.append(f"{name} is bfloat16, which the Triton interpreter computes wrongly")
    return reasons


def _common_reasons(**tensors: torch.Tensor | None) -> list[str]:
    if triton is None:
        return ["triton is not installed"]
    reasons = []
    for name, t in tensors.items():
        reasons += _tensor_reasons(name, t)
    return reasons


def not_supported_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Why the kernels of this module cannot take these tensors here (device, dtype), or []."""
    names = ["input"] if len(tensors) == 1 else [f"input {i}" for i in range(len(tensors))]
    return _common_reasons(**dict(zip(names, tensors)))


def tome_match_not_supported_reasons(
    metric: torch.Tensor, r: int = 0, class_token: bool = False, distill_token: bool = False
) -> list[str]:
    """Why :func:`tome_match` cannot run ``metric`` here (empty when it can)."""
    return _common_reasons(metric=metric)


def tome_merge_wavg_not_supported_reasons(
    x: torch.Tensor,
    size: torch.Tensor | None = None,
    unm_idx: torch.Tensor | None = None,
    src_idx: torch.Tensor | None = None,
    dst_idx: torch.Tensor | None = None,
) -> list[str]:
    """Why :func:`tome_merge_wavg` cannot run these inputs here (empty when it can)."""
    return _common_reasons(x=x, size=size, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)


def tome_merge_wavg_bwd_not_supported_reasons(
    grad_x_out: torch.Tensor,
    grad_size_out: torch.Tensor | None,
    x: torch.Tensor,
    size: torch.Tensor | None = None,
    unm_idx: torch.Tensor | None = None,
    src_idx: torch.Tensor | None = None,
    dst_idx: torch.Tensor | None = None,
) -> list[str]:
    """Why :func:`tome_merge_wavg_bwd` cannot run these inputs here (empty when it can): the
    forward's reasons, those of the gradients, and the width limit."""
    reasons = _common_reasons(grad_x_out=grad_x_out, grad_size_out=grad_size_out)
    if triton is not None:  # else the line above said it, once
        reasons += tome_merge_wavg_not_supported_reasons(x, size, unm_idx, src_idx, dst_idx)
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] > MAX_BWD_C:
        reasons.append(
            f"x has {x.shape[-1]} features; the backward keeps a row in one block, at most {MAX_BWD_C}"
        )
    return reasons


def _raise_unsupported(op: str, reasons: list[str]) -> None:
    if reasons:
        raise RuntimeError(f"mmfast.triton.tome.{op} cannot run these inputs: " + "; ".join(reasons))


def _check_metric(metric: torch.Tensor) -> None:
    if not isinstance(metric, torch.Tensor):
        raise TypeError(f"tome_match: metric must be a torch.Tensor, got {type(metric).__name__}")
    if metric.dim() != 3:
        raise ValueError(f"tome_match: metric must be 3-D [B, N, C], got shape {tuple(metric.shape)}")
    if not metric.is_floating_point():
        raise ValueError(f"tome_match: metric must be a floating-point tensor, got {metric.dtype}")


def _check_merge_args(
    op: str,
    x: torch.Tensor,
    size: torch.Tensor | None,
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices; index VALUES are trusted (checking them would synchronise)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(
            f"{op}: x must be a 3-D [B, N, C] floating-point tensor, got {x.dtype} {tuple(x.shape)}"
        )
    bsz, n, _ = x.shape
    if size is not None:
        if not isinstance(size, torch.Tensor) or not size.is_floating_point() or size.shape != (bsz, n, 1):
            got = (
                f"{size.dtype} {tuple(size.shape)}" if isinstance(size, torch.Tensor) else type(size).__name__
            )
            raise ValueError(
                f"{op}: size must be a floating-point [B, N, 1] = [{bsz}, {n}, 1] tensor, got {got}"
            )
        if size.device != x.device:
            raise ValueError(f"{op}: size is on {size.device} but x is on {x.device}")
    for name, t in (("unm_idx", unm_idx), ("src_idx", src_idx), ("dst_idx", dst_idx)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.int64:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a 2-D int64 tensor, got {got}")
        if t.shape[0] != bsz:
            raise ValueError(f"{op}: {name} has batch {t.shape[0]} but x has batch {bsz}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if src_idx.shape != dst_idx.shape:
        raise ValueError(
            f"{op}: src_idx and dst_idx must have the same shape, got {tuple(src_idx.shape)} and "
            f"{tuple(dst_idx.shape)}"
        )
    n_a = (n + 1) // 2
    if unm_idx.shape[1] + src_idx.shape[1] != n_a:
        raise ValueError(
            f"{op}: x has {n} tokens ({n_a} in set A) but the indices describe "
            f"{unm_idx.shape[1] + src_idx.shape[1]} A tokens (unm_idx {tuple(unm_idx.shape)}, "
            f"src_idx {tuple(src_idx.shape)})"
        )


def _groups(
    n: int, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output token: its own input token, and the CSR of the src tokens merged into it.

    Returns ``own [B, n_out]``, ``offsets [B, n_out + 1]`` and ``src_tok [B, r]`` (int64): output
    token ``t`` reduces ``own[b, t]`` with ``src_tok[b, offsets[b, t]:offsets[b, t + 1]]``, in merge
    order (the order in which scatter_reduce adds them). With ``r == 0`` the merge is the identity
    in the original token order, as in the reference.
    """
    bsz, r = src_idx.shape
    dev = src_idx.device
    if r == 0:
        own = torch.arange(n, device=dev).expand(bsz, n).contiguous()
        return own, torch.zeros(bsz, n + 1, dtype=torch.long, device=dev), src_idx.new_empty(bsz, 0)
    n_b = n // 2
    n_unm = unm_idx.shape[1]
    b_tok = (2 * torch.arange(n_b, device=dev) + 1).expand(bsz, n_b)
    own = torch.cat([2 * unm_idx, b_tok], dim=1).contiguous()
    sorted_dst, order = torch.sort(dst_idx, dim=1, stable=True)
    src_tok = (2 * src_idx.gather(1, order)).contiguous()
    bounds = torch.searchsorted(
        sorted_dst, torch.arange(n_b + 1, device=dev).expand(bsz, n_b + 1).contiguous()
    )
    offsets = torch.cat([bounds.new_zeros(bsz, n_unm), bounds], dim=1).contiguous()
    return own, offsets, src_tok


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------


@on_tensor_device
def tome_match(
    metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching: ``reference.tome.matching_indices`` with a fused score kernel.

    ``metric``: ``[B, N, C]`` fp16 / bf16 / fp32. ``r`` is the effective count (``mmfast.tome.effective_r``;
    the op layer clamps it, a larger one is a ``ValueError``). Returns int64
    ``(unm_idx [B, N_A - r], src_idx [B, r], dst_idx [B, r])`` with ``N_A = (N + 1) // 2``: A indices
    of the unmerged tokens (ascending with ``class_token``, else by descending best score, ties lower
    index first), A indices of the merged tokens (descending best score, ties lower index first) and
    the B index each merges into (its argmax, ties lowest index). Effective ``r == 0`` gives
    ``arange(N_A)`` and empty src / dst, as the reference does. See the module docstring for the
    exactness guarantee. ``ValueError`` for a metric that is not 3-D floating point or a negative r.
    """
    _check_metric(metric)
    bsz, n, c = metric.shape
    protected = int(bool(class_token)) + int(bool(distill_token))
    if not 0 <= r <= max((n - protected) // 2, 0) or (r and n // 2 - int(bool(distill_token)) <= 0):
        raise ValueError(f"tome_match: r={r} is not an effective merge count for {n} tokens "
                         f"(class_token={class_token}, distill_token={distill_token}); see mmfast.tome.effective_r")
    n_a, n_b = (n + 1) // 2, n // 2
    dev = metric.device
    if r == 0 or bsz == 0:
        unm = torch.arange(n_a - r, device=dev).expand(bsz, n_a - r).contiguous()
        empty = torch.empty(bsz, r, dtype=torch.long, device=dev)
        return unm, empty, empty.clone()
    _raise_unsupported("tome_match", tome_match_not_supported_reasons(metric, r, class_token, distill_token))
    # The reference's own norm (same reduction, same bits); the kernel does the division.
    norm = metric.norm(dim=-1, keepdim=True)
    node_max = torch.empty(bsz, n_a, dtype=torch.float32, device=dev)
    node_idx = torch.empty(bsz, n_a, dtype=torch.long, device=dev)
    # tl.dot needs every block dim >= 16; 64 x 64 score tiles keep the accumulator in registers.
    block_a = min(64, max(16, _next_pow2(n_a)))
    block_b = min(64, max(16, _next_pow2(n_b)))
    block_c = min(64, max(16, _next_pow2(c)))
    grid = (bsz, triton.cdiv(n_a, block_a))
    _tome_match_kernel[grid](
        metric,
        norm,
        node_max,
        node_idx,
        n_a,
        n_b,
        c,
        metric.stride(0),
        metric.stride(1),
        metric.stride(2),
        norm.stride(0),
        norm.stride(1),
        CLASS_TOKEN=bool(class_token),
        DISTILL_TOKEN=bool(distill_token),
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
        num_warps=4,
    )
    # The selection, exactly as the reference makes it (a stable sort keeps equal maxima in A order).
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src_idx = order[:, :r]
    unm_idx = order[:, r:]
    dst_idx = node_idx.gather(1, src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx.contiguous(), src_idx.contiguous(), dst_idx.contiguous()


@on_tensor_device
def tome_merge_wavg(
    x: torch.Tensor,
    size: torch.Tensor | None,
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: ``reference.tome.merge_wavg`` for the matching ``(unm, src, dst)``.

    ``x``: ``[B, N, C]``; ``size``: ``[B, N, 1]`` or None (ones); indices as :func:`tome_match`
    returns them. Returns ``(x_out [B, N - r, C], size_out [B, N - r, 1])``: per output token
    ``sum(x_i * s_i) / sum(s_i)`` and ``sum(s_i)`` over its group (itself plus the srcs merged into
    it), accumulated in fp32. ``x_out`` has dtype ``promote(x, size)`` and ``size_out`` size's dtype
    (x's when None), as in the reference. Empty ``src_idx`` (r == 0) is the identity in the original
    token order. Index values are trusted (they come from :func:`tome_match`); shapes are checked
    (``ValueError``).
    """
    _check_merge_args("tome_merge_wavg", x, size, unm_idx, src_idx, dst_idx)
    _raise_unsupported(
        "tome_merge_wavg", tome_merge_wavg_not_supported_reasons(x, size, unm_idx, src_idx, dst_idx)
    )
    size_dtype = size.dtype if size is not None else x.dtype
    bsz, n, c = x.shape
    own, offsets, src_tok = _groups(n, unm_idx, src_idx, dst_idx)
    n_out = own.shape[1]
    out = torch.empty(bsz, n_out, c, dtype=torch.promote_types(x.dtype, size_dtype), device=x.device)
    size_out = torch.empty(bsz, n_out, 1, dtype=torch.float32, device=x.device)
    if bsz * n_out == 0:
        return out, size_out.to(size_dtype)
    # ~4K elements per program: registers on a GPU, few programs for the interpreter.
    block_c = min(1024, max(16, _next_pow2(c)))
    block_t = max(1, min(64, 4096 // block_c))
    n_rows = bsz * n_out
    grid = (triton.cdiv(n_rows, block_t), max(1, triton.cdiv(c, block_c)))  # C == 0 still sums sizes
    s = size if size is not None else x  # any valid pointer when HAS_SIZE is False
    _tome_merge_wavg_kernel[grid](
        x,
        s,
        out,
        size_out,
        own,
        offsets,
        src_tok,
        n_rows,
        n_out,
        src_tok.shape[1],
        c,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        s.stride(0),
        s.stride(1),
        HAS_SIZE=size is not None,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=8,
    )
    return out, size_out.to(size_dtype)


@on_tensor_device
def tome_merge_wavg_bwd(
    grad_x_out: torch.Tensor,
    grad_size_out: torch.Tensor | None,
    x: torch.Tensor,
    size: torch.Tensor | None,
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of :func:`tome_merge_wavg`: ``(grad_x [B, N, C], grad_size [B, N, 1])``.

    With ``S_t`` the summed size and ``out_t`` the output of token ``i``'s group ``t``:
    ``grad_x_i = s_i * g_t / S_t`` and ``grad_size_i = <g_t, x_i - out_t> / S_t + grad_size_out_t``
    (``grad_size_out`` None counts as zeros). ``grad_size`` is the gradient w.r.t. the implicit ones
    when ``size`` is None. Each input token's gradient is written once, by its group's program:
    deterministic. ``grad_x`` has x's dtype, ``grad_size`` size's (x's when None).
    """
    _check_merge_args("tome_merge_wavg_bwd", x, size, unm_idx, src_idx, dst_idx)
    bsz, n, c = x.shape
    n_out = n - src_idx.shape[1]
    if not isinstance(grad_x_out, torch.Tensor) or grad_x_out.shape != (bsz, n_out, c):
        got = tuple(grad_x_out.shape) if isinstance(grad_x_out, torch.Tensor) else type(grad_x_out).__name__
        raise ValueError(f"tome_merge_wavg_bwd: grad_x_out must have shape [{bsz}, {n_out}, {c}], got {got}")
    if grad_size_out is not None and (
        not isinstance(grad_size_out, torch.Tensor) or grad_size_out.shape != (bsz, n_out, 1)
    ):
        got = (
            tuple(grad_size_out.shape)
            if isinstance(grad_size_out, torch.Tensor)
            else type(grad_size_out).__name__
        )
        raise ValueError(f"tome_merge_wavg_bwd: grad_size_out must have shape [{bsz}, {n_out}, 1], got {got}")
    _raise_unsupported(
        "tome_merge_wavg_bwd",
        tome_merge_wavg_bwd_not_supported_reasons(
            grad_x_out, grad_size_out, x, size, unm_idx, src_idx, dst_idx
        ),
    )
    size_dtype = size.dtype if size is not None else x.dtype
    own, offsets, src_tok = _groups(n, unm_idx, src_idx, dst_idx)
    grad_x = torch.empty(bsz, n, c, dtype=x.dtype, device=x.device)
    grad_size = torch.empty(bsz, n, 1, dtype=torch.float32, device=x.device)
    n_rows = bsz * n_out
    if n_rows > 0:
        block_c = max(16, _next_pow2(c))
        block_t = max(1, min(64, 4096 // block_c))
        s = size if size is not None else x
        gs = grad_size_out if grad_size_out is not None else grad_x_out
        _tome_merge_wavg_bwd_kernel[(triton.cdiv(n_rows, block_t),)](
            grad_x_out,
            gs,
            x,
            s,
            grad_x,
            grad_size,
            own,
            offsets,
            src_tok,
            n_rows,
            n,
            n_out,
            src_tok.shape[1],
            c,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            s.stride(0),
            s.stride(1),
            grad_x_out.stride(0),
            grad_x_out.stride(1),
            grad_x_out.stride(2),
            gs.stride(0),
            gs.stride(1),
            HAS_SIZE=size is not None,
            HAS_GSIZE=grad_size_out is not None,
            BLOCK_T=block_t,
            BLOCK_C=block_c,
            num_warps=8 if block_c * block_t >= 2048 else 4,
        )
    return grad_x, grad_size.to(size_dtype)
