"""The scaling model's collectives as issued (:class:`Collective`, :class:`Stage`), the rings and
hops of the topology they run on, and their alpha-beta cost."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmfast.bench.scaling.hardware import Cluster, Problem, comm_sent_bytes

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


class Builder:
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
