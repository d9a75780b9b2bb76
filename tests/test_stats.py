"""Is one row really better than another: src/idmap/analysis/stats.py on constructed seed errors.

Every error in this file is made up (fixed random seeds or written out), not a result.
"""

import math
import statistics

import numpy as np
import pytest

from idmap.analysis import stats
from test_report import TABLE2_ORIGINAL_110, fake_run, md_row, report, table1

FULL_PREACT_110 = {**TABLE2_ORIGINAL_110, "block": "full_preact"}
BN_AFTER_ADD_110 = {**TABLE2_ORIGINAL_110, "block": "bn_after_add"}


def test_a_clearly_better_row_is_better_and_the_baseline_worse():
    rng = np.random.default_rng(0)
    low, high = rng.normal(6.0, 0.1, 5).tolist(), rng.normal(7.0, 0.1, 5).tolist()
    better = stats.compare(low, high)
    assert better.verdict == "better" and better.sign == -1
    assert better.p == pytest.approx(2 / 252)  # the two extreme of C(10, 5) relabellings
    assert better.diff == pytest.approx(statistics.median(low) - statistics.median(high))
    lo, hi = better.interval
    assert lo <= better.diff <= hi < 0
    assert stats.compare(high, low).verdict == "worse"


def test_rows_from_one_distribution_mostly_show_no_difference():
    rng = np.random.default_rng(1)
    verdicts = [stats.compare(rng.normal(6.6, 0.2, 5).tolist(), rng.normal(6.6, 0.2, 5).tolist())
                .verdict for _ in range(200)]
    same = sum(v == "no difference shown at 5 seeds" for v in verdicts)
    assert same >= 0.9 * len(verdicts)  # nominally 95%; exact test at 5 vs 5 is a bit stricter


def test_two_seeds_each_can_never_show_a_difference():
    c = stats.compare([6.0, 6.1], [9.0, 9.1])  # perfectly separated, yet p >= 2 / C(4, 2)
    assert c.p == pytest.approx(1 / 3) and c.min_p == pytest.approx(1 / 3)
    assert c.verdict == "no difference shown at 2 seeds (p cannot go below 0.33)"
    assert stats.compare([6.0, 6.1], [math.inf] * 3).min_p == pytest.approx(1 / 10)  # tied: one end
    assert stats.min_p_value(3, 3) == pytest.approx(0.1)  # 3 vs 3 cannot either
    assert stats.min_p_value(4, 4) < 0.05


def test_diverged_seeds_are_the_worst_rank():
    assert stats.ranks([1.0, math.inf, math.inf, 0.0]).tolist() == [2.0, 3.5, 3.5, 1.0]
    finite, diverged = [6.0, 6.1, 6.2, 6.3, 6.4], [math.inf] * 5
    c = stats.compare(finite, diverged)
    assert c.verdict == "better" and c.diff == -math.inf
    assert stats.compare(diverged, diverged).diff == 0  # two failed medians tie
    assert stats.compare(diverged, diverged).p == 1.0


def test_permutation_test_is_exact_for_small_and_monte_carlo_for_large_rows():
    assert stats.permutation_test([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
    assert stats.permutation_test([1, 3, 5], [2, 4, 6]) == pytest.approx(0.7)  # rank sums 9 vs 12
    rng = np.random.default_rng(2)
    a, b = rng.normal(6.0, 0.2, 11).tolist(), rng.normal(6.5, 0.2, 11).tolist()  # C(22, 11) > 20000
    p = stats.permutation_test(a, b)
    assert p == stats.permutation_test(a, b)  # fixed RNG seed: the same report twice
    assert 0 < p < 0.01


def test_bootstrap_interval_is_reproducible():
    a, b = [6.2, 6.4, 6.3, 6.6, 6.5], [6.6, 6.7, 6.5, 6.9, 6.8]
    assert stats.bootstrap_difference(a, b) == stats.bootstrap_difference(a, b)
    lo, hi = stats.bootstrap_difference(a, b)
    assert lo <= stats.median_difference(a, b) <= hi


@pytest.mark.parametrize("n, k, coverage", [
    (5, 1, 1 - 2 / 32),        # below 6 seeds: [min, max], 93.8%
    (6, 1, 1 - 2 / 64),        # the first n where [min, max] reaches 95%
    (9, 2, 1 - 2 * 10 / 512),  # [x_(2), x_(8)]
    (20, 6, 1 - 2 * sum(math.comb(20, i) for i in range(6)) / 2**20),
])
def test_median_interval_is_the_narrowest_order_statistic_interval_reaching_95(n, k, coverage):
    x = list(range(n, 0, -1))  # unsorted on purpose
    lo, hi, cov = stats.median_interval(x)
    assert (lo, hi) == (k, n + 1 - k)
    assert cov == pytest.approx(coverage)
    assert cov >= 0.95 or k == 1


def test_median_interval_needs_two_seeds_and_allows_diverged_ones():
    assert stats.median_interval([6.5]) is None
    assert stats.median_interval([6.5, math.inf, 6.7, 6.6, 6.4])[:2] == (6.4, math.inf)


@pytest.mark.parametrize("n", [5, 7, 10])
def test_median_interval_covers_the_true_median_at_its_stated_rate(n):
    rng = np.random.default_rng(n)
    samples = rng.normal(6.6, 0.2, (2000, n))
    hits = [lo <= 6.6 <= hi for lo, hi, _ in map(stats.median_interval, samples.tolist())]
    stated = stats.median_interval(samples[0].tolist())[2]
    assert np.mean(hits) == pytest.approx(stated, abs=0.02)


def test_seeds_needed_grows_as_the_difference_shrinks():
    base = [6.4, 6.6, 6.8, 6.5, 6.7]
    near = stats.seeds_needed([x - 0.1 for x in base], base)
    far = stats.seeds_needed([x - 0.3 for x in base], base)
    assert far < near
    # 2 (1.96 + 0.84)^2 sd^2 / d^2 / (3/pi), sd 0.158, d 0.1: about 41
    assert near == math.ceil(2 * (1.959964 + 0.841621) ** 2 * 0.025 / 0.01 / (3 / math.pi))
    assert stats.seeds_needed([x - 5 for x in base], base) == 4  # the rank test's floor


def test_seeds_needed_is_not_estimable_without_a_difference_or_a_spread():
    assert stats.seeds_needed([6.5, 6.7], [6.7, 6.5]) is None  # no difference
    assert stats.seeds_needed([6.5, 6.5], [6.7, 6.7]) is None  # no spread seen
    assert stats.seeds_needed([6.5], [6.7]) is None  # one seed each: no spread to see
    assert stats.seeds_needed([6.5, 6.7], [math.inf, math.inf]) == 4  # one row always diverges


def test_report_prints_the_verdict_and_whether_the_papers_ordering_holds(tmp_path, capsys):
    rows = [  # paper: full_preact 6.37 < original 6.61 < bn_after_add 8.17
        (TABLE2_ORIGINAL_110, [6.9, 7.0, 7.1, 7.05, 6.95]),
        (FULL_PREACT_110, [6.0, 6.1, 5.9, 6.05, 5.95]),      # clearly lower: agrees
        (BN_AFTER_ADD_110, [5.98, 6.02, 6.08, 5.92, 6.03]),  # as low as full pre-act: disagrees
    ]
    for choices, errors in rows:
        for seed, e in enumerate(errors, 1):
            fake_run(tmp_path, choices, e, seed=seed)
    code, out, _ = report(capsys, tmp_path, "--table", "table2", "--seeds-needed")
    assert code == 0
    assert "| Δ median vs original/<depth> [95%] | p | verdict |" in out
    assert md_row(out, "original/110")[11:] == ["[6.90, 7.10] 93.8%", "—", "—", "baseline"]
    full = md_row(out, "full_preact/110")
    assert full[12].startswith("-1.00 [") and full[13] == "0.008" and full[14] == "better"
    assert md_row(out, "bn_after_add/110")[14] == "better"
    assert ("Paper's ordering (CIFAR-10, paper, 64k iters): agrees on 1 of 3 pairs, "
            "disagrees on 1, undecided on 1.") in out
    assert "- disagrees: original/110 < bn_after_add/110 (paper 6.61 < 8.17;" in out
    assert "- undecided: full_preact/110 < bn_after_add/110" in out
    assert "seeds needed per row" in out and "normal approximation" in out
    assert "exact distribution-free" in out and "permutation test on ranks" in out


def test_report_verdict_with_diverged_seeds_and_too_few_seeds(tmp_path, capsys):
    for seed in (1, 2, 3, 4, 5):
        fake_run(tmp_path, table1("identity", "identity"), 6.5 + seed / 10, seed=seed)
        fake_run(tmp_path, table1("dropout_05", "dropout"), None, status="diverged", seed=seed)
    for seed in (1, 2):
        fake_run(tmp_path, table1("conv1x1", "conv1x1"), 12.0 + seed / 10, seed=seed)
    _, out, _ = report(capsys, tmp_path, "--table", "table1", "--seeds-needed")
    assert md_row(out, "dropout_05")[12:] == ["+inf [+inf, +inf]", "0.008", "worse"]
    assert md_row(out, "conv1x1")[14] == "no difference shown at 2 seeds (p cannot go below 0.095)"
    # paper: identity 6.61 < conv1x1 12.22 < dropout fail. 2 seeds vs 5 tied diverged ones: only
    # one relabelling of 21 is as extreme (p = 0.048), so that pair is decided, identity's is not.
    assert "agrees on 2 of 3 pairs, disagrees on 0, undecided on 1." in out
    (undecided,) = [l for l in out.splitlines() if l.startswith("- undecided:")]
    assert undecided.startswith("- undecided: identity < conv1x1 (paper 6.61 < 12.22;")
    assert undecided.endswith("seeds needed per row 4")  # a huge gap: the test's floor
