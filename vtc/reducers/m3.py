"""M3, Matryoshka Multimodal Models (Cai et al., 2024, arXiv 2405.17430, ICLR 2025): nested
average pooling of each image's visual tokens at the connector.

Sec. 3 of the paper: the grid of visual tokens is average-pooled to a nested family of coarser
grids (24x24 -> 12x12 -> 6x6 -> 3x3 -> 1x1 for LLaVA-1.5, i.e. 576/144/36/9/1 tokens); each
coarser grid is an average of the finer one, so the sets are nested. A model fine-tuned with the
LLaVA loss averaged over every scale (:mod:`vtc.train.m3`) answers from any of them, and the scale
can be chosen per sample (the paper's oracle: the cheapest scale that still answers correctly).

As the released code and checkpoints do, the pooling acts on the projector's outputs (the paper's
text pools the CLIP tokens; the projector is non-linear, so the two differ). The nested scales of
a ``side x side`` grid divide the side by its smallest prime factor until 1 (24: 24, 12, 6, 3, 1;
16: 16, 8, 4, 2, 1); a count outside that chain is refused (the official code silently truncates
``sqrt(576 / S)`` and may run a different count than asked). ``pool:tokens=K`` pools to any grid.

``tokens`` is one scale for every image, a list with one scale per image of the batch, or (in
Python) a function of one image's projected tokens ``(N, D)`` returning its scale, e.g. a learned
scale predictor. On LLaVA-NeXT every tile is pooled to the scale, then HF's packing (unpadding,
a newline per row) runs on the pooled tiles, as the official LLaVA-NeXT-M3 code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.budget import per_image_counts
from vtc.grid import pool_on_grid
from vtc.options import expects
from vtc.sites import ConnectorInfo, ConnectorReducer, Signals, Site
from vtc.state import TokenState

ScaleChooser = Callable[[torch.Tensor], int]


def nested_sides(side: int) -> list[int]:
    """The nested grid sides of a ``side x side`` grid, finest first: divide by the smallest prime
    factor until 1 (24 -> [24, 12, 6, 3, 1]; 16 -> [16, 8, 4, 2, 1]; 7 -> [7, 1])."""
    if side < 1:
        raise ValueError(f"m3: a grid side must be positive, got {side}")
    sides = [side]
    while sides[-1] > 1:
        current = sides[-1]
        factor = next(f for f in range(2, current + 1) if current % f == 0)
        sides.append(current // factor)
    return sides


def nested_scales(grid: tuple[int, int]) -> tuple[int, ...]:
    """Token counts of the nested scales of a square patch grid, largest first (ValueError for a
    grid that is not square: M3's scales are square poolings of a square grid)."""
    rows, cols = grid
    if rows != cols:
        raise ValueError(f"m3: nested pooling needs a square patch grid, this model's is {rows}x{cols}; "
                         f"pool:tokens=K pools any grid")
    return tuple(s * s for s in nested_sides(rows))


def check_scale(tokens: int, grid: tuple[int, int]) -> int:
    """``tokens`` when it is one of the grid's nested scales; ValueError listing them otherwise."""
    scales = nested_scales(grid)
    if tokens not in scales:
        raise ValueError(f"m3: tokens={tokens} is not a nested scale of the {grid[0]}x{grid[1]} grid; "
                         f"allowed: {', '.join(map(str, scales))}")
    return tokens


def pool_nested(state: TokenState, grid: tuple[int, int], scales: list[int]) -> TokenState:
    """Pool row ``b`` of ``state`` (prefix, then one token per patch of ``grid``) to ``scales[b]``
    tokens (a nested scale; ragged rows come back padded, ``valid`` marking real tokens). Rows at
    the full scale are the size-weighted mean of one token (themselves); when every row is at the
    full scale the state passes unchanged."""
    full = grid[0] * grid[1]
    sides = [math.isqrt(check_scale(s, grid)) for s in scales]
    if all(s == full for s in scales):
        return state
    return pool_on_grid(state, grid, [(side, side) for side in sides])


@dataclass
class M3(ConnectorReducer):
    """Nested average pooling of the projected visual tokens (see the module docstring).

    Args:
        tokens: visual tokens per image (per LLaVA-NeXT tile), a nested scale of the patch grid:
            one for every image, a ``;``-list with one per image of the batch, or a function of an
            image's projected tokens (Python only) returning its scale.
    """

    name: ClassVar[str] = "m3"
    sites: ClassVar[tuple[Site, ...]] = (Site.CONNECTOR,)
    before_projector: ClassVar[bool] = False
    needs_grid: ClassVar[bool] = True
    pools_tiles: ClassVar[bool] = True

    tokens: int | tuple[int, ...] | ScaleChooser | None = expects(
        "a nested scale, a ;-list of them (one per image) or a function of an image's tokens", default=None)

    def __post_init__(self) -> None:
        if self.tokens is None:
            raise ValueError("m3: give tokens=<scale>, e.g. m3:tokens=36 (the nested scales of the model's grid; "
                             "576/144/36/9/1 on a 24x24 grid)")
        counts = (self.tokens,) if isinstance(self.tokens, int) else self.tokens if isinstance(self.tokens, tuple) else ()
        bad = [t for t in counts if not isinstance(t, int) or isinstance(t, bool) or t < 1]
        if bad or (not callable(self.tokens) and not counts):
            raise ValueError(f"m3: tokens must be positive integers (nested scales), got {self.tokens!r}")

    def describe(self) -> str:
        if callable(self.tokens):
            raise ValueError("m3: a reducer choosing scales with a function has no spec string")
        return super().describe()

    def check_connector(self, info: ConnectorInfo) -> None:
        if info.grid is None:
            raise ValueError("m3: the connector needs the patch grid the visual tokens come from")
        nested_scales(info.grid)
        if not callable(self.tokens):
            for tokens in (self.tokens,) if isinstance(self.tokens, int) else tuple(self.tokens or ()):
                check_scale(tokens, info.grid)

    def target(self, num_tokens: int) -> int:
        if not isinstance(self.tokens, int):
            raise ValueError("m3: per-image scales are chosen per batch (image_targets), not from a count")
        return self.tokens

    def image_targets(self, state: TokenState, counts: list[int]) -> list[int]:
        if callable(self.tokens):
            p = state.n_prefix
            rows = [state.x[b, p:] if state.valid is None else state.x[b, p:][state.valid[b, p:]]
                    for b in range(state.x.shape[0])]
            return [int(self.tokens(row)) for row in rows]
        return per_image_counts(self.name, self.tokens if isinstance(self.tokens, int) else tuple(self.tokens or ()),
                                len(counts))

    def reduce_visual(self, state: TokenState, signals: Signals, targets: torch.Tensor) -> TokenState:
        if state.grid is None:
            raise ValueError("m3: the visual tokens are not on their patch grid; lay an encoder reducer's tokens "
                             "back on it first (vtc.grid.lay_on_grid, as the LLaVA adapter does)")
        return pool_nested(state, state.grid, [int(t) for t in targets.tolist()])
