"""What the pytest-benchmark front ends (``benchmarks/test_bench_*.py``) share: the environment
knobs, the case options, the (shape, provider) parameters and the timed call of one provider.

Environment: ``MMFAST_BENCH_FULL=1`` runs a case's full shapes; ``MMFAST_BENCH_IMPL`` chooses the
mmfast ``impl=`` values (default ``auto``); ``MMFAST_BENCH_DEVICE`` forces ``cpu`` or ``cuda``
(default: cuda when available).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from mmfast.bench.cases import CaseUnavailable, get_case

DEVICE = os.environ.get("MMFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("MMFAST_BENCH_FULL", "") not in ("", "0")
IMPL = os.environ.get("MMFAST_BENCH_IMPL", "auto")
ROUNDS = 3 if FULL else 5


def options(case_name: str, quick_argv: Sequence[str] = ()) -> Any:
    """The case's options with ``--impl IMPL`` (plus ``quick_argv`` unless FULL), every provider."""
    argv = ["--impl", IMPL] + ([] if FULL else list(quick_argv))
    opts = get_case(case_name).options(argv)
    opts.providers = None
    return opts


def params(case_name: str, opts: Any, *, check: bool = False,
           tag: Callable[[dict[str, Any], str], str] | None = None) -> list[Any]:
    """``pytest.param(cfg, provider_name)`` for every shape and provider of the case on DEVICE; a
    case that cannot run here (``check=True`` runs its ``check`` first) gives one skipped param."""
    case = get_case(case_name)
    try:
        if check:
            case.check(opts)
        cfgs = case.configs(DEVICE, not FULL, opts)
    except CaseUnavailable as exc:
        return [pytest.param(None, None, id="unavailable", marks=pytest.mark.skip(reason=str(exc)))]
    out = []
    for cfg in cfgs:
        for prov in case.providers(cfg, DEVICE, opts):
            name = tag(cfg, prov.name) if tag else f"{case.shape(cfg).replace(' ', '-')}-{prov.name}"
            out.append(pytest.param(cfg, prov.name, id=name))
    return out


def tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) result."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors(v)]
    return []


def run(benchmark, case_name: str, cfg: dict[str, Any], provider: str, opts: Any,
        skip_on: tuple[type[BaseException], ...] = (CaseUnavailable,)) -> Any:
    """Set up ``provider`` on ``cfg`` (skipping on ``skip_on``), time it with pytest-benchmark
    (synchronising on CUDA) and return its last result."""
    case = get_case(case_name)
    prov = {p.name: p for p in case.providers(cfg, DEVICE, opts)}[provider]
    try:
        fn = prov.setup()
    except skip_on as exc:
        pytest.skip(str(exc))
    if DEVICE.startswith("cuda"):
        inner = fn

        def fn() -> Any:
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.group = f"{case_name} {case.shape(cfg)} on {DEVICE}"
    benchmark.extra_info.update({"case": case_name, "provider": provider, "device": DEVICE, **cfg})
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
