"""theory/stats.py: the Student-t interval, jackknife pseudo-values, the effective number of tests.

Coverage of the γ interval is tested in tests/test_theory_rank_scaling.py (synthetic) and measured on the
bandit by benchmarks/gamma_coverage.py (theory/rank_scaling.md §8).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sst

from theory import stats


def test_t_interval_by_hand():
    # values 1, 2, 3: mean 2, s = 1, t_{2, 0.975} = 4.302653, half-width 4.302653/√3 = 2.484138
    f = stats.t_interval([1.0, 2.0, 3.0])
    assert f.estimate == 2.0 and f.n_seeds == 3 and f.reason == ""
    assert f.half_width == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    assert (f.lo, f.hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), rel=1e-6)
    assert stats.t_interval([1.0, 2.0, 3.0], level=0.5).half_width == pytest.approx(
        sst.t.ppf(0.75, 2) / np.sqrt(3)
    )


def test_no_interval_below_min_seeds_and_none_for_nan():
    for values, reason in (([1.0], "one seed"), ([1.0, 2.0], "2 seeds")):
        f = stats.t_interval(values)
        assert np.isfinite(f.estimate) and not f.has_interval and np.isnan(f.half_width)
        assert f.reason.startswith(reason) and "no confidence interval" in f.reason
    assert not stats.t_interval([1.0, np.nan, 3.0, 4.0]).has_interval
    assert np.isnan(stats.t_interval([1.0, np.nan, 3.0, 4.0]).estimate)
    assert stats.MIN_SEEDS == 3 and stats.t_interval([1.0, 2.0, 4.0]).has_interval
    with pytest.raises(ValueError, match="level"):
        stats.t_interval([1.0, 2.0, 3.0], level=0.0)


def test_pseudovalues_match_the_leave_one_out_definition():
    rng = np.random.default_rng(0)
    ranks = np.array([1, 2, 4, 8])
    y = 1e-3 * ranks**0.8 * rng.lognormal(0, 0.5, size=(6, 4))
    n = y.shape[0]
    full = stats.log_mean_slope(ranks, y)
    by_hand = [n * full - (n - 1) * stats.log_mean_slope(ranks, np.delete(y, i, axis=0)) for i in range(n)]
    np.testing.assert_allclose(stats.gamma_pseudovalues(ranks, y), by_hand, rtol=1e-12)
    # the log-mean slope by hand: polyfit of log(mean) on log r
    assert full == pytest.approx(np.polyfit(np.log(ranks), np.log(y.mean(axis=0)), 1)[0], rel=1e-12)
    f = stats.gamma_interval(ranks, y)
    assert f.estimate == pytest.approx(np.mean(by_hand)) and f.has_interval
    # a seed's own slope estimates E[log KL]'s slope: the mean of per-seed slopes is the slope of the mean log
    assert stats.seed_slopes(ranks, y).mean() == pytest.approx(
        np.polyfit(np.log(ranks), np.log(y).mean(axis=0), 1)[0], rel=1e-12
    )


def test_gamma_interval_refuses_bad_data_without_raising():
    ranks = [1, 2, 4]
    y = np.ones((4, 3))
    y[0, 0] = 0.0
    assert (
        np.isnan(stats.gamma_interval(ranks, y).estimate)
        and "KL <= 0" in stats.gamma_interval(ranks, y).reason
    )
    y[0, 0] = np.inf
    assert "non-finite" in stats.gamma_interval(ranks, y).reason
    with pytest.raises(ValueError, match="shape"):
        stats.gamma_interval(ranks, np.ones((4, 2)))
    with pytest.raises(ValueError, match="jackknife"):
        stats.gamma_pseudovalues(ranks, np.ones((1, 3)))


def test_effective_number_counts_independent_groups():
    # k groups of identical rows with mutually orthogonal group vectors: exactly k (rank_scaling.md §7)
    c = np.random.default_rng(1).normal(size=(3, 40))
    c -= c.mean(axis=1, keepdims=True)
    basis = np.linalg.qr(c.T)[0].T  # 3 orthonormal vectors in the span of centred ones: correlation exactly 0
    rows = np.repeat(basis, 6, axis=0)  # 18 rows, 3 groups of 6
    assert stats.effective_number(rows) == pytest.approx(3.0, rel=1e-12)
    assert stats.distinct_patterns(rows) == 3
    assert stats.effective_number(np.tile(basis[:1], (5, 1))) == pytest.approx(1.0)
    # unequal groups (12 + 6): M²/Σm² = 324/180 = 1.8
    assert stats.effective_number(np.vstack([np.repeat(basis[:1], 12, 0), np.repeat(basis[1:2], 6, 0)])) == (
        pytest.approx(1.8, rel=1e-12)
    )
    # independent noise rows: close to M (sampling correlations ~ 1/√n lower it a little)
    noise = np.random.default_rng(2).normal(size=(5, 400))
    assert 4.5 < stats.effective_number(noise) <= 5.0 and stats.distinct_patterns(noise) == 5
    with pytest.raises(ValueError, match="finite"):
        stats.effective_number(np.array([[1.0, np.nan], [1.0, 2.0]]))
