"""Hinge fit of the tolerance edge (arca_lab.analysis.tolerance) on synthetic runs with a known edge."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arca_lab.analysis.tolerance import edge_difference, edge_interval, fit_hinge


def _runs(edge: float, seeds: int = 6, noise: float = 0.02, seed: int = 0):
    """Runs at 8 discrepancy levels x in [-4, 0] per seed; reward 0.5 on the plateau, falling 0.2 per decade."""
    rng = np.random.default_rng(seed)
    x = np.tile(np.linspace(-4, 0, 8), seeds)
    s = np.repeat(np.arange(seeds), 8)
    y = 0.5 - 0.2 * np.maximum(0.0, x - edge) + noise * rng.standard_normal(x.size)
    return x, y, s


def test_hinge_recovers_a_known_edge_by_hand():
    # noise-free: y = 0.5 on x <= -2, then 0.5 - 0.2 (x + 2); the fit must return a = 0.5, b = 0.2, e = -2
    x = np.linspace(-4, 0, 9)
    y = 0.5 - 0.2 * np.maximum(0.0, x + 2)
    h = fit_hinge(x, y, grid=401)
    assert h.edge == pytest.approx(-2.0, abs=0.011) and h.plateau == pytest.approx(0.5, abs=1e-6)
    assert h.slope == pytest.approx(0.2, abs=1e-3) and not h.at_grid_end


def test_flat_rewards_have_no_edge_inside_the_data():
    x = np.linspace(-4, 0, 9)
    assert fit_hinge(x, np.full(9, 0.3)).slope == pytest.approx(0.0, abs=1e-12)


def test_edge_interval_covers_the_truth_and_not_a_shifted_one():
    x, y, s = _runs(edge=-2.0)
    iv = edge_interval(x, y, s)
    assert iv.has_interval and iv.n_seeds == 6
    assert iv.lo < -2.0 < iv.hi and iv.hi - iv.lo < 0.6
    assert not (iv.lo < -1.0 < iv.hi)  # a prediction shifted by one decade is rejected


def test_edge_difference_pairs_seeds():
    a, b = _runs(edge=-2.0, seed=1), _runs(edge=-1.0, seed=2)
    d = edge_difference(a, b)
    assert d.lo < 1.0 < d.hi and d.lo > 0  # b's edge is one decade later, and the interval excludes 0
    with pytest.raises(ValueError, match="pairs seeds"):
        edge_difference(a, _runs(edge=-1.0, seeds=5))


def test_too_few_seeds_give_no_interval():
    x, y, s = _runs(edge=-2.0, seeds=2)
    iv = edge_interval(x, y, s)
    assert not iv.has_interval and math.isfinite(iv.estimate) and "2 seeds" in iv.reason


def test_bad_input():
    with pytest.raises(ValueError, match="finite"):
        fit_hinge([0.0, 1.0, math.nan], [1.0, 2.0, 3.0])


def test_edges_table_and_hypothesis_on_synthetic_discrepancy_points():
    """Two ranks with known edges (rank 1 tolerates one decade more): the pre-registered test says supported;
    swapped edges say contradicted; equal edges inconclusive."""
    import pandas as pd

    from arca_lab.analysis.tolerance import edges_table, hypothesis

    def points(edge1: float, edge16: float) -> pd.DataFrame:
        rows = []
        for rank, edge in ((1, edge1), (16, edge16)):
            x, y, s = _runs(edge=edge, seed=rank)
            rows += [
                dict(
                    rank=rank,
                    seed=int(si),
                    correction="none",
                    log10_delta=xi,
                    reward=yi,
                    kl_ref_policy_mean=0.1,
                )
                for xi, yi, si in zip(x, y, s, strict=True)
            ]
        return pd.DataFrame(rows)

    table = edges_table(points(-1.5, -2.5))
    assert list(table["rank"]) == [1, 16] and table["bracketed"].all()
    assert table.loc[0, "lo"] < -1.5 < table.loc[0, "hi"]
    assert hypothesis(points(-1.5, -2.5), 1, 16)[1] == "supported"
    assert hypothesis(points(-2.5, -1.5), 1, 16)[1] == "contradicted"
    assert hypothesis(points(-2.0, -2.0), 1, 16)[1] == "inconclusive"
