"""The dense labelled references (the oracle of issue 16's tiled labelled losses): they reduce to
the unlabelled losses when every label is distinct, agree with PyTorch's soft-target cross-entropy
and with a per-pair sum written out, are differentiable, and reject bad labels naming the argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfast.reference.contrastive import (
    clip_logits,
    clip_loss,
    clip_loss_labelled,
    siglip_logits,
    siglip_loss,
    siglip_loss_labelled,
)


def _feats(n: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return image, text


@pytest.mark.parametrize("bias", [None, -2.0])
def test_distinct_labels_are_the_plain_losses(bias):
    image, text = _feats(12, 16, 0)
    labels = torch.randperm(12, generator=torch.Generator().manual_seed(1)) * 7 + 3  # distinct, any values
    plain = clip_loss(image, text, image, text, 20.0, bias)
    torch.testing.assert_close(clip_loss_labelled(image, text, image, text, 20.0, bias, labels, labels), plain,
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(siglip_loss_labelled(image, text, 20.0, -5.0 if bias is None else bias, labels,
                                                    labels),
                               siglip_loss(image, text, 20.0, -5.0 if bias is None else bias), rtol=1e-13, atol=0)
    # one rank of several (local_loss): its rows against every column, the positives at an offset
    cols_i, cols_t = _feats(30, 16, 2)
    off = 9
    cols_i[off:off + 12], cols_t[off:off + 12] = image, text
    col_labels = torch.arange(30) + 100
    col_labels[off:off + 12] = labels
    torch.testing.assert_close(
        clip_loss_labelled(image, text, cols_i, cols_t, 20.0, bias, labels, col_labels),
        clip_loss(image, text, cols_i, cols_t, 20.0, bias, label_offset=off), rtol=1e-13, atol=0)
    torch.testing.assert_close(
        siglip_loss_labelled(image, cols_t, 20.0, -5.0, labels, col_labels),
        siglip_loss(image, text, 20.0, -5.0, text_cols=cols_t, positive_offset=off), rtol=1e-13, atol=0)


def test_duplicate_labels_against_soft_cross_entropy_and_a_written_out_sum():
    image, text = _feats(10, 8, 3)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 4, 4, 0])  # classes of 3, 3, 2, 1, 1 samples
    s, b = 15.0, -3.0
    li2t, lt2i = clip_logits(image, text, image, text, s, None)
    mask = (labels[:, None] == labels[None, :]).double()
    target = mask / mask.sum(1, keepdim=True)
    want = (F.cross_entropy(li2t, target) + F.cross_entropy(lt2i, target)) / 2
    torch.testing.assert_close(clip_loss_labelled(image, text, image, text, s, None, labels, labels), want,
                               rtol=1e-13, atol=0)
    logits = siglip_logits(image, text, s, b)
    total = 0.0
    for i in range(10):
        for j in range(10):
            y = 1.0 if labels[i] == labels[j] else -1.0
            total -= float(F.logsigmoid(torch.tensor(y) * logits[i, j]))
    assert abs(siglip_loss_labelled(image, text, s, b, labels, labels).item() - total / 10) < 1e-12
    # the labels are used: with duplicates the loss is not the plain one
    assert abs(clip_loss_labelled(image, text, image, text, s, None, labels, labels)
               - clip_loss(image, text, image, text, s, None)).item() > 1e-3


def test_gradcheck_float64():
    image, text = _feats(6, 5, 4)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    assert torch.autograd.gradcheck(
        lambda i, t, sc, bi: clip_loss_labelled(i, t, i, t, sc, bi, labels, labels), (image, text, scale, bias))
    assert torch.autograd.gradcheck(
        lambda i, t, sc, bi: siglip_loss_labelled(i, t, sc, bi, labels, labels), (image, text, scale, bias))


def test_bad_labels_name_the_argument():
    image, text = _feats(4, 3, 5)
    good = torch.arange(4)
    with pytest.raises(ValueError, match=r"row_labels must be an int64 tensor of shape \(4,\), got torch.int32"):
        clip_loss_labelled(image, text, image, text, 1.0, None, good.int(), good)
    with pytest.raises(ValueError, match=r"col_labels must be an int64 tensor of shape \(4,\).*\(3,\)"):
        siglip_loss_labelled(image, text, 1.0, 0.0, good, good[:3])
    with pytest.raises(ValueError, match="row_labels must be an int64 tensor"):
        clip_loss_labelled(image, text, image, text, 1.0, None, good[:, None], good)
    with pytest.raises(TypeError, match="row_labels must be a torch.Tensor"):
        clip_loss_labelled(image, text, image, text, 1.0, None, [0, 1, 2, 3], good)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no positive column"):
        clip_loss_labelled(image, text, image, text, 1.0, None, torch.tensor([0, 9, 1, 2]), good)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="row_labels must be on cpu"):
            clip_loss_labelled(image, text, image, text, 1.0, None, good.cuda(), good)
