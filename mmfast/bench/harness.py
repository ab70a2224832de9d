"""Time one benchmark case against named baselines, side by side, in one process.

A *provider* is a named way of computing the case (``open_clip``, ``mmfast[auto]``...): a
:class:`Provider` whose ``setup()`` builds the inputs and modules and returns the zero-argument
callable to time. :func:`compare` runs every provider of one configuration:

1. ``setup()`` of each provider (not timed);
2. ``warmup`` untimed calls of each, interleaved; the warm-up also calibrates ``number``, the calls per
   timed sample, so that a sample lasts at least ``min_sample_s`` (1 for anything slower);
3. ``repeats`` samples, round-robin over the providers with the starting provider rotated each round,
   so that slow drifts of the machine (another job, clock changes) hit every provider alike; on a GPU
   each sample is bracketed by ``torch.cuda.synchronize()``; the loop stops early, after at least
   ``min_repeats`` rounds, once ``max_time_s`` of timed work has been spent;
4. one more untimed call of each provider for its peak extra memory (:mod:`mmfast.bench.memory`),
   its collective traffic (:func:`mmfast.bench.comm.count_collective_bytes`) and its output, which is
   compared with the baseline's (``max_abs_diff``, when both return tensors of equal shapes).

Statistics are per call: median, quartiles (IQR), min, max, mean. ``ratio`` is
``baseline_median / provider_median`` against the named baseline: above 1 means faster than the
baseline. A provider that raises gets a result row with ``error`` set, and the others still run.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmfast.bench.comm import count_collective_bytes
from mmfast.bench.memory import peak_extra_memory

__all__ = [
    "Provider",
    "TimingStats",
    "BenchResult",
    "compare",
    "time_providers",
    "max_abs_diff",
    "grad_step",
    "mmfast_backend",
]


@dataclass
class Provider:
    """A named implementation of a case. ``setup()`` returns the zero-argument callable that is timed.

    ``setup`` runs once per configuration, outside the timings: build the inputs and modules there.
    The callable it returns should do the whole unit of work (e.g. forward + backward) and may return
    its outputs (tensors, tuples, dicts of tensors), which are compared with the baseline's.
    """

    name: str
    setup: Callable[[], Callable[[], Any]]
    description: str = ""


@dataclass
class TimingStats:
    """Per-call timings of one provider, in milliseconds, over ``repeats`` samples of ``number`` calls."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    repeats: int
    number: int
    samples_ms: list[float] = field(default_factory=list)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range (q3 - q1)."""
        return self.q3_ms - self.q1_ms

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], number: int) -> TimingStats:
        """Statistics of per-call sample times (each already divided by ``number``)."""
        xs = sorted(samples_ms)
        if not xs:
            raise ValueError("no samples")
        if len(xs) >= 2:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        else:
            q1 = q3 = xs[0]
        return cls(
            median_ms=statistics.median(xs),
            q1_ms=q1,
            q3_ms=q3,
            min_ms=xs[0],
            max_ms=xs[-1],
            mean_ms=statistics.fmean(xs),
            repeats=len(xs),
            number=number,
            samples_ms=list(samples_ms),
        )


@dataclass
class BenchResult:
    """One row: one provider on one configuration of one case."""

    case: str
    params: dict[str, Any]
    shape: str
    provider: str
    baseline: str | None
    device: str
    timing: TimingStats | None = None
    ratio: float | None = None
    peak_extra_bytes: int | None = None
    net_bytes: int | None = None
    memory_method: str | None = None
    sent_bytes: int | None = None
    collective_calls: int | None = None
    collectives: dict[str, Any] | None = None
    max_abs_diff: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready dict (timing fields at the top level, ``samples_ms`` kept)."""
        d = asdict(self)
        t = d.pop("timing")
        for k in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "mean_ms", "repeats", "number"):
            d[k] = t[k] if t else None
        d["iqr_ms"] = (t["q3_ms"] - t["q1_ms"]) if t else None
        d["samples_ms"] = t["samples_ms"] if t else []
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], number: int, device: torch.device) -> float:
    """Seconds per call of ``number`` back-to-back calls (synchronised on a GPU)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / number


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def time_providers(
    fns: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 10,
    min_repeats: int = 3,
    max_time_s: float | None = None,
    min_sample_s: float = 1e-3,
    number: int | None = None,
) -> tuple[dict[str, TimingStats], dict[str, str]]:
    """Time ``fns`` interleaved (round-robin, rotated start); return ``(stats, errors)`` by name.

    ``number`` (calls per sample) defaults to the smallest count whose sample lasts ``min_sample_s``,
    judged from the last warm-up call (at least one warm-up is always run). A function that raises
    is dropped from the rounds and its error returned instead of its stats.
    """
    dev = torch.device(device)
    names = list(fns)
    errors: dict[str, str] = {}
    numbers: dict[str, int] = {}
    for name in names:
        try:
            per_call = 0.0
            for _ in range(max(1, warmup)):
                per_call = _time_once(fns[name], 1, dev)
            numbers[name] = number or max(1, min(10_000, math.ceil(min_sample_s / max(per_call, 1e-9))))
        except Exception as exc:  # reported in the row, the other providers go on
            errors[name] = _short_error(exc) + "\n" + traceback.format_exc(limit=-3)
    live = [n for n in names if n not in errors]
    samples: dict[str, list[float]] = {n: [] for n in live}
    spent = 0.0
    for i in range(max(1, repeats)):
        order = live[i % len(live) :] + live[: i % len(live)] if live else []
        for name in order:
            if name in errors:
                continue
            try:
                dt = _time_once(fns[name], numbers[name], dev)
            except Exception as exc:
                errors[name] = _short_error(exc) + "\n" + traceback.format_exc(limit=-3)
                continue
            samples[name].append(dt * 1e3)
            spent += dt * numbers[name]
        if max_time_s is not None and i + 1 >= min_repeats and spent >= max_time_s:
            break
    stats = {n: TimingStats.from_samples(samples[n], numbers[n]) for n in live if n not in errors}
    return stats, errors


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for k in sorted(x, key=str) for t in _tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def max_abs_diff(a: Any, b: Any) -> float | None:
    """Largest absolute difference between the tensors of two outputs; None when they do not line up."""
    ta, tb = _tensors(a), _tensors(b)
    if not ta or len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return None
    return max(
        ((x.detach().double() - y.detach().double()).abs().max().item() if x.numel() else 0.0)
        for x, y in zip(ta, tb)
    )


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, Mapping):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_detach(v) for v in x]
    return None


def compare(
    case: str,
    params: Mapping[str, Any],
    providers: Sequence[Provider],
    *,
    baseline: str | None = None,
    device: torch.device | str = "cpu",
    shape: str | None = None,
    warmup: int = 1,
    repeats: int = 10,
    min_repeats: int = 3,
    max_time_s: float | None = None,
    min_sample_s: float = 1e-3,
    memory: bool = True,
    check_outputs: bool = True,
) -> list[BenchResult]:
    """Run every provider of one configuration side by side; one :class:`BenchResult` per provider.

    ``baseline`` names the provider the ratios are taken against (no ratios when it is absent or
    failed). ``memory=False`` skips the extra untimed call (no peak memory, bytes or output check).
    """
    dev = torch.device(device)
    shape = shape if shape is not None else ", ".join(f"{k}={v}" for k, v in params.items())
    results = {
        p.name: BenchResult(
            case=case, params=dict(params), shape=shape, provider=p.name, baseline=baseline, device=str(dev)
        )
        for p in providers
    }
    fns: dict[str, Callable[[], Any]] = {}
    for p in providers:
        try:
            fns[p.name] = p.setup()
        except Exception as exc:
            results[p.name].error = _short_error(exc)
    stats, errors = time_providers(
        fns,
        device=dev,
        warmup=warmup,
        repeats=repeats,
        min_repeats=min_repeats,
        max_time_s=max_time_s,
        min_sample_s=min_sample_s,
    )
    for name, msg in errors.items():
        results[name].error = msg.splitlines()[0]
        fns.pop(name)
    for name, st in stats.items():
        results[name].timing = st
    if memory:
        outputs: dict[str, Any] = {}
        for name, fn in fns.items():
            gc.collect()
            try:
                with count_collective_bytes() as counter:
                    mem = peak_extra_memory(fn, dev)
            except Exception as exc:
                results[name].error = _short_error(exc)
                continue
            r = results[name]
            r.peak_extra_bytes, r.net_bytes, r.memory_method = mem.peak_extra_bytes, mem.net_bytes, mem.method
            r.sent_bytes, r.collective_calls = counter.sent_bytes, counter.calls
            r.collectives = counter.summary()["by_op"] if counter.calls else None
            if check_outputs:
                outputs[name] = _detach(mem.result)
            del mem
        if check_outputs and baseline in outputs:
            for name, out in outputs.items():
                if name != baseline:
                    results[name].max_abs_diff = max_abs_diff(out, outputs[baseline])
    base = results.get(baseline) if baseline else None
    if base is not None and base.timing is not None:
        for r in results.values():
            if r.timing is not None and r.timing.median_ms > 0:
                r.ratio = base.timing.median_ms / r.timing.median_ms
    fns.clear()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return [results[p.name] for p in providers]


def grad_step(fn: Callable[..., torch.Tensor], *args: torch.Tensor | None,
              grad_output: torch.Tensor | None = None) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A provider's timed forward + backward: ``fn(*args)``, then ``torch.autograd.grad`` of its output
    (against ``grad_output``; None: a scalar output) with respect to every argument that is not None.
    The callable returns ``(output.detach(), *grads)``, so nothing accumulates between calls."""
    leaves = [t for t in args if t is not None]

    def step() -> tuple[torch.Tensor, ...]:
        out = fn(*args)
        grads = torch.autograd.grad(out, leaves, grad_output)
        return (out.detach(), *grads)

    return step


@contextlib.contextmanager
def mmfast_backend(impl: str) -> Iterator[None]:
    """``mmfast.use_backend(impl)``, importing mmfast only when a provider runs."""
    import mmfast

    with mmfast.use_backend(impl):
        yield
