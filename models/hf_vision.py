"""HF ``CLIPVisionModel`` / ``CLIPModel`` and ``SiglipVisionModel`` / ``SiglipModel`` adapter.

Encoder layers are re-run from their ``q/k/v/out_proj`` with SDPA. CLIP pools the CLS token
(unaffected by merging); SigLIP has no CLS token (``n_prefix = 0``: every token is mergeable, and
EViT refuses it) and its attention-pooling head receives the ``log(size)`` key bias.
``output_hidden_states`` then holds tensors of different lengths; the sizes and origin of the last
layer are on the handle's ``state``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vtc.models.attention import attend, pool_attention
from vtc.models.base import EncoderAdapter
from vtc.sites import EncoderInfo

_LAYERS = ("CLIPEncoderLayer", "SiglipEncoderLayer")


def _vision_transformer(model: object) -> nn.Module | None:
    try:
        from transformers import CLIPModel, CLIPVisionModel, SiglipModel, SiglipVisionModel
    except ImportError:
        return None
    if isinstance(model, (CLIPModel, SiglipModel)):
        model = model.vision_model
    if not isinstance(model, (CLIPVisionModel, SiglipVisionModel)):
        return None
    return getattr(model, "vision_model", model)  # transformers 5.x has no inner wrapper


class HFVisionAdapter(EncoderAdapter):
    family = "hf"

    def __init__(self, model, reducer, execution="auto"):
        self.vision = _vision_transformer(model)
        super().__init__(model, reducer, execution)

    @classmethod
    def accepts(cls, model: object) -> bool:
        return _vision_transformer(model) is not None

    @property
    def is_siglip(self) -> bool:
        return type(self.vision).__name__.startswith("Siglip")

    def find_blocks(self):
        return list(self.vision.encoder.layers)

    def check_block(self, block):
        if type(block).__name__ not in _LAYERS:
            raise TypeError(f"vtc supports HF {' and '.join(_LAYERS)}; this model has {type(block).__name__}")

    def model_id(self) -> str | None:
        return getattr(self.model.config, "_name_or_path", None) or None

    def encoder_info(self):
        config = self.vision.config
        side = config.image_size // config.patch_size
        n_prefix = 0 if self.is_siglip else 1
        return EncoderInfo(
            family=f"{self.family} {type(self.vision).__name__}",
            num_layers=len(self.blocks),
            num_tokens=side * side + n_prefix,
            n_prefix=n_prefix,
            has_cls=not self.is_siglip,
            grid=(side, side),
        )

    def attention(self, block, h, bias, needs):
        attn = block.self_attn
        batch, n, _ = h.shape
        shape = (batch, n, -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        dropout = attn.dropout if attn.training else 0.0
        out, signals = attend(q, k, v, bias, needs, scale=attn.scale, dropout_p=dropout)
        return attn.out_proj(out.transpose(1, 2).reshape(batch, n, -1)), signals

    def pre_attention_norm(self, block, x):
        return block.layer_norm1(x)

    def attention_residual(self, block, h):
        return h

    def mlp_branch(self, block, x):
        return block.mlp(block.layer_norm2(x))

    def block_forward(self, index, block, original, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("vtc: HF vision layers with an attention_mask cannot be token-reduced")
        return self.run_block(index, block, hidden_states, lambda x: original(x, attention_mask, **kwargs))

    def patch_pooling(self):
        head = getattr(self.vision, "head", None) if self.is_siglip else None
        if head is not None:
            self._patcher.set(head, "forward", functools.partial(self.biased_head, head, head.forward))

    def biased_head(self, head, original, hidden_state: torch.Tensor) -> torch.Tensor:
        """SigLIP's attention-pooling head with the ``log(size)`` key bias."""
        state = self.current_state(hidden_state)
        bias = None if state is None else state.attention_bias(hidden_state.dtype)
        if bias is None:
            return original(hidden_state)
        probe = head.probe.expand(hidden_state.shape[0], -1, -1)
        out = pool_attention(head.attention, probe, hidden_state, bias)
        return (out + head.mlp(head.layernorm(out)))[:, 0]

    def attention_heads(self, block):
        attn = block.self_attn
        return attn.q_proj.out_features // attn.head_dim, attn.head_dim

    def branches(self, block):
        return block.self_attn, block.mlp

    def stem_conv(self):
        return self.vision.embeddings.patch_embedding

    def run_head(self, tokens):
        if self.is_siglip:
            tokens = self.vision.post_layernorm(tokens)
            head = getattr(self.vision, "head", None)
            return head(tokens) if head is not None else tokens
        pooled = self.vision.post_layernorm(tokens[:, 0])
        projection = getattr(self.model, "visual_projection", None)  # CLIPModel.get_image_features
        return pooled if projection is None else projection(pooled)
