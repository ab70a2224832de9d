"""mmfast.ClipLoss / SigLipLoss across real gloo processes, against open_clip in the same
processes (equal batch sizes) and against the in-process simulation of open_clip's per-rank
semantics (unequal batch sizes, which open_clip cannot run), for both exchange schemes ("gather"
with every group size, "ring" with every group size that leaves more than one group)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfast.reference.contrastive import simulate_ranks
from mmfast.testing import assert_matches_rank, max_rel_err, run_distributed

pytestmark = pytest.mark.distributed


def _features(sizes, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        i = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        t = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        out.append((i.to(dtype), t.to(dtype)))
    return out


def _grads(loss_fn, image, text, scale, bias):
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    loss = loss_fn(image, text, scale, bias)
    loss = loss["contrastive_loss"] if isinstance(loss, dict) else loss
    ins = [image, text, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, ins)
    return loss.detach(), [g.detach() for g in grads]




def _schemes(world):
    """(group_size, exchange) pairs worth running: gather for every group size, ring where there is
    more than one group (with one group the ring is the gather)."""
    gs = [g for g in range(1, world + 1) if world % g == 0]
    return [(g, "gather") for g in gs] + [(g, "ring") for g in gs if g < world]


def _vs_open_clip(rank, world, b, d, scale_v, with_bias, dtype_name):
    from open_clip.loss import ClipLoss, SigLipLoss

    import mmfast

    dtype = getattr(torch, dtype_name)
    feats = _features([b] * world, d, dtype, seed=world * 100 + b)
    image, text = feats[rank]
    scale = torch.tensor(scale_v, dtype=dtype)
    bias = torch.tensor(-3.0, dtype=dtype) if with_bias else None
    worst = {}
    for gs, exchange in _schemes(world):
        for local_loss, gwg in itertools.product([False, True], repeat=2):
            ref = ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world)
            ours = mmfast.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                   group_size=gs, exchange=exchange)
            lr, gr = _grads(ref, image, text, scale, bias)
            lo, go = _grads(ours, image, text, scale, bias)
            key = f"clip gs={gs} {exchange} local={local_loss} gwg={gwg}"
            errs = [max_rel_err(lo, lr)] + [max_rel_err(x, y) for x, y in zip(go[:3], gr[:3])]
            if with_bias:  # d loss / d bias is 0 exactly; open_clip's is rounding noise
                errs.append(go[3].abs().item() + gr[3].abs().item() * 0)
            worst[key] = max(errs)
        for impl_name in ("bidir", "gather"):
            ref = SigLipLoss(rank=rank, world_size=world, dist_impl=impl_name)
            ours = mmfast.SigLipLoss(rank=rank, world_size=world, dist_impl=impl_name, group_size=gs,
                                     exchange=exchange)
            sb = bias if bias is not None else torch.tensor(-10.0, dtype=dtype)
            lr, gr = _grads(ref, image, text, scale, sb)
            lo, go = _grads(ours, image, text, scale, sb)
            errs = [max_rel_err(lo, lr)] + [max_rel_err(x, y) for x, y in zip(go, gr)]
            worst[f"siglip gs={gs} {exchange} {impl_name}"] = max(errs)
    return worst


@pytest.mark.parametrize("world,b,d,scale,with_bias", [
    (2, 7, 8, 100.0, True),
    (2, 64, 129, 14.3, False),
    (4, 1, 64, 100.0, False),
    (4, 7, 129, 1.0, True),
    (4, 257, 8, 100.0, True),
])
def test_matches_open_clip_float64(world, b, d, scale, with_bias):
    results = run_distributed(_vs_open_clip, world, b, d, scale, with_bias, "float64", timeout=300)
    for rank, worst in enumerate(results):
        for key, err in worst.items():
            assert err < 1e-10, f"rank {rank} {key}: relative error {err:.2e}"


def test_matches_open_clip_float32():
    # fp32 features: both sides accumulate in fp32 with different summation orders; the bound is a
    # few hundred ulps of the largest gradient entry, far below the error of a wrong formula (~1).
    results = run_distributed(_vs_open_clip, 2, 33, 64, 50.0, True, "float32", timeout=300)
    for rank, worst in enumerate(results):
        for key, err in worst.items():
            assert err < 2e-5, f"rank {rank} {key}: relative error {err:.2e}"


def _uneven(rank, world, sizes, d):
    import mmfast

    feats = _features(sizes, d, torch.float64, seed=7)
    image, text = feats[rank]
    scale = torch.tensor(20.0, dtype=torch.float64)
    bias = torch.tensor(-5.0, dtype=torch.float64)
    out = {}
    for gs, exchange in _schemes(world):
        for local_loss, gwg in itertools.product([False, True], repeat=2):
            fn = mmfast.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                 group_size=gs, exchange=exchange)
            out[("clip", gs, exchange, local_loss, gwg)] = _grads(fn, image, text, scale, bias)
        fn = mmfast.SigLipLoss(rank=rank, world_size=world, group_size=gs, exchange=exchange)
        out[("siglip", gs, exchange)] = _grads(fn, image, text, scale, bias)
    return out


@pytest.mark.parametrize("sizes", [[3, 5], [4, 1, 6, 2], [2, 3, 1, 4, 2, 2]])
def test_unequal_batches_match_simulation(sizes):
    world = len(sizes)
    results = run_distributed(_uneven, world, sizes, 16, timeout=300)
    feats = _features(sizes, 16, torch.float64, seed=7)
    scale = torch.tensor(20.0, dtype=torch.float64)
    bias = torch.tensor(-5.0, dtype=torch.float64)
    for key in results[0]:
        if key[0] == "clip":
            sim = simulate_ranks("clip", feats, scale, bias, local_loss=key[3], gather_with_grad=key[4])
        else:
            sim = simulate_ranks("siglip", feats, scale, bias)
        for rank in range(world):
            assert_matches_rank(results[rank][key], sim[rank], (key, rank), zero_bias_grad=key[0] == "clip")


def _message(call, errors=(ValueError,)) -> str:
    """The message of the error ``call()`` raises on this rank, ``"no error"`` when it returns."""
    try:
        call()
    except errors as exc:
        return str(exc)
    return "no error"


def _one_rank_bad(rank, world):
    import mmfast

    image = torch.randn(4, 8)
    text = torch.randn(4 if rank else 3, 8)  # rank 0 has a bad batch
    return _message(lambda: mmfast.ClipLoss(rank=rank, world_size=world)(image, text, torch.tensor(10.0)))


def test_bad_input_on_one_rank_raises_everywhere_without_hanging():
    msgs = run_distributed(_one_rank_bad, 3, timeout=120)
    assert "text_features" in msgs[0]
    assert all("bad contrastive-loss input on rank(s) [0]" in m for m in msgs[1:])


def _bad_group_size(rank, world):
    import mmfast

    return _message(lambda: mmfast.ClipLoss(rank=rank, world_size=world, group_size=2)(
        torch.randn(2, 4), torch.randn(2, 4), 1.0))


def test_group_size_must_divide_world():
    msgs = run_distributed(_bad_group_size, 3, timeout=120)
    assert all("group_size=2 must divide the world size 3" in m for m in msgs)


def _ring_w8(rank, world, sizes, chunk_rows):
    import mmfast
    from mmfast.distributed import ring

    ring.CHUNK_ROWS, ring.CHUNK_BYTES = chunk_rows, 1  # this process only: chunks of ``chunk_rows`` rows
    feats = _features(sizes, 12, torch.float64, seed=11)
    image, text = feats[rank]
    scale, bias = torch.tensor(30.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    out = {}
    for gs in (1, 2, 4):
        fn = mmfast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, group_size=gs,
                             exchange="ring")
        out[("clip", gs)] = _grads(fn, image, text, scale, bias)
        fn = mmfast.SigLipLoss(rank=rank, world_size=world, group_size=gs, exchange="ring")
        out[("siglip", gs)] = _grads(fn, image, text, scale, bias)
    return out


@pytest.mark.parametrize("sizes,chunk_rows", [
    ([2, 1, 3, 2, 1, 1, 4, 2], 256),  # one chunk
    ([2, 1, 3, 2, 1, 1, 4, 2], 1),  # four chunks of one row: most ranks have empty chunks
    ([7, 1, 3, 5, 2, 6, 4, 7], 2),  # three chunks of three rows: the last one padded on every rank
])
def test_ring_eight_ranks_unequal_batches_match_simulation(sizes, chunk_rows, monkeypatch):
    from mmfast.distributed import ring

    monkeypatch.setattr(ring, "CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(ring, "CHUNK_BYTES", 1)
    assert ring.chunking(max(sizes), 12 * 8) == {256: (1, 4), 1: (4, 1), 2: (3, 3)}[chunk_rows]
    results = run_distributed(_ring_w8, len(sizes), sizes, chunk_rows, timeout=300)
    feats = _features(sizes, 12, torch.float64, seed=11)
    scale, bias = torch.tensor(30.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    sims = {"clip": simulate_ranks("clip", feats, scale, bias, local_loss=True, gather_with_grad=True),
            "siglip": simulate_ranks("siglip", feats, scale, bias)}
    for key in results[0]:
        for rank, res in enumerate(results):
            loss, grads = res[key]
            exp = sims[key[0]][rank]
            assert max_rel_err(loss, exp["loss"]) < 1e-10, (key, rank)
            for got, want in zip(grads[:3], exp["grads"][:3]):
                assert max_rel_err(got, want) < 1e-10, (key, rank)


def _low_precision(rank, world, dtype_name):
    import mmfast

    dtype = getattr(torch, dtype_name)
    feats64 = _features([24] * world, 32, torch.float64, seed=5)
    scale = torch.tensor(30.0)
    out = {}
    for exchange, gs in (("gather", world), ("ring", 1), ("ring", 2)):
        fn = mmfast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, group_size=gs,
                             exchange=exchange)
        image, text = (t.to(dtype) for t in feats64[rank])
        out[(exchange, gs)] = _grads(fn, image, text, scale.to(dtype), None)
        out[(exchange, gs, "64")] = _grads(fn, *feats64[rank], scale.double(), None)
    return out


def test_ring_half_precision_as_accurate_as_gather():
    # bf16 features: the ring sums text gradients in fp32 as they travel, the gather scheme
    # reduce-scatters bf16 partials, so the ring's error against fp64 may not exceed the gather's
    # by more than the accuracy rule's factor 2 (plus a few bf16 ulps of the gradient scale).
    results = run_distributed(_low_precision, 4, "bfloat16", timeout=300)
    for rank, res in enumerate(results):
        for gs in (1, 2):
            ring, gather = res[("ring", gs)], res[("gather", 4)]
            ref = res[("ring", gs, "64")]
            for i in range(3):
                err_ring = (ring[1][i].double() - ref[1][i]).abs().max().item()
                err_gather = (gather[1][i].double() - ref[1][i]).abs().max().item()
                floor = 8 * 2 ** -8 * ref[1][i].abs().max().item()
                assert err_ring <= 2 * err_gather + floor, (rank, gs, i, err_ring, err_gather)
            assert abs(ring[0].item() - ref[0].item()) < 1e-2 * max(1.0, abs(ref[0].item()))


def _auto_picks_ring_under_a_small_budget(rank, world):
    import mmfast
    from mmfast.distributed import contrastive as dc

    calls = {"ring": 0, "gather": 0}
    orig_ring, orig_gather = dc.ClipRingFn.apply, dc.ClipGatherFn.apply

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    dc.ClipRingFn.apply = count("ring", orig_ring)
    dc.ClipGatherFn.apply = count("gather", orig_gather)
    try:
        image, text = _features([5] * world, 8, torch.float64, seed=3)[rank]
        fn = mmfast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, group_size=2)
        values = {}
        for budget in (None, 0):
            dc.set_memory_budget(budget)
            values[budget] = _grads(fn, image, text, torch.tensor(10.0, dtype=torch.float64), None)
        dc.set_memory_budget(None)
    finally:
        dc.ClipRingFn.apply, dc.ClipGatherFn.apply = orig_ring, orig_gather
    return calls, values


def test_auto_takes_the_ring_when_the_gather_exceeds_the_budget():
    results = run_distributed(_auto_picks_ring_under_a_small_budget, 4, timeout=120)
    for calls, values in results:
        assert calls == {"ring": 1, "gather": 1}
        assert max_rel_err(values[0][0], values[None][0]) < 1e-12
        for a, b in zip(values[0][1], values[None][1]):
            assert max_rel_err(a, b) < 1e-12


def test_pick_exchange_rules():
    from mmfast.distributed.contrastive import gather_memory_bytes, pick_exchange, ring_memory_bytes

    assert pick_exchange("gather", 512, 8, 1024, 768, 2) == "gather"
    assert pick_exchange("ring", 8, 8, 1024, 768, 2) == "ring"
    assert pick_exchange("auto", 8, 8, 1 << 20, 768, 2) == "gather"  # one group: the ring is the gather
    assert pick_exchange("auto", 512, 8, 1024, 768, 2, budget=512 * 2**20) == "ring"
    assert pick_exchange("auto", 16, 8, 1024, 768, 2, budget=512 * 2**20) == "gather"
    # the ring's memory is flat in the world size apart from O(W*B) scalars; the gather's grows
    ring = [ring_memory_bytes(8, w // 8, 1024, 768, 2) for w in (16, 512, 4096)]
    assert ring[-1] - ring[0] <= 16 * (4096 - 16) * 1024  # a few fp32 scalars per extra column
    assert ring[-1] * 50 < gather_memory_bytes(4096, 1024, 768, 2)
    assert gather_memory_bytes(4096, 1024, 768, 2) == 256 * gather_memory_bytes(16, 1024, 768, 2)


def _bad_exchange(rank, world, per_rank):
    import mmfast

    return _message(lambda: mmfast.ClipLoss(rank=rank, world_size=world, exchange=per_rank[rank])(
        torch.randn(3, 4), torch.randn(3, 4), 1.0), (ValueError, RuntimeError))


def test_unknown_exchange_raises_at_construction():
    import mmfast

    with pytest.raises(ValueError, match="exchange must be one of"):
        mmfast.ClipLoss(exchange="tree")
    with pytest.raises(ValueError, match="exchange must be one of"):
        mmfast.SigLipLoss(exchange=None)
    with pytest.raises(ValueError, match="exchange must be one of"):
        mmfast.functional.clip_loss(torch.randn(2, 4), torch.randn(2, 4), 1.0, exchange="rings")


def test_exchange_that_differs_across_ranks_raises_everywhere():
    msgs = run_distributed(_bad_exchange, 2, ["ring", "gather"], timeout=120)
    assert all("exchange differs across ranks: ['ring', 'gather']" in m for m in msgs), msgs


def _bad_exchange_functional(rank, world):
    import mmfast

    return _message(lambda: mmfast.functional.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, rank=rank,
                                                        world_size=world, exchange="ring" if rank else "bogus"))


def test_unknown_exchange_on_one_rank_raises_everywhere_without_hanging():
    msgs = run_distributed(_bad_exchange_functional, 3, timeout=120)
    assert "exchange must be one of" in msgs[0]
    assert all("bad contrastive-loss input on rank(s) [0]" in m for m in msgs[1:]), msgs


def _dim_differs(rank, world, exchange):
    import mmfast

    d = 8 if rank else 6
    return _message(lambda: mmfast.SigLipLoss(rank=rank, world_size=world, group_size=1, exchange=exchange)(
        torch.randn(3, d), torch.randn(3, d), 1.0, -1.0))


@pytest.mark.parametrize("exchange", ["gather", "ring"])
def test_unequal_dim_raises_everywhere(exchange):
    msgs = run_distributed(_dim_differs, 3, exchange, timeout=120)
    assert all("embedding size D differs across ranks: [6, 8, 8]" in m for m in msgs), msgs


def _fails_mid_ring(rank, world, loss, phase, failing_rank, chunk_rows, labelled=False):
    import mmfast
    from mmfast.distributed import ring
    from mmfast.ops import contrastive as tiles

    ring.CHUNK_ROWS, ring.CHUNK_BYTES = chunk_rows, 1

    name = {("clip", "forward"): "softmax_stats", ("clip", "backward"): "softmax_grads",
            ("siglip", "forward"): "sigmoid_rowsum", ("siglip", "backward"): "sigmoid_grads"}[(loss, phase)]
    orig = getattr(tiles, name)
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if rank == failing_rank and calls[0] == 2:  # the second block of the ring
            raise RuntimeError("injected kernel failure")
        return orig(*args, **kwargs)

    setattr(tiles, name, flaky)
    image, text = _features([4] * world, 8, torch.float32, seed=rank)[rank]
    image.requires_grad_()
    fn = (mmfast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, group_size=1,
                          exchange="ring") if loss == "clip" else
          mmfast.SigLipLoss(rank=rank, world_size=world, group_size=1, exchange="ring"))
    labels = torch.tensor([0, 1, 0, 5]) if labelled else None
    try:
        fn(image, text, torch.tensor(10.0), torch.tensor(-1.0), labels=labels).backward()
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        setattr(tiles, name, orig)
    return "no error"


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("chunk_rows", [256, 2])  # one chunk; two (the failure in the first, the second skipped)
@pytest.mark.parametrize("loss,phase", [("clip", "forward"), ("clip", "backward"), ("siglip", "forward"),
                                        ("siglip", "backward")])
def test_rank_failing_mid_ring_raises_everywhere_without_hanging(loss, phase, chunk_rows, labelled):
    msgs = run_distributed(_fails_mid_ring, 4, loss, phase, 2, chunk_rows, labelled, timeout=120)
    assert "injected kernel failure" in msgs[2], msgs
    for r in (0, 1, 3):
        assert msgs[r].startswith("RingFailure:") and f"the {phase} pass" in msgs[r] and "1 other rank" in msgs[r], \
            msgs


def test_ring_chunking_rule():
    from mmfast.distributed.ring import CHUNK_BYTES, CHUNK_ROWS, MAX_CHUNKS, chunking

    assert (CHUNK_ROWS, CHUNK_BYTES, MAX_CHUNKS) == (256, 512 * 1024, 4)
    assert chunking(1024, 512 * 4) == (4, 256)  # fp32 D=512: 2 MiB pieces, four chunks
    assert chunking(1024, 768 * 2) == (2, 512)  # bf16 D=768: 1.5 MiB, at most 3 by bytes, 2 divide evenly
    assert chunking(1021, 512 * 4) == (3, 341)  # nothing divides 1021: three chunks, the tail padded
    assert chunking(512, 256 * 4) == (1, 512)  # 512 KiB pieces: one chunk
    assert chunking(255, 1 << 20) == (1, 255)  # fewer than CHUNK_ROWS rows
    assert chunking(1 << 16, 1 << 12) == (4, 1 << 14)  # at most MAX_CHUNKS
