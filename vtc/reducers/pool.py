"""Spatial average pooling of the patch grid: the pooling baseline, at the encoder or the connector.

Patches are partitioned into an ``rows x cols`` grid of cells and each cell becomes one token, its
size-weighted average (the shared merge), so sizes, origin and proportional attention work as for
ToMe. Prefix tokens are kept. Inside an encoder it needs the patch tokens in raster order (no
earlier reduction).

On a vision-language model it acts at the connector by default (2-D average pooling of each
image's feature grid before the projector, as the M3 paper describes pooling the CLIP tokens; M3's
released code and checkpoints pool the projector's outputs instead, which differs because the
projector is non-linear); ``site=encoder`` pools inside the tower.
At the connector it composes with an encoder reducer (``needs_grid``): the adapter first lays the
reduced tokens back on the patch grid through ``origin`` (:func:`vtc.grid.lay_on_grid`), so each
patch position holds the token carrying it. A pooled cell is then the mean over its surviving
positions, i.e. the size-weighted mean of the surviving tokens covering it, each weighted by the
number of the cell's positions it covers: a merged token spanning several cells counts in each,
once per position, so unmerging and then pooling equals pooling the unmerged grid, and the
weights of all cells add up to the token's size. Dropped positions (pruning without fusion) are
left out of the average; a cell whose positions were all dropped carries nothing and gives no
token (it becomes padding, ``valid`` False), so such an image brings fewer tokens than asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.grid import pool_on_grid
from vtc.sites import (
    ConnectorInfo,
    ConnectorReducer,
    EncoderInfo,
    EncoderReducer,
    Signals,
    Site,
    check_layers,
    check_site,
)
from vtc.state import TokenState


def _factor_grids(tokens: int, grid: tuple[int, int], exact: bool) -> list[tuple[int, int]]:
    """Cell grids (a, b) fitting ``grid`` with a*b == tokens (or, not exact, the largest a*b <= tokens)."""
    rows, cols = grid
    pairs = [(a, min(cols, tokens // a)) for a in range(1, min(rows, tokens) + 1)]
    pairs = [(a, b) for a, b in pairs if b >= 1 and (a * b == tokens or not exact)]
    best = max((a * b for a, b in pairs), default=0)
    return [(a, b) for a, b in pairs if a * b == best]


@dataclass
class Pool(EncoderReducer, ConnectorReducer):
    """Average-pool the patch grid (see the module docstring).

    Args:
        kernel: square window in patches (last row/column cells may be smaller).
        tokens: target patch-token count instead; it must factor as rows x cols fitting the grid
            (the factor pair closest to the grid's aspect ratio is used) and cells are balanced.
        layer: encoder site only: the block after whose attention pooling happens (default 0).
        prop_attn: encoder site only: add ``log(size)`` to later attention logits.
        site: "connector" or "encoder"; default: the connector where the model has one.

    At the connector of LLaVA-NeXT an image's token budget is split between its base view and
    its high-resolution map (see ``vtc.models.llava_vision``); a view's share that does not factor into
    a fitting grid is pooled to the largest grid with at most that many cells.
    """

    name: ClassVar[str] = "pool"
    sites: ClassVar[tuple[Site, ...]] = (Site.CONNECTOR, Site.ENCODER)

    kernel: int | None = None
    tokens: int | None = None
    layer: int | None = None
    prop_attn: bool = True
    site: str | None = None

    def __post_init__(self) -> None:
        if (self.kernel is None) == (self.tokens is None):
            raise ValueError("pool: give exactly one of kernel=<patches> or tokens=<count>")
        for field in ("kernel", "tokens"):
            value = getattr(self, field)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"pool: {field} must be a positive integer, got {value!r}")
        check_site(self, "layer" if self.layer is not None else None)

    def output_grid(self, grid: tuple[int, int], tokens: int | None = None, exact: bool = True) -> tuple[int, int]:
        """The cell grid for ``grid``: from ``kernel``, or for ``tokens`` cells (default: the option)."""
        rows, cols = grid
        if self.kernel is not None:
            return math.ceil(rows / self.kernel), math.ceil(cols / self.kernel)
        tokens = self.tokens if tokens is None else tokens
        if tokens is None:
            raise ValueError("pool: give exactly one of kernel=<patches> or tokens=<count>")
        pairs = _factor_grids(tokens, grid, exact)
        if not pairs:
            raise ValueError(
                f"pool: tokens={tokens} cannot be laid out as rows x cols within the {rows}x{cols} patch "
                f"grid; allowed: 1..{rows * cols} with a factor pair that fits"
            )
        # closest aspect ratio to the grid's; on a tie, fewer rows
        return min(pairs, key=lambda ab: (round(abs(math.log(ab[0] / ab[1]) - math.log(rows / cols)), 9), ab[0]))

    def plan(self, info: EncoderInfo) -> list[tuple[int, int] | None]:
        layer = self.layer or 0
        check_layers((layer,), info.num_layers, self.name)
        plan: list[tuple[int, int] | None] = [None] * info.num_layers
        out_grid = self.output_grid(info.grid)
        plan[layer] = out_grid if out_grid != info.grid else None  # a 1x1 window changes nothing
        return plan

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: tuple[int, int]) -> int:
        return n_prefix + budget[0] * budget[1]

    def reduce(self, state: TokenState, signals: Signals, budget: tuple[int, int], layer: int) -> TokenState:
        if state.grid is None:
            raise ValueError("pool: the patch tokens are no longer in raster order at this layer")
        return self._pool(state, state.grid, self.output_grid(state.grid), self.prop_attn)

    # ----- connector site -----------------------------------------------------------------------
    needs_grid: ClassVar[bool] = True

    def check_connector(self, info: ConnectorInfo) -> None:
        check_site(self, "layer" if self.layer is not None else None, at_connector=True)
        if info.grid is None:
            raise ValueError("pool: the connector needs the patch grid the visual tokens come from")
        if info.num_tokens is not None:
            self.target(info.num_tokens)
            cells = math.prod(self.output_grid(info.grid))
            if cells > info.num_tokens:  # only after an encoder reducer: the grid has more patches
                raise ValueError(
                    f"pool: kernel={self.kernel} pools the {info.grid[0]}x{info.grid[1]} patch grid into {cells} "
                    f"tokens, more than the {info.num_tokens} the encoder reducer leaves; use a larger kernel "
                    f"or tokens=<count>"
                )

    def target(self, num_tokens: int) -> int:
        if self.tokens is not None and self.tokens > num_tokens:
            raise ValueError(f"pool: tokens={self.tokens} is more than the {num_tokens} visual tokens of an image")
        side = math.isqrt(num_tokens)
        return self.tokens if self.tokens is not None else math.prod(self.output_grid((side, side)))

    def reduce_visual(self, state: TokenState, signals: Signals, targets: torch.Tensor) -> TokenState:
        """Pool each row's grid; ``state`` holds one token per patch in raster order (``valid``
        False marks dropped patches, see the module docstring). ``kernel`` pools the whole grid
        whatever ``targets`` say; ``tokens`` needs one target for the batch."""
        if state.grid is None:
            raise ValueError("pool: the visual tokens are not on their patch grid; lay an encoder reducer's tokens "
                             "back on it first (vtc.grid.lay_on_grid, as the LLaVA adapter does)")
        if self.kernel is not None:
            out_grid = self.output_grid(state.grid)
        else:
            if bool((targets != targets[0]).any()):
                raise ValueError(f"pool: one grid per batch; got per-image targets {targets.tolist()}")
            wanted = int(targets[0])
            out_grid = self.output_grid(state.grid, wanted, exact=wanted == self.tokens)
        return self._pool(state, state.grid, out_grid, prop_attn=False)

    def _pool(self, state: TokenState, grid: tuple[int, int], out_grid: tuple[int, int], prop_attn: bool) -> TokenState:
        """Average ``state``'s tokens, on ``grid`` (its patch grid) after the prefix, in ``out_grid`` cells."""
        return pool_on_grid(state, grid, [out_grid], prop_attn, self.kernel)
