"""Tolerances for comparing two computations of the same quantity done in different orders.

Two layouts of one model (batch-first and sequence-first), a batch against single runs, a Triton
kernel against its reference or a closed form against the code: the results differ only by
rounding. Summing ``n`` terms in another order moves the result by about ``u * sqrt(n)`` times
the magnitude of the terms (``u = eps / 2``, the unit roundoff; errors of a random sign add up
like a random walk), so the tolerance is absolute and scaled to the compared values:

    atol = SIGMAS * eps(dtype) * sqrt(terms) * scale

``terms`` is the number of accumulated products on the longest path to an output: for one sum or
dot product its length; through a network of ``L`` blocks the sum over blocks of the reduction
lengths of each (see :func:`transformer_terms`). ``scale`` is the magnitude of the compared values
(by default the largest ``|expected|``): an element much smaller than the largest one (a logit near
0, a cancelled sum) carries the absolute error of the large terms that produced it, so a relative
tolerance per element would reject correct results. ``SIGMAS`` = 4 covers the random-walk spread
(standard deviation ``u * sqrt(n)``) at about four standard deviations of ``eps * sqrt(n)``'s half.

Values that must match exactly (same computation, same order) are compared with ``torch.equal``,
not here.
"""

from __future__ import annotations

import math

import torch

SIGMAS = 4.0


def tolerance(dtype: torch.dtype, terms: int, scale: float) -> float:
    """Absolute tolerance for values of magnitude ``scale`` computed in ``dtype`` through
    ``terms`` accumulated products, in two different orders."""
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    return SIGMAS * torch.finfo(dtype).eps * math.sqrt(terms) * scale


def transformer_terms(depth: int, width: int, tokens: int, hidden: int | None = None) -> int:
    """Accumulated products on the longest path through ``depth`` pre-norm transformer blocks:
    per block the norm's mean and variance (``width``), the q/k/v and output projections
    (``width`` each), the attention logits (``width``) and the weighted value sum (``tokens``),
    and the MLP's two projections (``width`` and ``hidden``, default 4 x width)."""
    hidden = 4 * width if hidden is None else hidden
    return depth * (6 * width + tokens + hidden)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, terms: int, dtype: torch.dtype | None = None,
                 scale: float | None = None, msg: str = "") -> None:
    """``actual`` equals ``expected`` up to the rounding of ``terms`` accumulated products in
    ``dtype`` (default: the dtype of ``expected``), relative to ``scale`` (default: ``max |expected|``)."""
    dtype = expected.dtype if dtype is None else dtype
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    atol = tolerance(dtype, terms, scale)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda default: f"{msg}\n{default}".strip())
