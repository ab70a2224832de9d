"""Fused windowed / shifted-window attention: custom op (fake + autograd) and backend dispatch.

``mmfast::window_attention`` takes q, k, v on the spatial layout [B, H, W, heads, head_dim] and
does roll + pad + partition + relative-position bias + shift mask + softmax + PV + reverse in one
kernel (C++ on CPU tensors, Triton on CUDA tensors). The reference backend
(mmfast.reference.window_attention) is plain differentiable torch and runs outside the custom op.

The flash-attn route (backend ``flash_attn``, optional: ``pip install flash-attn`` on a CUDA
machine; it cannot be built on a CPU-only one). For windows with no bias, no Swin v2 cosine
logits and no shift mask in effect (the ViTDet / DITO case: ``shift == 0``, or
``shift_mask=False``), the op can instead run as :func:`mmfast.ops.window_process.window_partition` of q, k
and v (roll + pad with ``pad_value`` + partition, in one copy each), ``flash_attn.flash_attn_func``
on ``[B * nW, Wh * Ww, heads, head_dim]``, and :func:`window_unpartition` (reverse, crop, un-roll).
Same semantics as the reference, both orders; it runs outside the custom op, and autograd flows
through the partition ops and flash-attn's own autograd. Eager mode is what is tested (with a
stand-in for flash-attn on CPU); under torch.compile it works as far as the installed flash-attn
traces (flash-attn >= 2.6 registers torch custom ops), which is untested here.

Whether ``impl="auto"`` picks it is decided by the flash-attn policy (:func:`set_flash_attn_policy`,
or the environment variable ``MMFAST_WINDOW_FLASH`` read at import), and only ever for inputs that
qualify (:func:`flash_attn_reasons`) on a device type in ``_FLASH_DEVICE_TYPES``:

* ``"auto"`` (the default): after mmfast's own kernels and before the pure-torch reference. It
  never displaces a kernel of ours; it replaces the reference, which materialises the
  ``[B * nW, heads, N, N]`` logits, where the Triton kernel cannot run (Triton not installed,
  head_dim 136-256, windows of more than 16 x 16 tokens).
* ``"always"``: first, ahead of the Triton kernel. For when the GPU benchmark (``python -m
  mmfast.bench window --device cuda``: providers ``flash-attn`` and ``mmfast[flash_attn]``) shows
  flash-attn faster on your shapes. No GPU was available to measure it, so it is not the default.
* ``"never"``: only when forced (``impl="flash_attn"`` or ``mmfast.use_backend("flash_attn",
  ops=["window_attention"])``).

A forced ``flash_attn`` that cannot run raises a RuntimeError listing every reason.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from mmfast.ops import registry
from mmfast.ops.registry import Backend, Inputs, OpSpec, register
from mmfast.reference import window_attention as ref


@dataclass(frozen=True)
class WindowInputs(Inputs):
    """What decides the backend of a window attention call (validated by the reference first)."""

    q: Tensor
    k: Tensor
    v: Tensor
    window: tuple[int, int]
    shift: tuple[int, int]
    rel_pos_bias: Tensor | None
    logit_scale: Tensor | None
    shift_mask: bool


def _cpp_checks(inputs: WindowInputs) -> list[str]:
    reasons = []
    if inputs.q.device.type != "cpu":
        reasons.append("the C++ kernel takes CPU tensors")
    if not hasattr(torch.ops.mmfast, "window_attention_fwd"):
        reasons.append("this build of mmfast._C has no window_attention_fwd")
    return reasons


def _triton_checks(inputs: WindowInputs) -> list[str]:
    try:
        from mmfast.triton import window_attention as tk
    except Exception as exc:  # noqa: BLE001 - reported as a reason, never raised
        return [f"mmfast.triton.window_attention failed to import: {exc}"]
    reasons = list(tk.not_supported_reasons(inputs.q, inputs.k, inputs.v, inputs.window))
    if inputs.q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
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


# ------------------------------------------------------------------------------------------------
# the flash-attn route (module docstring)

FLASH_POLICIES = ("auto", "always", "never")
#: device types flash-attn runs on (tests add "cpu", with a stand-in flash_attn module)
_FLASH_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
#: dtypes flash_attn_func takes (tests add float32 / float64 for the stand-in)
_FLASH_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
#: flash-attn 2 launches one CUDA grid row (gridDim.y) per sequence: at most 65535 windows per call
_FLASH_MAX_WINDOWS = 65535


def _policy_from_env() -> str:
    value = os.environ.get("MMFAST_WINDOW_FLASH", "auto").strip().lower() or "auto"
    if value not in FLASH_POLICIES:
        warnings.warn(f"mmfast: MMFAST_WINDOW_FLASH={value!r} is not one of {FLASH_POLICIES}; using 'auto'",
                      RuntimeWarning, stacklevel=2)
        return "auto"
    return value


_FLASH_POLICY = {"value": _policy_from_env()}


def set_flash_attn_policy(policy: str) -> str:
    """When ``impl="auto"`` may route qualifying window attention through flash-attn: ``"auto"``
    (default: ahead of the reference only), ``"always"`` (ahead of every kernel) or ``"never"``
    (only when forced). See the module docstring. Returns the previous policy."""
    if policy not in FLASH_POLICIES:
        raise ValueError(f"flash-attn policy must be one of {FLASH_POLICIES}, got {policy!r}")
    prev = _FLASH_POLICY["value"]
    _FLASH_POLICY["value"] = policy
    return prev


def flash_attn_policy() -> str:
    """The current flash-attn policy (:func:`set_flash_attn_policy`)."""
    return _FLASH_POLICY["value"]


def _preference(device_type: str) -> tuple[str, ...]:
    base = registry.default_preference(device_type)
    policy = _FLASH_POLICY["value"]
    if policy == "never" or device_type not in _FLASH_DEVICE_TYPES:
        return base
    if policy == "always":
        return ("flash_attn",) + tuple(b for b in base if b != "flash_attn")
    rest = tuple(b for b in base if b not in ("flash_attn", "reference"))
    return rest + ("flash_attn", "reference")


def flash_attn_reasons(q: Tensor, k: Tensor, v: Tensor, window, shift=(0, 0), rel_pos_bias: Tensor | None = None,
                       logit_scale: Tensor | None = None, shift_mask: bool = True) -> list[str]:
    """Why the flash-attn route cannot take these (validated) inputs; empty when it can. Whether
    flash_attn is installed is the registry's check (``mmfast.backends()["flash_attn"]``)."""
    reasons = []
    if q.device.type not in _FLASH_DEVICE_TYPES:
        reasons.append(f"flash-attn takes tensors on {' / '.join(_FLASH_DEVICE_TYPES)}, got {q.device.type}")
    elif q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons.append(f"flash-attn 2 needs an Ampere or newer GPU (sm80+), got "
                       f"sm{''.join(map(str, torch.cuda.get_device_capability(q.device)))}")
    if q.dtype not in _FLASH_DTYPES:
        reasons.append(f"flash-attn takes {' / '.join(str(d).replace('torch.', '') for d in _FLASH_DTYPES)}, "
                       f"got {str(q.dtype).replace('torch.', '')}")
    head_dim = q.shape[-1]
    if head_dim > _FLASH_MAX_HEAD_DIM or head_dim % 8:
        reasons.append(f"flash-attn needs head_dim <= {_FLASH_MAX_HEAD_DIM} and a multiple of 8, got {head_dim}")
    if rel_pos_bias is not None:
        reasons.append("rel_pos_bias is given (flash-attn takes no additive bias)")
    if logit_scale is not None:
        reasons.append("logit_scale is given (Swin v2 cosine attention is not flash-attn's softmax(q k^T * scale))")
    if shift_mask and any(shift):
        reasons.append(f"the shift mask is in effect (shift_size {tuple(shift)} with shift_mask=True; flash-attn "
                       "takes no mask: use shift 0, or shift_mask=False as DITO does)")
    b, h, w = q.shape[:3]
    n_windows = b * (-(-h // window[0])) * (-(-w // window[1]))
    if n_windows > _FLASH_MAX_WINDOWS:
        reasons.append(f"{n_windows} windows (B * nW) in one call: flash-attn's grid takes at most "
                       f"{_FLASH_MAX_WINDOWS}")
    return reasons


def _flash_checks(inputs: WindowInputs) -> list[str]:
    return flash_attn_reasons(inputs.q, inputs.k, inputs.v, inputs.window, inputs.shift, inputs.rel_pos_bias,
                              inputs.logit_scale, inputs.shift_mask)


def _fwd_flash(q, k, v, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value, pad_then_roll):
    """partition -> flash_attn_func -> unpartition (module docstring); differentiable. Only chosen for
    inputs without bias, logit_scale or shift mask (:func:`flash_attn_reasons`)."""
    import flash_attn

    from mmfast.ops.window_process import process_backend, window_partition, window_unpartition

    order = "pad_roll" if pad_then_roll else "roll_pad"
    b, h, w, heads, hd = q.shape
    n = window[0] * window[1]
    pb = process_backend(q, use_context=False)  # a context forcing flash_attn must not reach the partition op
    pads = (pad_value.to(q.dtype).reshape(3, heads * hd).unbind(0) if pad_value is not None else (None, None, None))
    qw, kw, vw = (window_partition(t.reshape(b, h, w, heads * hd), window, shift, order=order, pad_value=p,
                                   impl=pb).view(-1, n, heads, hd) for t, p in zip((q, k, v), pads))
    kwargs = {}
    if torch.are_deterministic_algorithms_enabled():
        kwargs["deterministic"] = True  # flash-attn >= 2.4: no atomics in the dq reduction
    out = flash_attn.flash_attn_func(qw, kw, vw, dropout_p=0.0, softmax_scale=scale, causal=False, **kwargs)
    if isinstance(out, tuple):  # return_attn_probs / other versions: (out, lse, ...)
        out = out[0]
    out = window_unpartition(out.reshape(-1, n, heads * hd), (h, w), window, shift, order=order, impl=pb)
    return out.view(b, h, w, heads, hd)


def _fwd_reference(q, k, v, bias, logit_scale, pad_value, window, shift, scale, shift_mask, mask_value,
                   pad_then_roll):
    return ref.window_attention(q, k, v, window_size=tuple(window), shift_size=tuple(shift), rel_pos_bias=bias,
                                scale=scale, logit_scale=logit_scale, pad_value=pad_value, shift_mask=shift_mask,
                                mask_value=mask_value, order="pad_roll" if pad_then_roll else "roll_pad")


# Every backend's forward takes (q, k, v, rel_pos_bias, logit_scale, pad_value, window, shift, scale,
# shift_mask, mask_value, pad_then_roll). The kernels (with a backward) run inside the custom op
# below and return (out, lse); their backward takes (dout, q, k, v, out, lse, rel_pos_bias,
# logit_scale, pad_value, window, shift, scale, shift_mask, mask_value, pad_then_roll, deterministic)
# and returns (dq, dk, dv, d rel_pos_bias, d logit_scale, d pad_value). flash_attn and the reference
# are differentiable torch: they run outside the custom op and return out.
WINDOW = register(OpSpec("window_attention", {
    "cpp": Backend(_fwd_cpp, _bwd_cpp, _cpp_checks),
    "triton": Backend(_fwd_triton, _bwd_triton, _triton_checks),
    "flash_attn": Backend(_fwd_flash, check=_flash_checks, auto=False),
    "reference": Backend(_fwd_reference),
}, preference_fn=_preference))


@torch.library.custom_op("mmfast::window_attention", mutates_args=())
def window_attention_op(q: Tensor, k: Tensor, v: Tensor, rel_pos_bias: Tensor | None, logit_scale: Tensor | None,
                        pad_value: Tensor | None, window_size: list[int], shift_size: list[int], scale: float,
                        shift_mask: bool, mask_value: float, pad_then_roll: bool, impl: str
                        ) -> tuple[Tensor, Tensor]:
    """(out [B, H, W, heads, hd] in q.dtype, lse [B, H, W, heads] fp32/fp64)."""
    out, lse = WINDOW.backend(impl).forward(q, k, v, rel_pos_bias, logit_scale, pad_value, window_size, shift_size,
                                            scale, shift_mask, mask_value, pad_then_roll)
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
    grads = WINDOW.backend(impl).backward(dout, q, k, v, out, lse, rel_pos_bias, logit_scale, pad_value, window_size,
                                          shift_size, scale, shift_mask, mask_value, pad_then_roll, deterministic)
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


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, logit_scale, pad_value = ctx.saved_tensors
    window, shift, scale, shift_mask, mask_value, pad_then_roll, impl = ctx.args
    deterministic = torch.are_deterministic_algorithms_enabled()
    dqkv, db, dls, dpad = window_attention_backward_op(
        dout.contiguous(), q, k, v, out, lse, bias, logit_scale, pad_value, window, shift, scale, shift_mask,
        mask_value, pad_then_roll, deterministic, impl)
    dq, dk, dv = dqkv.unbind(3)
    return (dq, dk, dv, db if bias is not None else None, dls if logit_scale is not None else None,
            dpad if pad_value is not None else None) + (None,) * 7


window_attention_op.register_autograd(_backward, setup_context=_setup)


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, window_size, shift_size=0,
                     rel_pos_bias: Tensor | None = None, scale: float | None = None,
                     logit_scale: Tensor | None = None, pad_value: Tensor | None = None, shift_mask: bool = True,
                     mask_value: float = -100.0, order: str = "roll_pad", impl: str | None = None) -> Tensor:
    """Dispatching entry point; see :func:`mmfast.functional.window_attention` for the contract."""
    # The reference validates every argument with clear errors; every backend rejects the same inputs.
    window, shift = ref.validate_args(q, k, v, window_size, shift_size, rel_pos_bias, logit_scale, pad_value, order)
    backend = WINDOW.select(WindowInputs(q, k, v, window, shift, rel_pos_bias, logit_scale, bool(shift_mask)), impl)
    args = (q, k, v, rel_pos_bias, logit_scale, pad_value, list(window), list(shift),
            float(scale) if scale is not None else q.shape[-1] ** -0.5, bool(shift_mask), float(mask_value),
            order == "pad_roll")
    entry = WINDOW.backend(backend)
    if entry.backward is None:
        return entry.forward(*args)
    out, _ = window_attention_op(*args, backend)
    return out


__all__ = ["window_attention", "set_flash_attn_policy", "flash_attn_policy", "flash_attn_reasons",
           "FLASH_POLICIES", "WINDOW", "WindowInputs"]
