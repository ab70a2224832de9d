"""The backend table of mmfast's ops, and the choice of a backend for a call.

Every op is an :class:`OpSpec`: a name and a table of :class:`Backend` entries, one per backend
that can run it. An entry is data: how to run the op forward, how to run its backward (``None``
when the forward is differentiable torch, or the entry is only chosen when no gradient is needed),
and a check that lists the reasons it cannot take given inputs (empty when it can). Checks and
:meth:`OpSpec.select` take one inputs object: an op's own frozen dataclass (a subclass of
:class:`Inputs`) holding the tensors and settings that decide the choice.

The dispatcher takes the first backend in the device's preference list that is available in this
install and whose check passes; with ``impl=`` (or :func:`use_backend`) a backend is forced, and a
forced backend that cannot run raises an error naming the inputs (shapes, dtypes, devices) and
every backend's reasons, never a silent fallback. ``impl`` is ``None`` / ``"auto"`` or a backend
name in every layer above: it is validated here, once. When a backend the device prefers is missing
from this install (no C++ extension, no Triton), the reference runs with one warning per op.
``logging.getLogger("mmfast.dispatch")`` at DEBUG says why each backend was passed over.

``flash_attn`` (the optional flash-attn package) is a backend of window attention only; it is not
in the default preference lists: an op may give its own (``OpSpec.preference_fn``), as window
attention does under its flash-attn policy (:func:`mmfast.ops.window_attention.set_flash_attn_policy`).

This module imports no op module: the op modules register themselves (``mmfast.ops`` imports them
all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmfast import _ext

log = logging.getLogger("mmfast.dispatch")

BACKENDS = ("cuda", "triton", "cpp", "flash_attn", "reference")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}

_state = threading.local()


# What this process can run, read once: it does not change while the process lives (the Triton
# interpreter flag is read when kernels are defined), and a constant lookup keeps dispatch
# traceable by torch.compile.
_STATUS = {name: (None if b["available"] else b["detail"]) for name, b in _ext.backends().items()}


def check_impl(impl: str | None, name: str = "impl") -> str | None:
    """``impl`` as the dispatcher takes it: None for ``None`` / ``"auto"``, else a backend name;
    anything else raises a ValueError naming ``name``."""
    if impl is None or impl == "auto":
        return None
    if impl not in BACKENDS:
        raise ValueError(f"{name} must be one of {('auto',) + BACKENDS}, got {impl!r}")
    return impl


def backend_unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can run in this install, else why not."""
    check_impl(backend)
    return _STATUS[backend]


@contextlib.contextmanager
def use_backend(backend: str, ops: Sequence[str] | None = None) -> Iterator[None]:
    """Force ``backend`` for every mmfast op (or only ``ops``) inside the ``with`` block.

    An explicit ``impl=`` argument on a call takes precedence over this context.
    """
    check_impl(backend, "backend")
    prev = getattr(_state, "forced", None)
    _state.forced = (backend, None if ops is None else frozenset(ops))
    try:
        yield
    finally:
        _state.forced = prev


def default_preference(device_type: str) -> tuple[str, ...]:
    """The registry's backend order for ``device_type`` tensors (an op may define its own)."""
    return _PREFERENCE.get(device_type, ("reference",))


def forced_backend(op: str) -> str | None:
    """The backend :func:`use_backend` forces for ``op`` in this thread, or None."""
    forced = getattr(_state, "forced", None)
    if forced is None:
        return None
    backend, ops = forced
    if backend == "auto" or (ops is not None and op not in ops):
        return None
    return backend


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        grad = " (requires grad)" if value.requires_grad else ""
        return f"{dtype}{list(value.shape)} on {value.device}{grad}"
    return repr(value)


@dataclass(frozen=True)
class Inputs:
    """Base of an op's inputs object: a frozen dataclass of the tensors and settings that decide
    which backend runs. Its first tensor field gives the device."""

    @property
    def device(self) -> torch.device:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                return value.device
        raise TypeError(f"{type(self).__name__} holds no tensor")

    def describe(self) -> str:
        """``name=dtype[shape] on device, ...``: what an error shows of the inputs."""
        return ", ".join(f"{f.name}={_describe(getattr(self, f.name))}" for f in dataclasses.fields(self))


@dataclass(frozen=True)
class Backend:
    """One backend of an op: how to run it, and what it takes.

    ``forward`` and ``backward`` take the op's own positional arguments (documented where the op
    is defined; a custom op passes them through, so they are tensors and plain values).
    ``backward`` is None when ``forward`` is differentiable torch (it runs outside the op's custom
    op and autograd flows through it), or when the check admits only inputs that need no gradient.
    ``check(inputs)`` lists why the backend cannot take ``inputs`` (empty: it can). ``auto=False``
    keeps it out of :meth:`OpSpec.auto_backend` (a backend that takes only some inputs, e.g.
    flash_attn: no bias, no mask)."""

    forward: Callable[..., Any]
    backward: Callable[..., Any] | None = None
    check: Callable[[Any], Iterable[str]] | None = None
    auto: bool = True


@dataclass
class OpSpec:
    """One op and its table of backends (a dict from backend name to :class:`Backend`)."""

    name: str
    backends: dict[str, Backend]
    #: the op's own preference list per device type (None: the registry's). Read on every dispatch,
    #: so it may follow a module-level switch.
    preference_fn: Callable[[str], Sequence[str]] | None = None
    _warned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        for b in self.backends:
            check_impl(b, f"{self.name}: backend name")
        if "reference" not in self.backends:
            raise ValueError(f"{self.name}: every op needs a reference backend")

    def backend(self, name: str) -> Backend:
        """The table entry of backend ``name``."""
        try:
            return self.backends[name]
        except KeyError:
            raise ValueError(f"{self.name} has no {name} backend (it has {', '.join(self.backends)})") from None

    def preference(self, device_type: str) -> tuple[str, ...]:
        if self.preference_fn is not None:
            return tuple(self.preference_fn(device_type))
        return default_preference(device_type)

    def auto_backend(self, device_type: str) -> str:
        """The backend ``impl='auto'`` picks for ``device_type`` inputs that every backend takes
        (backends with ``auto=False`` are left out)."""
        for b in self.preference(device_type):
            entry = self.backends.get(b)
            if entry is not None and entry.auto and backend_unavailable_reason(b) is None:
                return b
        return "reference"

    def reasons(self, backend: str, inputs: Inputs) -> list[str]:
        """Why ``backend`` cannot run ``inputs`` (empty when it can)."""
        return self._why_not(backend, inputs)[0]

    def _why_not(self, backend: str, inputs: Inputs) -> tuple[list[str], bool]:
        """:meth:`reasons`, and whether the reason is that this install lacks the backend."""
        entry = self.backends.get(backend)
        if entry is None:
            return [f"{self.name} has no {backend} backend"], False
        why = backend_unavailable_reason(backend)
        if why is not None:
            return [why], True
        return (list(entry.check(inputs)) if entry.check is not None else []), False

    def _report(self, inputs: Inputs) -> str:
        rows = [f"{b}: {'; '.join(self.reasons(b, inputs)) or 'can run'}" for b in self.backends]
        return f"inputs: {inputs.describe()}; backends: " + " | ".join(rows)

    def select(self, inputs: Inputs, impl: str | None = None, *, use_context: bool = True) -> str:
        """The backend to run ``inputs`` on. ``impl``: None / ``"auto"`` or a backend name to force;
        ``use_context=False`` ignores :func:`use_backend` (for an op called inside another one)."""
        forced = check_impl(impl)
        if forced is None and use_context:
            forced = forced_backend(self.name)
        if forced is not None:
            if forced not in self.backends:
                raise ValueError(f"{self.name}: impl={forced!r} is not a backend of this op (it has "
                                 f"{', '.join(self.backends)}). {self._report(inputs)}")
            if self.reasons(forced, inputs):
                raise RuntimeError(f"{self.name}: impl={forced!r} cannot run these inputs. {self._report(inputs)}")
            return forced
        passed_over: list[str] = []
        missing: list[str] = []  # backends passed over because this install lacks them
        for b in self.preference(inputs.device.type):
            reasons, not_installed = self._why_not(b, inputs)
            if not reasons:
                if b == "reference" and missing and not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"mmfast: {self.name} runs the pure-torch reference on {inputs.device.type} "
                        f"({'; '.join(missing)})",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                if not torch.compiler.is_compiling():  # logging calls would break a compiled graph
                    log.debug("%s: %s chosen for %s (passed over: %s)", self.name, b, inputs.device, passed_over)
                return b
            passed_over.append(f"{b}: {'; '.join(reasons)}")
            if not_installed:
                missing.append(f"{b}: {'; '.join(reasons)}")
            if not torch.compiler.is_compiling():
                log.debug("%s: %s passed over: %s", self.name, b, reasons)
        raise RuntimeError(f"{self.name}: no backend can run these inputs. {self._report(inputs)}")


_OPS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in _OPS:
        raise ValueError(f"op {spec.name!r} is registered twice")
    _OPS[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"no mmfast op named {name!r} (ops: {', '.join(sorted(_OPS))})") from None


def all_ops() -> list[OpSpec]:
    """Every registered op. This module is only ever loaded through the ``mmfast.ops`` package,
    whose ``__init__`` imports (and so registers) every op module first."""
    return [_OPS[k] for k in sorted(_OPS)]
