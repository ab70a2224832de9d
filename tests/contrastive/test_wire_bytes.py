"""What the distributed losses really send: loopback bytes (/proc/net/dev) of one step in real gloo
processes, all ranks, against the byte model of mmfast.bench.comm (which the scaling model's exact
byte predictions are checked against in tests/contrastive/test_scaling.py). On gloo a reduce-scatter must not
cost an all-reduce: mmfast's goes through an all-to-all, so the wire sees the model's bytes."""

from __future__ import annotations

import os

import pytest

from mmfast.bench.wire import measure_schemes
from mmfast.testing import run_distributed

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not os.path.exists("/proc/net/dev"), reason="needs Linux's /proc/net/dev")]


def test_wire_bytes_of_one_step_match_the_model_within_5_percent():
    # 128 x 256 fp32 = 128 KiB of texts per rank: a step moves ~1-3 MB in all, far above the TCP/IP
    # headers, acknowledgements and gloo's message headers (~0.5% here)
    schemes = ["gather:4", "gather:2", "ring:2", "ring:1"]
    res = run_distributed(measure_schemes, 4, schemes, 128, 256, 5, timeout=300)
    ratios = {s: res[0][s]["wire_bytes"] / sum(r[s]["model_bytes"] for r in res) for s in schemes}
    assert all(abs(q - 1) <= 0.05 for q in ratios.values()), ratios


def test_gloo_reduce_scatter_tensor_costs_an_all_reduce_and_ours_does_not():
    # the control: without the all-to-all route, gloo's reduce_scatter_tensor sends about twice the
    # model's bytes, so the test above would fail for every scheme with a reduce-scatter
    res = run_distributed(_reduce_scatters, 4, timeout=120)
    ours, gloo, model = res[0]
    assert abs(ours / model - 1) <= 0.05, (ours, model)
    assert gloo > 1.6 * model, (gloo, model)


def _reduce_scatters(rank, world):
    import torch
    import torch.distributed as dist

    from mmfast.bench.wire import step_wire_bytes
    from mmfast.distributed.comm import reduce_scatter

    x = torch.full((world * 32768,), float(rank + 1))
    out = torch.empty(32768)
    # 9 repeats: other loopback traffic of this machine (seen in CI, and with other gloo jobs running)
    # must miss at least one bracket of each kind
    ours = step_wire_bytes(lambda: reduce_scatter(x, None), repeats=9)
    got = reduce_scatter(x, None)
    assert torch.equal(got, torch.full((32768,), float(sum(range(1, world + 1)))))
    gloo = step_wire_bytes(lambda: dist.reduce_scatter_tensor(out, x), repeats=9)
    return ours, gloo, world * (world - 1) * 32768 * 4
