"""Figures of the KL-law prediction test: measured vs predicted KL(r), one panel per regime, and KL over steps.

Measured: exact float64 held-out KL(π_ref‖π_θ) on the registered context rows (prediction.measure_sweep), seed
mean (marker) and the range over seeds (bar). Predicted: theory.kl_law.predict_kl (line). Filled markers are the
registered points of the panel's regime; hollow ones are the same lr's other ranks (another regime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from arca_lab.analysis.prediction_criteria import REGIMES


def _save(fig: Any, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(out / f"{name}.{ext}", dpi=120, bbox_inches="tight")
    return out / f"{name}.png"


def draw_kl_vs_rank(ds: xr.Dataset, reg: dict[str, Any], out: Path) -> Path:
    """One panel per regime: for each lr holding a registered point of that regime, KL against rank."""
    step = int(reg["setup"]["steps"])
    kl = ds["kl_ref_theta"].sel(arm="head", step=step)  # (rank, lr, seed)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=False)
    colors = dict(
        zip(reg["setup"]["lrs"], plt.cm.viridis(np.linspace(0, 0.9, len(reg["setup"]["lrs"]))), strict=True)
    )
    for ax, regime in zip(axes, REGIMES, strict=True):
        mine = [p for p in reg["points"] if p["regime"] == regime]
        for lr in sorted({p["lr"] for p in mine}):
            ranks = np.array(reg["setup"]["ranks"])
            pred = ds["predicted_kl_ref_theta"].sel(lr=lr, step=step, rank=ranks).values
            ax.plot(ranks, pred, "--", color=colors[lr], label=f"lr {lr:g} predicted")
            ks = kl.sel(lr=lr, rank=ranks)
            mean = ks.mean("seed").values
            lo, hi = ks.min("seed").values, ks.max("seed").values
            ax.errorbar(ranks, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor=colors[lr], alpha=0.6)
            is_mine = np.isin(ranks, [p["rank"] for p in mine if p["lr"] == lr])
            ax.plot(ranks[is_mine], mean[is_mine], "o", color=colors[lr], label=f"lr {lr:g} measured")
            ax.plot(ranks[~is_mine], mean[~is_mine], "o", mfc="none", color=colors[lr])
        ax.set(xscale="log", yscale="log", xlabel="LoRA rank r (α = 2r)", title=f"{regime} points")
        ax.set_xticks(reg["setup"]["ranks"], [str(r) for r in reg["setup"]["ranks"]])
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"held-out KL(π_ref‖π_θ) after step {step}")
    fig.suptitle(
        "KL-law prediction test: seed mean (range over seeds) vs predict_kl; filled = registered point"
    )
    return _save(fig, out, "kl_law_vs_rank")


def draw_kl_vs_step(ds: xr.Dataset, reg: dict[str, Any], out: Path) -> Path:
    """KL over the checkpointed steps (3, 6, 9, 12) against predict_kl at those T, one panel per lr."""
    lrs = reg["setup"]["lrs"]
    fig, axes = plt.subplots(1, len(lrs), figsize=(3.2 * len(lrs), 3.6))
    steps = ds["step"].values
    for ax, lr in zip(np.atleast_1d(axes), lrs, strict=True):
        for i, r in enumerate(reg["setup"]["ranks"]):
            c = plt.cm.plasma(i / max(1, len(reg["setup"]["ranks"]) - 1) * 0.9)
            ax.plot(steps, ds["predicted_kl_ref_theta"].sel(rank=r, lr=lr).values, "--", color=c)
            ax.plot(steps, ds["kl_ref_theta"].sel(arm="head", rank=r, lr=lr).mean("seed").values, "o-", color=c,
                    label=f"r={r}")  # fmt: skip
        ax.set(yscale="log", xlabel="optimiser step", title=f"lr {lr:g}")
    np.atleast_1d(axes)[0].set_ylabel("KL(π_ref‖π_θ): measured (o) / predicted (--)")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    return _save(fig, out, "kl_law_vs_step")
