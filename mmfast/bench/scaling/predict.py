"""The predictions per scheme (mmfast gather and ring, open_clip, Inf-CL) and the recommendation of
mmfast's ``(group_size, exchange)``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mmfast.bench.scaling.collectives import Builder, Collective, Stage
from mmfast.bench.scaling.hardware import (
    DEFAULT_MEMORY_BUDGET,
    DGX_H200,
    EXCHANGES,
    H200_BF16,
    OPEN_CLIP_LOGIT_PASSES,
    OPEN_CLIP_SIGLIP_PASSES,
    Cluster,
    ComputeRates,
    Problem,
    stat_bytes,
)
from mmfast.bench.scaling.memory import mmfast_memory, open_clip_memory, ring_memory
from mmfast.bench.scaling.prediction import Prediction, tile_bwd, tile_fwd


def _merge_all(stages: list[Stage]) -> list[Stage]:
    """Stages of the same name, collectives and compute as one stage with a repeat count, wherever
    they occur (times and bytes add, so a step's stages repeated K times are its stages K times)."""
    out: dict[tuple, Stage] = {}
    for st in stages:
        key = (st.name, tuple((c.op, c.group, c.payload, c.dtype, c.phase) for c in st.comm), st.compute_s,
               st.overlap, st.concurrent)
        if key in out:
            out[key].repeat += st.repeat
        else:
            out[key] = st
    return list(out.values())


def _reduce_scatter_op(backend: str) -> str:
    """What :func:`mmfast.distributed.comm.reduce_scatter` issues: NCCL's reduce-scatter, gloo an all-to-all."""
    return "reduce_scatter_tensor" if backend == "nccl" else "all_to_all_single"


def _groups(prob: Problem, group_size: int, backend: str, order: str = "column-first") -> tuple[int, int, str]:
    """The checked arguments of an mmfast prediction: ``(K = W / g groups, the statistics' element
    size, their dtype)`` (fp64 statistics for fp64 features, else fp32)."""
    w, g = prob.world, group_size
    if w % g:
        raise ValueError(f"group_size {g} does not divide the world size {w}")
    if order not in ("intra-first", "column-first"):
        raise ValueError(f"order {order!r}: column-first (mmfast) or intra-first (what-if)")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: nccl or gloo")
    fs = stat_bytes(prob.dtype)
    return w // g, fs, "float64" if fs == 8 else "float32"


def _grad_scalars(bld: Builder, g: int, fs: int, st: str, local_loss: bool) -> Stage:
    """CLIP with gather_with_grad: the backward's exchange of the upstream-gradient scalars."""
    op = "all_gather_into_tensor" if local_loss else "all_reduce"
    return Stage("grad scalars", [bld.ring(op, "world", g, fs, st, "backward")])


def _naming(loss: str, g: int, exchange: str, local_loss: bool,
            gather_with_grad: bool) -> tuple[str, str, dict[str, Any]]:
    """``(scheme, label, params)`` of an mmfast prediction (the CLIP options in the params of CLIP only)."""
    params: dict[str, Any] = {"group_size": g, "exchange": exchange}
    if loss == "clip":
        params.update(local_loss=local_loss, gather_with_grad=gather_with_grad)
    name = "mmfast-clip" if loss == "clip" else "mmfast-siglip"
    label = f"mmfast {'ClipLoss' if loss == 'clip' else 'SigLipLoss'} g={g}"
    return name, label, params


def predict_mmfast(
    prob: Problem,
    cluster: Cluster,
    rates: ComputeRates,
    group_size: int,
    *,
    loss: str = "clip",
    local_loss: bool = True,
    gather_with_grad: bool = True,
    backend: str = "nccl",
    order: str = "column-first",
    exchange: str = "gather",
) -> Prediction:
    """mmfast's distributed loss (``loss``: ``clip`` or ``siglip``) with ``group_size`` g and
    ``exchange`` ``gather`` (:mod:`mmfast.distributed.gather`) or ``ring``
    (:mod:`mmfast.distributed.ring`, see :func:`predict_mmfast_ring`). ``backend``: ``nccl`` (a GPU:
    NCCL's reduce-scatter, the Triton kernels' memory) or ``gloo`` (CPU: reduce-scatters are
    all-to-alls, the C++ kernels' and gloo's buffers).

    ``gather`` with ``order="column-first"`` is what mmfast does: the own text goes over the
    ``column`` ring first (``B*D`` a rank) and the ``K*B*D`` column block is then all-gathered inside
    the group (mirrored in backward), so each remote text crosses into a node once.
    ``order="intra-first"`` is a what-if (mmfast's first implementation): gather inside the group
    first, then pass ``g*B*D`` group blocks over the column ring, so each remote text crosses into a
    node g times.
    """
    if exchange == "ring":
        if order != "column-first":
            raise ValueError("order='intra-first' is a what-if of the gather exchange only")
        return predict_mmfast_ring(prob, cluster, rates, group_size, loss=loss, local_loss=local_loss,
                                   gather_with_grad=gather_with_grad, backend=backend)
    if exchange != "gather":
        raise ValueError(f"exchange {exchange!r}: gather or ring")
    b, d, es, n, dt = prob.batch, prob.dim, prob.es, prob.n, prob.dtype
    g = group_size
    k, fs, st = _groups(prob, g, backend, order)
    bld = Builder(prob, cluster, backend)
    blk = b * d * es
    if order == "intra-first":  # (family, its size, payload) of the first and the second exchange
        first, second, own = ("intra", g, blk), ("column", k, g * blk), g * b
    else:
        first, second, own = ("column", k, blk), ("intra", g, k * blk), k * b
    others = n - own
    rs_op = "reduce_scatter_tensor" if order == "intra-first" else _reduce_scatter_op(backend)

    def coll(op: str, fam: tuple[str, int, int], payload: int, phase: str) -> list[Collective]:
        return [bld.ring(op, fam[0], g, payload, dt, phase)] if fam[1] > 1 else []

    header = bld.ring("all_gather_into_tensor", "world", g, 8 * 8, "float64", "forward", "header")
    fwd = [Stage("header exchange", [header]),
           Stage(f"{first[0]} all-gather", coll("all_gather_into_tensor", first, first[2], "forward")),
           Stage(f"{second[0]} all-gather | own tiles", coll("all_gather_into_tensor", second, second[2], "forward"),
                 tile_fwd(rates, b, own, d), overlap=True)]
    # elementwise passes over O(N*D) buffers (bytes read + written): the copy of the other columns,
    # the column bound's norms over the texts (CLIP) and, column-first, the texts' transpose
    oth = others if second[1] > 1 else 0
    copies_fwd = 2 * oth * d * es + (n * d * es if loss == "clip" else 0)
    if order == "column-first" and g > 1 and k > 1:  # wait_all's transpose to rank order
        copies_fwd += 2 * n * d * es
    fwd.append(Stage("other tiles", [], tile_fwd(rates, b, others, d) + copies_fwd / rates.mem_bw))
    bwd: list[Stage] = []
    if loss == "clip":
        # one all-reduce of the column sums and weighted means (2N) and the 3 loss terms, fp64
        fwd.append(Stage("column statistics", [bld.ring("all_reduce", "world", g, (2 * n + 3) * 8, "float64",
                                                        "forward", "column statistics + loss terms")]))
        if gather_with_grad:
            bwd.append(_grad_scalars(bld, g, fs, st, local_loss))
    if order == "intra-first":
        # zeroed fp32 partials, the other columns' copy (index_select) and scatter back (index_copy_),
        # the cast of the partials to the feature dtype, the own block's cast and sum
        copies_bwd = n * d * fs + 2 * oth * d * es + 2 * oth * d * fs + (n * d * (fs + es) if es != fs else 0) \
            + 2 * own * d * es
    else:
        # zeroed partials (feature dtype); per column set its copy (index_select) and the cast of the
        # kernel's fp32 gradient; the other columns scattered back (index_copy_); the group
        # reduce-scatter's padded copy (zeros + copy) and by-position transpose (K > 1) and, on gloo,
        # the sum of its received chunks; the own block's padded copy and its sum with the group's; on
        # gloo the column all-to-all's sum
        cast = (fs + es) * d if es != fs else 0
        gloo = backend == "gloo"
        copies_bwd = n * d * es + 2 * n * d * es + n * cast + 2 * oth * d * es \
            + ((3 + (2 if k > 1 else 0) + (1 if gloo else 0)) * n * d * es + own * d * es * (1 if gloo else 0)
               if g > 1 else 0) \
            + 3 * own * d * es + (3 * own * d * es if g > 1 else 0) + ((own + b) * d * es if gloo and k > 1 else 0)
    bwd.append(Stage("other tiles (bwd)", [], tile_bwd(rates, b, others, d) + copies_bwd / rates.mem_bw))
    bwd.append(Stage(f"{second[0]} reduce-scatter | own tiles",
                     coll(rs_op, second, second[1] * second[2], "backward"),
                     tile_bwd(rates, b, own, d), overlap=True))
    bwd.append(Stage(f"{first[0]} reduce-scatter", coll(rs_op, first, first[1] * first[2], "backward")))
    name, label, params = _naming(loss, g, "gather", local_loss, gather_with_grad)
    if order == "intra-first":
        name, label = name + "-intrafirst", label + " intra-first (what-if)"
    stages = [st_ for st_ in fwd + bwd if st_.comm or st_.compute_s]
    mem = mmfast_memory(prob, g, loss, backend, order, local_loss, gather_with_grad)
    return Prediction(name, label, prob, params, stages, mem, cluster.name, rates.source)


def predict_mmfast_ring(
    prob: Problem,
    cluster: Cluster,
    rates: ComputeRates,
    group_size: int,
    *,
    loss: str = "clip",
    local_loss: bool = True,
    gather_with_grad: bool = True,
    backend: str = "nccl",
) -> Prediction:
    """mmfast's ``ring`` exchange (:mod:`mmfast.distributed.ring`) with ``group_size`` g, K = W/g groups.

    Collectives as the code issues them: the header (8 fp64 a rank, world all-gather). Forward, per
    step: one group ``batch_isend_irecv`` (g > 1: the ring piece, ``B*D``, to each other member)
    and K-1 column ring steps (one ``B*D`` isend + one irecv, feature dtype); CLIP one world
    all-reduce of ``2N + 4`` fp64 (column statistics, 3 loss terms, a failure flag), SigLIP one of
    1 fp64 (the flag). Backward: CLIP with gather_with_grad the upstream-gradient scalar exchange;
    the group piece exchanges and K-1 text ring steps again, per step one group exchange of the
    partials (``B*D`` to each other member) and K-1 gradient ring steps of ``B*D``, both in the
    accumulation dtype; a final 1-fp64 all-reduce (the failure flag).

    Every pass runs once per column chunk (:func:`mmfast.distributed.ring.chunking`: ``c`` chunks of
    ``R`` rows): the messages and the tiles above are a chunk's (``R*D``, ``B x R``), ``c`` times.

    Time, as the code overlaps: per step the group exchange of pieces (waited at once), the tiles
    of the other members' pieces while the previous step's gradient sum travels the column ring,
    the group exchange of the partials (waited at once), and the tiles of the ring piece while the
    next ring piece travels (texts and sums share the column link: with g = 1 their times add). The
    first ring piece of the backward (the own block comes last) is waited for.
    """
    b, d, es, n, dt = prob.batch, prob.dim, prob.es, prob.n, prob.dtype
    g = group_size
    k, fs, st = _groups(prob, g, backend)
    clip = loss == "clip"
    bld = Builder(prob, cluster, backend)
    from mmfast.distributed.ring import chunking  # torch only when the ring is predicted

    chunks, rows = chunking(b, d * es)
    piece, acc = rows * d * es, rows * d * fs

    # per piece of a chunk: the tiles (B x R), and the elementwise passes (forward: the piece's norms
    # for the bound; backward: the partials' and sums' adds)
    c_fwd = tile_fwd(rates, b, rows, d) + (rows * d * es if clip else 0) / rates.mem_bw
    c_bwd = tile_bwd(rates, b, rows, d) + 2 * acc / rates.mem_bw
    stages = [Stage("header exchange", [bld.ring("all_gather_into_tensor", "world", g, 8 * 8, "float64", "forward",
                                                 "header")])]
    for phase in ("forward", "backward"):
        bwd = phase == "backward"
        c = c_bwd if bwd else c_fwd
        if bwd and clip and gather_with_grad:
            stages.append(_grad_scalars(bld, g, fs, st, local_loss))
        order = list(range(1, k)) + [0] if bwd else list(range(k))
        steps: list[Stage] = []
        for i in list(range(len(order))) * chunks:  # one walk per chunk
            if i == 0 and order[0] != 0:
                steps.append(Stage("first ring piece", [bld.column_p2p(g, piece, dt, phase, "texts")]))
            sum_in_flight = bwd and i > 0  # the sum sent at the end of the last step
            sums = [bld.column_p2p(g, acc, st, phase, "gradient sums")] if sum_in_flight else []
            texts = [bld.column_p2p(g, piece, dt, phase, "texts")] if i + 1 < len(order) and order[i + 1] else []
            if g > 1:
                steps.append(Stage("group piece exchange", [bld.intra_p2p(g, piece, dt, phase, "pieces")]))
                steps.append(Stage(f"{phase} other pieces' tiles | {'gradient sums' if sums else 'no exchange'}",
                                   sums, (g - 1) * c, overlap=True))
                sums = []
                if bwd:
                    steps.append(Stage("group partials exchange", [bld.intra_p2p(g, acc, st, phase, "partials")]))
            comm = texts + sums
            kinds = "+".join(x.note for x in comm) or "no exchange"
            steps.append(Stage(f"{phase} ring piece tiles | {kinds}", comm, c, overlap=True))
        stages += _merge_all(steps)
        if phase == "forward":
            if clip:
                stages.append(Stage("column statistics", [bld.ring(
                    "all_reduce", "world", g, (2 * n + 4) * 8, "float64", phase,
                    "column statistics + loss terms + failure flag")]))
            else:
                stages.append(Stage("failure flag", [bld.ring("all_reduce", "world", g, 8, "float64", phase, "flag")]))
        else:
            stages.append(Stage("failure flag", [bld.ring("all_reduce", "world", g, 8, "float64", phase, "flag")]))
    name, label, params = _naming(loss, g, "ring", local_loss, gather_with_grad)
    label += " ring"
    stages = [st_ for st_ in stages if st_.comm or st_.compute_s]
    mem = ring_memory(prob, g, loss, backend, local_loss, gather_with_grad)
    return Prediction(name, label, prob, params, stages, mem, cluster.name, rates.source)


def predict_open_clip_clip(
    prob: Problem,
    cluster: Cluster,
    rates: ComputeRates,
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    backend: str = "nccl",
) -> Prediction:
    """open_clip ``ClipLoss`` (``gather_features`` + cross-entropy over the materialised logits)."""
    w, b, d, es, n = prob.world, prob.batch, prob.dim, prob.es, prob.n
    bld = Builder(prob, cluster, backend)
    dt = prob.dtype
    ag = [bld.ring("all_gather", "world", w, b * d * es, dt, "forward", f) for f in ("image", "text")]
    rows = b if local_loss else n
    gemm = 2.0 * rows * n * d * 2 * 3  # two logits matrices; forward 1 + backward 2 matmuls each
    passes = OPEN_CLIP_LOGIT_PASSES * 2 * rows * n * es
    # the torch.cat of each gathered list (read + write); on gloo the backward's all-to-all
    # emulation also copies the gradient chunks and stacks them
    copies = 2 * 2 * n * d * es + (2 * 3 * n * d * es if gather_with_grad and backend == "gloo" else 0)
    compute = gemm / rates.gemm + (passes + copies) / rates.mem_bw
    stages = [Stage("all-gather features", ag), Stage("logits + cross-entropy (fwd+bwd)", [], compute)]
    if gather_with_grad:
        op = "reduce_scatter" if backend == "nccl" else "scatter"
        stages.append(Stage("gradient of the all-gathers",
                            [bld.ring(op, "world", w, b * d * es, dt, "backward", f) for f in ("image", "text")]))
    mem = open_clip_memory(prob, local_loss, gather_with_grad, backend)
    return Prediction("open_clip-clip", "open_clip ClipLoss" + (" local+gwg" if local_loss and gather_with_grad
                                                                 else f" local={local_loss} gwg={gather_with_grad}"),
                      prob, {"local_loss": local_loss, "gather_with_grad": gather_with_grad}, stages, int(mem),
                      cluster.name, rates.source)


def predict_open_clip_siglip(
    prob: Problem, cluster: Cluster, rates: ComputeRates, *, dist_impl: str = "bidir", backend: str = "nccl"
) -> Prediction:
    """open_clip ``SigLipLoss`` with ``dist_impl`` ``bidir`` (default) or ``shift``: blocking neighbour
    exchanges on the world ring, a ``B x B`` block computed after each."""
    w, b, d, es = prob.world, prob.batch, prob.dim, prob.es
    bld = Builder(prob, cluster, backend)
    dt = prob.dtype
    block = b * d * es
    passes = OPEN_CLIP_SIGLIP_PASSES / 2 * b * b * es / rates.mem_bw
    blk_f = 2.0 * b * b * d / rates.gemm + passes  # logits matmul + elementwise, one B x B block
    blk_b = 4.0 * b * b * d / rates.gemm + passes  # both matmul gradients + elementwise
    stages = [Stage("own block", [], blk_f + blk_b)]
    if dist_impl == "bidir":
        nb, rem = divmod(w - 1, 2)
        for phase, blk in (("forward", blk_f), ("backward", blk_b)):
            if nb:
                stages.append(Stage(f"bidir exchanges ({phase})", [bld.p2p([block, block], dt, phase, True)],
                                    2 * blk, repeat=nb))
            if rem:
                stages.append(Stage(f"last exchange ({phase})", [bld.p2p([block], dt, phase, False)], blk))
    elif dist_impl == "shift":
        for phase, blk in (("forward", blk_f), ("backward", blk_b)):
            stages.append(Stage(f"shift exchanges ({phase})", [bld.p2p([block], dt, phase, False)], blk,
                                repeat=w - 1))
    else:
        raise ValueError(f"dist_impl {dist_impl!r}: modelled are bidir and shift")
    # per block kept for backward: labels, labels*logits (+ logsigmoid's buffer on CPU), the scaled
    # image features; the received text blocks
    per_block = (3 if backend == "gloo" else 2) * b * b * es + b * d * es
    mem = w * per_block + (w - 1) * block + 2 * b * b * es
    return Prediction("open_clip-siglip", f"open_clip SigLipLoss {dist_impl}", prob, {"dist_impl": dist_impl},
                      stages, int(mem), cluster.name, rates.source)


def predict_inf_cl(prob: Problem, cluster: Cluster, rates: ComputeRates) -> Prediction:
    """Inf-CL's ring (model only): two calls (image->text, text->image), fp32 blocks to rank+1.

    Assumptions: its tile kernels run at mmfast's tile rates (its published kernels take fp32
    inputs, so this is optimistic); the forward of step ``s`` overlaps the transfer of block
    ``s+1``; backward step ``s`` overlaps the transfer of the next ``k`` block and of the gradient
    block of step ``s-1``, and the last gradient block's transfer is exposed.
    """
    w, b, d = prob.world, prob.batch, prob.dim
    bld = Builder(prob, cluster)
    blk = b * d * 4  # .float() before the ring
    tf, tb = tile_fwd(rates, b, b, d), tile_bwd(rates, b, b, d)
    stages: list[Stage] = []
    for direction in ("image->text", "text->image"):
        stages += [
            Stage(f"{direction} ring fwd", [bld.p2p([blk], "float32", "forward", False)], tf, True, w - 1),
            Stage(f"{direction} last tile fwd", [], tf),
            Stage(f"{direction} ring bwd step 0", [bld.p2p([blk], "float32", "backward", False)], tb, True),
        ]
        if w > 2:  # the next k block and the previous gradient block share the link to rank+1
            stages.append(Stage(f"{direction} ring bwd", [bld.p2p([blk], "float32", "backward", False, "k"),
                                                          bld.p2p([blk], "float32", "backward", False, "dk")],
                                tb, True, w - 2))
        stages += [
            Stage(f"{direction} ring bwd last step", [bld.p2p([blk], "float32", "backward", False)], tb, True),
            Stage(f"{direction} last gradient block + scale", [
                bld.p2p([blk], "float32", "backward", False),
                bld.ring("all_reduce", "world", w, 4, "float32", "backward", "GradientGather(scale)")]),
        ]
    es = prob.es
    saved = 2 * (3 * b * d * 4 + b * d * es + b * 4)  # per call: q, k (fp32), k[labels]; scale*q; lse
    working = 8 * b * d * 4  # k, next_k, dk, next_dk, dq, kernel outputs, block buffers
    return Prediction("inf-cl", "Inf-CL ring (model)", prob, {}, stages, int(saved + working), cluster.name,
                      rates.source)


def predict_all(
    prob: Problem,
    cluster: Cluster = DGX_H200,
    rates: ComputeRates = H200_BF16,
    *,
    group_sizes: Iterable[int] | None = None,
    include_siglip: bool = True,
    include_inf_cl: bool = True,
    include_whatif: bool = False,
    exchanges: Sequence[str] = EXCHANGES,
) -> list[Prediction]:
    """Every scheme on one problem: open_clip ClipLoss (local+gwg), open_clip SigLipLoss (bidir),
    Inf-CL, mmfast ClipLoss (local+gwg) for each group size dividing W and each of ``exchanges``
    (``ring`` for the group sizes with more than one group: with one, the ring is the gather), and
    mmfast SigLipLoss likewise; ``include_whatif`` adds mmfast ClipLoss with the intra-first order
    (mmfast's first implementation)."""
    w = prob.world
    gs = sorted(group_sizes) if group_sizes is not None else [g for g in range(1, w + 1) if w % g == 0]
    cfgs = [(g, ex) for ex in exchanges for g in gs if ex == "gather" or g < w]
    preds = [predict_open_clip_clip(prob, cluster, rates)]
    if include_siglip:
        preds.append(predict_open_clip_siglip(prob, cluster, rates))
    if include_inf_cl:
        preds.append(predict_inf_cl(prob, cluster, rates))
    preds += [predict_mmfast(prob, cluster, rates, g, exchange=ex) for g, ex in cfgs]
    if include_siglip:
        preds += [predict_mmfast(prob, cluster, rates, g, loss="siglip", exchange=ex) for g, ex in cfgs]
    if include_whatif:
        preds += [predict_mmfast(prob, cluster, rates, g, order="intra-first") for g in gs]
    return preds


def recommend(preds: Sequence[Prediction], scheme: str = "mmfast-clip", rel_tol: float = 0.01, *,
              exchange: str | None = None, memory_budget: float | None = None) -> Prediction:
    """The ``scheme`` prediction with the least step time, group size and exchange chosen together
    (``exchange`` names one to keep only its predictions); predictions within ``rel_tol`` of it tie,
    and the tie goes to the one with less memory (then the smaller group). ``memory_budget`` (bytes):
    only the predictions whose peak loss memory fits it are candidates; when none fits, the one with
    the least memory is returned."""
    cands = [p for p in preds if p.scheme == scheme and (exchange is None or p.exchange == exchange)]
    if not cands:
        raise ValueError(f"no {scheme} prediction" + (f" with exchange {exchange!r}" if exchange else ""))
    if memory_budget is not None:
        fit = [p for p in cands if p.peak_memory_bytes <= memory_budget]
        if not fit:
            return min(cands, key=lambda p: (p.peak_memory_bytes, p.step_s))
        cands = fit
    best = min(p.step_s for p in cands)
    ties = [p for p in cands if p.step_s <= best * (1 + rel_tol)]
    return min(ties, key=lambda p: (p.peak_memory_bytes, p.step_s, p.params.get("group_size", 0)))


def recommend_config(
    prob: Problem,
    cluster: Cluster = DGX_H200,
    rates: ComputeRates = H200_BF16,
    *,
    loss: str = "clip",
    memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
    backend: str = "nccl",
) -> Prediction:
    """The recommended ``(group_size, exchange)`` of mmfast's ``loss`` for ``prob`` on ``cluster``
    (``params["group_size"]``, ``params["exchange"]``): the fastest predicted configuration whose
    peak loss memory fits ``memory_budget`` (default 512 MiB, the budget of ``exchange="auto"``;
    ``None``: the fastest), see :func:`recommend`."""
    w = prob.world
    cfgs = [(g, ex) for ex in EXCHANGES for g in range(1, w + 1) if w % g == 0 and (ex == "gather" or g < w)]
    preds = [predict_mmfast(prob, cluster, rates, g, loss=loss, exchange=ex, backend=backend) for g, ex in cfgs]
    return recommend(preds, "mmfast-clip" if loss == "clip" else "mmfast-siglip", memory_budget=memory_budget)
