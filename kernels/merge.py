"""Size-weighted scatter merge: every token is folded into one output slot.

Reference implementation in PyTorch (spec tome.md, section b, step 3, generalised from ToMe's
gather/scatter pair to one destination map so pooling and dynamic merging reuse it).
"""

from __future__ import annotations

import torch


def merge_weighted(
    x: torch.Tensor,
    size: torch.Tensor | None,
    dest: torch.Tensor,
    n_out: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens that share an output slot.

    Args:
        x: (B, N, C) tokens.
        size: (B, N) patches per token, or None for all ones.
        dest: (B, N) long, output slot of every token in ``[0, n_out)``; several tokens may share a
            slot. Every slot must receive at least one token.
        n_out: number of output tokens.

    Returns:
        ``(x_out, size_out)``: (B, n_out, C) with ``x_out[j] = sum_i s_i x_i / sum_i s_i`` over the
        tokens with ``dest_i = j``, accumulated in at least float32 and cast back to ``x.dtype``, and
        (B, n_out) summed sizes. On the CPU the result is deterministic; on CUDA the scatter uses
        float atomics, so the summation order (and the last bits) may vary between runs.
    """
    batch, _, channels = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    weight = torch.ones(dest.shape, device=x.device, dtype=acc) if size is None else size.to(acc)
    weighted = x.to(acc) * weight.unsqueeze(-1)
    sums = weighted.new_zeros(batch, n_out, channels)
    sums.scatter_add_(1, dest.unsqueeze(-1).expand(-1, -1, channels), weighted)
    new_size = weight.new_zeros(batch, n_out).scatter_add_(1, dest, weight)
    return (sums / new_size.unsqueeze(-1)).to(x.dtype), new_size
