"""Token merging (ToMe, Bolya et al., ICLR 2023) as in-place patches of timm and open_clip ViTs.

Written from the algorithm (not from ToMe's code). Public API:

* :func:`apply_patch` ``(model, r=0, prop_attn=True, trace_source=False)``: patch a timm
  ``VisionTransformer``, an open_clip ``VisionTransformer`` or an open_clip ``CLIP`` /
  ``CustomTextCLIP`` (its ``.visual`` is patched) in place and return it. Afterwards
  ``model.r = ...`` sets the merge schedule (an int, a per-layer list, or an ``(r, inflection)``
  tuple, see :func:`parse_r`).
* :func:`remove_patch` ``(model)``: restore the original classes exactly (the patch adds no
  parameter or buffer, so the ``state_dict`` never changes).
* :func:`parse_r`: the per-layer schedule (re-exported from :mod:`mmfast.reference.tome`).
* :func:`merge_tokens`: one merge step with prefix-token protection (what each patched block runs).

Per block, with ``r`` the block's merge count (``block._tome_r``, a Python int):

1. attention; the keys' mean over heads (after timm's ``k_norm``: the keys attention uses) is the
   matching metric. With proportional attention and token sizes, ``log(size)`` is added to the
   logits along the key axis. On CPU, when no gradient is needed (inference) and the attention is
   plain (no q/k norm, gate or active dropout), one C++ kernel computes it straight from the qkv
   projection output (:func:`mmfast.ops.tome.proportional_attention`). Otherwise (CUDA, training)
   the bias is an additive float mask ``[B, 1, 1, N]`` passed to ``F.scaled_dot_product_attention``,
   or added before the explicit softmax when the model was built with timm's non-fused attention;
2. the attention residual (LayerScale, drop path: the model's own modules);
3. bipartite soft matching and the size-weighted merge (:func:`mmfast.functional.bipartite_soft_matching`,
   :func:`mmfast.functional.merge_wavg`, and :func:`mmfast.functional.merge_source` when tracing);
4. the MLP residual.

A block with ``r == 0`` (or an effective r of 0) that sees no token sizes yet runs the original,
unpatched block forward, so ``r=0`` is bitwise the unpatched model.

Prefix tokens (class, distillation, register tokens: timm's ``num_prefix_tokens``; open_clip's
one class token) are never merged and keep size 1. ``bipartite_soft_matching`` itself protects only
token 0 (``class_token``) and token 1 (``distill_token``), so for more than one prefix token the
first ``P - 1`` prefix tokens are set aside and the matching runs on the sequence
``[prefix token P - 1, patch tokens...]`` with ``class_token=True``: the last prefix token stands in
as the class token (its row of the score matrix is masked, so it never merges and its metric does
not influence the matching), and the patch tokens are split into the bipartite sets with exactly
the parity, order and tie-breaks ToMe gives them behind a single class token. With exactly one
prefix token this sequence IS the full sequence, so the split path and a direct
``class_token=True`` call give bitwise identical results (tested). Merging only the patch tokens
with ``class_token=False`` would NOT be equivalent to the one-class-token case (the alternating
split would start one token earlier and the survivors would keep a score order), which is why the
stand-in is used. With no prefix token the full sequence is matched with ``class_token=False``.

No per-call Python state lives on the model: ``forward`` creates a :class:`ToMeState` and threads
it through the blocks, so ``torch.compile`` sees plain code (``r`` per block is a Python int
attribute: changing it recompiles). ``size`` and ``source`` of a forward are returned by
``model.forward_features_tome(x) -> (tokens, state)``.

Pooling: ``'token'`` / open_clip ``'tok'`` read the (never merged) class token; ``'avg'`` averages
patch tokens weighted by their size (the mean over the original tokens); ``''`` / ``'none'`` return
the merged tokens. Pools with no exact size-aware form (timm ``'avgmax'``, ``'max'``, ``'map'``,
``'prr'``, open_clip attentional pooling) raise ``ValueError`` at patch time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmfast import functional as MF
from mmfast.patch import classes
from mmfast.reference.tome import effective_r, parse_r, proportional_attention_bias

__all__ = ["ToMeState", "apply_patch", "remove_patch", "parse_r", "is_patched", "merge_tokens", "num_mergeable"]

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


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the patched subclass of its original class (idempotent)."""
    classes.swap_class(module, mixin)


def restore_class(module: nn.Module) -> None:
    """Undo :func:`swap_class` and drop the attributes the patch added."""
    classes.restore_class(module, FAMILY, _BLOCK_ATTRS + _MODEL_ATTRS)


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


def _module(name: str):
    """``sys.modules[name]`` if that library is already imported (a model of its types can only exist
    then), else None: dispatch never imports timm or open_clip."""
    return sys.modules.get(name)


def _unsupported(model: object) -> TypeError:
    cls = type(model)
    return TypeError(
        f"mmfast.tome: unsupported model type {cls.__module__}.{cls.__qualname__}; token merging patches "
        "timm.models.vision_transformer.VisionTransformer, open_clip.transformer.VisionTransformer and "
        "open_clip CLIP / CustomTextCLIP (their .visual)")


def _backend(model: nn.Module):
    """The patch module for ``model`` (``mmfast.patch.tome_timm`` or ``tome_open_clip``)."""
    timm_vit = _module("timm.models.vision_transformer")
    if timm_vit is not None and isinstance(model, timm_vit.VisionTransformer):
        from mmfast.patch import tome_timm

        return tome_timm
    oc_tf, oc_model = _module("open_clip.transformer"), _module("open_clip.model")
    if (oc_tf is not None and isinstance(model, oc_tf.VisionTransformer)) or (
            oc_model is not None and isinstance(model, (oc_model.CLIP, oc_model.CustomTextCLIP))):
        from mmfast.patch import tome_open_clip

        return tome_open_clip
    raise _unsupported(model)


def apply_patch(model: nn.Module, r: RSpec = 0, prop_attn: bool = True, trace_source: bool = False) -> nn.Module:
    """Patch ``model`` in place for token merging and return it.

    Args:
        model: a timm ``VisionTransformer`` (subclasses that keep its ``forward``,
            ``forward_features`` and ``pool``, e.g. DeiT's distilled model) whose blocks are all timm
            ``Block`` with ``Attention``; an open_clip ``VisionTransformer`` (batch-first
            ``ResidualAttentionBlock`` with ``nn.MultiheadAttention``); or an open_clip ``CLIP`` /
            ``CustomTextCLIP`` (its ``.visual`` is patched, and ``model.r`` forwards to it).
        r: merge schedule (see :func:`parse_r`), settable later with ``model.r = ...``.
        prop_attn: proportional attention (``log(size)`` added to the logits of merged keys).
        trace_source: track which original tokens each token holds
            (``model.forward_features_tome(x)[1].source``).

    Patching an already patched model updates its settings. Raises ``TypeError`` for other models
    or unrecognised blocks (nothing is modified then), ``ValueError`` for a bad ``r`` or a pool
    with no size-aware form.
    """
    return _backend(model).apply(model, r=r, prop_attn=bool(prop_attn), trace_source=bool(trace_source))


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_patch` in place (original classes, no added attributes); returns ``model``.

    A model that is not patched is returned unchanged.
    """
    for m in model.modules():
        restore_class(m)
    return model
