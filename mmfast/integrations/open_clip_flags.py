"""The ``--mmfast-*`` flags of ``mmfast-open-clip-train``: their help, parsing and removal from the arguments
open_clip's parser sees."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["PROG", "IMPLS", "LOSSES", "FLAGS_HELP", "MMFastFlagError", "MMFastOptions", "split_argv"]

PROG = "mmfast-open-clip-train"
IMPLS = ("auto", "cpp", "triton", "reference")
LOSSES = ("mmfast", "open_clip")

FLAGS_HELP = f"""\
mmfast flags (removed before open_clip_train's parser sees the arguments):
  --mmfast-group-size N     ranks per all-gather group of mmfast's loss (must divide the world
                            size; default: ranks per node, LOCAL_WORLD_SIZE from torchrun)
  --mmfast-impl IMPL        loss kernel backend: {", ".join(IMPLS)} (default auto)
  --mmfast-loss WHICH       mmfast (default) or open_clip: keep open_clip's own loss (A/B runs of
                            the model patches below)
  --mmfast-tome-r R         ToMe token merging on the vision tower, R tokens merged per block
                            (open_clip ViT or a timm ViT trunk; 0 = patched but no merging)
  --mmfast-window-attention fused window attention for a timm Swin vision trunk
                            (models with vision_cfg.timm_model_name swin*)
  --mmfast-model-config PATH
                            register a model config JSON file or folder of them for --model
                            (open_clip.add_model_config; repeatable)
"""


class MMFastFlagError(ValueError):
    """A bad ``--mmfast-*`` flag or a combination that cannot run (reported before training)."""


# ------------------------------------------------------------------------------------------------
# flags


@dataclass
class MMFastOptions:
    """The parsed ``--mmfast-*`` flags."""

    group_size: int | None = None
    impl: str = "auto"
    loss: str = "mmfast"
    tome_r: int | None = None
    window_attention: bool = False
    model_configs: list[str] = field(default_factory=list)

    @property
    def patches_model(self) -> bool:
        return self.tome_r is not None or self.window_attention


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MMFastFlagError(f"{name} expects an integer, got {value!r}") from None


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise MMFastFlagError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _set_group_size(o: MMFastOptions, v: str) -> None:
    o.group_size = _int("--mmfast-group-size", v)
    if o.group_size < 1:
        raise MMFastFlagError(f"--mmfast-group-size must be a positive integer, got {o.group_size}")


def _set_tome_r(o: MMFastOptions, v: str) -> None:
    o.tome_r = _int("--mmfast-tome-r", v)
    if o.tome_r < 0:
        raise MMFastFlagError(f"--mmfast-tome-r must be >= 0 (tokens merged per block), got {o.tome_r}")


def _set_impl(o: MMFastOptions, v: str) -> None:
    o.impl = _choice("--mmfast-impl", v, IMPLS)


def _set_loss(o: MMFastOptions, v: str) -> None:
    o.loss = _choice("--mmfast-loss", v, LOSSES)


def _set_window(o: MMFastOptions, v: str) -> None:
    o.window_attention = True


def _add_config(o: MMFastOptions, v: str) -> None:
    o.model_configs.append(v)


# flag -> (takes a value, metavar, setter)
_FLAGS: dict[str, tuple[bool, str, Callable[[MMFastOptions, str], None]]] = {
    "--mmfast-group-size": (True, "N", _set_group_size),
    "--mmfast-impl": (True, "IMPL", _set_impl),
    "--mmfast-loss": (True, "WHICH", _set_loss),
    "--mmfast-tome-r": (True, "R", _set_tome_r),
    "--mmfast-window-attention": (False, "", _set_window),
    "--mmfast-model-config": (True, "PATH", _add_config),
}


def split_argv(argv: Sequence[str]) -> tuple[MMFastOptions, list[str]]:
    """Take the ``--mmfast-*`` flags (``--flag value`` or ``--flag=value``) out of ``argv``.

    Returns the options and the remaining arguments, in order, for open_clip_train. Raises
    :class:`MMFastFlagError` for an unknown ``--mmfast*`` flag, a missing or malformed value.
    A value may start with a single ``-`` (it is then rejected by the flag's own check, e.g. a
    negative r); a following ``--option`` is never taken as a value.
    """
    opts, rest = MMFastOptions(), []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--mmfast"):
            rest.append(tok)
            i += 1
            continue
        name, eq, value = tok.partition("=")
        if name not in _FLAGS:
            raise MMFastFlagError(f"unknown flag {name}; the mmfast flags are {', '.join(_FLAGS)}")
        takes_value, metavar, setter = _FLAGS[name]
        if not takes_value:
            if eq:
                raise MMFastFlagError(f"{name} takes no value (got {tok!r})")
            i += 1
        elif eq:
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            raise MMFastFlagError(f"{name} expects a value: {name} {metavar}")
        if takes_value and value == "":
            raise MMFastFlagError(f"{name} expects a value: {name} {metavar}")
        setter(opts, value)
    return opts, rest
