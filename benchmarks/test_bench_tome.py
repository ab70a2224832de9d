"""pytest-benchmark front end to the ``tome`` case of ``python -m mmfast.bench``.

The same providers as the CLI (the unmerged timm ViT, the reference-style ToMe ``tome-ref``,
``mmfast[<impl>]`` and ``mmfast[<impl>]+eager``; for the merge share, match + merge alone and the
whole ToMe block), inference, one benchmark per shape and provider, grouped by shape. Not part of
the normal test run (``testpaths = ["tests"]``)::

    pytest benchmarks/test_bench_tome.py --benchmark-only [--benchmark-json out.json]

Default shapes are tiny: ``vit_tiny_patch16_224`` at batch 1 (r = 16) and the merge share of its
first layer. Environment: ``MMFAST_BENCH_FULL=1`` runs the case's full shapes (ViT-B/16 at batch 8
on CPU; fp16 ViT-B/16 and ViT-L/14 on CUDA); ``MMFAST_BENCH_IMPL=auto,cpp`` chooses the mmfast
``impl=`` values (default ``auto``); ``MMFAST_BENCH_DEVICE`` forces ``cpu`` or ``cuda`` (default: cuda
when available). A provider that cannot run here is skipped with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_common import options, params, run, tensors

from mmfast.bench.cases import CaseUnavailable

CASE = "tome"
QUICK = ["--models", "vit_tiny_patch16_224", "--batch", "1", "--dtype", "float32"]


@pytest.mark.parametrize(("cfg", "provider"), params(CASE, options(CASE, QUICK), check=True))
def test_tome_inference(benchmark, cfg: dict[str, Any], provider: str) -> None:
    """One provider on one shape: a whole-model forward, a match + merge, or one ToMe block."""
    out = run(benchmark, CASE, cfg, provider, options(CASE, QUICK), skip_on=(CaseUnavailable, ImportError))
    ts = tensors(out)
    assert ts and all(torch.isfinite(t.float()).all() for t in ts)
