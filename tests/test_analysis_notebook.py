"""arca_lab.analysis on a tiny sweep, and notebooks/rank_sweep_analysis.ipynb executed on it under papermill.

The sweep (`build_tiny_sweep` of tests/test_verify.py, built once per session): head-only LoRA at ranks 1 and 2
(uniform credit), all-linear LoRA at rank 2 (arca credit, temperature 0.7); 2 steps each, no beta > 0 runs.
Path parameters (arca_lab.paths): a relative sweep_dir means the same directory below the repository root under
papermill (kernel in the caller's directory) and nbconvert / JupyterLab (kernel in notebooks/); a missing sweep
stops the notebook with one line that names the command to run.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_verify import ALL, HEAD, SWEEP_RUNS, build_tiny_sweep

from arca_lab import analysis
from arca_lab.analysis import tables
from arca_lab.paths import REPO_ROOT, MissingSweep, existing_sweep, resolve
from arca_lab.results import load_run
from arca_lab.sweep import load_sweep
from theory.credit_degeneracy import REGIMES

pm = pytest.importorskip("papermill")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "rank_sweep_analysis.ipynb"
FIGURES = ("kl_vs_rank", "credit_concentration", "format_mass", "reward_accuracy", "reward_kl_frontier")
R1_HEAD = "r1-uniform-s0-head-a2r"


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_sweep(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def cube(sweep):
    return load_sweep(sweep)


@pytest.fixture(scope="module")
def points(cube) -> pd.DataFrame:
    return analysis.run_points(cube, last_steps=3).set_index("run_id")


def test_run_points_are_the_runs_own_numbers(sweep, points):
    assert set(points.index) == set(SWEEP_RUNS)
    for rid in SWEEP_RUNS:
        ds = load_run(sweep / "runs" / rid)
        row = points.loc[rid]
        # 2 logged steps, last_steps = 3: the mean over both
        assert row["kl_ref_policy_mean"] == pytest.approx(float(ds["kl_ref_policy_mean"].mean()), rel=1e-12)
        assert row["kl_policy_ref_max"] == pytest.approx(float(ds["kl_policy_ref_max"].max()), rel=1e-12)
        assert row["acc_after"] == float(ds["greedy_accuracy_after"])
        assert row["clip_regime"] == "inactive"  # AdamW: the step does not depend on the gradient scale
    assert points.loc[ALL, "arm"] == "all" and points.loc[HEAD, "rank"] == 2


def test_gamma_fit_of_two_ranks_is_the_log_slope(sweep, points):
    gamma = analysis.gamma_table(points.reset_index())
    assert set(gamma["arm"]) == {"head"}  # the all-linear arm has one rank: no fit
    for d in analysis.DIRECTIONS:
        row = gamma[gamma.direction == d].iloc[0]
        kl1, kl2 = points.loc[R1_HEAD, f"{d}_mean"], points.loc[HEAD, f"{d}_mean"]
        assert row.gamma_fit == pytest.approx(math.log(kl2 / kl1) / math.log(2), rel=1e-9)
        assert math.isnan(row.lo) and math.isnan(row.hi)  # one seed: resampling cannot give an interval
        assert row.note == "one seed: no confidence interval" and row.n_seeds == 1
        assert row.gamma_pred == 1.0  # AdamW, s = alpha/r with alpha = 2r: theory/rank_scaling.md §3.4 table
    # The hyper-parameter part of the regime, by hand: Σ lr over the recorded steps, d = head input width, r_max 2
    ds = load_run(sweep / "runs" / HEAD)
    eta_t = float(ds["learning_rate"].sum())
    assert points.loc[HEAD, "eta_T"] == pytest.approx(eta_t) and points.loc[HEAD, "d_model"] == float(
        ds["d_model"]
    )
    d = float(ds["d_model"])
    reach = max(points.loc[[R1_HEAD, HEAD], "eta_T"]) * math.sqrt(3 * d * 2)
    expected = [f"r_max/d (r << d): {2 / d:.4g} <= 0.125"] if 2 / d > 0.125 else []
    expected += [f"eta*T*sqrt(3 d r_max): {reach:.4g} <= 0.1"] if reach > 0.1 else []
    assert reach > 0.1  # lr 5e-2 over 2 steps: far outside the small-step regime
    assert set(gamma["regime_check"]) == {"; ".join(expected)}


def test_predicted_line_has_slope_gamma_through_the_geometric_mean():
    r, v = [1.0, 4.0], [2.0, 8.0]
    line = analysis.predicted_line(r, v, gamma=0.5)
    assert line[1] / line[0] == pytest.approx(4.0**0.5)
    assert np.exp(np.mean(np.log(line))) == pytest.approx(np.exp(np.mean(np.log(v))))


def test_clip_regime_from_grad_norms():
    import xarray as xr

    def point(optimizer, norms, clip=1.0):
        return xr.Dataset(
            {"grad_norm": ("step", np.array(norms))}, coords={"optimizer": optimizer, "grad_clip": clip}
        )

    assert analysis.clip_regime(point("sgd", [2.0, 3.0])) == "active"
    assert analysis.clip_regime(point("sgd", [0.5, 2.0])) == "mixed"
    assert analysis.clip_regime(point("sgd", [0.5, 0.9])) == "inactive"
    assert analysis.clip_regime(point("sgd", [5.0], clip=math.nan)) == "inactive"  # no clipping
    assert analysis.clip_regime(point("adamw", [5.0])) == "inactive"


def test_credit_regimes_contain_the_measured_concentration(cube):
    reg = analysis.credit_regimes(cube).set_index("run_id")
    for rid in (R1_HEAD, HEAD):  # uniform credit: zero scores fall back to exactly uniform weights
        assert reg.loc[rid, "regime"] == "fallback-uniform"
        assert reg.loc[rid, "gini_pred_hi"] == 0.0 and reg.loc[rid, "etr_pred_lo"] == 1.0
    assert reg.loc[ALL, "regime"] in REGIMES and reg.loc[ALL, "gini_pred_hi"] > 0
    assert (reg["inside_fraction"] == 1.0).all()  # a theorem (credit_degeneracy.md §2)
    assert (reg["gini_last_batch"] <= reg["gini_pred_hi"] + 1e-5).all()


def test_bounds_table_with_and_without_generation(sweep, cube):
    full, rows = analysis.bounds_table(sweep, cube, prompts=2)
    cheap, no_rows = analysis.bounds_table(sweep, cube, prompts=0)
    assert rows and not no_rows
    assert full[["bounds_hold", "lemmas_hold", "inputs_hold"]].all().all()
    full, cheap = full.set_index("run_id"), cheap.set_index("run_id")
    heads = [R1_HEAD, HEAD]
    for d in analysis.DIRECTIONS:
        # the a-priori bound needs no generation: both paths give the same number
        for rid in heads:
            assert cheap.loc[rid, f"apriori_{d}"] == pytest.approx(full.loc[rid, f"apriori_{d}"], rel=1e-12)
        assert math.isnan(cheap.loc[ALL, f"apriori_{d}"]) and math.isnan(full.loc[ALL, f"apriori_{d}"])
        # the ball bound is head-only; the all-linear run has only the lemma, which is not shown as a bound
        assert (full.loc[heads, f"heldout_{d}_max"] <= full.loc[heads, f"aposteriori_{d}"]).all()
        assert math.isnan(full.loc[ALL, f"aposteriori_{d}"])
        assert (full[f"heldout_{d}_max"] <= full["lemma_max_k_range"]).all()
        assert (full.loc[heads, f"aposteriori_{d}"] <= full.loc[heads, f"apriori_{d}"]).all()
    # the lemma's range is that of the measured tokens, the ball's the largest over ||x|| <= R
    assert (full.loc[heads, "lemma_max_k_range"] <= full.loc[heads, "aposteriori_kl_ref_policy"]).all()


def test_verdicts_count_nan_as_a_failure_and_lemmas_apart():
    from arca_lab.analysis.verify import BoundRow

    ball = BoundRow("r", "bound", "K(R D(dW)/tau) ball (P3)", "d", 1.0, 0.1, 1.0, True)
    lemma = BoundRow("r", "lemma", "K(range(dW x_t)/tau) (L3)", "d", 1.0, 0.1, 0.2, True)
    na = BoundRow("r", "bound", "a-priori (A6/A7)", "-", None, math.nan, math.nan, None)  # not applicable
    assert analysis.verdicts([ball, lemma, na]) == dict(bounds_hold=True, lemmas_hold=True, inputs_hold=True)
    for nan_ball in (replace(ball, bound_value=math.nan), replace(ball, measured=math.nan, holds=False)):
        assert analysis.verdicts([nan_ball, lemma])["bounds_hold"] is False
    v = analysis.verdicts([ball, replace(lemma, measured=math.nan)])
    assert v["lemmas_hold"] is False and v["bounds_hold"] is True  # a failed lemma is not a violated bound
    # the held-out max: NaN when nothing was measured or a value is NaN, never a 0 a bound trivially holds
    assert math.isnan(tables._max_or_nan([])) and math.isnan(tables._max_or_nan([0.1, math.nan]))
    assert tables._max_or_nan([0.1, 0.3]) == 0.3


def test_kl_panels_draw_credits_with_two_ranks_only():
    # panel (all, 2r): uniform at ranks 1 and 4, arca at rank 4 only -> arca is a point, not a curve
    kl = pd.DataFrame(
        dict(
            arm=["all"] * 4,
            alpha_rule=["2r"] * 4,
            credit=["uniform", "uniform", "uniform", "arca"],
            seed=[0, 1, 0, 0],
            rank=[1, 1, 4, 4],
            kl_ref_policy_mean=[0.1, 0.3, 0.8, 0.5],
        )
    )
    gamma = pd.DataFrame(
        dict(
            arm=["all"], alpha_rule=["2r"], credit=["uniform"], direction=["kl_ref_policy"], gamma_pred=[1.0]
        )
    )
    panels = analysis.kl_rank_panels(kl, gamma)
    assert list(panels) == [("all", "2r")] and list(panels[("all", "2r")]) == ["uniform"]
    m = panels[("all", "2r")]["uniform"]
    assert m.loc[1, "kl_ref_policy_mean"] == pytest.approx(0.2)  # mean over seeds 0 and 1
    # slope +1 through the geometric mean (rank 2, KL 0.4): 0.2 at rank 1, 0.8 at rank 4
    assert m["predicted"].tolist() == pytest.approx([0.2, 0.8])


def test_kl_panels_keep_beta_arms_apart():
    # a merl sweep: beta 0 and beta 0.05 at ranks 1 and 4; their KLs must not be averaged into one line
    kl = pd.DataFrame(
        dict(
            arm=["all"] * 4,
            alpha_rule=["r"] * 4,
            credit=["uniform"] * 4,
            beta=[0.0, 0.0, 0.05, 0.05],
            rank=[1, 4, 1, 4],
            kl_ref_policy_mean=[0.1, 0.4, 0.01, 0.02],
        )
    )
    gamma = pd.DataFrame(
        dict(
            arm=["all"] * 2,
            alpha_rule=["r"] * 2,
            credit=["uniform"] * 2,
            beta=[0.0, 0.05],
            direction=["kl_ref_policy"] * 2,
            gamma_pred=[1.0, math.nan],
            n_seeds=[3, 3],
            gamma_fit=[1.0, 0.5],
            lo=[0.9, 0.4],
            hi=[1.1, 0.6],
        )
    )
    series = ["credit", "beta"]
    lines = analysis.kl_rank_panels(kl, gamma, series)[("all", "r")]
    assert sorted(lines) == ["uniform, beta=0.0", "uniform, beta=0.05"]
    assert lines["uniform, beta=0.05"]["kl_ref_policy_mean"].tolist() == [0.01, 0.02]
    assert lines["uniform, beta=0.0"].attrs["gamma_pred"] == 1.0
    assert lines["uniform, beta=0.05"]["predicted"].isna().all()  # no prediction for this line
    caption = analysis.gamma_caption(gamma, "all", "r", series_by=series, labels=["uniform, beta=0.05"])
    assert caption == "uniform, beta=0.05: fit +0.50 [+0.40, +0.60] over 3 seed(s), pred +nan"


def test_curve_and_accuracy_means_average_over_the_other_axes(cube, points):
    assert analysis.series_axes(cube) == ["credit"]  # no extra axis (beta) in the tiny sweep
    curves = analysis.curve_means(cube, "reward", by=("arm",))
    head = curves[curves.arm == "head"].set_index("step")
    raw = analysis.step_curves(cube, "reward")
    for step, row in head.iterrows():
        values = raw[(raw.arm == "head") & (raw.step == step)]["value"]
        assert row["n"] == 2 and row["mean"] == pytest.approx(values.mean(), rel=1e-12)  # ranks 1 and 2
    acc = analysis.accuracy_by_rank(points.reset_index(), by=("arm",)).set_index(["arm", "rank"])
    assert acc.loc[("head", 1), "n"] == 1 and acc.loc[("all", 2), "acc_after"] == points.loc[ALL, "acc_after"]


def test_beta_table_needs_both_beta_arms(points):
    assert analysis.beta_table(points.reset_index()) is None  # the tiny sweep has beta = 0 only
    df = pd.DataFrame(
        dict(
            beta=[0.0, 0.05, 0.05],
            rank=[4, 4, 4],
            arm=["all"] * 3,
            acc_before=[0.1] * 3,
            acc_after=[0.2, 0.3, 0.5],
            pass_after=[0.4] * 3,
            reward=[0.5] * 3,
            step_time=[1.0, 2.0, 4.0],
        )
    )
    table = analysis.beta_table(df).set_index("beta")
    assert table.loc[0.05, "acc_after"] == pytest.approx(0.4) and table.loc[0.05, "step_time"] == 3.0


def test_regime_split_judges_each_credit_against_its_pre_registered_window():
    def pts(ginis: dict[str, float], rank: int = 8, seeds: int = 1) -> pd.DataFrame:
        rows = [
            dict(
                arm="all",
                alpha_rule="2r",
                rank=rank,
                credit=c,
                seed=s,
                gini=g + 0.01 * s,
                etr=0.5,
                format_mass=0.7,
            )
            for c, g in ginis.items()
            for s in range(seeds)
        ]
        return pd.DataFrame(rows)

    paper_like = dict(uniform=0.0, surprisal=0.94, entropy_reduction=0.92, divergence=0.94, arca=0.39)
    split = analysis.regime_split(pts(paper_like, rank=16, seeds=2))
    # two seeds: Gini 0.39 and 0.40 -> mean 0.395, inside [0.2, 0.6]; uniform is listed, not judged
    arca = split[split.credit == "arca"].iloc[0]
    assert arca.gini == pytest.approx(0.395) and arca.meets and arca.seeds == 2
    assert (arca.paper_gini, arca.paper_etr) == (0.388, 0.460)  # Table 3, ARCA at r 16
    assert split[split.credit == "uniform"].iloc[0].criterion == ""
    verdict = analysis.regime_split_verdict(split)
    assert "HOLDS" in verdict and "anecdotal" in verdict
    # the embedded model's ARCA (0.674) is above the window; a NaN output credit fails too
    miss = analysis.regime_split_verdict(
        analysis.regime_split(pts(paper_like | dict(arca=0.674, divergence=math.nan)))
    )
    assert "DOES NOT HOLD" in miss and "arca (Gini 0.674" in miss and "divergence (Gini nan" in miss
    assert "surprisal" not in miss
    # a boundary output credit (0.6) meets ">= 0.6"; 0.59 does not
    assert "HOLDS" in analysis.regime_split_verdict(
        analysis.regime_split(pts(paper_like | dict(surprisal=0.6)))
    )
    assert "surprisal" in analysis.regime_split_verdict(
        analysis.regime_split(pts(paper_like | dict(surprisal=0.59)))
    )
    # without ARCA or an output credit there is nothing to judge
    assert analysis.regime_split(pts(dict(uniform=0.0, arca=0.4))).empty


def test_table3_reference_and_save_figure(tmp_path):
    assert analysis.table3_reference("arca") == [(4, 0.353, 0.467), (16, 0.388, 0.460), (64, 0.490, 0.334)]
    assert analysis.table3_reference("surprisal") == [(64, 0.941, 0.052)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    paths = analysis.save_figure(fig, tmp_path / "f", "x")
    assert [p.name for p in paths] == ["x.png", "x.svg"] and all(p.stat().st_size > 1000 for p in paths)
    plt.close(fig)


def test_notebook_runs_on_the_tiny_sweep(sweep, tmp_path):
    figs = tmp_path / "figs"
    # relative to the repository root, and the kernel started elsewhere: the paths still mean the same
    out = pm.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={
            "sweep_dir": os.path.relpath(sweep, REPO_ROOT),
            "figures_dir": os.path.relpath(figs, REPO_ROOT),
            "verify_prompts": 2,
        },
        kernel_name="python3",
        cwd=str(tmp_path),
        progress_bar=False,
    )
    for name in FIGURES:
        assert (figs / f"{name}.png").stat().st_size > 5_000, name  # a real plot, not an empty canvas
        assert (figs / f"{name}.svg").is_file()
    printed = "".join(
        "".join(o.get("text", "")) for c in out["cells"] if c["cell_type"] == "code" for o in c["outputs"]
    )
    assert f"python: {sys.executable}" in printed
    assert f"sweep: {sweep.resolve()}; figures: {figs.resolve()}" in printed
    # the lemma checks are counted apart from the bounds (2 head-only runs, 1 all-linear at 2 temperatures)
    assert "10 bound checks (ball, a-priori, credit link), 16 lemma checks" in printed
    assert "2 input checks (lr schedule); 0 violated: all hold" in printed
    assert "beta figure skipped" in printed  # the sweep has no beta > 0 runs
    assert "lie in the predicted interval: 1.000" in printed


# ---------------------------------------------------------------------------------------------- paths
def test_relative_paths_are_read_from_the_repository_root(tmp_path, monkeypatch):
    assert (REPO_ROOT / "notebooks" / NOTEBOOK.name).is_file() and (REPO_ROOT / "pyproject.toml").is_file()
    for cwd in (tmp_path, REPO_ROOT / "notebooks"):  # papermill's kernel, JupyterLab's and nbconvert's
        monkeypatch.chdir(cwd)
        assert resolve("sweeps/default") == REPO_ROOT / "sweeps" / "default"
    assert resolve(tmp_path / "s") == tmp_path / "s"  # absolute, as arca-lab sweep passes it: unchanged
    assert resolve("~/s") == Path.home() / "s"
    assert resolve("s", root=tmp_path) == tmp_path / "s"


def test_a_missing_sweep_says_what_to_run(tmp_path):
    with pytest.raises(MissingSweep) as err:
        existing_sweep("sweeps/none", root=tmp_path)
    assert str(err.value) == (
        f"no sweep.nc in {tmp_path / 'sweeps/none'} (sweep_dir = 'sweeps/none'): "
        f"run `arca-lab sweep --out sweeps/none` in {tmp_path} first"
    )
    assert err.value._render_traceback_() == [f"MissingSweep: {err.value}"]  # what Jupyter shows: one line
    started = tmp_path / "sweeps" / "started"  # runs written, sweep.nc not combined yet
    started.mkdir(parents=True)
    (started / "sweep.json").write_text("{}")
    with pytest.raises(MissingSweep, match=r"not combined yet: run `arca-lab report sweeps/started` in "):
        existing_sweep("sweeps/started", root=tmp_path)
    with pytest.raises(MissingSweep, match=r"run `arca-lab sweep --out /\S+/elsewhere` first$"):
        existing_sweep(tmp_path / "elsewhere", root=tmp_path / "sweeps")  # not below the root: absolute
    (started / "sweep.nc").write_bytes(b"")
    assert existing_sweep("sweeps/started", root=tmp_path) == started


def _with_sweep_dir(value: str):
    """The committed notebook with `sweep_dir = value` injected after its parameters cell (as papermill does)."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f"sweep_dir = {value!r}"))
    return nb


def test_a_missing_sweep_stops_the_notebook_with_one_line_under_papermill_and_nbconvert(tmp_path):
    from nbclient.exceptions import CellExecutionError
    from nbconvert.preprocessors import ExecutePreprocessor

    missing = "sweeps/no-such-sweep-for-this-test"
    expected = f"no sweep.nc in {REPO_ROOT / missing} (sweep_dir = '{missing}'): run `arca-lab sweep --out {missing}`"
    # papermill started from another directory
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(
            str(NOTEBOOK),
            str(tmp_path / "executed.ipynb"),
            parameters={"sweep_dir": missing},
            kernel_name="python3",
            cwd=str(tmp_path),
            progress_bar=False,
        )
    assert err.value.ename == "MissingSweep" and err.value.evalue.startswith(expected)
    assert len(err.value.traceback) == 1  # one line, not a stack ending in h5py
    # nbconvert --execute: the kernel starts in the notebook's own directory (resources metadata path)
    with pytest.raises(CellExecutionError) as err:
        ExecutePreprocessor(kernel_name="python3", timeout=120).preprocess(
            _with_sweep_dir(missing), {"metadata": {"path": str(NOTEBOOK.parent)}}
        )
    assert err.value.ename == "MissingSweep" and err.value.evalue.startswith(expected)
    assert str(err.value).rstrip().endswith(f"MissingSweep: {err.value.evalue}")


def test_bounds_table_on_two_processes_equals_one(sweep, cube, monkeypatch):
    """The analysis verifies a large sweep's runs on two processes: same rows, same numbers as one process."""
    import torch

    from arca_lab.analysis.verify import row_dict

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker process
    try:
        serial, serial_rows = analysis.bounds_table(sweep, cube, prompts=2, processes=1)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(tables, "PARALLEL_VERIFY_MIN", 1)
    parallel, parallel_rows = analysis.bounds_table(sweep, cube, prompts=2, processes=2)
    pd.testing.assert_frame_equal(parallel, serial)
    assert len(parallel_rows) == len(serial_rows) > 0
    pd.testing.assert_frame_equal(
        pd.DataFrame(map(row_dict, parallel_rows)), pd.DataFrame(map(row_dict, serial_rows))
    )
