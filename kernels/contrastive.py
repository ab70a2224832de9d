"""Triton kernels of the tiled contrastive losses (the GPU twins of csrc/contrastive/contrastive_cpu.cpp).

Logits ``l_ij = scale * <a_i, b_j> + bias`` for ``a: [M, D]``, ``b: [N, D]`` are produced one register
tile at a time and never written to memory. ``scale`` and ``bias`` are 1-element tensors on the device;
the kernels load them (no ``.item()``, no host sync). Every kernel computes in float32 with ``tl.dot`` on
the input dtype (fp16/bf16 tensor cores, fp32 accumulation); fp32 inputs use ``tf32x3`` (three TF32 MMAs,
about fp32 accuracy), never plain TF32. Exponentials take ``l - max`` or ``l - lse`` in natural units
(not ``l * log2(e)`` first): with logits ~100 a base-2 conversion before the subtraction would cost
as much accuracy as the logit rounding itself, for one saved multiply per exponential.

Functions (all results float32):

* :func:`softmax_fwd` -> ``(row_lse[M], row_mean_logit[M], col_lse[N], col_mean_logit[N])``
* :func:`softmax_bwd` -> ``(da[M, D], db[N, D])``
* :func:`sigmoid_fwd` -> ``row_sums[M]`` = ``sum_j softplus(l_ij)``
* :func:`sigmoid_bwd` -> ``(da, db, dscale, dbias)`` of ``sum_ij row_w_i * softplus(l_ij)``
* :func:`not_supported_reasons` -> why these kernels cannot take given features (empty list: they can)

Design
------
Forward (softmax): ONE pass yields both directions. The grid is ``(S_r, S_c)``: ``S_c`` contiguous
column ranges times ``S_r`` row groups, with ``S_r * S_c <= target_programs`` (2 per SM on a GPU: one
wave), the ratio ``S_r / S_c`` near ``R / C`` (row / column block counts) so the scratch is small. A
program owns the row blocks ``r, r + S_r, r + 2 S_r, ...`` (persistent-style: the number of row programs
is bounded, however large M is) and, for each of them, walks its column range with an online softmax for
its rows. Every tile also yields the column statistics over its rows, which the program merges into ITS
row of a column scratch ``[S_r, N]`` (read-modify-write, owned by that program alone, so no atomics and
a fixed merge order). The row statistics of a row block over the program's column range go to a row
scratch ``[S_c, M]``. A cheap merge kernel then combines the ``S_c`` row partials and the ``S_r`` column
partials. Partials are stored as (log-sum-exp, softmax-weighted mean logit), 2 floats each, so the
scratch is ``2 * (S_c * M + S_r * N)`` floats, O(target_programs * (M + N)): linear in the batch for a
given GPU (see :func:`softmax_fwd_scratch_numel`). When ``S_c == 1`` (or ``S_r == 1``) the kernel writes
the final row (column) statistics directly and that merge is skipped.

Backward: two passes, flash-attention style, each recomputing the tiles. ``da`` comes from a grid over
row blocks of ``a`` (each program loops over the columns), ``db`` from the same kernel with the roles
of ``a`` and ``b`` swapped (a grid over row blocks of ``b``). Two passes cost one extra recomputation of
``a @ b^T`` but need no atomics, so results are bitwise deterministic run to run, and there is no
[N, D] fp32 atomic traffic that contends at large N (a one-pass design would need atomics for one
side). When there are too few row blocks to fill the GPU, the other side is split into at most
``max_splits`` ranges whose partial gradients (``[splits, rows, D]`` fp32) are summed by torch in a
fixed order. For ``D <= single_d_max`` (one D chunk) the gradient accumulator of a row block stays in
registers for the whole column loop, the row block is loaded once and each column tile is loaded once
for both products. For larger D (CLIP's 512..1280) an fp32 accumulator of ``[block rows, D]`` cannot
live in registers, so each tile adds ``G @ b_tile`` into the program's own rows of the fp32 output
(read-modify-write, L2-resident) one D chunk at a time.

fp16 range: the gradient weights ``G`` (e.g. ``p / (2 M)`` for a mean loss without a loss scaler) can
be far below fp16's smallest normal. Before the fp16 ``tl.dot`` each row of ``G`` is multiplied by a
power of two that brings its bound ``|w_row| + max|w_col|`` near ``2**14`` and the product is divided by
it afterwards (exact). bf16 has fp32's range and needs no scaling.

Numerics: softplus(x) = max(x, 0) + log1p(exp(-|x|)) with an accurate log1p, sigmoid from exp(-|x|):
no overflow for any sign. NaN or inf in the inputs propagate to the outputs (never masked away).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ._device import TRITON_ERROR as _TRITON_ERROR
from ._device import interpreting as _interpreting
from ._device import jit as _jit
from ._device import on_tensor_device, tl, triton

__all__ = [
    "ContrastiveConfig",
    "default_config",
    "not_supported_reasons",
    "sigmoid_bwd",
    "sigmoid_fwd",
    "softmax_bwd",
    "softmax_fwd",
    "softmax_fwd_scratch_numel",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ============================================================================================ kernels


@_jit
def _load_rows(ptr, stride, rows, row_ok, d0, D, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """A [len(rows), BLOCK_D] tile of a row-major matrix (unit last stride), zero outside."""
    od = d0 + tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (od[None, :] < D)
    t = tl.load(ptr + rows[:, None] * stride + od[None, :], mask=mask, other=0.0)
    if UPCAST:  # the interpreter mishandles bf16 arithmetic: compute in fp32 there
        t = t.to(tl.float32)
    return t


@_jit
def _dot_rows(
    X, stride_x, rows_x, ok_x, Y, stride_y, rows_y, ok_y, D,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """fp32 [BLOCK_X, BLOCK_Y] tile of X[rows_x] @ Y[rows_y]^T, looping over D in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_rows(X, stride_x, rows_x, ok_x, d0, D, BLOCK_D, UPCAST)
        y = _load_rows(Y, stride_y, rows_y, ok_y, d0, D, BLOCK_D, UPCAST)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PREC)
    return acc


@_jit
def _scale_bias(SCALE, BIAS, HAS_BIAS: tl.constexpr):
    """The logit scale and bias (0 without HAS_BIAS), loaded from their 1-element tensors as fp32."""
    scale = tl.load(SCALE).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(BIAS).to(tl.float32)
    return scale, bias


@_jit
def _block_range(pid, blocks_per_split, L, BLOCK: tl.constexpr):
    """[lo, hi): the blocks of ``BLOCK`` rows of an ``L``-row side that split ``pid`` walks."""
    lo = pid * blocks_per_split
    return lo, tl.minimum(lo + blocks_per_split, tl.cdiv(L, BLOCK))


@_jit
def _logit_tile(
    A, stride_a, rows, row_ok, a_t, B, stride_b, cols, col_ok, D, scale, bias,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """fp32 logits ``scale * A[rows] @ B[cols]^T + bias`` of one tile. With D_SINGLE, ``a_t`` is the
    row block, loaded once by the caller for all its column tiles (else it is not read)."""
    if D_SINGLE:
        b_t = _load_rows(B, stride_b, cols, col_ok, 0, D, BLOCK_D, UPCAST)
        s = tl.dot(a_t, tl.trans(b_t), input_precision=PREC)
    else:
        s = _dot_rows(A, stride_a, rows, row_ok, B, stride_b, cols, col_ok, D,
                      BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)  # fmt: skip
    return s * scale + bias


@_jit
def _softmax_fwd_kernel(
    A, B, stride_a, stride_b, SCALE, BIAS,
    ROW_LSE, ROW_MEAN, row_part_stride,  # [S_c, M] partials (the outputs when S_c == 1)
    COL_LSE, COL_MEAN, col_part_stride,  # [S_r, N] partials (the outputs when S_r == 1)
    M, N, D, col_blocks_per_split,
    HAS_BIAS: tl.constexpr, D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    n_row_progs = tl.num_programs(0)
    n_row_blocks = tl.cdiv(M, BLOCK_M)
    cb_lo, cb_hi = _block_range(pid_c, col_blocks_per_split, N, BLOCK_N)
    scale, bias = _scale_bias(SCALE, BIAS, HAS_BIAS)
    col_lse_ptr = COL_LSE + pid_r * col_part_stride
    col_mean_ptr = COL_MEAN + pid_r * col_part_stride
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)

    for rb in range(pid_r, n_row_blocks, n_row_progs):
        # The column partials of this program were stored by other threads of the CTA during the
        # previous row block: a CTA barrier orders those stores before this block's loads.
        tl.debug_barrier()
        rows = rb * BLOCK_M + ar_m
        row_ok = rows < M
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
        s_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of exp(lg - m_i)
        e_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of exp(lg - m_i) * lg
        a_t = None
        if D_SINGLE:
            a_t = _load_rows(A, stride_a, rows, row_ok, 0, D, BLOCK_D, UPCAST)
        for cb in range(cb_lo, cb_hi):
            cols = cb * BLOCK_N + ar_n
            col_ok = cols < N
            # logits, finite at padded rows / columns
            lg = _logit_tile(A, stride_a, rows, row_ok, a_t, B, stride_b, cols, col_ok, D, scale, bias,
                             D_SINGLE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_D)  # fmt: skip
            # row statistics over this program's columns (online softmax)
            lr = tl.where(col_ok[None, :], lg, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(lr, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(lr - m_new[:, None])
            s_i = s_i * alpha + tl.sum(p, 1)
            e_i = e_i * alpha + tl.sum(p * lg, 1)
            m_i = m_new
            # column statistics of this tile, merged into this program's column partial
            lc = tl.where(row_ok[:, None], lg, float("-inf"))
            cm = tl.max(lc, 0)
            q = tl.exp(lc - cm[None, :])
            cs = tl.sum(q, 0)
            t_lse = (cm + tl.log(cs))
            t_mean = tl.sum(q * lg, 0) / cs
            prev_ok = col_ok & (rb != pid_r)  # nothing to merge with in the program's first row block
            p_lse = tl.load(col_lse_ptr + cols, mask=prev_ok, other=float("-inf"))
            p_mean = tl.load(col_mean_ptr + cols, mask=prev_ok, other=0.0)
            mx = tl.maximum(p_lse, t_lse)
            w0 = tl.exp(p_lse - mx)
            w1 = tl.exp(t_lse - mx)
            ws = w0 + w1
            tl.store(col_lse_ptr + cols, mx + tl.log(ws), mask=col_ok)
            tl.store(col_mean_ptr + cols, (w0 * p_mean + w1 * t_mean) / ws, mask=col_ok)
        row_off = pid_c * row_part_stride + rows
        tl.store(ROW_LSE + row_off, (m_i + tl.log(s_i)), mask=row_ok)
        tl.store(ROW_MEAN + row_off, e_i / s_i, mask=row_ok)


@_jit
def _merge_lse_kernel(LSE_P, MEAN_P, part_stride, n_parts, L, OUT_LSE, OUT_MEAN, BLOCK: tl.constexpr):
    """Combine ``n_parts`` (lse, mean) partials of length L, in part order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    m = tl.load(LSE_P + offs, mask=ok, other=0.0)
    e = tl.load(MEAN_P + offs, mask=ok, other=0.0)
    s = tl.full([BLOCK], 1.0, dtype=tl.float32)
    for _ in range(1, n_parts):
        LSE_P += part_stride  # pointer arithmetic is 64-bit: no int32 overflow for large parts
        MEAN_P += part_stride
        lp = tl.load(LSE_P + offs, mask=ok, other=0.0)
        mp = tl.load(MEAN_P + offs, mask=ok, other=0.0)
        mx = tl.maximum(m, lp)
        f0 = tl.exp(m - mx)
        f1 = tl.exp(lp - mx)
        s = s * f0 + f1
        e = e * f0 + f1 * mp
        m = mx
    tl.store(OUT_LSE + offs, m + tl.log(s), mask=ok)
    tl.store(OUT_MEAN + offs, e / s, mask=ok)


@_jit
def _sigmoid_fwd_kernel(
    A, B, stride_a, stride_b, SCALE, BIAS, OUT, out_part_stride,
    M, N, D, col_blocks_per_split,
    HAS_BIAS: tl.constexpr, D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    cb_lo, cb_hi = _block_range(pid_c, col_blocks_per_split, N, BLOCK_N)
    scale, bias = _scale_bias(SCALE, BIAS, HAS_BIAS)
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_t = None
    if D_SINGLE:
        a_t = _load_rows(A, stride_a, rows, row_ok, 0, D, BLOCK_D, UPCAST)
    for cb in range(cb_lo, cb_hi):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        lg = _logit_tile(A, stride_a, rows, row_ok, a_t, B, stride_b, cols, col_ok, D, scale, bias,
                         D_SINGLE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_D)  # fmt: skip
        # softplus(l) = max(l, 0) + log1p(exp(-|l|)) with log1p(x) = log(u) * x / (u - 1), u = 1 + x
        # (accurate for tiny x; where u rounds to 1 it is x). NaN stays NaN; +-inf give inf / 0.
        x = tl.exp(-tl.abs(lg))
        u = 1.0 + x
        exact = u == 1.0
        l1p = tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))
        sp = tl.maximum(lg, 0.0) + l1p
        acc += tl.sum(tl.where(col_ok[None, :], sp, 0.0), 1)
    tl.store(OUT + pid_c * out_part_stride + rows, acc, mask=row_ok)


@_jit
def _grad_kernel(
    X, Y, OUT, stride_x, stride_y, out_split_stride,
    SCALE, BIAS, LSE_X, W_X, LSE_Y, W_Y, WY_ABSMAX, SUMS,
    LX, LY, D, y_blocks_per_split,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WX: tl.constexpr, HAS_WY: tl.constexpr,
    WANT_SUMS: tl.constexpr, SCALE_G: tl.constexpr, D_SINGLE: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, X_IS_B: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dX[rows] (+)= scale * G @ Y over this program's range of Y rows, G computed from recomputed tiles.

    Softmax: G_xy = w_x * exp(l - lse_x) + w_y * exp(l - lse_y). Sigmoid: G_xy = w * sigmoid(l) with the
    weight on the X side (HAS_WX) or the Y side (HAS_WY). With WANT_SUMS the program also writes
    sum(G * <x, y>) and sum(G) (dscale, dbias partials) to SUMS[0 / 1, program].

    X_IS_B: X is the forward's second operand (the pass for dB). The logits are then recomputed as
    the forward computed them, ``(A rows) @ (B rows)^T`` transposed, not as ``(B rows) @ (A rows)^T``:
    a matmul need not round both orientations alike (the interpreter's numpy does not, by up to an
    ulp of the logit), and ``exp(l - lse)`` is only as exact as the recomputed ``l`` agrees with the
    one the forward's ``lse`` came from (a disagreement costs ``|l|`` ulps: 6x plain PyTorch's error
    at logit scale 30).
    """
    pid_x = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    yb_lo, yb_hi = _block_range(pid_s, y_blocks_per_split, LY, BLOCK_Y)
    scale, bias = _scale_bias(SCALE, BIAS, HAS_BIAS)
    rows = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = rows < LX
    ar_y = tl.arange(0, BLOCK_Y)
    ar_d = tl.arange(0, BLOCK_D)
    if HAS_WX:
        wx = tl.load(W_X + rows, mask=x_ok, other=0.0).to(tl.float32)
    if not SIGMOID:  # +inf outside: exp(lg - inf) = 0, no overflow in padded lanes
        lse_x = tl.load(LSE_X + rows, mask=x_ok, other=float("inf")).to(tl.float32)
    out_mul = tl.zeros([BLOCK_X], dtype=tl.float32) + scale  # what the G @ Y products are multiplied by
    if SCALE_G:
        # per-row power of two bringing |G_row| <= |w_x| + max|w_y| to about 2**14, undone in out_mul
        bound = tl.zeros([BLOCK_X], dtype=tl.float32)
        if HAS_WX:
            bound += tl.abs(wx)
        if HAS_WY:
            bound += tl.load(WY_ABSMAX).to(tl.float32)
        ex = 14.0 - tl.ceil(tl.log2(tl.maximum(bound, 1e-30)))
        g_mul = tl.exp2(tl.minimum(tl.maximum(ex, -100.0), 100.0))
        out_mul = out_mul / g_mul
    if D_SINGLE:
        x_t = _load_rows(X, stride_x, rows, x_ok, 0, D, BLOCK_D, UPCAST)
        acc = tl.zeros([BLOCK_X, BLOCK_D], dtype=tl.float32)
    if WANT_SUMS:
        dot_sum = tl.zeros([BLOCK_X], dtype=tl.float32)
        g_sum = tl.zeros([BLOCK_X], dtype=tl.float32)
    out_base = OUT + pid_s * out_split_stride

    for yb in range(yb_lo, yb_hi):
        cols = yb * BLOCK_Y + ar_y
        y_ok = cols < LY
        if D_SINGLE:
            y_t = _load_rows(Y, stride_y, cols, y_ok, 0, D, BLOCK_D, UPCAST)
            if X_IS_B:
                s = tl.trans(tl.dot(y_t, tl.trans(x_t), input_precision=PREC))
            else:
                s = tl.dot(x_t, tl.trans(y_t), input_precision=PREC)
        elif X_IS_B:
            s = tl.trans(_dot_rows(Y, stride_y, cols, y_ok, X, stride_x, rows, x_ok, D,
                                   BLOCK_Y, BLOCK_X, BLOCK_D, UPCAST, PREC))  # fmt: skip
        else:
            s = _dot_rows(X, stride_x, rows, x_ok, Y, stride_y, cols, y_ok, D,
                          BLOCK_X, BLOCK_Y, BLOCK_D, UPCAST, PREC)  # fmt: skip
        lg = s * scale + bias
        if SIGMOID:
            z = tl.exp(-tl.abs(lg))
            r = 1.0 / (1.0 + z)
            sig = tl.where(lg >= 0.0, r, z * r)
            if HAS_WX:
                g = wx[:, None] * sig
            else:
                wy = tl.load(W_Y + cols, mask=y_ok, other=0.0).to(tl.float32)
                g = wy[None, :] * sig
        else:
            wy = tl.load(W_Y + cols, mask=y_ok, other=0.0).to(tl.float32)
            lse_y = tl.load(LSE_Y + cols, mask=y_ok, other=float("inf")).to(tl.float32)
            g = wx[:, None] * tl.exp(lg - lse_x[:, None]) + wy[None, :] * tl.exp(lg - lse_y[None, :])
        # padded Y rows must not contribute; padded X rows are never stored, but their exp terms (logit
        # = bias against a real lse) can overflow, so they are zeroed too
        g = tl.where(x_ok[:, None] & y_ok[None, :], g, 0.0)
        if WANT_SUMS:
            dot_sum += tl.sum(g * s, 1)
            g_sum += tl.sum(g, 1)
        if SCALE_G:
            g = g * g_mul[:, None]
        if not UPCAST:
            g = g.to(X.dtype.element_ty)
        if D_SINGLE:
            acc = tl.dot(g, y_t, acc, input_precision=PREC)
        else:
            # This program's rows of OUT were written by other threads of the CTA in the previous
            # iteration: a CTA barrier makes those stores visible before they are read back.
            tl.debug_barrier()
            for d0 in range(0, D, BLOCK_D):
                y_t = _load_rows(Y, stride_y, cols, y_ok, d0, D, BLOCK_D, UPCAST)
                part = tl.dot(g, y_t, input_precision=PREC) * out_mul[:, None]
                od = d0 + ar_d
                o_ok = x_ok[:, None] & (od[None, :] < D)
                ptrs = out_base + rows[:, None] * D + od[None, :]
                prev = tl.load(ptrs, mask=o_ok & (yb != yb_lo), other=0.0)
                tl.store(ptrs, prev + part, mask=o_ok)
    if D_SINGLE:
        od = ar_d
        ptrs = out_base + rows[:, None] * D + od[None, :]
        tl.store(ptrs, acc * out_mul[:, None], mask=x_ok[:, None] & (od[None, :] < D))
    if WANT_SUMS:
        idx = pid_x * tl.num_programs(1) + pid_s
        tl.store(SUMS + idx, tl.sum(dot_sum, 0))
        tl.store(SUMS + tl.num_programs(0) * tl.num_programs(1) + idx, tl.sum(g_sum, 0))


# ============================================================================================ config


@dataclass(frozen=True)
class ContrastiveConfig:
    """Launch parameters (no autotuning: fixed, sensible defaults per target).

    ``block_m`` / ``block_n``: tile rows / columns (in the backward, rows of the output side / of the
    other side). ``block_d``: D chunk of the dot products. ``single_d_max``: D up to which a single
    chunk of ``next_pow2(D)`` is used (row block held in registers, register accumulator in the
    backward). ``target_programs``: about how many programs to launch (2 per SM on a GPU);
    ``max_splits``: most ranges the other side is split into in the backward (each costs a
    [rows, D] fp32 partial).
    """

    block_m: int
    block_n: int
    block_d: int
    single_d_max: int
    num_warps: int
    num_stages: int
    target_programs: int
    max_splits: int


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(kind: str, a: torch.Tensor) -> ContrastiveConfig:
    """Defaults for ``kind`` ('fwd' or 'bwd') and features like ``a``; tiny tiles in the interpreter."""
    if kind not in ("fwd", "bwd"):
        raise ValueError(f"kind must be 'fwd' or 'bwd', got {kind!r}")
    if _interpreting():
        return ContrastiveConfig(16, 16, 16, 16, 1, 1, target_programs=4, max_splits=3)
    programs = 2 * _sm_count(a.device.index if a.device.index is not None else torch.cuda.current_device())
    wide = a.dtype == torch.float32  # fp32 tiles take twice the shared memory per pipeline stage
    # Single-chunk D limit: fp32 dots run as tf32x3, which stages the high and low halves of both
    # operands in shared memory; a 128-wide fp32 D chunk needs 262-328 KB there, over the H200's
    # 227 KB (compiled for sm_90a and measured offline), so fp32 takes single chunks up to D = 64.
    single = 64 if wide else 128
    if kind == "fwd":
        # 128 x 128 tiles: 2 exp per logit (row and column softmax) against 2*D MMA flops
        return ContrastiveConfig(128, 128, 32 if wide else 64, single, 8, 2 if wide else 3, programs, 0)
    # 64 x 128: the backward holds the logit tile, G, and (single chunk) a 64 x D accumulator
    return ContrastiveConfig(64, 128, 32 if wide else 64, single, 8, 2 if wide else 3, programs, 8)


def _d_block(cfg: ContrastiveConfig, D: int) -> tuple[int, bool]:
    """(BLOCK_D, single chunk?)."""
    if D <= max(cfg.single_d_max, cfg.block_d):
        return max(16, triton.next_power_of_2(D)), True
    return cfg.block_d, False


def _split(n_blocks: int, parts: int) -> tuple[int, int]:
    """(blocks per part, number of non-empty parts) for at most ``parts`` contiguous ranges."""
    parts = max(1, min(parts, n_blocks))
    per = -(-n_blocks // parts)
    return per, -(-n_blocks // per)


def _fwd_grid(M: int, N: int, cfg: ContrastiveConfig) -> tuple[int, int, int]:
    """(S_r row programs, S_c column splits, column blocks per split) of the softmax forward."""
    R = -(-M // cfg.block_m)
    C = -(-N // cfg.block_n)
    T = max(1, cfg.target_programs)
    # S_r * S_c <= T with S_r / S_c ~ R / C: balanced work per program, scratch S_c*M + S_r*N small.
    s_r = min(R, T, max(1, round(math.sqrt(T * R / C))))
    per, s_c = _split(C, T // s_r)  # floor: at most T programs, one wave of a persistent launch
    return s_r, s_c, per


def softmax_fwd_scratch_numel(M: int, N: int, cfg: ContrastiveConfig) -> int:
    """fp32 elements of scratch that :func:`softmax_fwd` allocates besides its outputs."""
    s_r, s_c, _ = _fwd_grid(M, N, cfg)
    return 2 * ((s_c * M if s_c > 1 else 0) + (s_r * N if s_r > 1 else 0))


# ============================================================================================ checks


def not_supported_reasons(a: torch.Tensor, b: torch.Tensor) -> list[str]:
    """Why these kernels cannot take features ``a`` and ``b`` (empty list: they can)."""
    reasons: list[str] = []
    if triton is None:
        reasons.append(_TRITON_ERROR or "triton is not installed")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return reasons + ["a and b must be tensors"]
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.dim() == 2 and t.size(1) > 1 and t.stride(1) != 1:
            reasons.append(f"{name} has last-dim stride {t.stride(1)}; the kernels need unit stride")
    if a.dtype != b.dtype:
        reasons.append(f"a and b dtypes differ ({a.dtype} vs {b.dtype})")
    if a.device != b.device:
        reasons.append(f"a and b are on different devices ({a.device} vs {b.device})")
    if _interpreting():
        if a.device.type != "cpu" or b.device.type != "cpu":
            reasons.append("under TRITON_INTERPRET=1 the kernels take CPU tensors")
    elif a.device.type != "cuda" or b.device.type != "cuda":
        reasons.append(f"triton kernels need CUDA tensors (got {a.device} and {b.device}; "
                       "set TRITON_INTERPRET=1 to run CPU tensors in the interpreter)")  # fmt: skip
    return reasons


def _check_features(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(t.shape)}")
        if t.size(0) < 1 or t.size(1) < 1:
            raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(t.shape)}")
    if a.size(1) != b.size(1):
        raise ValueError(f"a and b embedding sizes differ: a has D={a.size(1)}, b has D={b.size(1)}")
    reasons = not_supported_reasons(a, b)
    if reasons:
        raise ValueError("mmfast triton contrastive kernels cannot take these inputs: " + "; ".join(reasons))
    return a.size(0), b.size(0), a.size(1)


def _check_scalar(t: torch.Tensor | None, name: str, device: torch.device, optional: bool) -> None:
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} must be a 1-element tensor, got None")
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-element tensor on the features' device, got {shape}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")


def _check_inputs(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int, int, int]:
    """What every launcher takes: the features (M, N, D returned), the scale and the optional bias."""
    M, N, D = _check_features(a, b)
    _check_scalar(scale, "scale", a.device, optional=False)
    _check_scalar(bias, "bias", a.device, optional=True)
    return M, N, D


def _vector(t: torch.Tensor, n: int, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.size(0) != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape [{n}], got {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    return t.to(torch.float32).contiguous()


def _prec(dtype: torch.dtype) -> str | None:
    return "tf32x3" if dtype == torch.float32 else None


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


# ============================================================================================ launchers


@on_tensor_device
def softmax_fwd(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: ContrastiveConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column softmax statistics of ``l = scale * a @ b^T + bias`` in one pass.

    Returns float32 ``(row_lse[M], row_mean_logit[M], col_lse[N], col_mean_logit[N])``; the mean logit
    is the softmax-weighted mean ``sum_j p_ij * l_ij`` (rows) or ``sum_i`` (columns).
    """
    M, N, D = _check_inputs(a, b, scale, bias)
    cfg = config or default_config("fwd", a)
    block_d, single = _d_block(cfg, D)
    s_r, s_c, per = _fwd_grid(M, N, cfg)
    f32 = dict(dtype=torch.float32, device=a.device)
    row_lse, row_mean = torch.empty(M, **f32), torch.empty(M, **f32)
    col_lse, col_mean = torch.empty(N, **f32), torch.empty(N, **f32)
    row_part = torch.empty(2, s_c, M, **f32) if s_c > 1 else None
    col_part = torch.empty(2, s_r, N, **f32) if s_r > 1 else None
    rl, rm = (row_part[0], row_part[1]) if row_part is not None else (row_lse, row_mean)
    cl, cm = (col_part[0], col_part[1]) if col_part is not None else (col_lse, col_mean)
    _softmax_fwd_kernel[(s_r, s_c)](
        a, b, a.stride(0), b.stride(0), scale, bias if bias is not None else scale,
        rl, rm, M, cl, cm, N, M, N, D, per,
        HAS_BIAS=bias is not None, D_SINGLE=single, UPCAST=_upcast(a.dtype), PREC=_prec(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    mb = 128 if _interpreting() else 1024
    if row_part is not None:
        _merge_lse_kernel[(triton.cdiv(M, mb),)](rl, rm, M, s_c, M, row_lse, row_mean, BLOCK=mb)
    if col_part is not None:
        _merge_lse_kernel[(triton.cdiv(N, mb),)](cl, cm, N, s_r, N, col_lse, col_mean, BLOCK=mb)
    return row_lse, row_mean, col_lse, col_mean


def _grad_pass(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: ContrastiveConfig,
    *,
    sigmoid: bool,
    lse_x: torch.Tensor | None,
    w_x: torch.Tensor | None,
    lse_y: torch.Tensor | None,
    w_y: torch.Tensor | None,
    want_sums: bool,
    x_is_b: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dX = scale * G @ Y (float32 [LX, D]) and, with ``want_sums``, the [2, programs] sum partials.
    ``x_is_b``: x is the forward's second operand (logits recomputed in the forward's orientation)."""
    LX, D = x.shape
    LY = y.size(0)
    block_d, single = _d_block(cfg, D)
    n_xb = triton.cdiv(LX, cfg.block_m)
    per, splits = _split(triton.cdiv(LY, cfg.block_n), min(cfg.max_splits, cfg.target_programs // n_xb))
    out = torch.empty(splits, LX, D, dtype=torch.float32, device=x.device)
    sums = torch.empty(2, n_xb * splits, dtype=torch.float32, device=x.device) if want_sums else None
    scale_g = x.dtype == torch.float16
    wy_absmax = w_y.abs().amax().reshape(1) if (scale_g and w_y is not None) else scale
    dummy = scale
    _grad_kernel[(n_xb, splits)](
        x, y, out, x.stride(0), y.stride(0), LX * D,
        scale, bias if bias is not None else dummy,
        lse_x if lse_x is not None else dummy, w_x if w_x is not None else dummy,
        lse_y if lse_y is not None else dummy, w_y if w_y is not None else dummy,
        wy_absmax, sums if sums is not None else dummy,
        LX, LY, D, per,
        SIGMOID=sigmoid, HAS_BIAS=bias is not None, HAS_WX=w_x is not None, HAS_WY=w_y is not None,
        WANT_SUMS=want_sums, SCALE_G=scale_g, D_SINGLE=single, UPCAST=_upcast(x.dtype),
        PREC=_prec(x.dtype), X_IS_B=x_is_b, BLOCK_X=cfg.block_m, BLOCK_Y=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    dx = out[0] if splits == 1 else out.sum(0)  # fixed-order reduction: deterministic
    return dx, sums


@on_tensor_device
def softmax_bwd(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    a_row_w: torch.Tensor,
    a_col_w: torch.Tensor,
    b_row_w: torch.Tensor | None = None,
    b_col_w: torch.Tensor | None = None,
    *,
    config: ContrastiveConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``da = scale * G^a @ b``, ``db = scale * (G^b)^T @ a`` (float32), with
    ``G^a_ij = a_row_w_i * exp(l_ij - row_lse_i) + a_col_w_j * exp(l_ij - col_lse_j)`` and ``G^b`` the
    same with ``b_row_w`` / ``b_col_w`` (both None: the same weights as ``a``'s)."""
    M, N, D = _check_inputs(a, b, scale, bias)
    if (b_row_w is None) != (b_col_w is None):
        raise ValueError("b_row_w and b_col_w must both be given or both be None")
    dev = a.device
    rl, cl = _vector(row_lse, M, "row_lse", dev), _vector(col_lse, N, "col_lse", dev)
    arw, acw = _vector(a_row_w, M, "a_row_w", dev), _vector(a_col_w, N, "a_col_w", dev)
    if b_row_w is not None:
        brw, bcw = _vector(b_row_w, M, "b_row_w", dev), _vector(b_col_w, N, "b_col_w", dev)
    else:
        brw, bcw = arw, acw
    cfg = config or default_config("bwd", a)
    common = dict(sigmoid=False, want_sums=False)
    da, _ = _grad_pass(a, b, scale, bias, cfg, lse_x=rl, w_x=arw, lse_y=cl, w_y=acw, x_is_b=False, **common)
    db, _ = _grad_pass(b, a, scale, bias, cfg, lse_x=cl, w_x=bcw, lse_y=rl, w_y=brw, x_is_b=True, **common)
    return da, db


@on_tensor_device
def sigmoid_fwd(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: ContrastiveConfig | None = None,
) -> torch.Tensor:
    """Row sums ``sum_j softplus(l_ij)`` (float32 [M]): the SigLIP loss with every pair a negative."""
    M, N, D = _check_inputs(a, b, scale, bias)
    cfg = config or default_config("fwd", a)
    block_d, single = _d_block(cfg, D)
    n_rb = triton.cdiv(M, cfg.block_m)
    per, splits = _split(triton.cdiv(N, cfg.block_n), cfg.target_programs // n_rb)
    part = torch.empty(splits, M, dtype=torch.float32, device=a.device)
    _sigmoid_fwd_kernel[(n_rb, splits)](
        a, b, a.stride(0), b.stride(0), scale, bias if bias is not None else scale, part, M,
        M, N, D, per,
        HAS_BIAS=bias is not None, D_SINGLE=single, UPCAST=_upcast(a.dtype), PREC=_prec(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return part[0] if splits == 1 else part.sum(0)


@on_tensor_device
def sigmoid_bwd(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_w: torch.Tensor,
    *,
    config: ContrastiveConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of ``sum_ij row_w_i * softplus(l_ij)``: float32 ``(da, db, dscale, dbias)`` (0-dim
    scalars), with ``G = row_w_i * sigmoid(l_ij)``, ``dscale = sum G * <a_i, b_j>``, ``dbias = sum G``."""
    M, N, D = _check_inputs(a, b, scale, bias)
    w = _vector(row_w, M, "row_w", a.device)
    cfg = config or default_config("bwd", a)
    da, sums = _grad_pass(a, b, scale, bias, cfg, sigmoid=True, lse_x=None, w_x=w, lse_y=None, w_y=None,
                          want_sums=True, x_is_b=False)  # fmt: skip
    db, _ = _grad_pass(b, a, scale, bias, cfg, sigmoid=True, lse_x=None, w_x=None, lse_y=None, w_y=w,
                       want_sums=False, x_is_b=True)  # fmt: skip
    return da, db, sums[0].sum(), sums[1].sum()
