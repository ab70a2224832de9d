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

from typing import Any

import pytest
import torch
from bench_common import options, params, run

CASES = ("contrastive", "siglip")


def _params() -> list[Any]:
    out = []
    for case_name in CASES:
        tag = lambda cfg, prov, c=case_name: f"{c}-N{cfg['N']}-D{cfg['D']}-{cfg['dtype']}-{prov}"  # noqa: E731
        out += [pytest.param(case_name, *p.values, id=p.id, marks=p.marks)
                for p in params(case_name, options(case_name), tag=tag)]
    return out


@pytest.mark.parametrize(("case_name", "cfg", "provider"), _params())
def test_loss_forward_backward(benchmark, case_name: str, cfg: dict[str, Any], provider: str) -> None:
    """Forward + backward of one provider on one shape (the harness's unit of work)."""
    out = run(benchmark, case_name, cfg, provider, options(case_name))
    assert torch.isfinite(out[0]).all()
