"""Backend selection for mmfast ops.

Each op declares, per backend, a function and what it supports (``not_supported_reasons``). The
dispatcher takes the first backend in the device's preference list that is available in this
install and supports the inputs; with ``impl=`` (or :func:`use_backend`) a backend is forced, and
an unavailable or unsupported forced backend raises an error listing the reasons, never a silent
fallback. When the C++ extension is missing, CPU tensors fall back to the reference with one
warning per op. ``logging.getLogger("mmfast.dispatch")`` at DEBUG says why each backend was
passed over.

``flash_attn`` (the optional flash-attn package) is a backend of window attention only; it is not
in the default preference lists: an op may give its own (``OpSpec.preference_fn``), as window
attention does under its flash-attn policy (:func:`mmfast.ops.window_attention.set_flash_attn_policy`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

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


def backend_unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can run in this install, else why not."""
    if backend not in _STATUS:
        raise ValueError(f"impl must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return _STATUS[backend]


@contextlib.contextmanager
def use_backend(backend: str, ops: Sequence[str] | None = None) -> Iterator[None]:
    """Force ``backend`` for every mmfast op (or only ``ops``) inside the ``with`` block.

    An explicit ``impl=`` argument on a call takes precedence over this context.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
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


@dataclass
class OpSpec:
    """One op and its backends. ``impls[b]`` runs the op; ``checks[b](*args)`` lists the reasons
    backend ``b`` cannot take these inputs (empty when it can)."""

    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    checks: dict[str, Callable[..., list[str]]] = field(default_factory=dict)
    #: the op's own preference list per device type (None: the registry's). Read on every dispatch,
    #: so it may follow a module-level switch.
    preference_fn: Callable[[str], Sequence[str]] | None = None
    #: backends that only take some inputs (e.g. flash_attn: no bias, no mask): left out of
    #: :meth:`auto_backend`, which has no inputs to check.
    input_dependent: frozenset[str] = frozenset()
    _warned: bool = False

    def preference(self, device_type: str) -> tuple[str, ...]:
        if self.preference_fn is not None:
            return tuple(self.preference_fn(device_type))
        return default_preference(device_type)

    def auto_backend(self, device_type: str) -> str:
        """The backend ``impl='auto'`` picks for ``device_type`` inputs that every backend takes
        (input-dependent backends such as flash_attn are left out)."""
        for b in self.preference(device_type):
            if b in self.impls and b not in self.input_dependent and backend_unavailable_reason(b) is None:
                return b
        return "reference"

    def reasons(self, backend: str, *args) -> list[str]:
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        why = backend_unavailable_reason(backend)
        if why is not None:
            return [why]
        check = self.checks.get(backend)
        return list(check(*args)) if check is not None else []

    def select(self, device: torch.device, impl: str | None, *args) -> str:
        """The backend to run for inputs on ``device`` (``args`` are passed to the checks)."""
        forced = impl if impl not in (None, "auto") else forced_backend(self.name)
        if forced is not None:
            if forced not in BACKENDS:
                raise ValueError(f"impl must be one of {('auto',) + BACKENDS}, got {forced!r}")
            reasons = self.reasons(forced, *args)
            if reasons:
                raise RuntimeError(f"{self.name}: impl={forced!r} cannot run here: " + "; ".join(reasons))
            return forced
        passed_over: list[str] = []
        for b in self.preference(device.type):
            reasons = self.reasons(b, *args)
            if not reasons:
                if b == "reference" and device.type == "cpu" and not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"mmfast: {self.name} runs the pure-torch reference on CPU "
                        f"({'; '.join(passed_over) or 'no kernel'})",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                if not torch.compiler.is_compiling():  # logging calls would break a compiled graph
                    log.debug("%s: %s chosen for %s (passed over: %s)", self.name, b, device, passed_over)
                return b
            passed_over.append(f"{b}: {'; '.join(reasons)}")
            if not torch.compiler.is_compiling():
                log.debug("%s: %s passed over: %s", self.name, b, reasons)
        raise RuntimeError(f"{self.name}: no backend can run these inputs: " + " | ".join(passed_over))


_OPS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    _OPS[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    return _OPS[name]


def all_ops() -> list[OpSpec]:
    """Every registered op. This module is only ever loaded through the ``mmfast.ops`` package,
    whose ``__init__`` imports (and so registers) every op module first."""
    return [_OPS[k] for k in sorted(_OPS)]
