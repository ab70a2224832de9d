"""Host helpers shared by the Triton kernel modules of this package.

``triton``, ``tl``, :func:`jit` and ``TRITON_ERROR``: Triton, imported so that importing a kernel
module never needs it. Without Triton, ``triton`` is None, ``tl`` a stand-in with ``constexpr``,
:func:`jit` returns the function undecorated and ``TRITON_ERROR`` says why (else it is None); the
modules' ``not_supported_reasons`` report it before any launch. :func:`interpreting`: whether the
kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``); each kernel module imports it
under a private name of its own, which tests patch per module.

:func:`on_tensor_device`: run a launcher on its tensors' GPU. Triton launches on the *current* CUDA
device and its stream, not on the device of the tensors it is given; a tensor on ``cuda:1`` while
``cuda:0`` is current would be read from the wrong GPU. Every public launcher of this package is
wrapped with it: it makes the first tensor argument's device current for the call (a no-op for CPU
tensors, i.e. in the interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
    jit = triton.jit
except ImportError as _exc:  # pragma: no cover - importing the kernel modules must not need triton
    triton = None
    tl = SimpleNamespace(constexpr=None)
    TRITON_ERROR = f"triton is not installed ({_exc})"

    def jit(fn):
        return fn


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_tensor_device(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        ctx = torch.cuda.device(first.device) if first is not None and first.is_cuda else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
