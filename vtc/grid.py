"""Reduced tokens laid back on the patch grid they came from (pure tensors).

An encoder reducer merges, drops or reorders patch tokens, but ``TokenState.origin`` still says,
for every original position, which token carries it (-1: dropped). :func:`lay_on_grid` turns any
such state back into one token per original position in raster order, so an operation defined on
the patch grid (the connector's 2-D pooling) composes with every encoder reducer.
"""

from __future__ import annotations

import torch

from vtc.merge import merge_tokens, unmerge
from vtc.state import TokenState


def lay_on_grid(state: TokenState, grid: tuple[int, int]) -> TokenState:
    """One token per original position of ``state`` (prefix, then the ``grid`` in raster order).

    Position ``j`` gets the features of the token carrying it (``origin[:, j]``): a token that
    merged ``s`` patches appears at each of its ``s`` positions, an EViT fused token at every patch
    it absorbed. A dropped position (``origin`` -1) gets zero features and ``valid`` False, so every
    size-weighted operation leaves it out: pooling the result averages, per window, the surviving
    tokens covering it, each weighted by how many of the window's positions it covers (size-weighted
    unmerging followed by pooling of the unmerged grid).

    Returns a state with ``x`` (B, N0, C), ``size`` None (every position stands for itself),
    ``origin`` the identity where carried and -1 where dropped, ``valid`` (None when nothing was
    dropped), the same ``n_prefix``, ``grid`` set and ``prop_attn`` off. Rows are independent: a
    batch gives the rows of single runs. Raises ValueError when ``origin`` does not span
    ``n_prefix + rows * cols`` positions.
    """
    rows, cols = grid
    positions = state.origin.shape[1]
    if positions != state.n_prefix + rows * cols:
        raise ValueError(
            f"lay_on_grid: origin spans {positions} positions, but {state.n_prefix} prefix tokens and a "
            f"{rows}x{cols} grid make {state.n_prefix + rows * cols}"
        )
    carried = state.origin >= 0
    identity = torch.arange(positions, device=state.origin.device).expand_as(state.origin)
    return TokenState(
        x=unmerge(state),
        size=None,
        origin=torch.where(carried, identity, torch.full_like(identity, -1)),
        valid=None if bool(carried.all()) else carried,
        n_prefix=state.n_prefix,
        grid=(rows, cols),
    )


def lay_scores(score: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """A per-token signal (B, N) laid on the positions of :func:`lay_on_grid`: each position gets
    the value of the token carrying it, 0 where dropped."""
    laid = score.gather(1, origin.clamp_min(0))
    return laid.masked_fill(origin < 0, 0)


def cell_of_patch(grid: tuple[int, int], out_grid: tuple[int, int], kernel: int | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """(rows * cols,) the cell of ``out_grid`` each patch of ``grid`` (raster order) falls in: square
    windows of ``kernel`` patches (the last row/column of cells may be smaller), or, without a
    kernel, ``out_grid`` balanced cells (cell ``i * out / rows`` of each axis; exact windows when the
    axis divides evenly)."""
    (rows, cols), (out_rows, out_cols) = grid, out_grid
    if kernel is not None:
        cell_row = torch.arange(rows, device=device) // kernel
        cell_col = torch.arange(cols, device=device) // kernel
    else:
        cell_row = torch.arange(rows, device=device) * out_rows // rows
        cell_col = torch.arange(cols, device=device) * out_cols // cols
    return (cell_row[:, None] * out_cols + cell_col[None, :]).flatten()


def pool_on_grid(state: TokenState, grid: tuple[int, int], out_grids: list[tuple[int, int]],
                 prop_attn: bool = False, kernel: int | None = None) -> TokenState:
    """Average-pool each row of ``state`` (``n_prefix`` tokens kept, then one token per patch of
    ``grid`` in raster order) into the cells of its own ``out_grids[b]`` (one grid for every row
    when the list holds one), through the shared size-weighted merge: a cell is the size-weighted
    mean of its real tokens and carries their summed size. Rows with fewer cells, and cells whose
    positions are all padding, come out as padding (``valid`` False); ``grid`` is set on the result
    when every row has the same cell grid."""
    batch, p, device = state.x.shape[0], state.n_prefix, state.x.device
    grids = out_grids * batch if len(out_grids) == 1 else out_grids
    if len(grids) != batch:
        raise ValueError(f"pool_on_grid: {len(grids)} cell grids for a batch of {batch}")
    prefix = torch.arange(p, device=device)
    maps = {g: torch.cat([prefix, cell_of_patch(grid, g, kernel, device) + p]) for g in set(grids)}
    dest = torch.stack([maps[g] for g in grids])
    n_out = p + max(rows * cols for rows, cols in grids)
    ragged = len(set(grids)) > 1
    if ragged and state.valid is None:  # empty slots of the rows with fewer cells become padding
        state = state.replace(valid=torch.ones(state.x.shape[:2], dtype=torch.bool, device=device))
    merged = merge_tokens(state, dest, n_out, prop_attn)
    if merged.valid is not None and bool(merged.valid.all()):
        merged = merged.replace(valid=None)
    return merged.replace(grid=None if ragged else grids[0])
