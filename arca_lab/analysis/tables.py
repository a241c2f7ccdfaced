"""Sweep analysis: the theory's predictions beside a sweep's measurements, as tables the analysis notebook plots.

Inputs are a sweep cube (`arca_lab.sweep.load_sweep`, layout in that module's docstring) and its run directories.
Every function returns a pandas DataFrame with one row per grid point (or per group of grid points) and never
plots, so `notebooks/rank_sweep_analysis.ipynb` only draws what these functions computed.

Sources:
- KL bounds: `arca_lab.analysis.verify` (theory/aposteriori.md P2–P4, theory/apriori.md A6/A7); its "lemma" rows (the
  per-token K(range(z_t)/τ) from the measured shift itself, ‖x_t‖ ≤ R) are kept apart from the bounds verified.
- Rank exponent γ in E[KL] ∝ r^γ: `theory.rank_scaling.predict_gamma` (prediction, measure "mean": the mean
  KL over contexts, theory/rank_scaling.md §3.4, §6) and `fit_gamma` (least-squares slope of log mean-over-seeds
  KL on log r; 95 % interval with the seed as the unit, jackknife + Student-t, none below 3 seeds: theory/stats.py,
  §8).
- Credit regimes: `theory.credit_degeneracy.predict_regime` per completion, from the range of its raw scores
  (theory/credit_degeneracy.md §2, §6); Gini and ETR as in the ARCA paper (arXiv 2606.00257, diagnostics).
- Reference values: ARCA paper Table 3 (`ARCA_TABLE3`).

Notation:
    point: one grid point with a run (axes rank, credit, seed, arm, alpha_rule, + extra axes such as beta)
    "last-steps mean": mean of a per-step metric over the run's last `last_steps` logged steps
    kl_policy_ref = KL(π_θ‖π_ref), kl_ref_policy = KL(π_ref‖π_θ) (MERL's direction), exact per token (run.nc)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

ARCA_TABLE3: dict[tuple[str, int], tuple[float, float]] = {
    ("uniform", 64): (0.000, 1.000),
    ("surprisal", 64): (0.941, 0.052),
    ("entropy_reduction", 64): (0.920, 0.073),
    ("divergence", 64): (0.939, 0.055),
    ("arca", 4): (0.353, 0.467),
    ("arca", 16): (0.388, 0.460),
    ("arca", 64): (0.490, 0.334),
}
"""ARCA paper (arXiv 2606.00257) Table 3, (Gini, ETR) per (credit, rank): Qwen3-1.7B-Base on MATH, one seed."""

DIRECTIONS = ("kl_policy_ref", "kl_ref_policy")
STEP_METRICS = {
    "reward": "reward",
    "kl_policy_ref_mean": "kl_policy_ref_mean",
    "kl_ref_policy_mean": "kl_ref_policy_mean",
    "gini": "credit_gini",
    "etr": "credit_etr",
    "effn": "credit_effn",
    "format_mass": "credit_role_mass_format",
    "step_time": "step_time",
}
"""run_points column -> per-step run.nc variable, summarised by its last-steps mean."""


def sweep_axes(cube: xr.Dataset) -> list[str]:
    """The grid axes of a sweep cube (the dims of its `run_id` coordinate)."""
    return list(cube["run_id"].dims)


def _points(cube: xr.Dataset):
    axes = sweep_axes(cube)
    for idx in zip(*np.nonzero(cube["has_run"].values), strict=True):
        yield cube.isel(dict(zip(axes, idx, strict=True)))


def _coord(point: xr.Dataset, name: str, default: Any = math.nan) -> Any:
    return point.coords[name].item() if name in point.coords else default


def _last(point: xr.Dataset, last_steps: int) -> xr.Dataset:
    """The point's last `last_steps` steps that have a reward (shorter runs are NaN-padded in the cube)."""
    if "reward" not in point:
        return point
    steps = point["step"].values[~np.isnan(point["reward"].values)]
    return point.sel(step=steps[-last_steps:]) if len(steps) else point


def point_row(point: xr.Dataset, axes: Sequence[str]) -> dict[str, Any]:
    """The identifying columns of one grid point's row: its axis values and run_id."""
    return {**{a: point[a].item() for a in axes}, "run_id": point["run_id"].item()}


def clip_regime(point: xr.Dataset) -> str:
    """SGD's clip regime for `predict_gamma`: "active" (every step clipped), "inactive" (none) or "mixed".

    Adam's step does not depend on the gradient scale, so its regime is "inactive" by convention.
    """
    if _coord(point, "optimizer", "adamw") != "sgd":
        return "inactive"
    clip = float(_coord(point, "grad_clip"))
    g = point["grad_norm"].values if "grad_norm" in point else np.zeros(0)
    g = g[~np.isnan(g)]
    if math.isnan(clip) or not np.any(g > clip):
        return "inactive"
    return "active" if np.all(g > clip) else "mixed"


def run_points(cube: xr.Dataset, last_steps: int = 3) -> pd.DataFrame:
    """One row per grid point with a run: axis values, run_id, last-steps means of `STEP_METRICS`, the max over
    steps of the per-step max KL (both directions), accuracies before/after, optimiser, scaling, beta, clip regime.
    """
    if last_steps < 1:
        raise ValueError(f"last_steps must be >= 1, got {last_steps}")
    rows = []
    axes = sweep_axes(cube)
    for p in _points(cube):
        row = point_row(p, axes)
        last = _last(p, last_steps)
        for col, var in STEP_METRICS.items():
            row[col] = float(last[var].mean()) if var in p else math.nan
        for d in DIRECTIONS:  # the largest per-token KL the probe saw in any step
            row[f"{d}_max"] = float(p[f"{d}_max"].max()) if f"{d}_max" in p else math.nan
        for when in ("before", "after"):
            row[f"acc_{when}"] = (
                float(p[f"greedy_accuracy_{when}"]) if f"greedy_accuracy_{when}" in p else math.nan
            )
            row[f"pass_{when}"] = float(p[f"pass_at_k_{when}"]) if f"pass_at_k_{when}" in p else math.nan
        for name in (
            "optimizer",
            "scaling",
            "beta",
            "target_modules",
            "sharpening",
            "credit_eps",
            "weight_decay",
        ):
            row.setdefault(name, _coord(p, name))
        # what the gamma regime check needs: Σ_t lr_t (the recorded schedule) and the width d of the head input
        row["eta_T"] = float(np.nansum(p["learning_rate"].values)) if "learning_rate" in p else math.nan
        row["d_model"] = float(p["d_model"]) if "d_model" in p else math.nan
        row["clip_regime"] = clip_regime(p)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- rank exponent
def gamma_table(
    points: pd.DataFrame,
    group_by: Sequence[str] = ("arm", "alpha_rule", "credit", "beta"),
    level: float = 0.95,
) -> pd.DataFrame:
    """Fitted vs predicted rank exponent γ of the last-steps mean KL, per group and KL direction.

    Groups with fewer than 2 ranks are left out; seeds missing a rank of their group are dropped (the fit pairs
    ranks within a seed). The prediction needs one optimiser, scaling and clip regime per group (else NaN) and
    is the single-layer theory's (exact for the head arm, a reference for the all-linear arm). The interval
    (lo, hi) is `theory.rank_scaling.fit_gamma`'s at `level`, the seed as the unit; with fewer than 3 seeds it
    is NaN and `note` says why.
    """
    from theory.rank_scaling import fit_gamma, predict_gamma

    keys = [k for k in group_by if k in points.columns]
    out = []
    for values, g in points.groupby(keys, dropna=False) if keys else [((), points)]:
        ranks = sorted(g["rank"].unique())
        if len(ranks) < 2:
            continue
        values = values if isinstance(values, tuple) else (values,)
        pred, regime, note, regime_check = math.nan, "", "", ""
        fixed = {c: g[c].unique() for c in ("optimizer", "scaling", "clip_regime")}
        if all(len(v) == 1 for v in fixed.values()) and fixed["clip_regime"][0] != "mixed":
            try:
                gp = predict_gamma(
                    fixed["optimizer"][0],
                    fixed["scaling"][0],
                    g["alpha_rule"].iloc[0],
                    fixed["clip_regime"][0],
                    "mean",
                )
                pred, regime = gp.gamma, gp.regime
                regime_check = hyperparameter_regime(g)
            except ValueError as err:
                note = f"no prediction: {err}"
        else:
            note = "no prediction: optimiser, scaling or clip regime differs within the group"
        for d in DIRECTIONS:
            table = g.pivot_table(index="seed", columns="rank", values=f"{d}_mean").dropna()
            row = dict(zip(keys, values, strict=True), direction=d, ranks=tuple(ranks), n_seeds=len(table))
            row.update(
                gamma_pred=pred,
                regime=regime,
                regime_check=regime_check,
                gamma_fit=math.nan,
                lo=math.nan,
                hi=math.nan,
                note=note,
            )
            if len(table) == 0 or (table.values <= 0).any():
                row["note"] = "no fit: a rank has no run in every seed, or a KL is 0"
            else:
                fit = fit_gamma(table.columns.values, table.values, level=level)
                row.update(gamma_fit=fit.estimate, lo=fit.lo, hi=fit.hi)
                if not fit.has_interval:  # fewer than 3 seeds: no interval rather than a narrow one
                    row.update(note="; ".join(n for n in (note, fit.reason) if n))
            out.append(row)
    return pd.DataFrame(out)


def hyperparameter_regime(group: pd.DataFrame) -> str:
    """ "ok" or the failing inequalities (joined by "; ") of `theory.rank_scaling.hyperparameter_check` for one
    gamma group: d = d_model, r_max = the group's largest rank, eta_T = the largest Σ_t lr_t of its runs
    (theory/rank_scaling.md §3.3). "" for SGD (its regime needs clipping statistics) or missing inputs."""
    from theory.rank_scaling import hyperparameter_check

    if (group["optimizer"] == "sgd").any() or group[["d_model", "eta_T"]].isna().any().any():
        return ""
    diag = dict(
        d=float(group["d_model"].max()),
        r_max=float(group["rank"].max()),
        eta_T=float(group["eta_T"].max()),
        weight_decay=float(group["weight_decay"].max()),
    )
    lines = hyperparameter_check(str(group["optimizer"].iloc[0]), diag).lines
    failing = [ln.removesuffix(" -> FAILS") for ln in lines if ln.endswith("FAILS")]
    return "; ".join(failing) if failing else "ok"


def predicted_line(ranks: Sequence[float], values: Sequence[float], gamma: float) -> np.ndarray:
    """c·r^γ through the geometric mean of (ranks, values): the predicted slope drawn beside measured points."""
    r, v = np.asarray(ranks, float), np.asarray(values, float)
    log_c = np.mean(np.log(v)) - gamma * np.mean(np.log(r))
    return np.exp(log_c) * r**gamma


def series_axes(cube: xr.Dataset) -> list[str]:
    """What tells the lines of one KL-vs-rank panel apart: credit, then any extra grid axis such as beta (a
    merl sweep must not average its beta = 0 and beta = 0.05 runs into one curve)."""
    from arca_lab.sweep.grid import AXES

    return ["credit", *(a for a in sweep_axes(cube) if a not in AXES)]


def series_label(series_by: Sequence[str], key: Sequence[Any]) -> str:
    """ "uniform" or "uniform, beta=0.05": the legend label of one KL-vs-rank line."""
    return ", ".join([str(key[0]), *(f"{k}={v}" for k, v in zip(series_by[1:], key[1:], strict=True))])


def kl_rank_panels(
    kl: pd.DataFrame, gamma: pd.DataFrame, series_by: Sequence[str] = ("credit",)
) -> dict[tuple[str, str], dict[str, pd.DataFrame]]:
    """What the KL-vs-rank figure draws: per (arm, alpha_rule) with >= 2 ranks, one line per value of
    `series_by` (see `series_axes`) with >= 2 ranks there, keyed by `series_label`: a rank-indexed table of seed
    means (measured KL mean / max in both directions, the held-out max and bounds when present) plus
    "predicted": the predicted slope r^γ (kl_ref_policy) drawn through the measured means, NaN when there is no
    prediction."""
    series_by = list(series_by)
    panels: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}
    for (arm, rule), g in kl.groupby(["arm", "alpha_rule"]):
        if g["rank"].nunique() < 2:
            continue
        panels[(arm, rule)] = {}
        for key, gs in g.groupby(series_by):
            if gs["rank"].nunique() < 2:  # one rank is no curve; the credit figure compares credits at a rank
                continue
            m = gs.groupby("rank").mean(numeric_only=True)
            sel = gamma
            if len(gamma):
                sel = gamma[
                    (gamma.arm == arm) & (gamma.alpha_rule == rule) & (gamma.direction == "kl_ref_policy")
                ]
                for col, value in zip(series_by, key, strict=True):
                    if col in sel:
                        sel = sel[sel[col] == value]
            pred = float(sel["gamma_pred"].iloc[0]) if len(sel) else math.nan
            ok = math.isfinite(pred) and len(m) >= 2 and (m["kl_ref_policy_mean"] > 0).all()
            m["predicted"] = predicted_line(m.index, m["kl_ref_policy_mean"], pred) if ok else math.nan
            m.attrs["gamma_pred"] = pred
            panels[(arm, rule)][series_label(series_by, key)] = m
    return panels


def gamma_caption(
    gamma: pd.DataFrame,
    arm: str,
    alpha_rule: str,
    direction: str = "kl_ref_policy",
    series_by: Sequence[str] = ("credit",),
    labels: Sequence[str] | None = None,
) -> str:
    """ "label: fit γ [lo, hi] over n seed(s), pred γ", one line per line of the panel (or per one in `labels`)."""
    if not len(gamma):
        return ""
    sel = gamma[(gamma.arm == arm) & (gamma.alpha_rule == alpha_rule) & (gamma.direction == direction)]
    lines = []
    for r in sel.itertuples():
        label = series_label(series_by, [getattr(r, c) for c in series_by])
        if labels is None or label in labels:
            ci = f"[{r.lo:+.2f}, {r.hi:+.2f}]" if math.isfinite(r.lo) else "(no CI)"
            lines.append(
                f"{label}: fit {r.gamma_fit:+.2f} {ci} over {r.n_seeds} seed(s), pred {r.gamma_pred:+.2g}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- bounds per run
def run_dirs_by_id(sweep_dir: str | Path, cube: xr.Dataset) -> dict[str, Path]:
    """run_id -> run directory, for the runs below `sweep_dir` (the id recomputed from each run's config)."""
    from arca_lab.analysis.verify import find_runs
    from arca_lab.config import RunConfig
    from arca_lab.sweep.grid import AXES, axis_values_of, run_id

    extra = [a for a in sweep_axes(cube) if a not in AXES]
    out = {}
    for d in find_runs(sweep_dir):
        cfg = RunConfig.from_json((d / "config.json").read_text())
        out[run_id(axis_values_of(cfg, extra))] = d
    return out


PARALLEL_VERIFY_MIN = 16
"""Fewer runs than this are verified in the calling process (two worker processes cost ~6 s to start)."""


def bounds_table(
    sweep_dir: str | Path, cube: xr.Dataset, prompts: int = 8, samples: int = 1, processes: int | None = None
):
    """Per run: held-out max KL (both directions, τ = 1), the a-posteriori and the a-priori bound, and the lemma.

    prompts > 0: `arca_lab.analysis.verify.verify_run` on `prompts` held-out prompts. Columns: `aposteriori_<d>` the ball
    bound K(R·D(ΔW)) (head-only runs, every prompt; NaN otherwise), `apriori_<d>` (head-only), `lemma_max_k_range`
    = max_t K(range(z_t)) over the measured tokens (a lemma on the measured shift itself, not a verified bound:
    `arca_lab.analysis.verify.KINDS`), and the verdicts `bounds_hold`, `lemmas_hold`, `inputs_hold` (rows of that kind;
    NaN fails). prompts = 0: only the a-priori bound (no generation). Returns (DataFrame, list of BoundRow).

    `processes` (default: the available cores, at most 2) verify runs in parallel, one torch thread each, when
    there are `PARALLEL_VERIFY_MIN` or more: each run gets the same measurement (its own seed, one thread).
    """
    from arca_lab.sweep.cost import available_cpus

    dirs = run_dirs_by_id(sweep_dir, cube)
    jobs = []
    for p in _points(cube):
        rid = p["run_id"].item()
        if rid in dirs:
            axes = {a: p[a].item() for a in sweep_axes(cube)} | {"run_id": rid}
            jobs.append((axes, dirs[rid], prompts, samples))
    processes = min(2, available_cpus()) if processes is None else processes
    if prompts > 0 and processes > 1 and len(jobs) >= PARALLEL_VERIFY_MIN:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(
            processes, mp_context=get_context("spawn"), initializer=_one_thread
        ) as pool:  # spawn: torch is imported
            results = list(pool.map(_bounds_row, jobs, chunksize=max(1, len(jobs) // (4 * processes))))
    else:
        results = [_bounds_row(job) for job in jobs]
    return pd.DataFrame([row for row, _ in results]), [r for _, rows in results for r in rows]


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _bounds_row(job: tuple[dict[str, Any], Path, int, int]) -> tuple[dict[str, Any], list]:
    """One run's row of `bounds_table` and its BoundRows (none without prompts)."""
    from arca_lab.analysis.verify import verify_run
    from theory.softmax_kl import kl_sharp_bound

    axes, run_dir, prompts, samples = job
    row = dict(axes)
    if prompts <= 0:
        return row | _apriori_only(run_dir), []
    v = verify_run(run_dir, name=axes["run_id"], prompts=prompts, samples=samples)
    m = v.measurement
    row["kind"] = m.kind
    row.update(verdicts(v.rows))
    for d in DIRECTIONS:
        row[f"heldout_{d}_max"] = _max_or_nan(m.per_tau[1.0][d])
        row[f"aposteriori_{d}"] = _row_value(v.rows, "K(R D(dW)/tau) ball (P3)", d, math.nan)
        row[f"apriori_{d}"] = _row_value(v.rows, "a-priori K(rho) (A6/A7)", d, math.nan)
    row["lemma_max_k_range"] = _max_or_nan(kl_sharp_bound(m.shift_range))
    return row, list(v.rows)


def verdicts(rows) -> dict[str, bool]:
    """`<kind>s_hold` per kind of `arca_lab.analysis.verify.KINDS` (bounds_hold, lemmas_hold, inputs_hold): no checked row
    of that kind failed (`BoundRow.failed`: a NaN measured value or bound is a failure, never "holds")."""
    from arca_lab.analysis.verify import KINDS

    return {f"{kind}s_hold": not any(r.failed for r in rows if r.kind == kind) for kind in KINDS}


def _max_or_nan(values: Any) -> float:
    """The largest value; NaN when there is none or any is NaN (never a 0 that a bound trivially holds)."""
    values = np.asarray(values, float)
    return float(np.max(values)) if values.size else math.nan


def _row_value(rows, bound: str, direction_key: str, default: float) -> float:
    from arca_lab.analysis.verify import KL_DIRECTIONS

    for r in rows:
        if r.bound == bound and r.direction == KL_DIRECTIONS[direction_key] and r.tau == 1.0:
            return r.bound_value
    return default


def _apriori_only(run_dir: Path) -> dict[str, Any]:
    """The a-priori bound of a head-only run without generating anything (R from one probe forward)."""
    from arca_lab.analysis.heldout_kl import input_radius
    from arca_lab.analysis.verify import _dir, apriori_inputs
    from arca_lab.config import RunConfig
    from arca_lab.models import lm_head_module_name, load_policy
    from arca_lab.results import load_run
    from theory.apriori import apriori_kl_bound

    cfg = RunConfig.from_json((run_dir / "config.json").read_text())
    out: dict[str, Any] = {"kind": "head-only" if cfg.target_modules == "lm_head" else "backbone"}
    if out["kind"] != "head-only":
        return out | {f"apriori_{d}": math.nan for d in DIRECTIONS}
    model, tokenizer = load_policy(cfg)
    R, _ = input_radius(model, tokenizer)
    if R is None:
        return out | {f"apriori_{d}": math.nan for d in DIRECTIONS}
    bound = apriori_kl_bound(apriori_inputs(load_run(run_dir), lm_head_module_name(model), R, 1.0))
    return out | {f"apriori_{d}": bound["kl_" + _dir(d)] for d in DIRECTIONS}


# ---------------------------------------------------------------------------------------------- credit regimes
def credit_regimes(cube: xr.Dataset, tol: float = 0.1) -> pd.DataFrame:
    """Per run, from its last batch: the predicted regime of each completion (`predict_regime` on the range of
    its raw scores, with the run's ε and sharpening p), the predicted Gini / ETR / EffN intervals (means over
    completions) and the fraction of completions whose measured Gini and ETR lie inside them (a theorem: 1)."""
    from theory.credit_degeneracy import etr, gini, predict_regime

    out = []
    for p in _points(cube):
        if "scores" not in p or "weights" not in p:
            continue
        eps, power = float(_coord(p, "credit_eps", 1e-8)), float(_coord(p, "sharpening", 1.0))
        mask = p["completion_mask"].values == 1
        regimes, g_hi, e_lo, n_lo, inside, g_meas, e_meas, n_meas = [], [], [], [], [], [], [], []
        for scores, weights, m in zip(p["scores"].values, p["weights"].values, mask, strict=True):
            T = int(m.sum())
            if T < 2:
                continue
            a = np.clip(scores[m], 0.0, None)
            pred = predict_regime(float(a.min()), float(a.max()), T, eps, power, tol=tol)
            g, e = float(gini(weights[m])), float(etr(weights[m]))
            regimes.append(pred["regime"])
            g_hi.append(pred["gini"][1])
            e_lo.append(pred["etr"][0])
            n_lo.append(pred["etr"][0] * T)
            g_meas.append(g)
            e_meas.append(e)
            n_meas.append(e * T)  # EffN = T·ETR
            inside.append(g <= pred["gini"][1] + 1e-5 and e >= pred["etr"][0] - 1e-5)  # float32 weights
        if not regimes:
            continue
        row = {a: p[a].item() for a in sweep_axes(cube)} | {"run_id": p["run_id"].item()}
        row.update(
            regime=Counter(regimes).most_common(1)[0][0],
            regimes=dict(Counter(regimes)),
            gini_last_batch=float(np.mean(g_meas)),
            etr_last_batch=float(np.mean(e_meas)),
            effn_last_batch=float(np.mean(n_meas)),
            gini_pred_hi=float(np.mean(g_hi)),
            etr_pred_lo=float(np.mean(e_lo)),
            effn_pred_lo=float(np.mean(n_lo)),
            inside_fraction=float(np.mean(inside)),
        )
        out.append(row)
    return pd.DataFrame(out)


REGIME_SPLIT = {"output_gini_min": 0.6, "arca_gini": (0.2, 0.6)}
"""The ARCA paper's regime split, as decided before the embedded runs (issue 4): every output-distribution credit
(surprisal, entropy reduction, divergence) at Gini >= 0.6, and ARCA's Gini in [0.2, 0.6], at sharpening 2."""
OUTPUT_DISTRIBUTION_CREDITS = ("surprisal", "entropy_reduction", "divergence")


def regime_split(points: pd.DataFrame) -> pd.DataFrame:
    """Does the ARCA paper's regime split (`REGIME_SPLIT`) hold? One row per credit and (arm, alpha_rule, rank)
    group that has ARCA and all three output-distribution credits: last-steps mean Gini, ETR and format mass,
    averaged over seeds (`seeds` = how many), the criterion the credit must meet and whether it does (`meets`).

    A group "holds" when every row of it meets its criterion; a NaN Gini fails. Uniform rows, if present, are
    listed for reference with an empty criterion.
    """
    need = {"arca", *OUTPUT_DISTRIBUTION_CREDITS}
    keys = ["arm", "alpha_rule", "rank"]
    if points.empty or not need <= set(points["credit"]):
        return pd.DataFrame()
    lo, hi = REGIME_SPLIT["arca_gini"]
    out = []
    for key, group in points.groupby(keys):
        if not need <= set(group["credit"]):
            continue
        for credit, runs in group.groupby("credit"):
            gini = float(runs["gini"].mean())
            if credit == "arca":
                criterion, meets = f"in [{lo}, {hi}]", lo <= gini <= hi
            elif credit in OUTPUT_DISTRIBUTION_CREDITS:
                criterion, meets = (
                    f">= {REGIME_SPLIT['output_gini_min']}",
                    gini >= REGIME_SPLIT["output_gini_min"],
                )
            else:
                criterion, meets = "", None
            ref = ARCA_TABLE3.get((credit, 64 if credit != "arca" else int(key[2])), (math.nan, math.nan))
            out.append(
                dict(zip(keys, key, strict=True))
                | dict(
                    credit=credit,
                    seeds=len(runs),
                    gini=gini,
                    etr=float(runs["etr"].mean()),
                    format_mass=float(runs["format_mass"].mean()),
                    criterion=criterion,
                    meets=meets,
                    paper_gini=ref[0],
                    paper_etr=ref[1],
                )
            )
    return pd.DataFrame(out)


def regime_split_verdict(split: pd.DataFrame) -> str:
    """One line per (arm, alpha_rule, rank) group of `regime_split`: holds / does not hold, and which credits miss."""
    if split.empty:
        return "regime split: no group with ARCA and all three output-distribution credits"
    lines = []
    for key, group in split.groupby(["arm", "alpha_rule", "rank"]):
        judged = group[group["criterion"] != ""]
        misses = [
            f"{r.credit} (Gini {r.gini:.3f}, needs {r.criterion})" for r in judged.itertuples() if not r.meets
        ]
        seeds = int(judged["seeds"].min())
        head = f"regime split, arm {key[0]}, alpha {key[1]}, rank {key[2]} ({seeds} seed{'s' * (seeds != 1)}"
        head += ": anecdotal)" if seeds < 3 else ")"
        lines.append(f"{head}: " + ("HOLDS" if not misses else "DOES NOT HOLD: " + "; ".join(misses)))
    return "\n".join(lines)


def table3_reference(credit: str) -> list[tuple[int, float, float]]:
    """(rank, Gini, ETR) reference markers of ARCA paper Table 3 for one credit (empty if it has none)."""
    return sorted((r, g, e) for (c, r), (g, e) in ARCA_TABLE3.items() if c == credit)


# ---------------------------------------------------------------------------------------------- curves, β, figures
def step_curves(cube: xr.Dataset, var: str) -> pd.DataFrame:
    """Long table (axes..., run_id, step, value) of one per-step variable for every run that logged it."""
    if var not in cube:
        return pd.DataFrame()
    rows = []
    for p in _points(cube):
        head = {a: p[a].item() for a in sweep_axes(cube)} | {"run_id": p["run_id"].item()}
        for step, value in zip(p["step"].values, p[var].values, strict=True):
            if not np.isnan(value):
                rows.append(head | {"step": int(step), "value": float(value)})
    return pd.DataFrame(rows)


def curve_means(cube: xr.Dataset, var: str, by: Sequence[str] = ("credit", "arm")) -> pd.DataFrame:
    """Mean, standard error and run count of a per-step variable per (`by`..., step), over the other axes; the
    reward figure draws one line per group instead of one per run (a full sweep has 300)."""
    curves = step_curves(cube, var)
    if curves.empty:
        return curves
    g = curves.groupby([*by, "step"])["value"]
    return g.agg(mean="mean", sem="sem", n="count").reset_index()


def accuracy_by_rank(points: pd.DataFrame, by: Sequence[str] = ("credit", "arm")) -> pd.DataFrame:
    """Greedy accuracy and pass@k before/after, averaged per (`by`..., rank) over the other axes (seeds,
    alpha rules, ...), with the run count `n`."""
    cols = ["acc_before", "acc_after", "pass_before", "pass_after"]
    g = points.groupby([*by, "rank"])
    return g[cols].mean().join(g.size().rename("n")).reset_index()


def beta_table(points: pd.DataFrame) -> pd.DataFrame | None:
    """Accuracy, reward and step time per (β, rank, arm) when the sweep has runs at β = 0 and at β > 0, else None."""
    if "beta" not in points or not ((points["beta"] == 0).any() and (points["beta"] > 0).any()):
        return None
    cols = ["acc_before", "acc_after", "pass_after", "reward", "step_time"]
    return points.groupby(["beta", "rank", "arm"])[cols].mean().reset_index()


def config_values(cube: xr.Dataset, name: str) -> list[Any]:
    """The distinct values of config field `name` over the sweep's runs (e.g. [4] for pass_k), [] if absent.

    A value shared by every run is a scalar coordinate of the cube; one that varies is a coordinate over the
    grid axes (NaN or "" where a grid point has no run, so only points with a run count)."""
    if name not in cube.coords:
        return []
    values = cube.coords[name].values
    if values.ndim:
        values = values[cube["has_run"].values == 1]
    return sorted({v.item() if hasattr(v, "item") else v for v in np.ravel(values)})


def save_figure(fig: Any, figures_dir: str | Path, name: str) -> list[Path]:
    """Save a matplotlib figure as `name`.png and `name`.svg in `figures_dir` (created); returns both paths."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return paths
