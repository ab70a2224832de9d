"""mmfast.ClipLoss / SigLipLoss across real gloo processes, against open_clip in the same
processes (equal batch sizes) and against the in-process simulation of open_clip's per-rank
semantics (unequal batch sizes, which open_clip cannot run)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmfast.reference.contrastive import simulate_ranks
from mmfast.testing import run_distributed

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


def _max_rel(a, b):
    # relative to the larger of the reference magnitude and 0.01: near-zero gradients are differences
    # of O(scale) terms, so their absolute rounding error is O(scale * eps), not O(|grad| * eps)
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-2)).item()


def _vs_open_clip(rank, world, b, d, scale_v, with_bias, dtype_name):
    from open_clip.loss import ClipLoss, SigLipLoss

    import mmfast

    dtype = getattr(torch, dtype_name)
    feats = _features([b] * world, d, dtype, seed=world * 100 + b)
    image, text = feats[rank]
    scale = torch.tensor(scale_v, dtype=dtype)
    bias = torch.tensor(-3.0, dtype=dtype) if with_bias else None
    worst = {}
    for gs in [g for g in range(1, world + 1) if world % g == 0]:
        for local_loss, gwg in itertools.product([False, True], repeat=2):
            ref = ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world)
            ours = mmfast.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                   group_size=gs)
            lr, gr = _grads(ref, image, text, scale, bias)
            lo, go = _grads(ours, image, text, scale, bias)
            key = f"clip gs={gs} local={local_loss} gwg={gwg}"
            errs = [_max_rel(lo, lr)] + [_max_rel(x, y) for x, y in zip(go[:3], gr[:3])]
            if with_bias:  # d loss / d bias is 0 exactly; open_clip's is rounding noise
                errs.append(go[3].abs().item() + gr[3].abs().item() * 0)
            worst[key] = max(errs)
        for impl_name in ("bidir", "gather"):
            ref = SigLipLoss(rank=rank, world_size=world, dist_impl=impl_name)
            ours = mmfast.SigLipLoss(rank=rank, world_size=world, dist_impl=impl_name, group_size=gs)
            sb = bias if bias is not None else torch.tensor(-10.0, dtype=dtype)
            lr, gr = _grads(ref, image, text, scale, sb)
            lo, go = _grads(ours, image, text, scale, sb)
            worst[f"siglip gs={gs} {impl_name}"] = max([_max_rel(lo, lr)] + [_max_rel(x, y) for x, y in zip(go, gr)])
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
    for gs in [g for g in range(1, world + 1) if world % g == 0]:
        for local_loss, gwg in itertools.product([False, True], repeat=2):
            fn = mmfast.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                 group_size=gs)
            out[("clip", gs, local_loss, gwg)] = _grads(fn, image, text, scale, bias)
        fn = mmfast.SigLipLoss(rank=rank, world_size=world, group_size=gs)
        out[("siglip", gs)] = _grads(fn, image, text, scale, bias)
    return out


@pytest.mark.parametrize("sizes", [[3, 5], [4, 1, 6, 2]])
def test_unequal_batches_match_simulation(sizes):
    world = len(sizes)
    results = run_distributed(_uneven, world, sizes, 16, timeout=300)
    feats = _features(sizes, 16, torch.float64, seed=7)
    scale = torch.tensor(20.0, dtype=torch.float64)
    bias = torch.tensor(-5.0, dtype=torch.float64)
    for key in results[0]:
        if key[0] == "clip":
            sim = simulate_ranks("clip", feats, scale, bias, local_loss=key[2], gather_with_grad=key[3])
        else:
            sim = simulate_ranks("siglip", feats, scale, bias)
        for rank in range(world):
            loss, grads = results[rank][key]
            exp = sim[rank]
            assert _max_rel(loss, exp["loss"]) < 1e-10, (key, rank)
            for name, got, want in zip(("image", "text", "scale"), grads, exp["grads"]):
                assert _max_rel(got, want) < 1e-10, (key, rank, name)
            if key[0] == "siglip":
                assert _max_rel(grads[3], exp["grads"][3]) < 1e-10, (key, rank, "bias")
            else:
                assert grads[3].abs().item() == 0.0


def _one_rank_bad(rank, world):
    import mmfast

    image = torch.randn(4, 8)
    text = torch.randn(4 if rank else 3, 8)  # rank 0 has a bad batch
    try:
        mmfast.ClipLoss(rank=rank, world_size=world)(image, text, torch.tensor(10.0))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_bad_input_on_one_rank_raises_everywhere_without_hanging():
    msgs = run_distributed(_one_rank_bad, 3, timeout=120)
    assert "text_features" in msgs[0]
    assert all("bad contrastive-loss input on rank(s) [0]" in m for m in msgs[1:])


def _bad_group_size(rank, world):
    import mmfast

    try:
        mmfast.ClipLoss(rank=rank, world_size=world, group_size=2)(torch.randn(2, 4), torch.randn(2, 4), 1.0)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_group_size_must_divide_world():
    msgs = run_distributed(_bad_group_size, 3, timeout=120)
    assert all("group_size=2 must divide the world size 3" in m for m in msgs)
