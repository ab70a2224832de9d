"""Benchmark harness: providers timed side by side, peak extra memory, bytes communicated, stored rows.

* :mod:`mmfast.bench.harness`: :class:`Provider`, :func:`compare` (interleaved timing, ratios),
  :func:`time_providers`;
* :mod:`mmfast.bench.memory`: :func:`peak_extra_memory` (CUDA allocator stats / CPU profiler events);
* :mod:`mmfast.bench.comm`: :func:`count_collective_bytes` (wraps ``torch.distributed``'s collectives
  and models the bytes each rank sends);
* :mod:`mmfast.bench.report`: the printed table and the JSON/CSV rows with their provenance;
* :mod:`mmfast.bench.cases`: the registry behind ``python -m mmfast.bench <case>`` (``contrastive``,
  ``siglip``, ...).
"""

from mmfast.bench.comm import CollectiveCounter, CollectiveRecord, count_collective_bytes
from mmfast.bench.harness import BenchResult, Provider, TimingStats, compare, time_providers
from mmfast.bench.memory import MemoryStats, cpu_peak_extra_memory, cuda_peak_extra_memory, peak_extra_memory
from mmfast.bench.report import environment, format_table, write_results

__all__ = [
    "BenchResult",
    "CollectiveCounter",
    "CollectiveRecord",
    "MemoryStats",
    "Provider",
    "TimingStats",
    "compare",
    "count_collective_bytes",
    "cpu_peak_extra_memory",
    "cuda_peak_extra_memory",
    "environment",
    "format_table",
    "peak_extra_memory",
    "time_providers",
    "write_results",
]
