"""Spatial average pooling of the patch grid at one layer: the pooling baseline.

Patches are partitioned into an ``rows x cols`` grid of cells and each cell becomes one token, its
size-weighted average (the shared merge), so sizes, origin and proportional attention work as for
ToMe. Prefix tokens are kept. Needs the patch tokens in raster order (no earlier reduction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.merge import merge_tokens
from vtc.reducers.base import EncoderInfo, EncoderReducer, Signals, check_layers
from vtc.state import TokenState


@dataclass
class Pool(EncoderReducer):
    """Average-pool the patch grid after the attention of block ``layer``.

    Args:
        kernel: square window in patches (last row/column cells may be smaller).
        tokens: target patch-token count instead; it must factor as rows x cols fitting the grid
            (the factor pair closest to the grid's aspect ratio is used) and cells are balanced.
        layer: the block after whose attention pooling happens.
        prop_attn: add ``log(size)`` to later attention logits (cells of unequal size).
    """

    name: ClassVar[str] = "pool"

    kernel: int | None = None
    tokens: int | None = None
    layer: int = 0
    prop_attn: bool = True

    def __post_init__(self) -> None:
        if (self.kernel is None) == (self.tokens is None):
            raise ValueError("pool: give exactly one of kernel=<patches> or tokens=<count>")
        for field in ("kernel", "tokens"):
            value = getattr(self, field)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"pool: {field} must be a positive integer, got {value!r}")

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        rows, cols = grid
        if self.kernel is not None:
            return math.ceil(rows / self.kernel), math.ceil(cols / self.kernel)
        pairs = [(a, self.tokens // a) for a in range(1, self.tokens + 1) if self.tokens % a == 0]
        pairs = [(a, b) for a, b in pairs if a <= rows and b <= cols]
        if not pairs:
            raise ValueError(
                f"pool: tokens={self.tokens} cannot be laid out as rows x cols within the {rows}x{cols} patch "
                f"grid; allowed: 1..{rows * cols} with a factor pair that fits"
            )
        # closest aspect ratio to the grid's; on a tie, fewer rows
        return min(pairs, key=lambda ab: (round(abs(math.log(ab[0] / ab[1]) - math.log(rows / cols)), 9), ab[0]))

    def plan(self, info: EncoderInfo) -> list[tuple[int, int] | None]:
        check_layers((self.layer,), info.num_layers, self.name)
        plan: list[tuple[int, int] | None] = [None] * info.num_layers
        out_grid = self.output_grid(info.grid)
        plan[self.layer] = out_grid if out_grid != info.grid else None  # a 1x1 window changes nothing
        return plan

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: tuple[int, int]) -> int:
        return n_prefix + budget[0] * budget[1]

    def reduce(self, state: TokenState, signals: Signals, budget: tuple[int, int], layer: int) -> TokenState:
        if state.grid is None:
            raise ValueError("pool: the patch tokens are no longer in raster order at this layer")
        (rows, cols), p = state.grid, state.n_prefix
        out_rows, out_cols = self.output_grid(state.grid)
        device = state.x.device
        if self.kernel is not None:
            cell_row = torch.arange(rows, device=device) // self.kernel
            cell_col = torch.arange(cols, device=device) // self.kernel
        else:
            cell_row = torch.arange(rows, device=device) * out_rows // rows
            cell_col = torch.arange(cols, device=device) * out_cols // cols
        cells = (cell_row[:, None] * out_cols + cell_col[None, :]).flatten() + p
        dest = torch.cat([torch.arange(p, device=device), cells]).expand(state.x.shape[0], -1)
        merged = merge_tokens(state, dest, p + out_rows * out_cols, self.prop_attn)
        return merged.replace(grid=(out_rows, out_cols))
