"""What the scaling model predicts for one scheme (:class:`Prediction`) and the tile kernels' compute time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmfast.bench.scaling.collectives import Collective, Stage
from mmfast.bench.scaling.hardware import ComputeRates, Problem

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


def tile_fwd(rates: ComputeRates, m: int, n: int, d: int) -> float:
    return 2.0 * m * n * d / rates.tile_fwd


def tile_bwd(rates: ComputeRates, m: int, n: int, d: int) -> float:
    return 6.0 * m * n * d / rates.tile_bwd
