"""ToMe token merging for open_clip's ``VisionTransformer`` (used through :func:`mmfast.tome.apply_patch`).

Supported: a batch-first ``Transformer`` of exactly ``open_clip.transformer.ResidualAttentionBlock``
whose ``nn.MultiheadAttention`` has packed in-projection weights, no ``bias_k``/``bias_v`` and no
zero attention (open_clip's standard vision tower; LayerScale ``ls_1``/``ls_2`` included). In
merging blocks the attention is computed from the MHA's ``in_proj_weight`` / ``out_proj`` with
``F.scaled_dot_product_attention`` (the keys' head mean is the metric, ``log(size)`` an additive
mask); blocks with nothing to merge yet call the original block, i.e. ``nn.MultiheadAttention``
itself, so ``r=0`` is bitwise the unpatched model. The class token is never merged. Pooling:
``'tok'`` and ``'none'`` as open_clip, ``'avg'`` weighted by token size; attentional pooling
(CoCa) is refused. ``output_tokens`` returns the merged patch tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import model as oc_model
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmfast import functional as MF
from mmfast.patch import tome_core as T
from mmfast.patch.classes import swap_class

__all__ = ["apply", "tome_mha", "fused_mlp"]

#: open_clip's vision tower always has exactly one prefix (class) token.
NUM_PREFIX_TOKENS = 1


def tome_mha(mha: nn.MultiheadAttention, x: Tensor, size: Tensor | None, prop_attn: bool) -> tuple[Tensor, Tensor]:
    """Batch-first self-attention with ``mha``'s weights: ``(output [B, N, C], metric [B, N, head_dim])``."""
    b, n, c = x.shape
    heads = mha.num_heads
    qkv_flat = MF.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    bias = T.attention_bias(size, prop_attn, qkv_flat.dtype)
    if not (mha.training and mha.dropout > 0):
        out = MF.fused_proportional_attention(qkv_flat, None if bias is None else bias.reshape(b, n), heads,
                                         (c // heads) ** -0.5)
        if out is not None:
            metric = qkv_flat.view(b, n, 3, heads, -1)[:, :, 1].mean(dim=2)
            return T.linear(out, mha.out_proj), metric
    q, k, v = qkv_flat.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=mha.dropout if mha.training else 0.0)
    out = T.linear(out.transpose(1, 2).reshape(b, n, c), mha.out_proj)
    return out, k.mean(dim=1)


def fused_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """open_clip's ``c_fc -> GELU -> c_proj`` MLP, fc + exact GELU fused by oneDNN on CPU inference."""
    names = list(getattr(mlp, "_modules", {}))
    if (type(mlp) is nn.Sequential and names == ["c_fc", "gelu", "c_proj"] and type(mlp.gelu) is nn.GELU
            and mlp.gelu.approximate == "none" and not mlp._forward_hooks and not mlp._forward_pre_hooks):
        return T.linear(T.linear(x, mlp.c_fc, gelu=True), mlp.c_proj)
    return mlp(x)


class ToMeResidualAttentionBlockMixin(T.ToMePatched):
    """Patched ``ResidualAttentionBlock``: ``forward(q_x, k_x=None, v_x=None, attn_mask=None, tome_state=None)``."""

    _tome_r: int

    def forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                attn_mask: Tensor | None = None, tome_state: T.ToMeState | None = None) -> Tensor:
        """With a ``tome_state``: attention, merge, MLP (updating the state). Without one: the
        original block, allowed only while this block's r is 0."""
        if tome_state is None:
            if self._tome_r > 0:
                raise RuntimeError(
                    f"a ToMe-patched open_clip ResidualAttentionBlock with r={self._tome_r} was called without a "
                    "ToMeState (e.g. by forward_intermediates or visual.transformer(x)); call the patched "
                    "VisionTransformer's forward / forward_features_tome, or set r = 0")
            return type(self)._mmfast_original_tome.forward(self, q_x, k_x, v_x, attn_mask=attn_mask)
        if k_x is not None or v_x is not None:
            raise ValueError("ToMe blocks are self-attention only (k_x / v_x must be None)")
        s = tome_state
        x, s.size, s.source = self.tome_forward(q_x, s.size, s.source, s.num_prefix_tokens, s.prop_attn,
                                                s.trace_source, attn_mask)
        return x

    def tome_forward(self, x: Tensor, size: Tensor | None, source: Tensor | None, num_prefix_tokens: int,
                     prop_attn: bool, trace_source: bool, attn_mask: Tensor | None = None
                     ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The block as a pure function of ``(x, size, source)``: returns the new triple."""
        r = self._tome_r
        if size is None and T.num_mergeable(x.shape[1], r, num_prefix_tokens) == 0:
            out = type(self)._mmfast_original_tome.forward(self, x, attn_mask=attn_mask)
            return out, size, source
        if attn_mask is not None:
            raise ValueError("attn_mask cannot be combined with token merging (the token count changes)")
        y, metric = tome_mha(self.attn, self.ln_1(x), size, prop_attn)
        x = x + self.ls_1(y)
        x, size, source = T.merge_tokens(x, metric, r, size, source, num_prefix_tokens, trace_source)
        x = x + self.ls_2(fused_mlp(self.mlp, self.ln_2(x)))
        return x, size, source


class ToMeVisionTransformerMixin(T.ToMeModelMixin):
    """Patched open_clip ``VisionTransformer``."""

    def _tome_blocks(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    def forward_features_tome(self, x: Tensor) -> tuple[Tensor, T.ToMeState]:
        """Embeddings and transformer (before ``ln_post``): ``(tokens [B, N', C], ToMeState)``."""
        x = self._embeds(x)
        state = self._tome_new_state(x, NUM_PREFIX_TOKENS)
        tf = self.transformer
        for blk in tf.resblocks:
            if tf.grad_checkpointing and not torch.jit.is_scripting():
                x, state.size, state.source = checkpoint(
                    blk.tome_forward, x, state.size, state.source, state.num_prefix_tokens, state.prop_attn,
                    state.trace_source, use_reentrant=False)
            else:
                x = blk(x, tome_state=state)
        return x, state

    def _tome_global_pool(self, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
        if self.pool_type == "avg":
            return T.weighted_mean(x[:, 1:], size[:, 1:]), x[:, 1:]
        return type(self)._mmfast_original_tome._global_pool(self, x)  # 'tok' / 'none'

    def tome_pool(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        """open_clip's ``_pool`` with size-weighted ``'avg'``: ``(pooled, tokens)``."""
        if size is None:
            return type(self)._mmfast_original_tome._pool(self, x)
        _check_pool(self)
        if self.final_ln_after_pool:
            pooled, tokens = self._tome_global_pool(x, size)
            pooled = self.ln_post(pooled)
        else:
            x = self.ln_post(x)
            pooled, tokens = self._tome_global_pool(x, size)
        return pooled, tokens

    def forward(self, x: Tensor):
        x, state = self.forward_features_tome(x)
        pooled, tokens = self.tome_pool(x, state.size)
        if self.proj is not None:
            pooled = pooled @ self.proj
        if self.output_tokens:
            return pooled, tokens
        return pooled


class ToMeCLIPMixin(T.ToMePatched):
    """Patched open_clip ``CLIP`` / ``CustomTextCLIP``: ``r`` forwards to the patched ``.visual``."""

    @property
    def r(self) -> T.RSpec:
        """The vision tower's merge schedule (``self.visual.r``)."""
        return self.visual.r

    @r.setter
    def r(self, value: T.RSpec) -> None:
        self.visual.r = value

    @property
    def tome_r_per_layer(self) -> list[int]:
        """The vision tower's per-layer merge counts."""
        return self.visual.tome_r_per_layer


def _describe(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_pool(visual: VisionTransformer) -> None:
    if visual.attn_pool is not None:
        raise ValueError("ToMe: open_clip attentional pooling (attn_pool) has no size-aware form here")
    if visual.pool_type not in ("tok", "avg", "none"):
        raise ValueError(f"ToMe: open_clip pool_type={visual.pool_type!r} is not supported")


def _check_visual(visual: nn.Module) -> None:
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"ToMe: the vision tower is {_describe(visual)}; only open_clip.transformer."
                        "VisionTransformer can be patched")
    base = T.original_class(visual)
    for name in ("forward", "_embeds", "_pool", "_global_pool"):
        if getattr(base, name) is not getattr(VisionTransformer, name):
            raise TypeError(f"ToMe: {base.__qualname__} overrides VisionTransformer.{name}")
    _check_pool(visual)
    tf = visual.transformer
    if not getattr(tf, "batch_first", False):
        raise TypeError("ToMe: the open_clip Transformer must be batch_first")
    for i, blk in enumerate(tf.resblocks):
        if T.original_class(blk) is not ResidualAttentionBlock:
            raise TypeError(f"ToMe: block {i} is {_describe(blk)}; only open_clip.transformer.ResidualAttentionBlock "
                            "(exactly) can be patched")
        mha = blk.attn
        if type(mha) is not nn.MultiheadAttention:
            raise TypeError(f"ToMe: block {i} has attention {_describe(mha)}; expected nn.MultiheadAttention")
        problems = []
        if hasattr(blk, "ln_1_kv"):
            problems.append("it is a cross-attention block")
        if not mha.batch_first:
            problems.append("batch_first=False")
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            problems.append("separate q/k/v projection weights")
        if mha.bias_k is not None or mha.bias_v is not None:
            problems.append("add_bias_kv")
        if mha.add_zero_attn:
            problems.append("add_zero_attn")
        if problems:
            raise TypeError(f"ToMe: block {i}'s nn.MultiheadAttention is not supported: " + ", ".join(problems))


def apply(model: nn.Module, r: T.RSpec = 0, prop_attn: bool = True, trace_source: bool = False) -> nn.Module:
    """Patch an open_clip ``VisionTransformer``, or the ``.visual`` of a ``CLIP`` / ``CustomTextCLIP``."""
    is_clip = isinstance(model, (oc_model.CLIP, oc_model.CustomTextCLIP))
    visual = model.visual if is_clip else model
    _check_visual(visual)
    blocks = visual.transformer.resblocks
    T.patch_model(visual, blocks, ToMeResidualAttentionBlockMixin, ToMeVisionTransformerMixin, r, prop_attn,
                  trace_source)
    if is_clip:
        swap_class(model, ToMeCLIPMixin)
    return model
