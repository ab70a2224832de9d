"""Run open_clip's own trainer (``open_clip_train``) with mmfast's kernels swapped in.

Command line (``mmfast-open-clip-train`` is the same)::

    python -m mmfast.integrations.open_clip_train [open_clip_train args...] [--mmfast-* flags]
    torchrun --nproc_per_node=8 -m mmfast.integrations.open_clip_train ... --mmfast-group-size 8

runs ``open_clip_train.main.main`` with every other argument passed through unchanged, after

* swapping open_clip's loss factory (``open_clip.create_loss``) for one that builds
  :class:`mmfast.ClipLoss` / :class:`mmfast.SigLipLoss` with exactly the arguments open_clip would
  have used (``--local-loss``, ``--gather-with-grad``, ``--siglip``, ``--loss-dist-impl``, rank and
  world size) plus ``--mmfast-group-size`` / ``--mmfast-impl``;
* optionally patching the vision tower right after open_clip creates the model:
  ``--mmfast-tome-r R`` (ToMe token merging, :func:`mmfast.tome.apply_patch`) and
  ``--mmfast-window-attention`` (fused window attention for a timm Swin trunk,
  :func:`mmfast.patch.timm.apply_window_attention`); the visual tower's forward throughput on one
  random batch is measured before and after and logged.

Data, optimiser, schedule, logging, checkpoints and evaluation stay open_clip's; the patches add no
parameter, so checkpoints load in plain open_clip. The ``--mmfast-*`` flags are removed before
open_clip's parser runs, and bad flags or combinations are reported (exit code 2) before anything
is built. One compatibility fix is applied: open_clip_train passes ``device_ids=[cpu]`` to
DistributedDataParallel, which torch rejects, so CPU (gloo) runs get ``device_ids=None``.

Python API for forks of the trainer: :func:`patch_loss_factory` / :func:`unpatch_loss_factory`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

from mmfast.integrations.open_clip_flags import FLAGS_HELP, IMPLS, PROG, MMFastFlagError, MMFastOptions, split_argv

__all__ = ["main", "patch_loss_factory", "unpatch_loss_factory", "LossFactoryPatch", "MMFastOptions",
           "MMFastFlagError", "split_argv", "check", "visual_images_per_second", "FLAGS_HELP"]

log = logging.getLogger("mmfast.integrations.open_clip_train")

_INSTALL_HINT = "pip install 'mmfast[open_clip_train]' (open-clip-torch >= 2.24 with its training extras)"

# ------------------------------------------------------------------------------------------------
# the loss factory


def _require_open_clip() -> ModuleType:
    try:
        import open_clip.factory
    except ImportError as exc:
        raise ImportError(f"mmfast.integrations.open_clip_train needs open_clip: {_INSTALL_HINT}") from exc
    return open_clip.factory


def _check_group_size(group_size: int | None, world_size: int) -> int:
    from mmfast.distributed.groups import validate_group_size

    try:
        return validate_group_size(group_size, world_size)
    except ValueError as exc:
        raise MMFastFlagError(f"mmfast group_size: {exc}") from None


def _unsupported_loss(args: Any) -> str | None:
    """Why mmfast cannot build the loss open_clip would create for ``args`` (None: it can)."""
    distill = getattr(args, "distill", None)
    if distill is None:  # set by open_clip_train's main; a freshly parsed namespace has only the flags
        distill = getattr(args, "distill_model", None) is not None and getattr(args, "distill_pretrained", None)
    if distill:
        return ("distillation (--distill-model/--distill-pretrained) uses open_clip's DistillClipLoss, which "
                "mmfast does not replace")
    if "coca" in str(getattr(args, "model", "")).lower():
        return "CoCa models use open_clip's CoCaLoss, which mmfast does not replace"
    if getattr(args, "horovod", False):
        return "--horovod is not supported by mmfast's losses (they use torch.distributed)"
    return None


class LossFactoryPatch:
    """A patched ``open_clip.create_loss``; a context manager that unpatches on exit.

    Attributes: ``group_size``, ``impl``, ``losses`` (the loss modules built so far),
    ``original`` (open_clip's ``create_loss``), ``patched`` (the ``(module, name)`` pairs replaced),
    ``active``.
    """

    def __init__(self, group_size: int | None = None, impl: str = "auto") -> None:
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.group_size = group_size
        self.impl = impl
        self.losses: list[Any] = []
        self.original: Callable[[Any], Any] | None = None
        self.patched: list[tuple[ModuleType, str]] = []
        self.active = False
        self._wrapper: Callable[[Any], Any] | None = None

    def create_loss(self, args: Any):
        """What the patched ``open_clip.create_loss(args)`` returns: mmfast's loss, built with the
        arguments open_clip's factory uses, plus ``group_size`` / ``impl``."""
        import mmfast

        why = _unsupported_loss(args)
        if why is not None:
            raise MMFastFlagError(f"mmfast: {why}; run open_clip_train.main without the mmfast loss patch "
                                  "(or --mmfast-loss open_clip)")
        rank, world_size = int(getattr(args, "rank", 0)), int(getattr(args, "world_size", 1))
        group_size = _check_group_size(self.group_size, world_size)
        master = rank == 0
        if getattr(args, "siglip", False):
            dist_impl = getattr(args, "loss_dist_impl", None)
            loss = mmfast.SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl,
                                     group_size=self.group_size, impl=self.impl)
            ignored = [f for f, a in (("--local-loss", "local_loss"), ("--gather-with-grad", "gather_with_grad"))
                       if getattr(args, a, False)]
            if ignored and master:
                log.warning("mmfast: %s ignored with --siglip (open_clip's SigLipLoss has no such option either)",
                            " and ".join(ignored))
            desc = (f"mmfast.SigLipLoss (dist_impl={dist_impl or 'bidir'}, group_size={group_size}, "
                    f"impl={self.impl}, world_size={world_size})")
        else:
            loss = mmfast.ClipLoss(local_loss=bool(getattr(args, "local_loss", False)),
                                   gather_with_grad=bool(getattr(args, "gather_with_grad", False)),
                                   cache_labels=True, rank=rank, world_size=world_size, use_horovod=False,
                                   group_size=self.group_size, impl=self.impl)
            desc = (f"mmfast.ClipLoss (local_loss={loss.local_loss}, gather_with_grad={loss.gather_with_grad}, "
                    f"group_size={group_size}, impl={self.impl}, world_size={world_size})")
        if master:
            log.info("mmfast: using %s in place of open_clip's loss", desc)
        self.losses.append(loss)
        return loss

    def _install(self, modules: Iterable[ModuleType | str] = ()) -> LossFactoryPatch:
        factory = _require_open_clip()
        import open_clip

        current = factory.create_loss
        prior = getattr(current, "_mmfast_patch", None)
        if prior is not None:  # patching again replaces the earlier patch
            prior.unpatch()
            current = factory.create_loss
        self.original = current

        @functools.wraps(current)
        def create_loss(args):
            return self.create_loss(args)

        create_loss._mmfast_patch = self
        self._wrapper = create_loss
        # every loaded module that imported open_clip's create_loss by name (open_clip_train.main does)
        targets: list[ModuleType] = [factory, open_clip]
        targets += [m for m in list(sys.modules.values()) if isinstance(getattr(m, "__dict__", None), dict)]
        targets += [sys.modules[m] if isinstance(m, str) else m for m in modules]
        seen: set[int] = set()
        for mod in targets:
            if id(mod) in seen or mod.__dict__.get("create_loss") is not current:
                continue
            seen.add(id(mod))
            mod.create_loss = create_loss
            self.patched.append((mod, "create_loss"))
        self.active = True
        return self

    def unpatch(self) -> None:
        """Restore open_clip's ``create_loss`` everywhere it was replaced (idempotent)."""
        for mod, name in reversed(self.patched):
            if mod.__dict__.get(name) is self._wrapper:
                setattr(mod, name, self.original)
        self.patched.clear()
        self.active = False
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> LossFactoryPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return (f"LossFactoryPatch(group_size={self.group_size}, impl={self.impl!r}, active={self.active}, "
                f"losses={len(self.losses)})")


_ACTIVE: LossFactoryPatch | None = None


def patch_loss_factory(group_size: int | None = None, impl: str = "auto",
                       modules: Iterable[ModuleType | str] = ()) -> LossFactoryPatch:
    """Make open_clip's loss factory build mmfast's losses; returns the patch (a context manager).

    ``open_clip.create_loss`` (and ``open_clip.factory.create_loss``, and the ``create_loss`` name in
    every already imported module that did ``from open_clip import create_loss``, e.g.
    ``open_clip_train.main``, plus any module listed in ``modules``) is replaced by a function that
    returns :class:`mmfast.ClipLoss` / :class:`mmfast.SigLipLoss` built from the same ``args``
    fields open_clip uses (``local_loss``, ``gather_with_grad``, ``siglip``, ``loss_dist_impl``,
    ``rank``, ``world_size``), with mmfast's ``group_size`` (ranks per all-gather group; None = ranks
    per node) and ``impl`` (kernel backend). It logs ``mmfast: using mmfast.ClipLoss (...)`` on rank 0.
    Distillation, CoCa and Horovod runs raise :class:`MMFastFlagError` when the loss is created.
    Calling it again replaces the earlier patch; :func:`unpatch_loss_factory` (or leaving the
    ``with`` block) restores open_clip's factory.
    """
    global _ACTIVE
    patch = LossFactoryPatch(group_size=group_size, impl=impl)._install(modules)
    _ACTIVE = patch
    return patch


def unpatch_loss_factory() -> bool:
    """Undo :func:`patch_loss_factory`; returns whether a patch was active."""
    if _ACTIVE is None:
        return False
    _ACTIVE.unpatch()
    return True


# ------------------------------------------------------------------------------------------------
# model patches (launcher only)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _timm_trunk(visual: Any) -> Any:
    """The timm trunk of an open_clip ``TimmModel`` vision tower, else None."""
    try:
        from open_clip.timm_model import TimmModel
    except ImportError:  # pragma: no cover - open_clip without timm support
        return None
    return visual.trunk if isinstance(visual, TimmModel) else None


def _visual_input_size(visual: Any) -> tuple[int, int]:
    trunk = _timm_trunk(visual)
    if trunk is not None and getattr(getattr(trunk, "patch_embed", None), "img_size", None) is not None:
        size = trunk.patch_embed.img_size
    else:
        size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def visual_images_per_second(visual: Any, batch_size: int, device: Any, precision: str = "fp32",
                             repeats: int = 3) -> float:
    """Images/s of ``visual``'s forward (eval mode, no grad, the training autocast) on one random
    batch: the median of ``repeats`` timed calls after one warm-up. Uses a private RNG (the
    global torch RNG, and so training, is not affected)."""
    import torch
    from open_clip.model import get_input_dtype
    from open_clip_train.precision import get_autocast

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, *_visual_input_size(visual), generator=gen)
    x = x.to(device=dev, dtype=get_input_dtype(precision) or torch.float32)
    autocast = get_autocast(precision, device_type=dev.type)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    was_training = visual.training
    visual.eval()
    times = []
    try:
        with torch.no_grad(), autocast():
            visual(x)
            for _ in range(max(1, repeats)):
                sync()
                t0 = time.perf_counter()
                visual(x)
                sync()
                times.append(time.perf_counter() - t0)
    finally:
        visual.train(was_training)
    return batch_size / max(statistics.median(times), 1e-9)


def _tome_tokens(visual: Any) -> str:
    """'N0 -> N' tokens through the patched tower (open_clip ViT or timm ViT)."""
    from mmfast.tome import num_mergeable

    target = visual if hasattr(visual, "tome_r_per_layer") else _timm_trunk(visual)
    if target is None or not hasattr(target, "tome_r_per_layer"):
        return "?"
    grid = getattr(target, "grid_size", None) or getattr(getattr(target, "patch_embed", None), "grid_size", None)
    if grid is None:
        return "?"
    prefix = int(getattr(target, "num_prefix_tokens", 1))
    n0 = n = int(grid[0]) * int(grid[1]) + prefix
    for r in target.tome_r_per_layer:
        n -= num_mergeable(n, r, prefix)
    return f"{n0} -> {n}"


def _apply_model_patches(model: Any, opts: MMFastOptions, batch_size: int, device: Any, precision: str) -> None:
    """Patch ``model.visual`` in place as ``opts`` asks; rank 0 measures and logs the throughput change."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise MMFastFlagError(f"mmfast: the model ({type(model).__name__}) has no .visual tower to patch")
    trunk = _timm_trunk(visual)
    if opts.window_attention:
        from mmfast.patch.timm import swin_block_classes

        swin = swin_block_classes()
        if trunk is None or not any(isinstance(m, swin) for m in trunk.modules()):
            what = f"timm {type(trunk).__name__}" if trunk is not None else type(visual).__name__
            raise MMFastFlagError("--mmfast-window-attention applies to a timm Swin vision trunk; this model's "
                                  f"{'trunk' if trunk is not None else 'vision tower'} is {what}")
    master = _rank() == 0
    before = visual_images_per_second(visual, batch_size, device, precision) if master else math.nan
    done = []
    if opts.window_attention:
        from mmfast.patch.timm import apply_window_attention, count_patched

        apply_window_attention(trunk)
        n = count_patched(trunk)
        done.append(f"fused window attention on {n} Swin blocks")
    if opts.tome_r is not None:
        from mmfast import tome

        try:
            tome.apply_patch(trunk if trunk is not None else visual, r=opts.tome_r)
        except (TypeError, ValueError) as exc:
            raise MMFastFlagError(f"--mmfast-tome-r cannot patch this vision tower: {exc}") from None
        done.append(f"ToMe r={opts.tome_r} (tokens {_tome_tokens(visual)})")
    if master:
        after = visual_images_per_second(visual, batch_size, device, precision)
        log.info("mmfast: %s on the vision tower; visual forward throughput (batch %d, %s, %s): "
                 "%.1f -> %.1f images/s (x%.2f)", ", ".join(done), batch_size, precision,
                 device, before, after, after / before)


class _ModelHook:
    """Wraps ``create_model_and_transforms`` as open_clip_train.main imported it: the first call
    (the model being trained) gets the vision-tower patches."""

    def __init__(self, opts: MMFastOptions, batch_size: int) -> None:
        self.opts, self.batch_size, self.calls = opts, batch_size, 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def create_model_and_transforms(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls += 1
            if self.calls == 1:
                _apply_model_patches(out[0], self.opts, self.batch_size, kwargs.get("device", "cpu"),
                                     kwargs.get("precision", "fp32"))
            return out

        return create_model_and_transforms


def _cpu_ddp(base: type) -> type:
    class DistributedDataParallel(base):
        """open_clip_train passes ``device_ids=[device]`` even on CPU, which torch rejects."""

        def __init__(self, module, device_ids=None, *args, **kwargs):
            import torch

            if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids) and all(
                    p.device.type == "cpu" for p in module.parameters()):
                device_ids = None
                if _rank() == 0:
                    log.info("mmfast: DistributedDataParallel on CPU with device_ids=None (open_clip_train passes "
                             "device_ids=[cpu], which torch rejects)")
            super().__init__(module, device_ids, *args, **kwargs)

    DistributedDataParallel.__qualname__ = base.__qualname__
    DistributedDataParallel.__module__ = base.__module__
    return DistributedDataParallel


# ------------------------------------------------------------------------------------------------
# pre-flight checks


def _model_cfg(model: str) -> dict | None:
    """open_clip's config for ``--model`` if it can be read without a download, else None."""
    factory = _require_open_clip()
    if model.startswith(factory.HF_HUB_PREFIX):
        return None
    try:
        local = model.startswith(factory.LOCAL_DIR_PREFIX)
        return factory.get_model_config(model if local else model.replace("/", "-"))
    except (OSError, ValueError):
        return None


def _world_size() -> int:
    from open_clip_train.distributed import is_using_distributed, world_info_from_env

    return world_info_from_env()[2] if is_using_distributed() else 1


def check(opts: MMFastOptions, args: Any, world_size: int) -> None:
    """Raise :class:`MMFastFlagError` for ``--mmfast-*`` flags that cannot run with open_clip's
    ``args`` (a parsed open_clip_train namespace) at ``world_size`` ranks."""
    if opts.loss == "mmfast":
        why = _unsupported_loss(args)
        if why is not None:
            raise MMFastFlagError(f"{why}; use --mmfast-loss open_clip to keep open_clip's loss")
        _check_group_size(opts.group_size, world_size)
        if args.siglip and args.loss_dist_impl is not None:
            from mmfast.functional import SIGLIP_DIST_IMPLS

            if args.loss_dist_impl not in SIGLIP_DIST_IMPLS:
                raise MMFastFlagError(f"--loss-dist-impl must be one of {', '.join(SIGLIP_DIST_IMPLS)} "
                                      f"(as open_clip's SigLipLoss requires); got {args.loss_dist_impl!r}")
        if opts.impl != "auto":
            import mmfast

            info = mmfast.backends().get(opts.impl, {})
            if not info.get("available", False):
                raise MMFastFlagError(f"--mmfast-impl {opts.impl}: backend not available here "
                                      f"({info.get('detail', 'unknown')})")
    elif opts.group_size is not None or opts.impl != "auto":
        raise MMFastFlagError("--mmfast-group-size / --mmfast-impl configure mmfast's loss; they cannot be used "
                              "with --mmfast-loss open_clip")
    if not opts.patches_model:
        return
    names = [f for f, on in (("--mmfast-tome-r", opts.tome_r is not None),
                             ("--mmfast-window-attention", opts.window_attention)) if on]
    if args.torchscript or args.trace:
        raise MMFastFlagError(f"{' / '.join(names)} cannot patch a TorchScript model (--torchscript / --trace)")
    cfg = _model_cfg(args.model)
    if cfg is None:
        return  # not readable without a download: the patch itself reports an unsupported tower
    vision = cfg.get("vision_cfg", {})
    timm_name = vision.get("timm_model_name")
    if opts.window_attention and (not timm_name or "swin" not in str(timm_name).lower()):
        tower = f"timm {timm_name}" if timm_name else "open_clip's own " + (
            "ModifiedResNet" if isinstance(vision.get("layers"), (list, tuple)) else "VisionTransformer")
        raise MMFastFlagError(f"--mmfast-window-attention does not apply to model {args.model!r}: it patches a "
                              f"timm Swin vision trunk (vision_cfg.timm_model_name swin*), and this model's "
                              f"vision tower is {tower}")
    if opts.tome_r is not None and not timm_name:
        if isinstance(vision.get("layers"), (list, tuple)):
            raise MMFastFlagError(f"--mmfast-tome-r does not apply to model {args.model!r}: its vision tower is a "
                                  "ModifiedResNet (token merging needs a ViT)")
        if vision.get("attentional_pool"):
            raise MMFastFlagError(f"--mmfast-tome-r does not apply to model {args.model!r}: attentional pooling "
                                  "has no size-aware form")


# ------------------------------------------------------------------------------------------------
# the launcher


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``open_clip_train.main.main`` with mmfast's patches; returns the exit code (0 on success,
    2 for bad flags, 1 when open_clip's main reports an error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts, rest = split_argv(argv)
    except MMFastFlagError as exc:
        return _error(str(exc))
    try:
        _require_open_clip()
        import open_clip
        import open_clip_train.main as oc_main
        from open_clip_train.params import parse_args
    except ImportError as exc:
        return _error(f"{exc} ({_INSTALL_HINT})")
    if "-h" in rest or "--help" in rest:
        print(f"usage: {PROG} [open_clip_train args...] [mmfast flags]\n\n{FLAGS_HELP}\n"
              "open_clip_train's own arguments follow.\n", flush=True)
        parse_args(["--help"])  # prints open_clip's help and exits 0
        return 0
    for path in opts.model_configs:
        if not os.path.exists(path):
            return _error(f"--mmfast-model-config {path}: no such file or folder")
        open_clip.add_model_config(path)
    args = parse_args(rest)  # open_clip's own parser: bad open_clip flags exit 2 here, as in open_clip
    try:
        check(opts, args, _world_size())
    except MMFastFlagError as exc:
        return _error(str(exc))

    import torch

    saved: list[tuple[Any, str, Any]] = []

    def swap(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch = None
    try:
        if opts.loss == "mmfast":
            patch = patch_loss_factory(group_size=opts.group_size, impl=opts.impl, modules=[oc_main])
        if opts.patches_model:
            hook = _ModelHook(opts, args.batch_size)
            swap(oc_main, "create_model_and_transforms", hook.wrap(oc_main.create_model_and_transforms))
        swap(torch.nn.parallel, "DistributedDataParallel", _cpu_ddp(torch.nn.parallel.DistributedDataParallel))
        rc = oc_main.main(rest)
    except MMFastFlagError as exc:
        return _error(str(exc))
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        if patch is not None:
            patch.unpatch()
    return 1 if isinstance(rc, int) and rc != 0 else 0


if __name__ == "__main__":
    # import the package module (not this __main__ copy) so there is one patch registry
    from mmfast.integrations.open_clip_train import main as _main

    sys.exit(_main())
