"""What the ToMe patches share (mmfast.patch.tome_timm, tome_open_clip): the merge state a patched
model threads through its blocks, the token merge itself, the size-weighted helpers, and the
patched-class plumbing of the "tome" family. ``mmfast.tome`` is the public facade over it; this
module imports neither that facade nor the patches, so the three have no import cycle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmfast import functional as MF
from mmfast.functional import effective_r, parse_r, proportional_attention_bias
from mmfast.patch import classes

__all__ = ["ToMeState", "RSpec", "parse_r", "effective_r", "is_patched", "merge_tokens", "num_mergeable",
           "attention_bias", "weighted_mean", "ToMePatched", "ToMeModelMixin", "original_class",
           "restore_class", "linear", "patch_model"]

RSpec = int | Sequence[int] | tuple[int, float]


class ToMeState:
    """What one forward threads through the patched blocks (created anew by every forward).

    Attributes:
        size: ``[B, N, 1]`` token sizes, ``None`` until the first merge.
        source: ``[B, N, N0]`` 0/1 matrix of the original tokens in each token (only with
            ``trace_source``; the identity at the start of the forward).
        num_prefix_tokens: tokens at the front that are never merged.
        prop_attn: add ``log(size)`` to the attention logits.
        trace_source: track ``source``.
    """

    def __init__(self, num_prefix_tokens: int, prop_attn: bool, trace_source: bool, size: Tensor | None = None,
                 source: Tensor | None = None) -> None:
        self.size = size
        self.source = source
        self.num_prefix_tokens = num_prefix_tokens
        self.prop_attn = prop_attn
        self.trace_source = trace_source

    def __repr__(self) -> str:
        shape = lambda t: None if t is None else tuple(t.shape)
        return (f"ToMeState(size={shape(self.size)}, source={shape(self.source)}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, prop_attn={self.prop_attn}, "
                f"trace_source={self.trace_source})")


def num_mergeable(num_tokens: int, r: int, num_prefix_tokens: int) -> int:
    """How many tokens :func:`merge_tokens` merges for ``num_tokens`` tokens (ToMe's clamp of r)."""
    if num_prefix_tokens == 0:
        return effective_r(num_tokens, r, class_token=False)
    return effective_r(num_tokens - num_prefix_tokens + 1, r, class_token=True)


def _identity_source(x: Tensor) -> Tensor:
    b, n = x.shape[0], x.shape[1]
    return torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)


def merge_tokens(x: Tensor, metric: Tensor, r: int, size: Tensor | None = None, source: Tensor | None = None,
                 num_prefix_tokens: int = 1, trace_source: bool = False, split_prefix: bool = False
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One ToMe merge of ``x`` ``[B, N, C]`` by ``metric`` ``[B, N, C']``, prefix tokens protected.

    Returns ``(x, size, source)``: ``[B, N - r', C]``, ``[B, N - r', 1]`` and (when
    ``trace_source``; else ``source`` as given) ``[B, N - r', N0]``, with ``r'`` the clamped r
    (:func:`num_mergeable`). When ``r'`` is 0 the inputs are returned unchanged (``size`` may stay
    ``None``). The first ``num_prefix_tokens`` tokens stay first, in order, with size 1.

    Prefix tokens: none, the full sequence is matched with ``class_token=False``; one, a direct
    ``class_token=True`` call; more, the stand-in split of the module docstring. ``split_prefix=True``
    forces the split path for one prefix token as well (it gives identical results; tested).
    """
    p = int(num_prefix_tokens)
    if p < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    if num_mergeable(x.shape[1], r, p) == 0:
        return x, size, source
    if trace_source and source is None:
        source = _identity_source(x)
    split = p > 1 or (bool(split_prefix) and p == 1)
    if not split:
        merge, _ = MF.bipartite_soft_matching(metric, r, class_token=p == 1)
        if trace_source:
            source = MF.merge_source(merge, x, source)
        x, size = MF.merge_wavg(merge, x, size)
        return x, size, source
    keep = p - 1  # prefix tokens set aside; token p - 1 stands in as the class token
    merge, _ = MF.bipartite_soft_matching(metric[:, keep:], r, class_token=True)
    xs = x[:, keep:]
    if trace_source:
        assert source is not None
        source = torch.cat([source[:, :keep], MF.merge_source(merge, xs, source[:, keep:])], dim=1)
    merged, size_s = MF.merge_wavg(merge, xs, None if size is None else size[:, keep:])
    head_size = x.new_ones(x.shape[0], keep, 1).to(size_s.dtype) if size is None else size[:, :keep]
    return torch.cat([x[:, :keep], merged], dim=1), torch.cat([head_size, size_s], dim=1), source


def attention_bias(size: Tensor | None, prop_attn: bool, dtype: torch.dtype) -> Tensor | None:
    """The proportional-attention mask ``[B, 1, 1, N]`` (``log(size)``), or ``None`` without sizes."""
    if size is None or not prop_attn:
        return None
    return proportional_attention_bias(size).to(dtype)


_PLAIN_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def linear(x: Tensor, layer: nn.Module, gelu: bool = False) -> Tensor:
    """``layer(x)`` (then exact GELU if ``gelu``). An exact ``nn.Linear`` (or a ``Linear`` subclass that
    only renames it, like MultiheadAttention's ``out_proj``) with no hooks runs as
    :func:`mmfast.functional.linear` of its weights (oneDNN's fused epilogue on CPU inference)."""
    if type(layer) in _PLAIN_LINEARS and not layer._forward_hooks and not layer._forward_pre_hooks:
        return MF.linear(x, layer.weight, layer.bias, gelu=gelu)
    y = layer(x)
    return torch.nn.functional.gelu(y) if gelu else y


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Size-weighted mean over tokens: ``sum(x * size) / sum(size)``, ``[B, N, C] -> [B, C]``."""
    size = size.to(x.dtype)
    return (x * size).sum(dim=1) / size.sum(dim=1)


# ------------------------------------------------------------------------------------------------
# patched classes: mmfast.patch.classes makes them (pickle-safe), in the "tome" family

FAMILY = "tome"


class ToMePatched(classes.PatchedModule):
    """Base of the ToMe mixins (block and model, timm and open_clip)."""

    family = FAMILY
    prefix = "ToMe"


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before patching (its class when it is not patched)."""
    return classes.original_class(module, FAMILY)


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or, for an open_clip CLIP, its ``.visual``) carries the ToMe patch."""
    return classes.is_patched(model, FAMILY)


_BLOCK_ATTRS = ("_tome_r",)
_MODEL_ATTRS = ("_tome_r_spec", "_tome_prop_attn", "_tome_trace_source")


def restore_class(module: nn.Module) -> None:
    """Undo :func:`mmfast.patch.classes.swap_class` (tome family) and drop the attributes the patch added."""
    classes.restore_class(module, FAMILY, _BLOCK_ATTRS + _MODEL_ATTRS)


def patch_model(model: nn.Module, blocks: Sequence[nn.Module], block_mixin: type, model_mixin: type, r: RSpec,
                prop_attn: bool, trace_source: bool) -> None:
    """Swap the classes of ``blocks`` and of ``model`` (which owns them) to the ToMe mixins and set
    the schedule. ``r`` is validated before anything is touched; a block patched before keeps its r
    until the model's ``r`` is set here."""
    parse_r(len(blocks), r)
    for blk in blocks:
        classes.swap_class(blk, block_mixin)
        if "_tome_r" not in blk.__dict__:
            blk._tome_r = 0
    classes.swap_class(model, model_mixin)
    model._tome_prop_attn = prop_attn
    model._tome_trace_source = trace_source
    model.r = r


class ToMeModelMixin(ToMePatched):
    """``r`` as a settable property on a patched model; the per-layer schedule goes to the blocks."""

    def _tome_blocks(self) -> Sequence[nn.Module]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def r(self) -> RSpec:
        """The merge schedule as last set: an int, a per-layer list or an ``(r, inflection)`` tuple."""
        return self._tome_r_spec

    @r.setter
    def r(self, value: RSpec) -> None:
        blocks = self._tome_blocks()
        per_layer = parse_r(len(blocks), value)
        for blk, r in zip(blocks, per_layer):
            blk._tome_r = int(r)
        self._tome_r_spec = value if isinstance(value, (int, tuple)) else list(value)

    @property
    def tome_r_per_layer(self) -> list[int]:
        """The per-layer merge counts the blocks use."""
        return [int(blk._tome_r) for blk in self._tome_blocks()]

    def _tome_new_state(self, x: Tensor, num_prefix_tokens: int) -> ToMeState:
        state = ToMeState(num_prefix_tokens, bool(self._tome_prop_attn), bool(self._tome_trace_source))
        if state.trace_source:
            state.source = _identity_source(x)
        return state
