"""The registered pass rules of the KL-law prediction test, applied to prediction.nc (`prediction.measure_sweep`).

Notation (theory/preregistered/kl_law_prediction.json `criteria`):
    KL_s(r, lr)   exact float64 held-out KL(π_ref‖π_θ) of seed s after update T = 12 (head-only arm)
    m(r, lr)      measured point value = mean over seeds of KL_s      p(r, lr) the registered predict_kl value
    e(r, lr)      |log10(m/p)|; the law passes if median e ≤ 0.3 over the included points
    b(lr)         rank-blind baseline: geometric mean over ranks of m(·, lr); e_b = |log10(m/b)|
                  the law must also beat it: median e ≤ median e_b − 0.1
    γ rule        per regime and seed, d_s = mean over lrs (≥ 2 ranks of that regime) of
                  [OLS slope of log10 KL_s vs log10 r] − [OLS slope of log10 p vs log10 r];
                  90% Student-t interval of d over seeds: inside ±0.25 pass, wider than 0.5 inconclusive, else miss
A NaN measurement fails its point (e = ∞). Points whose prediction is below 10 × floor are excluded.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

REGIMES = ("small_step", "coherent", "saturated")


def registration_of(ds: xr.Dataset) -> dict[str, Any]:
    return json.loads(ds.attrs["registration"])


def _abs_log10(measured: float, ref: float) -> float:
    if not (measured > 0 and ref > 0) or math.isnan(measured):
        return math.inf
    return abs(math.log10(measured / ref))


def point_table(ds: xr.Dataset, reg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per registered point: measured (mean over seeds), predicted, errors of the law and of the baseline."""
    head = ds["kl_ref_theta"].sel(arm="head", step=int(reg["setup"]["steps"]))  # (rank, lr, seed)
    seeds = [s for s in reg["setup"]["seeds"] if s in head["seed"].values]
    head = head.sel(seed=seeds)
    floor10 = 10 * float(reg["floor"])
    rows = []
    for pt in reg["points"]:
        ks = head.sel(rank=pt["rank"], lr=pt["lr"]).values  # (seed,)
        m = float(np.mean(ks)) if ks.size and not np.isnan(ks).any() else math.nan
        rows.append(
            {
                "rank": pt["rank"],
                "lr": pt["lr"],
                "regime": pt["regime"],
                "predicted": pt["predicted"]["kl_ref_theta"],
                "measured": m,
                "n_seeds": int(np.sum(~np.isnan(ks))),
                "excluded": pt["predicted"]["kl_ref_theta"] < floor10,
            }
        )
    for (
        row
    ) in rows:  # rank-blind baseline: geometric mean over the ranks at this lr (measured, included points)
        same = [
            r["measured"] for r in rows if r["lr"] == row["lr"] and not r["excluded"] and r["measured"] > 0
        ]
        row["baseline"] = (
            float(np.exp(np.mean(np.log(same)))) if same else math.nan
        )  # a NaN point fails alone
        row["err"] = _abs_log10(row["measured"], row["predicted"])
        row["err_baseline"] = _abs_log10(row["measured"], row["baseline"])
        row["ratio"] = row["measured"] / row["predicted"]
        row["pass"] = row["err"] <= reg["criteria"]["median_abs_log10_max"]
    return rows


def _slope(logr: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(logr, y, 1)[0])


def gamma_result(ds: xr.Dataset, reg: dict[str, Any], regime: str, level: float = 0.90) -> dict[str, Any]:
    """The registered γ rule for one regime: per-seed d_s, its Student-t interval and the verdict."""
    head = ds["kl_ref_theta"].sel(arm="head", step=int(reg["setup"]["steps"]))
    seeds = [s for s in reg["setup"]["seeds"] if s in head["seed"].values]
    groups: dict[float, list[dict[str, Any]]] = {}
    for pt in reg["points"]:
        if pt["regime"] == regime and pt["predicted"]["kl_ref_theta"] >= 10 * float(reg["floor"]):
            groups.setdefault(pt["lr"], []).append(pt)
    groups = {lr: pts for lr, pts in groups.items() if len(pts) >= 2}
    out: dict[str, Any] = {"regime": regime, "lrs": sorted(groups), "n_seeds": len(seeds)}
    if not groups or len(seeds) < 2:
        return out | {"verdict": "inconclusive", "why": "fewer than 2 ranks at any lr or fewer than 2 seeds"}
    d, g_meas, g_pred = np.zeros(len(seeds)), np.zeros(len(seeds)), 0.0
    for pts in groups.values():
        logr = np.log10([p["rank"] for p in pts])
        pred = _slope(logr, np.log10([p["predicted"]["kl_ref_theta"] for p in pts]))
        g_pred += pred / len(groups)
        for i, s in enumerate(seeds):
            ks = np.array([float(head.sel(rank=p["rank"], lr=p["lr"], seed=s)) for p in pts])
            slope = _slope(logr, np.log10(ks)) if (ks > 0).all() else math.nan  # NaN propagates: a failure
            d[i] += (slope - pred) / len(groups)
            g_meas[i] += slope / len(groups)
    n = len(seeds)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(d, ddof=1) / np.sqrt(n))
    lo, hi = float(np.mean(d)) - half, float(np.mean(d)) + half
    h = float(reg["criteria"]["gamma_halfwidth"])
    if not np.isfinite([lo, hi]).all():
        verdict = "miss"
    elif hi - lo > 2 * h:
        verdict = "inconclusive"
    else:
        verdict = "pass" if -h <= lo and hi <= h else "miss"
    return out | {
        "gamma_measured": float(np.mean(g_meas)),
        "gamma_predicted": g_pred,
        "diff_mean": float(np.mean(d)),
        "interval": (lo, hi),
        "verdict": verdict,
    }


def evaluate(ds: xr.Dataset, reg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every registered verdict: the median rule, the baseline rule, γ per regime, per-regime medians."""
    reg = reg or registration_of(ds)
    c = reg["criteria"]
    rows = point_table(ds, reg)
    inc = [r for r in rows if not r["excluded"]]
    med = float(np.median([r["err"] for r in inc]))
    med_b = float(np.median([r["err_baseline"] for r in inc]))
    per_regime = {
        g: float(np.median([r["err"] for r in inc if r["regime"] == g]))
        for g in REGIMES
        if any(r["regime"] == g for r in inc)
    }
    head = ds["kl_ref_theta"].sel(arm="head", step=int(reg["setup"]["steps"]))
    measured_seeds = [int(x) for x in head["seed"].values if head.sel(seed=x).notnull().any()]
    missing = [x for x in reg["setup"]["seeds"] if x not in measured_seeds]
    return {
        "missing_seeds": missing,  # registered seeds with no run: the verdicts are then not the registered test's
        "n_registered_seeds": len(reg["setup"]["seeds"]),
        "criteria": c,
        "rows": rows,
        "median_err": med,
        "median_err_baseline": med_b,
        "median_pass": med <= c["median_abs_log10_max"],
        "baseline_pass": med <= med_b - c["baseline_margin_dex"],
        "per_regime": per_regime,
        "gamma": {g: gamma_result(ds, reg, g) for g in REGIMES},
        "excluded": [(r["rank"], r["lr"]) for r in rows if r["excluded"]],
    }


def best_lr_table(ds: xr.Dataset, arm: str = "head") -> list[dict[str, Any]]:
    """Each rank at its own best lr (highest mean late training reward over seeds): "LoRA without regret"."""
    per_seed = ds["reward_late"].sel(arm=arm)  # (rank, lr, seed)
    rew = per_seed.mean("seed")
    se = per_seed.std("seed", ddof=1) / np.sqrt(per_seed.count("seed"))
    kl = ds["kl_ref_theta"].sel(arm=arm, step=int(ds["step"].max())).mean("seed")
    out = []
    for r in ds["rank"].values:
        row = rew.sel(rank=r)
        if np.isnan(row.values).all():
            continue
        lr = float(row["lr"].values[int(np.nanargmax(row.values))])
        out.append(
            {
                "rank": int(r),
                "best_lr": lr,
                "reward_late": float(row.sel(lr=lr)),
                "reward_se": float(se.sel(rank=r, lr=lr)),  # standard error over seeds
                "kl": float(kl.sel(rank=r, lr=lr)),
            }
        )
    return out


def carry_over(ds: xr.Dataset, reg: dict[str, Any]) -> dict[str, Any]:
    """All-linear measured KL against the head-only law at the same (r, lr): a measurement, no claim."""
    spec = reg["secondary"]["carry_over"]
    step = int(reg["setup"]["steps"])
    rows = []
    for r in spec["ranks"]:
        for lr in spec["lrs"]:
            ks = ds["kl_ref_theta"].sel(arm="all", rank=r, lr=lr, step=step, seed=spec["seeds"])
            m = float(
                ks.mean("seed", skipna=False)
            )  # the registered carry-over seeds; a missing one gives NaN
            p = float(ds["predicted_kl_ref_theta"].sel(rank=r, lr=lr, step=step))
            rows.append(
                {"rank": r, "lr": lr, "measured": m, "predicted_head_law": p, "err": _abs_log10(m, p)}
            )
    errs = [x["err"] for x in rows]
    return {"rows": rows, "median_err": float(np.median(errs)) if errs else math.nan}


def other_direction(ds: xr.Dataset, reg: dict[str, Any]) -> dict[str, float]:
    """Median |log10(measured/predicted)| of KL(π_θ‖π_ref) per regime and over all points (no criterion)."""
    step = int(reg["setup"]["steps"])
    errs: dict[str, list[float]] = {}
    for p in reg["points"]:
        ks = ds["kl_theta_ref"].sel(arm="head", rank=p["rank"], lr=p["lr"], step=step)
        errs.setdefault(p["regime"], []).append(
            _abs_log10(float(ks.mean("seed")), p["predicted"]["kl_theta_ref"])
        )
    out = {g: float(np.median(v)) for g, v in errs.items()}
    return out | {"all": float(np.median([e for v in errs.values() for e in v]))}


def seed_spread(ds: xr.Dataset, step: int) -> xr.Dataset:
    """Per (rank, lr), head-only: seed-mean KL, its coefficient of variation over seeds (std with ddof = 1 / mean)
    and the seed-mean late training reward."""
    kl = ds["kl_ref_theta"].sel(arm="head", step=step, drop=True)
    return xr.Dataset(
        {
            "kl_mean": kl.mean("seed"),
            "kl_cv": kl.std("seed", ddof=1) / kl.mean("seed"),
            "reward_late": ds["reward_late"].sel(arm="head", drop=True).mean("seed"),
        }
    )


def format_summary(result: dict[str, Any]) -> str:
    """The table `arca-lab report` prints: per point measured/predicted and pass/fail, then the verdicts."""
    c = result["criteria"]
    top, margin, h = c["median_abs_log10_max"], c["baseline_margin_dex"], c["gamma_halfwidth"]
    lines = ["KL-law prediction test (pre-registered: theory/preregistered/kl_law_prediction.json)"]
    if result["missing_seeds"]:
        n, N = result["n_registered_seeds"] - len(result["missing_seeds"]), result["n_registered_seeds"]
        lines.append(
            f"INCOMPLETE: {n} of the {N} registered seeds were run: the verdicts below are not the test's"
        )
    lines += [
        f"measured = mean over seeds of exact float64 held-out KL(π_ref‖π_θ) after update T; pass: |log10 ratio| <= {top}",
        "|dex| = |log10(measured/predicted)|; base|dex| = |log10(measured/rank-blind baseline)|",
        f"{'rank':>4} {'lr':>7} {'regime':<10} {'predicted':>10} {'measured':>10} {'meas/pred':>9} "
        f"{'seeds':>5} {'|dex|':>6} {'base|dex|':>9}  point",
    ]
    for r in result["rows"]:
        verdict = "excluded" if r["excluded"] else ("pass" if r["pass"] else "FAIL")
        lines.append(
            f"{r['rank']:>4} {r['lr']:>7.0e} {r['regime']:<10} {r['predicted']:>10.3e} {r['measured']:>10.3e} "
            f"{r['ratio']:>9.2f} {r['n_seeds']:>5} {r['err']:>6.2f} {r['err_baseline']:>9.2f}  {verdict}"
        )
    ok = {True: "PASS", False: "FAIL"}
    lines += [
        "",
        f"median |log10(measured/predicted)| = {result['median_err']:.3f} (<= {top}): {ok[result['median_pass']]}",
        f"rank-blind baseline median = {result['median_err_baseline']:.3f}; law better by "
        f"{result['median_err_baseline'] - result['median_err']:.3f} dex (>= {margin}): {ok[result['baseline_pass']]}",
        "per regime median |dex|: " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_regime"].items()),
    ]
    for g, res in result["gamma"].items():
        if "interval" not in res:
            lines.append(f"gamma {g}: {res['verdict']} ({res['why']})")
            continue
        lo, hi = res["interval"]
        if not np.isfinite([lo, hi]).all():
            note = "a NaN or non-positive measurement"
        else:
            where = (
                "inside"
                if -h <= lo and hi <= h
                else "wholly outside"
                if lo > h or hi < -h
                else "across the edge of"
            )
            note = f"width {hi - lo:.2f}, inconclusive above {2 * h:g}; {where} ±{h:g}"
        lines.append(
            f"gamma {g}: measured {res['gamma_measured']:.3f}, predicted {res['gamma_predicted']:.3f}, "
            f"difference {res['diff_mean']:+.3f}, 90% t-interval over {res['n_seeds']} seeds [{lo:+.3f}, {hi:+.3f}] "
            f"(lrs {', '.join(f'{x:g}' for x in res['lrs'])}; {note}): {res['verdict'].upper()}"
        )
    return "\n".join(lines)
