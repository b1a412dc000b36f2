"""open_clip ``VisionTransformer`` adapter (a CLIP model is reduced through its ``.visual``).

Blocks are ``ResidualAttentionBlock`` with ``nn.MultiheadAttention``: queries, keys and values
are recomputed from the packed ``in_proj_weight`` so keys are available and the size bias goes
through SDPA. Both batch layouts (batch-first and LND) are handled; ``ls_1``/``ls_2``
are honoured; average pooling is size-weighted and the attentional pooler gets the key bias.
``CustomResidualAttentionBlock`` (qk-norm, scaled-cosine attention) is refused with a TypeError.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vtc.merge import size_weighted_mean
from vtc.models.attention import attend, pool_attention
from vtc.models.base import EncoderAdapter
from vtc.sites import EncoderInfo


def _visual(model: object) -> nn.Module | None:
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:
        return None
    if isinstance(model, VisionTransformer):
        return model
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, VisionTransformer) else None


class OpenCLIPAdapter(EncoderAdapter):
    family = "open_clip"

    def __init__(self, model, reducer, execution="auto"):
        self.visual = _visual(model)
        super().__init__(model, reducer, execution)

    @classmethod
    def accepts(cls, model: object) -> bool:
        return _visual(model) is not None

    @property
    def batch_first(self) -> bool:
        return getattr(self.visual.transformer, "batch_first", True)

    def find_blocks(self):
        return list(self.visual.transformer.resblocks)

    def check_block(self, block):
        from open_clip.transformer import ResidualAttentionBlock

        if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention):
            raise TypeError(
                f"vtc supports open_clip vision towers built from ResidualAttentionBlock with "
                f"nn.MultiheadAttention; this one has {type(block).__name__}"
            )

    def encoder_info(self):
        grid = tuple(self.visual.grid_size)
        return EncoderInfo(
            family=self.family,
            num_layers=len(self.blocks),
            num_tokens=grid[0] * grid[1] + 1,
            n_prefix=1,
            has_cls=True,
            grid=grid,
        )

    def attention(self, block, h, bias, needs):
        mha = block.attn
        batch, n, width = h.shape
        heads = mha.num_heads
        qkv = nn.functional.linear(h, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(batch, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = mha.dropout if mha.training else 0.0
        out, signals = attend(q, k, v, bias, needs, dropout_p=dropout)
        return mha.out_proj(out.transpose(1, 2).reshape(batch, n, width)), signals

    def pre_attention_norm(self, block, x):
        return block.ln_1(x)

    def attention_residual(self, block, h):
        return block.ls_1(h)

    def mlp_branch(self, block, x):
        return block.ls_2(block.mlp(block.ln_2(x)))

    def block_forward(self, index, block, original, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("vtc: open_clip blocks with cross-attention inputs or an attn_mask cannot be token-reduced")
        if self.batch_first:
            return self.run_block(index, block, q_x, original)
        out = self.run_block(index, block, q_x.transpose(0, 1), lambda x: original(x.transpose(0, 1)).transpose(0, 1))
        return out.transpose(0, 1)

    def patch_pooling(self):
        visual = self.visual
        if visual.attn_pool is not None and visual.attn_pool_contrastive is not None:
            raise TypeError("vtc does not support open_clip's parallel/cascade attentional pooling")
        self._patcher.set(visual, "_global_pool", functools.partial(self.size_aware_pool, visual._global_pool))
        if visual.attn_pool is not None:
            pooler = visual.attn_pool
            self._patcher.set(pooler, "forward", functools.partial(self.biased_attn_pool, pooler, pooler.forward))

    def grid_feature_methods(self):
        return [(self.visual, "forward_intermediates")]

    def size_aware_pool(self, original, x: torch.Tensor):
        visual = self.visual
        state = self.current_state(x)
        # after an attentional pooler, x holds its query outputs, not the encoder's tokens
        if visual.pool_type != "avg" or visual.attn_pool is not None or state is None or (
            state.size is None and state.valid is None
        ):
            return original(x)
        size = None if state.size is None else state.size[:, 1:]
        valid = None if state.valid is None else state.valid[:, 1:]
        return size_weighted_mean(x[:, 1:], size, valid), x[:, 1:]

    def biased_attn_pool(self, pooler, original, x: torch.Tensor) -> torch.Tensor:
        state = self.current_state(x)
        bias = None if state is None else state.attention_bias(x.dtype)
        if bias is None:
            return original(x)
        query = pooler.ln_q(pooler.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return pool_attention(pooler.attn, query, pooler.ln_k(x), bias)

    def attention_heads(self, block):
        return block.attn.num_heads, block.attn.embed_dim // block.attn.num_heads

    def branches(self, block):
        return block.attn, block.mlp

    def stem_conv(self):
        return self.visual.conv1

    def run_head(self, tokens):
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled
