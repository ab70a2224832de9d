"""Run a launcher on its tensors' GPU.

Triton launches on the *current* CUDA device and its stream, not on the device of the tensors it is
given; a tensor on ``cuda:1`` while ``cuda:0`` is current would be read from the wrong GPU. Every
public launcher of this package is wrapped with :func:`on_tensor_device`, which makes the first
tensor argument's device current for the call (a no-op for CPU tensors, i.e. in the interpreter).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def on_tensor_device(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        ctx = torch.cuda.device(first.device) if first is not None and first.is_cuda else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
