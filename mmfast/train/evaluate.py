"""Zero-shot retrieval on the held-out split: image->text and text->image recall@k."""

from __future__ import annotations

import torch

__all__ = ["encode_dataset", "format_retrieval", "retrieval_metrics"]


@torch.no_grad()
def encode_dataset(model, dataset, tokenizer, context_length: int, device: torch.device,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features ``[N, D]`` (float32, CPU) of every sample, in order."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            idx = torch.arange(start, min(len(dataset), start + batch_size))
            pixels, captions = dataset.batch(idx)
            tokens = tokenizer(captions, context_length)
            images.append(model.encode_image(pixels.to(device)).float().cpu())
            texts.append(model.encode_text(tokens.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of pair ``i``'s text for image ``i`` (``i2t``) and of its image for text ``i`` (``t2i``).

    The rank of the right answer is the number of candidates scoring strictly higher, so R@k is the
    fraction of queries whose answer is among the k best. Also returns ``chance_r{k} = k / N`` (the
    expected R@k of random scores) and ``n``.
    """
    sim = image_features @ text_features.T  # [N images, N texts]
    n = sim.shape[0]
    diag = sim.diagonal()
    i2t_rank = (sim > diag[:, None]).sum(dim=1)
    t2i_rank = (sim > diag[None, :]).sum(dim=0)
    out: dict[str, float] = {"n": n}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
        out[f"chance_r{k}"] = min(1.0, k / n)
    return out


def format_retrieval(m: dict) -> str:
    """One line: both directions' R@1 and R@5 against chance, in percent."""
    return (f"image->text R@1 {100 * m['i2t_r1']:.1f}% R@5 {100 * m['i2t_r5']:.1f}% | "
            f"text->image R@1 {100 * m['t2i_r1']:.1f}% R@5 {100 * m['t2i_r5']:.1f}% | "
            f"chance R@1 {100 * m['chance_r1']:.1f}% R@5 {100 * m['chance_r5']:.1f}% (N={m['n']})")
