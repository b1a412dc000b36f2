"""Size-weighted scatter merge: every token is folded into one output slot.

:func:`merge_weighted` dispatches (``vtc.kernels.dispatch``) between the deterministic Triton
kernel (``merge_triton``) and the PyTorch reference here (ToMe's size-weighted average, ToMe paper,
Bolya et al., ICLR 2023, Sec. 3; generalised from the official code's gather/scatter pair to one
destination map so pooling and dynamic merging reuse it).
"""

from __future__ import annotations

import torch

from vtc.kernels.dispatch import use_triton

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def merge_weighted(
    x: torch.Tensor,
    size: torch.Tensor | None,
    dest: torch.Tensor,
    n_out: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens sharing an output slot; see
    :func:`merge_weighted_reference` for the contract. Triton serves float16/bfloat16/float32
    inputs (float32 sizes) and is deterministic; other dtypes take the reference."""
    if x.dtype in TRITON_DTYPES and use_triton(x):
        from vtc.kernels.merge_triton import merge_weighted_triton

        return merge_weighted_triton(x, size, dest, n_out)
    return merge_weighted_reference(x, size, dest, n_out)


def merge_weighted_reference(
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
            slot. A slot that receives no token comes out as zeros with size 0 (padding).
        n_out: number of output tokens.

    Returns:
        ``(x_out, size_out)``: (B, n_out, C) with ``x_out[j] = sum_i s_i x_i / sum_i s_i`` over the
        tokens with ``dest_i = j``, accumulated in at least float32 and cast back to ``x.dtype``, and
        (B, n_out) summed sizes. On the CPU the result is deterministic; on CUDA the scatter uses
        float atomics, so the summation order (and the last bits) may vary between runs (the
        Triton kernel, which ``auto`` dispatch uses on CUDA, is deterministic).
    """
    batch, _, channels = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    weight = torch.ones(dest.shape, device=x.device, dtype=acc) if size is None else size.to(acc)
    weighted = x.to(acc) * weight.unsqueeze(-1)
    sums = weighted.new_zeros(batch, n_out, channels)
    sums.scatter_add_(1, dest.unsqueeze(-1).expand(-1, -1, channels), weighted)
    new_size = weight.new_zeros(batch, n_out).scatter_add_(1, dest, weight)
    mean = sums / new_size.clamp_min(torch.finfo(acc).tiny).unsqueeze(-1)  # empty slots: 0 / tiny = 0
    return mean.to(x.dtype), new_size
