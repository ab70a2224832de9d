"""Scaling model of the distributed contrastive losses: memory, bytes and step time per rank, 8 to 4096 GPUs.

``python -m mmfast.bench.scaling`` writes a table, JSON/CSV rows and a PNG of the predicted loss step
time and peak loss memory against the world size for every scheme (see :func:`main`).

What is predicted, per rank and per step (loss forward + backward, the features given):

* the **collectives as each implementation issues them** (:class:`Collective`: op, sub-group, payload
  bytes, dtype, forward/backward; :class:`Stage`: what runs in sequence and what overlaps), read off
  the code:

  - ``mmfast`` (:mod:`mmfast.distributed.contrastive`, ``group_size`` g, ``K = W // g`` groups),
    both exchanges start with the header: one world ``all_gather_into_tensor`` of 7 fp64 a rank.
    Reduce-scatters (:func:`mmfast.distributed.comm.reduce_scatter`) are ``reduce_scatter_tensor``
    on NCCL and ``all_to_all_single`` of the same input (plus a local sum) on gloo.

    ``exchange="gather"`` (:mod:`mmfast.distributed.gather`): forward: the texts
    ``all_gather_into_tensor`` over ``column`` (K ranks, ``B*D`` elements each); the column block
    ``all_gather_into_tensor`` over ``intra`` (g ranks, ``K*B*D``), async, overlapped with the column
    block's tiles; CLIP adds one world ``all_reduce`` of ``2N + 3`` fp64 (column statistics and the
    loss terms, N = W*B). Backward: CLIP with ``gather_with_grad`` one scalar
    (``all_gather_into_tensor`` with ``local_loss``, else ``all_reduce``); the text-gradient
    partials reduce-scattered over ``intra`` (input ``g*K*B*D``), async, overlapped with the column
    block's tiles, then over ``column`` (input ``K*B*D``), in the feature dtype.

    ``exchange="ring"`` (:mod:`mmfast.distributed.ring`, :func:`predict_mmfast_ring`): the texts
    travel in ``B*D`` pieces. Forward: per step (K of them) one ``batch_isend_irecv`` inside the
    group (g > 1: the ring piece of this position to and from the g-1 other members, each overlapped
    with the other members' pieces' tiles) and K-1 column ring steps (one ``batch_isend_irecv`` of
    one ``B*D`` isend + one irecv), overlapped with the ring piece's tiles; CLIP one world
    ``all_reduce`` of ``2N + 4`` fp64 (with a failure flag), SigLIP one of 1 fp64. Backward: the
    upstream-gradient scalar as for gather; the own block last; per step the group piece exchange
    again, a group exchange of gradient partials (g-1 ``B*D`` sends and receives in the accumulation
    dtype: fp32, fp64 for fp64 features), K-1 text ring steps and K-1 gradient-sum ring steps (one
    step behind the texts); one 1-fp64 ``all_reduce``. Apart from the header, no all-gather,
    all-to-all or reduce-scatter.
  - ``open_clip`` ``ClipLoss`` (``gather_features``): two world ``all_gather`` (list) of ``B*D``;
    with ``gather_with_grad`` their backward is, on NCCL, two ``reduce_scatter`` (list) and, on gloo,
    ``torch.distributed.nn``'s all-to-all emulation, ``W`` ``scatter`` calls each of which this rank
    is the root of one. No overlap.
  - ``open_clip`` ``SigLipLoss`` ``bidir``: ``(W-1)//2`` ``batch_isend_irecv`` of two ``B*D`` sends
    (left and right) and one of a single send when ``W-1`` is odd, the same again in backward,
    blocking (``shift``: ``W-1`` single sends each way).
  - ``Inf-CL`` ring (model only, not installed here; from its published ``inf_cl/ring.py``): one call
    per direction (image->text and text->image, both needed for CLIP); in each call the ``k``
    features, cast to fp32, go around the ring in ``W-1`` ``batch_isend_irecv`` sends to rank+1 while
    step ``s``'s ``B x B`` tile is computed (forward); backward sends ``k`` again ``W-1`` times and the
    fp32 gradient block ``W`` times (it returns to its owner), each overlapped with the next tile;
    the trainable scale adds one scalar ``all_reduce`` per call.

* **bytes sent per rank** with the per-op byte model of :mod:`mmfast.bench.comm` (exactly: the
  distributed tests check the prediction against :func:`~mmfast.bench.comm.count_collective_bytes`),
  split into **intra-node and inter-node** for the *edge rank* ``gpus_per_node - 1`` (ranks are
  node-major; every ring and neighbour exchange leaves node 0 there, so it is the rank whose links
  carry the most inter-node bytes), and ``node_inter_bytes``: everything leaving one node, which the
  node's NICs share.

* **time** with an alpha-beta model per collective as issued: a ring collective over ``m`` ranks is
  ``steps * (alpha + chunk * beta)`` (all-gather ``m-1`` steps of the input, reduce-scatter ``m-1``
  of ``input/m``, all-reduce ``2(m-1)`` of ``n/m``, or a double binary tree ``2*ceil(log2 m)*alpha +
  2n*beta`` when that is faster, as NCCL would pick); ``alpha`` is the latency of the slowest hop of
  the ring; ``beta`` the slowest link: an NVLink hop costs ``1/bw_intra`` per byte, an inter-node hop
  ``X/(nics*bw_inter)`` where ``X`` is the number of hops of all the rings of the same op running
  at once (every ``intra`` group, or every ``column``) that leave one node: a node's NICs are
  shared by them (NCCL spreads a ring's node-crossing traffic over the channels of every NIC). A
  point-to-point send uses one NIC; gloo's all-to-all is timed as ``m-1`` pairwise steps of one
  chunk. Stages run one after the other; an overlapped stage costs ``max(communication,
  compute)``; in a ``concurrent`` stage (the ring's steps) collectives of different sub-group
  families (``column`` ring steps, ``intra`` all-gathers) run at once and those of one family
  (texts and gradient sums on the column ring) add up.

* **compute** from the throughput of the tile kernels (:class:`ComputeRates`; measured here by
  :func:`calibrate_compute`, or a recorded GPU figure such as :data:`H200_BF16`): the fused kernels do
  ``2*M*N*D`` FLOPs forward (logits once, row and column statistics together) and ``6*M*N*D``
  backward (logits again, then both gradients). open_clip is charged its GEMMs at the GEMM rate plus
  its passes over the materialised logits at the memory bandwidth. Both are also charged their
  elementwise copies of ``O(N*D)`` buffers (mmfast: the other groups' columns, the zeroed fp32
  partials and their casts; open_clip: the concatenation of the gathered lists) at ``mem_bw``.
  Python and kernel-launch overheads are not modelled.

* **peak loss memory** per rank (bytes allocated inside the loss call, features excluded), replaying
  each implementation's allocations in order (mmfast gather: the gathered texts, the gradient
  partials, their padded and transposed copies and the copies made for the column sets,
  ``O(W*B*D)``; mmfast ring: the group's pieces of the block in hand, the next ring piece in
  flight, the tiles' gradient partials and the running sum, ``O(g*B*D)``, plus ``O(W*B)``
  statistics; open_clip: gathered features and the ``B x W*B`` logits with their log-softmax,
  ``O(W*B*D + W*B^2)``; Inf-CL: fp32 blocks, ``O(B*D)``). The
  mmfast replays (:class:`_Heap`) free a tensor when the last variable of the code holding it lets
  go. ``backend="nccl"`` is a GPU (NCCL, the Triton kernels' gradient partials, H200 launch
  geometry); ``backend="gloo"`` adds what gloo and the C++ kernels allocate on a CPU, so that the
  distributed tests can check the prediction against the profiler.

:func:`recommend` / :func:`recommend_config` pick mmfast's ``(group_size, exchange)`` together: the
least predicted step time among the configurations whose loss memory fits a budget (default 512 MiB,
the budget of ``exchange="auto"``). :func:`predict_mmfast` with ``order="intra-first"`` is a what-if
(mmfast's first implementation, which gathered inside the group first): see its docstring. Every
figure is per rank and per step, for equal local batch sizes.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "Link",
    "Cluster",
    "ComputeRates",
    "Problem",
    "Collective",
    "Stage",
    "Prediction",
    "NVLINK",
    "IB_400G",
    "H200_BF16",
    "DGX_H200",
    "OPEN_CLIP_LOGIT_PASSES",
    "OPEN_CLIP_SIGLIP_PASSES",
    "dtype_bytes",
    "comm_sent_bytes",
    "predict_mmfast",
    "predict_mmfast_ring",
    "predict_open_clip_clip",
    "predict_open_clip_siglip",
    "predict_inf_cl",
    "predict_all",
    "recommend",
    "recommend_config",
    "EXCHANGES",
    "DEFAULT_MEMORY_BUDGET",
    "calibrate_compute",
    "rates_from_json",
    "fit_alpha_beta",
    "simulate",
    "format_table",
    "plot",
    "write_outputs",
    "main",
]

GB = 1e9
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


#: The exchange schemes of mmfast's distributed losses that the model predicts.
EXCHANGES = ("gather", "ring")
#: The per-rank loss memory a recommendation must fit by default: 512 MiB, the budget of mmfast's
#: ``exchange="auto"`` (mmfast.distributed.contrastive.set_memory_budget's default).
DEFAULT_MEMORY_BUDGET = 512 * 2**20


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype given by name (``"bfloat16"``, ``"torch.float32"``...)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def _stat_bytes(dtype: str) -> int:
    """The tile kernels' statistics / gradient-partial dtype: fp64 for fp64 features, else fp32."""
    return 8 if dtype_bytes(dtype) == 8 else 4


# ------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Link:
    """One link type: ``bandwidth`` in bytes/s per direction per GPU, ``latency`` (alpha) in seconds."""

    bandwidth: float
    latency: float


#: NVLink 4 through NVSwitch (H100/H200 SXM): 450 GB/s per direction per GPU, ~3 us.
NVLINK = Link(bandwidth=450 * GB, latency=3e-6)
#: 400 Gb/s InfiniBand NDR, one NIC per GPU: 50 GB/s per direction, ~5 us.
IB_400G = Link(bandwidth=50 * GB, latency=5e-6)


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``gpus_per_node`` GPUs (ranks node-major), NVLink inside a node, NICs between nodes.

    ``nics_per_node`` (default ``gpus_per_node``) NICs of ``inter`` each; a ring collective's
    node-crossing traffic is spread over them, a point-to-point send uses ``p2p_nics`` of them.
    ``allreduce``: ``"auto"`` (the faster of ring and tree), ``"ring"`` or ``"tree"``.
    """

    gpus_per_node: int = 8
    intra: Link = NVLINK
    inter: Link = IB_400G
    nics_per_node: int | None = None
    p2p_nics: int = 1
    allreduce: str = "auto"
    name: str = ""

    @property
    def nics(self) -> int:
        """NICs per node."""
        return self.nics_per_node or self.gpus_per_node


#: Nodes of 8 H200 on NVSwitch, one 400 Gb/s NIC per GPU.
DGX_H200 = Cluster(name="8x H200 per node, NVLink 450 GB/s 3 us + 8x 400 Gb/s IB 5 us")


@dataclass(frozen=True)
class ComputeRates:
    """Throughputs the compute terms use.

    ``tile_fwd`` / ``tile_bwd``: FLOP/s of the fused tile kernels, counting ``2*M*N*D`` FLOPs for a
    forward call on an ``M x N`` tile of dimension ``D`` and ``6*M*N*D`` for a backward call.
    ``gemm``: FLOP/s of a dense matmul (open_clip's logits). ``mem_bw``: bytes/s (read + written) of
    an elementwise pass into a fresh buffer (open_clip's softmax over the materialised logits, the
    copies both make of ``O(N*D)`` buffers). ``source`` says where they come from.
    """

    tile_fwd: float
    tile_bwd: float
    gemm: float
    mem_bw: float
    source: str = ""


#: H200 SXM, bf16: dense GEMM peak ~790 TFLOP/s (the figure recorded for it), HBM3e 4.8 TB/s.
#: Assumed fractions: the fused tile kernels reach 50% of the GEMM peak forward and 40% backward
#: (flash-attention-like kernels: the exp/log-sum work and the recomputation cost throughput),
#: cuBLAS GEMMs 75%, elementwise passes 80% of the HBM bandwidth.
H200_BF16 = ComputeRates(
    tile_fwd=0.50 * 790e12,
    tile_bwd=0.40 * 790e12,
    gemm=0.75 * 790e12,
    mem_bw=0.80 * 4.8e12,
    source="H200 recorded figures: 790 TFLOP/s bf16 GEMM peak (tile 50%/40%, GEMM 75%), HBM 4.8 TB/s (80%)",
)

#: open_clip ClipLoss: elementwise passes over each ``B x N`` logits matrix (forward: matmul
#: write, log_softmax read + write; backward: the nll gradient write, log_softmax backward two reads
#: and a write, two matmul reads).
OPEN_CLIP_LOGIT_PASSES = 9
#: open_clip SigLipLoss: passes over each ``B x B`` block (logits, +bias, the labels, labels*logits,
#: logsigmoid, sum; and backward).
OPEN_CLIP_SIGLIP_PASSES = 16


@dataclass(frozen=True)
class Problem:
    """One loss call: ``world`` ranks, ``batch`` pairs per rank, embedding ``dim``, feature ``dtype``."""

    world: int
    batch: int
    dim: int
    dtype: str = "bfloat16"

    @property
    def n(self) -> int:
        """Global batch ``N = W * B``."""
        return self.world * self.batch

    @property
    def es(self) -> int:
        """Bytes per feature element."""
        return dtype_bytes(self.dtype)


# ----------------------------------------------------------------------------------- byte model


def comm_sent_bytes(op: str, n: int, m: int, *, root: bool = True) -> int:
    """Bytes one rank sends for one call, under :mod:`mmfast.bench.comm`'s model.

    ``n``: the payload named in that model (the input tensor; for the list forms one chunk and, for
    ``reduce_scatter``, the whole input list is ``m`` chunks of ``n``), ``m``: the sub-group's size.
    ``root``: for ``scatter``, whether this rank is the root.
    """
    if op in ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
        return (m - 1) * n
    if op in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base"):
        return (m - 1) * n // m
    if op == "reduce_scatter":  # n: one chunk of the m-chunk input list
        return (m - 1) * n
    if op == "all_to_all_single":  # n: the input; its own 1/m stays
        return n - n // m
    if op == "all_reduce":
        return 2 * (m - 1) * n // m
    if op == "scatter":  # n: one chunk; the root sends every chunk but its own
        return (m - 1) * n if root else 0
    if op in ("send", "isend", "batch_isend_irecv"):
        return n
    raise ValueError(f"no byte model for {op!r}")


# ------------------------------------------------------------------------------------- topology


def _rings(world: int, kind: str, g: int) -> list[list[int]]:
    """The concurrent rings of one sub-group family, each a list of global ranks in ring order."""
    if kind == "world":
        return [list(range(world))]
    if kind == "intra":
        return [[k * g + p for p in range(g)] for k in range(world // g)]
    if kind == "column":
        return [[k * g + p for k in range(world // g)] for p in range(g)]
    raise ValueError(kind)


@dataclass(frozen=True)
class _Hops:
    """What the rings of one family look like on the nodes."""

    intra: bool  # some hop stays inside a node
    inter_per_node: int  # most node-crossing hops leaving one node (all the family's rings together)
    edge_intra: float  # fraction of the edge rank's sends that stay inside its node
    sends: int  # messages a rank sends (ring: 1, bidir: 2, direct: m - 1)


@functools.lru_cache(maxsize=4096)
def _hops(world: int, gpn: int, kind: str, g: int, pattern: str = "ring") -> _Hops:
    """Hop statistics of a family. ``pattern``: ``ring`` (send to the next member), ``bidir`` (to
    both neighbours), ``direct`` (to every other member: a scatter root)."""
    rings = _rings(world, kind, g)
    edge = min(gpn, world) - 1
    out: dict[int, int] = {}
    intra = False
    edge_intra, sends = 1.0, 1
    for ring in rings:
        m = len(ring)
        if m < 2:
            continue
        for i, r in enumerate(ring):
            if pattern == "direct":
                dests = [s for s in ring if s != r]
            elif pattern == "bidir" and m > 2:
                dests = [ring[(i + 1) % m], ring[(i - 1) % m]]
            else:
                dests = [ring[(i + 1) % m]]
            same = [r // gpn == s // gpn for s in dests]
            sends = len(dests)
            intra |= any(same)
            crossing = len(same) - sum(same)
            if crossing:
                out[r // gpn] = out.get(r // gpn, 0) + crossing
            if r == edge:
                edge_intra = sum(same) / len(same)
    return _Hops(intra, max(out.values(), default=0), edge_intra, sends)


def _step_cost(cluster: Cluster, hops: _Hops, p2p: bool = False) -> tuple[float, float]:
    """(alpha, beta) of one ring step of a family: the slowest hop's latency and per-byte time."""
    alpha, beta = 0.0, 0.0
    if hops.intra:
        alpha, beta = cluster.intra.latency, 1.0 / cluster.intra.bandwidth
    if hops.inter_per_node:
        share = max(hops.inter_per_node / cluster.nics, 1.0 / cluster.p2p_nics if p2p else 0.0)
        alpha = max(alpha, cluster.inter.latency)
        beta = max(beta, share / cluster.inter.bandwidth)
    return alpha, beta


# ------------------------------------------------------------------------------------ collectives


@dataclass
class Collective:
    """One collective (or ``calls`` identical ones) as a loss issues it, with its predicted cost.

    ``payload``: the byte size :mod:`mmfast.bench.comm` names (input tensor; one chunk for the list
    forms). ``sent_bytes``: this rank's bytes over all ``calls``. ``intra_bytes`` / ``inter_bytes``:
    the edge rank's split. ``node_inter_bytes``: bytes leaving one node (its NICs share them).
    """

    op: str
    group: str
    group_size: int
    payload: int
    dtype: str
    phase: str
    calls: int = 1
    sent_bytes: int = 0
    intra_bytes: float = 0.0
    inter_bytes: float = 0.0
    node_inter_bytes: float = 0.0
    time_s: float = 0.0
    note: str = ""


@dataclass
class Stage:
    """A piece of the step: collectives and compute, one after the other or overlapped (max).

    ``concurrent``: the collectives of different sub-group families (``Collective.group``: intra,
    column...) are in flight at once, each family on its own links: the communication wall time is
    the largest family's sum (those of one family share its links and queue)."""

    name: str
    comm: list[Collective] = field(default_factory=list)
    compute_s: float = 0.0
    overlap: bool = False
    repeat: int = 1
    concurrent: bool = False

    @property
    def comm_s(self) -> float:
        """Communication time of one repetition, one collective after the other."""
        return sum(c.time_s for c in self.comm)

    @property
    def comm_wall_s(self) -> float:
        """Communication wall time of one repetition (families in parallel when ``concurrent``)."""
        if not self.concurrent:
            return self.comm_s
        fam: dict[str, float] = {}
        for c in self.comm:
            fam[c.group] = fam.get(c.group, 0.0) + c.time_s
        return max(fam.values(), default=0.0)

    @property
    def time_s(self) -> float:
        """Wall time of all repetitions."""
        wall = self.comm_wall_s
        one = max(wall, self.compute_s) if self.overlap else wall + self.compute_s
        return self.repeat * one


class _Builder:
    """Builds the collectives of one scheme on one cluster (bytes, link split, time)."""

    def __init__(self, prob: Problem, cluster: Cluster, backend: str = "nccl"):
        self.p, self.c, self.backend = prob, cluster, backend
        self.gpn = cluster.gpus_per_node

    def ring(self, op: str, kind: str, g: int, payload: int, dtype: str, phase: str, note: str = "") -> Collective:
        """A collective over every ring of a family (``kind``: world / intra / column; ``g``: group size)."""
        w = self.p.world
        m = {"world": w, "intra": g, "column": w // g}[kind]
        gsz = w if kind == "world" else g
        direct = op in ("scatter", "all_to_all_single")
        hops = _hops(w, self.gpn, kind, gsz, "direct" if direct else "ring")
        col = Collective(op, kind, m, payload, dtype, phase, note=note)
        if op == "scatter":  # gloo's all-to-all: m scatter calls, this rank is the root of one
            col.calls = m
            col.sent_bytes = comm_sent_bytes(op, payload, m, root=True)
        else:
            col.sent_bytes = comm_sent_bytes(op, payload, m)
        self._split(col, hops)  # all-to-all: every member gets its chunk straight from this rank
        # an all-to-all runs as m-1 pairwise-exchange steps of one chunk each: timed like a ring step
        alpha, beta = _step_cost(self.c, _hops(w, self.gpn, kind, gsz) if op == "all_to_all_single" else hops)
        if m < 2:
            col.time_s = 0.0
        elif op in ("all_gather", "all_gather_into_tensor"):
            col.time_s = (m - 1) * (alpha + payload * beta)
        elif op in ("reduce_scatter_tensor", "all_to_all_single"):
            col.time_s = (m - 1) * (alpha + payload / m * beta)
        elif op == "reduce_scatter":
            col.time_s = (m - 1) * (alpha + payload * beta)
        elif op == "all_reduce":
            ring_t = 2 * (m - 1) * (alpha + payload / m * beta)
            tree_t = 2 * math.ceil(math.log2(m)) * alpha + 2 * payload * beta
            col.time_s = {"ring": ring_t, "tree": tree_t}.get(self.c.allreduce, min(ring_t, tree_t))
        elif op == "scatter":  # m calls; each root sends m-1 chunks back to back
            col.time_s = m * (alpha + (m - 1) * payload * beta)
        else:
            raise ValueError(op)
        return col

    def p2p(self, payloads: Sequence[int], dtype: str, phase: str, bidir: bool, note: str = "") -> Collective:
        """One ``batch_isend_irecv`` on the world ring: sends of ``payloads`` bytes (to the right, and
        to the left when ``bidir``), blocking until all arrive."""
        w = self.p.world
        hops = _hops(w, self.gpn, "world", w, "bidir" if bidir else "ring")
        col = Collective("batch_isend_irecv", "ring", w, sum(payloads), dtype, phase, note=note)
        col.sent_bytes = sum(payloads)
        self._split(col, hops)
        alpha, beta = _step_cost(self.c, hops, p2p=True)
        # both directions run at once on full-duplex links; sends in one direction queue
        per_dir = max(payloads) if bidir else sum(payloads)
        col.time_s = alpha * (1 if bidir else len(payloads)) + per_dir * beta
        return col

    def column_p2p(self, g: int, payload: int, dtype: str, phase: str, note: str = "") -> Collective:
        """One ring step over the ``column`` rings (every rank sends ``payload`` bytes to the same
        position of the next group, receives from the previous: one ``batch_isend_irecv`` of one
        isend + one irecv), all the column rings at once."""
        w = self.p.world
        k = w // g
        hops = _hops(w, self.gpn, "column", g, "ring")
        col = Collective("batch_isend_irecv", "column", k, payload, dtype, phase, note=note)
        col.sent_bytes = comm_sent_bytes("batch_isend_irecv", payload, k)
        self._split(col, hops)
        alpha, beta = _step_cost(self.c, hops, p2p=True)
        col.time_s = alpha + payload * beta if k > 1 else 0.0
        return col

    def intra_p2p(self, g: int, payload: int, dtype: str, phase: str, note: str = "") -> Collective:
        """One ``batch_isend_irecv`` inside every group: each rank sends ``payload`` bytes to each of
        the other ``g - 1`` members and receives theirs (all groups at once)."""
        w = self.p.world
        hops = _hops(w, self.gpn, "intra", g, "direct")
        col = Collective("batch_isend_irecv", "intra", g, payload, dtype, phase, note=note)
        col.sent_bytes = (g - 1) * payload
        self._split(col, hops)
        alpha, beta = _step_cost(self.c, hops, p2p=True)
        # full-duplex links: the g - 1 sends leave one after another while the receives come in
        col.time_s = alpha + (g - 1) * payload * beta if g > 1 else 0.0
        return col

    @staticmethod
    def _split(col: Collective, hops: _Hops) -> None:
        col.intra_bytes = col.sent_bytes * hops.edge_intra
        col.inter_bytes = col.sent_bytes - col.intra_bytes
        col.node_inter_bytes = col.sent_bytes / hops.sends * hops.inter_per_node


# ------------------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """Everything predicted for one scheme on one problem and cluster."""

    scheme: str
    label: str
    problem: Problem
    params: dict[str, Any]
    stages: list[Stage]
    peak_memory_bytes: int
    cluster: str = ""
    compute_source: str = ""

    @property
    def collectives(self) -> list[Collective]:
        """Every collective of the step, in order (repeated stages repeat theirs)."""
        return [c for s in self.stages for _ in range(s.repeat) for c in s.comm]

    def _sum(self, attr: str, phase: str | None = None) -> float:
        return sum(getattr(c, attr) for c in self.collectives if phase is None or c.phase == phase)

    @property
    def sent_bytes(self) -> int:
        """Bytes this rank sends per step (comm.py's model), forward + backward."""
        return int(self._sum("sent_bytes"))

    @property
    def compute_s(self) -> float:
        """Compute time per step (no communication)."""
        return sum(s.compute_s * s.repeat for s in self.stages)

    @property
    def comm_s(self) -> float:
        """Communication time per step if nothing overlapped."""
        return sum(s.comm_s * s.repeat for s in self.stages)

    @property
    def step_s(self) -> float:
        """Predicted loss step time (forward + backward) with the implementation's overlap."""
        return sum(s.time_s for s in self.stages)

    @property
    def exchange(self) -> str:
        """mmfast's exchange scheme (``gather`` / ``ring``); ``""`` for the other implementations."""
        return str(self.params.get("exchange", ""))

    def by_op(self) -> dict[tuple[str, str], dict[str, int]]:
        """``{(op, phase): {"calls", "sent_bytes"}}``, to compare with a measured counter."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for c in self.collectives:
            d = out.setdefault((c.op, c.phase), {"calls": 0, "sent_bytes": 0})
            d["calls"] += c.calls
            d["sent_bytes"] += c.sent_bytes
        return out

    def row(self) -> dict[str, Any]:
        """A flat JSON-ready row."""
        p = self.problem
        return {
            "scheme": self.scheme,
            "label": self.label,
            "world": p.world,
            "batch": p.batch,
            "dim": p.dim,
            "dtype": p.dtype,
            **{k: v for k, v in self.params.items()},
            "step_ms": self.step_s * 1e3,
            "compute_ms": self.compute_s * 1e3,
            "comm_ms": self.comm_s * 1e3,
            "exposed_comm_ms": (self.step_s - self.compute_s) * 1e3,
            "peak_memory_bytes": self.peak_memory_bytes,
            "sent_bytes": self.sent_bytes,
            "sent_bytes_forward": int(self._sum("sent_bytes", "forward")),
            "sent_bytes_backward": int(self._sum("sent_bytes", "backward")),
            "intra_bytes": int(round(self._sum("intra_bytes"))),
            "inter_bytes": int(round(self._sum("inter_bytes"))),
            "node_inter_bytes": int(round(self._sum("node_inter_bytes"))),
            "collective_calls": sum(c.calls for c in self.collectives),
            "cluster": self.cluster,
            "compute_source": self.compute_source,
        }


def _tile_fwd(rates: ComputeRates, m: int, n: int, d: int) -> float:
    return 2.0 * m * n * d / rates.tile_fwd


def _tile_bwd(rates: ComputeRates, m: int, n: int, d: int) -> float:
    return 6.0 * m * n * d / rates.tile_bwd


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
        self.h, self.d, self.es, self.fs = h, prob.dim, prob.es, _stat_bytes(prob.dtype)
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
    """The header exchange: the image rows' norms, the 7 fields, the gathered table and its integer views."""
    h.tmp(prob.batch * prob.es + 64 + prob.world * (56 + 40))


def _clip_weight_memory(h: _Heap, prob: Problem, local_loss: bool, gather_with_grad: bool) -> None:
    """common.clip_weights: the column weights (two sets with local_loss and not gather_with_grad)."""
    n, fs = prob.n, _stat_bytes(prob.dtype)
    h.new(n * fs * (2 if local_loss and not gather_with_grad else 1), "w")
    h.tmp(2 * n * fs)  # the owners' batch sizes and upstream gradients, repeated per column


def _grad_epilogue_memory(h: _Heap, prob: Problem) -> None:
    """The positive pairs' gradient terms and the final scale (O(B*D)), then the returned gradients."""
    a = prob.batch * prob.dim * _stat_bytes(prob.dtype)
    h.tmp(3 * a + (a if prob.es != _stat_bytes(prob.dtype) else 0))
    h.new(2 * a, "bwd_out")


def _mmfast_memory(prob: Problem, g: int, loss: str, backend: str = "nccl", order: str = "column-first",
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
    w, b, d, n, es, fs = prob.world, prob.batch, prob.dim, prob.n, prob.es, _stat_bytes(prob.dtype)
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
    _grad_epilogue_memory(h, prob)
    return h.peak


def _ring_memory(prob: Problem, g: int, loss: str, backend: str = "nccl", local_loss: bool = True,
                 gather_with_grad: bool = True) -> int:
    """Peak bytes allocated inside mmfast's ``ring`` loss (forward + backward), equal batches, by
    replaying the allocations of :mod:`mmfast.distributed.ring` in order.

    The walk: per step the other members' pieces (``g - 1`` receive buffers of ``B*D``, each let go
    once its tiles ran), then the ring piece, with the next ring piece's receive buffer posted
    between the two (two ring pieces alive until the next step begins). Tiles run one piece
    (``B x B``) at a time. Forward: the O(N) column statistics and bounds, their fp64 all-reduce.
    Backward (own block last): per other piece the kernel's gradients (``B*D`` each, accumulation
    dtype; the partial kept to the exchange), before the ring piece's tiles the group's partials
    exchanged (``g - 1`` receive buffers) and summed with the incoming ring sum into one buffer,
    which takes the ring piece's partial and moves on (the send kept until the next step's first
    piece, the next receive buffer posted with it). Nothing scales with ``W*B*D``:
    ``O(g*B*D + W*B)``. ``backend``: as :func:`_mmfast_memory`.
    """
    w, b, d, n, es, fs = prob.world, prob.batch, prob.dim, prob.n, prob.es, _stat_bytes(prob.dtype)
    k = w // g
    piece, acc = b * d * es, b * d * fs
    clip = loss == "clip"
    h = _Heap()
    kern = _Kernels(h, prob, backend)

    def walk(tag: str, own_last: bool):
        """_walk: yields (s, q) once the caller holds the piece as ``<tag>piece`` (the caller drops it)."""
        cv, nv = f"{tag}_w_cur", f"{tag}_w_nxt"
        order = list(range(1, k)) + [0] if own_last else list(range(k))
        if order[0] != 0:
            h.new(piece, nv)
        for i, s in enumerate(order):
            if s == 0:
                h.new(0, cv)  # the text itself
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
    for _ in walk("f_", own_last=False):
        if clip:
            h.tmp(b * (4 + 8 + 8 + 8))  # logit_bound of the piece
            kern.softmax_fwd(b, b, "f_st")
            if not first:
                h.tmp(4 * b * fs)
                h.new(2 * b * fs, "rows")  # merge_lse
            else:
                h.alias("rows", "f_st_r")
            h.drop("f_st_r", "f_st_c")
        else:
            kern.sigmoid_fwd(b, b, "f_st")
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
    h.new(acc, "d_image")
    two = clip and local_loss and not gather_with_grad
    incoming = False
    for s, q in walk("b_", own_last=True):
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
        kern.grads(b, b, "b_k", two_tiles=two, sigmoid=not clip)
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
    h.alias("d_text", "b_total")
    h.drop_prefix("b_")
    _grad_epilogue_memory(h, prob)
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
    w, b, d, n, es, fs = prob.world, prob.batch, prob.dim, prob.n, prob.es, _stat_bytes(prob.dtype)
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


def _open_clip_memory(prob: Problem, local_loss: bool, gather_with_grad: bool, backend: str = "nccl") -> int:
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
    w, b, d, es = prob.world, prob.batch, prob.dim, prob.es
    g = group_size
    if w % g:
        raise ValueError(f"group_size {g} does not divide the world size {w}")
    if order not in ("intra-first", "column-first"):
        raise ValueError(f"order {order!r}: column-first (mmfast) or intra-first (what-if)")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: nccl or gloo")
    k, n, fs = w // g, prob.n, _stat_bytes(prob.dtype)
    dt, st = prob.dtype, "float64" if fs == 8 else "float32"
    bld = _Builder(prob, cluster, backend)
    blk = b * d * es
    if order == "intra-first":  # (family, its size, payload) of the first and the second exchange
        first, second, own = ("intra", g, blk), ("column", k, g * blk), g * b
    else:
        first, second, own = ("column", k, blk), ("intra", g, k * blk), k * b
    others = n - own
    rs_op = "reduce_scatter_tensor" if order == "intra-first" else _reduce_scatter_op(backend)

    def coll(op: str, fam: tuple[str, int, int], payload: int, phase: str) -> list[Collective]:
        return [bld.ring(op, fam[0], g, payload, dt, phase)] if fam[1] > 1 else []

    header = bld.ring("all_gather_into_tensor", "world", g, 8 * 7, "float64", "forward", "header")
    fwd = [Stage("header exchange", [header]),
           Stage(f"{first[0]} all-gather", coll("all_gather_into_tensor", first, first[2], "forward")),
           Stage(f"{second[0]} all-gather | own tiles", coll("all_gather_into_tensor", second, second[2], "forward"),
                 _tile_fwd(rates, b, own, d), overlap=True)]
    # elementwise passes over O(N*D) buffers (bytes read + written): the copy of the other columns,
    # the column bound's norms over the texts (CLIP) and, column-first, the texts' transpose
    oth = others if second[1] > 1 else 0
    copies_fwd = 2 * oth * d * es + (n * d * es if loss == "clip" else 0)
    if order == "column-first" and g > 1 and k > 1:  # wait_all's transpose to rank order
        copies_fwd += 2 * n * d * es
    fwd.append(Stage("other tiles", [], _tile_fwd(rates, b, others, d) + copies_fwd / rates.mem_bw))
    bwd: list[Stage] = []
    if loss == "clip":
        # one all-reduce of the column sums and weighted means (2N) and the 3 loss terms, fp64
        fwd.append(Stage("column statistics", [bld.ring("all_reduce", "world", g, (2 * n + 3) * 8, "float64",
                                                        "forward", "column statistics + loss terms")]))
        if gather_with_grad:
            op = "all_gather_into_tensor" if local_loss else "all_reduce"
            bwd.append(Stage("grad scalars", [bld.ring(op, "world", g, fs, st, "backward")]))
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
    bwd.append(Stage("other tiles (bwd)", [], _tile_bwd(rates, b, others, d) + copies_bwd / rates.mem_bw))
    bwd.append(Stage(f"{second[0]} reduce-scatter | own tiles",
                     coll(rs_op, second, second[1] * second[2], "backward"),
                     _tile_bwd(rates, b, own, d), overlap=True))
    bwd.append(Stage(f"{first[0]} reduce-scatter", coll(rs_op, first, first[1] * first[2], "backward")))
    params: dict[str, Any] = {"group_size": g, "exchange": "gather"}
    if loss == "clip":
        params.update(local_loss=local_loss, gather_with_grad=gather_with_grad)
    name = "mmfast-clip" if loss == "clip" else "mmfast-siglip"
    label = f"mmfast {'ClipLoss' if loss == 'clip' else 'SigLipLoss'} g={g}"
    if order == "intra-first":
        name, label = name + "-intrafirst", label + " intra-first (what-if)"
    stages = [st_ for st_ in fwd + bwd if st_.comm or st_.compute_s]
    mem = _mmfast_memory(prob, g, loss, backend, order, local_loss, gather_with_grad)
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

    Collectives as the code issues them: the header (7 fp64 a rank, world all-gather). Forward, per
    step: one group ``batch_isend_irecv`` (g > 1: the ring piece, ``B*D``, to each other member)
    and K-1 column ring steps (one ``B*D`` isend + one irecv, feature dtype); CLIP one world
    all-reduce of ``2N + 4`` fp64 (column statistics, 3 loss terms, a failure flag), SigLIP one of
    1 fp64 (the flag). Backward: CLIP with gather_with_grad the upstream-gradient scalar exchange;
    the group piece exchanges and K-1 text ring steps again, per step one group exchange of the
    partials (``B*D`` to each other member) and K-1 gradient ring steps of ``B*D``, both in the
    accumulation dtype; a final 1-fp64 all-reduce (the failure flag).

    Time, as the code overlaps: per step the group exchange of pieces (waited at once), the tiles
    of the other members' pieces while the previous step's gradient sum travels the column ring,
    the group exchange of the partials (waited at once), and the tiles of the ring piece while the
    next ring piece travels (texts and sums share the column link: with g = 1 their times add). The
    first ring piece of the backward (the own block comes last) is waited for.
    """
    w, b, d, es = prob.world, prob.batch, prob.dim, prob.es
    g = group_size
    if w % g:
        raise ValueError(f"group_size {g} does not divide the world size {w}")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: nccl or gloo")
    k, n, fs = w // g, prob.n, _stat_bytes(prob.dtype)
    dt, st = prob.dtype, "float64" if fs == 8 else "float32"
    clip = loss == "clip"
    bld = _Builder(prob, cluster, backend)
    piece, acc = b * d * es, b * d * fs

    # per piece: the tiles (B x B), and the elementwise passes (forward: the piece's norms for the
    # bound; backward: the partials' and sums' adds)
    c_fwd = _tile_fwd(rates, b, b, d) + (b * d * es if clip else 0) / rates.mem_bw
    c_bwd = _tile_bwd(rates, b, b, d) + 2 * acc / rates.mem_bw
    stages = [Stage("header exchange", [bld.ring("all_gather_into_tensor", "world", g, 8 * 7, "float64", "forward",
                                                 "header")])]
    for phase in ("forward", "backward"):
        bwd = phase == "backward"
        c = c_bwd if bwd else c_fwd
        if bwd and clip and gather_with_grad:
            op = "all_gather_into_tensor" if local_loss else "all_reduce"
            stages.append(Stage("grad scalars", [bld.ring(op, "world", g, fs, st, "backward")]))
        order = list(range(1, k)) + [0] if bwd else list(range(k))
        steps: list[Stage] = []
        if order[0] != 0:
            steps.append(Stage("first ring piece", [bld.column_p2p(g, piece, dt, phase, "texts")]))
        for i in range(len(order)):
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
    params: dict[str, Any] = {"group_size": g, "exchange": "ring"}
    if clip:
        params.update(local_loss=local_loss, gather_with_grad=gather_with_grad)
    name = "mmfast-clip" if clip else "mmfast-siglip"
    label = f"mmfast {'ClipLoss' if clip else 'SigLipLoss'} g={g} ring"
    stages = [st_ for st_ in stages if st_.comm or st_.compute_s]
    mem = _ring_memory(prob, g, loss, backend, local_loss, gather_with_grad)
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
    bld = _Builder(prob, cluster, backend)
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
    mem = _open_clip_memory(prob, local_loss, gather_with_grad, backend)
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
    bld = _Builder(prob, cluster, backend)
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
    bld = _Builder(prob, cluster)
    blk = b * d * 4  # .float() before the ring
    tf, tb = _tile_fwd(rates, b, b, d), _tile_bwd(rates, b, b, d)
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


# ------------------------------------------------------------------------------------- calibration


def _median_time(fn: Any, repeats: int, sync: Any) -> float:
    fn()
    sync()
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def calibrate_compute(
    device: str = "cpu",
    dtype: str = "float32",
    m: int = 256,
    n: int = 2048,
    d: int = 512,
    repeats: int = 5,
    impl: str | None = None,
) -> ComputeRates:
    """Measure :class:`ComputeRates` here: mmfast's softmax tile kernels (``contrastive_softmax_fwd`` /
    ``_bwd`` through :mod:`mmfast.ops.contrastive`, the backend ``impl`` or the default one) on an
    ``m x n`` tile of dimension ``d``, a ``torch.matmul`` of the same shape and an elementwise pass.
    Median of ``repeats`` timed calls each, after one warm-up call."""
    import torch

    from mmfast.ops import contrastive as tiles

    dev = torch.device(device)
    dt = getattr(torch, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1).to(dev, dt)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(dev, dt)
    scale = torch.tensor(10.0, device=dev)
    rl, _, cl, _ = tiles.softmax_stats(a, b, scale, None, impl)
    w_row = torch.full((m,), 0.5 / m, device=dev, dtype=rl.dtype)
    w_col = torch.full((n,), 0.5 / n, device=dev, dtype=rl.dtype)
    t_f = _median_time(lambda: tiles.softmax_stats(a, b, scale, None, impl), repeats, sync)
    t_b = _median_time(lambda: tiles.softmax_grads(a, b, scale, None, rl, cl, w_row, w_col, None, None, impl),
                       repeats, sync)
    t_mm = _median_time(lambda: a @ b.T, repeats, sync)
    big = torch.ones(max(m * n, 1 << 22), device=dev, dtype=dt)
    # a copy into a fresh buffer, as the losses' elementwise ops do (on a CPU this includes the
    # page faults of the new allocation; on a GPU the caching allocator hands a warm block)
    t_cp = _median_time(lambda: torch.empty_like(big).copy_(big), repeats, sync)
    flop = m * n * d
    return ComputeRates(
        tile_fwd=2 * flop / t_f,
        tile_bwd=6 * flop / t_b,
        gemm=2 * flop / t_mm,
        mem_bw=2 * big.numel() * big.element_size() / t_cp,
        source=f"calibrated on {device} {dtype} (M={m} N={n} D={d}, {torch.get_num_threads()} threads)",
    )


def rates_from_json(path: str | Path) -> ComputeRates:
    """:class:`ComputeRates` from a JSON file (``tile_fwd``, ``tile_bwd``, ``gemm``, ``mem_bw`` in
    FLOP/s and bytes/s; optional ``source``), e.g. one written by ``--calibrate --save`` on a GPU."""
    data = json.loads(Path(path).read_text())
    return ComputeRates(float(data["tile_fwd"]), float(data["tile_bwd"]), float(data["gemm"]),
                        float(data["mem_bw"]), str(data.get("source", path)))


def fit_alpha_beta(points: Sequence[tuple[int, int, float]]) -> Link:
    """Fit a :class:`Link` to ring all-gather timings: ``points`` of ``(m ranks, bytes per rank,
    seconds)``, model ``t = (m-1) * (alpha + n * beta)``; least squares on ``t/(m-1)``, both terms
    floored at small positive values."""
    xs = [float(n) for _, n, _ in points]
    ys = [t / max(m - 1, 1) for m, _, t in points]
    if len(set(xs)) < 2:
        raise ValueError("need at least two message sizes")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    beta = max(beta, 1e-13)
    alpha = max(my - beta * mx, 1e-7)
    return Link(bandwidth=1.0 / beta, latency=alpha)


# ---------------------------------------------------------------------------------------- simulate

DEFAULT_WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BATCHES = (256, 1024)


def simulate(
    worlds: Sequence[int] = DEFAULT_WORLDS,
    batches: Sequence[int] = DEFAULT_BATCHES,
    dim: int = 768,
    dtype: str = "bfloat16",
    cluster: Cluster = DGX_H200,
    rates: ComputeRates = H200_BF16,
) -> list[Prediction]:
    """Predictions of every scheme (and the intra-first what-if) for each world size and local batch size."""
    out: list[Prediction] = []
    for b in batches:
        for w in worlds:
            out += predict_all(Problem(w, b, dim, dtype), cluster, rates, include_whatif=True)
    return out


def _fmt_bytes(n: float) -> str:
    for unit, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= s:
            return f"{n / s:.1f} {unit}"
    return f"{int(n)} B"


def _series(preds: Sequence[Prediction], gpn: int, memory_budget: float | None = DEFAULT_MEMORY_BUDGET
            ) -> dict[str, list[Prediction]]:
    """The lines drawn / tabulated: the baselines; mmfast ClipLoss gather with g=1, g=node (mmfast's
    default under torchrun), g=W and its best g; the ring with its best g; the recommended
    (group_size, exchange) within ``memory_budget``; mmfast SigLipLoss's recommended configuration;
    and, when predicted, the intra-first what-if at g=node."""
    s: dict[str, list[Prediction]] = {}
    by_world: dict[int, list[Prediction]] = {}
    for p in preds:
        by_world.setdefault(p.problem.world, []).append(p)
    for w, ps in sorted(by_world.items()):
        for p in ps:
            g = p.params.get("group_size")
            if p.scheme in ("open_clip-clip", "open_clip-siglip", "inf-cl"):
                s.setdefault(p.label, []).append(p)
            elif p.scheme == "mmfast-clip" and p.exchange == "gather":
                for name, want in (("g=1", 1), ("g=node", min(gpn, w)), ("g=W", w)):
                    if g == want:
                        s.setdefault(f"mmfast ClipLoss {name}", []).append(p)
            elif p.scheme == "mmfast-clip-intrafirst" and g == min(gpn, w):
                s.setdefault("what-if: intra-first g=node", []).append(p)
        s.setdefault("mmfast ClipLoss gather best g", []).append(recommend(ps, exchange="gather"))
        if any(p.scheme == "mmfast-clip" and p.exchange == "ring" for p in ps):
            s.setdefault("mmfast ClipLoss ring best g", []).append(recommend(ps, exchange="ring"))
        s.setdefault("mmfast ClipLoss recommended", []).append(recommend(ps, memory_budget=memory_budget))
        if any(p.scheme == "mmfast-siglip" for p in ps):
            s.setdefault("mmfast SigLipLoss recommended", []).append(
                recommend(ps, "mmfast-siglip", memory_budget=memory_budget))
    return s


def _config(p: Prediction) -> str:
    return f"{p.params['group_size']} {p.exchange}"


_COL = 11


def _table_row(name: str, pts: list[Prediction], fmt: Any, worlds: Sequence[int]) -> str:
    cells = {p.problem.world: fmt(p) for p in pts}
    return f"{name:<34}" + "".join(f"{cells.get(w, '-'):>{_COL}}" for w in worlds)


def format_table(preds: Sequence[Prediction], gpn: int, memory_budget: float | None = DEFAULT_MEMORY_BUDGET) -> str:
    """Text table per local batch size: step time and memory of each series, the best group size of
    each exchange and the recommended (group_size, exchange) within ``memory_budget``."""
    lines = []
    budget = "no memory budget" if memory_budget is None else f"loss memory budget {_fmt_bytes(memory_budget)}"
    for b in sorted({p.problem.batch for p in preds}):
        ps = [p for p in preds if p.problem.batch == b]
        ser = _series(ps, gpn, memory_budget)
        worlds = sorted({p.problem.world for p in ps})
        head = f"{'B=' + str(b):<34}" + "".join(f"{w:>{_COL}}" for w in worlds)
        lines += [head, "-" * len(head)]
        row = functools.partial(_table_row, worlds=worlds)

        for name, pts in ser.items():
            lines.append(row(name + " ms", pts, lambda p: f"{p.step_s * 1e3:.2f}"))
        for name, pts in ser.items():
            lines.append(row(name + " mem", pts, lambda p: _fmt_bytes(p.peak_memory_bytes)))
        lines.append(row("gather best group_size", ser["mmfast ClipLoss gather best g"],
                         lambda p: str(p.params["group_size"])))
        if "mmfast ClipLoss ring best g" in ser:
            lines.append(row("ring best group_size", ser["mmfast ClipLoss ring best g"],
                             lambda p: str(p.params["group_size"])))
        rec = ser["mmfast ClipLoss recommended"]
        lines.append(row("recommended group_size", rec, lambda p: str(p.params["group_size"])))
        lines.append(row("recommended exchange", rec, lambda p: p.exchange))
        lines.append(f"(recommended: the fastest ClipLoss (group_size, exchange) within the {budget})")
        lines.append("")
    return "\n".join(lines)


def plot(preds: Sequence[Prediction], path: Path, gpn: int, title: str = "",
         memory_budget: float | None = DEFAULT_MEMORY_BUDGET) -> Path:
    """PNG, one row per local batch size: predicted step time against W, the same relative to open_clip
    ClipLoss (CLIP schemes), and peak loss memory."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = colormaps["tab20"]
    batches = sorted({p.problem.batch for p in preds})
    fig = Figure(figsize=(17, 4.6 * len(batches)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(batches), 3, squeeze=False)
    for row, b in zip(axes, batches):
        ser = _series([p for p in preds if p.problem.batch == b], gpn, memory_budget)
        base = {p.problem.world: p.step_s for p in ser.get("open_clip ClipLoss local+gwg", [])}
        for i, (name, pts) in enumerate(ser.items()):
            style: dict[str, Any] = {"marker": "o", "markersize": 3, "color": colors(i % 20)}
            if not name.startswith("mmfast"):
                style["linestyle"] = "--" if not name.startswith("what-if") else ":"
            elif "ring" in name:
                style["linestyle"] = "-."
            ws = [p.problem.world for p in pts]
            row[0].plot(ws, [p.step_s * 1e3 for p in pts], label=name, **style)
            if "SigLip" not in name and base:
                row[1].plot(ws, [p.step_s / base[p.problem.world] for p in pts], label=name, **style)
            row[2].plot(ws, [p.peak_memory_bytes / 2**30 for p in pts], label=name, **style)
        labels = ("predicted loss step (ms)", "step / open_clip ClipLoss step", "predicted peak loss memory (GiB)")
        for ax, ylabel in zip(row, labels):
            ax.set_xscale("log", base=2)
            if ax is not row[1]:
                ax.set_yscale("log")
            ax.set_xlabel("world size W (GPUs)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"B={b} per GPU, D={preds[0].problem.dim}, {preds[0].problem.dtype}")
            ax.grid(True, which="both", alpha=0.3)
        row[1].axhline(1.0, color="grey", linewidth=0.8)
        if memory_budget is not None:
            row[2].axhline(memory_budget / 2**30, color="grey", linewidth=0.8, linestyle=":")
        row[1].set_ylim(0, 2.5)
        row[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def write_outputs(preds: Sequence[Prediction], out_dir: Path, gpn: int, stem: str = "scaling",
                  meta: dict[str, Any] | None = None,
                  memory_budget: float | None = DEFAULT_MEMORY_BUDGET) -> list[Path]:
    """``<stem>.json`` (meta, the recommended (group_size, exchange) per problem, every row),
    ``<stem>.csv``, ``<stem>.txt`` (the table), ``<stem>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [p.row() for p in preds]
    jpath, cpath, tpath, ppath = (out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "txt", "png"))
    best = {}
    for b in sorted({p.problem.batch for p in preds}):
        for w in sorted({p.problem.world for p in preds}):
            ps = [p for p in preds if p.problem.batch == b and p.problem.world == w]
            if ps:
                r = recommend(ps, memory_budget=memory_budget)
                entry = {"group_size": r.params["group_size"], "exchange": r.exchange, "step_ms": r.step_s * 1e3,
                         "peak_memory_bytes": r.peak_memory_bytes, "memory_budget_bytes": memory_budget}
                for ex in EXCHANGES:
                    if any(p.scheme == "mmfast-clip" and p.exchange == ex for p in ps):
                        e = recommend(ps, exchange=ex)
                        entry[f"{ex}_best"] = {"group_size": e.params["group_size"], "step_ms": e.step_s * 1e3,
                                               "peak_memory_bytes": e.peak_memory_bytes}
                best[f"B={b} W={w}"] = entry
    jpath.write_text(json.dumps({"meta": meta or {}, "recommended": best, "rows": rows}, indent=1, default=str))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(cpath, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    table = format_table(preds, gpn, memory_budget)
    tpath.write_text(table + "\n")
    plot(preds, ppath, gpn, title=(meta or {}).get("title", ""), memory_budget=memory_budget)
    return [jpath, cpath, tpath, ppath]


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m mmfast.bench.scaling``."""
    p = argparse.ArgumentParser(
        prog="python -m mmfast.bench.scaling",
        description="Predict per-rank loss step time, peak loss memory and bytes sent (intra/inter-node) "
        "of open_clip ClipLoss/SigLipLoss, Inf-CL and mmfast (every group_size, gather and ring exchange) for "
        "W = 8..4096, and recommend mmfast's (group_size, exchange).",
    )
    p.add_argument("--worlds", default=",".join(map(str, DEFAULT_WORLDS)), help="comma-separated world sizes")
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="local batch sizes B")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension D (default 768)")
    p.add_argument("--dtype", default="bfloat16", help="feature dtype (default bfloat16)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=NVLINK.bandwidth / GB, help="NVLink GB/s per direction/GPU")
    p.add_argument("--intra-us", type=float, default=NVLINK.latency * 1e6, help="NVLink latency (us)")
    p.add_argument("--inter-gbps", type=float, default=IB_400G.bandwidth / GB, help="NIC GB/s per direction")
    p.add_argument("--inter-us", type=float, default=IB_400G.latency * 1e6, help="inter-node latency (us)")
    p.add_argument("--nics-per-node", type=int, default=None, help="default: --gpus-per-node")
    p.add_argument("--allreduce", choices=("auto", "ring", "tree"), default="auto")
    p.add_argument("--rates", type=Path, default=None,
                   help="JSON of recorded compute rates (tile_fwd, tile_bwd, gemm, mem_bw); default: H200 figures")
    p.add_argument("--tile-tflops", type=float, default=None, help="override both tile rates (TFLOP/s)")
    p.add_argument("--calibrate", action="store_true", help="measure the compute rates on --device and use them")
    p.add_argument("--device", default="cpu", help="device for --calibrate (cpu, cuda)")
    p.add_argument("--save-rates", type=Path, default=None, help="write the rates used to this JSON file")
    p.add_argument("--memory-budget-mib", type=float, default=DEFAULT_MEMORY_BUDGET / 2**20,
                   help="per-rank loss memory the recommended (group_size, exchange) must fit, MiB (default 512, "
                   "exchange='auto''s budget; 0: none)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--stem", default="scaling", help="output file stem (default scaling)")
    p.add_argument("--no-save", action="store_true", help="print only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmfast.bench.scaling``: print the table, write JSON/CSV/TXT/PNG, print the answer."""
    opts = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cluster = Cluster(
        gpus_per_node=opts.gpus_per_node,
        intra=Link(opts.intra_gbps * GB, opts.intra_us * 1e-6),
        inter=Link(opts.inter_gbps * GB, opts.inter_us * 1e-6),
        nics_per_node=opts.nics_per_node,
        allreduce=opts.allreduce,
        name=f"{opts.gpus_per_node} GPU/node, intra {opts.intra_gbps:g} GB/s {opts.intra_us:g} us, "
        f"inter {opts.inter_gbps:g} GB/s/NIC {opts.inter_us:g} us",
    )
    if opts.calibrate:
        rates = calibrate_compute(opts.device, "bfloat16" if "cuda" in opts.device else "float32")
    elif opts.rates:
        rates = rates_from_json(opts.rates)
    else:
        rates = H200_BF16
    if opts.tile_tflops:
        rates = replace(rates, tile_fwd=opts.tile_tflops * 1e12, tile_bwd=opts.tile_tflops * 1e12,
                        source=rates.source + f"; tile rates set to {opts.tile_tflops:g} TFLOP/s")
    if opts.save_rates:
        opts.save_rates.write_text(json.dumps(asdict(rates), indent=1))
    worlds = [int(x) for x in opts.worlds.split(",") if x]
    batches = [int(x) for x in opts.batches.split(",") if x]
    preds = simulate(worlds, batches, opts.dim, opts.dtype, cluster, rates)
    budget = opts.memory_budget_mib * 2**20 if opts.memory_budget_mib > 0 else None
    print(f"# {cluster.name}\n# compute: {rates.source}\n")
    print(format_table(preds, cluster.gpus_per_node, budget))
    if not opts.no_save:
        from mmfast.bench.report import default_out_dir

        out = opts.out if opts.out is not None else default_out_dir()
        meta = {"cluster": asdict(cluster), "rates": asdict(rates), "dim": opts.dim, "dtype": opts.dtype,
                "memory_budget_bytes": budget,
                "command": " ".join(["python -m mmfast.bench.scaling", *(argv or sys.argv[1:])]),
                "title": f"predicted loss step and memory, D={opts.dim} {opts.dtype}, {cluster.name}"}
        for path in write_outputs(preds, out, cluster.gpus_per_node, opts.stem, meta, budget):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
