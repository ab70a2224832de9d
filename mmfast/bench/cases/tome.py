"""``tome``: ToMe token merging on a timm ViT: unmerged vs reference ToMe vs mmfast's kernels.

Three kinds of configuration (``--parts``); ``model`` and ``merge`` run under ``torch.inference_mode()``:

``part=model``: the whole timm ViT (random weights, eval), images/s. Providers:

* ``timm``: the unmerged model, timm's default attention (``F.scaled_dot_product_attention``);
* ``tome-ref`` (the baseline): a reference-style ToMe, i.e. ``mmfast.tome.apply_patch(model, r)`` with
  every ``Attention.fused_attn = False`` (explicit ``(q * scale) @ k^T + log(size)``, softmax, ``@ v``)
  and run under ``mmfast.use_backend("reference")``, so the matching is
  :func:`mmfast.reference.tome.matching_indices` and the merge :func:`mmfast.reference.tome.merge_wavg`
  (gathers + ``scatter_reduce``);
* ``mmfast[<impl>]``: ``apply_patch(model, r)`` as shipped: the fused matching and merge kernels
  (``impl=auto``: C++ on CPU, Triton on CUDA); for attention, the C++ proportional-attention kernel
  on CPU (inference) or SDPA with the additive ``log(size)`` mask on CUDA; on CPU fp32 inference the
  merging blocks' linears with oneDNN's fused bias/GELU epilogue (:mod:`mmfast.ops.linear`);
* ``mmfast[<impl>]+eager``: the fused matching/merge kernels with the explicit attention and the
  plain ``F.linear`` of ``tome-ref`` (attention kernel and fused linears forced off): everything but
  the matching/merge backend is the same as the baseline, so its ``max|diff|`` checks that those
  kernels reproduce the reference, and the gap to ``mmfast[<impl>]`` is what the attention kernel
  and the fused linears add;
* ``timm+fused-linear`` (CPU): the unmerged model with every block's linears through the same
  oneDNN fused linears: the control that separates what merging gives from what the linears give
  (``x`` it / ``mmfast[auto]`` is the speed-up of merging alone with equal GEMMs);
* ``tome-ref+compile`` and ``mmfast[<impl>]+compile`` (``--no-compile`` drops them): ``torch.compile``
  of the ``tome-ref`` model and of the ``mmfast[<impl>]`` one (compiled on the warm-up call, under the
  same backend context as every timed call), so a plain-torch ToMe gets Inductor's fusions too. The
  summary gives the faster of mmfast eager and compiled against the faster of ``tome-ref`` eager and
  compiled. On CUDA at batch <= 8, ``mmfast[<impl>]+cudagraph``: ``torch.compile(mode="reduce-overhead")``,
  the forward captured and replayed as a CUDA graph (launch overhead is where ToMe loses at small batch).

``part=train``: one training step's compute on the whole model (train mode): forward, then
``torch.autograd.grad`` of the summed logits with respect to every parameter. Providers ``timm``
(unmerged), ``tome-ref`` (as above, its reference ops) and ``mmfast[<impl>]``; each returns the logits
and the patch embedding's weight gradient (the output check against ``tome-ref``).

Every provider returns the logits; ``max|diff|`` is against ``tome-ref``; the ``timm`` row's ratio is
``tome-ref``'s time over the unmerged time (so ``1 / ratio`` is reference ToMe's speed-up); the summary
file gives images/s and the ratios against the unmerged model as well.

``part=merge``: the matching + merge share of a block, at the per-layer shapes of the merged model
(the inputs of layer ``L`` are captured from one forward of the mmfast-patched model). Providers:
``tome-ref`` / ``mmfast[<impl>]``: ``mmfast.tome.merge_tokens(x, metric, r, size)`` alone (bipartite
matching + size-weighted merge, what the block calls after its attention residual) with the reference
backend / the fused kernels; ``tome-ref:block`` / ``mmfast[<impl>]:block``: the whole ToMe block
(``tome_forward``: attention, residual, match + merge, MLP) of the same provider. The summary gives
the share ``merge / block`` per layer, and summed over the layers run.

How ``tome-ref`` compares with the original ToMe code (facebookresearch/ToMe, ``tome/patch/timm.py``
and ``tome/merge.py``): the same algorithm and the same tensors. ToMe's ``ToMeAttention`` computes
``(q @ k^T) * scale`` (mmfast/timm: ``(q * scale) @ k^T``: the same up to rounding), adds
``size.log()[:, None, None, :, 0]``, softmaxes explicitly and returns ``k.mean(1)`` as the metric (here
after ``k_norm``, an identity for these models); its ``bipartite_soft_matching`` normalises the
metric, splits tokens alternately, masks the class token's row, takes ``scores.max(-1)`` and orders
the edges with ``node_max.argsort(descending=True)``, which is not a stable sort: exactly tied scores
may be ordered differently than mmfast's reference (stable: lower index first, the rule the kernels
implement); ``merge_wavg`` is the same ``merge(x * size, "sum") / merge(size, "sum")`` with
``scatter_reduce(include_self=True)``. ToMe's ``ToMeBlock`` skips timm 1.0's ``ls1``/``ls2``
LayerScale (identities for these models) and keeps its per-forward state in a shared
``_tome_info`` dict; mmfast threads a ``ToMeState`` instead. With one class token and no distillation
token (ViT-B/16, ViT-L/14 CLIP) the merges are the same; the original package is not installed here,
so this is a reading of its code, not a measurement.

Shapes. CPU (float32): ``vit_base_patch16_224``, batch 8, ``r = 16`` (197 tokens -> 11 after 12
layers), the training step at batch 4 (``--train-batch``); the merge share at all 12 layers. CUDA
(float16): ``vit_base_patch16_224`` (``r = 16``) and ``vit_large_patch14_clip_224`` (``r = 8``, 257
tokens, 24 layers) at batch 256, 8 and 1, the training step at the same batches; the merge share of ViT-B at
batch 256, layers 1, 6 and 12. ``--quick``: ViT-B at batch 1 (training step: 1), merge share at layer
1 only. ``--shapes gpu`` runs the CUDA set on any device.

``finalize`` writes ``<out>/tome_<device>.png`` (images/s of the model configurations, merge share per
layer) and ``<out>/tome_summary_<device>.md`` (``_quick`` added for ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
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
from mmfast.bench.cases.tome_report import plot_tome, summary_markdown
from mmfast.bench.harness import BenchResult, Provider, mmfast_backend
from mmfast.bench.report import csv_list, short_dtype, write_summary_and_figure

__all__ = ["ToMeCase", "layer_shapes", "summary_markdown"]

IMPLS = ("auto", "cpp", "reference", "triton", "cuda")
#: default r per model
DEFAULT_R = {"vit_base_patch16_224": 16, "vit_large_patch14_clip_224": 8}
#: short names in the table
MODEL_LABELS = {"vit_base_patch16_224": "ViT-B/16", "vit_large_patch14_clip_224": "ViT-L/14",
                "vit_tiny_patch16_224": "ViT-Ti/16"}


def _want(name: str, family: str, wanted: list[str] | None) -> bool:
    """``--providers`` filter: the exact name, its family (timm, tome-ref, mmfast) or its part before '['."""
    return not wanted or name in wanted or family in wanted or name.split("[", 1)[0] in wanted


@contextlib.contextmanager
def _attention_reference() -> Iterator[None]:
    import mmfast

    with mmfast.use_backend("reference", ops=["tome_attention", "fused_linear"]):
        yield


class _FusedLinear(torch.nn.Module):
    """Control provider: an unmerged block's linear as the merging blocks run it (oneDNN epilogue)."""

    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mmfast.patch.tome_core import linear

        return linear(x, self.inner)


class _FusedMlp(torch.nn.Module):
    """Control provider: an unmerged block's MLP as the ToMe blocks run it (fc1 + GELU fused)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mmfast.patch.tome_timm import fused_mlp

        return fused_mlp(self.inner, x)


def layer_shapes(num_tokens: int, depth: int, r: int, num_prefix_tokens: int = 1) -> list[tuple[int, int]]:
    """``(tokens in, effective r)`` of every layer of a ToMe model with a constant ``r``."""
    from mmfast.tome import num_mergeable

    out = []
    n = num_tokens
    for _ in range(depth):
        r_eff = num_mergeable(n, r, num_prefix_tokens)
        out.append((n, r_eff))
        n -= r_eff
    return out


def _shape_text(cfg: dict[str, Any]) -> str:
    dt = short_dtype(cfg["dtype"])
    model = MODEL_LABELS.get(cfg["model"], cfg["model"])
    if cfg["part"] in ("model", "train"):
        return f"{cfg['part']} {model} B{cfg['B']} r{cfg['r']} {dt}"
    return f"match+merge {model} L{cfg['layer']} B{cfg['B']} N{cfg['N']} r{cfg['r_eff']} {dt}"


@register_case
class ToMeCase(BenchCase):
    """Unmerged timm ViT vs reference-style ToMe vs ``mmfast.tome.apply_patch`` (fused kernels)."""

    name = "tome"
    description = ("ToMe on a timm ViT, inference: unmerged vs reference ToMe vs mmfast kernels "
                   "(images/s, output check, match+merge share)")
    baseline = "tome-ref"

    def __init__(self) -> None:
        self._cache_key: tuple[Any, ...] | None = None
        self._cache: dict[str, Any] = {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """``--shapes``, ``--models``, ``--batch``, ``--r``, ``--parts``, ``--layers``, ``--dtype``, ``--impl``,
        ``--no-eager-check``, ``--no-plot``."""
        parser.add_argument("--shapes", default="auto", choices=("auto", "cpu", "gpu"),
                            help="shape set: CPU (ViT-B fp32 batch 8) or GPU (ViT-B/16 and ViT-L/14 fp16, batch 256, "
                                 "8, 1); auto: by device")
        parser.add_argument("--models", default=None, help="comma-separated timm model names")
        parser.add_argument("--batch", default=None, help="comma-separated batch sizes")
        parser.add_argument("--r", type=int, default=None, help=f"tokens merged per layer (default {DEFAULT_R})")
        parser.add_argument("--parts", default="model,train,merge",
                            help="model (inference images/s), train (a training step), merge (match+merge share)")
        parser.add_argument("--train-batch", default=None,
                            help="comma-separated batch sizes of the training step (default: CPU 4, GPU 256, 8, 1)")
        parser.add_argument("--no-compile", action="store_true",
                            help="skip the torch.compile providers (tome-ref+compile, mmfast[<impl>]+compile)")
        parser.add_argument("--layers", default=None, help="comma-separated 1-based layers of the merge share")
        parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (GPU default), bfloat16")
        add_impl_argument(parser, IMPLS)
        parser.add_argument("--no-eager-check", action="store_true",
                            help="skip the mmfast[<impl>]+eager provider (kernels with the reference's attention)")
        parser.add_argument("--no-plot", action="store_true", help="do not write the PNG and the summary")

    # ------------------------------------------------------------------------------------------ checks
    def check(self, opts: argparse.Namespace) -> list[str]:
        """Fail clearly without timm or mmfast.tome; note the skipped GPU shapes."""
        check_choices("--impl", opts.impl, IMPLS)
        for part in csv_list(str, opts.parts):
            if part not in ("model", "train", "merge"):
                raise CaseUnavailable(f"--parts {part!r}: expected model, train and/or merge")
        try:
            import timm.models.vision_transformer  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise CaseUnavailable(f"the tome case patches timm ViTs, and timm does not import: {exc}") from exc
        try:
            from mmfast.tome import apply_patch  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise CaseUnavailable(f"mmfast.tome is not available: {exc}") from exc
        notes = []
        if opts.shapes == "auto" and not torch.cuda.is_available():
            notes.append("note: no CUDA device: the GPU variants (fp16 ViT-B/16 and ViT-L/14 at batch 256, 8, 1) are "
                         "skipped; running the CPU set.")
        return notes

    # ------------------------------------------------------------------------------------------ shapes
    def configs(self, device: str, quick: bool, opts: argparse.Namespace) -> list[dict[str, Any]]:
        """Model and merge-share configurations of the CPU or GPU set (module docstring)."""
        gpu, dtype = shape_set(device, opts, "float16")
        parts = csv_list(str, opts.parts)
        if gpu:
            models = csv_list(str, opts.models) or (["vit_base_patch16_224"] if quick else
                                                ["vit_base_patch16_224", "vit_large_patch14_clip_224"])
            batches = csv_list(int, opts.batch) or ([64, 1] if quick else [256, 8, 1])
        else:
            models = csv_list(str, opts.models) or ["vit_base_patch16_224"]
            batches = csv_list(int, opts.batch) or ([1] if quick else [8])
        cfgs: list[dict[str, Any]] = []
        if "model" in parts:
            for m in models:
                r = opts.r if opts.r is not None else DEFAULT_R.get(m, 16)
                for b in batches:
                    cfgs.append({"part": "model", "model": m, "B": b, "r": r, "dtype": dtype})
        if "train" in parts:
            train_batches = csv_list(int, opts.train_batch) or ([1] if quick else [256, 8, 1] if gpu else [4])
            for m in models:
                r = opts.r if opts.r is not None else DEFAULT_R.get(m, 16)
                for b in train_batches:
                    cfgs.append({"part": "train", "model": m, "B": b, "r": r, "dtype": dtype})
        if "merge" in parts:
            m = models[0]
            b = batches[0]
            r = opts.r if opts.r is not None else DEFAULT_R.get(m, 16)
            depth, tokens = _depth_tokens(m)
            shapes = layer_shapes(tokens, depth, r)
            if opts.layers:
                layers = csv_list(int, opts.layers)
            elif quick:
                layers = [1]
            elif gpu:
                layers = sorted({1, (depth + 1) // 2, depth})
            else:
                layers = list(range(1, depth + 1))
            for layer in layers:
                if not 1 <= layer <= depth:
                    raise CaseUnavailable(f"--layers {layer}: {m} has layers 1..{depth}")
                n, r_eff = shapes[layer - 1]
                if r_eff == 0:
                    continue
                cfgs.append({"part": "merge", "model": m, "B": b, "r": r, "layer": layer, "N": n, "r_eff": r_eff,
                             "dtype": dtype})
        return cfgs

    def shape(self, cfg: dict[str, Any]) -> str:
        """``model ViT-B/16 B8 r16 fp32`` / ``match+merge ViT-B/16 L1 B8 N197 r16 fp32``."""
        return _shape_text(cfg)

    # --------------------------------------------------------------------------------------- providers
    def providers(self, cfg: dict[str, Any], device: str, opts: argparse.Namespace) -> list[Provider]:
        """Model part: ``timm``, ``tome-ref`` (baseline), ``mmfast[<impl>]``, ``mmfast[<impl>]+eager``.
        Merge part: ``tome-ref`` (baseline), ``mmfast[<impl>]`` (match + merge alone), and ``...:block``."""
        wanted = getattr(opts, "providers", None)
        impls = csv_list(str, opts.impl)
        out: list[Provider] = []
        if cfg["part"] == "model":
            if _want("timm", "timm", wanted):
                out.append(Provider("timm", self._model_setup(cfg, device, "timm"), "unmerged timm ViT (SDPA)"))
            if (torch.device(device).type == "cpu" and cfg["dtype"] == "float32"
                    and _want("timm+fused-linear", "timm", wanted)):
                out.append(Provider("timm+fused-linear", self._model_setup(cfg, device, "timm-fused-linear"),
                                    "unmerged timm ViT with the oneDNN fused linears of the ToMe blocks (control)"))
            if _want("tome-ref", "tome-ref", wanted):
                out.append(Provider("tome-ref", self._model_setup(cfg, device, "ref"),
                                    "apply_patch + explicit softmax + use_backend('reference')"))
            if not opts.no_compile and _want("tome-ref+compile", "tome-ref", wanted):
                out.append(Provider("tome-ref+compile", self._model_setup(cfg, device, "ref", compiled=True),
                                    "torch.compile of the plain-torch ToMe model (explicit softmax, reference ops)"))
            for impl in impls:
                name = f"mmfast[{impl}]"
                if _want(name, "mmfast", wanted):
                    out.append(Provider(name, self._model_setup(cfg, device, "fused", impl),
                                        f"apply_patch (SDPA + log(size) mask), kernels impl={impl!r}"))
                if not opts.no_eager_check and _want(name + "+eager", "mmfast", wanted):
                    out.append(Provider(name + "+eager", self._model_setup(cfg, device, "fused-eager", impl),
                                        f"apply_patch with explicit softmax, kernels impl={impl!r}"))
                if not opts.no_compile and _want(name + "+compile", "mmfast", wanted):
                    out.append(Provider(name + "+compile", self._model_setup(cfg, device, "fused", impl, compiled=True),
                                        f"torch.compile of the apply_patch model, kernels impl={impl!r}"))
                if (not opts.no_compile and torch.device(device).type == "cuda" and cfg["B"] <= 8
                        and _want(name + "+cudagraph", "mmfast", wanted)):
                    # small batches lose to launch overhead: the whole forward replayed as one CUDA graph
                    out.append(Provider(name + "+cudagraph",
                                        self._model_setup(cfg, device, "fused", impl, compiled="reduce-overhead"),
                                        f"torch.compile(mode='reduce-overhead') of apply_patch, impl={impl!r}"))
            return out
        if cfg["part"] == "train":
            for name, family, kind, impl, desc in (
                    ("timm", "timm", "timm", "auto", "unmerged timm ViT (SDPA), forward + backward"),
                    ("tome-ref", "tome-ref", "ref", "reference", "plain-torch ToMe, forward + backward"),
                    *((f"mmfast[{i}]", "mmfast", "fused", i, f"apply_patch, kernels impl={i!r}, forward + backward")
                      for i in impls)):
                if _want(name, family, wanted):
                    out.append(Provider(name, self._train_setup(cfg, device, kind, impl), desc))
            return out
        # match + merge alone, then the whole block: tome-ref, then one mmfast[<impl>] per --impl
        for block, suffix, ref_desc, mm_desc in (
                (False, "", "merge_tokens under use_backend('reference')", "merge_tokens, kernels impl={!r}"),
                (True, ":block", "one ToMe block, explicit softmax, reference match+merge",
                 "one ToMe block, SDPA, kernels impl={!r}")):
            if _want("tome-ref" + suffix, "tome-ref", wanted):
                out.append(Provider("tome-ref" + suffix, self._merge_setup(cfg, device, "reference", block=block),
                                    ref_desc))
            for impl in impls:
                name = f"mmfast[{impl}]{suffix}"
                if _want(name, "mmfast", wanted):
                    out.append(Provider(name, self._merge_setup(cfg, device, impl, block=block),
                                        mm_desc.format(impl)))
        return out

    # -- shared, cached per (model, batch, r, dtype, device): the base model and the captured layer inputs
    def _cached(self, cfg: dict[str, Any], device: str) -> dict[str, Any]:
        key = (cfg["model"], cfg["B"], cfg["r"], cfg["dtype"], str(device))
        if key != self._cache_key:
            self._cache.clear()
            self._cache_key = key
        return self._cache

    def _base_model(self, cfg: dict[str, Any], device: str) -> torch.nn.Module:
        cache = self._cached(cfg, device)
        if "model" not in cache:
            import timm

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(cfg["model"], pretrained=False)
            cache["model"] = model.to(device=device, dtype=getattr(torch, cfg["dtype"])).eval()
            g = torch.Generator().manual_seed(1)
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))
            cache["images"] = torch.randn((cfg["B"], *size), generator=g).to(device=device,
                                                                                dtype=getattr(torch, cfg["dtype"]))
        return cache["model"]

    def _patched(self, cfg: dict[str, Any], device: str, kind: str) -> torch.nn.Module:
        """A fresh copy of the base model: ``timm`` (unmerged), ``ref`` / ``fused-eager`` (explicit softmax
        attention) or ``fused`` (timm's fused attention), ToMe-patched with ``r`` except ``timm``."""
        from mmfast.tome import apply_patch

        model = copy.deepcopy(self._base_model(cfg, device))
        if kind == "timm":
            return model
        if kind == "timm-fused-linear":
            for blk in model.blocks:
                blk.attn.qkv, blk.attn.proj = _FusedLinear(blk.attn.qkv), _FusedLinear(blk.attn.proj)
                blk.mlp = _FusedMlp(blk.mlp)
            return model
        apply_patch(model, r=cfg["r"])
        for blk in model.blocks:
            blk.attn.fused_attn = kind == "fused"
        return model

    def _model_setup(self, cfg: dict[str, Any], device: str, kind: str, impl: str = "auto",
                     compiled: bool | str = False) -> Callable[[], Any]:
        """``compiled``: False, True (``torch.compile``) or a ``torch.compile`` mode."""

        def setup() -> Callable[[], Any]:
            model = self._patched(cfg, device, kind)
            if compiled:  # compiled on the warm-up call, under the same backend context as every call
                torch._dynamo.reset()
                model = torch.compile(model, mode=compiled if isinstance(compiled, str) else None)
            x = self._cache["images"]
            backend = "reference" if kind == "ref" else impl
            # "+eager": explicit attention, i.e. the CPU attention kernel forced to its reference (the
            # other ops stay on auto, which is the C++ backend on CPU)
            make_ctx = functools.partial(mmfast_backend, backend)
            if kind == "fused-eager" and torch.device(device).type == "cpu" and impl in ("auto", "cpp"):
                make_ctx = _attention_reference

            def run() -> torch.Tensor:
                with torch.inference_mode(), make_ctx():
                    out = model(x)
                # a CUDA graph's output is overwritten by its next replay
                return out.clone() if isinstance(compiled, str) else out

            return run

        return setup

    def _train_setup(self, cfg: dict[str, Any], device: str, kind: str, impl: str) -> Callable[[], Any]:
        """One training step's compute: forward in train mode, then the gradient of the summed logits
        with respect to every parameter (``torch.autograd.grad``: nothing accumulates between calls).
        Returns the logits and the patch embedding's weight gradient (the output check)."""

        def setup() -> Callable[[], Any]:
            model = self._patched(cfg, device, kind).train()
            params = list(model.parameters())
            at = next(i for i, p in enumerate(params) if p is model.patch_embed.proj.weight)
            x = self._cache["images"]

            def run() -> tuple[torch.Tensor, torch.Tensor]:
                with mmfast_backend(impl):
                    out = model(x)
                    grads = torch.autograd.grad(out.float().sum(), params)
                return out.detach(), grads[at]

            return run

        return setup

    def _layer_inputs(self, cfg: dict[str, Any], device: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(x, size)`` entering every block, from one forward of the mmfast-patched model."""
        cache = self._cached(cfg, device)
        if "inputs" not in cache:
            model = self._patched(cfg, device, "fused")
            captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []

            def hook(module, args, kwargs):
                state = kwargs.get("tome_state")
                size = None if state is None or state.size is None else state.size.clone()
                captured.append((args[0].clone(), size))

            handles = [blk.register_forward_pre_hook(hook, with_kwargs=True) for blk in model.blocks]
            with torch.inference_mode():
                model(cache["images"])
            for h in handles:
                h.remove()
            cache["inputs"] = captured
            cache["blocks"] = {"fused": model}
        return cache["inputs"]

    def _block(self, cfg: dict[str, Any], device: str, kind: str) -> torch.nn.Module:
        self._layer_inputs(cfg, device)
        blocks = self._cache["blocks"]
        if kind not in blocks:
            blocks[kind] = self._patched(cfg, device, kind)
        return blocks[kind].blocks[cfg["layer"] - 1]

    def _merge_setup(self, cfg: dict[str, Any], device: str, impl: str, block: bool) -> Callable[[], Any]:
        def setup() -> Callable[[], Any]:
            from mmfast.patch.tome_timm import tome_attention
            from mmfast.tome import merge_tokens

            inputs = self._layer_inputs(cfg, device)
            x, size = inputs[cfg["layer"] - 1]
            if x.shape[1] != cfg["N"]:
                raise RuntimeError(f"layer {cfg['layer']} sees {x.shape[1]} tokens, expected {cfg['N']}")
            blk = self._block(cfg, device, "ref" if impl == "reference" else "fused")
            if block:

                def run_block() -> torch.Tensor:
                    with torch.inference_mode(), mmfast_backend(impl):
                        return blk.tome_forward(x, size, None, 1, True, False)[0]

                return run_block
            with torch.inference_mode():
                y, metric = tome_attention(blk.attn, blk.norm1(x), size, True)
                x_mid = x + blk.ls1(y)
            r = cfg["r"]

            def run_merge() -> tuple[torch.Tensor, torch.Tensor | None]:
                with torch.inference_mode(), mmfast_backend(impl):
                    merged, new_size, _ = merge_tokens(x_mid, metric, r, size, None, 1, False)
                return merged, new_size

            return run_merge

        return setup

    # ------------------------------------------------------------------------------------------ outputs
    def finalize(self, results: list[BenchResult], out_dir: Path, opts: argparse.Namespace) -> list[Path]:
        """The PNG and the markdown summary, unless ``--no-plot``."""
        return write_summary_and_figure(self.name, results, out_dir, opts, summary_markdown, "ToMe on {device}",
                                        plot_tome, "ToMe inference ({device})")


def _depth_tokens(model_name: str) -> tuple[int, int]:
    """(depth, tokens incl. the class token) of a timm ViT name, without building it."""
    import timm

    with torch.device("meta"):
        m = timm.create_model(model_name, pretrained=False)
    return len(m.blocks), m.patch_embed.num_patches + m.num_prefix_tokens
