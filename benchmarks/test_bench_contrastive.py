"""pytest-benchmark front end to the ``contrastive`` and ``siglip`` cases of ``python -m mmfast.bench``.

The same providers as the CLI (open_clip's loss and ``mmfast.<Loss>(impl=...)``, forward + backward),
one benchmark per case, shape and provider, grouped by case and shape so pytest-benchmark's table
compares the providers of one shape. Not part of the normal test run (``testpaths = ["tests"]``)::

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Environment: ``MMFAST_BENCH_FULL=1`` runs the cases' full shapes (default: their ``--quick`` ones);
``MMFAST_BENCH_IMPL=auto,cpp`` chooses the mmfast ``impl=`` values (default ``auto``);
``MMFAST_BENCH_DEVICE`` forces ``cpu`` or ``cuda`` (default: cuda when available). A provider whose
implementation is missing (mmfast's loss not written yet, open_clip not installed) is skipped with
the reason.
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
CASES = ("contrastive", "siglip")
ROUNDS = 3 if FULL else 5


def _options(case_name: str) -> Any:
    opts = get_case(case_name).options(["--impl", IMPL])
    opts.providers = None
    return opts


def _params() -> list[Any]:
    out = []
    for case_name in CASES:
        case = get_case(case_name)
        opts = _options(case_name)
        for cfg in case.configs(DEVICE, not FULL, opts):
            for prov in case.providers(cfg, DEVICE, opts):
                tag = f"{case_name}-N{cfg['N']}-D{cfg['D']}-{cfg['dtype']}-{prov.name}"
                out.append(pytest.param(case_name, cfg, prov.name, id=tag))
    return out


@pytest.mark.parametrize(("case_name", "cfg", "provider"), _params())
def test_loss_forward_backward(benchmark, case_name: str, cfg: dict[str, Any], provider: str) -> None:
    """Forward + backward of one provider on one shape (the harness's unit of work)."""
    case = get_case(case_name)
    opts = _options(case_name)
    prov = {p.name: p for p in case.providers(cfg, DEVICE, opts)}[provider]
    try:
        fn = prov.setup()
    except CaseUnavailable as exc:
        pytest.skip(str(exc))
    if DEVICE.startswith("cuda"):
        inner = fn

        def fn() -> Any:
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.group = f"{case_name} {case.shape(cfg)} on {DEVICE}"
    benchmark.extra_info.update({"case": case_name, "provider": provider, "device": DEVICE, **cfg})
    out = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    loss = out[0]
    assert torch.isfinite(loss).all()
