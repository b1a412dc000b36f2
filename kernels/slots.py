"""The destination-slot ordering the Triton merge kernel reads (tensor-only, no Triton needed)."""

from __future__ import annotations

import torch


def slot_order(dest: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton merge's preparation: (order, offsets), the token indices (flat over the batch)
    stably sorted by destination slot, and the CSR offsets of every slot's run in ``order``.
    ``scripts/bench_kernels.py`` times it alone against the whole merge step."""
    batch = dest.shape[0]
    key = (dest + torch.arange(batch, device=dest.device)[:, None] * n_out).flatten()
    order = torch.argsort(key, stable=True)
    offsets = torch.zeros(batch * n_out + 1, device=dest.device, dtype=torch.long)
    offsets[1:] = torch.bincount(key, minlength=batch * n_out).cumsum(0)
    return order, offsets
