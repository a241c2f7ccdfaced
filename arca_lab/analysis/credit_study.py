"""The paired credit study (pre-registered in theory/preregistered/credit_study.json): its pilot's step count T,
the paired accuracy contrasts against uniform credit, and credit concentration beside them.

Every function takes a sweep cube (`arca_lab.sweep.load_sweep`) and returns a pandas DataFrame or a number; the
notebook `notebooks/credit_study_analysis.ipynb` only prints and plots them.

Notation:
    acc(c, s, t): held-out greedy accuracy of credit arm c, seed s, after t optimiser steps (512 prompts, the same
        for every run: `arca_lab.run.EVAL_SEED`); t = 0 is the base model (greedy_accuracy_before), t = the
        run's last step is greedy_accuracy_after, other t come from RunConfig.eval_at (greedy_accuracy_at)
    d_s = acc(c, s, t) - acc(uniform, s, t): the paired difference of one seed (same prompts per step, same
        held-out prompts, same initial adapter draw)
    n: seeds with both arms; mean d, s_d its sample standard deviation
Sources:
    Student-t interval: mean d ± t_{n-1, 0.975} s_d / √n (`theory.stats.t_interval`, Student 1908).
    Paired t-test p-value: 2·P(T_{n-1} > |mean d| √n / s_d).
    Holm (1979) step-down adjustment: sort the m p-values ascending, p_(i) -> max_{j<=i} min(1, (m - j + 1) p_(j)).
    Minimum detectable effect (two-sided α, power 1-β, paired t; normal-theory approximation with t quantiles):
        MDE = (t_{n-1, 1-α/2} + t_{n-1, 1-β}) s_d / √n.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats as sst

from arca_lab.analysis.tables import _points, sweep_axes
from theory.stats import t_interval

ARM_KEYS = ("credit", "sharpening", "arca_layers")
"""Columns that name a study arm (a credit and its ARCA settings); the main arms have sharpening 2, layers last."""


def accuracy_long(cube: xr.Dataset) -> pd.DataFrame:
    """One row per (run, step) with a held-out greedy accuracy: axes..., run_id, step, accuracy."""
    rows = []
    axes = sweep_axes(cube)
    for p in _points(cube):
        head = {a: p[a].item() for a in axes} | {"run_id": p["run_id"].item()}
        head |= {a: p[a].item() if a in p.coords else None for a in ARM_KEYS}  # axes or shared config coords
        last = int(np.nanmax(np.where(np.isnan(p["reward"].values), np.nan, p["step"].values)))
        rows.append(head | {"step": 0, "accuracy": float(p["greedy_accuracy_before"])})
        if "greedy_accuracy_at" in p:
            for s, acc in zip(p["eval_step"].values, p["greedy_accuracy_at"].values, strict=True):
                if np.isfinite(acc):
                    rows.append(head | {"step": int(s), "accuracy": float(acc)})
        rows.append(head | {"step": last, "accuracy": float(p["greedy_accuracy_after"])})
    return pd.DataFrame(rows)


def pilot_T(acc: pd.DataFrame, rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pre-registered T rule (credit_study.json, pilot.T_rule) applied to the pilot's uniform runs: the
    smallest step at which the seed-mean accuracy gain over the base reaches 80 % of its largest gain, capped at
    24, 24 if the largest gain is below 0.02, made even. Returns T with the curve it was read from."""
    uni = acc[acc["credit"] == "uniform"]
    curve = uni.groupby("step")["accuracy"].mean().sort_index()  # step -> seed-mean accuracy
    gain = curve - curve.loc[0]
    best = float(gain.max())
    if best < 0.02:
        T, why = 24, f"largest gain {best:.3f} < 0.02"
    else:
        reached = [int(s) for s, g in gain.items() if s > 0 and g >= 0.8 * best]
        T, why = min(reached[0], 24), f"gain reaches 80 % of {best:.3f} at step {reached[0]}"
    T += T % 2
    return {"T": T, "why": why, "curve": curve, "seeds": int(uni["seed"].nunique())}


def mde(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable paired difference (module docstring); NaN below 2 seeds or for a NaN sd."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return float((sst.t.ppf(1 - alpha / 2, n - 1) + sst.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (module docstring); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    order = [i for i in np.argsort(p) if np.isfinite(p[i])]
    m = len(order)
    out = np.full(p.shape, np.nan)
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out.tolist()


def paired_differences(acc: pd.DataFrame, step: int, reference: str = "uniform") -> pd.DataFrame:
    """Per arm and seed at `step`: d = acc(arm) - acc(reference main arm) on the same seed (seeds with both)."""
    at = acc[acc["step"] == step]
    main = (at["credit"] == reference) & (at["sharpening"] == 2.0) & (at["arca_layers"].isin(["last", None]))
    ref = at[main].set_index("seed")["accuracy"]
    rows = []
    for arm, runs in at[~main].groupby(list(ARM_KEYS), dropna=False):
        for r in runs.itertuples():
            if r.seed in ref.index:
                rows.append(
                    dict(zip(ARM_KEYS, arm, strict=True)) | {"seed": r.seed, "d": r.accuracy - ref[r.seed]}
                )
    return pd.DataFrame(rows)


def contrasts(acc: pd.DataFrame, step: int, primary: str = "arca", level: float = 0.95) -> pd.DataFrame:
    """Every arm minus uniform at `step`: mean paired difference, Student-t interval over seeds, paired t-test
    p-value, MDE at the observed s_d, and Holm-adjusted p over the main arms other than `primary` (the
    pre-registered family); the primary contrast and the sensitivity arms are not adjusted."""
    d = paired_differences(acc, step)
    rows = []
    for arm, g in d.groupby(list(ARM_KEYS), dropna=False):
        ci = t_interval(g["d"].values, level=level)
        n, sd = len(g), float(g["d"].std(ddof=1)) if len(g) > 1 else math.nan
        p = 2 * sst.t.sf(abs(ci.estimate) * math.sqrt(n) / sd, n - 1) if n > 1 and sd > 0 else math.nan
        rows.append(dict(zip(ARM_KEYS, arm, strict=True)) | dict(
            step=step, n=n, mean_diff=ci.estimate, lo=ci.lo, hi=ci.hi, sd=sd, p=p, mde=mde(sd, n)
        ))  # fmt: skip
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    main = (out["sharpening"] == 2.0) & out["arca_layers"].isin(["last", None])
    family = main & (out["credit"] != primary)
    out["role"] = np.where(
        main & (out["credit"] == primary), "primary", np.where(family, "family", "sensitivity")
    )
    out["p_holm"] = math.nan
    out.loc[family, "p_holm"] = holm(out.loc[family, "p"].tolist())
    return out


def verdict(row: pd.Series) -> str:
    """The pre-registered reading of one contrast row: primary by its interval, family by Holm at 0.05."""
    if row["role"] == "primary":
        if not np.isfinite(row["lo"]):
            return "no interval"
        return "difference" if row["lo"] > 0 or row["hi"] < 0 else "no difference shown"
    if row["role"] == "family":
        return "difference (Holm)" if row["p_holm"] < 0.05 else "no difference shown (Holm)"
    return "description"


def concentration(cube: xr.Dataset, until: int, last_steps: int = 3) -> pd.DataFrame:
    """Per arm: seed-mean Gini, ETR and format-token mass over the `last_steps` training steps up to `until`
    (credit_gini, credit_etr, credit_role_mass_format: every valid completion token of each step's batch)."""
    rows = []
    for p in _points(cube):
        window = p.sel(step=[s for s in p["step"].values if until - last_steps < s <= until])
        arm = {a: p[a].item() if a in p.coords else None for a in ARM_KEYS}
        rows.append(arm | {
            "seed": p["seed"].item(),
            "gini": float(window["credit_gini"].mean()),
            "etr": float(window["credit_etr"].mean()),
            "format_mass": float(window["credit_role_mass_format"].mean()),
        })  # fmt: skip
    df = pd.DataFrame(rows)
    g = df.groupby(list(ARM_KEYS), dropna=False)
    return g[["gini", "etr", "format_mass"]].mean().join(g.size().rename("seeds")).reset_index()


def draw_contrasts(table: pd.DataFrame, figures_dir, name: str = "credit_contrasts") -> list:
    """One row per arm: the paired accuracy difference to uniform with its 95 % interval, one marker per endpoint
    step (T/2, T, 2T); the primary contrast in bold. Saved as PNG and SVG; returns the paths."""
    import matplotlib.pyplot as plt

    from arca_lab.analysis.tables import save_figure

    arms = list(dict.fromkeys(zip(table["credit"], table["sharpening"], table["arca_layers"], strict=True)))
    steps = sorted(table["step"].unique())
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(arms) + 1.2))
    for k, step in enumerate(steps):
        sub = table[table["step"] == step]
        for i, arm in enumerate(arms):
            row = sub[
                (sub["credit"] == arm[0]) & (sub["sharpening"] == arm[1]) & (sub["arca_layers"] == arm[2])
            ]
            if row.empty:
                continue
            r = row.iloc[0]
            y = i + (k - (len(steps) - 1) / 2) * 0.22
            ax.errorbar(r.mean_diff, y, xerr=[[r.mean_diff - r.lo], [r.hi - r.mean_diff]], fmt="o", color=f"C{k}",
                        capsize=2, label=f"after {step} steps" if i == 0 else None)  # fmt: skip
    ax.axvline(0, color="grey", lw=0.8)
    labels = [f"{c} (p {p:g}, {l})" if c.startswith("arca") else c for c, p, l in arms]
    ax.set_yticks(range(len(arms)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("held-out greedy accuracy − uniform (paired by seed, 95 % t-interval)")
    ax.legend(fontsize=8, loc="best")
    paths = save_figure(fig, figures_dir, name)
    plt.close(fig)
    return paths
