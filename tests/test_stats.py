"""Paired statistics: mean difference, seeded bootstrap interval, Wilcoxon p-value."""

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from landscape.errors import UsageError
from landscape.guided.stats import PairedResult, paired_comparison


def test_a_constant_shift_gives_the_shift_and_a_zero_width_interval():
    baseline = [0.71, 0.64, 0.80, 0.55, 0.69]
    values = [b + 0.1 for b in baseline]
    r = paired_comparison(values, baseline)
    shift = values[0] - baseline[0]  # 0.1 up to rounding in values - baseline
    assert r.diff == pytest.approx(0.1)
    assert r.ci_low == r.ci_high == r.diff == shift
    assert r.n == 5
    assert r.p_value == pytest.approx(wilcoxon(values, baseline).pvalue)  # exact test: 2 / 2^5
    assert r.p_value == pytest.approx(0.0625)


def test_symmetric_noise_gives_an_interval_containing_zero():
    d = np.array([0.3, -0.3, 0.1, -0.1, 0.2, -0.2, 0.05, -0.05])
    baseline = np.linspace(0.5, 0.8, d.size)
    r = paired_comparison(baseline + d, baseline, seed=0)
    assert r.diff == pytest.approx(0.0, abs=1e-12)
    assert r.ci_low < 0 < r.ci_high
    assert r.p_value > 0.5


def test_a_clear_improvement_has_an_interval_above_zero():
    rng = np.random.default_rng(1)
    baseline = rng.uniform(0.5, 0.8, 12)
    values = baseline + 0.05 + rng.normal(0, 0.01, 12)
    r = paired_comparison(values, baseline, seed=3)
    assert 0 < r.ci_low < r.diff < r.ci_high
    assert r.diff == pytest.approx(float(np.mean(values - baseline)))
    assert r.p_value == pytest.approx(wilcoxon(values, baseline).pvalue) and r.p_value < 0.01


def test_the_bootstrap_is_reproducible_with_a_seed_and_moves_with_it():
    rng = np.random.default_rng(0)
    baseline, values = rng.uniform(size=10), rng.uniform(size=10)
    a = paired_comparison(values, baseline, seed=5)
    assert a == paired_comparison(values, baseline, seed=5)
    assert (a.ci_low, a.ci_high) != paired_comparison(values, baseline, seed=6)[1:3]
    narrow = paired_comparison(values, baseline, seed=5, confidence=0.5)
    assert a.ci_low < narrow.ci_low < narrow.ci_high < a.ci_high


def test_p_value_matches_scipy_with_ties_and_zero_differences():
    baseline = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3])
    values = baseline + np.array([0.1, 0.0, -0.05, 0.1, 0.2, 0.0, 0.15])
    r = paired_comparison(values, baseline)
    assert r.p_value == pytest.approx(wilcoxon(values, baseline).pvalue)
    assert r.n == 7


def test_degenerate_inputs_are_decided_not_left_to_scipy():
    same = paired_comparison([0.7, 0.6, 0.8], [0.7, 0.6, 0.8])  # every difference 0
    assert same == PairedResult(0.0, 0.0, 0.0, 1.0, 3)
    one = paired_comparison([0.9], [0.7])  # one pair: a difference, nothing to test
    assert one.diff == pytest.approx(0.2) and one.n == 1
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high) and math.isnan(one.p_value)
    none = paired_comparison([], [])
    assert none.n == 0 and all(math.isnan(v) for v in none[:4])
    # an undefined metric (NaN) drops its pair
    dropped = paired_comparison([0.9, float("nan"), 0.8, 0.75], [0.7, 0.6, 0.65, 0.7])
    assert dropped.n == 3 and dropped.diff == pytest.approx((0.2 + 0.15 + 0.05) / 3)


def test_bad_arguments_are_refused():
    for kwargs in ({"confidence": 1.0}, {"confidence": 0.0}, {"resamples": 0}, {"resamples": 2.5}):
        with pytest.raises(UsageError):
            paired_comparison([1.0, 2.0], [0.0, 1.0], **kwargs)
    with pytest.raises(UsageError):
        paired_comparison([1.0, 2.0, 3.0], [0.0, 1.0])


def test_smallest_p_is_the_exact_wilcoxon_floor_and_six_pairs_are_the_fewest_for_005():
    from landscape.guided.stats import fewest_pairs, smallest_p

    for n in range(2, 10):  # all differences of one sign: scipy's exact p is the floor
        assert smallest_p(n) == pytest.approx(wilcoxon(np.arange(1, n + 1) * 0.01).pvalue)
    assert smallest_p(5) == pytest.approx(0.0625) and smallest_p(6) == pytest.approx(0.03125)
    assert math.isnan(smallest_p(1)) and fewest_pairs(0.05) == 6 and fewest_pairs(0.01) == 8


def test_the_summary_says_whether_each_cell_could_reach_significance():
    from landscape.cli import build_parser
    from landscape.guided import sweep

    rows = [{"regularizer": r, "fraction": f, "seed": s, "n_train": 10, "accuracy": 0.5 + 0.01 * s + (r == "guided")}
            for f, n in ((1.0, 6), (0.5, 3)) for s in range(n) for r in ("dropout", "guided")]
    summary = sweep.summarize_runs(rows, ["accuracy"])
    cell = {(r["regularizer"], r["fraction"]): r for r in summary}
    assert cell[("guided", 1.0)]["min_p"] == pytest.approx(1 / 32) and cell[("guided", 0.5)]["min_p"] == 0.25
    assert cell[("guided", 1.0)]["significant"] is True and cell[("dropout", 1.0)]["min_p"] is None
    table = sweep.format_summary(summary, "accuracy")
    assert "6 pairs: smallest p 0.0312, can reach p < 0.05" in table
    assert "3 pairs: smallest p 0.25, cannot reach p < 0.05" in table and "at least 6 restarts" in table
    args = build_parser().parse_args(["finetune", "--out", "x.csv"])
    assert args.restarts == 6
