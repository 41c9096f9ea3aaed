"""Intervals over seeds (SciPy): the mean of a metric with its 95% t interval, and the
paired difference of two designs' metric over the same seeds with its interval.

Seed k of every design starts from the same initialization seed and sees the same
batches, so a design's difference to the baseline is measured per seed and the
interval is that of the mean paired difference (scipy.stats.ttest_rel), which is
narrower than comparing two independent intervals when seeds share their noise.
With one seed no interval exists: the functions return NaN bounds and the report
says so instead of claiming anything.
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float  # NaN when fewer than 2 finite values
    hi: float
    n: int

    @property
    def known(self):
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def excludes_zero(self):
        return self.known and (self.lo > 0 or self.hi < 0)

    def sign(self):
        """+1 / -1 when the interval lies above / below 0, else 0 (not resolved)."""
        if not self.excludes_zero():
            return 0
        return 1 if self.lo > 0 else -1

    def fmt(self, spec=".4f"):
        if not math.isfinite(self.mean):
            return "–"
        if not self.known:
            return f"{self.mean:{spec}} (n={self.n})"
        return f"{self.mean:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"


def _finite(values):
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def mean_interval(values, confidence=CONFIDENCE):
    """Mean of the finite values and its t interval: mean ± t_{(1+c)/2, n-1} · s/√n."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n)
    sem = float(stats.sem(x))
    if sem == 0:
        return Interval(mean, mean, mean, n)
    lo, hi = stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
    return Interval(mean, float(lo), float(hi), n)


def paired_interval(values, baseline, confidence=CONFIDENCE):
    """Mean of values[k] - baseline[k] over the seeds where both are finite, with the
    confidence interval of scipy.stats.ttest_rel."""
    pairs = [(v, b) for v, b in zip(values, baseline)
             if v is not None and b is not None and math.isfinite(v) and math.isfinite(b)]
    n = len(pairs)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    a, b = (np.asarray(p, dtype=float) for p in zip(*pairs))
    mean = float((a - b).mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n)
    if np.all(a - b == (a - b)[0]):  # zero variance: ttest_rel gives NaN
        return Interval(mean, mean, mean, n)
    ci = stats.ttest_rel(a, b).confidence_interval(confidence)
    return Interval(mean, float(ci.low), float(ci.high), n)
