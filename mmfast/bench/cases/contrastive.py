"""``contrastive``: open_clip ``ClipLoss`` against ``mmfast.ClipLoss``, forward + backward, one rank.

Each provider computes the loss of ``N`` image/text pairs of dimension ``D`` (L2-normalised features,
``logit_scale`` a trainable scalar) and its gradients with respect to the features and the scale
(``torch.autograd.grad``, so nothing accumulates between calls); it returns the loss and the
gradients, which the harness compares with open_clip's (``max|diff|``). Providers:

* ``open_clip``: ``open_clip.loss.ClipLoss()`` (the baseline; skipped with a note when open_clip is
  not installed, then there are no ratios);
* ``mmfast[<impl>]``: ``mmfast.ClipLoss(impl=<impl>)`` for each ``--impl`` (default ``auto``).

Shapes: on CPU, ``N`` in 1024, 4096, 8192, 16384 with ``D`` = 512 in float32 (``--quick``: 256, 512,
1024); on a GPU, ``N`` in 4096, 16384, 32768 in float32 and bfloat16 (``--quick``: 4096, 16384 in
float32). ``--sizes``, ``--dim`` and ``--dtype`` override them. After the run, ``finalize`` draws
peak extra memory and median time against ``N`` for every provider into
``<out>/<case>_memory_vs_N_<device>.png``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mmfast.bench.cases import (
    BenchCase,
    CaseUnavailable,
    add_impl_argument,
    check_choices,
    checked_dtype,
    register_case,
)
from mmfast.bench.harness import BenchResult, Provider, grad_step
from mmfast.bench.report import csv_list, save_figure

__all__ = ["ContrastiveCase", "LossCase", "open_clip_loss_module", "plot_memory_vs_n", "selected"]

IMPLS = ("auto", "cpp", "reference", "triton", "cuda")


def selected(name: str, wanted: list[str] | None) -> bool:
    """Whether provider ``name`` passes the ``--providers`` filter (exact, or the part before ``[``)."""
    return not wanted or name in wanted or name.split("[", 1)[0] in wanted


_fallback_reason: str | None = None  # why ``import open_clip.loss`` failed, when loss.py was loaded alone


def open_clip_loss_module(standalone: bool = False) -> ModuleType:
    """open_clip's ``loss`` module: ``import open_clip.loss``, else its ``loss.py`` loaded on its own.

    The package's ``__init__`` imports its tokenizer and model zoo (ftfy, regex, timm, torchvision,
    huggingface_hub...), which a wheel installed with ``--no-deps`` on an offline GPU machine lacks;
    ``loss.py`` needs only torch. ``standalone=True`` skips the package import (it also costs seconds
    per process). Raises ``ImportError`` when open_clip is not installed at all.
    """
    global _fallback_reason
    if not standalone:
        try:
            return importlib.import_module("open_clip.loss")
        except Exception as exc:  # noqa: BLE001 - fall back to loss.py alone below
            _fallback_reason = f"{type(exc).__name__}: {exc}"
    name = "_mmfast_bench_open_clip_loss"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip (open_clip_torch) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location(name, path)
    if loss_spec is None or loss_spec.loader is None or not path.exists():
        raise ImportError(f"open_clip is installed but has no loss.py at {path}")
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _open_clip_has(attr: str) -> tuple[bool, str]:
    try:
        mod = open_clip_loss_module()
    except Exception as exc:  # noqa: BLE001 - any failure to import is "not available"
        return False, f"{type(exc).__name__}: {exc}"
    if not hasattr(mod, attr):
        return False, f"open_clip's loss module has no {attr!r}"
    return True, ""


def _mmfast_has(attr: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module("mmfast")
    except Exception as exc:  # noqa: BLE001
        return False, f"cannot import mmfast ({type(exc).__name__}: {exc})"
    if not hasattr(mod, attr):
        return False, f"mmfast {getattr(mod, '__version__', '')} has no attribute {attr!r}"
    return True, ""


class LossCase(BenchCase):
    """Shared by ``contrastive`` and ``siglip``: an open_clip loss module against its mmfast twin."""

    open_clip_attr = "ClipLoss"
    mmfast_attr = "ClipLoss"
    with_bias = False
    baseline = "open_clip"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """``--sizes``, ``--dim``, ``--dtype``, ``--impl``, ``--scale``, ``--no-plot``."""
        parser.add_argument(
            "--sizes", default=None, help="comma-separated batch sizes N (default: the device's shapes)"
        )
        parser.add_argument("--dim", type=int, default=512, help="feature dimension D (default 512)")
        parser.add_argument(
            "--dtype",
            default=None,
            help="comma-separated dtypes (default float32 on CPU, float32,bfloat16 on GPU)",
        )
        add_impl_argument(parser, IMPLS)
        parser.add_argument(
            "--scale",
            type=float,
            default=1 / 0.07,
            help="logit_scale value (already exponentiated, as open_clip passes it)",
        )
        parser.add_argument("--no-plot", action="store_true", help="do not write the memory-vs-N PNG")

    # ------------------------------------------------------------------------------------------ checks
    def check(self, opts: argparse.Namespace) -> list[str]:
        """Fail clearly if ``mmfast.<cls>`` is missing; note (and skip) open_clip when it is missing."""
        wanted = getattr(opts, "providers", None)
        notes: list[str] = []
        check_choices("--impl", opts.impl, IMPLS)
        if any(selected(f"mmfast[{i}]", wanted) for i in csv_list(str, opts.impl)):
            ok, why = _mmfast_has(self.mmfast_attr)
            if not ok:
                raise CaseUnavailable(
                    f"the {self.name!r} case compares mmfast.{self.mmfast_attr} with "
                    f"open_clip.loss.{self.open_clip_attr}, but mmfast.{self.mmfast_attr} is not available: "
                    f"{why}. Build/finish it first, or time the baseline alone with --providers open_clip."
                )
        if selected("open_clip", wanted):
            ok, why = _open_clip_has(self.open_clip_attr)
            if ok and _fallback_reason:
                notes.append(
                    f"note: the open_clip package does not import ({_fallback_reason}); "
                    "using its loss.py alone for the baseline."
                )
            if not ok:
                notes.append(
                    f"note: open_clip is not available ({why}): skipping the open_clip comparison, "
                    "no ratios will be reported."
                )
        return notes

    def _has_open_clip(self) -> bool:
        return _open_clip_has(self.open_clip_attr)[0]

    # ------------------------------------------------------------------------------------------ shapes
    def configs(self, device: str, quick: bool, opts: argparse.Namespace) -> list[dict[str, Any]]:
        """N x dtype grid for ``device`` (module docstring)."""
        gpu = torch.device(device).type == "cuda"
        if opts.sizes:
            sizes = csv_list(int, opts.sizes)
        elif gpu:
            sizes = [4096, 16384] if quick else [4096, 16384, 32768]
        else:
            sizes = [256, 512, 1024] if quick else [1024, 4096, 8192, 16384]
        if opts.dtype:
            dtypes = csv_list(str, opts.dtype)
        else:
            dtypes = ["float32", "bfloat16"] if gpu and not quick else ["float32"]
        for dt in dtypes:
            checked_dtype(dt)
        return [{"N": n, "D": opts.dim, "dtype": dt, "world_size": 1} for dt in dtypes for n in sizes]

    def shape(self, cfg: dict[str, Any]) -> str:
        """``N=4096 D=512 float32``."""
        return f"N={cfg['N']} D={cfg['D']} {cfg['dtype']}"

    # --------------------------------------------------------------------------------------- providers
    def inputs(self, cfg: dict[str, Any], device: str, scale: float) -> list[torch.Tensor | None]:
        """Fresh leaf inputs (same values for every provider): image, text, logit_scale, logit_bias."""
        g = torch.Generator().manual_seed(1234 + cfg["N"])
        dtype = getattr(torch, cfg["dtype"])
        n, d = cfg["N"], cfg["D"]
        img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
        img = img.to(device=device, dtype=dtype).requires_grad_()
        txt = txt.to(device=device, dtype=dtype).requires_grad_()
        s = torch.tensor(scale, device=device).requires_grad_()
        b = torch.tensor(-10.0, device=device).requires_grad_() if self.with_bias else None
        return [img, txt, s, b]

    def _setup(self, make_module: Any, cfg: dict[str, Any], device: str, scale: float) -> Any:
        def setup() -> Any:
            module = make_module()
            return grad_step(module, *self.inputs(cfg, device, scale))

        return setup

    def providers(self, cfg: dict[str, Any], device: str, opts: argparse.Namespace) -> list[Provider]:
        """``open_clip`` (when installed) and one ``mmfast[<impl>]`` per ``--impl``, filtered."""
        wanted = getattr(opts, "providers", None)
        out: list[Provider] = []
        if selected("open_clip", wanted) and self._has_open_clip():

            def make_open_clip() -> Any:
                return getattr(open_clip_loss_module(), self.open_clip_attr)()

            out.append(
                Provider(
                    "open_clip",
                    self._setup(make_open_clip, cfg, device, opts.scale),
                    f"open_clip.loss.{self.open_clip_attr}()",
                )
            )
        for impl in csv_list(str, opts.impl):
            name = f"mmfast[{impl}]"
            if not selected(name, wanted):
                continue

            def make_mmfast(impl: str = impl) -> Any:
                import mmfast

                cls = getattr(mmfast, self.mmfast_attr, None)
                if cls is None:
                    raise CaseUnavailable(f"mmfast.{self.mmfast_attr} is not available")
                return cls(impl=impl)

            out.append(
                Provider(
                    name,
                    self._setup(make_mmfast, cfg, device, opts.scale),
                    f"mmfast.{self.mmfast_attr}(impl={impl!r})",
                )
            )
        return out

    def finalize(self, results: list[BenchResult], out_dir: Path, opts: argparse.Namespace) -> list[Path]:
        """The memory-vs-N (and time-vs-N) PNG, unless ``--no-plot``."""
        if getattr(opts, "no_plot", False) or not results:
            return []
        device = torch.device(results[0].device).type
        path = Path(out_dir) / f"{self.name}_memory_vs_N_{device}.png"
        return [plot_memory_vs_n(results, path, title=f"{self.name} forward+backward ({device})")]


def plot_memory_vs_n(results: list[BenchResult], path: Path, title: str = "") -> Path:
    """Peak extra memory (MiB) and median time (ms) against N, one line per provider and dtype."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_mem, ax_t = fig.subplots(1, 2)
    series: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for r in results:
        key = f"{r.provider} {r.params.get('dtype', '')} D={r.params.get('D', '')}".strip()
        mem = r.peak_extra_bytes / 2**20 if r.peak_extra_bytes is not None else None
        t = r.timing.median_ms if r.timing is not None else None
        series.setdefault(key, []).append((int(r.params["N"]), mem, t))
    for key, pts in sorted(series.items()):
        pts.sort()
        m = [(n, v) for n, v, _ in pts if v is not None]
        t = [(n, v) for n, _, v in pts if v is not None]
        if m:
            ax_mem.plot([p[0] for p in m], [p[1] for p in m], marker="o", label=key)
        if t:
            ax_t.plot([p[0] for p in t], [p[1] for p in t], marker="o", label=key)
    for ax, ylabel in ((ax_mem, "peak extra memory (MiB)"), (ax_t, "median time (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (pairs per rank)")
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return save_figure(fig, path, title)


@register_case
class ContrastiveCase(LossCase):
    """open_clip ``ClipLoss`` vs ``mmfast.ClipLoss``, forward + backward, W=1."""

    name = "contrastive"
    description = "open_clip ClipLoss vs mmfast.ClipLoss, forward+backward (time, peak memory)"
    open_clip_attr = "ClipLoss"
    mmfast_attr = "ClipLoss"
    with_bias = False
