"""Model patchers (apply and revert): ``mmfast.patch.timm`` for timm models; token merging lives
in ``mmfast.tome`` (its timm and open_clip halves are ``tome_timm`` and ``tome_open_clip``).
``mmfast.patch.classes`` is the class swap they share. The submodules import lazily on first
attribute access (``import mmfast; mmfast.patch.timm.apply_window_attention(m)``): timm and open_clip
are imported only when a patch for them is used."""

import importlib

_SUBMODULES = ("classes", "timm", "tome_core", "tome_timm", "tome_open_clip")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
