"""Fused roll + pad + window partition (and its reverse) as differentiable custom ops.

``mmfast::window_process`` / ``window_process_reverse`` (C++ on CPU, CUDA kernel on GPU) do in one
copy what Swin's unfused path does in three or four (roll, pad, partition, and the reverse crop and
un-roll), with padding, rectangular windows and bf16. The reference backend composes the same
steps from mmfast.reference.window_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmfast.ops.registry import Backend, Inputs, OpSpec, register
from mmfast.reference import window_attention as ref


def _ref_process(x: Tensor, window, shift, pad_then_roll: bool, pad_value: Tensor | None) -> Tensor:
    b, h, w, c = x.shape
    wh, ww = window
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    fill = pad_value if pad_value is not None else x.new_zeros(c)
    if pad_then_roll:
        padded = fill.expand(b, hp, wp, c).clone()
        padded[:, :h, :w] = x
        shifted = torch.roll(padded, (-shift[0], -shift[1]), (1, 2))
    else:
        rolled = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
        shifted = fill.expand(b, hp, wp, c).clone()
        shifted[:, :h, :w] = rolled
    return ref.window_partition(shifted, window).reshape(-1, wh * ww, c)


def _ref_reverse(windows: Tensor, hw, window, shift, pad_then_roll: bool) -> Tensor:
    wh, ww = window
    h, w = hw
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    c = windows.shape[-1]
    grid = ref.window_reverse(windows.reshape(-1, (hp // wh) * (wp // ww), wh * ww, c), window, (hp, wp))
    if pad_then_roll:
        return torch.roll(grid, shift, (1, 2))[:, :h, :w].contiguous()
    return torch.roll(grid[:, :h, :w], shift, (1, 2)).contiguous()


@dataclass(frozen=True)
class ProcessInputs(Inputs):
    """What decides the backend: the tensor to partition (or the windows to reverse)."""

    x: Tensor


def _kernel_checks(device_type: str):
    def check(inputs: ProcessInputs) -> list[str]:
        reasons = []
        if not hasattr(torch.ops.mmfast, "window_process"):
            reasons.append("this build of mmfast._C has no window_process")
        if inputs.x.device.type != device_type:
            reasons.append(f"this kernel takes {device_type.upper()} tensors")
        return reasons

    return check


def _process(x, window, shift, pad_then_roll, pad_value):
    return torch.ops.mmfast.window_process(x, list(window), list(shift), pad_then_roll, pad_value)


def _reverse(windows, hw, window, shift, pad_then_roll):
    return torch.ops.mmfast.window_process_reverse(windows, list(hw), list(window), list(shift), pad_then_roll)


# forward: partition ``(x, window, shift, pad_then_roll, pad_value) -> windows``; backward: its reverse
# ``(windows, hw, window, shift, pad_then_roll) -> x`` (each is the other's gradient, see _ProcessFn).
# The C++ op is registered for CPU and CUDA under one name: both backends call it.
PROCESS = register(OpSpec("window_process", {
    "cpp": Backend(_process, _reverse, _kernel_checks("cpu")),
    "cuda": Backend(_process, _reverse, _kernel_checks("cuda")),
    "reference": Backend(_ref_process, _ref_reverse),
}))


def process_backend(x: Tensor, impl: str | None = None, *, use_context: bool = True) -> str:
    """The window_process backend for ``x`` (``use_context=False``: ignore :func:`use_backend`, as an op
    calling this one inside itself must)."""
    return PROCESS.select(ProcessInputs(x), impl, use_context=use_context)


class _ProcessFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pad_value, window, shift, pad_then_roll, backend):
        ctx.meta = (x.shape[1], x.shape[2], window, shift, pad_then_roll, backend, pad_value is not None)
        return PROCESS.backend(backend).forward(x, window, shift, pad_then_roll, pad_value)

    @staticmethod
    def backward(ctx, g):
        h, w, window, shift, pad_then_roll, backend, has_pad = ctx.meta
        g = g.contiguous()
        dx = PROCESS.backend(backend).backward(g, (h, w), window, shift, pad_then_roll)
        # every padded slot holds pad_value: its gradient is the total minus what went back to x
        dpad = (g.sum((0, 1)) - dx.sum((0, 1, 2))) if has_pad else None
        return dx, dpad, None, None, None, None


class _ReverseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, windows, hw, window, shift, pad_then_roll, backend):
        ctx.meta = (window, shift, pad_then_roll, backend)
        return PROCESS.backend(backend).backward(windows, hw, window, shift, pad_then_roll)

    @staticmethod
    def backward(ctx, g):
        window, shift, pad_then_roll, backend = ctx.meta
        dw = PROCESS.backend(backend).forward(g.contiguous(), window, shift, pad_then_roll, None)
        return dw, None, None, None, None, None


def _check_geometry(window_size, shift_size, order: str) -> tuple[tuple[int, int], tuple[int, int]]:
    if order not in ("roll_pad", "pad_roll"):
        raise ValueError(f"order must be 'roll_pad' or 'pad_roll', got {order!r}")
    window = ref.check_window(window_size)
    return window, ref.check_shift(shift_size, window)


def window_partition(x: Tensor, window_size, shift_size=0, *, order: str = "roll_pad",
                     pad_value: Tensor | None = None, impl: str | None = None) -> Tensor:
    """Roll + pad + partition ``x [B, H, W, C]`` into windows ``[B * nW, Wh * Ww, C]`` in one copy."""
    if x.dim() != 4:
        raise ValueError(f"x must be channels-last [B, H, W, C], got shape {tuple(x.shape)}")
    window, shift = _check_geometry(window_size, shift_size, order)
    if pad_value is not None and tuple(pad_value.shape) != (x.shape[-1],):
        raise ValueError(f"pad_value must be [C] = ({x.shape[-1]},), got {tuple(pad_value.shape)}")
    backend = process_backend(x, impl)
    return _ProcessFn.apply(x, pad_value, window, shift, order == "pad_roll", backend)


def window_unpartition(windows: Tensor, hw, window_size, shift_size=0, *, order: str = "roll_pad",
                       impl: str | None = None) -> Tensor:
    """Reverse of :func:`window_partition`: windows ``[B * nW, Wh * Ww, C]`` -> ``[B, H, W, C]``
    (reverse partition, crop, un-roll)."""
    if windows.dim() != 3:
        raise ValueError(f"windows must be [B*nW, Wh*Ww, C], got shape {tuple(windows.shape)}")
    window, shift = _check_geometry(window_size, shift_size, order)
    hw = ref.pair(hw, "hw")
    backend = process_backend(windows, impl)
    return _ReverseFn.apply(windows, hw, window, shift, order == "pad_roll", backend)
