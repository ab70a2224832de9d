"""Tests of the pure-torch CLIP / SigLIP references against open_clip (the semantics we must match).

* one rank: values and gradients (features, logit_scale, logit_bias) equal open_clip's ``ClipLoss`` /
  ``SigLipLoss`` (float64 to ~1e-10 relative; float32 by the accuracy rule of ``mmfast.testing``);
* log-sum-exp vectors against ``torch.logsumexp`` on explicitly built logits;
* SigLIP with ``text_cols`` / ``positive_offset`` equals open_clip's distributed chunk sum;
* ``simulate_ranks`` (W = 2, 3, equal sizes) equals open_clip's OWN ``ClipLoss`` / ``SigLipLoss`` code run
  in-process with fake collectives that route gradients like the real ones; with unequal sizes it
  equals independent explicit formulas (analytic gradients, weighted full-matrix losses);
* perturbations (missing ``/2``, shifted labels, wrong normaliser, wrong gradient routing, ...) are
  caught by the same comparisons, so the tests cannot pass vacuously.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.distributed
import torch.distributed.nn
import torch.nn.functional as F
from torch import Tensor

from mmfast.reference.contrastive import (
    clip_logits,
    clip_loss,
    clip_loss_lse,
    siglip_loss,
    simulate_ranks,
)
from mmfast.testing import assert_accuracy

# every test here compares with open_clip's own code: without it (the GPU machine's stack) there is
# nothing to compare with
ocl = pytest.importorskip("open_clip.loss", reason="the references are checked against open_clip")

F64_TOL = 1e-10  # relative to max(1, |reference|): float64 results agree to ~1e-14 in practice


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: see conftest


# ------------------------------------------------------------------------------------------- helpers


def _features(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """L2-normalised ``(n, d)`` image and text features (as CLIP models produce them)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    # Correlate the pairs a little so that positives are not just noise.
    txt = F.normalize(txt + 0.5 * img, dim=-1)
    return img.to(dtype), txt.to(dtype)


LossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def _value_and_grads(
    fn: LossFn, img: Tensor, txt: Tensor, scale: float, bias: float | None
) -> list[Tensor]:
    """``[loss, d img, d txt, d scale, d bias]`` (d bias = 0 when bias is None), all detached."""
    img = img.detach().clone().requires_grad_(True)
    txt = txt.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=img.dtype, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=img.dtype, requires_grad=True)
    loss = fn(img, txt, s, b)
    leaves = [img, txt, s] + ([] if b is None else [b])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
    if b is None:
        grads.append(torch.zeros((), dtype=img.dtype))
    return [loss.detach(), *grads]


NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


def _assert_close(got: list[Tensor], want: list[Tensor], tol: float = F64_TOL, what: str = "") -> None:
    """Max-abs error of each entry at most ``tol * max(1, max|want|)``."""
    for name, g, w in zip(NAMES[: len(want)], got, want, strict=True):
        assert g.shape == w.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        assert err <= tol * scale, f"{what} {name}: error {err:.3e} > {tol * scale:.1e}"


def _ref_clip(img: Tensor, txt: Tensor, s: Tensor, b: Tensor | None) -> Tensor:
    return clip_loss(img, txt, img, txt, s, b)


def _oc_clip(img: Tensor, txt: Tensor, s: Tensor, b: Tensor | None) -> Tensor:
    return ocl.ClipLoss()(img, txt, s, b)


def _ref_siglip(img: Tensor, txt: Tensor, s: Tensor, b: Tensor | None) -> Tensor:
    return siglip_loss(img, txt, s, b)


def _oc_siglip(img: Tensor, txt: Tensor, s: Tensor, b: Tensor | None) -> Tensor:
    return ocl.SigLipLoss()(img, txt, s, b)


# ------------------------------------------------------------------------------ one rank vs open_clip


@pytest.mark.parametrize("bias", [None, -2.5])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("d", [8, 64, 129])
@pytest.mark.parametrize("b", [1, 7, 64, 257])
def test_clip_matches_open_clip_float64(b: int, d: int, scale: float, bias: float | None) -> None:
    img, txt = _features(b, d, seed=b * 1000 + d)
    got = _value_and_grads(_ref_clip, img, txt, scale, bias)
    want = _value_and_grads(_oc_clip, img, txt, scale, bias)
    assert got[0].dtype == torch.float64 and got[0].dim() == 0
    _assert_close(got, want, what=f"clip B={b} D={d} s={scale} b={bias}")


@pytest.mark.parametrize("bias", [None, -10.0, 0.0, 3.0])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("d", [8, 64, 129])
@pytest.mark.parametrize("b", [1, 7, 64, 257])
def test_siglip_matches_open_clip_float64(b: int, d: int, scale: float, bias: float | None) -> None:
    img, txt = _features(b, d, seed=b * 1000 + d + 1)
    got = _value_and_grads(_ref_siglip, img, txt, scale, bias)
    want = _value_and_grads(_oc_siglip, img, txt, scale, bias)
    assert got[0].dtype == torch.float64 and got[0].dim() == 0
    _assert_close(got, want, what=f"siglip B={b} D={d} s={scale} b={bias}")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("scale,bias", [(14.3, None), (100.0, -10.0), (10.0, -10.0)])
@pytest.mark.parametrize("b,d", [(7, 64), (257, 129)])
def test_float32_matches_open_clip(loss: str, b: int, d: int, scale: float, bias: float | None) -> None:
    # Tolerance: the float32 reference and open_clip's float32 loss both round differently from the
    # exact (float64) result; with normalised features |logit| <= s, so the logits carry an error of
    # ~sqrt(D) * eps32 * s and the losses / gradients a comparable one, which depends on summation
    # order. A fixed atol would therefore either be loose or flaky; instead we apply the project's
    # accuracy rule: the reference's float32 error against float64 must be at most 2x open_clip's
    # own float32 error, plus a floor of 8 ulps of the magnitude (for results that are exact in both).
    ref, oc = (_ref_clip, _oc_clip) if loss == "clip" else (_ref_siglip, _oc_siglip)
    img, txt = _features(b, d, seed=b + d)
    got = _value_and_grads(ref, img.float(), txt.float(), scale, bias)
    low = _value_and_grads(oc, img.float(), txt.float(), scale, bias)
    high = _value_and_grads(oc, img, txt, scale, bias)
    assert got[0].dtype == torch.float32
    for name, g, lo, hi in zip(NAMES, got, low, high, strict=True):
        if loss == "clip" and name == "d_bias":
            # Mathematically 0 (a constant shift of softmax logits): both are float32 rounding noise
            # of a sum of 2B terms of size <= 1 / B, so bound it absolutely.
            assert g.abs().item() <= 64 * torch.finfo(torch.float32).eps
            continue
        assert_accuracy(g, lo, hi, name=f"{loss} {name}")


def test_half_inputs_upcast_to_float32() -> None:
    img, txt = _features(9, 16, dtype=torch.bfloat16)
    loss = clip_loss(img, txt, img, txt, 20.0)
    assert loss.dtype == torch.float32
    want = clip_loss(img.float(), txt.float(), img.float(), txt.float(), 20.0)
    assert torch.equal(loss, want)
    sl = siglip_loss(img.half(), txt.half(), 10.0, -10.0)
    assert sl.dtype == torch.float32


def test_output_dict_value() -> None:
    img, txt = _features(11, 32)
    s, b = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    out = ocl.ClipLoss()(img, txt, s, b, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert torch.allclose(out["contrastive_loss"], clip_loss(img, txt, img, txt, s, b), rtol=0, atol=1e-12)
    out = ocl.SigLipLoss()(img, txt, s, b, output_dict=True)
    assert torch.allclose(out["contrastive_loss"], siglip_loss(img, txt, s, b), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------- lse / logits


@pytest.mark.parametrize("bias", [None, -3.0])
@pytest.mark.parametrize("b,d", [(1, 8), (7, 64), (64, 129)])
def test_clip_loss_lse_square(b: int, d: int, bias: float | None) -> None:
    img, txt = _features(b, d, seed=3)
    s = 14.3
    # Build the logits explicitly, element by element through einsum, independent of clip_logits.
    logits = s * torch.einsum("id,jd->ij", img, txt) + (0.0 if bias is None else bias)
    row_lse, col_lse = clip_loss_lse(img, txt, img, txt, s, bias)
    assert row_lse.shape == col_lse.shape == (b,)
    torch.testing.assert_close(row_lse, torch.logsumexp(logits, dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(col_lse, torch.logsumexp(logits, dim=0), rtol=0, atol=1e-12)
    # The loss follows from the lse vectors and the diagonal.
    diag = logits.diagonal()
    from_lse = ((row_lse - diag).mean() + (col_lse - diag).mean()) / 2
    torch.testing.assert_close(from_lse, clip_loss(img, txt, img, txt, s, bias), rtol=0, atol=1e-12)


def test_clip_lse_and_logits_rectangular() -> None:
    # Local-loss shape: 5 rows of rank 1 against 12 columns (ranks of sizes 4, 5, 3).
    img, txt = _features(12, 16, seed=5)
    rows = slice(4, 9)
    s, bias = 30.0, 0.5
    li, lt = clip_logits(img[rows], txt[rows], img, txt, s, bias)
    torch.testing.assert_close(li, s * img[rows] @ txt.T + bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(lt, s * txt[rows] @ img.T + bias, rtol=0, atol=1e-12)
    row_lse, col_lse = clip_loss_lse(img[rows], txt[rows], img, txt, s, bias)
    torch.testing.assert_close(row_lse, torch.logsumexp(li, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(col_lse, torch.logsumexp(lt, 1), rtol=0, atol=1e-12)
    idx = torch.arange(5)
    want = ((row_lse - li[idx, idx + 4]).mean() + (col_lse - lt[idx, idx + 4]).mean()) / 2
    torch.testing.assert_close(clip_loss(img[rows], txt[rows], img, txt, s, bias, label_offset=4), want,
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        clip_loss(img[rows], txt[rows], img, txt, s, bias, label_offset=8)


# ------------------------------------------------------------------------- SigLIP chunk-sum equivalence


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_text_cols_equals_open_clip_chunk_sum(world: int) -> None:
    bsz, d = 5, 16
    img, txt = _features(world * bsz, d, seed=world)
    oc = ocl.SigLipLoss()
    for r in range(world):
        leaves = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True),
                  torch.tensor(10.0, dtype=torch.float64, requires_grad=True),
                  torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)]
        results = []
        for use_ref in (True, False):
            i_all, t_all, s, b = leaves
            blocks_i, blocks_t = i_all.split(bsz), t_all.split(bsz)
            if use_ref:
                loss = siglip_loss(blocks_i[r], blocks_t[r], s, b, text_cols=t_all, positive_offset=r * bsz)
            else:  # what open_clip's forward adds up on rank r, whatever the dist_impl
                loss = oc._loss(blocks_i[r], blocks_t[r], s, b)
                for q in range(world):
                    if q != r:
                        loss = loss + oc._loss(blocks_i[r], blocks_t[q], s, b, negative_only=True)
            results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
        _assert_close(results[0], results[1], what=f"siglip chunk sum rank {r}")


def test_siglip_text_cols_must_contain_text_features() -> None:
    img, txt = _features(6, 8)
    with pytest.raises(ValueError):
        siglip_loss(img[:3], txt[:3], 10.0, -10.0, text_cols=txt, positive_offset=2)
    with pytest.raises(ValueError):
        siglip_loss(img[:3], txt[:3], 10.0, -10.0, text_cols=txt, positive_offset=4)
    siglip_loss(img[3:], txt[3:], 10.0, -10.0, text_cols=txt, positive_offset=3)


# ------------------------------------------------- simulate_ranks vs open_clip's own code, in-process


@contextmanager
def _fake_collectives(
    monkeypatch: pytest.MonkeyPatch, images: list[Tensor], texts: list[Tensor], rank: list[int]
) -> Iterator[None]:
    """Replace the collectives open_clip.loss calls by in-process equivalents for rank ``rank[0]``.

    Every rank's features are ONE leaf tensor shared by all simulated ranks. A collective "with
    gradient" returns the owners' leaves themselves, so that backward of the sum of all ranks' losses
    delivers to each owner the sum over ranks of the gradients, exactly like the backward of
    ``torch.distributed.nn.all_gather`` / ``all_reduce`` and of open_clip's NeighbourExchange. A
    collective without gradient (``dist.all_gather``) copies detached values.
    """
    world = len(images)
    reduce_calls = [0]

    def owners(t: Tensor) -> list[Tensor]:
        for group in (images, texts):
            if any(t is x for x in group):
                return group
        raise AssertionError("collective called on a tensor that is no rank's features")

    def index(t: Tensor) -> int:
        return next(i for i, x in enumerate(texts) if x is t)

    def all_gather(tensor_list: list[Tensor], tensor: Tensor, group=None, async_op=False) -> None:
        group_ = owners(tensor)
        assert tensor is group_[rank[0]]
        with torch.no_grad():
            for out, src in zip(tensor_list, group_, strict=True):
                out.copy_(src)

    def nn_all_gather(tensor: Tensor, group=None) -> tuple[Tensor, ...]:
        group_ = owners(tensor)
        assert tensor is group_[rank[0]]
        return tuple(group_)

    def nn_all_reduce(tensor: Tensor, op=None, group=None) -> Tensor:
        # SigLipLoss 'reduce' calls all_reduce(text_features * (rank == i)) for i = 0 .. W-1 in order.
        i = reduce_calls[0] % world
        reduce_calls[0] += 1
        return texts[i]

    def exchange(from_rank: int, to_rank: int, tensor: Tensor, group=None) -> Tensor:
        # Rank r sends T_k to the right and receives what its left neighbour sends at the same step,
        # T_{k-1} (at step i, k = r - i).
        assert from_rank == (rank[0] - 1) % world and to_rank == (rank[0] + 1) % world
        return texts[(index(tensor) - 1) % world]

    def exchange_bidir(left: int, right: int, to_left: Tensor, to_right: Tensor, group=None):
        assert left == (rank[0] - 1) % world and right == (rank[0] + 1) % world
        return texts[(index(to_left) + 1) % world], texts[(index(to_right) - 1) % world]

    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    monkeypatch.setattr(torch.distributed.nn, "all_gather", nn_all_gather)
    monkeypatch.setattr(torch.distributed.nn, "all_reduce", nn_all_reduce)
    monkeypatch.setattr(ocl, "neighbour_exchange_with_grad", exchange)
    monkeypatch.setattr(ocl, "neighbour_exchange_bidir_with_grad", exchange_bidir)
    yield


def _open_clip_ranks(
    monkeypatch: pytest.MonkeyPatch,
    loss_name: str,
    feats: list[tuple[Tensor, Tensor]],
    scale: float,
    bias: float | None,
    **flags: object,
) -> list[list[Tensor]]:
    """Per rank ``[loss, d image_r, d text_r, d scale, d bias]`` from open_clip's own loss modules."""
    world = len(feats)
    images = [i.clone().requires_grad_(True) for i, _ in feats]
    texts = [t.clone().requires_grad_(True) for _, t in feats]
    scales = [torch.tensor(scale, dtype=torch.float64, requires_grad=True) for _ in range(world)]
    biases = [None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
              for _ in range(world)]
    rank = [0]
    losses = []
    with _fake_collectives(monkeypatch, images, texts, rank):
        for r in range(world):
            rank[0] = r
            if loss_name == "clip":
                mod = ocl.ClipLoss(rank=r, world_size=world, **flags)
            else:
                mod = ocl.SigLipLoss(rank=r, world_size=world, **flags)
            losses.append(mod(images[r], texts[r], scales[r], biases[r]))
    leaves = images + texts + scales + [b for b in biases if b is not None]
    grads = torch.autograd.grad(sum(losses), leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
    out = []
    for r in range(world):
        d_bias = grads[3 * world + r] if bias is not None else torch.zeros((), dtype=torch.float64)
        out.append([losses[r].detach(), grads[r], grads[world + r], grads[2 * world + r], d_bias])
    return out


def _simulated(loss_name: str, feats: list[tuple[Tensor, Tensor]], scale: float, bias: float | None,
               **flags: bool) -> list[list[Tensor]]:
    s = torch.tensor(scale, dtype=torch.float64)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    out = []
    for res in simulate_ranks(loss_name, feats, s, b, **flags):  # type: ignore[arg-type]
        g_img, g_txt, g_s, g_b = res["grads"]
        g_b = torch.zeros((), dtype=torch.float64) if g_b is None else g_b
        out.append([res["loss"], g_img, g_txt, g_s, g_b])
    return out


def _split(world: int, sizes: list[int], d: int = 16, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    img, txt = _features(sum(sizes), d, seed=seed)
    return list(zip(img.split(sizes), txt.split(sizes), strict=True))


CLIP_FLAGS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_FLAGS)
@pytest.mark.parametrize("world", [2, 3])
def test_simulate_clip_matches_open_clip(
    monkeypatch: pytest.MonkeyPatch, world: int, local_loss: bool, gather_with_grad: bool
) -> None:
    feats = _split(world, [6] * world, seed=world)
    flags = {"local_loss": local_loss, "gather_with_grad": gather_with_grad}
    want = _open_clip_ranks(monkeypatch, "clip", feats, 14.3, -1.0, **flags)
    got = _simulated("clip", feats, 14.3, -1.0, **flags)
    for r in range(world):
        _assert_close(got[r], want[r], what=f"rank {r} {flags}")


@pytest.mark.parametrize("dist_impl", ["bidir", "shift", "reduce", "gather"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_simulate_siglip_matches_open_clip(
    monkeypatch: pytest.MonkeyPatch, world: int, dist_impl: str
) -> None:
    feats = _split(world, [5] * world, seed=10 + world)
    want = _open_clip_ranks(monkeypatch, "siglip", feats, 10.0, -10.0, dist_impl=dist_impl)
    got = _simulated("siglip", feats, 10.0, -10.0)
    for r in range(world):
        _assert_close(got[r], want[r], what=f"siglip {dist_impl} rank {r}")


@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_FLAGS)
def test_simulate_one_rank_is_plain_loss(local_loss: bool, gather_with_grad: bool) -> None:
    # open_clip gathers nothing when world_size == 1, whatever the flags.
    feats = _split(1, [9])
    got = _simulated("clip", feats, 14.3, None, local_loss=local_loss, gather_with_grad=gather_with_grad)
    want = _value_and_grads(_oc_clip, *feats[0], 14.3, None)
    _assert_close(got[0], want)


# ------------------------------------------- simulate_ranks with unequal sizes vs explicit formulas


UNEQUAL = [[3, 5, 1], [4, 7], [2, 1, 6, 3]]


def _explicit_ranks(
    loss_name: str,
    sizes: list[int],
    feats: list[tuple[Tensor, Tensor]],
    scale: float,
    bias: float,
    local_loss: bool = False,
    gather_with_grad: bool = False,
) -> list[list[Tensor]]:
    """Per-rank results from the full square (N, N) matrices of all features, written out by hand."""
    world = len(sizes)
    img = torch.cat([i for i, _ in feats]).requires_grad_(True)
    txt = torch.cat([t for _, t in feats]).requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    n = img.shape[0]
    logits = s * img @ txt.T + b  # (N, N): row i = image i, column j = text j
    owner_of_row = torch.repeat_interleave(torch.arange(world), torch.tensor(sizes))
    starts = [sum(sizes[:r]) for r in range(world)]
    if loss_name == "siglip":
        signs = 2 * torch.eye(n, dtype=torch.float64) - 1
        per_row = -F.logsigmoid(signs * logits).sum(dim=1)  # (N,)
        losses = [per_row[owner_of_row == r].sum() / sizes[r] for r in range(world)]
    else:
        ce_i2t = -logits.log_softmax(dim=1).diagonal()  # (N,)
        ce_t2i = -logits.log_softmax(dim=0).diagonal()  # (N,): row i of the text->image matrix
        if local_loss:
            losses = [(ce_i2t[owner_of_row == r].mean() + ce_t2i[owner_of_row == r].mean()) / 2
                      for r in range(world)]
        else:
            losses = [(ce_i2t.mean() + ce_t2i.mean()) / 2] * world
    out = [[loss.detach()] for loss in losses]

    if loss_name == "clip" and local_loss and not gather_with_grad:
        # Gradient through the rows only, written analytically:
        # d/dI_r = s (P - Y) T_all / (2 B_r), d/dT_r = s (Q - Y) I_all / (2 B_r), d/ds, d/db likewise.
        with torch.no_grad():
            for r in range(world):
                rows = slice(starts[r], starts[r] + sizes[r])
                p = logits[rows].softmax(dim=1)  # (B_r, N) image->text probabilities
                q = logits[:, rows].T.softmax(dim=1)  # (B_r, N) text->image probabilities
                y = torch.zeros_like(p)
                y[torch.arange(sizes[r]), torch.arange(starts[r], starts[r] + sizes[r])] = 1
                denom = 2 * sizes[r]
                d_img = s * (p - y) @ txt / denom
                d_txt = s * (q - y) @ img / denom
                d_s = (((p - y) * (img[rows] @ txt.T)).sum() + ((q - y) * (txt[rows] @ img.T)).sum()) / denom
                d_b = ((p - y).sum() + (q - y).sum()) / denom
                out[r] += [d_img, d_txt, d_s, d_b]
        return out

    # Feature gradients: d/dF_r of the sum over ranks (siglip images: only loss_r touches I_r, so the sum
    # is the same thing); global clip without gather_with_grad: the gradient of ONE copy of the loss.
    total = losses[0] if (loss_name == "clip" and not local_loss and not gather_with_grad) else sum(losses)
    g_img, g_txt = torch.autograd.grad(total, [img, txt], retain_graph=True)
    for r in range(world):
        d_s, d_b = torch.autograd.grad(losses[r], [s, b], retain_graph=True)
        out[r] += [g_img.split(sizes)[r], g_txt.split(sizes)[r], d_s, d_b]
    return out


@pytest.mark.parametrize("sizes", UNEQUAL)
@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_FLAGS)
def test_simulate_clip_unequal_sizes(sizes: list[int], local_loss: bool, gather_with_grad: bool) -> None:
    feats = _split(len(sizes), sizes, seed=len(sizes))
    got = _simulated("clip", feats, 14.3, 0.7, local_loss=local_loss, gather_with_grad=gather_with_grad)
    want = _explicit_ranks("clip", sizes, feats, 14.3, 0.7, local_loss, gather_with_grad)
    for r, size in enumerate(sizes):
        assert got[r][1].shape == got[r][2].shape == (size, 16)
        assert all(torch.isfinite(x).all() for x in got[r])
        what = f"rank {r} sizes {sizes} local={local_loss} gwg={gather_with_grad}"
        _assert_close(got[r], want[r], what=what)


@pytest.mark.parametrize("sizes", UNEQUAL)
def test_simulate_siglip_unequal_sizes(sizes: list[int]) -> None:
    feats = _split(len(sizes), sizes, seed=7)
    got = _simulated("siglip", feats, 10.0, -10.0)
    want = _explicit_ranks("siglip", sizes, feats, 10.0, -10.0)
    for r, size in enumerate(sizes):
        assert got[r][1].shape == got[r][2].shape == (size, 16)
        _assert_close(got[r], want[r], what=f"siglip rank {r} sizes {sizes}")


def test_simulate_dtypes_and_float_scale() -> None:
    feats = [(i.float(), t.float()) for i, t in _split(2, [3, 4])]
    res = simulate_ranks("clip", feats, 14.3, None, local_loss=True)
    for r, out in enumerate(res):
        g_img, g_txt, g_s, g_b = out["grads"]
        assert out["loss"].dtype == torch.float32 and out["loss"].dim() == 0
        assert g_img.dtype == torch.float32 and g_img.shape == feats[r][0].shape
        assert g_s.dim() == 0 and g_b is None
    with pytest.raises(ValueError):
        simulate_ranks("siglip", feats, 10.0, -10.0, local_loss=True)


# ------------------------------------------------------------------------------------- perturbations


def _raises(check: Callable[[], None]) -> None:
    with pytest.raises(AssertionError):
        check()


def test_perturbed_references_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    img, txt = _features(7, 16, seed=1)
    want_clip = _value_and_grads(_oc_clip, img, txt, 14.3, -1.0)
    want_sig = _value_and_grads(_oc_siglip, img, txt, 10.0, -10.0)
    wrong_clip: list[LossFn] = [
        lambda i, t, s, b: 2 * clip_loss(i, t, i, t, s, b),  # missing / 2
        lambda i, t, s, b: clip_loss(i, t, i.roll(1, 0), t.roll(1, 0), s, b),  # labels shifted by one
        lambda i, t, s, b: F.cross_entropy(clip_logits(i, t, i, t, s, b)[0], torch.arange(7)),  # i2t only
        lambda i, t, s, b: clip_loss(i, t, i, t, s * s, b),  # scale applied twice
    ]
    for fn in wrong_clip:
        _raises(lambda fn=fn: _assert_close(_value_and_grads(fn, img, txt, 14.3, -1.0), want_clip))
    wrong_sig: list[LossFn] = [
        lambda i, t, s, b: siglip_loss(i, t, s, b) * 7 / 49,  # mean over all pairs instead of / B
        lambda i, t, s, b: siglip_loss(i, t.roll(1, 0), s, b),  # positives on the wrong column
        lambda i, t, s, b: siglip_loss(i, t, s, -b),  # bias sign
        lambda i, t, s, b: siglip_loss(i, t, s, None),  # missing bias
    ]
    for fn in wrong_sig:
        _raises(lambda fn=fn: _assert_close(_value_and_grads(fn, img, txt, 10.0, -10.0), want_sig))

    # Distributed: the wrong label offset, and the wrong gradient routing, are caught.
    feats = _split(2, [6, 6], seed=2)
    want = _open_clip_ranks(monkeypatch, "clip", feats, 14.3, None, local_loss=True)
    i_all, t_all = torch.cat([i for i, _ in feats]), torch.cat([t for _, t in feats])
    wrong_offset = clip_loss(feats[1][0], feats[1][1], i_all, t_all, 14.3, label_offset=0)
    _raises(lambda: _assert_close([wrong_offset], [want[1][0]]))
    for flags in CLIP_FLAGS:
        if flags == (True, False):
            continue
        got = _simulated("clip", feats, 14.3, None, local_loss=flags[0], gather_with_grad=flags[1])
        _raises(lambda got=got: [_assert_close(got[r], want[r]) for r in range(2)])


# ------------------------------------------------------------- real gloo collectives (one spawn, W = 3)


def _open_clip_gloo_worker(
    rank: int, world: int, feats: list[tuple[Tensor, Tensor]]
) -> dict[str, list[Tensor]]:
    """On one gloo rank: open_clip's losses with real collectives, ``[loss, d I_r, d T_r, d s, d b]``."""
    configs: dict[str, Callable[[], torch.nn.Module]] = {
        f"clip-{ll}-{gwg}": (lambda ll=ll, gwg=gwg: ocl.ClipLoss(
            local_loss=ll, gather_with_grad=gwg, rank=rank, world_size=world))
        for ll, gwg in CLIP_FLAGS
    }
    for impl in ("bidir", "shift", "reduce", "gather"):
        configs[f"siglip-{impl}"] = lambda impl=impl: ocl.SigLipLoss(
            rank=rank, world_size=world, dist_impl=impl)
    out = {}
    for key, make in configs.items():
        img, txt = (x.clone().requires_grad_(True) for x in feats[rank])
        s = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
        loss = make()(img, txt, s, b)
        grads = torch.autograd.grad(loss, [img, txt, s, b], allow_unused=True)
        out[key] = [loss.detach(), *(torch.zeros(()) if g is None else g for g in grads)]
    return out


@pytest.mark.distributed
def test_simulate_matches_open_clip_with_real_gloo() -> None:
    # Also validates the fake collectives above: real all_gather / all_reduce / isend-irecv backward.
    # W = 3 exercises SigLIP's bidirectional exchange; W = 2 and 4 (its one-way remainder step) are
    # covered by the fake-collective tests.
    from mmfast.testing import run_distributed

    world = 3
    feats = _split(world, [4] * world, d=8, seed=42)
    per_rank = run_distributed(_open_clip_gloo_worker, world, feats, timeout=90)
    for ll, gwg in CLIP_FLAGS:
        got = _simulated("clip", feats, 14.3, -2.0, local_loss=ll, gather_with_grad=gwg)
        for r in range(world):
            what = f"gloo clip local={ll} gwg={gwg} rank {r}"
            _assert_close(got[r], per_rank[r][f"clip-{ll}-{gwg}"], what=what)
    got = _simulated("siglip", feats, 14.3, -2.0)
    for impl in ("bidir", "shift", "reduce", "gather"):
        for r in range(world):
            _assert_close(got[r], per_rank[r][f"siglip-{impl}"], what=f"gloo siglip {impl} rank {r}")
