"""Figures of the discrepancy analysis (`notebooks/discrepancy_analysis.ipynb`), drawn from the DataFrames of
`arca_lab.analysis.tolerance` and following the legend convention of `arca_lab.analysis.figures`.

- `reward_vs_delta`: final reward and held-out greedy accuracy (under the trainer and under the rollout engine)
  against the run's mean δ = |π_train − π_rollout| per token, one colour per correction, one marker per rank,
  with the δ ≈ 0 band (mean ± sd of the fp32-engine runs, whose δ is the numerical floor) and the fitted edges.
- `edges`: each rank's fitted edge with its seed-unit interval, beside its mean KL to the base.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from arca_lab.analysis.figures import NEUTRAL, PALETTE, NothingToDraw, band_key, colour_key, style_key

RANK_MARKERS = ("o", "s", "^", "D", "v", "P")


def reward_vs_delta(points: pd.DataFrame, edges: pd.DataFrame | None = None) -> Figure:
    finite = points[np.isfinite(points["log10_delta"])]
    if finite.empty:
        raise NothingToDraw("no run with a measured delta")
    corrections = list(dict.fromkeys(finite["correction"]))
    ranks = sorted(finite["rank"].unique())
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(corrections)}
    markers = {r: RANK_MARKERS[i % len(RANK_MARKERS)] for i, r in enumerate(ranks)}
    columns = [("reward", "final reward (mean of the last steps)")]
    columns += [
        ("acc_after", "held-out greedy accuracy, trainer"),
        ("acc_after_engine", "... under the engine"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharex=True)
    floor = finite[finite.get("rollout_engine", pd.Series(dtype=str)) == "fp32"]
    for ax, (col, label) in zip(axes, columns, strict=True):
        if col not in finite or finite[col].isna().all():
            ax.set_title(f"{label}: not measured")
            continue
        if len(floor):
            m, s = floor[col].mean(), floor[col].std(ddof=1) if len(floor) > 1 else 0.0
            ax.axhspan(m - s, m + s, color=NEUTRAL, alpha=0.25, lw=0)
        for (corr, rank), g in finite.groupby(["correction", "rank"]):
            ax.scatter(g["log10_delta"], g[col], color=colors[corr], marker=markers[rank], s=22, alpha=0.8)
        if edges is not None and col == "reward":
            for _, e in edges.iterrows():
                ax.axvline(e["edge"], color=NEUTRAL, ls=":", lw=1.2)
        ax.set_xlabel("log10 mean delta = |pi_train - pi_rollout| per sampled token")
        ax.set_ylabel(label)
    keys = [colour_key(colors[c], f"correction {c}") for c in corrections]
    keys += [style_key(f"rank {r}", ls="none", marker=markers[r]) for r in ranks]
    if len(floor):
        keys.append(band_key("delta ~ 0 (fp32 engine): mean +- sd"))
    if edges is not None and len(edges):
        keys.append(style_key("fitted edge (per rank)", ls=":"))
    fig.legend(handles=keys, loc="lower center", ncol=min(6, len(keys)), frameon=False, fontsize=8)
    fig.suptitle("Train-inference discrepancy: reward and accuracy against mean delta, one point per run")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return fig


def edges(table: pd.DataFrame) -> Figure:
    if table.empty:
        raise NothingToDraw("no rank with uncorrected runs")
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    y = np.arange(len(table))
    lo = (table["edge"] - table["lo"]).fillna(0).clip(lower=0)
    hi = (table["hi"] - table["edge"]).fillna(0).clip(lower=0)
    ax.errorbar(table["edge"], y, xerr=[lo, hi], fmt="o", color="C0", capsize=4)
    ax.set_yticks(
        y,
        [
            f"rank {r}" + ("" if b else " (edge not bracketed)")
            for r, b in zip(table["rank"], table["bracketed"], strict=True)
        ],
    )
    ax.set_xlabel("edge of the tolerance region: log10 mean delta")
    ax.set_title("fitted hinge edge, 95 % seed-unit interval (none below 3 seeds)")
    ax_kl.barh(y, table["kl_ref_policy_mean"], color="C1")
    ax_kl.set_yticks(y, [f"rank {r}" for r in table["rank"]])
    ax_kl.set_xlabel("KL(pi_base || pi_theta) per token, mean of the last steps")
    ax_kl.set_title("KL to the base per rank (scale check)")
    fig.tight_layout()
    return fig
