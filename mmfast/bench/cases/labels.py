"""``contrastive-labels``: the labelled losses (``labels=``) against the unlabelled ones and the dense
labelled loss, forward + backward, one rank.

Each configuration is one loss (``clip`` or ``siglip``), ``N`` pairs of dimension ``D`` (L2-normalised
features) and ``C`` distinct labels (``N`` labels drawn from ``C`` values, every value used: several
positives per row). Providers, on the same inputs:

* ``dense``: the dense labelled loss (:func:`mmfast.reference.contrastive.clip_loss_labelled` /
  ``siglip_loss_labelled``: the N x N logits and positive mask; what a user writes today), the
  baseline of the output check and of the ratios;
* ``mmfast[<impl>]``: ``mmfast.ClipLoss(impl)(..., labels=labels)`` (or ``SigLipLoss``);
* ``mmfast-plain[<impl>]``: the same module without labels (the diagonal positives): what the labels
  cost on top of the tiled loss.

Shapes: CPU ``N`` in 4096, 16384 (``--quick``: 1024, 2048), GPU 16384, 32768; ``D`` 512, ``C`` 1000,
float32. ``finalize`` writes ``<out>/contrastive-labels_summary_<device>.md`` (labelled over plain
memory and time, dense over labelled memory, the output check, the CPU model) and a memory / time
figure.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from mmfast.bench.cases import BenchCase, add_impl_argument, check_choices, checked_dtype, register_case
from mmfast.bench.cases.contrastive import plot_memory_vs_n, selected
from mmfast.bench.harness import BenchResult, Provider, grad_step
from mmfast.bench.report import cpu_model, csv_list, write_summary_and_figure

__all__ = ["LabelsCase", "summary_markdown"]

LOSSES = ("clip", "siglip")


def _labels(n: int, classes: int, device: str, seed: int) -> torch.Tensor:
    """``n`` labels over ``classes`` values, each value used at least once (``classes <= n``)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(classes), torch.randint(0, classes, (n - classes,), generator=g)])
    return labels[torch.randperm(n, generator=g)].to(device)


@register_case
class LabelsCase(BenchCase):
    """Labelled mmfast losses vs the unlabelled ones and the dense labelled loss."""

    name = "contrastive-labels"
    description = "labelled ClipLoss/SigLipLoss vs unlabelled and the dense labelled loss (time, peak memory)"
    baseline = "dense"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sizes", default=None, help="comma-separated N (default: the device's shapes)")
        parser.add_argument("--dim", type=int, default=512, help="feature dimension D (default 512)")
        parser.add_argument("--classes", type=int, default=1000, help="distinct labels C (default 1000)")
        parser.add_argument("--loss", default="clip,siglip", help="comma-separated: clip, siglip")
        parser.add_argument("--dtype", default="float32", help="comma-separated dtypes (default float32)")
        parser.add_argument("--scale", type=float, default=1 / 0.07, help="logit_scale (already exponentiated)")
        add_impl_argument(parser, ("auto", "cpp", "reference", "triton"))
        parser.add_argument("--no-plot", action="store_true", help="do not write the summary and the figure")

    def check(self, opts: argparse.Namespace) -> list[str]:
        check_choices("--loss", opts.loss, LOSSES)
        check_choices("--impl", opts.impl, ("auto", "cpp", "reference", "triton"))
        if opts.classes < 1:
            raise ValueError(f"--classes must be at least 1, got {opts.classes}")
        return []

    def configs(self, device: str, quick: bool, opts: argparse.Namespace) -> list[dict[str, Any]]:
        gpu = torch.device(device).type == "cuda"
        if opts.sizes:
            sizes = csv_list(int, opts.sizes)
        else:
            sizes = ([4096] if quick else [16384, 32768]) if gpu else ([1024, 2048] if quick else [4096, 16384])
        out = []
        for loss in csv_list(str, opts.loss):
            for dt in csv_list(str, opts.dtype):
                checked_dtype(dt)
                for n in sizes:
                    if opts.classes > n:
                        raise ValueError(f"--classes {opts.classes} exceeds N={n}")
                    out.append({"loss": loss, "N": n, "D": opts.dim, "C": opts.classes, "dtype": dt,
                                "world_size": 1})
        return out

    def shape(self, cfg: dict[str, Any]) -> str:
        return f"{cfg['loss']} N={cfg['N']} D={cfg['D']} C={cfg['C']} {cfg['dtype']}"

    def _inputs(self, cfg: dict[str, Any], device: str, scale: float) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        g = torch.Generator().manual_seed(4321 + cfg["N"])
        dtype = getattr(torch, cfg["dtype"])
        n, d = cfg["N"], cfg["D"]
        img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
        leaves = [img.to(device=device, dtype=dtype).requires_grad_(),
                  txt.to(device=device, dtype=dtype).requires_grad_(),
                  torch.tensor(scale, device=device).requires_grad_()]
        leaves.append(torch.tensor(-10.0, device=device).requires_grad_() if cfg["loss"] == "siglip" else None)
        return leaves, _labels(n, cfg["C"], device, seed=cfg["N"])

    def providers(self, cfg: dict[str, Any], device: str, opts: argparse.Namespace) -> list[Provider]:
        wanted = getattr(opts, "providers", None)
        clip = cfg["loss"] == "clip"

        def setup(kind: str, impl: str = "auto"):
            def make():
                import mmfast
                from mmfast.reference import contrastive as ref

                (i, t, s, b), labels = self._inputs(cfg, device, opts.scale)
                if kind == "dense":
                    if clip:
                        return grad_step(lambda i, t, s: ref.clip_loss_labelled(i, t, i, t, s, None, labels, labels),
                                         i, t, s)
                    return grad_step(lambda i, t, s, b: ref.siglip_loss_labelled(i, t, s, b, labels, labels),
                                     i, t, s, b)
                mod = mmfast.ClipLoss(impl=impl) if clip else mmfast.SigLipLoss(impl=impl)
                lab = labels if kind == "labelled" else None
                return grad_step(lambda i, t, s, b: mod(i, t, s, b, labels=lab), i, t, s, b)

            return make

        out = []
        if selected("dense", wanted):
            out.append(Provider("dense", setup("dense"), "reference.clip_loss_labelled / siglip_loss_labelled"))
        cls = "ClipLoss" if clip else "SigLipLoss"
        for impl in csv_list(str, opts.impl):
            if selected(f"mmfast[{impl}]", wanted):
                out.append(Provider(f"mmfast[{impl}]", setup("labelled", impl),
                                    f"mmfast.{cls}(impl={impl!r})(..., labels=labels)"))
            if selected(f"mmfast-plain[{impl}]", wanted):
                out.append(Provider(f"mmfast-plain[{impl}]", setup("plain", impl),
                                    f"mmfast.{cls}(impl={impl!r})(...) (no labels)"))
        return out

    def finalize(self, results: list[BenchResult], out_dir: Path, opts: argparse.Namespace) -> list[Path]:
        return write_summary_and_figure(self.name, results, out_dir, opts, summary_markdown,
                                        "Labelled contrastive losses on {device}", plot_by_loss,
                                        "labelled losses, forward+backward ({device})")


def plot_by_loss(results: list[BenchResult], path: Path, title: str = "") -> Path:
    """:func:`~mmfast.bench.cases.contrastive.plot_memory_vs_n` with one line per loss and provider."""
    return plot_memory_vs_n([dataclasses.replace(r, provider=f"{r.params['loss']} {r.provider}") for r in results],
                            path, title)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_markdown(results: list[BenchResult], title: str) -> str:
    """Per configuration: each provider's median time and peak extra memory; labelled / plain memory
    and time (the cost of the labels), dense / labelled memory, and the labelled output's max abs
    difference from the dense loss (loss and gradients)."""
    device = torch.device(results[0].device).type if results else "cpu"
    lines = [f"# {title}", "", f"CPU: {cpu_model()}" if device == "cpu" else f"device: {results[0].device}", "",
             "mem x plain / time x plain: the labelled loss's peak extra memory and median time over the "
             "unlabelled loss's (the labels' cost); dense / mem: the dense labelled loss's peak over the labelled "
             "one's; max abs diff: loss and gradients against the dense loss.", "",
             "| configuration | provider | median ms | IQR ms | peak+ MiB | mem x plain | time x plain | "
             "dense / mem | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r.shape for r in results):
        rows = [r for r in results if r.shape == shape]
        by = {r.provider: r for r in rows}
        dense = by.get("dense")
        for r in rows:
            plain = by.get(r.provider.replace("mmfast[", "mmfast-plain[")) if r.provider.startswith("mmfast[") else None
            t = None if r.timing is None else r.timing.median_ms
            mem = r.peak_extra_bytes
            mx = tx = dx = None
            if plain is not None and mem and plain.peak_extra_bytes:
                mx = mem / plain.peak_extra_bytes
            if plain is not None and t and plain.timing is not None:
                tx = t / plain.timing.median_ms
            if r.provider.startswith("mmfast[") and dense is not None and mem and dense.peak_extra_bytes:
                dx = dense.peak_extra_bytes / mem
            diff = r.max_abs_diff if not r.provider.startswith("mmfast-plain") else None
            lines.append(f"| {shape} | {r.provider} | {_fmt(t, '.1f')} | "
                         f"{_fmt(None if r.timing is None else r.timing.iqr_ms, '.1f')} | "
                         f"{_fmt(None if mem is None else mem / 2**20, '.1f')} | {_fmt(mx, '.3f')} | "
                         f"{_fmt(tx, '.3f')} | "
                         f"{_fmt(dx, '.1f')} | {_fmt(diff, '.2e')} |" + (f" error: {r.error[:80]}" if r.error else ""))
    return "\n".join(lines) + "\n"
