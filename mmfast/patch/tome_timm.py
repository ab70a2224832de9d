"""ToMe token merging for timm ``VisionTransformer`` (used through :func:`mmfast.tome.apply_patch`).

The model's class and each block's class are swapped for cached subclasses; no parameter, buffer or
hook is added, and :func:`mmfast.tome.remove_patch` swaps them back. Supported: blocks that are
exactly ``timm.models.vision_transformer.Block`` with exactly ``timm.layers.Attention`` (q/k norm,
scale norm, gated attention, fused or explicit attention, LayerScale, drop path, any MLP); class,
distillation and register tokens (``num_prefix_tokens``) are never merged. In merging blocks the
attention is computed here from the ``Attention`` module's layers (its own forward hooks do not
run there); blocks with nothing to merge yet run timm's own ``Block.forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmfast import functional as MF
from mmfast.patch import tome_core as T

__all__ = ["apply", "tome_attention", "fused_mlp", "plain_gelu_mlp", "SIZE_AWARE_POOLS"]

#: ``global_pool`` values that have an exact form with merged tokens.
SIZE_AWARE_POOLS = ("", "token", "avg")


def tome_attention(attn: Attention, x: Tensor, size: Tensor | None, prop_attn: bool) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward`` plus ToMe: returns ``(output [B, N, C], metric [B, N, head_dim])``.

    The metric is the mean over heads of the keys after ``k_norm``. With ``prop_attn`` and sizes,
    ``log(size)`` is added to the logits per key: an additive ``[B, 1, 1, N]`` mask to SDPA on the
    fused path, or added before the softmax on timm's explicit path.
    """
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv_flat = T.linear(x, attn.qkv)
    bias = T.attention_bias(size, prop_attn, qkv_flat.dtype)
    if _plain_attention(attn):
        out = MF.fused_proportional_attention(qkv_flat, None if bias is None else bias.reshape(b, n), attn.num_heads,
                                         attn.scale)
        if out is not None:
            metric = qkv_flat.view(b, n, 3, attn.num_heads, -1)[:, :, 1].mean(dim=2)
            return attn.proj_drop(T.linear(out, attn.proj)), metric
    qkv = qkv_flat.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(b, n, getattr(attn, "attn_dim", attn.num_heads * attn.head_dim))
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(T.linear(out, attn.proj))
    return out, k.mean(dim=1)


def fused_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """The block's MLP; fc1 + GELU fused by oneDNN on CPU inference (:func:`mmfast.functional.linear`)."""
    if plain_gelu_mlp(mlp):
        return T.linear(T.linear(x, mlp.fc1, gelu=True), mlp.fc2)
    return mlp(x)


def plain_gelu_mlp(mlp: nn.Module) -> bool:
    """A timm ``Mlp`` that is exactly fc1 -> exact GELU -> fc2 with no norm and no active dropout."""
    act = getattr(mlp, "act", None)
    drops = [getattr(mlp, n, None) for n in ("drop1", "drop2")]
    return (type(mlp) is Mlp and type(act) is nn.GELU and act.approximate == "none"
            and isinstance(getattr(mlp, "norm", None), nn.Identity)
            and all(d is None or not mlp.training or d.p == 0 for d in drops)
            and not mlp._forward_hooks and not mlp._forward_pre_hooks)


def _plain_attention(attn: Attention) -> bool:
    """Nothing but attention between the qkv and output projections (no q/k norm, gate, output norm,
    active dropout): what the fused proportional-attention kernel computes."""
    return (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
            and getattr(attn, "gate", None) is None and isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
            and not (attn.training and attn.attn_drop.p > 0))


class ToMeBlockMixin(T.ToMePatched):
    """Patched timm ``Block``: ``forward(x, attn_mask=None, is_causal=False, tome_state=None)``."""

    _tome_r: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                tome_state: T.ToMeState | None = None) -> Tensor:
        """With a ``tome_state`` (the patched model's forward passes one): attention, merge, MLP,
        updating ``tome_state.size`` / ``.source``. Without one: the original block, which is only
        allowed while this block's r is 0 (merging needs the sizes the model threads)."""
        if tome_state is None:
            if self._tome_r > 0:
                raise RuntimeError(
                    f"a ToMe-patched timm Block with r={self._tome_r} was called without a ToMeState (e.g. by "
                    "forward_intermediates or by iterating model.blocks); call the patched model's forward / "
                    "forward_features / forward_features_tome, or set model.r = 0")
            return type(self)._mmfast_original_tome.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        s = tome_state
        x, s.size, s.source = self.tome_forward(x, s.size, s.source, s.num_prefix_tokens, s.prop_attn,
                                                s.trace_source, attn_mask, is_causal)
        return x

    def tome_forward(self, x: Tensor, size: Tensor | None, source: Tensor | None, num_prefix_tokens: int,
                     prop_attn: bool, trace_source: bool, attn_mask: Tensor | None = None,
                     is_causal: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The block as a pure function of ``(x, size, source)``: returns the new triple."""
        r = self._tome_r
        if size is None and T.num_mergeable(x.shape[1], r, num_prefix_tokens) == 0:
            # nothing merged so far and nothing to merge here: timm's own block (bitwise unpatched)
            out = type(self)._mmfast_original_tome.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
            return out, size, source
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal cannot be combined with token merging (the token count "
                             "changes); set model.r = 0 to use them")
        y, metric = tome_attention(self.attn, self.norm1(x), size, prop_attn)
        x = x + self.drop_path1(self.ls1(y))
        x, size, source = T.merge_tokens(x, metric, r, size, source, num_prefix_tokens, trace_source)
        x = x + self.drop_path2(self.ls2(fused_mlp(self.mlp, self.norm2(x))))
        return x, size, source


def _check_pool(model: VisionTransformer, pool_type: str | None = None) -> None:
    pool_type = model.global_pool if pool_type is None else pool_type
    if model.attn_pool is not None:
        raise ValueError(f"ToMe: global_pool={pool_type!r} uses attention pooling ({type(model.attn_pool).__name__}), "
                         "which has no size-aware form here; use 'token' or 'avg'")
    if pool_type not in SIZE_AWARE_POOLS:
        raise ValueError(f"ToMe: global_pool={pool_type!r} has no exact form with merged tokens; "
                         f"supported: {SIZE_AWARE_POOLS} ('avg' is weighted by token size)")


class ToMeVisionTransformerMixin(T.ToMeModelMixin):
    """Patched timm ``VisionTransformer``: threads a :class:`mmfast.tome.ToMeState` through the blocks."""

    def _tome_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_features_tome(self, x: Tensor, attn_mask: Tensor | None = None,
                              is_causal: bool = False) -> tuple[Tensor, T.ToMeState]:
        """``forward_features`` that also returns the :class:`~mmfast.tome.ToMeState` (``size``,
        ``source``) of this forward."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = self._tome_new_state(x, self.num_prefix_tokens)
        if self.grad_checkpointing and not torch.jit.is_scripting() and attn_mask is None and not is_causal:
            for blk in self.blocks:
                x, state.size, state.source = checkpoint(
                    blk.tome_forward, x, state.size, state.source, state.num_prefix_tokens, state.prop_attn,
                    state.trace_source, use_reentrant=False)
        else:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal, tome_state=state)
        x = self.norm(x)
        return x, state

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """The (merged) tokens after the final norm. Their sizes: :meth:`forward_features_tome`."""
        return self.forward_features_tome(x, attn_mask, is_causal)[0]

    def pool(self, x: Tensor, pool_type: str | None = None, size: Tensor | None = None) -> Tensor:
        """timm's pool; with token sizes, ``'avg'`` is weighted by size (other size-free pools as timm)."""
        base = type(self)._mmfast_original_tome
        if size is None:
            return base.pool(self, x, pool_type)
        _check_pool(self, pool_type)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "avg":
            p = 0 if self.pool_include_prefix else self.num_prefix_tokens
            return T.weighted_mean(x[:, p:], size[:, p:])
        return base.pool(self, x, pool_type)

    def forward_head(self, x: Tensor, pre_logits: bool = False, size: Tensor | None = None) -> Tensor:
        """timm's head; pass the ``size`` of merged tokens (``forward`` does) for ``'avg'`` pooling."""
        base = type(self)._mmfast_original_tome
        if base.forward_head is not VisionTransformer.forward_head:
            return base.forward_head(self, x, pre_logits=pre_logits)  # a subclass head (token pooling only)
        x = self.pool(x, size=size)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x, state = self.forward_features_tome(x, attn_mask, is_causal)
        return self.forward_head(x, size=state.size)


def _describe(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def apply(model: VisionTransformer, r: T.RSpec = 0, prop_attn: bool = True,
          trace_source: bool = False) -> VisionTransformer:
    """Patch a timm ``VisionTransformer`` in place (see :func:`mmfast.tome.apply_patch`)."""
    base = T.original_class(model)
    for name in ("forward", "forward_features"):
        if getattr(base, name) is not getattr(VisionTransformer, name):
            raise TypeError(f"ToMe: {base.__module__}.{base.__qualname__} overrides VisionTransformer.{name}; "
                            "only models that keep timm's forward path can be patched")
    if base.forward_head is not VisionTransformer.forward_head and model.global_pool != "token":
        raise ValueError(f"ToMe: {base.__qualname__} has its own forward_head with global_pool="
                         f"{model.global_pool!r}; only 'token' pooling is known to be size-independent there")
    _check_pool(model)
    blocks = model.blocks
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"ToMe: model.blocks is {_describe(blocks)}, expected nn.Sequential of timm Blocks")
    for i, blk in enumerate(blocks):
        if T.original_class(blk) is not Block:
            raise TypeError(f"ToMe: block {i} is {_describe(blk)}; only timm.models.vision_transformer.Block "
                            "(exactly, not a subclass) can be patched")
        if type(blk.attn) is not Attention:
            raise TypeError(f"ToMe: block {i} has attention {_describe(blk.attn)}; only timm.layers.Attention "
                            "(exactly) can be patched")
    T.patch_model(model, blocks, ToMeBlockMixin, ToMeVisionTransformerMixin, r, prop_attn, trace_source)
    return model
