"""Bipartite best-match search: the per-row max/argmax of ToMe's cosine-similarity matrix.

:func:`bipartite_match` dispatches (``vtc.kernels.dispatch``) between the fused Triton kernel
(``matching_triton``) and the PyTorch reference here (ToMe paper, Bolya et al., ICLR 2023,
Sec. 3, "Bipartite Soft Matching"; official code ``tome/merge.py``).
"""

from __future__ import annotations

import torch

from vtc.kernels.dispatch import interpreting, use_triton

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def bipartite_match(
    metric: torch.Tensor,
    n_prefix: int = 0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best partner in set B (odd positions) for every token of set A (even positions); see
    :func:`bipartite_match_reference` for the contract. Triton serves float16/bfloat16/float32
    (float32 scores either way); other dtypes always take the reference."""
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, D), got shape {tuple(metric.shape)}")
    if metric.dtype in TRITON_DTYPES and use_triton(metric):
        from vtc.kernels.matching_triton import bipartite_match_triton

        return bipartite_match_triton(metric, n_prefix, valid, interpreting())
    return bipartite_match_reference(metric, n_prefix, valid)


def bipartite_match_reference(
    metric: torch.Tensor,
    n_prefix: int = 0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best partner in set B (odd positions) for every token of set A (even positions).

    Args:
        metric: (B, N, D) per-token similarity features (ToMe: keys averaged over heads).
        n_prefix: the first ``n_prefix`` tokens are protected: never a source (their A rows
            score ``-inf``) and never a destination (their B columns are excluded).
        valid: optional (B, N) bool; padded tokens neither match nor receive a match.

    Returns:
        ``(score, index)``, each (B, ceil(N/2)): the cosine similarity of each A token to its
        most similar B token and that token's index within B. Rows without any candidate
        (protected, padded, or no eligible B token) have score ``-inf``. Ties resolve to the
        lowest B index (``torch.max`` semantics). Scores are computed in at least float32.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, D), got shape {tuple(metric.shape)}")
    metric = metric.to(torch.promote_types(metric.dtype, torch.float32))
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    n_a, n_b = a.shape[1], b.shape[1]
    neg_inf = float("-inf")
    if n_prefix > 0:
        scores[:, : (n_prefix + 1) // 2, :] = neg_inf
        scores[:, :, : n_prefix // 2] = neg_inf
    if valid is not None:
        scores.masked_fill_(~valid[:, 0::2, None], neg_inf)
        scores.masked_fill_(~valid[:, None, 1::2], neg_inf)
    if n_b == 0:
        empty = torch.full((metric.shape[0], n_a), neg_inf, device=metric.device, dtype=metric.dtype)
        return empty, torch.zeros_like(empty, dtype=torch.long)
    return scores.max(dim=-1)
