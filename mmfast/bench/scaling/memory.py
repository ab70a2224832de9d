"""Peak loss memory per rank: each implementation's allocations replayed in order (:class:`_Heap`)."""

from __future__ import annotations

import math

from mmfast.bench.scaling.hardware import Problem, stat_bytes


class _Mem:
    """Replays a sequence of allocations and frees (bytes); ``peak`` is the most alive at once."""

    def __init__(self) -> None:
        self.live: dict[str, int] = {}
        self.now = 0
        self.peak = 0

    def alloc(self, name: str, nbytes: float) -> None:
        self.free(name)
        self.live[name] = int(nbytes)
        self.now += int(nbytes)
        self.peak = max(self.peak, self.now)

    def free(self, *names: str) -> None:
        for name in names:
            self.now -= self.live.pop(name, 0)

    def tmp(self, nbytes: float) -> None:
        """An allocation freed right away (a temporary inside one op)."""
        self.peak = max(self.peak, self.now + int(nbytes))


#: Programs per launch of mmfast's Triton kernels on the GPU the ``nccl`` flavour assumes (an H200:
#: 132 SMs, two programs each): it sets how many partial buffers the gradient kernels sum.
GPU_PROGRAMS = 264


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tsplit(n_blocks: int, parts: int) -> int:
    """How many non-empty parts mmfast's Triton kernels cut ``n_blocks`` into (``_split``)."""
    parts = max(1, min(parts, n_blocks))
    return _cdiv(n_blocks, _cdiv(n_blocks, parts))


class _Heap(_Mem):
    """A :class:`_Mem` whose tensors are held by named variables: a tensor is freed when its last holder
    lets go (Python's reference counting), so that a replay can follow the code line by line."""

    def __init__(self) -> None:
        super().__init__()
        self._size: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._vars: dict[str, int] = {}
        self._next = 0

    def new(self, nbytes: float, *holders: str) -> None:
        """A new tensor of ``nbytes``, held by ``holders`` (each of which lets go of what it held)."""
        tid, self._next = self._next, self._next + 1
        self._size[tid], self._refs[tid] = int(nbytes), 0
        self.now += int(nbytes)
        self.peak = max(self.peak, self.now)
        for h in holders:
            self._hold(h, tid)

    def alias(self, var: str, other: str) -> None:
        """``var = other`` (``other`` unbound: ``var = None``)."""
        self._hold(var, self._vars.get(other))

    def drop(self, *holders: str) -> None:
        """``var = None`` for each."""
        for h in holders:
            self._hold(h, None)

    def drop_prefix(self, prefix: str) -> None:
        """Every variable whose name starts with ``prefix`` lets go (a frame that returns)."""
        self.drop(*[v for v in self._vars if v.startswith(prefix)])

    def _hold(self, var: str, tid: int | None) -> None:
        old = self._vars.pop(var, None)
        if tid is not None:
            self._vars[var] = tid
            self._refs[tid] += 1
        if old is not None:
            self._refs[old] -= 1
            if not self._refs[old]:
                self.now -= self._size.pop(old)
                del self._refs[old]


class _Kernels:
    """What one tile-kernel call allocates. ``gloo``: the C++ kernels (fp32 copies of 16-bit inputs,
    ``min(M, 1024) x min(N, 1024)`` tile buffers, the statistics' accumulators); ``nccl``: the Triton
    kernels (the gradient kernels write ``splits`` fp32 partials of ``[M, D]`` and sum them, the
    softmax forward a few O(M + N) partials)."""

    def __init__(self, h: _Heap, prob: Problem, backend: str):
        self.h, self.d, self.es, self.fs = h, prob.dim, prob.es, stat_bytes(prob.dtype)
        self.gloo = backend == "gloo"

    def _cast(self, rows: int) -> int:
        return rows * self.d * self.fs if self.gloo and self.es < self.fs else 0

    def _tile(self, m: int, n: int) -> int:
        return min(m, 1024) * min(n, 1024) * self.fs

    def _grad_splits(self, lx: int, ly: int) -> int:
        return _tsplit(_cdiv(ly, 128), min(8, GPU_PROGRAMS // _cdiv(lx, 64)))

    def softmax_fwd(self, m: int, n: int, out: str) -> None:
        """Outputs ``<out>_r`` (row lse + mean logit, ``[2, M]``) and ``<out>_c`` (``[2, N]``)."""
        h, fs = self.h, self.fs
        h.new(2 * m * fs, out + "_r")
        h.new(2 * n * fs, out + "_c")
        if self.gloo:
            h.tmp(self._cast(m) + self._cast(n) + 3 * (m + n) * fs + self._tile(m, n))
        else:
            r, c = _cdiv(m, 128), _cdiv(n, 128)
            s_r = min(r, GPU_PROGRAMS, max(1, round(math.sqrt(GPU_PROGRAMS * r / c))))
            s_c = _tsplit(c, GPU_PROGRAMS // s_r)
            h.tmp(2 * 4 * ((s_c * m if s_c > 1 else 0) + (s_r * n if s_r > 1 else 0)))

    def sigmoid_fwd(self, m: int, n: int, out: str) -> None:
        """Output ``<out>_r`` (row sums ``[M]``)."""
        h, fs = self.h, self.fs
        h.new(m * fs, out + "_r")
        if self.gloo:
            h.tmp(self._cast(m) + self._cast(n) + self._tile(m, n))
        else:
            splits = _tsplit(_cdiv(n, 128), GPU_PROGRAMS // _cdiv(m, 128))
            h.tmp(splits * m * 4 if splits > 1 else 0)

    def grads(self, m: int, n: int, out: str, two_tiles: bool = False, sigmoid: bool = False) -> None:
        """Outputs ``<out>_a`` ``[M, D]`` and ``<out>_b`` ``[N, D]`` (accumulation dtype). ``two_tiles``:
        the softmax backward with a second set of weights (C++: a second tile buffer)."""
        h, d, fs = self.h, self.d, self.fs
        if self.gloo:
            h.new(m * d * fs, out + "_a")
            h.new(n * d * fs, out + "_b")
            h.tmp(self._cast(m) + self._cast(n) + self._tile(m, n) * (2 if two_tiles else 1)
                  + (2 * m * fs if sigmoid else 0))
            return
        for rows, cols, name in ((m, n, "_a"), (n, m, "_b")):
            splits = self._grad_splits(rows, cols)
            h.new(rows * d * fs, out + name)
            h.tmp(splits * rows * d * fs if splits > 1 else 0)  # the partials, summed into the output


def _header_memory(h: _Heap, prob: Problem) -> None:
    """The header exchange: the image rows' norms, the 8 fields, the gathered table and its integer views."""
    h.tmp(prob.batch * prob.es + 64 + prob.world * (64 + 48))


def _clip_weight_memory(h: _Heap, prob: Problem, local_loss: bool, gather_with_grad: bool) -> None:
    """common.clip_weights: the column weights (two sets with local_loss and not gather_with_grad)."""
    n, fs = prob.n, stat_bytes(prob.dtype)
    h.new(n * fs * (2 if local_loss and not gather_with_grad else 1), "w")
    h.tmp(2 * n * fs)  # the owners' batch sizes and upstream gradients, repeated per column


def _grad_epilogue_memory(h: _Heap, prob: Problem, clip: bool) -> None:
    """common.clip_grads_out / siglip_grads_out: the positive pairs' terms and the final scale added
    in place; with 16-bit features the accumulation-dtype copies of the features (one at a time for
    CLIP, both for SigLIP) and the returned gradients cast to the features' dtype."""
    fs = stat_bytes(prob.dtype)
    if prob.es != fs:
        a = prob.batch * prob.dim * fs
        h.tmp(a if clip else 2 * a)
        h.new(2 * prob.batch * prob.dim * prob.es, "bwd_out")


def mmfast_memory(prob: Problem, g: int, loss: str, backend: str = "nccl", order: str = "column-first",
                   local_loss: bool = True, gather_with_grad: bool = True) -> int:
    """Peak bytes allocated inside mmfast's ``gather`` loss (forward + backward), equal batches, by
    replaying the allocations of :mod:`mmfast.distributed.gather` in order (each tensor freed when the
    last variable holding it lets go); ``order="intra-first"``: :func:`_mmfast_memory_intra_first`
    (the what-if).

    Forward: the column block ``K*B*D`` (column all-gather), the group all-gather's output ``N*D`` (by
    position), the texts in rank order (a copy when g > 1 and K > 1; kept for backward), the copy of
    the other columns (``index_select``), the O(N) column statistics and their all-reduce (CLIP).
    Backward: the kept texts, the partials ``N*D`` in the feature dtype, per column set its copy
    (``index_select``) and the kernel's gradients (with their cast to the feature dtype); the group
    reduce-scatter's padded copy of the partials, its by-position transpose (a copy when K > 1) and
    its output; the own block's padded partials and their sum with the group's, the column
    reduce-scatter's output. ``backend="nccl"``: a GPU with NCCL and the Triton kernels;
    ``"gloo"``: CPU, gloo and the C++ kernels (:class:`_Kernels`), gloo's all-gather buffers (one of
    the output's size during the call; when async, a second one until the wait) and the all-to-all's
    receive buffer (the size of its input, until its chunks are summed).
    """
    if order == "intra-first":
        return _mmfast_memory_intra_first(prob, g, loss, backend)
    w, b, d, n, es, fs = prob.world, prob.batch, prob.dim, prob.n, prob.es, stat_bytes(prob.dtype)
    k = w // g
    own = k * b  # the column block: ranks j * g + p
    oth = n - own  # every other column (none when g == 1)
    gloo, clip = backend == "gloo", loss == "clip"
    h = _Heap()
    kern = _Kernels(h, prob, backend)
    _header_memory(h, prob)
    # ---- forward: _TextExchange
    h.new(0, "f_local")  # the text itself
    if k > 1:
        h.new(own * d * es, "f_col")
        if gloo:
            h.tmp(own * d * es)
    else:
        h.alias("f_col", "f_local")
    if g > 1:
        h.new(n * d * es, "f_by_pos")
        if gloo:
            h.tmp(n * d * es)
            h.new(n * d * es, "f_ag_buf")  # to the wait
    else:
        h.alias("f_by_pos", "f_col")
    h.new(n * 8, "f_idx")  # _column_split's index tensors
    (kern.softmax_fwd if clip else kern.sigmoid_fwd)(b, own, "f_st1")
    h.drop("f_ag_buf")  # wait_all
    if g > 1 and k > 1:  # [g, K, B, D] -> rank order: a copy (else a view)
        h.new(n * d * es, "texts")
    else:
        h.alias("texts", "f_by_pos")
    if clip:
        h.new(n * fs, "f_col_lse")
        h.new(n * fs, "f_col_el")
        h.drop("f_st1_c")
    if oth:
        h.new(oth * d * es, "f_sel")
        (kern.softmax_fwd if clip else kern.sigmoid_fwd)(b, oth, "f_st2")
        h.tmp(4 * b * fs)
        h.new((2 if clip else 1) * b * fs, "rows")  # the merged row statistics (SigLIP: the sum)
        h.drop("f_st2_r", "f_st2_c", "f_sel")
    else:
        h.alias("rows", "f_st1_r")
    h.drop("f_st1_r")
    h.tmp(b * d * fs + (2 * b * d * fs if es != fs else 0))  # positive_logits
    if clip:
        h.tmp(n * (4 + 8 + 8))  # logit_bound: the fp32 norms, in fp64, the product
        h.new(n * 8, "f_shift")
        h.tmp(6 * n * 8)  # combine_column_stats: fp64 copies, exp, weighted, the packed all-reduce
        h.new(n * fs, "col_lse")
        h.new(n * fs, "f_col_el")
    h.drop_prefix("f_")  # saved: the texts, the row and column log-sum-exp (CLIP)
    # ---- backward
    if clip:
        _clip_weight_memory(h, prob, local_loss, gather_with_grad)
    h.new(n * 8, "idx")
    h.new(n * d * es, "partial")
    h.new(b * d * fs, "d_image")
    two = clip and local_loss and not gather_with_grad

    def grads(cols: int, out: str) -> None:  # the column set's copy, the kernel, the cast
        h.new(cols * d * es + (2 * cols * fs if clip else 0), "g_sel")
        kern.grads(b, cols, "g_k", two_tiles=two, sigmoid=not clip)
        if es != fs:
            h.new(cols * d * es, out)
        else:
            h.alias(out, "g_k_b")
        h.drop("g_k_a", "g_k_b", "g_sel")

    if oth:
        grads(oth, "dt_oth")
        h.drop("dt_oth")  # index_copy_ into the partials
    if g > 1:  # padded copy of the partials, by position (a copy when K > 1), async reduce-scatter
        h.new(n * d * es, "r_full")
        if k > 1:
            h.new(n * d * es, "r_by_pos")
        else:
            h.alias("r_by_pos", "r_full")
        if gloo:
            h.new(n * d * es, "r_recv")
        else:
            h.new(own * d * es, "r_grp")
    grads(own, "r_dt_own")
    h.new(own * d * es, "r_own")  # padded_blocks of the own block's gradients
    h.drop("r_dt_own")
    if g > 1:
        if gloo:
            h.new(own * d * es, "r_grp")  # the sum of the received chunks
            h.drop("r_recv")
        h.new(own * d * es, "r_own")  # own + group's
    if k > 1:
        if gloo:
            h.tmp(own * d * es)
        h.new(b * d * es, "mine")
    else:
        h.alias("mine", "r_own")
    h.drop_prefix("r_")
    if es != fs:
        h.new(b * d * fs, "mine")
    _grad_epilogue_memory(h, prob, clip)
    return h.peak


def ring_memory(prob: Problem, g: int, loss: str, backend: str = "nccl", local_loss: bool = True,
                 gather_with_grad: bool = True) -> int:
    """Peak bytes allocated inside mmfast's ``ring`` loss (forward + backward), equal batches, by
    replaying the allocations of :mod:`mmfast.distributed.ring` in order.

    Each pass runs once per column chunk (:func:`mmfast.distributed.ring.chunking`: ``c`` chunks of
    ``R`` rows), so every buffer of the walk is a chunk's, ``R*D``. The walk: per step the other
    members' pieces (``g - 1`` receive buffers, each let go once its tiles ran), then the ring piece,
    with the next ring piece's receive buffer posted between the two (two ring pieces alive until the
    next step begins). Tiles run one piece (``B x R``) at a time. Forward: the O(N) column statistics
    and bounds, their fp64 all-reduce. Backward (own block last): the image gradient ``B*D`` and
    (``c > 1``) the text gradient ``c*R*D`` for the whole call; per other piece the kernel's
    gradients (``B*D`` for the image rows, added at once, and the piece's ``R*D`` partial, kept to
    the exchange), before the ring piece's tiles the group's partials exchanged (``g - 1`` receive
    buffers) and summed with the incoming ring sum into one buffer, which takes the ring piece's
    partial and moves on (the send kept until the next step's first piece, the next receive buffer
    posted with it); at the chunk's end the sum is copied into the text gradient. Nothing scales with
    ``W*B*D``: ``O(B*D + g*R*D + W*B)``. ``backend``: as :func:`mmfast_memory`.
    """
    from mmfast.distributed.ring import chunking

    w, b, d, n, es, fs = prob.world, prob.batch, prob.dim, prob.n, prob.es, stat_bytes(prob.dtype)
    k = w // g
    chunks, rows = chunking(b, d * es)
    piece, acc = rows * d * es, rows * d * fs
    clip = loss == "clip"
    h = _Heap()
    kern = _Kernels(h, prob, backend)

    def walk(tag: str, own_last: bool, chunk: int):
        """_walk: yields (s, q) once the caller holds the piece as ``<tag>piece`` (the caller drops it)."""
        cv, nv = f"{tag}_w_cur", f"{tag}_w_nxt"
        order = list(range(1, k)) + [0] if own_last else list(range(k))
        if order[0] != 0:
            h.new(piece, nv)
        for i, s in enumerate(order):
            if s == 0:
                h.new(piece if (chunk + 1) * rows > b else 0, cv)  # the text's rows (a padded copy at the tail)
            else:
                h.alias(cv, nv)  # cur = nxt.wait(); the previous ring piece, sent, is let go
                h.drop(nv)
                h.drop(f"{tag}_w_sent")
            for q in range(1, g):
                h.new(piece, f"{tag}_w_got{q}")
            for q in range(1, g):
                h.alias(tag + "piece", f"{tag}_w_got{q}")
                h.drop(f"{tag}_w_got{q}")
                yield s, q
            if i + 1 < len(order) and order[i + 1] != 0:
                h.new(piece, nv)
                h.alias(f"{tag}_w_sent", cv)  # kept by the exchange until the next wait
            h.alias(tag + "piece", cv)
            h.drop(cv)
            yield s, 0
        h.drop_prefix(f"{tag}_w_")

    _header_memory(h, prob)
    # ---- forward
    if clip:
        h.new(n * fs, "f_col_lse")
        h.new(n * fs, "f_col_el")
        h.new(n * 8, "f_shift")
    else:
        h.new(b * fs, "f_total")
    first = True
    for chunk in range(chunks):
        for _ in walk("f_", False, chunk):
            if clip:
                h.tmp(rows * (4 + 8 + 8 + 8))  # logit_bound of the piece
                kern.softmax_fwd(b, rows, "f_st")
                if not first:
                    h.tmp(4 * b * fs)
                    h.new(2 * b * fs, "rows")  # merge_lse
                else:
                    h.alias("rows", "f_st_r")
                h.drop("f_st_r", "f_st_c")
            else:
                kern.sigmoid_fwd(b, rows, "f_st")
                h.new(b * fs, "f_total")
                h.drop("f_st_r")
            first = False
            h.drop("f_piece")
    h.tmp(b * d * fs + (2 * b * d * fs if es != fs else 0))  # positive_logits
    if clip:
        h.tmp(6 * n * 8)  # combine_column_stats
        h.new(n * fs, "col_lse")
        h.new(n * fs, "f_col_el")
    h.drop_prefix("f_")  # saved: the row and column log-sum-exp (CLIP)
    # ---- backward
    if clip:
        _clip_weight_memory(h, prob, local_loss, gather_with_grad)
    h.new(b * d * fs, "d_image")
    if chunks > 1:
        h.new(chunks * rows * d * fs, "d_text")
    two = clip and local_loss and not gather_with_grad
    for chunk in range(chunks):
        incoming = False
        for s, q in walk("b_", True, chunk):
            h.drop("b_sent")  # incoming.release_sends()
            if q == 0:
                if g > 1:  # the partials exchanged inside the group, summed into the first receive buffer
                    for o in range(1, g):
                        h.new(acc, f"b_recv{o}")
                    h.drop(*[f"b_part{o}" for o in range(1, g)])
                    h.alias("b_total", "b_recv1")
                    h.drop(*[f"b_recv{o}" for o in range(1, g)])
                if incoming:
                    if g > 1:
                        h.drop("b_in")  # added into the total
                    else:
                        h.alias("b_total", "b_in")
                        h.drop("b_in")
            kern.grads(b, rows, "b_k", two_tiles=two, sigmoid=not clip)
            h.drop("b_k_a", "b_piece")  # d_i added into d_image; the piece (an argument) let go
            if q:
                h.alias(f"b_part{q}", "b_k_b")
                h.drop("b_k_b")
                continue
            if g > 1 or incoming:
                h.drop("b_k_b")  # total += part
            else:
                h.alias("b_total", "b_k_b")
                h.drop("b_k_b")
            if s == 0:
                break
            h.alias("b_sent", "b_total")  # the sum moves on (kept by its send) ...
            h.drop("b_total")
            h.new(acc, "b_in")  # ... and the next one is received
            incoming = True
        if chunks == 1:
            h.alias("d_text", "b_total")
        h.drop_prefix("b_")  # (c > 1: copied into d_text)
    _grad_epilogue_memory(h, prob, clip)
    return h.peak


def _mmfast_memory_intra_first(prob: Problem, g: int, loss: str, backend: str = "nccl") -> int:
    """Peak bytes of the intra-first what-if (mmfast's first implementation: texts gathered inside
    the group, then group blocks over the column), replaying that implementation's allocations.

    Forward: the gathered texts ``N*D`` (kept for backward), the group block, the copy of the other
    groups' columns (``torch.cat``, alive to the end of forward), the O(N) column statistics (CLIP).
    Backward: the kept texts, the fp32 partials ``N*D``, the other columns' copy (``index_select``)
    and their fp32 gradient from the kernel (kept to the end by CLIP's backward), the partials cast to
    the feature dtype (no copy in fp32), the reduce-scatter buffers. ``backend="nccl"``: a GPU with
    NCCL and the Triton kernels (no workspace); ``"gloo"``: CPU, gloo and the C++ kernels, which
    make fp32 copies of the ``M x D`` rows (and, for 16-bit features, of the columns), and gloo's
    own buffers (all-gather: one of the output's
    size during the call, to the wait when async; reduce-scatter: a copy of the input, kept, like
    the output, as long as the async work object).
    """
    w, b, d, n, es, fs = prob.world, prob.batch, prob.dim, prob.n, prob.es, stat_bytes(prob.dtype)
    k, own = w // g, g * b
    oth = n - own if k > 1 else 0
    gloo, clip = backend == "gloo", loss == "clip"

    def ws(cols: int) -> int:  # the C++ kernels' fp32 copies (rows; columns too for 16-bit features)
        return (b * d * fs + (cols * d * fs if es < 4 else 0)) if gloo else 0

    m = _Mem()
    # ---- forward
    m.alloc("sizes", 32 * (w + 1))
    if g > 1:
        m.alloc("grp", own * d * es)
        if gloo:
            m.tmp(own * d * es)
    if k > 1:
        m.alloc("all", n * d * es)
        if gloo:
            m.alloc("ag_tmp", n * d * es)
    m.tmp(ws(own))
    m.alloc("own_stats", (2 * b + (2 * own if clip else 0)) * fs)
    m.free("ag_tmp")
    if clip:
        m.alloc("col_lse", n * fs)
        m.alloc("col_el", n * fs)
    if k > 1:
        m.alloc("others", oth * d * es)
        m.tmp(ws(oth))
        m.alloc("oth_stats", (2 * b + (2 * oth if clip else 0)) * fs)
    if clip:
        m.tmp(6 * n * fs)  # gmax, weights, stacked sums, logs
    m.free("sizes", "grp" if k > 1 else "", "own_stats", "others", "oth_stats", "col_el")
    # ---- backward
    if clip:
        m.alloc("vec", 3 * n * fs)  # owner_b, a_col, b_col
    m.alloc("partial", n * d * fs)
    m.alloc("d_image", b * d * fs)
    if k > 1:
        m.alloc("cols", oth * 8)
        m.alloc("sel", oth * d * es + (2 * oth * fs if clip else 0))
        m.alloc("d_i", b * d * fs)
        m.alloc("d_t", oth * d * fs)
        m.tmp(ws(oth))
        m.free("sel")
        if not clip:  # SigLIP's kernel outputs are temporaries
            m.free("d_i", "d_t")
    if es != fs:
        m.alloc("partial_lp", n * d * es)
    if k > 1:
        m.alloc("grp_rs", own * d * es)
        if gloo:
            m.alloc("rs_copy", n * d * es)
    m.alloc("own_di", b * d * fs)
    m.alloc("own_dt", own * d * fs)
    m.tmp(ws(own))
    m.free("own_di")
    if es != fs:
        m.alloc("own_lp", own * d * es)
        m.free("own_dt")
    if k > 1:  # grp + own: the old grp stays alive with the async work object that wrote it
        m.alloc("grp_sum", own * d * es)
    if g > 1:
        m.alloc("mine", b * d * es)
        if gloo:
            m.tmp(own * d * es)
    return m.peak


def open_clip_memory(prob: Problem, local_loss: bool, gather_with_grad: bool, backend: str = "nccl") -> int:
    """Peak bytes allocated inside open_clip's ClipLoss, replaying its allocations: the all-gathered
    lists and their ``torch.cat`` (kept for the matmuls), the scaled features, the logits and their
    log-softmax (``rows x N`` each, two directions), the gradients through cross-entropy and the
    matmuls (``N x D`` for the gathered side), and the backward of the all-gathers (gloo: its
    all-to-all emulation's chunk copies, buffer and stack)."""
    b, d, n, es = prob.batch, prob.dim, prob.n, prob.es
    gloo = backend == "gloo"
    rows = b if local_loss else n
    nd = n * d * es
    m = _Mem()
    for f in ("img", "txt"):
        m.alloc(f"list_{f}", nd)
        if gloo:
            m.tmp(nd)
        m.alloc(f"all_{f}", nd)
        m.free(f"list_{f}")
    for f in ("img", "txt"):  # without local_loss, logits_per_text is a view (a transpose)
        m.alloc(f"scaled_{f}", rows * d * es if local_loss or f == "img" else 0)
        m.alloc(f"logits_{f}", rows * n * es if local_loss or f == "img" else 0)
    for f in ("img", "txt"):
        m.alloc(f"lsm_{f}", rows * n * es)
    m.free("logits_img", "logits_txt")
    for f in ("txt", "img"):  # cross-entropy backward: the nll gradient, then the logits gradient
        m.alloc(f"g_nll_{f}", rows * n * es)
        m.alloc(f"g_logits_{f}", rows * n * es)
        m.free(f"g_nll_{f}", f"lsm_{f}")
    for f, other in (("txt", "img"), ("img", "txt")):  # matmul backward of each direction
        m.alloc(f"g_all_{other}", nd if gather_with_grad or not local_loss else 0)
        m.alloc(f"g_scaled_{f}", rows * d * es)
        m.free(f"g_logits_{f}", f"all_{other}")
        m.alloc(f"g_feat_{f}", b * d * es)  # through the scaling: the local features' gradient
        m.free(f"g_scaled_{f}")
    if gather_with_grad:
        for f in ("img", "txt"):
            if gloo:  # all-to-all emulation: W chunk buffers, the root's scatter buffer, stack, sum
                m.alloc("a2a_out", nd)
                m.tmp(nd)
                m.alloc("a2a_stack", nd)
                m.tmp(b * d * es)
                m.free("a2a_out", "a2a_stack")
            m.free(f"g_all_{f}")
    return m.peak
