"""The analysis side: a sweep's (or a run's) measurements beside the theory's predictions.

Modules, imports one way (theory <- lab <- sweep <- analysis <- CLI):
    tables      one pandas DataFrame per question (run points, gamma fits, bounds, credit regimes, curves); the
                analysis notebook only plots what these compute (re-exported here: `analysis.run_points`, ...)
    verify      `arca-lab verify-bound`: KL bounds and lemma checks against trained adapters
    heldout_kl  exact per-token KL between an adapter and its base on held-out completions (for verify)
"""

from __future__ import annotations

from arca_lab.analysis.tables import (
    ARCA_TABLE3,
    DIRECTIONS,
    STEP_METRICS,
    accuracy_by_rank,
    beta_table,
    bounds_table,
    clip_regime,
    credit_regimes,
    curve_means,
    gamma_caption,
    gamma_table,
    hyperparameter_regime,
    kl_rank_panels,
    predicted_line,
    regime_split,
    regime_split_verdict,
    run_dirs_by_id,
    run_points,
    save_figure,
    series_axes,
    series_label,
    step_curves,
    sweep_axes,
    table3_reference,
    verdicts,
)

__all__ = [
    "ARCA_TABLE3",
    "DIRECTIONS",
    "STEP_METRICS",
    "accuracy_by_rank",
    "beta_table",
    "bounds_table",
    "clip_regime",
    "credit_regimes",
    "curve_means",
    "gamma_caption",
    "gamma_table",
    "hyperparameter_regime",
    "kl_rank_panels",
    "predicted_line",
    "regime_split",
    "regime_split_verdict",
    "run_dirs_by_id",
    "run_points",
    "save_figure",
    "series_axes",
    "series_label",
    "step_curves",
    "sweep_axes",
    "table3_reference",
    "verdicts",
]
