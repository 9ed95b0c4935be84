"""95 % intervals for eval scores. One example is 8.3 points of a 12-example set and 1.1 of a
90-example set: a score, or a difference between two files, means nothing without its interval.

Scores come per example, in [0, 1]: 0/1 for exact, choice, numeric and cot; fractions for rouge and
json (the share of fields right).
    mean        exact (Clopper-Pearson) for 0/1 scores; a seeded percentile bootstrap otherwise.
    paired      the mean difference of two files' scores on the same examples. For 0/1 scores, exact
                bounds on each kind of disagreement (A right where B is wrong, and the reverse), each at
                97.5 % so that both hold together at 95 % (Bonferroni). Unlike McNemar's test, which
                conditions on the disagreements seen, this stays honest when none was seen: 0 of 12 still
                allows a 31 % rate. A paired bootstrap otherwise, which is not: it is as narrow as the
                differences seen (zero-wide when there are none), so fasttune.autoquant lets a score
                decide only on sets where the exact 0/1 bound is already small.
    resolution  the smallest loss n examples can rule out at all: the upper bound of a paired interval
                with no disagreement seen. Below it, no score table can show a file is within tolerance.
Values are in points (score x 100), as every report prints them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 0.1 point between seeds


@dataclass(frozen=True)
class Interval:
    """A value and its 95 % interval, in points, from n examples."""

    value: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.1f} [{self.lo:.1f}, {self.hi:.1f}]"

    def as_dict(self) -> dict:
        return {"value": round(self.value, 2), "lo": round(self.lo, 2), "hi": round(self.hi, 2), "n": self.n}


def text(d: dict | None, missing: str = "-") -> str:
    """An interval stored with as_dict, as reports print it: "-0.4 [-1.2, 0.1]"."""
    return str(Interval(**d)) if d else missing


def _binary(*scores: np.ndarray) -> bool:
    return all(np.isin(s, (0.0, 1.0)).all() for s in scores)


def _exact(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson bounds on a rate seen k times in n."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def _bootstrap(values: np.ndarray, full: tuple[float, float]) -> tuple[float, float]:
    """Percentile bootstrap of the mean, seeded: the same scores give the same interval everywhere.
    One value says nothing about the spread: `full`, the widest interval possible, then."""
    if len(values) < 2:
        return full
    rng = np.random.default_rng(0)
    means = np.concatenate([values[rng.integers(0, len(values), (100, len(values)))].mean(1)
                            for _ in range(RESAMPLES // 100)])  # 100 resamples at a time: memory stays small
    lo, hi = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(lo), float(hi)


def mean(scores) -> Interval:
    """The mean score and its interval."""
    s = np.asarray(scores, dtype=np.float64)
    if not len(s):
        raise ValueError("no scores")
    lo, hi = _exact(int(s.sum()), len(s), CONFIDENCE) if _binary(s) else _bootstrap(s, (0.0, 1.0))
    return Interval(100 * float(s.mean()), 100 * lo, 100 * hi, len(s))


def paired(a, b) -> Interval:
    """mean(a) - mean(b) over the same examples, and its interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired scores need the same examples: {len(a)} and {len(b)}")
    n = len(a)
    if _binary(a, b):
        each = 1 - (1 - CONFIDENCE) / 2  # two bounds that hold together at CONFIDENCE
        wins, losses = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        (w_lo, w_hi), (l_lo, l_hi) = _exact(wins, n, each), _exact(losses, n, each)
        return Interval(100 * (wins - losses) / n, 100 * (w_lo - l_hi), 100 * (w_hi - l_lo), n)
    lo, hi = _bootstrap(a - b, (-1.0, 1.0))
    return Interval(100 * float((a - b).mean()), 100 * lo, 100 * hi, n)


def resolution(n: int) -> float:
    """The smallest loss, in points, that n paired examples can ever show a file stays within."""
    return 100 * _exact(0, n, 1 - (1 - CONFIDENCE) / 2)[1] if n else 100.0
