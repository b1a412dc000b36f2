"""timm ``VisionTransformer`` adapter: standard ``Block`` + ``Attention`` (LayerScale, qk-norm,
scale-norm, gated attention, register tokens, token/avg/max/attention pooling, fused attention on
or off). Other block types (parallel, post-norm, RoPE attention) are refused with a TypeError."""

from __future__ import annotations

import functools

import torch
from torch import nn

from vtc.merge import size_weighted_mean
from vtc.models.attention import attend
from vtc.models.base import EncoderAdapter
from vtc.sites import EncoderInfo


class TimmViTAdapter(EncoderAdapter):
    family = "timm"

    @classmethod
    def accepts(cls, model: object) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, VisionTransformer)

    def find_blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def check_block(self, block: nn.Module) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(
                f"vtc supports timm VisionTransformer models built from the standard Block and Attention; "
                f"this one has {type(block).__name__} / {type(getattr(block, 'attn', None)).__name__}"
            )

    def model_id(self) -> str | None:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if cfg.get("source") == "local-dir" and cfg.get("file"):
            return cfg["file"]
        if cfg.get("hf_hub_id"):
            return cfg["hf_hub_id"]
        return ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag")))) or None

    def encoder_info(self) -> EncoderInfo:
        model = self.model
        grid = tuple(model.patch_embed.grid_size)
        n_prefix = model.num_prefix_tokens
        return EncoderInfo(
            family=self.family,
            num_layers=len(self.blocks),
            num_tokens=grid[0] * grid[1] + n_prefix,
            n_prefix=n_prefix,
            has_cls=model.cls_token is not None,
            grid=grid,
        )

    def attention(self, block, h, bias, needs):
        attn = block.attn
        batch, n, _ = h.shape
        gate = attn.gate(h).sigmoid() if attn.gate is not None else None
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        dropout = attn.attn_drop.p if attn.training else 0.0
        out, signals = attend(q, k, v, bias, needs, scale=attn.scale, dropout_p=dropout)
        out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out)), signals

    def pre_attention_norm(self, block, x):
        return block.norm1(x)

    def attention_residual(self, block, h):
        return block.drop_path1(block.ls1(h))

    def mlp_branch(self, block, x):
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def block_forward(self, index, block, original, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("vtc: timm blocks with an attn_mask or is_causal cannot be token-reduced")
        return self.run_block(index, block, x, original)

    def patch_pooling(self):
        self._patcher.set(self.model, "pool", functools.partial(self.size_aware_pool, self.model.pool))

    def grid_feature_methods(self):
        return [(self.model, "forward_intermediates")]

    def size_aware_pool(self, original, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        model = self.model
        state = self.current_state(x)
        if state is None or (state.size is None and state.valid is None):
            return original(x, pool_type)
        start = 0 if model.pool_include_prefix else state.n_prefix
        tokens = x[:, start:]
        size = None if state.size is None else state.size[:, start:]
        valid = None if state.valid is None else state.valid[:, start:]
        if model.attn_pool is not None:
            bias = state.attention_bias(x.dtype)
            return model.attn_pool(tokens, attn_mask=None if bias is None else bias[..., start:])
        kind = model.global_pool if pool_type is None else pool_type
        if kind in ("avg", "avgmax"):
            mean = size_weighted_mean(tokens, size, valid)
            if kind == "avg":
                return mean
            return 0.5 * (mean + _masked_max(tokens, valid))
        if kind == "max":
            return _masked_max(tokens, valid)
        return original(x, pool_type)

    def attention_heads(self, block):
        return block.attn.num_heads, block.attn.head_dim

    def branches(self, block):
        return block.attn, block.mlp

    def stem_conv(self):
        return self.model.patch_embed.proj

    def run_head(self, tokens):
        return self.model.forward_head(tokens)


def _masked_max(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return x.amax(dim=1)
    return x.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
