"""``window``: Swin (shifted-)window attention, timm against mmfast's fused kernel, in one process.

Three levels, each timed forward (``fwd``, under ``torch.no_grad``) and forward + backward
(``fwd+bwd``: ``torch.autograd.grad`` of the output against a fixed random gradient, with respect to
the input and every parameter, so nothing accumulates between calls); the outputs and gradients are
compared with the baseline's (``max|diff|``):

* ``block``: one timm ``SwinTransformerBlock`` (the shifted one: window 7, shift 3) on ``[B, H, W, C]``;
* ``attn``: the attention op alone, from a fused ``qkv`` map ``[B, H, W, 3, heads, head_dim]`` (and
  the relative position bias table) to the attention output ``[B, H, W, heads, head_dim]``: roll, pad,
  window partition, logits + bias + shift mask, softmax, ``@ v``, reverse. The qkv and output
  projections are not part of it, so the peak extra memory shows the ``[B * nW, heads, N, N]`` logits
  (and their softmax, and the dense mask of the SDPA path) against the fused kernel's O(q + k + v + out);
* ``model``: a whole ``swin_tiny_patch4_window7_224`` (random weights, eval mode: no drop path).

Providers (the baseline is ``timm-eager``):

* ``timm-eager``: timm's explicit path (``WindowAttention.fused_attn = False``: ``(q * scale) @ k^T
  + bias + mask``, softmax, ``@ v``). This is what timm runs by default for Swin: its SDPA path is
  "experimental" (``use_fused_attn(experimental=True)``, on only with ``TIMM_FUSED_ATTN=2``), so
  ``TIMM_FUSED_ATTN`` unset, 0 or 1 all give this path. The flag is set on the modules here, so the
  environment does not matter. At the ``attn`` level: the same steps written out in plain torch
  (timm's partition/reverse and mask on the qkv map), in the input dtype.
* ``timm-sdpa``: timm's SDPA path (``fused_attn = True``): ``F.scaled_dot_product_attention`` with a
  dense ``attn_mask`` = bias ``[1, heads, N, N]`` + shift mask expanded to ``[B * nW, heads, N, N]``
  (materialised, as timm does).
* ``mmfast[<impl>]`` for each ``--impl`` (default ``auto``: the C++ kernel on CPU, Triton on CUDA):
  blocks and models patched with :func:`mmfast.patch.timm.apply_window_attention` (run under
  ``mmfast.use_backend(impl)``); the ``attn`` level calls :func:`mmfast.functional.window_attention`
  on ``qkv.unbind(3)`` (strided views, read in place).
* ``flex`` (``attn`` level, CUDA; ``--flex`` adds it on CPU for ``fwd`` only, FlexAttention has no
  CPU backward): ``torch.compile`` of roll + pad + partition + ``flex_attention`` with a block mask
  for the windows (tokens in window-major order, ``q // N == k // N``) and a ``score_mod`` adding the
  bias ``table[rel_index][h, q % N, k % N]`` and the shift mask ``mask[q // N, q % N, k % N]``.
* ``flash-attn`` and ``mmfast[flash_attn]`` (``attn`` level, CUDA, only for configurations flash-attn
  can run: no bias, no shift, fp16/bf16, i.e. the ViTDet/DITO windows; only when the optional
  ``flash_attn`` package imports): ``flash-attn`` is what a user writes without mmfast (timm-style
  roll + pad + partition in plain torch, ``flash_attn.flash_attn_func`` on ``[B * nW, N, heads,
  head_dim]``, reverse + crop), :func:`flash_window_attention`; ``mmfast[flash_attn]`` is
  :func:`mmfast.functional.window_attention` with ``impl="flash_attn"`` (mmfast's one-copy partition
  and unpartition around the same call). On CPU, or without flash_attn, they are not offered (a note
  says why).

Shapes. CPU (float32): the Swin-T stage-1 block shape (56x56 map, dim 96, 3 heads) and stage 3
(14x14, dim 384, 12 heads), window 7, shift 3, batch 8, ``block`` and ``attn``, ``fwd`` and
``fwd+bwd``; the whole Swin-T at batch 2 (224x224), ``fwd`` and ``fwd+bwd``. CUDA (bfloat16,
``fwd+bwd``, ``attn`` level): the four Swin-B stages (56/28/14/7 maps, dim 128-1024, 4-32 heads,
window 7, shift 3, none on the 7x7 stage) at batch 128, and ViTDet / DITO windows on a 64x64 token
grid (ViT-B: 12 heads of 64, no bias, no shift mask: DITO shifts by rolling the whole grid) with
14x14 windows (padded to 70x70) and 16x16 windows, batch 16. ``--quick``: batch 1-2 and a subset
(< 60 s on 2 CPU cores). ``--shapes gpu`` runs the CUDA shape set on any device (with ``--quick``:
a smoke test of the GPU code paths on CPU).

After the run ``finalize`` writes ``<out>/window_<device>.png`` (time ratio vs timm-eager and peak
extra memory per configuration) and ``<out>/window_summary_<device>.md`` (the same as a table, with
the analytic sizes of the logits and of q + k + v + out); ``_quick`` is added to the names for
``--quick`` runs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmfast.bench.cases import (
    BenchCase,
    CaseUnavailable,
    add_impl_argument,
    check_choices,
    register_case,
    shape_set,
)
from mmfast.bench.cases.contrastive import selected
from mmfast.bench.cases.window_baselines import (
    flash_config,
    flash_unavailable_reason,
    flash_window_attention,
    flex_window_attention,
    timm_style_window_attention,
    window_buffers,
    window_geometry,
)
from mmfast.bench.harness import BenchResult, Provider, grad_step, mmfast_backend
from mmfast.bench.report import csv_list, save_figure, short_dtype, write_summary_and_figure

__all__ = ["WindowCase", "analytic_bytes", "flash_window_attention", "flex_window_attention",
           "timm_style_window_attention", "window_buffers"]

IMPLS = ("auto", "cpp", "reference", "triton", "cuda", "flash_attn")
LEVELS = ("block", "attn", "model")
PASSES = ("fwd", "fwd+bwd")

#: (map side, dim, heads) of the Swin-T / Swin-B stages at 224x224, window 7.
SWIN_T = {"s1": (56, 96, 3), "s2": (28, 192, 6), "s3": (14, 384, 12), "s4": (7, 768, 24)}
SWIN_B = {"s1": (56, 128, 4), "s2": (28, 256, 8), "s3": (14, 512, 16), "s4": (7, 1024, 32)}
#: windowed-ViT shapes (ViT-B on a 64x64 token grid, 1024 px / 16): window side.
VIT_WINDOWS = {"vitdet14": 14, "dito16": 16}
SWIN_MODEL = "swin_tiny_patch4_window7_224"


def _randn(shape: tuple[int, ...], seed: int, device: str, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    """Seeded normal tensor made on ``device`` (same values for every provider of a configuration)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * std).to(dtype)


def _has_timm() -> tuple[bool, str]:
    try:
        import timm.models.swin_transformer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import is "not available"
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ------------------------------------------------------------------------------------------------
# the case


def _shape_text(cfg: dict[str, Any]) -> str:
    dt = short_dtype(cfg["dtype"])
    if cfg["level"] == "model":
        return f"model {cfg['net']} B{cfg['B']} {cfg['img']}px {dt} {cfg['pass']}"
    shift = f"s{cfg['shift']}" if cfg["shift"] else "s0"
    bias = "" if cfg.get("bias", True) else " nobias"
    return (f"{cfg['level']} {cfg['net']}.{cfg['stage']} B{cfg['B']} {cfg['H']}x{cfg['W']} C{cfg['dim']} "
            f"h{cfg['heads']} w{cfg['window']} {shift}{bias} {dt} {cfg['pass']}")


def analytic_bytes(cfg: dict[str, Any]) -> dict[str, int] | None:
    """Sizes for the ``attn`` / ``block`` levels: the ``[B*nW, heads, N, N]`` logits and q + k + v + out."""
    if cfg["level"] == "model":
        return None
    elt = torch.empty(0, dtype=getattr(torch, cfg["dtype"])).element_size()
    window = (cfg["window"], cfg["window"])
    _, _, nw, n = window_geometry(cfg["H"], cfg["W"], window)
    logits = cfg["B"] * nw * cfg["heads"] * n * n * elt
    qkvo = 4 * cfg["B"] * cfg["H"] * cfg["W"] * cfg["dim"] * elt
    return {"logits_bytes": logits, "qkvo_bytes": qkvo}


@register_case
class WindowCase(BenchCase):
    """timm Swin window attention (eager, SDPA) vs mmfast's fused window attention."""

    name = "window"
    description = ("Swin shifted-window attention: timm eager / SDPA vs mmfast (block, op, Swin-T), "
                   "fwd and fwd+bwd (time, peak memory)")
    baseline = "timm-eager"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """``--shapes``, ``--levels``, ``--stages``, ``--passes``, ``--batch``, ``--model-batch``, ``--dtype``,
        ``--impl``, ``--flex``, ``--no-plot``."""
        parser.add_argument("--shapes", default="auto", choices=("auto", "cpu", "gpu"),
                            help="shape set: the CPU one (Swin-T blocks, ops, model) or the GPU one (Swin-B and "
                                 "ViTDet/DITO ops, bf16); auto: by device")
        parser.add_argument("--levels", default=None,
                            help=f"comma-separated levels out of {','.join(LEVELS)} (default: all on the CPU set, "
                                 "attn on the GPU set)")
        parser.add_argument("--stages", default=None,
                            help="comma-separated stages: s1..s4 (Swin-T on the CPU set, Swin-B on the GPU set), "
                                 f"{', '.join(VIT_WINDOWS)} (default s1,s3 on CPU; all on GPU)")
        parser.add_argument("--passes", default=None, help="comma-separated: fwd, fwd+bwd (default both on CPU)")
        parser.add_argument("--batch", type=int, default=None, help="batch of the block/attn shapes")
        parser.add_argument("--model-batch", type=int, default=None, help="batch of the whole Swin-T (default 2)")
        parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16")
        add_impl_argument(parser, IMPLS)
        parser.add_argument("--flex", action="store_true",
                            help="add the FlexAttention provider on CPU too (fwd only; it is on by default on CUDA)")
        parser.add_argument("--no-plot", action="store_true", help="do not write the PNG and the summary")

    # ------------------------------------------------------------------------------------------ checks
    def check(self, opts: argparse.Namespace) -> list[str]:
        """Fail clearly without mmfast's window attention or (for blocks and models) timm; note skipped parts."""
        notes: list[str] = []
        check_choices("--impl", opts.impl, IMPLS)
        try:
            from mmfast.functional import window_attention  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise CaseUnavailable(f"mmfast.functional.window_attention is not available: {exc}") from exc
        check_choices("--levels", opts.levels, LEVELS, "some of")
        check_choices("--passes", opts.passes, PASSES, "some of")
        levels = csv_list(str, opts.levels)
        ok, why = _has_timm()
        if not ok:
            if set(levels) - {"attn"}:
                raise CaseUnavailable(f"the block and model levels need timm ({why}); use --levels attn")
            notes.append(f"note: timm is not available ({why}): only the attention op level can run.")
        cuda = torch.cuda.is_available()
        if opts.shapes == "auto" and not cuda:
            notes.append("note: no CUDA device: the GPU shapes (bf16 fwd+bwd Swin-B stages at batch 128, ViTDet/DITO "
                         "14x14 and 16x16 windows, FlexAttention) are skipped; running the CPU set.")
        if (cuda or opts.flex) and not _has_flex():
            notes.append(f"note: torch {torch.__version__} has no FlexAttention: no flex provider.")
        why = flash_unavailable_reason()
        if why is not None:
            notes.append(f"note: no flash-attn / mmfast[flash_attn] providers: {why}.")
        elif not cuda:
            notes.append("note: no flash-attn / mmfast[flash_attn] providers: flash-attn runs on CUDA only.")
        else:
            notes.append("note: flash-attn and mmfast[flash_attn] providers on the no-bias, no-shift fp16/bf16 "
                         "attention configurations (the ViTDet/DITO windows).")
        return notes

    # ------------------------------------------------------------------------------------------ shapes
    def configs(self, device: str, quick: bool, opts: argparse.Namespace) -> list[dict[str, Any]]:
        """The CPU or GPU shape set (module docstring)."""
        gpu, dtype = shape_set(device, opts, "bfloat16")
        levels = csv_list(str, opts.levels) or (["attn"] if gpu else list(LEVELS))
        if not _has_timm()[0]:
            levels = [lv for lv in levels if lv == "attn"]
        passes = csv_list(str, opts.passes) or (["fwd+bwd"] if gpu else list(PASSES))
        cfgs: list[dict[str, Any]] = []
        if gpu:
            stages = csv_list(str, opts.stages) or (["s1", "vitdet14"] if quick else [*SWIN_B, *VIT_WINDOWS])
            batch = opts.batch or (8 if quick else 128)
            vit_batch = opts.batch or (2 if quick else 16)
            table = SWIN_B
        else:
            stages = csv_list(str, opts.stages) or ["s1", "s3"]
            batch = opts.batch or (1 if quick else 8)
            vit_batch = opts.batch or 1
            table = SWIN_T
        for st in stages:
            if st not in table and st not in VIT_WINDOWS:
                raise CaseUnavailable(f"--stages {st!r}: expected some of {', '.join([*table, *VIT_WINDOWS])}")
        for level in [lv for lv in LEVELS if lv in levels and lv != "model"]:
            for st in stages:
                if st in VIT_WINDOWS:
                    if level != "attn":
                        continue
                    cfg = {"level": level, "net": "vit-b", "stage": st, "B": vit_batch, "H": 64, "W": 64,
                           "dim": 768, "heads": 12, "window": VIT_WINDOWS[st], "shift": 0, "bias": False}
                else:
                    side, dim, heads = table[st]
                    from mmfast.reference.window_attention import effective_window

                    window, shift = effective_window((side, side), 7, 3)
                    cfg = {"level": level, "net": "swin-b" if gpu else "swin-t", "stage": st, "B": batch,
                           "H": side, "W": side, "dim": dim, "heads": heads, "window": window[0],
                           "shift": shift[0], "bias": True}
                for p in passes:
                    if quick and not gpu and (level, st, p) not in {("block", "s1", "fwd+bwd"),
                                                                    ("attn", "s1", "fwd"),
                                                                    ("attn", "s3", "fwd+bwd")}:
                        continue
                    cfgs.append({**cfg, "dtype": dtype, "pass": p})
        if "model" in levels and not gpu:
            mb = opts.model_batch or (1 if quick else 2)
            for p in (["fwd"] if quick else passes):
                cfgs.append({"level": "model", "net": SWIN_MODEL, "B": mb, "img": 224, "dtype": dtype, "pass": p})
        return cfgs

    def shape(self, cfg: dict[str, Any]) -> str:
        """``attn swin-t.s1 B8 56x56 C96 h3 w7 s3 fp32 fwd+bwd``."""
        return _shape_text(cfg)

    # --------------------------------------------------------------------------------------- providers
    def providers(self, cfg: dict[str, Any], device: str, opts: argparse.Namespace) -> list[Provider]:
        """``timm-eager`` (baseline), ``timm-sdpa``, one ``mmfast[<impl>]`` per ``--impl``, ``flex``, ``flash-attn``
        and ``mmfast[flash_attn]`` (where flash-attn runs); filtered by ``--providers``."""
        wanted = getattr(opts, "providers", None)
        level = cfg["level"]
        make = {"block": self._block_setup, "attn": self._attn_setup, "model": self._model_setup}[level]
        out: list[Provider] = []
        for name, desc in (("timm-eager", "timm WindowAttention, fused_attn=False (timm's default for Swin)"),
                           ("timm-sdpa", "timm WindowAttention, fused_attn=True (SDPA, dense bias+mask)")):
            if selected(name, wanted):
                out.append(Provider(name, make(cfg, device, name), desc))
        cuda = torch.device(device).type == "cuda"
        flash = cuda and flash_config(cfg) and flash_unavailable_reason() is None
        impls = csv_list(str, opts.impl)
        for impl in impls:
            name = f"mmfast[{impl}]"
            if impl == "flash_attn" and not flash:
                continue  # not a configuration (or device, or install) flash-attn runs: see check()'s notes
            if selected(name, wanted):
                out.append(Provider(name, make(cfg, device, name, impl), f"mmfast window attention, impl={impl!r}"))
        if (level == "attn" and selected("flex", wanted) and _has_flex()
                and (cuda or (opts.flex and cfg["pass"] == "fwd"))):
            out.append(Provider("flex", make(cfg, device, "flex"), "torch.compile(flex_attention), block mask"))
        if flash:
            if selected("flash-attn", wanted):
                out.append(Provider("flash-attn", make(cfg, device, "flash-attn"),
                                    "torch partition + flash_attn.flash_attn_func + reverse (no mmfast)"))
            if "flash_attn" not in impls and selected("mmfast[flash_attn]", wanted):
                out.append(Provider("mmfast[flash_attn]", make(cfg, device, "mmfast[flash_attn]", "flash_attn"),
                                    "mmfast window attention, impl='flash_attn'"))
        return out

    # -- one block
    def _block_setup(self, cfg: dict[str, Any], device: str, name: str, impl: str = "auto") -> Callable[[], Any]:
        def build() -> torch.nn.Module:
            from timm.models.swin_transformer import SwinTransformerBlock

            blk = SwinTransformerBlock(cfg["dim"], (cfg["H"], cfg["W"]), num_heads=cfg["heads"],
                                       window_size=7, shift_size=3)
            # a non-trivial bias table (timm's init is trunc_normal(std=.02))
            torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=0.5)
            return blk

        return _timm_setup(build, (cfg["B"], cfg["H"], cfg["W"], cfg["dim"]), 1, cfg, device, name, impl)

    # -- the whole model
    def _model_setup(self, cfg: dict[str, Any], device: str, name: str, impl: str = "auto") -> Callable[[], Any]:
        def build() -> torch.nn.Module:
            import timm

            return timm.create_model(cfg["net"], pretrained=False)

        return _timm_setup(build, (cfg["B"], 3, cfg["img"], cfg["img"]), 2, cfg, device, name, impl)

    # -- the attention op alone
    def _attn_setup(self, cfg: dict[str, Any], device: str, name: str, impl: str = "auto") -> Callable[[], Any]:
        def setup() -> Callable[[], Any]:
            import mmfast.functional as MF

            dtype = getattr(torch, cfg["dtype"])
            heads, hd = cfg["heads"], cfg["dim"] // cfg["heads"]
            window, shift = (cfg["window"], cfg["window"]), (cfg["shift"], cfg["shift"])
            hw = (cfg["H"], cfg["W"])
            scale = hd**-0.5
            qkv = _randn((cfg["B"], cfg["H"], cfg["W"], 3, heads, hd), 3, device, dtype)
            table = None
            if cfg.get("bias", True):
                table = _randn(((2 * window[0] - 1) * (2 * window[1] - 1), heads), 4, device, dtype, std=0.5)
            if name in ("timm-eager", "timm-sdpa"):
                sdpa = name == "timm-sdpa"
                buffers = window_buffers(hw, window, shift, dtype, device)

                def fn(qkv: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
                    return timm_style_window_attention(qkv, table, window, shift, scale, sdpa=sdpa, buffers=buffers)
            elif name == "flex":
                fn = flex_window_attention(hw, heads, window, shift, scale, table is not None, device)
            elif name == "flash-attn":

                def fn(qkv: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
                    return flash_window_attention(qkv, window, shift, scale)
            else:

                def fn(qkv: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
                    q, k, v = qkv.unbind(3)
                    return MF.window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias=table,
                                               scale=scale, impl=impl)

            if cfg["pass"] == "fwd":

                def run_fwd() -> torch.Tensor:
                    with torch.no_grad():
                        return fn(qkv, table)

                return run_fwd
            for t in (qkv, table):
                if t is not None:
                    t.requires_grad_()
            gout = _randn((cfg["B"], cfg["H"], cfg["W"], heads, hd), 5, device, dtype)
            return grad_step(fn, qkv, table, grad_output=gout)

        return setup

    # ------------------------------------------------------------------------------------------ outputs
    def finalize(self, results: list[BenchResult], out_dir: Path, opts: argparse.Namespace) -> list[Path]:
        """The PNG (ratio and peak memory per configuration) and the markdown summary, unless ``--no-plot``."""
        return write_summary_and_figure(self.name, results, out_dir, opts, summary_markdown,
                                        "window attention on {device}", plot_ratio_memory,
                                        "window attention vs timm-eager ({device})")


def _timm_setup(build: Callable[[], torch.nn.Module], x_shape: tuple[int, ...], x_seed: int, cfg: dict[str, Any],
                device: str, name: str, impl: str) -> Callable[[], Any]:
    """The setup of a timm block or model provider: ``build()`` under seed 0, moved to ``device`` and
    ``cfg["dtype"]`` in eval mode, then patched with mmfast's window attention (``mmfast...``
    providers) or given timm's eager / SDPA path (``fused_attn``); the input is ``_randn(x_shape,
    x_seed)``; the timed callable is :func:`_runner`'s."""

    def setup() -> Callable[[], Any]:
        from timm.models.swin_transformer import WindowAttention

        from mmfast.patch.timm import apply_window_attention

        dtype = getattr(torch, cfg["dtype"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = build()
        module = module.to(device=device, dtype=dtype).eval()
        if name.startswith("mmfast"):
            apply_window_attention(module)
        else:
            for m in module.modules():
                if isinstance(m, WindowAttention):
                    m.fused_attn = name == "timm-sdpa"
        x = _randn(x_shape, x_seed, device, dtype)
        return _runner(module, x, cfg["pass"], impl, device)

    return setup


def _runner(module: torch.nn.Module, x: torch.Tensor, pass_: str, impl: str, device: str) -> Callable[[], Any]:
    """The timed callable of a block or model: forward under no_grad, or forward + ``autograd.grad``."""
    if pass_ == "fwd":

        def run_fwd() -> torch.Tensor:
            with torch.no_grad(), mmfast_backend(impl):
                return module(x)

        return run_fwd
    x.requires_grad_()
    leaves = [x, *module.parameters()]
    with torch.no_grad(), mmfast_backend(impl):
        shape = module(x).shape
    gout = _randn(tuple(shape), 6, device, x.dtype)

    def run_fwd_bwd() -> tuple[torch.Tensor, ...]:
        with mmfast_backend(impl):
            out = module(x)
            grads = torch.autograd.grad(out, leaves, gout)
        return (out.detach(), *grads)

    return run_fwd_bwd


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def summary_markdown(results: list[BenchResult], title: str) -> str:
    """One markdown table: configuration, provider, median ms, ratio vs baseline, peak extra MiB, max|diff|."""
    lines = [f"# {title}", "", "ratio = baseline median / provider median (above 1: faster than the baseline); "
             "ratio (min) = the same with the fastest sample of each (less sensitive to other jobs on a shared "
             "machine); peak+ = peak extra memory of one call (MiB); logits = the [B*nW, heads, N, N] attention "
             "logits of one call; q+k+v+out = the four [B, H, W, C] maps.", "",
             "| configuration | provider | median ms | IQR ms | min ms | ratio | ratio (min) | peak+ MiB | "
             "max abs diff | logits MiB | q+k+v+out MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base_min = {r.shape: r.timing.min_ms for r in results if r.provider == r.baseline and r.timing is not None}
    for r in results:
        t = r.timing
        sizes = analytic_bytes(r.params) or {}
        rmin = base_min[r.shape] / t.min_ms if t is not None and r.shape in base_min and t.min_ms > 0 else None
        lines.append(
            f"| {r.shape} | {r.provider}{' (base)' if r.provider == r.baseline else ''} | "
            f"{'-' if t is None else f'{t.median_ms:.2f}'} | {'-' if t is None else f'{t.iqr_ms:.2f}'} | "
            f"{'-' if t is None else f'{t.min_ms:.2f}'} | "
            f"{'-' if r.ratio is None else f'{r.ratio:.2f}'} | {'-' if rmin is None else f'{rmin:.2f}'} | "
            f"{_mb(r.peak_extra_bytes)} | "
            f"{'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.1e}'} | {_mb(sizes.get('logits_bytes'))} | "
            f"{_mb(sizes.get('qkvo_bytes'))} |" + (f" error: {r.error[:80]}" if r.error else ""))
    return "\n".join(lines) + "\n"


def plot_ratio_memory(results: list[BenchResult], path: Path, title: str = "") -> Path:
    """Grouped bars per configuration: time ratio vs the baseline (left) and peak extra memory (right, log)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shapes = list(dict.fromkeys(r.shape for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    by = {(r.shape, r.provider): r for r in results}
    fig = Figure(figsize=(max(9.0, 1.1 * len(shapes) + 4), 8.5))
    FigureCanvasAgg(fig)
    ax_r, ax_m = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(1, len(providers))
    for i, prov in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
        ratio = [by[(s, prov)].ratio if (s, prov) in by and by[(s, prov)].ratio else math.nan for s in shapes]
        mem = [by[(s, prov)].peak_extra_bytes / 2**20 if (s, prov) in by and by[(s, prov)].peak_extra_bytes
               else math.nan for s in shapes]
        ax_r.bar(xs, ratio, width, label=prov)
        ax_m.bar(xs, mem, width, label=prov)
    ax_r.axhline(1.0, color="k", lw=0.8)
    ax_r.set_ylabel("x vs baseline (time, >1 faster)")
    ax_m.set_ylabel("peak extra memory (MiB)")
    ax_m.set_yscale("log")
    ax_m.set_xticks(range(len(shapes)))
    ax_m.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
    for ax in (ax_r, ax_m):
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)
