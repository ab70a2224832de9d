"""The benchmark harness (mmfast.bench): timing statistics on synthetic providers, CPU peak memory from
the profiler's allocation events, collective byte counting in real gloo processes (W=2 and W=3, with
torch.distributed.nn.functional.all_gather forward + backward and open_clip's ClipLoss), the stored
JSON/CSV rows, and the CLI. Nothing here depends on mmfast's own kernels."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmfast.bench import comm
from mmfast.bench.__main__ import main
from mmfast.bench.cases import BenchCase, CaseUnavailable, get_case, register_case
from mmfast.bench.harness import Provider, TimingStats, compare, max_abs_diff, time_providers
from mmfast.bench.memory import cpu_peak_extra_memory, peak_extra_memory, peak_from_events
from mmfast.bench.report import CSV_FIELDS, environment, format_table, write_results
from mmfast.testing import run_distributed

MB = 2**20


# ------------------------------------------------------------------------------------------- timing


def test_timing_stats_from_known_samples():
    st = TimingStats.from_samples([5.0, 1.0, 3.0, 2.0, 4.0], number=2)
    assert (st.median_ms, st.min_ms, st.max_ms, st.mean_ms) == (3.0, 1.0, 5.0, 3.0)
    assert (st.q1_ms, st.q3_ms, st.iqr_ms) == (2.0, 4.0, 2.0)
    assert st.repeats == 5 and st.number == 2
    one = TimingStats.from_samples([7.0], number=1)
    assert one.q1_ms == one.median_ms == one.q3_ms == 7.0


def test_interleaved_timing_ratio_and_errors():
    calls: list[str] = []

    def sleeper(name: str, seconds: float):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    def broken():
        raise ValueError("boom")

    fns = {"slow": sleeper("slow", 0.008), "fast": sleeper("fast", 0.002), "mid": sleeper("mid", 0.004)}
    stats, errors = time_providers({**fns, "broken": broken}, warmup=1, repeats=6, min_sample_s=0.0)
    assert set(stats) == {"slow", "fast", "mid"} and "ValueError: boom" in errors["broken"]
    for st in stats.values():
        assert st.repeats == 6 and st.number == 1
        assert st.min_ms <= st.q1_ms <= st.median_ms <= st.q3_ms <= st.max_ms
    assert stats["slow"].min_ms >= 8.0 and stats["fast"].min_ms >= 2.0
    # timed rounds are round-robin, the starting provider rotating each round
    timed = calls[3:]
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert rounds[:3] == [["slow", "fast", "mid"], ["fast", "mid", "slow"], ["mid", "slow", "fast"]]
    # sleep() never returns early, so the ratio is a robust >= 2 even on a busy machine
    assert stats["slow"].median_ms / stats["fast"].median_ms > 2.0


def test_compare_rows_ratio_memory_and_output_check():
    def make(seconds: float, extra: float = 0.0):
        def setup():
            x = torch.ones(1024)

            def run():
                time.sleep(seconds)
                tmp = torch.empty(MB // 4)  # 1 MiB temporary
                del tmp
                return x * 2 + extra

            return run

        return setup

    def failing_setup():
        raise RuntimeError("cannot build")

    providers = [
        Provider("base", make(0.006)),
        Provider("new", make(0.002, extra=1e-3)),
        Provider("bad", failing_setup),
    ]
    rows = compare("synthetic", {"n": 1024}, providers, baseline="base", repeats=4, min_sample_s=0.0)
    base, new, bad = rows
    assert [r.provider for r in rows] == ["base", "new", "bad"]
    assert base.ratio == pytest.approx(1.0) and new.ratio > 1.5
    assert bad.error == "RuntimeError: cannot build" and bad.timing is None and bad.ratio is None
    for r in (base, new):
        assert r.memory_method == "cpu-profiler"
        assert MB <= r.peak_extra_bytes < MB + 64 * 1024, r.peak_extra_bytes
        assert r.sent_bytes == 0 and r.collective_calls == 0
    assert new.max_abs_diff == pytest.approx(1e-3, rel=1e-3) and base.max_abs_diff is None
    table = format_table(rows)
    assert "base (base)" in table and "FAILED" in table and "cannot build" in table


def test_max_time_stops_early():
    stats, _ = time_providers(
        {"a": lambda: time.sleep(0.01)}, repeats=1000, min_repeats=3, max_time_s=0.05, min_sample_s=0.0
    )
    assert 3 <= stats["a"].repeats < 20


def test_max_abs_diff_shapes():
    a = (torch.zeros(3), {"g": torch.ones(2)})
    b = (torch.full((3,), 0.5), {"g": torch.ones(2)})
    assert max_abs_diff(a, b) == 0.5
    assert max_abs_diff(torch.zeros(3), torch.zeros(4)) is None
    assert max_abs_diff(None, None) is None


# ------------------------------------------------------------------------------------- peak memory


def test_peak_from_events_orders_by_time():
    # given out of order; in time order: +10 (t=1), +5 (t=2), -10 (t=3), +3 (t=4) -> live 10, 15, 5, 8
    assert peak_from_events([(3, -10), (1, 10), (4, 3), (2, 5)]) == (15, 8)
    # frees of memory allocated before the window do not make a peak
    assert peak_from_events([(1, -100), (2, 20)]) == (0, -80)


def test_cpu_peak_counts_a_64mb_temporary():
    def fn():
        y = torch.empty(16 * MB)  # 64 MiB of float32
        y.fill_(1.0)
        s = y.sum()
        del y
        return s

    m = cpu_peak_extra_memory(fn)
    assert m.method == "cpu-profiler"
    assert 64 * MB <= m.peak_extra_bytes < 64 * MB + MB
    assert m.net_bytes < 1024  # the temporary is freed: the peak is not the final balance
    assert m.result.item() == 16 * MB


def test_cpu_peak_inplace_chain_is_about_zero():
    x = torch.randn(1024, 1024)  # 4 MiB allocated before the call: not counted

    def fn():
        x.mul_(2).add_(1).relu_().clamp_(max=3)

    m = peak_extra_memory(fn, "cpu")
    assert m.peak_extra_bytes < 4096, m.peak_extra_bytes


def test_cpu_peak_is_a_peak_not_the_final_balance():
    keep = torch.empty(4 * MB)  # allocated before, freed inside: must not offset the peak

    def fn():
        nonlocal keep
        keep = None
        a = torch.empty(8 * MB)  # 32 MiB, freed before the end
        b = torch.empty(4 * MB)  # 16 MiB, alive together with a -> peak 48 MiB
        del a, b
        return torch.empty(2 * MB)  # 8 MiB result

    m = cpu_peak_extra_memory(fn)
    assert 48 * MB <= m.peak_extra_bytes < 49 * MB
    # the result; c10 does not report frees of blocks allocated before the profiler started
    assert m.net_bytes == pytest.approx(8 * MB, abs=1024)


def test_cpu_peak_sees_a_real_op_temporary():
    a, b = torch.randn(512, 256), torch.randn(256, 512)

    def fn():
        return (a @ b).softmax(-1).sum()  # 1 MiB product + 1 MiB softmax, both freed

    m = cpu_peak_extra_memory(fn)
    assert 2 * MB <= m.peak_extra_bytes < 3 * MB


# ---------------------------------------------------------------------------------- collective bytes


def _comm_worker(rank: int, world: int) -> dict:
    """Run a set of collectives under count_collective_bytes; return what was recorded (per rank)."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.nn.functional as dnf

    from mmfast.bench.cases.contrastive import open_clip_loss_module
    from mmfast.bench.comm import count_collective_bytes

    warnings.simplefilter("ignore", FutureWarning)
    out: dict = {}
    B, D = 6, 10  # 60 float32 = 240 bytes per rank
    x = torch.arange(B * D, dtype=torch.float32).reshape(B, D) + rank
    n = x.numel() * x.element_size()

    def rec(counter):
        return [
            (r.op, r.payload_bytes, r.sent_bytes, r.world_size, r.rank, r.in_backward)
            for r in counter.records
        ]

    sub = dist.new_group([0, 1])
    before_p2p = dist.P2POp(dist.isend, x.clone(), (rank + 1) % world)  # built before the block
    with count_collective_bytes() as c:
        assert dist.all_gather is not comm._originals["all_gather"]
        o = torch.empty(world * B, D)
        dist.all_gather_into_tensor(o, x)
        assert torch.equal(o[rank * B : (rank + 1) * B], x)
        out["all_gather_into_tensor"] = rec(c)
        c.clear()

        lst = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(lst, x)
        out["all_gather"] = rec(c)
        c.clear()

        big = torch.ones(world * B, D)
        red = torch.empty(B, D)
        dist.reduce_scatter_tensor(red, big)
        assert torch.equal(red, torch.full((B, D), float(world)))
        out["reduce_scatter_tensor"] = rec(c)
        c.clear()

        dist.reduce_scatter(torch.empty(B, D), [torch.ones(B, D) for _ in range(world)])
        dist.gather(x, [torch.empty_like(x) for _ in range(world)] if rank == 0 else None, dst=0)
        dist.scatter(torch.empty_like(x), [x] * world if rank == 1 else None, src=1)
        dist.reduce(x.clone(), dst=0)
        dist.all_to_all([torch.empty_like(x) for _ in range(world)], [x] * world)
        out["rooted_and_lists"] = rec(c)
        c.clear()

        y = x.clone()
        dist.all_reduce(y)
        out["all_reduce"] = rec(c)
        c.clear()

        z = x.clone()
        dist.broadcast(z, src=1)
        out["broadcast"] = rec(c)
        c.clear()

        a2a = torch.empty(world * B, D)
        dist.all_to_all_single(a2a, torch.ones(world * B, D))
        out["all_to_all_single"] = rec(c)
        c.clear()

        recv_buf = torch.empty_like(x)
        ops = [
            dist.P2POp(dist.isend, x, (rank + 1) % world),
            dist.P2POp(dist.irecv, recv_buf, (rank - 1) % world),
        ]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        assert torch.equal(recv_buf, x - rank + (rank - 1) % world)
        out["batch_isend_irecv"] = rec(c)
        c.clear()

        recv2 = torch.empty_like(x)
        ops = [before_p2p, dist.P2POp(dist.irecv, recv2, (rank - 1) % world)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        assert torch.equal(recv2, x - rank + (rank - 1) % world)
        out["batch_p2pop_from_before"] = rec(c)
        c.clear()

        if rank == 0:
            dist.send(x, 1)
        elif rank == 1:
            dist.recv(recv_buf, 0)
        out["send_recv"] = rec(c)
        c.clear()

        # the autograd all_gather open_clip's gather_with_grad uses: forward AND backward
        xr = x.clone().requires_grad_()
        with count_collective_bytes() as inner:  # nested blocks each see their own calls
            gathered = dnf.all_gather(xr)
            (torch.cat(gathered) * (rank + 1)).sum().backward()
        assert torch.equal(xr.grad, torch.full_like(x, world * (world + 1) / 2))
        out["nn_all_gather"] = inner.summary()
        out["nn_all_gather_outer_calls"] = c.calls
        c.clear()

        # a sub-group: the world size of the group passed counts, ranks outside it record nothing
        if rank in (0, 1):
            o2 = torch.empty(2 * B, D)
            dist.all_gather_into_tensor(o2, x, group=sub)
            dist.all_reduce(x.clone(), group=sub)
        out["subgroup"] = rec(c)
        c.clear()

    out["restored"] = not any(
        getattr(getattr(mod, name, None), "_mmfast_counting", False)
        for mod in (dist, torch.distributed.distributed_c10d)
        for name in comm.PATCHED_OPS
    )

    # open_clip ClipLoss, local loss with gather_with_grad: forward + backward
    img = torch.nn.functional.normalize(
        torch.randn(B, D, generator=torch.Generator().manual_seed(rank)), dim=-1
    )
    txt = torch.nn.functional.normalize(
        torch.randn(B, D, generator=torch.Generator().manual_seed(9 + rank)), dim=-1
    )
    img.requires_grad_()
    txt.requires_grad_()
    loss_fn = open_clip_loss_module(standalone=True).ClipLoss(
        local_loss=True, gather_with_grad=True, rank=rank, world_size=world
    )
    with count_collective_bytes() as c:
        loss_fn(img, txt, torch.tensor(10.0)).backward()
    out["open_clip"] = c.summary()
    out["n"] = n
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_collective_bytes_gloo(world):
    results = run_distributed(_comm_worker, world, timeout=120)
    W = world
    for rank, res in enumerate(results):
        n = res["n"]
        assert res["all_gather_into_tensor"] == [("all_gather_into_tensor", n, (W - 1) * n, W, rank, False)]
        assert res["all_gather"] == [("all_gather", n, (W - 1) * n, W, rank, False)]
        assert res["reduce_scatter_tensor"] == [("reduce_scatter_tensor", W * n, (W - 1) * n, W, rank, False)]
        root0, root1 = rank == 0, rank == 1
        assert res["rooted_and_lists"] == [
            ("reduce_scatter", W * n, (W - 1) * n, W, rank, False),
            ("gather", n, 0 if root0 else n, W, rank, False),
            ("scatter", W * n if root1 else 0, (W - 1) * n if root1 else 0, W, rank, False),
            ("reduce", n, 0 if root0 else n, W, rank, False),
            ("all_to_all", W * n, (W - 1) * n, W, rank, False),
        ]
        assert res["all_reduce"] == [("all_reduce", n, 2 * (W - 1) * n // W, W, rank, False)]
        assert res["broadcast"] == [("broadcast", n, (W - 1) * n if rank == 1 else 0, W, rank, False)]
        assert res["all_to_all_single"] == [("all_to_all_single", W * n, (W - 1) * n, W, rank, False)]
        assert res["batch_isend_irecv"] == [("batch_isend_irecv", 2 * n, n, W, rank, False)]
        assert res["batch_p2pop_from_before"] == [("batch_isend_irecv", 2 * n, n, W, rank, False)]
        expect_p2p = {0: [("send", n, n, W, 0, False)], 1: [("recv", n, 0, W, 1, False)]}.get(rank, [])
        assert res["send_recv"] == expect_p2p
        nn_ag = res["nn_all_gather"]
        assert nn_ag["sent_bytes_forward"] == (W - 1) * n and nn_ag["sent_bytes_backward"] == (W - 1) * n
        assert nn_ag["by_op"]["all_gather"]["calls"] == 1
        # gloo has no reduce-scatter for the backward: W scatters, this rank the root of one
        assert nn_ag["by_op"]["scatter"] == {"calls": W, "payload_bytes": W * n, "sent_bytes": (W - 1) * n}
        assert res["nn_all_gather_outer_calls"] == nn_ag["calls"]
        if rank in (0, 1):
            assert res["subgroup"] == [
                ("all_gather_into_tensor", n, n, 2, rank, False),
                ("all_reduce", n, n, 2, rank, False),
            ]
        else:
            assert res["subgroup"] == []
        assert res["restored"]
        # open_clip ClipLoss(local_loss, gather_with_grad) forward + backward: 4 (W-1) B D elsize per rank
        oc = res["open_clip"]
        assert oc["sent_bytes"] == 4 * (W - 1) * n
        assert oc["sent_bytes_forward"] == oc["sent_bytes_backward"] == 2 * (W - 1) * n
        assert oc["by_op"]["all_gather"]["calls"] == 2


def test_count_collective_bytes_without_process_group():
    import torch.distributed as dist

    orig = dist.all_reduce
    with comm.count_collective_bytes() as c:
        assert dist.all_reduce is not orig and torch.distributed.distributed_c10d.all_reduce is not orig
        with comm.count_collective_bytes() as c2:
            pass
        assert dist.all_reduce is not orig  # still patched while the outer block is open
    assert dist.all_reduce is orig and torch.distributed.distributed_c10d.all_reduce is orig
    assert c.calls == c2.calls == 0 and c.sent_bytes == 0


# -------------------------------------------------------------------------------------- JSON / CSV


REQUIRED = (
    "case",
    "shape",
    "params",
    "provider",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "min_ms",
    "max_ms",
    "repeats",
    "ratio",
    "peak_extra_bytes",
    "sent_bytes",
    "device_name",
    "torch_version",
    "triton_version",
    "mmfast_version",
    "git_commit",
    "date",
    "command",
)


def test_rows_written_with_provenance(tmp_path):
    providers = [Provider("p1", lambda: lambda: torch.ones(8)), Provider("p2", lambda: lambda: torch.ones(8))]
    rows = compare("syn", {"n": 8, "dtype": "float32"}, providers, baseline="p1", repeats=3)
    env = environment("cpu")
    assert env["device_name"] and env["torch_version"] == torch.__version__ and env["command"]
    jpath, cpath = write_results(rows, tmp_path, env)
    write_results(rows, tmp_path, env)  # appended, the CSV header once
    lines = [json.loads(x) for x in jpath.read_text().splitlines()]
    assert len(lines) == 4
    for row in lines:
        for key in REQUIRED:
            assert key in row, key
        assert row["case"] == "syn" and row["params"] == {"n": 8, "dtype": "float32"}
        assert row["median_ms"] > 0 and len(row["samples_ms"]) == 3
    with open(cpath, newline="") as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 4 and list(recs[0]) == list(CSV_FIELDS)
    assert json.loads(recs[0]["params"]) == {"n": 8, "dtype": "float32"}
    assert {r["provider"] for r in recs} == {"p1", "p2"} and float(recs[0]["ratio"]) == pytest.approx(1.0)
    for key in REQUIRED:
        assert key in recs[0]


# ---------------------------------------------------------------------------------------------- CLI


@register_case
class _SyntheticCase(BenchCase):
    name = "_synthetic_test"
    description = "test-only synthetic case"
    baseline = "slow"

    def add_arguments(self, parser):
        parser.add_argument("--size", type=int, default=4096)

    def configs(self, device, quick, opts):
        return [{"n": opts.size}, {"n": 2 * opts.size}]

    def providers(self, cfg, device, opts):
        def make(factor):
            def setup():
                x = torch.ones(cfg["n"])

                def run():
                    for _ in range(factor):
                        y = x * 2
                    return y

                return run

            return setup

        return [Provider("slow", make(8)), Provider("fast", make(1))]

    def finalize(self, results, out_dir, opts):
        p = Path(out_dir) / "synthetic_extra.txt"
        p.write_text(str(len(results)))
        return [p]


def test_cli_runs_a_registered_case(tmp_path, capsys):
    rc = main(["_synthetic_test", "--quick", "--size", "256", "--out", str(tmp_path), "--repeats", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "_synthetic_test" in out and "slow (base)" in out and "n=512" in out
    rows = [json.loads(x) for x in (tmp_path / "_synthetic_test.jsonl").read_text().splitlines()]
    assert [(r["params"]["n"], r["provider"]) for r in rows] == [
        (256, "slow"),
        (256, "fast"),
        (512, "slow"),
        (512, "fast"),
    ]
    assert all(r["command"] for r in rows)
    assert (tmp_path / "_synthetic_test.csv").exists() and (
        tmp_path / "synthetic_extra.txt"
    ).read_text() == "4"


def test_cli_help_and_unknown_case(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "contrastive" in out and "siglip" in out
    assert main(["contrastive", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--impl" in out and "--repeats" in out
    assert main(["no_such_case"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark case 'no_such_case'" in err and "contrastive" in err
    assert main([]) == 2
    assert main(["--list"]) == 0
    assert "contrastive" in capsys.readouterr().out


def test_cli_module_entry_point():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "mmfast.bench", "bogus"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 2 and "unknown benchmark case 'bogus'" in r.stderr


def test_contrastive_case_fails_clearly_without_mmfast_loss(monkeypatch, capsys):
    import mmfast

    monkeypatch.delattr(mmfast, "ClipLoss", raising=False)
    assert main(["contrastive", "--quick", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "mmfast.ClipLoss is not available" in err and "--providers open_clip" in err


def test_open_clip_loss_py_alone_matches_the_package():
    from mmfast.bench.cases.contrastive import open_clip_loss_module

    alone, pkg = open_clip_loss_module(standalone=True), open_clip_loss_module()
    assert alone is not pkg and alone.__name__ == "_mmfast_bench_open_clip_loss"
    img, txt = torch.randn(8, 16), torch.randn(8, 16)
    scale = torch.tensor(10.0)
    assert torch.equal(alone.ClipLoss()(img, txt, scale), pkg.ClipLoss()(img, txt, scale))


def test_loss_case_skips_open_clip_when_missing(monkeypatch):
    import mmfast
    from mmfast.bench.cases import contrastive

    def missing(standalone=False):
        raise ImportError("open_clip (open_clip_torch) is not installed")

    monkeypatch.setattr(contrastive, "open_clip_loss_module", missing)
    monkeypatch.setattr(mmfast, "SigLipLoss", object, raising=False)
    case = get_case("siglip")
    opts = case.options(["--sizes", "64"])
    opts.providers = None
    notes = case.check(opts)
    assert any("skipping the open_clip comparison" in n for n in notes)
    cfgs = case.configs("cpu", True, opts)
    assert cfgs == [{"N": 64, "D": 512, "dtype": "float32", "world_size": 1}]
    assert [p.name for p in case.providers(cfgs[0], "cpu", opts)] == ["mmfast[auto]"]
    with pytest.raises(CaseUnavailable, match="--impl 'bogus'"):
        case.check(argparse.Namespace(**{**vars(opts), "impl": "bogus"}))


def test_tome_case_training_step_and_providers(tmp_path):
    # the training-step part and its providers on a tiny ViT (the compiled providers are listed, not run:
    # compiling a ViT takes minutes on 2 cores)
    pytest.importorskip("timm")
    from mmfast.bench.cases import get_case

    case = get_case("tome")
    opts = case.options(["--models", "vit_tiny_patch16_224", "--batch", "1", "--train-batch", "2", "--parts",
                         "model,train", "--dtype", "float32"])
    cfgs = case.configs("cpu", False, opts)
    assert [(c["part"], c["B"]) for c in cfgs] == [("model", 1), ("train", 2)]
    names = [p.name for p in case.providers(cfgs[0], "cpu", opts)]
    assert "tome-ref+compile" in names and "mmfast[auto]+compile" in names
    train = {p.name: p for p in case.providers(cfgs[1], "cpu", opts)}
    assert list(train) == ["timm", "tome-ref", "mmfast[auto]"]
    outs = {name: p.setup()() for name, p in train.items()}
    for logits, grad in outs.values():
        assert logits.shape == (2, 1000) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # mmfast's ToMe and the plain-torch one: the same model, the same step
    torch.testing.assert_close(outs["mmfast[auto]"][0], outs["tome-ref"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["mmfast[auto]"][1], outs["tome-ref"][1], rtol=1e-3, atol=1e-4)
    # on CUDA at small batch the CUDA-graph provider joins (listed only: no tensors are made here)
    gpu_opts = case.options(["--models", "vit_tiny_patch16_224", "--batch", "8,64", "--parts", "model,train"])
    gpu_cfgs = case.configs("cuda", False, gpu_opts)
    assert sorted({c["B"] for c in gpu_cfgs if c["part"] == "train"}) == [1, 8, 256]
    listed = {c["B"]: [p.name for p in case.providers(c, "cuda", gpu_opts)] for c in gpu_cfgs if c["part"] == "model"}
    assert "mmfast[auto]+cudagraph" in listed[8] and "mmfast[auto]+cudagraph" not in listed[64]
