"""Seed-level statistics for every rank-exponent (γ) analysis: the seed is the unit (numpy/scipy only).

Seeds are the independent replications of an experiment; the ranks of one seed are paired (shared A₀ rows,
contexts and sampling). So every interval here is built from one number per seed and a Student-t quantile
with n − 1 degrees of freedom, never from resampling (seed, rank) points, and below MIN_SEEDS seeds no
interval is given at all (NaN bounds and a reason), never a narrow one.

The γ estimator (theory/rank_scaling.md §8): γ̂ = least-squares slope of log(mean over seeds of KL) on log r,
because the theory predicts E[KL]. Its per-seed statistics are the jackknife pseudo-values
p_i = n·γ̂ − (n − 1)·γ̂_(−i) (Quenouille 1956, Biometrika 43:353; Tukey 1958, Ann. Math. Statist. 29:614;
review: Miller 1974, Biometrika 61:1), treated as n iid values: estimate p̄ (bias-corrected γ̂), interval
p̄ ± t_{n−1, (1+level)/2} · s_p/√n. A seed's own fitted slope (`seed_slopes`) is not used for γ: it estimates
the slope of E[log KL], which differs from γ by the r-dependent Jensen gap (§8; measured +0.25 for SGD and
Adam and +2.4 for clipped SGD on the V = 2 grid, benchmarks/gamma_coverage.py). Coverage of the interval
is measured, not assumed: benchmarks/gamma_coverage.py, table in theory/rank_scaling.md §8.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy import stats as sst

MIN_SEEDS = 3  # below this no interval: 2 seeds give a t_1 interval whose width rests on one difference
LEVEL = 0.95


class SeedInterval(NamedTuple):
    """An estimate with its seed-level Student-t interval; lo = hi = NaN and `reason` says why if none."""

    estimate: float
    lo: float
    hi: float
    n_seeds: int
    reason: str = ""

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    @property
    def has_interval(self) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi))


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _no_interval_reason(n: int, min_seeds: int) -> str:
    if n == 1:
        return "one seed: no confidence interval"
    return f"{n} seeds: no confidence interval (needs >= {min_seeds})"


def t_interval(values: Any, level: float = LEVEL, min_seeds: int = MIN_SEEDS) -> SeedInterval:
    """Mean of iid per-seed values ± t_{n−1, (1+level)/2}·s/√n (Student 1908); no interval below min_seeds."""
    _check_level(level)
    v = np.asarray(values, dtype=float).ravel()
    n = v.size
    if n == 0 or not np.all(np.isfinite(v)):
        return SeedInterval(np.nan, np.nan, np.nan, n, "non-finite or no per-seed values: no estimate")
    mean = float(v.mean())
    if n < max(min_seeds, 2):
        return SeedInterval(mean, np.nan, np.nan, n, _no_interval_reason(n, max(min_seeds, 2)))
    half = float(sst.t.ppf((1 + level) / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
    return SeedInterval(mean, mean - half, mean + half, n)


def loglog_slopes(x: Any, y: Any) -> np.ndarray:
    """Least-squares slopes of log y on log x over the last axis (y (..., m), x (m,))."""
    logx = np.log(np.asarray(x, dtype=float))
    xc = logx - logx.mean()
    logy = np.log(np.asarray(y, dtype=float))
    return np.sum((logy - logy.mean(axis=-1, keepdims=True)) * xc, axis=-1) / np.sum(xc * xc)


def log_mean_slope(x: Any, y: Any) -> float:
    """γ̂: slope of log(mean over seeds (axis 0) of y) on log x (theory/rank_scaling.md §8)."""
    return float(loglog_slopes(x, np.asarray(y, dtype=float).mean(axis=0)))


def seed_slopes(x: Any, y: Any) -> np.ndarray:
    """Each seed's own fitted slope (row of y): an estimator of the slope of E[log y], not of log E[y]."""
    return loglog_slopes(x, y)


def _check_fit_input(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(x, dtype=float)
    v = np.asarray(y, dtype=float)
    if v.ndim != 2 or r.ndim != 1 or v.shape[1] != r.size or r.size < 2 or v.shape[0] < 1:
        raise ValueError(
            f"kl must have shape (n_seeds >= 1, n_ranks={r.size}) with >= 2 ranks, got {v.shape}"
        )
    if np.any(r <= 0) or not np.all(np.isfinite(r)):
        raise ValueError("ranks must be finite and > 0 for a log-log fit")
    return r, v


def gamma_pseudovalues(ranks: Any, kl: Any) -> np.ndarray:
    """Jackknife pseudo-values p_i = n·γ̂ − (n − 1)·γ̂_(−i) of γ̂, one per seed (Quenouille 1956; Tukey 1958).

    γ̂_(−i) is the fit without seed i. Needs >= 2 seeds with finite KL > 0."""
    r, y = _check_fit_input(ranks, kl)
    if y.shape[0] < 2 or not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("the jackknife needs >= 2 seeds and finite KL > 0")
    n = y.shape[0]
    loo_means = (y.sum(axis=0) - y) / (n - 1)  # row i: mean over the other seeds
    return n * log_mean_slope(r, y) - (n - 1) * loglog_slopes(r, loo_means)


def gamma_interval(ranks: Any, kl: Any, level: float = LEVEL, min_seeds: int = MIN_SEEDS) -> SeedInterval:
    """γ̂ with a seed-unit interval: kl (n_seeds, n_ranks), one row per seed, ranks paired within a seed.

    n ≥ min_seeds: jackknife pseudo-values + Student-t (module docstring); estimate = p̄ (bias-corrected).
    Fewer seeds: estimate = plain γ̂, lo = hi = NaN and a reason. A NaN, infinite or non-positive KL gives no
    estimate at all (NaN, with the reason): a failed measurement must never pass as a fit.
    """
    _check_level(level)
    r, y = _check_fit_input(ranks, kl)
    n = y.shape[0]
    if not np.all(np.isfinite(y)):
        return SeedInterval(np.nan, np.nan, np.nan, n, "non-finite KL: no fit")
    if np.any(y <= 0):
        return SeedInterval(np.nan, np.nan, np.nan, n, "KL <= 0: no log-log fit")
    if n < max(min_seeds, 2):
        return SeedInterval(
            log_mean_slope(r, y), np.nan, np.nan, n, _no_interval_reason(n, max(min_seeds, 2))
        )
    return t_interval(gamma_pseudovalues(r, y), level, min_seeds)


def effective_number(residuals: Any) -> float:
    """Effective number of independent tests among M correlated ones: M² / ‖C‖_F² (C: M×M correlation).

    `residuals` (M, n): one row per test, e.g. its per-seed jackknife pseudo-values. With λ the eigenvalues of
    C, Σλ = tr C = M and Σλ² = ‖C‖_F², so this is the participation ratio (Σλ)²/Σλ² (Bretherton et al. 1999,
    J. Climate 12:1990); derivation in theory/rank_scaling.md §7: k independent equal-size groups of perfectly
    correlated tests give exactly k.
    A row without variance counts as its own independent test.
    """
    z = np.asarray(residuals, dtype=float)
    if z.ndim != 2 or z.shape[1] < 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"residuals must be a finite (M, n >= 2) array, got shape {z.shape}")
    z = z - z.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(z, axis=1)
    flat = norms <= 1e-12 * max(float(norms.max()), 1e-300)
    z = np.where(flat[:, None], 0.0, z / np.where(flat, 1.0, norms)[:, None])
    corr = z @ z.T
    corr[np.diag_indices_from(corr)] = 1.0  # a flat row: correlation 1 with itself, 0 with the others
    return float(z.shape[0] ** 2 / np.sum(corr * corr))


def distinct_patterns(residuals: Any, threshold: float = 0.99) -> int:
    """Number of groups of rows whose residual vectors correlate above `threshold` (single linkage)."""
    z = np.asarray(residuals, dtype=float)
    z = z - z.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(z, axis=1)
    z = z / np.where(norms > 0, norms, 1.0)[:, None]
    corr = z @ z.T
    group = list(range(len(z)))
    for i in range(len(z)):
        for j in range(i):
            if corr[i, j] > threshold:
                gi, gj = group[i], group[j]
                group = [gj if g == gi else g for g in group]
    return len(set(group))
