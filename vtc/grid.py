"""Reduced tokens laid back on the patch grid they came from (pure tensors).

An encoder reducer merges, drops or reorders patch tokens, but ``TokenState.origin`` still says,
for every original position, which token carries it (-1: dropped). :func:`lay_on_grid` turns any
such state back into one token per original position in raster order, so an operation defined on
the patch grid (the connector's 2-D pooling) composes with every encoder reducer.
"""

from __future__ import annotations

import torch

from vtc.merge import unmerge
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
