"""The interval arithmetic, against values computed by hand."""

import math

import pytest

from ffn.harness import stats


def test_t_interval_of_a_fixed_sample():
    # 1..5: mean 3, s = sqrt(2.5), sem = sqrt(2.5/5) = 0.70711, t_{0.975, 4} = 2.776445 -> ±1.963243
    ci = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert ci.mean == 3.0 and ci.n == 5
    assert ci.lo == pytest.approx(3 - 1.963243, abs=1e-5) and ci.hi == pytest.approx(3 + 1.963243, abs=1e-5)
    assert ci.excludes_zero() and ci.sign() == 1


def test_paired_interval_is_the_t_interval_of_the_differences():
    a, b = [2.0, 3.5, 4.0], [1.0, 1.5, 3.5]  # differences 1, 2, 0.5: mean 7/6, s = 0.763763
    ci = stats.paired_interval(a, b)
    half = 4.302653 * 0.763763 / math.sqrt(3)  # t_{0.975, 2} = 4.302653
    assert ci.mean == pytest.approx(7 / 6)
    assert (ci.lo, ci.hi) == (pytest.approx(7 / 6 - half, abs=1e-5), pytest.approx(7 / 6 + half, abs=1e-5))
    assert not ci.excludes_zero() and ci.sign() == 0  # -0.73..3.06 contains 0: not resolved


def test_one_seed_has_no_interval_and_non_finite_values_are_dropped():
    ci = stats.mean_interval([2.5])
    assert ci.mean == 2.5 and not ci.known and ci.sign() == 0 and "n=1" in ci.fmt()
    ci = stats.mean_interval([1.0, float("nan"), 3.0])
    assert ci.n == 2 and ci.mean == 2.0
    assert stats.paired_interval([1.0, 2.0], [1.0, float("inf")]).n == 1
