"""Per-layer schedules (ToMe's constant and decreasing r, DyMU's linear schedules, EViT's drop layers) and how ToMe plans with them."""

from __future__ import annotations

import pytest

from vtc.budget import constant_total, default_drop_layers, linear_total, per_layer, tome_inflection
from vtc.reducers import ToMe
from vtc.sites import EncoderInfo

DECREASING_16 = [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]


def test_constant_r_sums_to_192_over_12_layers():
    assert per_layer(16, 12) == [16] * 12
    assert sum(per_layer(16, 12)) == 192
    assert tome_inflection(16, 0.0, 12) == [16] * 12


def test_tome_decreasing_and_increasing_schedules():
    assert tome_inflection(16, -1.0, 12) == DECREASING_16
    assert sum(DECREASING_16) == 187
    assert tome_inflection(16, 1.0, 12) == DECREASING_16[::-1]
    assert per_layer(16, 12, inflect=-1.0) == DECREASING_16


def test_tome_inflection_single_layer_and_range():
    assert tome_inflection(7, -1.0, 1) == [7]
    with pytest.raises(ValueError, match=r"inflect must be in \[-1, 1\], got 1.5"):
        tome_inflection(4, 1.5, 12)


def test_explicit_lists_are_zero_padded():
    assert per_layer([25] * 8, 24) == [25] * 8 + [0] * 16
    assert per_layer((3, 1), 4) == [3, 1, 0, 0]
    with pytest.raises(ValueError, match="explicit schedule has 5 entries but the model has 4 layers"):
        per_layer([1] * 5, 4)


def test_dymu_linear_total_example():
    expected = [42, 40, 38, 36, 35, 33, 31, 29, 28, 26, 24, 22, 21, 19, 17, 15, 14, 12, 10, 8, 4, 0, 0, 0]
    assert linear_total(504, 24) == expected
    assert sum(linear_total(504, 24)) == 504
    assert per_layer(504, 24, "linear") == expected
    assert per_layer(504, 24, "reverse-linear") == expected[::-1]


def test_dymu_constant_total_remainder_goes_first():
    assert constant_total(537, 27) == [20] * 24 + [19] * 3
    assert constant_total(24, 12) == [2] * 12
    assert constant_total(5, 3) == [2, 2, 1]


@pytest.mark.parametrize("total,layers", [(504, 24), (384, 24), (192, 24), (96, 24), (100, 12), (7, 12), (5, 24), (0, 12)])
def test_linear_total_hits_total(total, layers):
    schedule = linear_total(total, layers)
    assert len(schedule) == layers
    assert sum(schedule) == total
    assert all(v >= 0 for v in schedule)


@pytest.mark.parametrize("total,layers", [(504, 24), (384, 24), (192, 24), (100, 12)])
def test_linear_total_is_non_increasing(total, layers):
    schedule = linear_total(total, layers)
    assert all(a >= b for a, b in zip(schedule, schedule[1:])), schedule


def test_linear_total_small_total_ends_with_one_partial_entry():
    """DyMU's linear schedule: once int(r0 - i*r0/L) reaches 0 the remainder is one partial entry, then zeros."""
    schedule = linear_total(96, 24)
    assert schedule[-5:] == [1, 1, 1, 4, 0] and sum(schedule) == 96
    assert linear_total(7, 12) == [1, 6] + [0] * 10


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; allowed: constant, linear, reverse-linear"):
        per_layer(4, 12, "cosine")


def test_evit_default_drop_layers():
    assert default_drop_layers(12) == (3, 6, 9)
    assert default_drop_layers(24) == (6, 12, 18)
    assert default_drop_layers(4) == (1, 2, 3)


def _info(num_tokens=577, layers=24):
    return EncoderInfo(family="test", num_layers=layers, num_tokens=num_tokens, n_prefix=1, has_cls=True, grid=(24, 24))


def test_tome_linear_schedule_spreads_r_times_layers():
    plan = ToMe(r=21, schedule="linear").plan(_info())
    assert [r or 0 for r in plan] == linear_total(21 * 24, 24)
    plan = ToMe(r=21, schedule="reverse-linear").plan(_info())
    assert [r or 0 for r in plan] == linear_total(21 * 24, 24)[::-1]
    plan = ToMe(r=23, schedule="reverse-linear").plan(_info())  # the late layers' r is capped
    assert sum(r or 0 for r in plan) < 23 * 24
    n = 577
    for r, asked in zip(plan, linear_total(23 * 24, 24)[::-1]):
        assert (r or 0) == min(asked, (n - 1) // 2)
        n -= r or 0


def test_tome_plan_marks_zero_layers_as_none():
    plan = ToMe(r=(5, 0, 3)).plan(_info(65, 4))
    assert plan == [5, None, 3, None]
