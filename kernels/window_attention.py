"""Fused (shifted-)window attention (Swin v1 / v2) in Triton, on the channels-last spatial layout.

Same semantics as the oracle :func:`mmfast.reference.window_attention.window_attention` (timm 1.0.31:
roll then pad, region mask on the padded grid, padded tokens carry ``pad_value`` and are keys like any
other, ``-100`` mask, cosine attention with a per-head ``logit_scale``; plus ``order="pad_roll"``),
but nothing is materialised: no rolled / padded / partitioned copy of q, k, v, and no ``N x N``
index, bias or mask tensor. Every kernel works out, for each token of a window, where it lives by
address arithmetic:

* token ``t`` of window ``w`` sits at ``(py, px)`` of the rolled, padded ``Hp x Wp`` grid
  (``py = (w // nWw) * Wh + t // Ww``, ``px = (w % nWw) * Ww + t % Ww``);
* ``roll_pad`` (timm): it is a padded token when ``py >= H or px >= W``, else it reads
  ``x[(py + sh) % H, (px + sw) % W]``; ``pad_roll``: it reads ``(sy, sx) = ((py + sh) % Hp,
  (px + sw) % Wp)`` of the padded map, a padded token when ``sy >= H or sx >= W``;
* padded tokens load ``pad_value[0|1|2, head]`` instead of memory, and their outputs (queries) are
  never written: the output of a real token goes straight back to the place it was read from, which
  is exactly the reference's merge + crop + un-roll;
* the bias of a (query, key) pair is gathered from the ``[(2Wh-1)(2Ww-1), heads]`` table at
  ``(iy_q - iy_k + Wh - 1) * (2Ww - 1) + (ix_q - ix_k + Ww - 1)``; the shift mask compares the two
  tokens' region ids, computed from ``(py, px)`` with the reference's ``shift_attn_mask`` layout.

Program decomposition (``BLOCK`` = token block, ``NB = cdiv(Wh * Ww, BLOCK)`` blocks per window):

* forward: one program per (batch x window, query block, head); it loops over the ``NB`` key
  blocks of its window with an online softmax (fp32, ``tl.exp``) and writes ``out`` and the
  log-sum-exp ``lse`` (fp32) of its real query rows;
* backward, flash-attention style (P recomputed from ``lse``; ``delta = rowsum(dout * out)`` by a
  small row kernel first):

  - ``dk/dv`` kernel: one program per (group of ``G`` consecutive windows, key block, head); for each
    window of its group it loops over the query blocks and accumulates ``dv = P^T dO`` and
    ``dk = dS^T Q``; the rows of padded keys go to ``d_pad_value[1:3]`` instead of memory. It also
    accumulates the parameter gradients over its ``G`` windows in registers (``dS`` for the bias
    table, ``sum(dS * cos)`` for ``logit_scale``, padded-key rows for ``pad_value``) and flushes them
    once per program: with atomics (default) or into per-program partial buffers summed by torch in a
    fixed order (``deterministic=True``). With more than one query block per window the bias tile is
    flushed per (window, query block) instead: atomics, or a read-modify-write of the program's own
    partial (deterministic);
  - ``dq`` kernel: one program per (window, query block, head), looping over the key blocks;
  - a reduction kernel turns the per-head ``[N, N]`` sum of ``dS`` into the table gradient, one
    program per (table row, head), summing the pairs of that ``(dy, dx)`` in a fixed order.

* ``dq, dk, dv`` are written exactly once (no atomics, always deterministic) into one
  ``[B, H, W, 3, heads, head_dim]`` buffer (``dq._base``), so a caller whose q, k, v are views of a
  fused qkv tensor can hand that buffer on without a copy.
* Cosine attention (``logit_scale`` given): the kernels dot the *raw* q and k and scale the logits by
  ``logit_scale / (max(|q|, eps) * max(|k|, eps))`` (eps 1e-12, as ``F.normalize``); in the backward
  the row scales are folded into ``dS`` and the result goes through the normalisation's backward.
* ``d_pad_value[0]`` is always zero: padded query rows are cropped away, so their ``dout`` is zero.

Precision: q, k, v (fp32, fp16 or bf16, any strides) are upcast to fp32 on load and everything is
computed in fp32. On a GPU the fp32 ``tl.dot`` uses ``tf32x3`` (three TF32 tensor-core products,
about fp32 accuracy; override with ``MMFAST_TRITON_DOT_PRECISION=ieee|tf32|tf32x3``). Limits: at most
256 tokens per window (16 x 16, or any rectangle with ``Wh * Ww <= 256``), head_dim at most 128 (padded
to a power of two, at least 16, with masks), no float64.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._device import TRITON_ERROR as _TRITON_ERROR
from ._device import interpreting as _interpreting
from ._device import jit, on_tensor_device, tl, triton

__all__ = [
    "MAX_HEAD_DIM",
    "MAX_WINDOW_TOKENS",
    "not_supported_reasons",
    "window_attention_bwd",
    "window_attention_fwd",
]

MAX_WINDOW_TOKENS = 256  # 16 x 16
MAX_HEAD_DIM = 128
_ORDERS = ("roll_pad", "pad_roll")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tuning knobs (module attributes so that tests and benchmarks can change them).
MAX_BLOCK = 64  # token block of the kernels; windows with more tokens are split into several blocks
WINDOWS_PER_PROGRAM: int | None = None  # windows per dk/dv program (None: chosen from the problem size)
_TARGET_PROGRAMS = 2048  # the automatic choice keeps at least about this many dk/dv programs
_MAX_GROUP = 16
_DETERMINISTIC_PART_BYTES = 256 << 20  # cap on the per-program partial bias buffers


# ------------------------------------------------------------------------------------------------
# Triton kernels


@jit
def _window_tokens(blk, win, NWIN, NWW, H, W, HP, WP, SH, SW,
                   WH: tl.constexpr, WW: tl.constexpr, BLOCK: tl.constexpr, PAD_ROLL: tl.constexpr):
    """Token block ``blk`` of global window ``win`` (= batch * NWIN + window).

    Returns the batch index, in-window coordinates, position on the rolled padded grid, source
    position in the input map, and masks: ``valid`` (t < N), ``real`` (valid, reads memory), ``pad``
    (valid, carries pad_value).
    """
    b = win // NWIN
    w = win % NWIN
    t = blk * BLOCK + tl.arange(0, BLOCK)
    valid = t < WH * WW
    iy = t // WW
    ix = t % WW
    py = (w // NWW) * WH + iy
    px = (w % NWW) * WW + ix
    if PAD_ROLL:
        sy = (py + SH) % HP
        sx = (px + SW) % WP
        is_pad = (sy >= H) | (sx >= W)
    else:
        is_pad = (py >= H) | (px >= W)
        sy = (py + SH) % H
        sx = (px + SW) % W
    real = valid & (is_pad == 0)
    pad = valid & is_pad
    return b, valid, real, pad, iy, ix, py, px, sy, sx


@jit
def _region(py, px, HP, WP, SH, SW, WH: tl.constexpr, WW: tl.constexpr,
            MASK_H: tl.constexpr, MASK_W: tl.constexpr):
    """Shift-mask region id of grid positions, as ``shift_attn_mask`` lays them out."""
    r = py * 0
    if MASK_H:
        r += ((py >= HP - WH).to(tl.int32) + (py >= HP - SH).to(tl.int32)) * 3
    if MASK_W:
        r += (px >= WP - WW).to(tl.int32) + (px >= WP - SW).to(tl.int32)
    return r


@jit
def _row_offsets(b, sy, sx, head, s_b, s_h, s_w, s_n):
    return b.to(tl.int64) * s_b + sy.to(tl.int64) * s_h + sx.to(tl.int64) * s_w + head.to(tl.int64) * s_n


@jit
def _load_rows(ptr, row_off, s_d, real, pad, pad_ptr, s_pd, d, dmask, HAS_PAD: tl.constexpr):
    """[BLOCK, BLOCK_D] fp32 tile: memory rows for real tokens, pad_value for padded ones, 0 else."""
    x = tl.load(ptr + row_off[:, None] + d[None, :] * s_d, mask=real[:, None] & dmask[None, :], other=0.0)
    x = x.to(tl.float32)
    if HAS_PAD:
        pv = tl.load(pad_ptr + d * s_pd, mask=dmask, other=0.0).to(tl.float32)
        x = tl.where(pad[:, None], pv[None, :], x)
    return x


@jit
def _inv_norm(x):
    """(norm, 1 / max(norm, eps)) of each row, eps = 1e-12 as in F.normalize."""
    nrm = tl.sqrt(tl.sum(x * x, axis=1))
    return nrm, 1.0 / tl.maximum(nrm, 1e-12)


@jit
def _norm_bwd(x, g, nrm, inv):
    """Gradient of ``x / max(|x|, eps)`` (rows) given the gradient ``g`` of the normalised rows."""
    xg = tl.sum(x * g, axis=1)
    corr = tl.where(nrm >= 1e-12, xg * inv * inv * inv, 0.0)
    return g * inv[:, None] - corr[:, None] * x


@jit
def _logits(q, k, inv_q, inv_k, mult, q_iy, q_ix, k_iy, k_ix, q_valid, k_valid, q_reg, k_reg,
            bias_ptr, s_bt, mask_value,
            WH: tl.constexpr, WW: tl.constexpr, COSINE: tl.constexpr, HAS_BIAS: tl.constexpr,
            USE_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits of a [BLOCK q, BLOCK k] tile (invalid keys -inf) and the cosine tile (cosine mode)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if COSINE:
        cos = qk * inv_q[:, None] * inv_k[None, :]
        s = cos * mult
    else:
        cos = qk
        s = qk * mult
    if HAS_BIAS:
        idx = (q_iy[:, None] - k_iy[None, :] + (WH - 1)) * (2 * WW - 1) + (q_ix[:, None] - k_ix[None, :] + (WW - 1))
        bmask = q_valid[:, None] & k_valid[None, :]
        s += tl.load(bias_ptr + idx * s_bt, mask=bmask, other=0.0).to(tl.float32)
    if USE_MASK:
        s = tl.where(q_reg[:, None] == k_reg[None, :], s, s + mask_value)
    s = tl.where(k_valid[None, :], s, float("-inf"))
    return s, cos


@jit
def _program_block(HEADS, NB):
    """(head, token block, window or window group) of this program: the grid is windows x blocks x
    heads, heads fastest."""
    pid = tl.program_id(0)
    rest = pid // HEADS
    return pid % HEADS, rest % NB, rest // NB


@jit
def _logit_mult(LS, head, s_ls, scale, COSINE: tl.constexpr):
    """What the head's logits are multiplied by: ``logit_scale[head]`` (cosine) or ``scale``."""
    if COSINE:
        mult = tl.load(LS + head * s_ls).to(tl.float32)
    else:
        mult = scale
    return mult


@jit
def _row_stats(x, py, px, HP, WP, SH, SW, WH: tl.constexpr, WW: tl.constexpr,
               MASK_H: tl.constexpr, MASK_W: tl.constexpr):
    """(norm, 1 / max(norm, eps), shift-mask region id) of a block's rows."""
    nrm, inv = _inv_norm(x)
    return nrm, inv, _region(py, px, HP, WP, SH, SW, WH, WW, MASK_H, MASK_W)


@jit
def _query_block(Q, PADV, qb, win, head, d, dmask, sq_b, sq_h, sq_w, sq_n, sq_d, s_pn, s_pd,
                 H, W, HP, WP, NWW, NWIN, SH, SW,
                 WH: tl.constexpr, WW: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr,
                 PAD_ROLL: tl.constexpr):
    """Query block ``qb`` of window ``win``: its tokens (as :func:`_window_tokens`) and q rows.
    Returns ``(b, valid, real, iy, ix, py, px, sy, sx, q)``."""
    b, valid, real, pad, iy, ix, py, px, sy, sx = _window_tokens(
        qb, win, NWIN, NWW, H, W, HP, WP, SH, SW, WH, WW, BLOCK, PAD_ROLL)
    q_off = _row_offsets(b, sy, sx, head, sq_b, sq_h, sq_w, sq_n)
    q = _load_rows(Q, q_off, sq_d, real, pad, PADV + head * s_pn, s_pd, d, dmask, HAS_PAD)
    return b, valid, real, iy, ix, py, px, sy, sx, q


@jit
def _query_grad_rows(DO, LSE, DELTA, b, sy, sx, head, real, d, dmask,
                     sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h, sl_w, sl_n, H, W, HEADS):
    """dout rows, lse and delta of a query block (padded / invalid rows: 0, +inf, 0)."""
    do_off = _row_offsets(b, sy, sx, head, sdo_b, sdo_h, sdo_w, sdo_n)
    do = tl.load(DO + do_off[:, None] + d[None, :] * sdo_d, mask=real[:, None] & dmask[None, :],
                 other=0.0).to(tl.float32)
    l_off = _row_offsets(b, sy, sx, head, sl_b, sl_h, sl_w, sl_n)
    lse = tl.load(LSE + l_off, mask=real, other=float("inf"))
    delta = tl.load(DELTA + ((b.to(tl.int64) * H + sy) * W + sx) * HEADS + head, mask=real, other=0.0)
    return do, lse, delta


@jit
def _key_block(K, V, PADV, kb, win, head, d, dmask,
               sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d, s_p0, s_pn, s_pd,
               H, W, HP, WP, NWW, NWIN, SH, SW,
               WH: tl.constexpr, WW: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr,
               MASK_H: tl.constexpr, MASK_W: tl.constexpr, PAD_ROLL: tl.constexpr):
    """Key block ``kb`` of window ``win``: its tokens, k and v rows, the k norms and region ids.
    Returns ``(b, valid, real, pad, iy, ix, sy, sx, k, v, nrm, inv, reg)``."""
    b, valid, real, pad, iy, ix, py, px, sy, sx = _window_tokens(
        kb, win, NWIN, NWW, H, W, HP, WP, SH, SW, WH, WW, BLOCK, PAD_ROLL)
    k_off = _row_offsets(b, sy, sx, head, sk_b, sk_h, sk_w, sk_n)
    k = _load_rows(K, k_off, sk_d, real, pad, PADV + s_p0 + head * s_pn, s_pd, d, dmask, HAS_PAD)
    v_off = _row_offsets(b, sy, sx, head, sv_b, sv_h, sv_w, sv_n)
    v = _load_rows(V, v_off, sv_d, real, pad, PADV + 2 * s_p0 + head * s_pn, s_pd, d, dmask, HAS_PAD)
    nrm, inv, reg = _row_stats(k, py, px, HP, WP, SH, SW, WH, WW, MASK_H, MASK_W)
    return b, valid, real, pad, iy, ix, sy, sx, k, v, nrm, inv, reg


@jit
def _fwd_kernel(
    Q, K, V, BIAS, LS, PADV, OUT, LSE,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sl_b, sl_h, sl_w, sl_n,
    s_bt, s_bn, s_ls, s_p0, s_pn, s_pd,
    H, W, HP, WP, NWW, NWIN, HEADS, HEAD_DIM, SH, SW, scale, mask_value,
    WH: tl.constexpr, WW: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NB: tl.constexpr,
    HAS_BIAS: tl.constexpr, COSINE: tl.constexpr, HAS_PAD: tl.constexpr,
    MASK_H: tl.constexpr, MASK_W: tl.constexpr, USE_MASK: tl.constexpr, PAD_ROLL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    head, qb, win = _program_block(HEADS, NB)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    b, q_valid, q_real, q_iy, q_ix, q_py, q_px, q_sy, q_sx, q = _query_block(
        Q, PADV, qb, win, head, d, dmask, sq_b, sq_h, sq_w, sq_n, sq_d, s_pn, s_pd,
        H, W, HP, WP, NWW, NWIN, SH, SW, WH, WW, BLOCK, HAS_PAD, PAD_ROLL)
    q_nrm, inv_q, q_reg = _row_stats(q, q_py, q_px, HP, WP, SH, SW, WH, WW, MASK_H, MASK_W)
    mult = _logit_mult(LS, head, s_ls, scale, COSINE)
    bias_ptr = BIAS + head * s_bn

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for kb in range(NB):
        _, k_valid, k_real, k_pad, k_iy, k_ix, k_sy, k_sx, k, v, k_nrm, inv_k, k_reg = _key_block(
            K, V, PADV, kb, win, head, d, dmask, sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
            s_p0, s_pn, s_pd, H, W, HP, WP, NWW, NWIN, SH, SW, WH, WW, BLOCK, HAS_PAD, MASK_H, MASK_W, PAD_ROLL)
        s, _ = _logits(q, k, inv_q, inv_k, mult, q_iy, q_ix, k_iy, k_ix, q_valid, k_valid, q_reg, k_reg,
                       bias_ptr, s_bt, mask_value, WH, WW, COSINE, HAS_BIAS, USE_MASK, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    o_off = _row_offsets(b, q_sy, q_sx, head, so_b, so_h, so_w, so_n)
    tl.store(OUT + o_off[:, None] + d[None, :] * so_d, out.to(OUT.dtype.element_ty),
             mask=q_real[:, None] & dmask[None, :])
    l_off = _row_offsets(b, q_sy, q_sx, head, sl_b, sl_h, sl_w, sl_n)
    tl.store(LSE + l_off, m_i + tl.log(l_i), mask=q_real)


@jit
def _bwd_delta_kernel(
    DO, OUT, DELTA, n_rows, H, W, HEADS, HEAD_DIM,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    so_b, so_h, so_w, so_n, so_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, y, x, head] = sum_d dout * out (fp32), for every token of the map."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    head = rows % HEADS
    r = rows // HEADS
    x = r % W
    r = r // W
    y = r % H
    b = r // H
    d = tl.arange(0, BLOCK_D)
    m = rmask[:, None] & (d < HEAD_DIM)[None, :]
    do_off = _row_offsets(b, y, x, head, sdo_b, sdo_h, sdo_w, sdo_n)
    o_off = _row_offsets(b, y, x, head, so_b, so_h, so_w, so_n)
    do = tl.load(DO + do_off[:, None] + d[None, :] * sdo_d, mask=m, other=0.0).to(tl.float32)
    o = tl.load(OUT + o_off[:, None] + d[None, :] * so_d, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(do * o, axis=1), mask=rmask)


@jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, LS, PADV, DK, DV, DBIAS, DLS, DPAD,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sl_b, sl_h, sl_w, sl_n,
    sg_b, sg_h, sg_w, sg_n,
    s_bt, s_bn, s_ls, s_p0, s_pn, s_pd,
    H, W, HP, WP, NWW, NWIN, N_WIN_TOTAL, G, HEADS, HEAD_DIM, SH, SW, scale, mask_value,
    WH: tl.constexpr, WW: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NB: tl.constexpr,
    HAS_BIAS: tl.constexpr, COSINE: tl.constexpr, HAS_PAD: tl.constexpr,
    MASK_H: tl.constexpr, MASK_W: tl.constexpr, USE_MASK: tl.constexpr, PAD_ROLL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    head, kb, g = _program_block(HEADS, NB)
    NP: tl.constexpr = NB * BLOCK
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    mult = _logit_mult(LS, head, s_ls, scale, COSINE)
    bias_ptr = BIAS + head * s_bn
    # where this program's parameter-gradient partials go: its own slot (deterministic) or a shared
    # slot updated with atomics
    if DETERMINISTIC:
        part = g * NB + kb
        bias_part = g
    else:
        part = 0
        bias_part = 0
    rows = tl.arange(0, BLOCK)
    dbias_ptrs = (DBIAS + (bias_part * HEADS + head).to(tl.int64) * (NP * NP)
                  + rows[:, None] * NP + (kb * BLOCK + rows)[None, :])

    dbias_acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    dls_acc = tl.zeros([BLOCK], tl.float32)
    dpk_acc = tl.zeros([BLOCK_D], tl.float32)
    dpv_acc = tl.zeros([BLOCK_D], tl.float32)
    win_lo = g * G
    win_hi = tl.minimum(win_lo + G, N_WIN_TOTAL)
    for win in range(win_lo, win_hi):
        b, k_valid, k_real, k_pad, k_iy, k_ix, k_sy, k_sx, k, v, k_nrm, inv_k, k_reg = _key_block(
            K, V, PADV, kb, win, head, d, dmask, sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
            s_p0, s_pn, s_pd, H, W, HP, WP, NWW, NWIN, SH, SW, WH, WW, BLOCK, HAS_PAD, MASK_H, MASK_W, PAD_ROLL)

        dk_acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        dv_acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for qb in range(NB):
            _, q_valid, q_real, q_iy, q_ix, q_py, q_px, q_sy, q_sx, q = _query_block(
                Q, PADV, qb, win, head, d, dmask, sq_b, sq_h, sq_w, sq_n, sq_d, s_pn, s_pd,
                H, W, HP, WP, NWW, NWIN, SH, SW, WH, WW, BLOCK, HAS_PAD, PAD_ROLL)
            do, lse, delta = _query_grad_rows(DO, LSE, DELTA, b, q_sy, q_sx, head, q_real, d, dmask,
                                              sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h, sl_w, sl_n, H, W, HEADS)
            q_nrm, inv_q, q_reg = _row_stats(q, q_py, q_px, HP, WP, SH, SW, WH, WW, MASK_H, MASK_W)
            s, cos = _logits(q, k, inv_q, inv_k, mult, q_iy, q_ix, k_iy, k_ix, q_valid, k_valid, q_reg,
                             k_reg, bias_ptr, s_bt, mask_value, WH, WW, COSINE, HAS_BIAS, USE_MASK, DOT_PREC)
            p = tl.exp(s - lse[:, None])  # padded / invalid query rows: lse = +inf -> p = 0
            dv_acc += tl.dot(tl.trans(p), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            if HAS_BIAS:
                if NB == 1:
                    dbias_acc += ds
                else:
                    tile_ptrs = dbias_ptrs + qb * BLOCK * NP
                    if DETERMINISTIC:  # this program's own partial: plain read-modify-write
                        tl.store(tile_ptrs, tl.load(tile_ptrs) + ds)
                    else:
                        tl.atomic_add(tile_ptrs, ds)
            if COSINE:
                dls_acc += tl.sum(ds * cos, axis=0)
                dk_acc += tl.dot(tl.trans(ds * inv_q[:, None]), q, input_precision=DOT_PREC)
            else:
                dk_acc += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)

        dk = dk_acc * mult
        if COSINE:
            dk = _norm_bwd(k, dk, k_nrm, inv_k)
        g_mask = k_real[:, None] & dmask[None, :]
        dk_off = _row_offsets(b, k_sy, k_sx, head, sg_b, sg_h, sg_w, sg_n)
        tl.store(DK + dk_off[:, None] + d[None, :], dk.to(DK.dtype.element_ty), mask=g_mask)
        tl.store(DV + dk_off[:, None] + d[None, :], dv_acc.to(DV.dtype.element_ty), mask=g_mask)
        if HAS_PAD:
            dpk_acc += tl.sum(tl.where(k_pad[:, None], dk, 0.0), axis=0)
            dpv_acc += tl.sum(tl.where(k_pad[:, None], dv_acc, 0.0), axis=0)

    if HAS_BIAS:
        if NB == 1:
            if DETERMINISTIC:
                tl.store(dbias_ptrs, dbias_acc)
            else:
                tl.atomic_add(dbias_ptrs, dbias_acc)
    if COSINE:
        dls = tl.sum(dls_acc, axis=0)
        if DETERMINISTIC:
            tl.store(DLS + part * HEADS + head, dls)
        else:
            tl.atomic_add(DLS + part * HEADS + head, dls)
    if HAS_PAD:
        pk_ptrs = DPAD + (part * 2 * HEADS + head) * BLOCK_D + d
        pv_ptrs = pk_ptrs + HEADS * BLOCK_D
        if DETERMINISTIC:
            tl.store(pk_ptrs, dpk_acc)
            tl.store(pv_ptrs, dpv_acc)
        else:
            tl.atomic_add(pk_ptrs, dpk_acc)
            tl.atomic_add(pv_ptrs, dpv_acc)


@jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, LS, PADV, DQ,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sl_b, sl_h, sl_w, sl_n,
    sg_b, sg_h, sg_w, sg_n,
    s_bt, s_bn, s_ls, s_p0, s_pn, s_pd,
    H, W, HP, WP, NWW, NWIN, HEADS, HEAD_DIM, SH, SW, scale, mask_value,
    WH: tl.constexpr, WW: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NB: tl.constexpr,
    HAS_BIAS: tl.constexpr, COSINE: tl.constexpr, HAS_PAD: tl.constexpr,
    MASK_H: tl.constexpr, MASK_W: tl.constexpr, USE_MASK: tl.constexpr, PAD_ROLL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    head, qb, win = _program_block(HEADS, NB)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    mult = _logit_mult(LS, head, s_ls, scale, COSINE)
    bias_ptr = BIAS + head * s_bn
    b, q_valid, q_real, q_iy, q_ix, q_py, q_px, q_sy, q_sx, q = _query_block(
        Q, PADV, qb, win, head, d, dmask, sq_b, sq_h, sq_w, sq_n, sq_d, s_pn, s_pd,
        H, W, HP, WP, NWW, NWIN, SH, SW, WH, WW, BLOCK, HAS_PAD, PAD_ROLL)
    do, lse, delta = _query_grad_rows(DO, LSE, DELTA, b, q_sy, q_sx, head, q_real, d, dmask,
                                      sdo_b, sdo_h, sdo_w, sdo_n, sdo_d, sl_b, sl_h, sl_w, sl_n, H, W, HEADS)
    q_nrm, inv_q, q_reg = _row_stats(q, q_py, q_px, HP, WP, SH, SW, WH, WW, MASK_H, MASK_W)

    dq_acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for kb in range(NB):
        _, k_valid, k_real, k_pad, k_iy, k_ix, k_sy, k_sx, k, v, k_nrm, inv_k, k_reg = _key_block(
            K, V, PADV, kb, win, head, d, dmask, sk_b, sk_h, sk_w, sk_n, sk_d, sv_b, sv_h, sv_w, sv_n, sv_d,
            s_p0, s_pn, s_pd, H, W, HP, WP, NWW, NWIN, SH, SW, WH, WW, BLOCK, HAS_PAD, MASK_H, MASK_W, PAD_ROLL)
        s, _ = _logits(q, k, inv_q, inv_k, mult, q_iy, q_ix, k_iy, k_ix, q_valid, k_valid, q_reg, k_reg,
                       bias_ptr, s_bt, mask_value, WH, WW, COSINE, HAS_BIAS, USE_MASK, DOT_PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if COSINE:
            dq_acc += tl.dot(ds * inv_k[None, :], k, input_precision=DOT_PREC)
        else:
            dq_acc += tl.dot(ds, k, input_precision=DOT_PREC)

    dq = dq_acc * mult
    if COSINE:
        dq = _norm_bwd(q, dq, q_nrm, inv_q)
    dq_off = _row_offsets(b, q_sy, q_sx, head, sg_b, sg_h, sg_w, sg_n)
    tl.store(DQ + dq_off[:, None] + d[None, :], dq.to(DQ.dtype.element_ty), mask=q_real[:, None] & dmask[None, :])


@jit
def _dbias_reduce_kernel(
    PART, OUT, HEADS,
    WH: tl.constexpr, WW: tl.constexpr, WH2: tl.constexpr, WW2: tl.constexpr, NP: tl.constexpr,
):
    """OUT[r, head] = sum of PART[head, i, j] over the (query i, key j) pairs of table row r."""
    pid = tl.program_id(0)
    head = pid % HEADS
    r = pid // HEADS
    dy = r // (2 * WW - 1) - (WH - 1)
    dx = r % (2 * WW - 1) - (WW - 1)
    iy = tl.arange(0, WH2)[:, None]
    ix = tl.arange(0, WW2)[None, :]
    ky = iy - dy
    kx = ix - dx
    m = (iy < WH) & (ix < WW) & (ky >= 0) & (ky < WH) & (kx >= 0) & (kx < WW)
    ptrs = PART + head.to(tl.int64) * (NP * NP) + (iy * WW + ix) * NP + (ky * WW + kx)
    vals = tl.load(ptrs, mask=m, other=0.0)
    tl.store(OUT + r * HEADS + head, tl.sum(tl.sum(vals, axis=1), axis=0))


# ------------------------------------------------------------------------------------------------
# host side


def _pair(value, name: str) -> tuple[int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        return int(value[0]), int(value[1])
    return None


def _check_param(name: str, t, shape: tuple[int, ...], q: Tensor, reasons: list[str]) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        reasons.append(f"{name} must be a Tensor or None, got {type(t).__name__}")
        return
    if tuple(t.shape) != shape:
        reasons.append(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        reasons.append(f"{name} dtype {t.dtype} is not supported by the Triton kernel "
                       f"(float32, float16 or bfloat16)")
    if t.device != q.device:
        reasons.append(f"{name} must be on q's device {q.device}, got {t.device}")


def not_supported_reasons(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size=None,
    shift_size=(0, 0),
    *,
    rel_pos_bias: Tensor | None = None,
    scale: float | None = None,
    logit_scale: Tensor | None = None,
    pad_value: Tensor | None = None,
    shift_mask: bool = True,
    mask_value: float = -100.0,
    order: str = "roll_pad",
) -> list[str]:
    """Why this Triton kernel cannot take these inputs (empty list: it can).

    Takes the arguments of :func:`mmfast.reference.window_attention.window_attention`. Every reason
    starts with the name of the offending argument.
    """
    reasons: list[str] = []
    if _TRITON_ERROR is not None:
        reasons.append(_TRITON_ERROR)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            reasons.append(f"{name} must be a Tensor, got {type(t).__name__}")
    if reasons:
        return reasons
    if q.dim() != 5:
        return [f"q must be [B, H, W, heads, head_dim], got shape {tuple(q.shape)}"]
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            reasons.append(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            reasons.append(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), "
                           f"got ({t.dtype}, {t.device})")
    if q.dtype not in _DTYPES:
        reasons.append(f"q dtype {q.dtype} is not supported by the Triton kernel (float32, float16 or "
                       f"bfloat16); use the reference")
    if q.device.type != "cuda" and not _interpreting():
        reasons.append(f"q is on {q.device}: the Triton kernel needs CUDA tensors "
                       f"(or TRITON_INTERPRET=1 for the CPU interpreter)")
    _, h, w, heads, head_dim = q.shape
    if h < 1 or w < 1 or heads < 1 or head_dim < 1:
        reasons.append(f"q must have non-empty H, W, heads and head_dim, got shape {tuple(q.shape)}")
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"q head_dim {head_dim} is not supported by the Triton kernel (at most {MAX_HEAD_DIM})")
    window = _pair(window_size, "window_size")
    if window is None:
        reasons.append(f"window_size must be an int or a pair of ints, got {window_size!r}")
    elif min(window) < 1:
        reasons.append(f"window_size must be >= 1 on both axes, got {window}")
    elif window[0] * window[1] > MAX_WINDOW_TOKENS:
        reasons.append(f"window_size {window} has {window[0] * window[1]} tokens: this Triton kernel supports "
                       f"windows of at most {MAX_WINDOW_TOKENS} tokens (16x16)")
    shift = _pair(shift_size, "shift_size")
    if shift is None:
        reasons.append(f"shift_size must be an int or a pair of ints, got {shift_size!r}")
    elif window is not None and not all(0 <= s < ws for s, ws in zip(shift, window)):
        reasons.append(f"shift_size must satisfy 0 <= shift < window on both axes, got shift {shift} "
                       f"for window_size {window}")
    if order not in _ORDERS:
        reasons.append(f"order must be one of {_ORDERS}, got {order!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        reasons.append(f"scale must be a float or None, got {scale!r}")
    if isinstance(mask_value, bool) or not isinstance(mask_value, (int, float)):
        reasons.append(f"mask_value must be a float, got {mask_value!r}")
    if window is not None and min(window) >= 1:
        rows = (2 * window[0] - 1) * (2 * window[1] - 1)
        _check_param("rel_pos_bias", rel_pos_bias, (rows, heads), q, reasons)
    _check_param("logit_scale", logit_scale, (heads,), q, reasons)
    _check_param("pad_value", pad_value, (3, heads, head_dim), q, reasons)
    return reasons


def _dot_precision() -> str:
    prec = os.environ.get("MMFAST_TRITON_DOT_PRECISION", "tf32x3")
    if prec not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"MMFAST_TRITON_DOT_PRECISION must be ieee, tf32 or tf32x3, got {prec!r}")
    return prec


def _setup(fn: str, q, k, v, rel_pos_bias, logit_scale, pad_value, window_size, shift_size, scale,
           shift_mask, mask_value, order) -> dict:
    reasons = not_supported_reasons(
        q, k, v, window_size, shift_size, rel_pos_bias=rel_pos_bias, scale=scale, logit_scale=logit_scale,
        pad_value=pad_value, shift_mask=shift_mask, mask_value=mask_value, order=order,
    )
    if reasons:
        raise ValueError(f"{fn}: " + "; ".join(reasons))
    window = _pair(window_size, "window_size")
    shift = _pair(shift_size, "shift_size")
    b, h, w, heads, head_dim = q.shape
    wh, ww = window
    hp = -(-h // wh) * wh
    wp = -(-w // ww) * ww
    block_d = max(16, triton.next_power_of_2(head_dim))
    block, nb = _token_block(wh * ww, block_d, backward=fn.endswith("bwd"))
    if scale is None:
        scale = head_dim**-0.5
    mask_h = bool(shift_mask) and shift[0] > 0
    mask_w = bool(shift_mask) and shift[1] > 0
    dummy = q  # pointer for absent optional tensors (never read)
    bias = rel_pos_bias if rel_pos_bias is not None else dummy
    ls = logit_scale if logit_scale is not None else dummy
    padv = pad_value if pad_value is not None else dummy
    common = dict(
        H=h, W=w, HP=hp, WP=wp, NWW=wp // ww, NWIN=(hp // wh) * (wp // ww), HEADS=heads, HEAD_DIM=head_dim,
        SH=shift[0], SW=shift[1], scale=float(scale), mask_value=float(mask_value),
        WH=wh, WW=ww, BLOCK=block, BLOCK_D=block_d, NB=nb,
        HAS_BIAS=rel_pos_bias is not None, COSINE=logit_scale is not None, HAS_PAD=pad_value is not None,
        MASK_H=mask_h, MASK_W=mask_w, USE_MASK=mask_h or mask_w, PAD_ROLL=order == "pad_roll",
        DOT_PREC=_dot_precision(),
    )
    param_ptrs = (bias, ls, padv)
    param_strides = (
        *(rel_pos_bias.stride() if rel_pos_bias is not None else (0, 0)),
        logit_scale.stride(0) if logit_scale is not None else 0,
        *(pad_value.stride() if pad_value is not None else (0, 0, 0)),
    )
    return dict(common=common, param_ptrs=param_ptrs, param_strides=param_strides, batch=b,
                n_windows=b * common["NWIN"], heads=heads, window=window, num_warps=4 if block_d <= 64 else 8)


def _token_block(n: int, block_d: int, *, backward: bool) -> tuple[int, int]:
    """(BLOCK, NB): tokens per block (a power of two, 16 to MAX_BLOCK) and blocks per window.

    The backward keeps six [BLOCK, BLOCK_D] fp32 tiles live per program, so it halves the block for
    head_dim 128 (register pressure).
    """
    cap = MAX_BLOCK if not (backward and block_d >= 128) else min(MAX_BLOCK, 32)
    block = min(cap, max(16, triton.next_power_of_2(n)))
    return block, -(-n // block)


@on_tensor_device
def window_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    pad_value: Tensor | None = None,
    *,
    window_size,
    shift_size=(0, 0),
    scale: float | None = None,
    shift_mask: bool = True,
    mask_value: float = -100.0,
    order: str = "roll_pad",
) -> tuple[Tensor, Tensor]:
    """Forward of the fused window attention (see the module docstring and the reference op).

    Args:
        q, k, v: ``[B, H, W, heads, head_dim]``, any strides (e.g. views of a fused qkv tensor),
            float32 / float16 / bfloat16.
        rel_pos_bias: ``[(2*Wh-1)*(2*Ww-1), heads]`` or None. logit_scale: ``[heads]`` (cosine
            attention, already clamped and exponentiated) or None. pad_value: ``[3, heads, head_dim]``
            (q, k, v of padded tokens) or None (zeros).
        window_size, shift_size, scale, shift_mask, mask_value, order: as the reference op.

    Returns:
        ``(out, lse)``: ``out`` ``[B, H, W, heads, head_dim]`` contiguous in q's dtype, ``lse``
        ``[B, H, W, heads]`` float32, the log-sum-exp of each query's logits (for the backward).
    """
    cfg = _setup("window_attention_fwd", q, k, v, rel_pos_bias, logit_scale, pad_value, window_size,
                 shift_size, scale, shift_mask, mask_value, order)
    b, h, w, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, w, heads), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    c = cfg["common"]
    grid = (cfg["n_windows"] * c["NB"] * heads,)
    _fwd_kernel[grid](
        q, k, v, *cfg["param_ptrs"], out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *cfg["param_strides"],
        **c, num_warps=cfg["num_warps"], num_stages=1,
    )
    return out, lse


def _windows_per_program(n_windows: int, programs_per_window: int) -> int:
    if WINDOWS_PER_PROGRAM is not None:
        return max(1, int(WINDOWS_PER_PROGRAM))
    return max(1, min(_MAX_GROUP, n_windows * programs_per_window // _TARGET_PROGRAMS))


@on_tensor_device
def window_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    rel_pos_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    pad_value: Tensor | None = None,
    *,
    window_size,
    shift_size=(0, 0),
    scale: float | None = None,
    shift_mask: bool = True,
    mask_value: float = -100.0,
    order: str = "roll_pad",
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Backward of :func:`window_attention_fwd` (P recomputed from ``lse``).

    Args:
        dout: gradient of ``out``, ``[B, H, W, heads, head_dim]``, any strides.
        q, k, v, rel_pos_bias, logit_scale, pad_value and the keywords: as given to the forward.
        out, lse: the forward's outputs.
        deterministic: accumulate the parameter gradients (bias table, logit_scale, pad_value) into
            per-program partials summed in a fixed order (bitwise reproducible) instead of atomics.

    Returns:
        ``(dq, dk, dv, d_rel_pos_bias, d_logit_scale, d_pad_value)``. ``dq, dk, dv`` are in q's dtype,
        views of one ``[B, H, W, 3, heads, head_dim]`` buffer; the parameter gradients are in their
        parameter's dtype, None where the parameter is None. ``d_pad_value[0]`` is zero (padded
        queries are cropped away).
    """
    cfg = _setup("window_attention_bwd", q, k, v, rel_pos_bias, logit_scale, pad_value, window_size,
                 shift_size, scale, shift_mask, mask_value, order)
    for name, t in (("dout", dout), ("out", out)):
        if not isinstance(t, Tensor) or t.shape != q.shape or t.device != q.device:
            raise ValueError(f"window_attention_bwd: {name} must be a tensor of q's shape {tuple(q.shape)} "
                             f"on {q.device}, got {getattr(t, 'shape', t)!r}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"window_attention_bwd: {name} dtype {t.dtype} is not supported")
    b, h, w, heads, head_dim = q.shape
    if (not isinstance(lse, Tensor) or tuple(lse.shape) != (b, h, w, heads) or lse.dtype != torch.float32
            or lse.device != q.device):
        raise ValueError(f"window_attention_bwd: lse must be a float32 tensor of shape {(b, h, w, heads)} "
                         f"on {q.device}, got {getattr(lse, 'shape', lse)!r}")
    c = cfg["common"]
    dev = q.device
    dqkv = torch.empty((b, h, w, 3, heads, head_dim), dtype=q.dtype, device=dev)
    dq, dk, dv = dqkv.unbind(3)
    n_windows = cfg["n_windows"]
    nb, block, block_d = c["NB"], c["BLOCK"], c["BLOCK_D"]
    npad = nb * block
    wh, ww = cfg["window"]
    table_rows = (2 * wh - 1) * (2 * ww - 1)

    def _zero_grads():
        return (dq.zero_(), dk.zero_(), dv.zero_(),
                None if rel_pos_bias is None else torch.zeros_like(rel_pos_bias),
                None if logit_scale is None else torch.zeros_like(logit_scale),
                None if pad_value is None else torch.zeros_like(pad_value))

    if q.numel() == 0:
        return _zero_grads()

    # delta = rowsum(dout * out)
    delta = torch.empty((b, h, w, heads), dtype=torch.float32, device=dev)
    n_rows = delta.numel()
    block_r = 32
    _bwd_delta_kernel[(triton.cdiv(n_rows, block_r),)](
        dout, out, delta, n_rows, h, w, heads, head_dim, *dout.stride(), *out.stride(),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )

    # dk, dv and the parameter gradients
    group = _windows_per_program(n_windows, nb * heads)
    if deterministic and rel_pos_bias is not None:
        per_group = heads * npad * npad * 4
        group = max(group, triton.cdiv(n_windows * per_group, _DETERMINISTIC_PART_BYTES))
    n_groups = triton.cdiv(n_windows, group)
    n_parts = n_groups * nb if deterministic else 1
    n_bias_parts = n_groups if deterministic else 1
    f32 = dict(dtype=torch.float32, device=dev)
    dbias_part = torch.zeros((n_bias_parts, heads, npad, npad) if rel_pos_bias is not None else (1,), **f32)
    dls_part = torch.zeros((n_parts, heads) if logit_scale is not None else (1,), **f32)
    dpad_part = torch.zeros((n_parts, 2, heads, block_d) if pad_value is not None else (1,), **f32)
    grad_strides = dqkv.stride()[:3] + dqkv.stride()[4:5]
    common_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(), *grad_strides,
                      *cfg["param_strides"])
    _bwd_dkdv_kernel[(n_groups * nb * heads,)](
        q, k, v, dout, lse, delta, *cfg["param_ptrs"], dk, dv, dbias_part, dls_part, dpad_part,
        *common_strides,
        c["H"], c["W"], c["HP"], c["WP"], c["NWW"], c["NWIN"], n_windows, group, heads, head_dim,
        c["SH"], c["SW"], c["scale"], c["mask_value"],
        **{key: c[key] for key in ("WH", "WW", "BLOCK", "BLOCK_D", "NB", "HAS_BIAS", "COSINE", "HAS_PAD",
                                   "MASK_H", "MASK_W", "USE_MASK", "PAD_ROLL", "DOT_PREC")},
        DETERMINISTIC=bool(deterministic), num_warps=cfg["num_warps"], num_stages=1,
    )

    # dq
    _bwd_dq_kernel[(n_windows * nb * heads,)](
        q, k, v, dout, lse, delta, *cfg["param_ptrs"], dq,
        *common_strides, **c, num_warps=cfg["num_warps"], num_stages=1,
    )

    d_bias = d_ls = d_pad = None
    if rel_pos_bias is not None:
        part = dbias_part.sum(0) if n_bias_parts > 1 else dbias_part[0]
        part = part.contiguous()
        table = torch.empty((table_rows, heads), **f32)
        _dbias_reduce_kernel[(table_rows * heads,)](
            part, table, heads, WH=wh, WW=ww, WH2=triton.next_power_of_2(wh), WW2=triton.next_power_of_2(ww),
            NP=npad, num_warps=1,
        )
        d_bias = table.to(rel_pos_bias.dtype)
    if logit_scale is not None:
        d_ls = dls_part.sum(0).to(logit_scale.dtype)
    if pad_value is not None:
        d_pad = torch.zeros((3, heads, head_dim), **f32)
        d_pad[1:] = dpad_part.sum(0)[..., :head_dim]
        d_pad = d_pad.to(pad_value.dtype)
    return dq, dk, dv, d_bias, d_ls, d_pad

