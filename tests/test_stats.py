"""Paired differences, Student-t intervals and verdicts (semfl.experiments.stats)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from semfl.experiments.stats import (HOLDS, REVERSED, UNDECIDED, paired_difference, t_quantile,
                                     verdict_of)


@pytest.mark.parametrize("dof, expected", [(1, 12.706204736174707), (2, 4.302652729749464),
                                           (4, 2.7764451051977987), (9, 2.2621571628540993)])
def test_t_quantile_matches_the_tables(dof, expected):
    # t_{0.975, dof} from the standard tables (12.706, 4.303, 2.776, 2.262)
    assert t_quantile(0.95, dof) == pytest.approx(expected, rel=1e-9)


def test_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="dof"):
        t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.0, 3)


def test_five_seeds_by_hand():
    # diffs 1.0, 1.2, 0.8, 1.1, 0.9: mean 1, sd sqrt(0.1 / 4) = 0.158114, half = 2.776445 * sd / sqrt(5)
    a = {100: 3.0, 101: 3.2, 102: 2.8, 103: 3.1, 104: 2.9}
    b = {s: 2.0 for s in a}
    res = paired_difference(a, b, "greater")
    half = 2.7764451051977987 * math.sqrt(0.025) / math.sqrt(5)
    assert res.n == 5 and res.seeds == [100, 101, 102, 103, 104]
    assert res.diffs == pytest.approx([1.0, 1.2, 0.8, 1.1, 0.9])
    assert res.mean == pytest.approx(1.0) and res.sd == pytest.approx(math.sqrt(0.025))
    assert (res.low, res.high) == (pytest.approx(1 - half), pytest.approx(1 + half))
    assert res.low == pytest.approx(0.803676, abs=1e-6)
    assert res.verdict == HOLDS and res.notes == []
    assert paired_difference(a, b, "less").verdict == REVERSED


def test_interval_agrees_with_scipy_paired_t_test():
    rng = np.random.default_rng(7)
    a = rng.normal(0.6, 0.05, 6)
    b = a - rng.normal(0.02, 0.03, 6)
    res = paired_difference(dict(enumerate(a)), dict(enumerate(b)), "greater")
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (res.low, res.high) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))


def test_interval_containing_zero_is_undecided():
    # diffs 0.5, 1.0, 1.5: mean 1, sd 0.5, half = 4.302653 * 0.5 / sqrt(3) = 1.242 > 1
    res = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 1.5}, "greater")
    assert res.mean == pytest.approx(1.0) and res.low == pytest.approx(1 - 4.302652729749464 * 0.5 / math.sqrt(3))
    assert res.low < 0 < res.high and res.verdict == UNDECIDED


def test_less_holds_when_the_interval_is_below_zero():
    res = paired_difference({0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.0, 2: 2.0}, "less")
    assert res.high < 0 and res.verdict == HOLDS
    assert paired_difference({0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.0, 2: 2.0}, "greater").verdict == REVERSED


def test_one_seed_is_undecided_with_a_note():
    res = paired_difference({3: 0.9}, {3: 0.1}, "greater")
    assert res.n == 1 and res.mean == pytest.approx(0.8)
    assert res.low is None and res.high is None and res.verdict == UNDECIDED
    assert any("one paired seed" in n for n in res.notes)


def test_missing_seeds_use_only_the_paired_ones_and_say_so():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 5: float("nan")}
    b = {1: 1.5, 2: 2.0, 3: 9.0, 5: 1.0}
    res = paired_difference(a, b, "greater")
    assert res.seeds == [1, 2] and res.diffs == pytest.approx([0.5, 1.0])
    assert "seeds [0]: no finite value on side B, left out" in res.notes
    assert "seeds [3, 5]: no finite value on side A, left out" in res.notes
    empty = paired_difference({0: 1.0}, {1: 1.0}, "greater")
    assert empty.n == 0 and empty.mean is None and empty.verdict == UNDECIDED
    assert any("no paired seed" in n for n in empty.notes)


def test_constant_side_b():
    res = paired_difference({0: 1.5, 1: 1.7, 2: 1.6}, 1.0, "greater")
    assert res.b == [1.0, 1.0, 1.0] and res.mean == pytest.approx(0.6)
    assert res.verdict == HOLDS
    assert paired_difference({0: 1.5, 1: 1.7, 2: 1.6}, 7.0, "less").verdict == HOLDS


def test_identical_differences_give_a_point_interval():
    res = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}, "greater")
    assert res.sd == 0 and res.low == res.high == pytest.approx(1.0) and res.verdict == HOLDS
    tie = paired_difference({0: 2.0, 1: 3.0}, {0: 2.0, 1: 3.0}, "greater")
    assert tie.low == tie.high == 0 and tie.verdict == UNDECIDED


def test_verdict_of_and_bad_direction():
    assert verdict_of(0.1, 0.3, "greater") == HOLDS and verdict_of(-0.3, -0.1, "greater") == REVERSED
    assert verdict_of(-0.1, 0.3, "less") == UNDECIDED and verdict_of(-0.3, -0.1, "less") == HOLDS
    with pytest.raises(ValueError, match="direction"):
        paired_difference({0: 1.0}, {0: 1.0}, "bigger")
