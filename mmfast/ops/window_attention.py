"""Fused windowed / shifted-window attention: custom op (fake + autograd) and backend dispatch.

``mmfast::window_attention`` takes q, k, v on the spatial layout [B, H, W, heads, head_dim] and
does roll + pad + partition + relative-position bias + shift mask + softmax + PV + reverse in one
kernel (C++ on CPU tensors, Triton on CUDA tensors). The reference backend
(mmfast.reference.window_attention) is plain differentiable torch and runs outside the custom op.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from mmfast.ops.registry import OpSpec, register
from mmfast.reference import window_attention as ref


def _cpp_checks(q: Tensor, *rest) -> list[str]:
    reasons = []
    if q.device.type != "cpu":
        reasons.append("the C++ kernel takes CPU tensors")
    if not hasattr(torch.ops.mmfast, "window_attention_fwd"):
        reasons.append("this build of mmfast._C has no window_attention_fwd")
    return reasons


def _triton_checks(q: Tensor, k: Tensor, v: Tensor, window_size, *rest) -> list[str]:
    try:
        from mmfast.triton import window_attention as tk
    except Exception as exc:  # noqa: BLE001 - reported as a reason, never raised
        return [f"mmfast.triton.window_attention failed to import: {exc}"]
    reasons = list(tk.not_supported_reasons(q, k, v, window_size))
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        reasons.append("CPU tensors need TRITON_INTERPRET=1")
    return reasons


def _fwd_cpp(q, k, v, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value, pad_then_roll):
    return torch.ops.mmfast.window_attention_fwd(q, k, v, bias, logit_scale, pad_value, list(window), list(shift),
                                                 scale, shift_mask, mask_value, pad_then_roll)


def _bwd_cpp(dout, q, k, v, out, lse, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value,
             pad_then_roll, deterministic):
    # The C++ backward reduces the bias-table gradient in a fixed order: always deterministic.
    return torch.ops.mmfast.window_attention_bwd(dout, q, k, v, out, lse, bias, logit_scale, pad_value, list(window),
                                                 list(shift), scale, shift_mask, mask_value, pad_then_roll)


def _fwd_triton(q, k, v, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value, pad_then_roll):
    from mmfast.triton import window_attention as tk

    return tk.window_attention_fwd(q, k, v, bias, logit_scale, pad_value, window_size=tuple(window),
                                   shift_size=tuple(shift), scale=scale, shift_mask=shift_mask,
                                   mask_value=mask_value, order="pad_roll" if pad_then_roll else "roll_pad")


def _bwd_triton(dout, q, k, v, out, lse, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value,
                pad_then_roll, deterministic):
    from mmfast.triton import window_attention as tk

    return tk.window_attention_bwd(dout, q, k, v, out, lse, bias, logit_scale, pad_value, window_size=tuple(window),
                                   shift_size=tuple(shift), scale=scale, shift_mask=shift_mask,
                                   mask_value=mask_value, order="pad_roll" if pad_then_roll else "roll_pad",
                                   deterministic=deterministic)


def _register_fakes() -> None:
    if not hasattr(torch.ops.mmfast, "window_attention_fwd"):
        return

    def stat(q):
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("mmfast::window_attention_fwd")
    def _(q, k, v, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value, pad_then_roll):
        return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=stat(q))

    @torch.library.register_fake("mmfast::window_attention_bwd")
    def _(dout, q, k, v, out, lse, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value,
          pad_then_roll):
        def like(t):
            return torch.empty_like(t) if t is not None else q.new_empty(0)

        return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), like(bias), like(logit_scale),
                like(pad_value))

    @torch.library.register_fake("mmfast::window_process")
    def _(x, window, shift, pad_then_roll, pad_value):
        b, h, w, c = x.shape
        hp, wp = -(-h // window[0]) * window[0], -(-w // window[1]) * window[1]
        return x.new_empty(b * (hp // window[0]) * (wp // window[1]), window[0] * window[1], c)

    @torch.library.register_fake("mmfast::window_process_reverse")
    def _(windows, hw, window, shift, pad_then_roll):
        hp, wp = -(-hw[0] // window[0]) * window[0], -(-hw[1] // window[1]) * window[1]
        b = windows.shape[0] // ((hp // window[0]) * (wp // window[1]))
        return windows.new_empty(b, hw[0], hw[1], windows.shape[-1])


_register_fakes()

WINDOW_FWD = register(OpSpec("window_attention", impls={"cpp": _fwd_cpp, "triton": _fwd_triton, "reference": None},
                             checks={"cpp": _cpp_checks, "triton": _triton_checks}))
_BWD = {"cpp": _bwd_cpp, "triton": _bwd_triton}


@torch.library.custom_op("mmfast::window_attention", mutates_args=())
def window_attention_op(q: Tensor, k: Tensor, v: Tensor, rel_pos_bias: Tensor | None, logit_scale: Tensor | None,
                        pad_value: Tensor | None, window_size: list[int], shift_size: list[int], scale: float,
                        shift_mask: bool, mask_value: float, pad_then_roll: bool, impl: str
                        ) -> tuple[Tensor, Tensor]:
    """(out [B, H, W, heads, hd] in q.dtype, lse [B, H, W, heads] fp32/fp64)."""
    out, lse = WINDOW_FWD.impls[impl](q, k, v, rel_pos_bias, logit_scale, pad_value, window_size, shift_size, scale,
                                      shift_mask, mask_value, pad_then_roll)
    return out, lse


@window_attention_op.register_fake
def _(q, k, v, rel_pos_bias, logit_scale, pad_value, window_size, shift_size, scale, shift_mask, mask_value,
      pad_then_roll, impl):
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=dt)


@torch.library.custom_op("mmfast::window_attention_backward", mutates_args=())
def window_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 rel_pos_bias: Tensor | None, logit_scale: Tensor | None, pad_value: Tensor | None,
                                 window_size: list[int], shift_size: list[int], scale: float, shift_mask: bool,
                                 mask_value: float, pad_then_roll: bool, deterministic: bool, impl: str
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d qkv [B, H, W, 3, heads, hd], d rel_pos_bias, d logit_scale, d pad_value); empty tensors
    for absent inputs. One d qkv buffer: custom-op outputs may not alias each other, and the
    Triton kernel writes dq, dk, dv as views of one buffer (returned without a copy)."""
    grads = _BWD[impl](dout, q, k, v, out, lse, rel_pos_bias, logit_scale, pad_value, window_size, shift_size, scale,
                       shift_mask, mask_value, pad_then_roll, deterministic)
    dq, dk, dv, db, dls, dpad = grads
    base = dq._base
    if (base is not None and base is dk._base and base is dv._base and base.dim() == 6 and base.shape[3] == 3
            and base.dtype == q.dtype and torch.equal(base[:, :, :, 0], dq)):
        dqkv = base
    else:
        dqkv = torch.stack([dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)], 3)

    def present(t, like):
        return t.to(like.dtype) if like is not None and t is not None and t.numel() else q.new_empty(0)

    return dqkv, present(db, rel_pos_bias), present(dls, logit_scale), present(dpad, pad_value)


@window_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, rel_pos_bias, logit_scale, pad_value, window_size, shift_size, scale, shift_mask,
      mask_value, pad_then_roll, deterministic, impl):
    def like(t):
        return torch.empty_like(t) if t is not None else q.new_empty(0)

    b, h, w, heads, hd = q.shape
    return q.new_empty(b, h, w, 3, heads, hd), like(rel_pos_bias), like(logit_scale), like(pad_value)


def _setup(ctx, inputs, output):
    (q, k, v, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value, pad_then_roll, impl) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, logit_scale, pad_value)
    ctx.args = (window, shift, scale, shift_mask, mask_value, pad_then_roll, impl)


_DETERMINISTIC = {"value": False}


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, logit_scale, pad_value = ctx.saved_tensors
    window, shift, scale, shift_mask, mask_value, pad_then_roll, impl = ctx.args
    deterministic = _DETERMINISTIC["value"] or torch.are_deterministic_algorithms_enabled()
    dqkv, db, dls, dpad = window_attention_backward_op(
        dout.contiguous(), q, k, v, out, lse, bias, logit_scale, pad_value, window, shift, scale, shift_mask,
        mask_value, pad_then_roll, deterministic, impl)
    dq, dk, dv = dqkv.unbind(3)
    return (dq, dk, dv, db if bias is not None else None, dls if logit_scale is not None else None,
            dpad if pad_value is not None else None) + (None,) * 7


window_attention_op.register_autograd(_backward, setup_context=_setup)


def set_deterministic(flag: bool) -> None:
    """Make the backward of the fused kernels reduce the bias-table gradient in a fixed order
    (also on when torch.use_deterministic_algorithms(True) is set)."""
    _DETERMINISTIC["value"] = bool(flag)


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, window_size, shift_size=0,
                     rel_pos_bias: Tensor | None = None, scale: float | None = None,
                     logit_scale: Tensor | None = None, pad_value: Tensor | None = None, shift_mask: bool = True,
                     mask_value: float = -100.0, order: str = "roll_pad", impl: str | None = None) -> Tensor:
    """Dispatching entry point; see :func:`mmfast.functional.window_attention` for the contract."""
    # The reference validates every argument with clear errors; every backend rejects the same inputs.
    window, shift = ref.validate_args(q, k, v, window_size, shift_size, rel_pos_bias, logit_scale, pad_value, order)
    backend = WINDOW_FWD.select(q.device, impl, q, k, v, window)
    if backend == "reference":
        return ref.window_attention(q, k, v, window_size=window, shift_size=shift, rel_pos_bias=rel_pos_bias,
                                    scale=scale, logit_scale=logit_scale, pad_value=pad_value, shift_mask=shift_mask,
                                    mask_value=mask_value, order=order)
    scale_f = float(scale) if scale is not None else q.shape[-1] ** -0.5
    out, _ = window_attention_op(q, k, v, rel_pos_bias, logit_scale, pad_value, list(window), list(shift), scale_f,
                                 bool(shift_mask), float(mask_value), order == "pad_roll", backend)
    return out


__all__ = ["window_attention", "set_deterministic", "WINDOW_FWD"]
