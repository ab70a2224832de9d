"""pytest-benchmark front end to the ``window`` case of ``python -m mmfast.bench``.

The same providers as the CLI (timm's eager and SDPA window attention, ``mmfast[<impl>]``, and
FlexAttention on CUDA), one benchmark per shape and provider, grouped by shape so pytest-benchmark's
table compares the providers of one shape. Not part of the normal test run (``testpaths = ["tests"]``)::

    pytest benchmarks/test_bench_window.py --benchmark-only [--benchmark-json out.json]

Default shapes are tiny: the case's ``--quick`` block and attention-op shapes at batch 1 (no whole
model). Environment: ``MMFAST_BENCH_FULL=1`` runs the case's full shapes (blocks, ops and the whole
Swin-T; the GPU set on CUDA); ``MMFAST_BENCH_IMPL=auto,reference`` chooses the mmfast ``impl=``
values (default ``auto``); ``MMFAST_BENCH_DEVICE`` forces ``cpu`` or ``cuda`` (default: cuda when
available). A provider that cannot run here is skipped with the reason.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from mmfast.bench.cases import CaseUnavailable, get_case

DEVICE = os.environ.get("MMFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("MMFAST_BENCH_FULL", "") not in ("", "0")
IMPL = os.environ.get("MMFAST_BENCH_IMPL", "auto")
CASE = "window"
ROUNDS = 3 if FULL else 5


def _options() -> Any:
    argv = ["--impl", IMPL]
    if not FULL:
        argv += ["--levels", "block,attn", "--batch", "1"]
    opts = get_case(CASE).options(argv)
    opts.providers = None
    return opts


def _params() -> list[Any]:
    case = get_case(CASE)
    opts = _options()
    try:
        cfgs = case.configs(DEVICE, not FULL, opts)
    except CaseUnavailable as exc:
        return [pytest.param(None, None, id="unavailable", marks=pytest.mark.skip(reason=str(exc)))]
    out = []
    for cfg in cfgs:
        for prov in case.providers(cfg, DEVICE, opts):
            tag = f"{case.shape(cfg).replace(' ', '-')}-{prov.name}"
            out.append(pytest.param(cfg, prov.name, id=tag))
    return out


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


@pytest.mark.parametrize(("cfg", "provider"), _params())
def test_window_attention(benchmark, cfg: dict[str, Any], provider: str) -> None:
    """One provider on one shape (forward, or forward + backward: the harness's unit of work)."""
    case = get_case(CASE)
    opts = _options()
    prov = {p.name: p for p in case.providers(cfg, DEVICE, opts)}[provider]
    try:
        fn = prov.setup()
    except (CaseUnavailable, ImportError) as exc:
        pytest.skip(str(exc))
    if DEVICE.startswith("cuda"):
        inner = fn

        def fn() -> Any:
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.group = f"{CASE} {case.shape(cfg)} on {DEVICE}"
    benchmark.extra_info.update({"case": CASE, "provider": provider, "device": DEVICE, **cfg})
    out = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    tensors = _tensors(out)
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors)
