"""The class swap every patch uses: a patched module's class is ``Patched(mixin, original)``.

A patch never rebuilds a module: it sets ``module.__class__`` to a subclass made of a mixin (the
patched methods, defined at module level in mmfast) and the module's original class, so parameters,
buffers, hooks and the state_dict stay as they were, and :func:`restore_class` undoes it exactly.

The subclass is made once per (original, mixin) pair and cached. It is not importable by name (it
exists only once a patch ran), so :class:`PatchedModule`, the base of every mixin, pickles an
instance as "the (original, mixin) subclass, with this state": both classes are pickled by reference,
and :func:`rebuild` makes the subclass again when a fresh process loads the pickle (``torch.save`` /
``torch.load`` of a whole model, ``copy.deepcopy``, multiprocessing).

Each mixin has a ``family`` (``"window"``, ``"tome"``): :func:`original_class` and :func:`is_patched`
look through one family, so a module can carry patches of two families (the outer one's original is
the inner patched class).
"""

from __future__ import annotations

from torch import nn

__all__ = ["PatchedModule", "patched_class", "original_class", "is_patched", "swap_class", "restore_class",
           "rebuild"]

_CACHE: dict[tuple[type, type], type] = {}


class PatchedModule:
    """Base of every patch mixin. ``family`` names the patch; ``prefix`` starts the class name."""

    family: str = ""
    prefix: str = "MMFast"

    @classmethod
    def _mmfast_namespace(cls, orig: type) -> dict:
        """Extra class attributes of the (cls, orig) subclass (e.g. a method of ``orig`` kept under
        another name)."""
        return {}

    def __reduce_ex__(self, protocol):
        cls = type(self)
        reduced = super().__reduce_ex__(protocol)
        key = cls.__dict__.get("_mmfast_key")
        if key is None or not isinstance(reduced, tuple) or len(reduced) < 2:
            return reduced  # a subclass of a patched class: it pickles as its own class does
        return (rebuild, key) + tuple(reduced[2:])


def patched_class(orig: type, mixin: type) -> type:
    """The cached subclass ``(mixin, orig)`` that replaces ``orig`` on patched modules."""
    if not (isinstance(mixin, type) and issubclass(mixin, PatchedModule)):
        raise TypeError(f"mixin must be a PatchedModule subclass, got {mixin!r}")
    key = (orig, mixin)
    cls = _CACHE.get(key)
    if cls is None:
        name = mixin.prefix + orig.__name__
        namespace = {"_mmfast_key": key, "_mmfast_original_" + mixin.family: orig, "__module__": mixin.__module__,
                     **mixin._mmfast_namespace(orig)}
        cls = type(name, (mixin, orig), namespace)
        cls.__qualname__ = name
        _CACHE[key] = cls
    return cls


def rebuild(orig: type, mixin: type):
    """Unpickling: a bare instance of the patched class; pickle then restores its state."""
    cls = patched_class(orig, mixin)
    return cls.__new__(cls)


def original_class(module: nn.Module, family: str) -> type:
    """The class ``module`` had before the ``family`` patch (its class when it has none)."""
    cls = type(module)
    return cls.__dict__.get("_mmfast_original_" + family, cls)


def is_patched(module: nn.Module, family: str) -> bool:
    return "_mmfast_original_" + family in type(module).__dict__


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the patched subclass of its original class (idempotent)."""
    module.__class__ = patched_class(original_class(module, mixin.family), mixin)


def restore_class(module: nn.Module, family: str, attrs: tuple[str, ...] = ()) -> bool:
    """Undo :func:`swap_class` for ``family`` and drop the instance attributes ``attrs`` the patch
    added. Returns whether the module was patched."""
    patched = is_patched(module, family)
    if patched:
        module.__class__ = type(module).__dict__["_mmfast_original_" + family]
    for attr in attrs:
        if attr in module.__dict__:
            delattr(module, attr)
    return patched
