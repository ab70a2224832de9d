"""Scaling model of the distributed contrastive losses: memory, bytes and step time per rank, 8 to 4096 GPUs.

``python -m mmfast.bench.scaling`` writes a table, JSON/CSV rows and a PNG of the predicted loss step
time and peak loss memory against the world size for every scheme (see :func:`main`).

What is predicted, per rank and per step (loss forward + backward, the features given):

* the **collectives as each implementation issues them** (:class:`Collective`: op, sub-group, payload
  bytes, dtype, forward/backward; :class:`Stage`: what runs in sequence and what overlaps), read off
  the code:

  - ``mmfast`` (:mod:`mmfast.distributed.contrastive`, ``group_size`` g, ``K = W // g`` groups):
    forward: a 4 x int64 ``all_gather_into_tensor`` of the batch sizes over the world; the texts
    ``all_gather_into_tensor`` over ``column`` (K ranks, ``B*D`` elements each); the column block
    ``all_gather_into_tensor`` over ``intra`` (g ranks, ``K*B*D``), async, overlapped with the column
    block's tiles; CLIP adds two world ``all_reduce`` of the column statistics (``N`` and ``2N``
    floats, N = W*B, fp32) and, without ``local_loss``, one of 2 floats. Backward: CLIP with
    ``gather_with_grad`` one scalar (``all_gather_into_tensor`` with ``local_loss``, else
    ``all_reduce``); the text-gradient partials ``reduce_scatter_tensor`` over ``intra`` (input
    ``g*K*B*D``), async, overlapped with the column block's tiles, then over ``column`` (input
    ``K*B*D``).
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
  point-to-point send uses one NIC. Stages run one after the other; an overlapped stage costs
  ``max(communication, compute)``.

* **compute** from the throughput of the tile kernels (:class:`ComputeRates`; measured here by
  :func:`calibrate_compute`, or a recorded GPU figure such as :data:`H200_BF16`): the fused kernels do
  ``2*M*N*D`` FLOPs forward (logits once, row and column statistics together) and ``6*M*N*D``
  backward (logits again, then both gradients). open_clip is charged its GEMMs at the GEMM rate plus
  its passes over the materialised logits at the memory bandwidth. Both are also charged their
  elementwise copies of ``O(N*D)`` buffers (mmfast: the other groups' columns, the zeroed fp32
  partials and their casts; open_clip: the concatenation of the gathered lists) at ``mem_bw``.
  Python and kernel-launch overheads are not modelled.

* **peak loss memory** per rank (bytes allocated inside the loss call, features excluded), replaying
  each implementation's allocations in order (mmfast: the gathered texts, the fp32 gradient partials
  and the copies made for the other groups' columns, ``O(W*B*D)``; open_clip: gathered features and
  the ``B x W*B`` logits with their log-softmax, ``O(W*B*D + W*B^2)``; Inf-CL: fp32 blocks,
  ``O(B*D)``). ``backend="nccl"`` is a GPU (NCCL, Triton kernels, no extra buffers);
  ``backend="gloo"`` adds what gloo and the C++ kernels allocate on a CPU, so that the distributed
  tests can check the prediction against the profiler.

:func:`predict_mmfast` with ``order="intra-first"`` is a what-if (mmfast's first implementation,
which gathered inside the group first): see its docstring. Every figure is per rank and per step,
for equal local batch sizes.
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
    "predict_open_clip_clip",
    "predict_open_clip_siglip",
    "predict_inf_cl",
    "predict_all",
    "recommend",
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
    """A piece of the step: collectives and compute, one after the other or overlapped (max)."""

    name: str
    comm: list[Collective] = field(default_factory=list)
    compute_s: float = 0.0
    overlap: bool = False
    repeat: int = 1

    @property
    def comm_s(self) -> float:
        """Communication time of one repetition."""
        return sum(c.time_s for c in self.comm)

    @property
    def time_s(self) -> float:
        """Wall time of all repetitions."""
        one = max(self.comm_s, self.compute_s) if self.overlap else self.comm_s + self.compute_s
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
        hops = _hops(w, self.gpn, kind, w if kind == "world" else g, "direct" if op == "scatter" else "ring")
        col = Collective(op, kind, m, payload, dtype, phase, note=note)
        if op == "scatter":  # gloo's all-to-all: m scatter calls, this rank is the root of one
            col.calls = m
            col.sent_bytes = comm_sent_bytes(op, payload, m, root=True)
        else:
            col.sent_bytes = comm_sent_bytes(op, payload, m)
        self._split(col, hops)
        alpha, beta = _step_cost(self.c, hops)
        if m < 2:
            col.time_s = 0.0
        elif op in ("all_gather", "all_gather_into_tensor"):
            col.time_s = (m - 1) * (alpha + payload * beta)
        elif op == "reduce_scatter_tensor":
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


def _mmfast_memory(prob: Problem, g: int, loss: str, backend: str = "nccl", order: str = "column-first") -> int:
    """Peak bytes allocated inside mmfast's distributed loss (forward + backward), equal batches, by
    replaying the allocations of :mod:`mmfast.distributed.contrastive` (column-first) in order;
    ``order="intra-first"``: :func:`_mmfast_memory_intra_first` (the what-if).

    Forward: the column block ``K*B*D`` (column all-gather), the group all-gather's output ``N*D``
    (by position), the texts in rank order (a copy of it when g > 1 and K > 1; kept for backward),
    the copy of the other columns (``index_select``), the O(N) column statistics (CLIP).
    Backward: the kept texts, the partials ``N*D`` in the feature dtype, per column set (the other
    columns, then the own block) its copy (``index_select``), the kernel's fp32 gradients and their
    cast to the feature dtype (temporaries of the call); the group reduce-scatter's padded copy of
    the partials and its by-position transpose (a copy when K > 1), its output ``K*B*D``; the own
    block's padded partials and their sum with the group's, and the column reduce-scatter's output.
    ``backend="nccl"``: a GPU with NCCL and the Triton kernels (no workspace); ``"gloo"``: CPU, gloo
    and the C++ kernels, which make fp32 copies of the ``M x D`` rows (and, for 16-bit features, of
    the columns), and gloo's own buffers (all-gather: one of the output's size during the call, to
    the wait when async; reduce-scatter: a copy of the input, kept, like the output, as long as the
    async work object).
    """
    if order == "intra-first":
        return _mmfast_memory_intra_first(prob, g, loss, backend)
    w, b, d, n, es, fs = prob.world, prob.batch, prob.dim, prob.n, prob.es, _stat_bytes(prob.dtype)
    k = w // g
    own = k * b  # the column block: ranks j * g + p
    oth = n - own  # every other column (none when g == 1)
    gloo, clip = backend == "gloo", loss == "clip"

    def ws(cols: int) -> int:  # the C++ kernels' fp32 copies (rows; columns too for 16-bit features)
        return (b * d * fs + (cols * d * fs if es < 4 else 0)) if gloo else 0

    m = _Mem()
    # ---- forward
    m.alloc("sizes", 32 * (w + 1))
    if k > 1:  # column all-gather (sync) of the own texts into the column block
        m.alloc("col", own * d * es)
        if gloo:
            m.tmp(own * d * es)
    if g > 1:  # async group all-gather of the column block, by position
        m.alloc("by_pos", n * d * es)
        if gloo:
            m.alloc("ag_tmp", n * d * es)
    m.alloc("idx", n * 8)  # _column_split's index tensors
    m.tmp(ws(own))
    m.alloc("own_stats", (2 * b + (2 * own if clip else 0)) * fs)
    m.free("ag_tmp")  # wait_all
    if g > 1 and k > 1:  # [g, K, B, D] -> rank order: a copy (else a view of by_pos / col)
        m.alloc("texts", n * d * es)
    if clip:
        m.alloc("col_lse", n * fs)
        m.alloc("col_el", n * fs)
    if oth:
        m.alloc("others", oth * d * es)
        m.tmp(ws(oth))
        m.alloc("oth_stats", (2 * b + (2 * oth if clip else 0)) * fs)
    if clip:
        m.tmp(6 * n * fs)  # gmax, weights, stacked sums, logs
    # the texts kept for backward: the copy, or by_pos (g > 1), or the column block (g == 1)
    m.free("sizes", "idx", "own_stats", "others", "oth_stats", "col_el",
           "col" if g > 1 else "", "by_pos" if k > 1 else "")
    # ---- backward
    if clip:
        m.alloc("vec", 3 * n * fs)  # owner_b, a_col, b_col
    m.alloc("idx", n * 8)
    m.alloc("partial", n * d * es)
    m.alloc("d_image", b * d * fs)

    def grads(cols: int) -> None:  # the column set's copy, the kernel's outputs and their cast
        m.alloc("sel", cols * d * es + (2 * cols * fs if clip else 0))
        m.alloc("d_i", b * d * fs)
        m.alloc("d_t", cols * d * fs)
        m.tmp(ws(cols))
        if es != fs:
            m.alloc("d_t_lp", cols * d * es)
        m.free("sel", "d_i", "d_t" if es != fs else "")

    if oth:
        grads(oth)  # scattered into the partials (index_copy_), then freed
        m.free("d_t", "d_t_lp")
    if g > 1:  # padded copy of the partials, by position (a copy when K > 1), async reduce-scatter
        m.alloc("full", n * d * es)
        if k > 1:
            m.alloc("by_pos_g", n * d * es)
        m.alloc("grp", own * d * es)
        if gloo:
            m.alloc("rs_copy", n * d * es)
    grads(own)
    m.alloc("own", own * d * es)  # padded_blocks of the own block's gradients
    m.free("d_t", "d_t_lp")
    if g > 1:
        m.alloc("own_sum", own * d * es)  # own + grp
        m.free("own")
    if k > 1:
        m.alloc("mine", b * d * es)
        if gloo:
            m.tmp(own * d * es)
    m.free("full", "by_pos_g", "grp", "rs_copy")
    return m.peak


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
) -> Prediction:
    """mmfast's grouped all-gather loss (``loss``: ``clip`` or ``siglip``) with ``group_size`` g.

    ``order="column-first"`` is what mmfast does: the own text goes over the ``column`` ring first
    (``B*D`` a rank) and the ``K*B*D`` column block is then all-gathered inside the group (mirrored in
    backward), so each remote text crosses into a node once. ``order="intra-first"`` is a what-if
    (mmfast's first implementation): gather inside the group first, then pass ``g*B*D`` group blocks
    over the column ring, so each remote text crosses into a node g times.
    """
    w, b, d, es = prob.world, prob.batch, prob.dim, prob.es
    g = group_size
    if w % g:
        raise ValueError(f"group_size {g} does not divide the world size {w}")
    if order not in ("intra-first", "column-first"):
        raise ValueError(f"order {order!r}: column-first (mmfast) or intra-first (what-if)")
    k, n, fs = w // g, prob.n, _stat_bytes(prob.dtype)
    dt, st = prob.dtype, "float64" if fs == 8 else "float32"
    bld = _Builder(prob, cluster)
    blk = b * d * es
    if order == "intra-first":  # (family, its size, payload) of the first and the second exchange
        first, second, own = ("intra", g, blk), ("column", k, g * blk), g * b
    else:
        first, second, own = ("column", k, blk), ("intra", g, k * blk), k * b
    others = n - own

    def coll(op: str, fam: tuple[str, int, int], payload: int, phase: str) -> list[Collective]:
        return [bld.ring(op, fam[0], g, payload, dt, phase)] if fam[1] > 1 else []

    sizes = bld.ring("all_gather_into_tensor", "world", g, 32, "int64", "forward", "batch sizes")
    fwd = [Stage("size exchange", [sizes]),
           Stage(f"{first[0]} all-gather", coll("all_gather_into_tensor", first, first[2], "forward")),
           Stage(f"{second[0]} all-gather | own tiles", coll("all_gather_into_tensor", second, second[2], "forward"),
                 _tile_fwd(rates, b, own, d), overlap=True)]
    # elementwise passes over O(N*D) buffers (bytes read + written): the copy of the other columns
    # (and, column-first, the texts' transpose to rank order)
    oth = others if second[1] > 1 else 0
    copies_fwd = 2 * oth * d * es
    if order == "column-first" and g > 1 and k > 1:  # wait_all's transpose to rank order
        copies_fwd += 2 * n * d * es
    fwd.append(Stage("other tiles", [], _tile_fwd(rates, b, others, d) + copies_fwd / rates.mem_bw))
    bwd: list[Stage] = []
    if loss == "clip":
        stats = [bld.ring("all_reduce", "world", g, n * fs, st, "forward", "column max"),
                 bld.ring("all_reduce", "world", g, 2 * n * fs, st, "forward", "column sums")]
        if not local_loss:
            stats.append(bld.ring("all_reduce", "world", g, 2 * fs, st, "forward", "global loss"))
        fwd.append(Stage("column statistics", stats))
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
        # reduce-scatter's padded copy (zeros + copy) and by-position transpose (K > 1); the own
        # block's padded copy and its sum with the group's
        cast = (fs + es) * d if es != fs else 0
        copies_bwd = n * d * es + 2 * n * d * es + n * cast + 2 * oth * d * es \
            + ((3 + (2 if k > 1 else 0)) * n * d * es if g > 1 else 0) + 3 * own * d * es \
            + (3 * own * d * es if g > 1 else 0)
    bwd.append(Stage("other tiles (bwd)", [], _tile_bwd(rates, b, others, d) + copies_bwd / rates.mem_bw))
    bwd.append(Stage(f"{second[0]} reduce-scatter | own tiles",
                     coll("reduce_scatter_tensor", second, second[1] * second[2], "backward"),
                     _tile_bwd(rates, b, own, d), overlap=True))
    bwd.append(Stage(f"{first[0]} reduce-scatter", coll("reduce_scatter_tensor", first, first[1] * first[2],
                                                         "backward")))
    params: dict[str, Any] = {"group_size": g}
    if loss == "clip":
        params.update(local_loss=local_loss, gather_with_grad=gather_with_grad)
    name = "mmfast-clip" if loss == "clip" else "mmfast-siglip"
    label = f"mmfast {'ClipLoss' if loss == 'clip' else 'SigLipLoss'} g={g}"
    if order == "intra-first":
        name, label = name + "-intrafirst", label + " intra-first (what-if)"
    stages = [st_ for st_ in fwd + bwd if st_.comm or st_.compute_s]
    return Prediction(name, label, prob, params, stages, _mmfast_memory(prob, g, loss, backend, order), cluster.name,
                      rates.source)


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
) -> list[Prediction]:
    """Every scheme on one problem: open_clip ClipLoss (local+gwg), open_clip SigLipLoss (bidir),
    Inf-CL, mmfast ClipLoss (local+gwg) for each group size dividing W (and mmfast SigLipLoss);
    ``include_whatif`` adds mmfast ClipLoss with the intra-first order (mmfast's first implementation)."""
    w = prob.world
    gs = sorted(group_sizes) if group_sizes is not None else [g for g in range(1, w + 1) if w % g == 0]
    preds = [predict_open_clip_clip(prob, cluster, rates)]
    if include_siglip:
        preds.append(predict_open_clip_siglip(prob, cluster, rates))
    if include_inf_cl:
        preds.append(predict_inf_cl(prob, cluster, rates))
    preds += [predict_mmfast(prob, cluster, rates, g) for g in gs]
    if include_siglip:
        preds += [predict_mmfast(prob, cluster, rates, g, loss="siglip") for g in gs]
    if include_whatif:
        preds += [predict_mmfast(prob, cluster, rates, g, order="intra-first") for g in gs]
    return preds


def recommend(preds: Sequence[Prediction], scheme: str = "mmfast-clip", rel_tol: float = 0.01) -> Prediction:
    """The ``scheme`` prediction with the least step time; predictions within ``rel_tol`` of it tie,
    and the tie goes to the one with less memory (then the smaller group)."""
    cands = [p for p in preds if p.scheme == scheme]
    if not cands:
        raise ValueError(f"no {scheme} prediction")
    best = min(p.step_s for p in cands)
    ties = [p for p in cands if p.step_s <= best * (1 + rel_tol)]
    return min(ties, key=lambda p: (p.peak_memory_bytes, p.step_s, p.params.get("group_size", 0)))


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


def _series(preds: Sequence[Prediction], gpn: int) -> dict[str, list[Prediction]]:
    """The lines drawn / tabulated: the baselines, mmfast ClipLoss g=1, g=node (mmfast's default under
    torchrun), g=W and the recommended g, mmfast SigLipLoss's best g, and, when predicted, the
    intra-first what-if at g=node."""
    s: dict[str, list[Prediction]] = {}
    by_world: dict[int, list[Prediction]] = {}
    for p in preds:
        by_world.setdefault(p.problem.world, []).append(p)
    for w, ps in sorted(by_world.items()):
        for p in ps:
            g = p.params.get("group_size")
            if p.scheme in ("open_clip-clip", "open_clip-siglip", "inf-cl"):
                s.setdefault(p.label, []).append(p)
            elif p.scheme == "mmfast-clip":
                for name, want in (("g=1", 1), ("g=node", min(gpn, w)), ("g=W", w)):
                    if g == want:
                        s.setdefault(f"mmfast ClipLoss {name}", []).append(p)
            elif p.scheme == "mmfast-clip-intrafirst" and g == min(gpn, w):
                s.setdefault("what-if: intra-first g=node", []).append(p)
        s.setdefault("mmfast ClipLoss best g", []).append(recommend(ps))
        if any(p.scheme == "mmfast-siglip" for p in ps):
            s.setdefault("mmfast SigLipLoss best g", []).append(recommend(ps, "mmfast-siglip"))
    return s


def format_table(preds: Sequence[Prediction], gpn: int) -> str:
    """Text table per local batch size: step time and memory of each series, and the best g."""
    lines = []
    for b in sorted({p.problem.batch for p in preds}):
        ps = [p for p in preds if p.problem.batch == b]
        ser = _series(ps, gpn)
        worlds = sorted({p.problem.world for p in ps})
        head = f"{'B=' + str(b):<28}" + "".join(f"{w:>11}" for w in worlds)
        lines += [head, "-" * len(head)]
        for name, pts in ser.items():
            lines.append(f"{name + ' ms':<28}" + "".join(f"{p.step_s * 1e3:>11.2f}" for p in pts))
        for name, pts in ser.items():
            lines.append(f"{name + ' mem':<28}" + "".join(f"{_fmt_bytes(p.peak_memory_bytes):>11}" for p in pts))
        best = ser["mmfast ClipLoss best g"]
        lines.append(f"{'recommended group_size':<28}" + "".join(f"{p.params['group_size']:>11}" for p in best))
        lines.append("")
    return "\n".join(lines)


def plot(preds: Sequence[Prediction], path: Path, gpn: int, title: str = "") -> Path:
    """PNG, one row per local batch size: predicted step time against W, the same relative to open_clip
    ClipLoss (CLIP schemes), and peak loss memory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    batches = sorted({p.problem.batch for p in preds})
    fig = Figure(figsize=(17, 4.6 * len(batches)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(batches), 3, squeeze=False)
    for row, b in zip(axes, batches):
        ser = _series([p for p in preds if p.problem.batch == b], gpn)
        base = {p.problem.world: p.step_s for p in ser.get("open_clip ClipLoss local+gwg", [])}
        for i, (name, pts) in enumerate(ser.items()):
            style: dict[str, Any] = {"marker": "o", "markersize": 3, "color": f"C{i}"}
            if not name.startswith("mmfast"):
                style["linestyle"] = "--" if not name.startswith("what-if") else ":"
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
        row[1].set_ylim(0, 2.5)
        row[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def write_outputs(preds: Sequence[Prediction], out_dir: Path, gpn: int, stem: str = "scaling",
                  meta: dict[str, Any] | None = None) -> list[Path]:
    """``<stem>.json`` (meta + every row), ``<stem>.csv``, ``<stem>.txt`` (the table), ``<stem>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [p.row() for p in preds]
    jpath, cpath, tpath, ppath = (out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "txt", "png"))
    best = {}
    for b in sorted({p.problem.batch for p in preds}):
        for w in sorted({p.problem.world for p in preds}):
            ps = [p for p in preds if p.problem.batch == b and p.problem.world == w]
            if ps:
                r = recommend(ps)
                best[f"B={b} W={w}"] = {"group_size": r.params["group_size"], "step_ms": r.step_s * 1e3,
                                        "peak_memory_bytes": r.peak_memory_bytes}
    jpath.write_text(json.dumps({"meta": meta or {}, "recommended": best, "rows": rows}, indent=1, default=str))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(cpath, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    table = format_table(preds, gpn)
    tpath.write_text(table + "\n")
    plot(preds, ppath, gpn, title=(meta or {}).get("title", ""))
    return [jpath, cpath, tpath, ppath]


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m mmfast.bench.scaling``."""
    p = argparse.ArgumentParser(
        prog="python -m mmfast.bench.scaling",
        description="Predict per-rank loss step time, peak loss memory and bytes sent (intra/inter-node) "
        "of open_clip ClipLoss/SigLipLoss, Inf-CL and mmfast (every group_size) for W = 8..4096.",
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
    print(f"# {cluster.name}\n# compute: {rates.source}\n")
    print(format_table(preds, cluster.gpus_per_node))
    if not opts.no_save:
        from mmfast.bench.report import default_out_dir

        out = opts.out if opts.out is not None else default_out_dir()
        meta = {"cluster": asdict(cluster), "rates": asdict(rates), "dim": opts.dim, "dtype": opts.dtype,
                "command": " ".join(["python -m mmfast.bench.scaling", *(argv or sys.argv[1:])]),
                "title": f"predicted loss step and memory, D={opts.dim} {opts.dtype}, {cluster.name}"}
        for path in write_outputs(preds, out, cluster.gpus_per_node, opts.stem, meta):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
