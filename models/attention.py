"""Attention on the SDPA path with the cheap side signals reducers ask for (docs/ARCHITECTURE.md
"Adapters and apply").

Proportional attention and padding arrive as one additive (B, 1, 1, N) key bias, or, for a
packed batch (:mod:`vtc.models.packing`), as the :class:`Packing` whose attention is
block-diagonal per image; the CLS attention row is one extra ``softmax(q_cls K^T)`` of O(N),
never an eager N x N softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtc.models.packing import Packing, segment_softmax, varlen_attention
from vtc.sites import Signal, Signals


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | Packing | None,
    needs: frozenset[Signal],
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, Signals]:
    """SDPA over (B, H, N, d) heads plus the requested signals. With a :class:`Packing` the heads
    are the packed (1, H, T, d) tokens and so are the signals ((1, T, d) and (1, T))."""
    if isinstance(bias, Packing):
        return _attend_packed(q, k, v, bias, needs, scale, dropout_p)
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


def _attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, needs: frozenset[Signal],
                   scale: float | None, dropout_p: float) -> tuple[torch.Tensor, Signals]:
    out = varlen_attention(q, k, v, packing, scale=scale, dropout_p=dropout_p)
    key_mean = k.mean(dim=1) if Signal.KEY_MEAN in needs else None
    cls_attn = None
    if Signal.CLS_ATTN in needs:  # each image's first token as the query, softmax within the image
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        work = torch.promote_types(q.dtype, torch.float32)
        segments = packing.segments(q.device)
        first = q[0][:, packing.starts(q.device)][:, segments]  # (H, T, d): the CLS query of each token's image
        logits = (first * k[0]).sum(dim=-1).to(work) * scale
        if packing.key_bias is not None:
            logits = logits + packing.key_bias.to(work)
        cls_attn = segment_softmax(logits, segments, packing.batch).mean(dim=0, keepdim=True)
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
