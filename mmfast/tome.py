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

from torch import nn

from mmfast.patch.tome_core import (  # noqa: F401  (re-exported: the public ToMe names)
    RSpec,
    ToMeState,
    effective_r,
    is_patched,
    merge_tokens,
    num_mergeable,
    parse_r,
    restore_class,
)

__all__ = ["ToMeState", "apply_patch", "remove_patch", "parse_r", "is_patched", "merge_tokens", "num_mergeable"]


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
