"""Which knob values to evaluate, and which evaluated point answers: pure functions of measured
token counts and pass/fail.

The metric is not monotone in the budget (EViT on shapes-vit: accuracy 0.895 at 252 tokens, 0.890
at 254, 0.880 at 255), so there is no bisection: a coarse grid (every ``step``-th value, both
ends), then every value between the passing coarse point with the fewest tokens and the coarse
point with the next fewer tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from vtc.tune.knobs import Knob, Target
from vtc.tune.points import Point, loss


def coarse_indices(count: int, step: int) -> list[int]:
    """Every ``step``-th of ``count`` knob indices from the first, and the last."""
    if step < 1:
        raise ValueError(f"the coarse grid step must be >= 1, got {step}")
    return sorted(set(range(0, count, step)) | {count - 1})


def refine_indices(coarse: Mapping[int, tuple[float, bool]]) -> list[int]:
    """Knob indices to evaluate after the coarse grid, given its (visual tokens, meets the target)
    by knob index: those strictly between the passing coarse point with the fewest tokens and the
    coarse point with the next fewer tokens (the nearest in index among equals); none when no
    coarse point passes or none has fewer tokens."""
    passing = [i for i, (_, ok) in coarse.items() if ok]
    if not passing:
        return []
    best = min(passing, key=lambda i: (coarse[i][0], i))
    fewer = [i for i, (tokens, _) in coarse.items() if tokens < coarse[best][0]]
    if not fewer:
        return []
    nearest = max(fewer, key=lambda i: (coarse[i][0], -abs(i - best)))
    low, high = sorted((best, nearest))
    return list(range(low + 1, high))


def meets(point: Point, target: Target) -> bool:
    return target.met_by(point.metric(target.metric))


def smallest_passing(points: Sequence[Point], target: Target) -> tuple[Point | None, Point | None]:
    """(the point meeting ``target`` with the fewest visual tokens, the better metric among equals;
    the point with the next fewer tokens, which misses it), None where there is none."""
    passing = [p for p in points if meets(p, target)]
    if not passing:
        return None, None
    best = min(passing, key=lambda p: (p.visual_tokens, loss(target.metric, p.metric(target.metric))))
    fewer = [p for p in points if p.visual_tokens < best.visual_tokens]
    return best, max(fewer, key=lambda p: p.visual_tokens) if fewer else None


def best_by_metric(points: Sequence[Point], metric: str) -> Point:
    """The point with the best ``metric`` (the fewest tokens among equals)."""
    return min(points, key=lambda p: (loss(metric, p.metric(metric)), p.visual_tokens))


def grid(knobs: Sequence[Knob]) -> list[tuple[str, ...]]:
    """Every combination of the knobs' values (the cartesian grid), as spec lists."""
    return list(itertools.product(*(knob.specs for knob in knobs)))
