"""The labelled losses (``labels=``) across real gloo processes, against the in-process simulation
of the dense labelled loss on every rank (mmfast.reference.contrastive.simulate_ranks with
``labels_per_rank``): every ClipLoss flag combination, SigLIP, both exchange schemes with every group
size, unequal batches, labels shared across ranks and labels held by one rank only, the ring's column
chunks; and bad labels raising on every rank."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfast.reference.contrastive import simulate_ranks
from mmfast.testing import assert_matches_rank, max_rel_err, run_distributed

pytestmark = pytest.mark.distributed


def _features(sizes, d, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        i = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        t = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        out.append((i, t))
    return out


def _labels(sizes, classes, seed):
    """Labels from ``classes`` values (so most are shared across ranks), plus one label only the last
    rank holds (twice where it can) and one every rank holds."""
    g = torch.Generator().manual_seed(seed + 1)
    out = [torch.randint(0, classes, (b,), generator=g) for b in sizes]
    out[-1][0] = 10_000
    if sizes[-1] > 1:
        out[-1][-1] = 10_000
    for lab in out:
        lab[lab.shape[0] // 2] = -7  # negative values are labels too
    return out


def _grads(loss_fn, image, text, scale, bias, labels):
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), scale.clone().requires_grad_(),
              bias.clone().requires_grad_()]
    loss = loss_fn(*leaves, labels=labels)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, leaves)]


def _schemes(world):
    gs = [g for g in range(1, world + 1) if world % g == 0]
    return [(g, "gather") for g in gs] + [(g, "ring") for g in gs if g < world]




def _labelled(rank, world, sizes, d, classes):
    import mmfast

    image, text = _features(sizes, d, seed=3)[rank]
    labels = _labels(sizes, classes, seed=3)[rank]
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    out = {}
    for gs, exchange in _schemes(world):
        for local_loss, gwg in itertools.product([False, True], repeat=2):
            fn = mmfast.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                 group_size=gs, exchange=exchange)
            out[("clip", gs, exchange, local_loss, gwg)] = _grads(fn, image, text, scale, bias, labels)
        fn = mmfast.SigLipLoss(rank=rank, world_size=world, group_size=gs, exchange=exchange)
        out[("siglip", gs, exchange)] = _grads(fn, image, text, scale, bias, labels)
    return out


def _check_against_simulation(results, sizes, d, classes, seed=3):
    feats = _features(sizes, d, seed=seed)
    labels = _labels(sizes, classes, seed=seed)
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    sims = {}
    for key in results[0]:
        flags = dict(local_loss=key[3], gather_with_grad=key[4]) if key[0] == "clip" else {}
        sim_key = (key[0], *key[3:])
        if sim_key not in sims:
            sims[sim_key] = simulate_ranks(key[0], feats, scale, bias, labels_per_rank=labels, **flags)
        for rank in range(len(sizes)):
            assert_matches_rank(results[rank][key], sims[sim_key][rank], (key, rank), zero_bias_grad=key[0] == "clip")


@pytest.mark.parametrize("sizes,classes", [([3, 5], 3), ([4, 1, 6, 2], 4), ([2, 3, 1, 4], 50)])
def test_labelled_matches_simulation_every_flag_and_scheme(sizes, classes):
    results = run_distributed(_labelled, len(sizes), sizes, 16, classes, timeout=300)
    _check_against_simulation(results, sizes, 16, classes)


def _ring_w8_labelled(rank, world, sizes, chunk_rows):
    import mmfast
    from mmfast.distributed import ring

    ring.CHUNK_ROWS, ring.CHUNK_BYTES = chunk_rows, 1  # this process only: chunks of ``chunk_rows`` rows
    image, text = _features(sizes, 12, seed=5)[rank]
    labels = _labels(sizes, 5, seed=5)[rank]
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    out = {}
    for gs in (1, 2, 4):
        for local_loss, gwg in ((True, True), (False, False)):
            fn = mmfast.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                 group_size=gs, exchange="ring")
            out[("clip", gs, "ring", local_loss, gwg)] = _grads(fn, image, text, scale, bias, labels)
        fn = mmfast.SigLipLoss(rank=rank, world_size=world, group_size=gs, exchange="ring")
        out[("siglip", gs, "ring")] = _grads(fn, image, text, scale, bias, labels)
    return out


@pytest.mark.parametrize("sizes,chunk_rows", [
    ([2, 1, 3, 2, 1, 1, 4, 2], 1),  # four chunks of one row: most ranks have empty chunks
    ([7, 1, 3, 5, 2, 6, 4, 7], 2),  # three chunks of three rows: the last one padded on every rank
])
def test_labelled_ring_eight_ranks_column_chunks_match_simulation(sizes, chunk_rows):
    results = run_distributed(_ring_w8_labelled, len(sizes), sizes, chunk_rows, timeout=300)
    _check_against_simulation(results, sizes, 12, 5, seed=5)


def _distinct(rank, world):
    import mmfast

    sizes = [5, 3, 4]
    image, text = _features(sizes, 8, seed=9)[rank]
    labels = torch.arange(sum(sizes))[sum(sizes[:rank]):sum(sizes[:rank + 1])] * 3 - 4
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    worst = 0.0
    for exchange in ("gather", "ring"):
        for local_loss, gwg in itertools.product([False, True], repeat=2):
            fn = mmfast.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                 group_size=1, exchange=exchange)
            a, b = _grads(fn, image, text, scale, bias, labels), _grads(fn, image, text, scale, bias, None)
            worst = max([worst, max_rel_err(a[0], b[0])] + [max_rel_err(x, y) for x, y in zip(a[1][:3], b[1][:3])])
        fn = mmfast.SigLipLoss(rank=rank, world_size=world, group_size=1, exchange=exchange)
        a, b = _grads(fn, image, text, scale, bias, labels), _grads(fn, image, text, scale, bias, None)
        worst = max([worst, max_rel_err(a[0], b[0])] + [max_rel_err(x, y) for x, y in zip(a[1], b[1])])
    return worst


def test_distinct_labels_give_the_plain_distributed_loss():
    for rank, worst in enumerate(run_distributed(_distinct, 3, timeout=120)):
        assert worst < 1e-12, (rank, worst)


def _message(call) -> str:
    try:
        call()
    except (ValueError, TypeError) as exc:
        return str(exc)
    return "no error"


def _labels_on_some_ranks(rank, world, exchange):
    import mmfast

    image, text = torch.randn(3, 8), torch.randn(3, 8)
    labels = torch.arange(3) if rank != 1 else None
    return _message(lambda: mmfast.ClipLoss(rank=rank, world_size=world, group_size=1, exchange=exchange)(
        image, text, torch.tensor(10.0), labels=labels))


@pytest.mark.parametrize("exchange", ["gather", "ring"])
def test_labels_on_some_ranks_only_raise_everywhere(exchange):
    msgs = run_distributed(_labels_on_some_ranks, 3, exchange, timeout=120)
    assert all("labels were passed on rank(s) [0, 2] and not on rank(s) [1]" in m for m in msgs), msgs


def _bad_labels_on_one_rank(rank, world, kind):
    import mmfast

    image, text = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.arange(4)
    if rank == 2:
        labels = {"dtype": labels.float(), "shape": labels[:3], "list": [0, 1, 2, 3]}[kind]
    return _message(lambda: mmfast.SigLipLoss(rank=rank, world_size=world)(
        image, text, torch.tensor(10.0), torch.tensor(-1.0), labels=labels))


@pytest.mark.parametrize("kind,expect", [("dtype", "labels must be int64, got torch.float32"),
                                         ("shape", "labels must have shape (4,)"),
                                         ("list", "labels must be None or an int64 torch.Tensor, got list")])
def test_bad_labels_on_one_rank_raise_everywhere_without_hanging(kind, expect):
    msgs = run_distributed(_bad_labels_on_one_rank, 3, kind, timeout=120)
    assert expect in msgs[2], msgs
    assert all("bad contrastive-loss input on rank(s) [2]" in m for m in msgs[:2]), msgs


def test_labels_add_only_o_wb_integers_to_a_step():
    # the byte model's count (this rank) and the loopback bytes (all ranks) of one step, with and
    # without labels: the labels' all-gather ((W-1) * B int64 sent a rank) and, for CLIP, N more
    # floats in the statistics all-reduce (2 (W-1) / W * N fp64 a rank); nothing that grows with D
    import os

    from mmfast.bench.wire import measure_schemes

    w, b, d = 4, 64, 256
    schemes = ["gather:4", "gather:4+labels", "ring:1", "ring:1+labels"]
    res = run_distributed(measure_schemes, w, schemes, b, d, 5, timeout=300)
    extra = (w - 1) * b * 8 + 2 * (w - 1) * (w * b) * 8 // w
    for s in ("gather:4", "ring:1"):
        for rank in range(w):
            diff = res[rank][s + "+labels"]["model_bytes"] - res[rank][s]["model_bytes"]
            assert diff == extra, (s, rank, diff, extra)
        if os.path.exists("/proc/net/dev"):
            wire = res[0][s + "+labels"]["wire_bytes"] - res[0][s]["wire_bytes"]
            # all ranks; TCP/IP and gloo headers on top of the payload, the bracket's noise
            assert abs(wire - w * extra) <= 0.5 * w * extra + 16384, (s, wire, w * extra)


def _local_gwg(rank, world):
    import mmfast

    sizes = [5] * world
    image, text = _features(sizes, 8, seed=13)[rank]
    labels = _labels(sizes, 4, seed=13)[rank]
    scale, bias = torch.tensor(15.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    out = {}
    for exchange in ("gather", "ring"):
        fn = mmfast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, group_size=1,
                             exchange=exchange)
        out[exchange] = _grads(fn, image, text, scale, bias, labels)
    return out


def test_local_loss_gather_with_grad_is_the_global_labelled_loss():
    # equal batches: the mean of the ranks' losses is the global labelled loss, and each rank's feature
    # gradient is W times the global loss's gradient on its slice
    from mmfast.reference.contrastive import clip_loss_labelled

    w = 3
    results = run_distributed(_local_gwg, w, timeout=120)
    feats, labels = _features([5] * w, 8, seed=13), torch.cat(_labels([5] * w, 4, seed=13))
    image = torch.cat([f[0] for f in feats]).requires_grad_()
    text = torch.cat([f[1] for f in feats]).requires_grad_()
    loss = clip_loss_labelled(image, text, image, text, torch.tensor(15.0, dtype=torch.float64),
                              torch.tensor(-1.0, dtype=torch.float64), labels, labels)
    g_image, g_text = torch.autograd.grad(loss, [image, text])
    for exchange in ("gather", "ring"):
        mean = sum(r[exchange][0] for r in results) / w
        assert max_rel_err(mean, loss.detach()) < 1e-12, exchange
        for rank, r in enumerate(results):
            rows = slice(5 * rank, 5 * rank + 5)
            assert max_rel_err(r[exchange][1][0], w * g_image[rows]) < 1e-10, (exchange, rank)
            assert max_rel_err(r[exchange][1][1], w * g_text[rows]) < 1e-10, (exchange, rank)
