"""Uncertainty of benchmark numbers: Wilson intervals for accuracies, an exact paired test for two
methods scored on the same examples, and the spread of speedups timed in interleaved repeats.
Pure functions of counts and samples."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (0, 1) when ``n`` is 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value that A and B are equally accurate on the same examples:
    a binomial test on the examples exactly one of them gets right (1.0 when there are none)."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired test needs the same examples: {len(correct_a)} vs {len(correct_b)} results")
    only_a = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of per-repeat ratios."""

    median: float
    q1: float
    q3: float

    @property
    def includes_one(self) -> bool:
        """The interquartile range reaches 1: the spread is larger than the effect."""
        return self.q1 <= 1.0 <= self.q3

    def format(self) -> str:
        return f"{self.median:.2f}x [{self.q1:.2f}-{self.q3:.2f}]" + (" ~" if self.includes_one else "")


def speedup_spread(reference_seconds: Sequence[float], seconds: Sequence[float]) -> Spread:
    """Speedups ``reference / reduced`` of repeats timed interleaved (repeat i of each side run
    back to back), as median and quartiles over the repeats."""
    if len(reference_seconds) != len(seconds) or not seconds:
        raise ValueError(f"need the same, non-zero number of repeats: {len(reference_seconds)} vs {len(seconds)}")
    ratios = sorted(r / s for r, s in zip(reference_seconds, seconds))
    if len(ratios) == 1:
        return Spread(ratios[0], ratios[0], ratios[0])
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return Spread(statistics.median(ratios), q1, q3)
