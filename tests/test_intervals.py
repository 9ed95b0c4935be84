"""95 % intervals for eval scores: closed forms where they exist, coverage where they do not."""

import numpy as np
import pytest

from fasttune import intervals


def test_exact_bounds_match_their_closed_forms():
    """Clopper-Pearson with 0 or n successes has a closed form: 1 - (alpha/2)^(1/n)."""
    for n in (1, 12, 90):
        none, every = intervals.mean([0.0] * n), intervals.mean([1.0] * n)
        assert none.value == 0 and none.lo == 0 and none.hi == pytest.approx(100 * (1 - 0.025 ** (1 / n)))
        assert every.value == 100 and every.lo == pytest.approx(100 * 0.025 ** (1 / n)) and every.hi == 100


def test_paired_intervals_stay_honest_when_no_disagreement_was_seen():
    """Identical answers on 12 examples do not show two files are equal: a 31-point loss is still possible."""
    same = intervals.paired([1.0, 0.0] * 6, [1.0, 0.0] * 6)
    assert same.value == 0 and same.lo == pytest.approx(-intervals.resolution(12)) and same.hi == -same.lo
    assert 30 < intervals.resolution(12) < 31 and intervals.resolution(400) > 1 > intervals.resolution(440)
    resolutions = [intervals.resolution(n) for n in (2, 6, 12, 45, 90, 500)]
    assert resolutions == sorted(resolutions, reverse=True)
    loses = intervals.paired([0.0] * 3 + [1.0] * 9, [1.0] * 12)  # A wrong on 3 where B is right
    assert loses.value == -25 and loses.lo < -25 < loses.hi < 0 + intervals.resolution(12)


def test_exact_paired_intervals_cover_the_true_difference():
    """400 simulated eval sets of 40 examples, seeded (the same on every machine): A right with p 0.7,
    B disagreeing with A on 20 %, so the true difference is 8 points; the interval holds it at least
    95 % of the time (Bonferroni makes it conservative)."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):
        a = rng.random(40) < 0.7
        b = np.where(rng.random(40) < 0.2, ~a, a)
        d = intervals.paired(a.astype(float), b.astype(float))
        hits += d.lo <= 8 <= d.hi
    assert hits / 400 >= 0.95


def test_bootstrap_for_fractional_scores_is_seeded_and_contains_the_mean():
    a = np.linspace(0, 1, 30)
    first, second = intervals.paired(a, a * 0.9), intervals.paired(a, a * 0.9)
    assert first == second and first.lo < first.value < first.hi
    assert intervals.paired(a, a - 0.1) == intervals.Interval(pytest.approx(10), pytest.approx(10),
                                                              pytest.approx(10), 30)
    m = intervals.mean(a)
    assert m.lo < 50 < m.hi and m.value == pytest.approx(50)
    with pytest.raises(ValueError, match="the same examples: 3 and 2"):
        intervals.paired([1, 0, 1], [1, 0])
