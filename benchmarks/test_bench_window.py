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

from typing import Any

import pytest
import torch
from bench_common import options, params, run, tensors

from mmfast.bench.cases import CaseUnavailable

CASE = "window"
QUICK = ["--levels", "block,attn", "--batch", "1"]


@pytest.mark.parametrize(("cfg", "provider"), params(CASE, options(CASE, QUICK)))
def test_window_attention(benchmark, cfg: dict[str, Any], provider: str) -> None:
    """One provider on one shape (forward, or forward + backward: the harness's unit of work)."""
    out = run(benchmark, CASE, cfg, provider, options(CASE, QUICK), skip_on=(CaseUnavailable, ImportError))
    ts = tensors(out)
    assert ts and all(torch.isfinite(t.float()).all() for t in ts)
