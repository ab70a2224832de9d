"""Measured inputs of the scaling model: the tile kernels' throughput and an alpha-beta fit."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmfast.bench.scaling.hardware import ComputeRates, Link

# ------------------------------------------------------------------------------------- calibration


def _median_time(fn: Any, repeats: int, sync: Any) -> float:
    fn()
    sync()
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def calibrate_compute(
    device: str = "cpu",
    dtype: str = "float32",
    m: int = 256,
    n: int = 2048,
    d: int = 512,
    repeats: int = 5,
    impl: str | None = None,
) -> ComputeRates:
    """Measure :class:`ComputeRates` here: mmfast's softmax tile kernels (the ``contrastive_softmax`` op's
    forward and backward, through :mod:`mmfast.ops.contrastive`, the backend ``impl`` or the default one) on an
    ``m x n`` tile of dimension ``d``, a ``torch.matmul`` of the same shape and an elementwise pass.
    Median of ``repeats`` timed calls each, after one warm-up call."""
    import torch

    from mmfast.ops import contrastive as tiles

    dev = torch.device(device)
    dt = getattr(torch, dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1).to(dev, dt)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(dev, dt)
    scale = torch.tensor(10.0, device=dev)
    rl, _, cl, _ = tiles.softmax_stats(a, b, scale, None, impl)
    w_row = torch.full((m,), 0.5 / m, device=dev, dtype=rl.dtype)
    w_col = torch.full((n,), 0.5 / n, device=dev, dtype=rl.dtype)
    t_f = _median_time(lambda: tiles.softmax_stats(a, b, scale, None, impl), repeats, sync)
    t_b = _median_time(lambda: tiles.softmax_grads(a, b, scale, None, rl, cl, w_row, w_col, None, None, impl),
                       repeats, sync)
    t_mm = _median_time(lambda: a @ b.T, repeats, sync)
    big = torch.ones(max(m * n, 1 << 22), device=dev, dtype=dt)
    # a copy into a fresh buffer, as the losses' elementwise ops do (on a CPU this includes the
    # page faults of the new allocation; on a GPU the caching allocator hands a warm block)
    t_cp = _median_time(lambda: torch.empty_like(big).copy_(big), repeats, sync)
    flop = m * n * d
    return ComputeRates(
        tile_fwd=2 * flop / t_f,
        tile_bwd=6 * flop / t_b,
        gemm=2 * flop / t_mm,
        mem_bw=2 * big.numel() * big.element_size() / t_cp,
        source=f"calibrated on {device} {dtype} (M={m} N={n} D={d}, {torch.get_num_threads()} threads)",
    )


def rates_from_json(path: str | Path) -> ComputeRates:
    """:class:`ComputeRates` from a JSON file (``tile_fwd``, ``tile_bwd``, ``gemm``, ``mem_bw`` in
    FLOP/s and bytes/s; optional ``source``), e.g. one written by ``--calibrate --save`` on a GPU."""
    data = json.loads(Path(path).read_text())
    return ComputeRates(float(data["tile_fwd"]), float(data["tile_bwd"]), float(data["gemm"]),
                        float(data["mem_bw"]), str(data.get("source", path)))


def fit_alpha_beta(points: Sequence[tuple[int, int, float]]) -> Link:
    """Fit a :class:`Link` to ring all-gather timings: ``points`` of ``(m ranks, bytes per rank,
    seconds)``, model ``t = (m-1) * (alpha + n * beta)``; least squares on ``t/(m-1)``, both terms
    floored at small positive values."""
    xs = [float(n) for _, n, _ in points]
    ys = [t / max(m - 1, 1) for m, _, t in points]
    if len(set(xs)) < 2:
        raise ValueError("need at least two message sizes")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    beta = max(beta, 1e-13)
    alpha = max(my - beta * mx, 1e-7)
    return Link(bandwidth=1.0 / beta, latency=alpha)
