"""Is one row of a table really better than another, and how sure are we: statistics over seeds.

Pure functions on lists of test errors (%), one value per seed; math.inf stands for a diverged
seed, the worst possible error (as in report.py's median). Chosen for 3-10 seeds per row:

- median_interval: the exact distribution-free interval for the median from order statistics
  (binomial): [x_(k), x_(n+1-k)] covers the true median with probability 1 - 2 P(Bin(n, 1/2) < k),
  for any continuous distribution. It is exact, so below 6 seeds no interval reaches 95%: there the
  widest one, [min, max], is returned with its real coverage (93.8% at 5 seeds).
- permutation_test: a two-sided permutation test on the difference of mean ranks (the exact
  Wilcoxon-Mann-Whitney test). Exact and distribution-free, where Welch's t assumes normal errors,
  which 5 seeds cannot check. On ranks, because a diverged seed (inf) has no value to average but
  does have a rank, the worst; one bad seed also cannot swing it. On normal data it loses little
  against the t-test (asymptotic relative efficiency 3/pi = 0.955).
- bootstrap_difference: a percentile bootstrap interval for the difference of medians, the
  paper's statistic, with a fixed RNG seed so a report prints the same numbers each time.
- seeds_needed: the normal-approximation sample size for the observed difference and spread.
"""

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

ALPHA = 0.05
POWER = 0.8
# Exact enumeration up to this many relabellings (C(10, 5) = 252, C(16, 8) = 12870), else
# Monte Carlo.
MAX_EXACT = 20_000
DRAWS = 20_000
RNG_SEED = 0


def interval_coverage(n: int, k: int) -> float:
    """Probability that [x_(k), x_(n+1-k)] of n samples holds the true median (k from 1)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n


def median_interval(values: Sequence[float],
                    level: float = 1 - ALPHA) -> Optional[Tuple[float, float, float]]:
    """(low, high, coverage): the narrowest order-statistic interval with coverage >= level, or
    [min, max] with its (lower) coverage when none reaches it. None below 2 values."""
    x = sorted(values)
    n = len(x)
    if n < 2:
        return None
    k = 1
    while k + 1 <= n // 2 and interval_coverage(n, k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], interval_coverage(n, k)


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties (e.g. several diverged seeds) sharing their mean rank."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def min_p_value(n1: int, n2: int) -> float:
    """The smallest two-sided p the permutation test can give without ties: both extreme
    relabellings. Ties (several diverged seeds) can make one extreme unique, halving it."""
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def _permutation_p(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """(p, the smallest p any relabelling of these values could give) of permutation_test."""
    n1, n = len(a), len(a) + len(b)
    r = ranks([*a, *b])
    exact = math.comb(n, n1) <= MAX_EXACT
    if exact:
        labels = np.array(list(itertools.combinations(range(n), n1)), dtype=int)
    else:
        rng = np.random.default_rng(RNG_SEED)
        labels = np.argsort(rng.random((DRAWS, n)), axis=1)[:, :n1]  # random relabellings
    # The rank sum of `a` determines the mean-rank difference; centred at its null mean.
    centred = np.abs(r[labels].sum(axis=1) - n1 * (n + 1) / 2)
    observed = abs(r[:n1].sum() - n1 * (n + 1) / 2)

    def p(threshold: float) -> float:
        k = np.sum(centred >= threshold - 1e-9)
        return float(k / len(labels) if exact else (k + 1) / (len(labels) + 1))  # +1: the data

    return p(observed), p(centred.max())


def permutation_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value that a and b come from one distribution, on the mean-rank difference."""
    return _permutation_p(a, b)[0]


def median_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """median(a) - median(b); two diverged (inf) medians tie, difference 0."""
    ma, mb = statistics.median(a), statistics.median(b)
    return 0.0 if ma == mb else ma - mb


def bootstrap_difference(a: Sequence[float], b: Sequence[float], level: float = 1 - ALPHA,
                         draws: int = 10_000) -> Tuple[float, float]:
    """Percentile bootstrap interval for median(a) - median(b), each row resampled on its own.
    With few seeds it is too narrow (a resample holds only the observed values): the p-value,
    not this interval, decides the verdict."""
    rng = np.random.default_rng(RNG_SEED)
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    mx = np.median(x[rng.integers(0, len(x), (draws, len(x)))], axis=1)
    my = np.median(y[rng.integers(0, len(y), (draws, len(y)))], axis=1)
    with np.errstate(invalid="ignore"):
        d = np.where(mx == my, 0.0, mx - my)
    # Order statistics, not interpolation: between a number and inf there is nothing to interpolate.
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


@dataclass
class Comparison:
    """A row's seeds (a) against the baseline's (b)."""

    diff: float  # median(a) - median(b), in points of test error
    interval: Optional[Tuple[float, float]]  # bootstrap, None below 2 seeds in a row
    p: float
    seeds: int  # the smaller seed count: what the verdict rests on
    min_p: float  # the smallest p any relabelling of these seeds gives
    sign: int  # -1: a has lower errors (ranks), +1: higher, 0: not significant at ALPHA

    @property
    def verdict(self) -> str:
        if self.sign < 0:
            return "better"
        if self.sign > 0:
            return "worse"
        text = f"no difference shown at {self.seeds} seed{'s' * (self.seeds != 1)}"
        if self.min_p >= ALPHA:
            text += f" (p cannot go below {self.min_p:.2g})"
        return text


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Whether a's errors are lower (better) or higher than b's; both need at least one seed."""
    p, min_p = _permutation_p(a, b)
    r = ranks([*a, *b])
    lower = r[:len(a)].mean() < r[len(a):].mean()
    return Comparison(
        diff=median_difference(a, b),
        interval=bootstrap_difference(a, b) if min(len(a), len(b)) >= 2 else None,
        p=p,
        seeds=min(len(a), len(b)),
        min_p=min_p,
        sign=0 if p >= ALPHA else (-1 if lower else 1),
    )


def _finite(values: Sequence[float]) -> list:
    return [v for v in values if math.isfinite(v)]


def mean_difference(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """mean(a) - mean(b) over finite errors; inf when only b has any, None when a row has none
    and b is not the only one with finite errors."""
    fa, fb = _finite(a), _finite(b)
    if fa and fb:
        return statistics.fmean(fa) - statistics.fmean(fb)
    if fa or fb:  # one row diverged on every seed, the other did not
        return -math.inf if fa else math.inf
    return None


def pooled_std(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """The seed spread of both rows together, over finite errors (a diverged seed has none)."""
    groups = [_finite(g) for g in (a, b)]
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    if dof == 0:
        return None
    return math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in groups if len(g) > 1) / dof)


def seeds_needed(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA,
                 power: float = POWER) -> Optional[int]:
    """Seeds per row for the test to find the observed difference with this power:
    n = 2 (z_{1-alpha/2} + z_power)^2 s^2 / d^2, the two-sample normal approximation, so d is the
    difference of means and s the pooled sd, both over finite errors (diverged seeds left out);
    divided by the rank test's efficiency 3/pi; at least the fewest seeds at which the test can
    reach alpha. None when it cannot be estimated: no difference, or no spread (fewer than two
    finite errors in both rows, or identical ones: too few seeds to see the noise, not none)."""
    n_min = next(n for n in itertools.count(1) if min_p_value(n, n) < alpha)
    d = mean_difference(a, b)
    if d is not None and math.isinf(d):  # one row always diverged: as large as a difference gets
        return n_min
    s = pooled_std(a, b)
    if not d or not s:
        return None
    z = statistics.NormalDist().inv_cdf
    n = 2 * (z(1 - alpha / 2) + z(power)) ** 2 * s**2 / d**2 / (3 / math.pi)
    return max(n_min, math.ceil(n))


def seeds_needed_note(a: Sequence[float], b: Sequence[float]) -> str:
    """seeds_needed with what it rests on, for a report line."""
    n, d, s = seeds_needed(a, b), mean_difference(a, b), pooled_std(a, b)
    return (f"difference of means {'—' if d is None else f'{d:+.2f}'}, seed sd "
            f"{'—' if s is None else f'{s:.2f}'}: seeds needed per row "
            f"{'not estimable' if n is None else n}")


# How each statistic is computed, for readers of a report (kept here, beside the code it describes).
SEEDS_NEEDED_METHOD = (
    "Seeds needed: two-sample normal approximation n = 2 (z_0.975 + z_0.8)^2 sd^2 / d^2 at the "
    "observed difference of means d and pooled sd (completed seeds), two-sided p < "
    f"{ALPHA}, power {POWER}, divided by the rank test's efficiency 3/pi; at least 4 per row, the "
    "fewest whose test can reach p < 0.05; not estimable without a difference or a spread.")


def method_notes(difference_column: str) -> list:
    """One markdown bullet per comparison column of a report; `difference_column` is the
    header of the column of median differences."""
    return [
        ("- median 95% interval: the exact distribution-free (binomial order-statistic) interval "
         "for the median, with its actual coverage; below 6 seeds none reaches 95%, so it is "
         "[min, max] with coverage 1 - 2 * 0.5^n (93.8% at 5 seeds)."),
        (f"- {difference_column}: this row's median minus the baseline's, in pp (negative: lower "
         "error); [95%]: percentile bootstrap over seeds, 10,000 resamples, RNG seed "
         f"{RNG_SEED} (too narrow with few seeds)."),
        ("- p: two-sided permutation test on ranks (exact Wilcoxon-Mann-Whitney: every relabelling "
         f"of the seeds up to {MAX_EXACT:,}, else {DRAWS:,} random ones, RNG seed {RNG_SEED}): "
         "distribution-free and exact where a t-test assumes normal errors; on ranks so that a "
         "diverged seed (inf) counts, as the worst."),
        (f"- verdict: better / worse when p < {ALPHA}, else no difference shown at n seeds (n: the "
         "smaller row's); few seeds cannot reach p < 0.05 at all (3 vs 3: p >= 0.10), and the "
         "verdict then says how low p could go."),
    ]
