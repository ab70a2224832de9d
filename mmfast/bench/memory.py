"""Peak extra memory of one call: CUDA allocator statistics on a GPU, the profiler's memory events on CPU.

"Peak extra memory" is the largest amount of memory allocated *inside* the call and alive at the same
time, measured relative to what was allocated when the call started. Tensors that exist before the
call (inputs, parameters) are not counted; temporaries freed before the call returns are (it is a
peak, not the final balance); the call's result counts while it is alive, that is until the end.

CUDA (:func:`cuda_peak_extra_memory`)
    ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() - memory_allocated()``
    around the synchronised call. This is the caching allocator's own bookkeeping of live tensor
    bytes (rounded up to its 512-byte blocks), not what it reserved from the driver.

CPU (:func:`cpu_peak_extra_memory`)
    The CPU allocator keeps no peak statistic, and the process RSS is useless here (glibc keeps freed
    pages, big buffers are mmapped lazily and first-touched later). What does work is the profiler:
    with ``torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True)`` every
    allocation and free done through c10's CPU allocator while the profiler runs is reported as a
    ``[memory]`` event whose ``nbytes()`` is positive for an allocation and negative for a free
    (``prof.profiler.kineto_results.events()``, timestamps ``start_ns()``). Sorting them by time and
    taking the running sum reconstructs the live bytes allocated inside the call; its maximum (floored
    at 0) is the peak extra memory. Frees of blocks allocated before the profiler started are not
    reported at all (c10 warns once: "Memory block of unknown size was allocated before the profiling
    started"), so inputs released inside the call do not offset the peak. Intra-op worker threads are
    covered because ``at::parallel_for`` propagates the profiler's thread-local state. Not counted:
    memory that does not go through c10's allocator (a library's private ``malloc``, Python objects).
    The profiler adds a few microseconds per op, so memory is measured in a separate, untimed call.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MemoryStats",
    "cpu_peak_extra_memory",
    "cuda_peak_extra_memory",
    "peak_extra_memory",
    "peak_from_events",
]


@dataclass
class MemoryStats:
    """What :func:`peak_extra_memory` measured for one call.

    ``peak_extra_bytes``: the peak of live bytes allocated inside the call, relative to its start.
    ``net_bytes``: allocated minus freed inside the call at its end (its result, leaks), CPU and CUDA.
    ``method``: ``"cuda-allocator"`` or ``"cpu-profiler"``. ``events``: how many allocator events the
    CPU profiler saw (0 on CUDA). ``result``: what the call returned.
    """

    peak_extra_bytes: int
    net_bytes: int
    method: str
    events: int = 0
    result: Any = None


def peak_from_events(events: list[tuple[int, int]]) -> tuple[int, int]:
    """Peak and final of the running sum of ``(timestamp, nbytes)`` events taken in time order.

    ``nbytes`` is positive for an allocation and negative for a free. The peak is floored at 0 (frees
    of tensors that existed before the window make the running sum negative; they are not a peak).
    Ties keep their given order (Python's sort is stable).
    """
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak, live


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints ``USDT: profiler_start/stop`` lines on every run)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def cpu_peak_extra_memory(fn: Callable[[], Any]) -> MemoryStats:
    """Run ``fn()`` once under the CPU profiler and return its peak extra CPU memory (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" on CPU-only hosts
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr_fd():
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_stderr_fd():
            prof.__exit__(None, None, None)
    events = [
        (ev.start_ns(), ev.nbytes())
        for ev in prof.profiler.kineto_results.events()
        if ev.name() == "[memory]" and ev.device_type() == torch.autograd.DeviceType.CPU
    ]
    peak, net = peak_from_events(events)
    return MemoryStats(
        peak_extra_bytes=peak, net_bytes=net, method="cpu-profiler", events=len(events), result=result
    )


def cuda_peak_extra_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> MemoryStats:
    """Run ``fn()`` once and return the CUDA caching allocator's peak minus the memory at the start."""
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    net = torch.cuda.memory_allocated(dev) - before
    return MemoryStats(peak_extra_bytes=max(0, peak), net_bytes=net, method="cuda-allocator", result=result)


def peak_extra_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> MemoryStats:
    """Peak extra memory of ``fn()``: CUDA allocator stats on ``cuda``, the profiler on ``cpu``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return cuda_peak_extra_memory(fn, dev)
    if dev.type == "cpu":
        return cpu_peak_extra_memory(fn)
    raise ValueError(f"peak_extra_memory: no method for device type {dev.type!r}")
