"""The edge of the discrepancy tolerance region: a hinge fit of final reward on log mean δ, per rank.

arXiv 2606.08779 (notes: shared/research/papers.md §3) describes a tolerance region: below some train–inference
discrepancy, training is unaffected; beyond it, the final reward falls. We measure where, per LoRA rank, with the
simplest model that has an edge (our choice, not the paper's):

    y = a − b · max(0, x − e),   x = log10(mean δ) of a run,  y = its final reward,  b ≥ 0,

fitted by least squares: for each candidate edge e on a grid over the observed x, (a, b) solve a linear least-
squares problem (b clipped at 0, then a refitted), and ê minimises the residual sum of squares. The edge is
identified only if the runs reach past it; `fit_hinge` reports whether the best e sits at the grid's end.

Uncertainty, with the seed as the unit (as in theory/stats.py): the jackknife over seeds (drop every run of one
seed, refit) gives one pseudo-value per seed, and a Student-t interval on them; none below theory.stats.MIN_SEEDS.
The difference between two ranks' edges pairs the seeds by their index (same seed = same data order and
sampling), so its interval comes from the per-seed differences of pseudo-values. The issue asked for a seed
bootstrap; with 6 seeds a percentile bootstrap under-covers (our measurement for γ: 68–78 % at 3 seeds,
theory/rank_scaling.md §8), so we use the same jackknife-t the γ analysis uses, whose coverage was measured.

Notation:
    x: (N,) log10 mean δ per run; y: (N,) final reward per run; seeds: (N,) seed of each run
    e: edge (in log10 δ); a: plateau reward; b ≥ 0: slope of the fall beyond the edge
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from theory.stats import LEVEL, MIN_SEEDS, SeedInterval, t_interval


class Hinge(NamedTuple):
    edge: float
    plateau: float
    slope: float
    sse: float
    at_grid_end: bool
    """True when the best edge is the largest or smallest candidate: the data do not bracket an edge."""


def _design(x: np.ndarray, e: float) -> np.ndarray:
    # (N, 2): y ≈ a·1 + b·(−max(0, x − e))
    return np.stack([np.ones_like(x), -np.maximum(0.0, x - e)], axis=1)


def fit_hinge(x: Any, y: Any, grid: int = 200) -> Hinge:
    """Least-squares hinge y = a − b·max(0, x − e), b ≥ 0, with e on `grid` points spanning the observed x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"fit_hinge needs equal 1-d x and y with >= 3 points, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fit_hinge: x and y must be finite (a run without delta or reward is a failed run)")
    candidates = np.linspace(x.min(), x.max(), grid)
    best: Hinge | None = None
    for k, e in enumerate(candidates):
        coef, *_ = np.linalg.lstsq(_design(x, e), y, rcond=None)
        a, b = coef
        if b < 0:  # a rise beyond the edge is not a tolerance edge: flat fit
            a, b = y.mean(), 0.0
        sse = float(((y - (a - b * np.maximum(0.0, x - e))) ** 2).sum())
        if best is None or sse < best.sse - 1e-15:
            best = Hinge(float(e), float(a), float(b), sse, k in (0, grid - 1))
    return best


def edge_pseudovalues(x: Any, y: Any, seeds: Any) -> tuple[float, dict[Any, float]]:
    """ê on all runs and the jackknife pseudo-value n·ê − (n − 1)·ê_(−s) of every seed s (Quenouille–Tukey)."""
    x, y, seeds = np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(seeds)
    full = fit_hinge(x, y).edge
    labels = sorted(set(seeds.tolist()))
    n = len(labels)
    out = {}
    for s in labels:
        keep = seeds != s
        out[s] = n * full - (n - 1) * fit_hinge(x[keep], y[keep]).edge
    return full, out


def edge_interval(x: Any, y: Any, seeds: Any, level: float = LEVEL) -> SeedInterval:
    """The edge with its seed-unit jackknife-t interval (none below MIN_SEEDS seeds)."""
    full, pseudo = edge_pseudovalues(x, y, seeds)
    iv = t_interval(list(pseudo.values()), level=level, min_seeds=MIN_SEEDS)
    return iv._replace(estimate=full) if not iv.has_interval else iv


def edge_difference(a: tuple[Any, Any, Any], b: tuple[Any, Any, Any], level: float = LEVEL) -> SeedInterval:
    """Edge(b) − edge(a) for two groups (x, y, seeds) of runs with the same seeds, paired by seed."""
    fa, pa = edge_pseudovalues(*a)
    fb, pb = edge_pseudovalues(*b)
    common = sorted(set(pa) & set(pb))
    if len(common) != len(pa) or len(common) != len(pb):
        raise ValueError(
            f"edge_difference pairs seeds: the two groups have seeds {sorted(pa)} and {sorted(pb)}"
        )
    iv = t_interval([pb[s] - pa[s] for s in common], level=level, min_seeds=MIN_SEEDS)
    return iv._replace(estimate=fb - fa) if not iv.has_interval else iv


# ------------------------------------------------------------------------------------------- sweep tables
def discrepancy_points(cube: Any, last_steps: int = 3) -> pd.DataFrame:
    """One row per run of a discrepancy sweep: its axes, run_id, `reward` (mean of the last `last_steps` steps),
    `delta_mean` (the run's mean over all steps of `mismatch_delta_mean`, the per-token |π_train − π_rollout| at
    the sampled tokens), `log10_delta`, `kl_ref_policy_mean` (last steps, KL(π_base‖π_θ) per token on the probe
    rows), `acc_after` / `acc_after_engine` (held-out greedy accuracy under the trainer and under the engine)."""
    from arca_lab.analysis.tables import _last, _points, point_row, sweep_axes

    rows = []
    axes = sweep_axes(cube)
    for p in _points(cube):
        row = point_row(p, axes)
        last = _last(p, last_steps)
        row["reward"] = float(last["reward"].mean())
        delta = p["mismatch_delta_mean"].values if "mismatch_delta_mean" in p else np.full(1, 0.0)
        row["delta_mean"] = float(np.nanmean(delta))
        row["log10_delta"] = math.log10(row["delta_mean"]) if row["delta_mean"] > 0 else -math.inf
        row["kl_ref_policy_mean"] = (
            float(last["kl_ref_policy_mean"].mean()) if "kl_ref_policy_mean" in p else math.nan
        )
        for name in ("acc_after", "acc_after_engine"):
            var = "greedy_accuracy_after" + name.removeprefix("acc_after")
            row[name] = float(p[var]) if var in p else math.nan
        for field in ("rollout_engine", "rollout_noise", "correction", "seed", "rank"):
            if field not in row and field in p.coords:
                row[field] = p.coords[field].item()
        rows.append(row)
    return pd.DataFrame(rows)


def edges_table(points: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Per rank, over the uncorrected runs (`correction` none) with a finite delta: the hinge edge (log10 δ, fitted
    to all runs) with its seed-unit interval (jackknife-t, centred on `edge_jackknife`; an argmin over a grid is not
    smooth in the data, so one seed can move the jackknife far when the degradation rests on one grid level),
    plateau reward, slope, whether the edge is bracketed, the rank's mean KL to the base
    (so that rank and KL scale are not confused), and the number of runs and seeds."""
    out = []
    base = points[(points["correction"] == "none") & np.isfinite(points["log10_delta"])]
    for rank, g in base.groupby("rank"):
        hinge = fit_hinge(g["log10_delta"], g["reward"])
        iv = edge_interval(g["log10_delta"], g["reward"], g["seed"], level=level)
        out.append(
            dict(
                rank=rank,
                edge=hinge.edge,  # the pre-registered edge: the hinge fitted to all of the rank's runs
                edge_jackknife=iv.estimate,  # bias-corrected mean of the pseudo-values, the interval's centre
                lo=iv.lo,
                hi=iv.hi,
                note=iv.reason,
                plateau=hinge.plateau,
                slope=hinge.slope,
                bracketed=not hinge.at_grid_end,
                kl_ref_policy_mean=float(g["kl_ref_policy_mean"].mean()),
                runs=len(g),
                seeds=g["seed"].nunique(),
            )
        )
    return pd.DataFrame(out)


def hypothesis(points: pd.DataFrame, low: int, high: int, level: float = LEVEL) -> tuple[SeedInterval, str]:
    """The pre-registered test: edge(rank `low`) − edge(rank `high`) with its paired seed-unit interval, and the
    verdict: "supported" (interval above 0: the low rank tolerates more), "contradicted" (below 0), or
    "inconclusive" (contains 0, or no interval)."""
    base = points[(points["correction"] == "none") & np.isfinite(points["log10_delta"])]

    def group(rank: int) -> tuple[Any, Any, Any]:
        g = base[base["rank"] == rank]
        return g["log10_delta"].to_numpy(), g["reward"].to_numpy(), g["seed"].to_numpy()

    d = edge_difference(group(high), group(low), level=level)
    if not d.has_interval:
        return d, "inconclusive"
    return d, "supported" if d.lo > 0 else "contradicted" if d.hi < 0 else "inconclusive"
