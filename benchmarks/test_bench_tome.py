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

import os
from typing import Any

import pytest
import torch

from mmfast.bench.cases import CaseUnavailable, get_case

DEVICE = os.environ.get("MMFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("MMFAST_BENCH_FULL", "") not in ("", "0")
IMPL = os.environ.get("MMFAST_BENCH_IMPL", "auto")
CASE = "tome"
ROUNDS = 3 if FULL else 5


def _options() -> Any:
    argv = ["--impl", IMPL]
    if not FULL:
        argv += ["--models", "vit_tiny_patch16_224", "--batch", "1", "--dtype", "float32"]
    opts = get_case(CASE).options(argv)
    opts.providers = None
    return opts


def _params() -> list[Any]:
    case = get_case(CASE)
    opts = _options()
    try:
        case.check(opts)
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
def test_tome_inference(benchmark, cfg: dict[str, Any], provider: str) -> None:
    """One provider on one shape: a whole-model forward, a match + merge, or one ToMe block."""
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
