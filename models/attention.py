"""Attention on the SDPA path with the cheap side signals reducers ask for (docs/ARCHITECTURE.md
"Adapters and apply").

Proportional attention and padding arrive as one additive (B, 1, 1, N) key bias; the CLS
attention row is one extra ``softmax(q_cls K^T)`` of O(N), never an eager N x N softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtc.sites import Signal, Signals


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    needs: frozenset[Signal],
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, Signals]:
    """SDPA over (B, H, N, d) heads plus the requested signals."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    key_mean = k.mean(dim=1) if Signal.KEY_MEAN in needs else None
    cls_attn = None
    if Signal.CLS_ATTN in needs:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        work = torch.promote_types(q.dtype, torch.float32)
        logits = (q[:, :, :1] @ k.transpose(-1, -2)).to(work) * scale
        if bias is not None:
            logits = logits + bias.to(work)
        cls_attn = logits.softmax(dim=-1).mean(dim=1)[:, 0]
    return out, Signals(key_mean=key_mean, cls_attn=cls_attn)


def pool_attention(
    mha: nn.MultiheadAttention, query: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Batch-first ``nn.MultiheadAttention`` pooling whose keys carry the (B, 1, 1, N) bias."""
    mask = None
    if bias is not None:
        batch, n_query = query.shape[0], query.shape[1]
        mask = bias.expand(batch, mha.num_heads, n_query, -1).reshape(batch * mha.num_heads, n_query, -1)
    return mha(query, tokens, tokens, attn_mask=mask, need_weights=False)[0]
