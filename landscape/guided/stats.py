"""Paired comparisons of fine-tuning runs: is regularizer A better than B over the same restarts?

Runs are paired: ``values[i]`` and ``baseline[i]`` come from the same restart seed and the same
training sub-sample, so the restart-to-restart spread (which is large at small data fractions)
cancels in the differences d_i = values[i] - baseline[i].  ``paired_comparison`` reports their mean,
a seeded percentile-bootstrap interval of that mean, and a two-sided Wilcoxon signed-rank p-value.
"""

import math
from typing import NamedTuple, Sequence

import numpy as np

from ..errors import UsageError

_BOOTSTRAP_CHUNK = 1000  # resamples drawn at once: bounds memory at CHUNK * n indices


class PairedResult(NamedTuple):
    """Outcome of one paired comparison (all in the metric's own units, except p_value and n).

    diff: mean paired difference, values - baseline.
    ci_low, ci_high: percentile bootstrap interval of that mean (NaN when n < 2).
    p_value: two-sided Wilcoxon signed-rank p-value (NaN when n < 2; 1.0 when every difference is 0).
    n: number of pairs used (pairs with a non-finite value are dropped).
    """

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int


def _differences(values, baseline):
    a = np.asarray(values, dtype=float).reshape(-1)
    b = np.asarray(baseline, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise UsageError(f"paired comparison needs one baseline run per run; got {a.size} and {b.size}")
    d = a - b
    return d[np.isfinite(d)]  # a run whose metric is undefined (NaN) or diverged drops with its pair


def bootstrap_interval(d, seed=0, resamples=10000, confidence=0.95):
    """Percentile bootstrap interval of mean(d): (low, high).

    Draws ``resamples`` resamples of d with replacement from ``numpy.random.default_rng(seed)``
    (reproducible for a seed), takes each one's mean, and returns the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of those means.  When all differences are equal every resample
    mean is that value, so the interval is returned as exactly (d[0], d[0]) rather than what
    rounding in the means would give.

    Args:
        d: 1-D array of n >= 1 differences.
        seed: seeds the resampling.
        resamples: the number of resamples.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        (low, high), floats in d's units.
    """
    d = np.asarray(d, dtype=float).reshape(-1)
    if d.size == 0:
        raise UsageError("no differences to bootstrap")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        stop = min(start + _BOOTSTRAP_CHUNK, resamples)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilcoxon_p(d):
    """Two-sided Wilcoxon signed-rank p-value of the differences d (``scipy.stats.wilcoxon``).

    scipy's defaults: zero differences are dropped ("wilcox"), exact distribution for small samples
    without ties, normal approximation otherwise.  Decided here, not left to the scipy version
    (older ones raise, newer ones warn): fewer than 2 pairs give NaN (no test is possible), and all
    differences 0 give 1.0 (the runs agree exactly: no evidence of a difference).
    """
    from scipy.stats import wilcoxon

    d = np.asarray(d, dtype=float).reshape(-1)
    if d.size < 2:
        return math.nan
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(d).pvalue)


def smallest_p(n: int) -> float:
    """The smallest two-sided p an exact Wilcoxon signed-rank test over ``n`` pairs can give: 2 / 2^n.

    It is reached when every difference has the same sign (one of the 2^n equally likely sign
    patterns under the null, doubled for two sides).  n = 5 gives 0.0625, n = 6 gives 0.03125: six
    pairs are the fewest with which p < 0.05 is possible at all.  NaN for n < 2 (no test).
    """
    n = int(n)
    return math.nan if n < 2 else min(1.0, 2.0 / 2.0 ** n)


def fewest_pairs(alpha: float = 0.05) -> int:
    """The fewest pairs with which an exact two-sided Wilcoxon test can reach p < ``alpha``."""
    n = 2
    while not smallest_p(n) < alpha:
        n += 1
    return n


def paired_comparison(values: Sequence[float], baseline: Sequence[float], seed: int = 0,
                      resamples: int = 10000, confidence: float = 0.95) -> PairedResult:
    """Compare paired runs: mean difference, bootstrap interval, Wilcoxon p-value.

    Args:
        values: a metric per run of the method, shape (n,).
        baseline: the same metric per run of the baseline, shape (n,); ``baseline[i]`` is paired
            with ``values[i]`` (same restart seed and data subset).
        seed: seed of the bootstrap resampling.
        resamples: number of bootstrap resamples (>= 1).
        confidence: interval coverage in (0, 1), e.g. 0.95.

    Returns:
        PairedResult(diff, ci_low, ci_high, p_value, n).  Pairs where either value is NaN or
        infinite are dropped and n counts the pairs used.  n == 1: diff is that difference, the
        interval and p-value are NaN.  n == 0: everything NaN.

    Raises:
        UsageError: values and baseline of different lengths, resamples < 1, confidence outside (0, 1).
    """
    if not (0.0 < confidence < 1.0):
        raise UsageError(f"the confidence level must be in (0, 1), got {confidence}")
    if int(resamples) != resamples or resamples < 1:
        raise UsageError(f"the number of bootstrap resamples must be a positive integer, got {resamples}")
    d = _differences(values, baseline)
    n = int(d.size)
    if n == 0:
        return PairedResult(math.nan, math.nan, math.nan, math.nan, 0)
    diff = float(d.mean()) if not np.all(d == d[0]) else float(d[0])
    if n < 2:
        return PairedResult(diff, math.nan, math.nan, math.nan, n)
    low, high = bootstrap_interval(d, seed=seed, resamples=int(resamples), confidence=confidence)
    return PairedResult(diff, low, high, wilcoxon_p(d), n)
