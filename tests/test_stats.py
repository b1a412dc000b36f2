"""Wilson intervals, the exact paired test and speedup spreads against known values."""

import math

import pytest

from vtc.stats import mcnemar_exact, speedup_spread, wilson


def test_wilson_matches_the_closed_form_on_textbook_cases():
    # 8 of 10: Wilson 95% interval (0.4902, 0.9433), worked by hand from the closed form
    low, high = wilson(8, 10)
    assert math.isclose(low, 0.49016, abs_tol=5e-5) and math.isclose(high, 0.94332, abs_tol=5e-5)
    assert wilson(0, 20)[0] == 0.0 and math.isclose(wilson(0, 20)[1], 0.16113, abs_tol=5e-5)
    assert wilson(20, 20)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="between 0 and n=3"):
        wilson(4, 3)


def test_mcnemar_is_an_exact_binomial_test_on_discordant_pairs():
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    # 10 vs 2 discordant: 2 * P(X <= 2 | n=12, p=1/2) = 2 * 79 / 4096
    assert math.isclose(mcnemar_exact(a, b), 2 * 79 / 4096, rel_tol=1e-12)
    assert mcnemar_exact(a, a) == 1.0
    with pytest.raises(ValueError, match="same examples"):
        mcnemar_exact(a, b[:-1])


def test_speedup_spread_pairs_repeats_and_flags_noise():
    spread = speedup_spread([2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert (spread.median, spread.q1, spread.q3) == (2.0, 2.0, 2.0) and not spread.includes_one
    noisy = speedup_spread([1.0, 1.0, 1.0, 1.0], [0.5, 0.9, 1.1, 2.0])
    assert noisy.q1 < 1.0 < noisy.q3 and noisy.includes_one and noisy.format().endswith("~")
