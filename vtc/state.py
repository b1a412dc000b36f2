"""`TokenState`: the tokens of one forward pass and what each one stands for (docs/ARCHITECTURE.md
"TokenState")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenState:
    """Tokens travelling through an encoder, with their bookkeeping.

    Attributes:
        x: (B, N, C) tokens; the first ``n_prefix`` are CLS/register tokens.
        size: (B, N) float, original tokens each token stands for; None while every size is 1.
        origin: (B, N0) long, for every original token (prefix included) the index of the token
            that now carries it, or -1 once it was dropped.
        valid: (B, N) bool for padded per-image lengths; None when every row is full.
        n_prefix: number of leading tokens that are never merged or dropped.
        grid: (rows, cols) of the patch tokens while they are still in raster order, else None.
        prop_attn: whether later attention adds ``log(size)`` to the logits (set by merging reducers).
    """

    x: torch.Tensor
    size: torch.Tensor | None
    origin: torch.Tensor
    valid: torch.Tensor | None
    n_prefix: int
    grid: tuple[int, int] | None
    prop_attn: bool = False

    @classmethod
    def start(cls, x: torch.Tensor, n_prefix: int, grid: tuple[int, int] | None) -> TokenState:
        """The state of an unreduced sequence: unit sizes, identity origin, no padding."""
        batch, n = x.shape[:2]
        origin = torch.arange(n, device=x.device).expand(batch, n)
        return cls(x=x, size=None, origin=origin, valid=None, n_prefix=n_prefix, grid=grid)

    def replace(self, **changes) -> TokenState:
        return dataclasses.replace(self, **changes)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def sizes(self) -> torch.Tensor:
        """(B, N) sizes as a tensor (ones where ``size`` is None)."""
        if self.size is not None:
            return self.size
        return torch.ones(self.x.shape[:2], device=self.x.device)

    def real_counts(self) -> torch.Tensor:
        """(B,) real tokens per row (padding excluded)."""
        if self.valid is None:
            return torch.full((self.x.shape[0],), self.x.shape[1], dtype=torch.long, device=self.x.device)
        return self.valid.sum(dim=1)

    def needs_attention_bias(self) -> bool:
        return (self.prop_attn and self.size is not None) or self.valid is not None

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive (B, 1, 1, N) key bias for SDPA: ``log(size)`` under proportional attention
        and ``-inf`` on padding; None when neither applies (the plain fast path)."""
        if not self.needs_attention_bias():
            return None
        work = torch.promote_types(dtype, torch.float32)
        bias = torch.zeros(self.x.shape[:2], device=self.x.device, dtype=work)
        if self.prop_attn and self.size is not None:
            bias = self.size.to(work).log()
        if self.valid is not None:
            bias = bias.masked_fill(~self.valid, float("-inf"))
        return bias.to(dtype)[:, None, None, :]
