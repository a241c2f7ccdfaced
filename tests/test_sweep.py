"""`arca-lab sweep` / `report`: grids, bad input, the cube, resume, failures, atomic writes, submitit, report.

Runs use the tiny random Qwen3 of conftest (`tiny_model_dir`) and TINY settings; a notebook execution costs a
kernel start (a few seconds), so the integration tests share one small sweep (`tiny_sweep`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import numpy as np
import pytest
import xarray as xr

from arca_lab.config import make_config
from arca_lab.results import load_run, write_netcdf
from arca_lab.run import train
from arca_lab.sweep import EX_USAGE, combine_runs, combine_sweep, load_sweep, main, report_main, run_sweep
from arca_lab.sweep import cost as sweep_cost
from arca_lab.sweep import cube as sweep_cube
from arca_lab.sweep import execute as sweep_exec
from arca_lab.sweep import progress as sweep_progress
from arca_lab.sweep import runner as sweep_runner
from arca_lab.sweep.clock import CLOCK_ENV, FirstStep, read_first_step, step_clock
from arca_lab.sweep.cost import ARM_FACTOR, COST, CREDIT_FACTOR, estimate_run_seconds, estimate_seconds
from arca_lab.sweep.cube import load_runs
from arca_lab.sweep.grid import FIXED_ALPHA, axis_values_of, make_grid, run_id

TINY = dict(
    steps=2, prompts_per_step=2, num_generations=2, max_completion_length=12, eval_prompts=4, pass_k=2
)
ONE_POINT = dict(rank=[1], credit=["uniform"], seed=[0], arm=["all"], alpha_rule=["2r"])


def _tiny_args(model_dir: Path) -> list[str]:
    return ["--set", f"model={model_dir}", *(f"{k}={v}" for k, v in TINY.items())]


# ------------------------------------------------------------------------------------------------ grids
def test_default_grid_is_the_union_of_two_questions():
    grid = make_grid("default")
    ids = [run_id(p) for p in grid.points()]
    # (a) 3 ranks x 2 alpha rules x arm all x 2 seeds = 12, + arm head x 1 seed = 6; (b) uniform, arca x seeds 0, 1
    # at r 4 = 4, of which the 2 uniform runs are already in (a); + 3 output-distribution credits: 12 + 6 + 2 + 3.
    assert len(ids) == len(set(ids)) == 23
    assert ids.count("r4-uniform-s0-all-a2r") == 1
    for credit in ("uniform", "arca"):
        assert {f"r4-{credit}-s0-all-a2r", f"r4-{credit}-s1-all-a2r"} <= set(ids)
    for rule in ("2r", "fixed"):
        assert {f"r{r}-uniform-s{s}-all-a{rule}" for r in (1, 4, 16) for s in (0, 1)} <= set(ids)
        assert {f"r{r}-uniform-s0-head-a{rule}" for r in (1, 4, 16)} <= set(ids)
    configs = [grid.config(p, "x") for p in grid.points()]
    assert {c.sharpening for c in configs} == {2.0}
    assert len({(c.steps, c.prompts_per_step, c.num_generations) for c in configs}) == 1  # matched budgets


def test_discrepancy_preset_is_the_pre_registered_grid():
    """notebooks/discrepancy_analysis.ipynb fixed the grid before any run; the preset must run exactly it."""
    grid = make_grid("discrepancy")
    configs = [grid.config(p, "x") for p in grid.points()]
    key = [(c.rollout_engine, c.rollout_noise, c.correction, c.rank, c.seed) for c in configs]
    stage_a = set(itertools.product(("fp32", "bf16", "int8"), (0.0,), ("none",), (1, 16), range(6))) | set(
        itertools.product(("noise",), (0.003, 0.01, 0.03, 0.1, 0.3), ("none",), (1, 16), range(6))
    )
    corrections = (
        "token_truncate",
        "token_mask",
        "sequence_truncate",
        "sequence_mask",
        "rejection",
        "dc_grpo",
    )
    stage_b = set(itertools.product(("noise",), (0.1, 0.3), corrections, (16,), range(3)))
    assert len(key) == len(set(key)) == 96 + 36
    assert set(key) == stage_a | stage_b
    for c in configs:
        assert (c.credit, c.target_modules, c.alpha, c.model) == ("uniform", "all-linear", "2r", "embedded")
        assert (c.steps, c.prompts_per_step, c.num_generations, c.sharpening) == (12, 16, 8, 2.0)
        assert (c.temperature, c.top_p, c.is_clip, c.band(), c.is_seq_agg) == (
            1.0,
            1.0,
            2.0,
            (0.5, 2.0),
            "mean",
        )
        assert (c.rs_estimator, c.rs_level, c.dc_target) == ("k3", "token", -1.0)  # c: the bf16 median δ
    text = "".join(
        nbformat.read(Path(__file__).parents[1] / "notebooks" / "discrepancy_analysis.ipynb", as_version=4)
        .cells[0]
        .source
    )
    assert "σ ∈ {0.003, 0.01, 0.03, 0.1, 0.3}} × rank {1, 16}\n  × seeds 0–5" in text
    assert "noise σ ∈ {0.1, 0.3}, rank 16,\n  seeds 0–2" in text


def test_each_preset_executes_its_own_analysis_notebook(tmp_path):
    assert sweep_exec.analysis_notebook(tmp_path).name == "rank_sweep_analysis.ipynb"  # no sweep.json
    for preset, name in (
        ("discrepancy", "discrepancy_analysis.ipynb"),
        ("full", "rank_sweep_analysis.ipynb"),
    ):
        (tmp_path / "sweep.json").write_text(json.dumps({"preset": preset}))
        assert sweep_exec.analysis_notebook(tmp_path).name == name
        assert sweep_exec.analysis_notebook(tmp_path).is_file()


def test_arm_and_alpha_rule_map_to_config_and_back():
    grid = make_grid("default")
    for point in grid.points():
        cfg = grid.config(point, "x")
        assert axis_values_of(cfg) == point
    fixed = [grid.config(p, "x") for p in grid.points() if p["alpha_rule"] == "fixed"]
    assert {c.lora_alpha() for c in fixed} == {float(FIXED_ALPHA)}  # the same alpha at r = 1, 4, 16
    assert {c.rank: c.adapter_scale() for c in fixed} == {1: 16.0, 4: 4.0, 16: 1.0}  # s = 16 / r
    other = make_grid("default", dict(ONE_POINT, alpha_rule=["4r", "fixed32"], rank=[2]))
    assert [(c.alpha, c.lora_alpha()) for c in (other.config(p, "x") for p in other.points())] == [
        ("4r", 8.0),  # 4 * rank 2
        ("32", 32.0),
    ]
    assert [axis_values_of(other.config(p, "x"))["alpha_rule"] for p in other.points()] == ["4r", "fixed32"]
    heads = {c.target_modules for p in grid.points() if p["arm"] == "head" for c in [grid.config(p, "x")]}
    assert heads == {"lm_head"}


def test_presets_build_their_grids():
    paper = [run_id(p) for p in make_grid("arca-paper").points()]
    assert paper == [
        "r64-uniform-s1337-all-a2r",
        "r64-surprisal-s1337-all-a2r",
        "r64-entropy_reduction-s1337-all-a2r",
        "r64-divergence-s1337-all-a2r",
        "r4-arca-s1337-all-a2r",
        "r16-arca-s1337-all-a2r",
        "r64-arca-s1337-all-a2r",
    ]
    assert (
        make_grid("arca-paper").config(make_grid("arca-paper").points()[0], "x").model
        == "Qwen/Qwen3-1.7B-Base"
    )
    merl = make_grid("merl-cpu")
    assert merl.extra_axes == ("beta",)
    assert sorted({(p["rank"], p["beta"]) for p in merl.points()}) == [
        (r, b) for r in (1, 4, 16) for b in (0.0, 0.05)
    ]
    assert {merl.config(p, "x").alpha for p in merl.points()} == {"r"}
    assert len(make_grid("full").points()) == 5 * 5 * 2 * 2 * 3


ROUND_COST = dict(
    kernel=5.0,
    notebook=10.0,
    setup=2.0,
    per_completion=0.01,
    per_eval_sequence=0.001,
    build=100.0,
    analysis=20.0,
    analysis_per_run=1.0,
    startup=3.0,
    combine=4.0,
    combine_per_run=0.5,
)
"""Round calibration constants, so that the expected seconds below are worked out by hand, not by the formula."""


@pytest.fixture
def round_costs(monkeypatch):
    for key, value in ROUND_COST.items():
        monkeypatch.setitem(COST, key, value)
    monkeypatch.setitem(CREDIT_FACTOR, "arca", 1.5)
    monkeypatch.setitem(sweep_cost.HEAD_CREDIT_FACTOR, "arca", 1.5)  # head-only credits have their own table
    monkeypatch.setitem(ARM_FACTOR, "lm_head", 0.5)
    monkeypatch.setattr(sweep_cost, "BETA_FACTOR", 2.0)
    monkeypatch.setattr(sweep_cost, "ESTIMATE_RANGE", (0.8, 1.5))
    monkeypatch.setattr(sweep_cost, "FIRST_STEP_SPREAD", (0.5, 2.0))


BASE = dict(steps=10, prompts_per_step=16, num_generations=8, eval_prompts=50, pass_k=4, threads=1)


def test_named_model_cost_by_hand(round_costs, monkeypatch):
    """A named model's runs (MODEL_COST) worked out by hand with round constants."""
    monkeypatch.setitem(
        sweep_cost.MODEL_COST,
        "smollm2-135m",
        dict(threads=2, setup=30.0, per_step=12.0, per_completion=1.5, per_eval_sequence=1.0, verify=10.0),
    )
    monkeypatch.setitem(sweep_cost.MODEL_CREDIT_FACTOR, "smollm2-135m", {"arca": 1.25})
    small = dict(steps=10, prompts_per_step=4, num_generations=6, eval_prompts=20, pass_k=0)
    u = make_config("smollm-cpu", **small, threads=2)
    a = make_config("smollm-cpu", **small, credit="arca", threads=2)
    # u: 12 s + 24 completions x 1.5 s = 48 s a step, x 10 = 480; one eval (after) of 20 prompts x 1 s = 20:
    #    notebook 10 + setup 30 + 20 + 480 = 540 s
    assert estimate_run_seconds(u) == pytest.approx(540.0)
    # a: step 48 x 1.25 = 60 s, x 10 = 600: 10 + 30 + 20 + 600 = 660 s; at 1 thread every compute part doubles
    assert estimate_run_seconds(a) == pytest.approx(660.0)
    assert estimate_run_seconds(make_config("smollm-cpu", **small, threads=1)) == pytest.approx(
        10 + 30 + 2 * 500
    )
    # the sweep [u, a] on one warm worker: the base model's eval once (20 s), verify-bound 10 s per run (2 runs),
    # startup 3 + kernel 5 + 540 + 660 + combine 4 + analysis 20 + 2 x (0.5 + 1): 20 + 20 + 1235 = 1275 s
    assert estimate_seconds([u, a], workers=1) == pytest.approx(1275.0)
    assert estimate_run_seconds(make_config(model="some/hub-model")) is None


def test_cost_model_by_hand(round_costs):
    """Seconds of a 3-run grid, worked out by hand with the round constants of ROUND_COST."""
    a = make_config(**BASE)  # credit uniform, all-linear, beta 0
    b = make_config(**BASE, credit="arca", target_modules="lm_head")
    c = make_config(**BASE, beta=0.05)
    # a: 16 x 8 = 128 completions x 0.01 s = 1.28 s per step (1 thread: speed-up 1), x 10 steps = 12.8 s;
    #    one eval (after: the base model's is measured once per kernel) x 50 prompts x (1 greedy + 4 samples)
    #    x 0.001 s = 0.25 s; 10 notebook + 2 setup + 0.25 + 12.8 = 25.05 s
    assert estimate_run_seconds(a) == pytest.approx(25.05)
    # b: step 1.28 x 1.5 (arca) x 0.5 (head only) = 0.96 s, x 10 = 9.6 s: 10 + 2 + 0.25 + 9.6 = 21.85 s
    assert estimate_run_seconds(b) == pytest.approx(21.85)
    # c: step 1.28 x 2 (beta > 0) = 2.56 s, x 10 = 25.6 s: 10 + 2 + 0.25 + 25.6 = 37.85 s
    assert estimate_run_seconds(c) == pytest.approx(37.85)
    # a with a rollout engine: two more evals (the engine's before and after): 10 + 2 + 0.75 + 12.8 = 25.55 s
    assert estimate_run_seconds(make_config(**BASE, rollout_engine="fp32")) == pytest.approx(25.55)
    # a with eval_at "3,6": two more greedy evals of 50 prompts x 0.001 s: 25.05 + 0.1 = 25.15 s
    assert estimate_run_seconds(make_config(**BASE, eval_at="3,6")) == pytest.approx(25.15)
    # [a, a, b] over 2 warm workers in order: a -> worker 1 (kernel 5 + 25.05 = 30.05), a -> worker 2 (30.05),
    # b -> the first free one, worker 1, whose kernel is warm (30.05 + 21.85 = 51.9): makespan 51.9 s. Plus build
    # 100, startup 3, combine 4, analysis 20 and, for each of the 3 runs, combine 0.5 + verify-bound 1:
    # 100 + 3 + 51.9 + 4 + 20 + 4.5 = 183.4 s
    assert estimate_seconds([a, a, b], workers=2, build_cached=False) == pytest.approx(183.4)
    # the same with a new kernel for every run (Slurm): b -> worker 1 at 30.05 + 5 + 21.85 = 56.9
    assert estimate_seconds([a, a, b], workers=2, build_cached=False, warm=False) == pytest.approx(188.4)
    # [c, a, b] over 2 workers: c -> 1 (5 + 37.85), a -> 2 (5 + 25.05), b -> 2 (30.05 + 21.85 = 51.9): makespan
    # 51.9, base model cached: 3 + 51.9 + 4 + 20 + 4.5 = 83.4 s
    assert estimate_seconds([c, a, b], workers=2) == pytest.approx(83.4)
    # a resumed sweep with only a left to run still combines and analyses all 300 runs: 3 + 30.05 + 4 + 20 + 450
    assert estimate_seconds([a], workers=2, total_runs=300) == pytest.approx(507.05)
    assert estimate_run_seconds(make_config(model="some/hub-model")) is None
    assert estimate_seconds([a, make_config(model="some/hub-model")], workers=2) is None


def test_estimate_range_and_load_by_hand(round_costs):
    # ESTIMATE_RANGE (0.8, 1.5) of 100 s; a load that would slow the sweep 2x widens the high end to 200 s
    assert sweep_cost.estimate_range(100.0) == pytest.approx((80.0, 150.0))
    assert sweep_cost.estimate_range(100.0, slowdown=2.0) == pytest.approx((80.0, 200.0))
    # 2 workers x 1 thread on 2 cores: they fit alone (1); with load 2 from others, 4 want 2 cores (2);
    # with load 0.5, 2.5 / 2 = 1.25; one worker and load 0.5 still fit (1)
    slowdown = sweep_cost.load_slowdown
    assert [
        slowdown(2, 1, 2, 0.0),
        slowdown(2, 1, 2, 2.0),
        slowdown(2, 1, 2, 0.5),
        slowdown(1, 1, 2, 0.5),
    ] == [
        1.0,
        2.0,
        1.25,
        1.0,
    ]


def test_estimate_from_first_step_by_hand(round_costs):
    """Models without a cost model: a measured set-up of 4 s and first step of 2 s, scaled to each run."""
    a = make_config(**BASE, model="some/hub-model")
    b = make_config(**BASE, model="some/hub-model", credit="arca", target_modules="lm_head")
    first = FirstStep("r", setup=4.0, step=2.0)
    seconds, low, high = sweep_cost.estimate_from_first_step([a, b], a, first, workers=2)
    # a: notebook 10 + set-up 4 before and 4 after + 10 steps x 2 s = 38 s; b: its steps cost 1.5 (arca) x 0.5
    # (head) = 0.75 of a's: 10 + 8 + 15 = 33 s. Workers: 5 + 38 and 5 + 33; makespan 43 + startup 3 + analysis 20
    # + combine 4 + 2 runs x 1.5 = 73 s (no build: the model was there to measure)
    assert seconds == pytest.approx(73.0)
    # low: nothing after the last step, steps x 0.5: a 10 + 4 + 10 = 24, b 10 + 4 + 7.5 = 21.5 -> 5 + 24 + 30
    assert low == pytest.approx(59.0)
    # high: steps x 2: a 10 + 8 + 40 = 58, b 10 + 8 + 30 = 48 -> 5 + 58 + 30
    assert high == pytest.approx(93.0)


def test_cost_model_properties():
    """With the real calibration: monotone in steps, additive over runs on one worker, and a resumed sweep pays
    run time only for its unfinished runs but combining and analysis for all of them."""
    base = dict(prompts_per_step=16, num_generations=8, eval_prompts=64, pass_k=4, threads=1)
    runs = [make_config(**base, steps=s) for s in (1, 2, 5, 12)]
    seconds = [estimate_run_seconds(c) for c in runs]
    assert all(x < y for x, y in itertools.pairwise(seconds)), seconds
    sweeps = [estimate_seconds([c, c], workers=2) for c in runs]
    assert all(x < y for x, y in itertools.pairwise(sweeps)), sweeps
    # one worker: the sweep is the fixed part (nothing to run) plus one kernel start and the sum of its runs
    fixed = estimate_seconds([], workers=1, total_runs=len(runs))
    assert estimate_seconds(runs, workers=1) == pytest.approx(fixed + COST["kernel"] + sum(seconds))
    # ... and a new kernel for every run costs that start once per run
    cold = estimate_seconds(runs, workers=1, warm=False)
    assert cold == pytest.approx(fixed + len(runs) * COST["kernel"] + sum(seconds))
    # resume: of 4 runs, the 2 finished ones cost no run time; combine and analysis still cover all 4
    todo = runs[2:]
    assert estimate_seconds(todo, workers=1, total_runs=4) == pytest.approx(
        fixed + COST["kernel"] + sum(seconds[2:])
    )
    assert estimate_seconds(todo, workers=1, total_runs=4) < estimate_seconds(runs, workers=1)
    assert estimate_seconds([], workers=2, total_runs=4) == pytest.approx(fixed)  # everything finished
    # two workers: the makespan, at least the longest run and at most all of them in a row
    two = estimate_seconds(runs, workers=2) - fixed - COST["kernel"]
    assert max(seconds) <= two < sum(seconds)


def test_default_grid_fits_ten_minutes_by_the_cost_model():
    """The default grid was sized with the cost model (issue 4): 2 workers x 1 thread, base build included."""
    grid = make_grid("default")
    configs = [dataclasses.replace(grid.config(p, "x"), threads=1) for p in grid.points()]
    assert len(configs) == 23
    assert estimate_seconds(configs, workers=2, build_cached=False) <= 600


def test_dry_run_prints_the_estimate_as_a_range(tmp_path, capsys, monkeypatch):
    """The plan's range: the recorded spread (ESTIMATE_RANGE) below, the load's slow-down above when larger."""
    monkeypatch.setattr(sweep_runner, "available_cpus", lambda: 2)
    for load, slowdown in ((0.0, sweep_cost.ESTIMATE_RANGE[1]), (3.0, 2.5)):  # 2 workers + load 3 on 2 cores
        monkeypatch.setattr(sweep_progress, "load_average", lambda load=load: (load, 1.0, 1.0))
        assert main(["--preset", "full", "--dry-run", "--out", str(tmp_path / "x")]) == 0
        header = capsys.readouterr().out.splitlines()[0]
        assert "2 local worker(s) x 1 thread(s)" in header and f"load average {load:g} on 2 cores" in header
        found = re.search(r"estimated ([\d.]+) min on idle cores, ([\d.]+) min-([\d.]+) min here", header)
        seconds, low, high = (float(x) for x in found.groups())
        assert low == pytest.approx(sweep_cost.ESTIMATE_RANGE[0] * seconds, abs=0.1)
        assert high == pytest.approx(slowdown * seconds, abs=0.2)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "bogus_key=1"], "unknown config key 'bogus_key'"),
        (["--set", "rank=4"], "use --ranks"),
        (["--set", "lr=fast"], "lr takes a value of type float"),
        (["--ranks", "0,4"], "use LoRA ranks >= 1"),
        (["--ranks", ""], "empty grid"),
        (["--credits", "uniform,telepathy"], "credit ['telepathy'] is not valid: choose from ['uniform'"),
        (["--arms", "middle"], "arm ['middle'] is not valid"),
        (["--alpha-rules", "2r,golden"], "alpha_rule 'golden' is not valid"),
        (["--vary", "steps=2,4"], "unmatched rollout budgets"),
        (["--vary", "colour=1,2"], "unknown config key 'colour'"),
        (["--vary", "out=a,b"], "cannot sweep 'out'"),
    ],
)
def test_bad_input_is_rejected_before_anything_starts(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert main(["--out", str(out), *args]) == EX_USAGE
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was created, let alone run


def test_unmatched_budget_runs_when_told(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "--out",
                str(out),
                "--vary",
                "steps=2,4",
                "--allow-unmatched-budget",
                "--dry-run",
                "--ranks",
                "1",
            ]
        )
        == 0
    )
    assert "to do  r1-uniform-s0-all-a2r-steps4" in capsys.readouterr().out


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--out", str(blocker / "sweep"), *_tiny_args(tmp_path), "--ranks", "1"]) == EX_USAGE
    assert f"cannot write the sweep directory {blocker / 'sweep'}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- combine
def test_two_runs_combine_into_a_cube(tiny_model_dir, tmp_path):
    a = train(make_config(model=str(tiny_model_dir), rank=1, out=str(tmp_path / "a"), **TINY), progress=False)
    b_cfg = dict(rank=2, credit="arca", seed=1, target_modules="lm_head", alpha=str(FIXED_ALPHA))
    b = train(
        make_config(model=str(tiny_model_dir), out=str(tmp_path / "b"), **b_cfg, **TINY), progress=False
    )
    cube = combine_runs([a, b])
    assert cube["reward"].dims == ("rank", "credit", "seed", "arm", "alpha_rule", "step")
    assert cube["weights"].dims[-2:] == ("sample", "token") and cube["a0_fro"].dims[-1] == "layer"
    assert list(cube["rank"].values) == [1, 2] and list(cube["credit"].values) == ["uniform", "arca"]
    assert list(cube["arm"].values) == ["all", "head"] and list(cube["alpha_rule"].values) == ["2r", "fixed"]
    assert int(cube["has_run"].sum()) == 2  # 2 of the 2^5 = 32 points of the cube hold a run
    pa = dict(rank=1, credit="uniform", seed=0, arm="all", alpha_rule="2r")
    pb = dict(rank=2, credit="arca", seed=1, arm="head", alpha_rule="fixed")
    ra, rb = load_run(a), load_run(b)
    np.testing.assert_array_equal(cube["reward"].sel(pa).values, ra["reward"].values)
    np.testing.assert_array_equal(cube["credit_gini"].sel(pb).values, rb["credit_gini"].values)
    assert np.isnan(cube["reward"].sel(pa | {"credit": "arca"}).values).all()  # no run there
    # Layers: the union of 2 layers x 7 linear modules (arm all) and lm_head (arm head); NaN where not adapted.
    assert cube.sizes["layer"] == 15
    assert np.isnan(float(cube["a0_fro"].sel(pa | {"layer": "lm_head"})))
    assert float(cube["a0_fro"].sel(pb | {"layer": "lm_head"})) == float(rb["a0_fro"].sel(layer="lm_head"))
    # Config values: constant ones scalar, varying ones over the axis dims (alpha 2r at r 1 -> 2; fixed -> 16).
    assert cube["lr"].ndim == 0 and float(cube["lr"]) == 2e-3
    assert float(cube["lora_alpha"].sel(pa)) == 2.0 and float(cube["lora_alpha"].sel(pb)) == 16.0
    assert str(cube["target_modules"].sel(pb).item()) == "lm_head"
    assert str(cube["run_id"].sel(pb).item()) == "r2-arca-s1-head-afixed"
    assert set(json.loads(cube.attrs["run_configs_json"])) == {
        "r1-uniform-s0-all-a2r",
        "r2-arca-s1-head-afixed",
    }
    # both runs adapted the same base model: one entry
    assert [b["name_or_path"] for b in json.loads(cube.attrs["base_models_json"])] == [str(tiny_model_dir)]
    write_netcdf(cube, tmp_path / "sweep.nc")
    back = load_sweep(tmp_path / "sweep.nc")
    np.testing.assert_array_equal(back["reward"].values, cube["reward"].values)
    with pytest.raises(ValueError, match="share the grid points"):
        combine_runs([a, a])


def test_runs_without_eval_prompts_combine(tiny_model_dir, tmp_path):
    # The prediction preset skips the accuracy eval: run.nc then has an eval_prompt dimension of length 0, which
    # the cube must keep (it once dropped the empty coordinate and failed with KeyError 'eval_prompt').
    cfg = dict(TINY, eval_prompts=0, pass_k=0, save_every=1)
    runs = [
        train(
            make_config(model=str(tiny_model_dir), out=str(tmp_path / f"r{s}"), seed=s, **cfg), progress=False
        )
        for s in (0, 1)
    ]
    cube = combine_runs(runs)
    assert cube.sizes["eval_prompt"] == 0 and list(cube["seed"].values) == [0, 1]
    assert np.isnan(
        float(load_run(runs[0])["greedy_accuracy_before"])
    )  # no prompts scored: NaN, not a warning
    assert (tmp_path / "r0" / "checkpoints" / "step-00001" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- step clock
def test_step_clock_records_the_steps_in_a_sweep_kernel_only(tiny_model_dir, tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    callbacks = list(hf_trainer.DEFAULT_CALLBACKS)
    cfg = make_config(model=str(tiny_model_dir), out=str(tmp_path / "runs" / "r-x"), **TINY)
    monkeypatch.delenv(CLOCK_ENV, raising=False)
    with step_clock(cfg.out):
        assert callbacks == hf_trainer.DEFAULT_CALLBACKS  # outside a sweep kernel: nothing
    clock_dir = tmp_path / "clock"
    monkeypatch.setenv(CLOCK_ENV, str(clock_dir))
    with step_clock(cfg.out):
        train(cfg, progress=False)
    assert callbacks == hf_trainer.DEFAULT_CALLBACKS  # taken out again
    record = json.loads((clock_dir / "r-x.json").read_text())
    assert len(record["steps"]) == record["max_steps"] == TINY["steps"]
    times = [record["started"], record["train_begin"], *record["steps"], record["train_end"]]
    assert times == sorted(times)
    first = read_first_step(clock_dir)
    assert first.run_id == "r-x"
    assert first.setup == pytest.approx(record["train_begin"] - record["started"])
    assert first.step == pytest.approx(record["steps"][0] - record["train_begin"])


def test_read_first_step_takes_the_earliest_run_with_a_finished_step(tmp_path):
    def write(name: str, **record) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps({"run_id": name, **record}))

    assert read_first_step(tmp_path) is None
    write("later", started=20.0, train_begin=25.0, steps=[26.0])
    write("earliest-no-step-yet", started=5.0, train_begin=6.0, steps=[])
    (tmp_path / "torn.json").write_text('{"run_id": "torn", "sta')  # being replaced right now
    assert read_first_step(tmp_path) == FirstStep("later", 5.0, 1.0)
    write("early", started=10.0, train_begin=12.0, steps=[15.0, 16.0])
    assert read_first_step(tmp_path) == FirstStep("early", 2.0, 3.0)


# ----------------------------------------------------------------------------------- a tiny real sweep
@pytest.fixture(scope="module")
def tiny_sweep(tiny_model_dir, tmp_path_factory):
    """Two runs on 2 local workers; max_prompt_length=1 makes one fail inside train() (prompts too long)."""
    out = tmp_path_factory.mktemp("sweeps") / "tiny"
    grid = make_grid(
        "default", ONE_POINT | {"max_prompt_length": [1, 64]}, {"model": str(tiny_model_dir), **TINY}
    )
    outcome = run_sweep(grid, out, workers=2, progress=False, analysis=False, log=lambda *a: None)
    return grid, out, outcome


GOOD, BAD = "r1-uniform-s0-all-a2r-max_prompt_length64", "r1-uniform-s0-all-a2r-max_prompt_length1"


def test_sweep_writes_runs_failures_and_the_cube(tiny_sweep):
    _, out, outcome = tiny_sweep
    assert outcome.finished == [GOOD] and list(outcome.failed) == [BAD] and outcome.exit_code == 1
    assert "max_prompt_length" in outcome.failed[BAD]
    assert sorted(p.name for p in (out / "runs" / GOOD).iterdir()) == [
        "adapter",
        "config.json",
        "figures",
        "run.ipynb",
        "run.nc",
    ]
    assert (out / "failed" / BAD / "run.ipynb").is_file()  # the executed notebook, up to the error
    assert "ValueError" in (out / "failed" / BAD / "error.txt").read_text()
    cube = load_sweep(out)
    assert cube["reward"].dims == ("rank", "credit", "seed", "arm", "alpha_rule", "max_prompt_length", "step")
    assert int(cube["has_run"].sum()) == 1 and list(cube["max_prompt_length"].values) == [64]
    assert json.loads(cube.attrs["failed_json"]) == {BAD: outcome.failed[BAD]}
    assert json.loads(cube.attrs["sweep_json"])["runs"] == [BAD, GOOD]
    (session,) = json.loads((out / "sweep.json").read_text())["sessions"]  # the plan and what it took
    assert (session["to_run"], session["finished"], session["failed"], session["workers"]) == (2, 1, 1, 2)
    assert session["seconds"] > 0 and session["estimated_seconds"] is None  # no cost model for a local model
    # ... so the estimate comes from the first step the good run measured; every run's wall time is kept
    first = session["first_step"]
    assert first["run_id"] == GOOD and first["step_seconds"] > 0 and first["setup_seconds"] > 0
    # the range contains the estimate; both are rounded to 0.1 s, so an end may equal it
    assert first["estimated_range"][0] <= first["estimated_seconds"] <= first["estimated_range"][1]
    assert set(session["run_seconds"]) == {GOOD, BAD} and session["warm_kernels"] is True
    clock = json.loads((out / ".work" / "clock" / f"{GOOD}.json").read_text())
    assert len(clock["steps"]) == clock["max_steps"] == TINY["steps"]
    assert json.loads((out / ".work" / "clock" / f"{BAD}.json").read_text())["steps"] == []  # failed before
    executed = (out / "runs" / GOOD / "run.ipynb").read_text()
    assert json.dumps(f"python: {sys.executable}\n") in executed  # the kernel is the runner's interpreter
    assert load_run(out / "runs" / GOOD)["threads"].item() == 1  # 2 cores / 2 workers
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 2 and summary[0].split()[:6] == [
        "rank",
        "credit",
        "seed",
        "arm",
        "alpha_rule",
        "max_prompt_length",
    ]
    assert summary[1].split()[:6] == ["1", "uniform", "0", "all", "2r", "64"]


def test_load_runs_in_parallel_equals_one_by_one(tiny_sweep, tmp_path, monkeypatch):
    _, out, _ = tiny_sweep
    good = out / "runs" / GOOD / "run.nc"
    paths = [tmp_path / f"{i}.nc" for i in range(4)]
    for path in paths:
        shutil.copy(good, path)
    paths[1].write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    monkeypatch.setattr(sweep_cube, "PARALLEL_LOAD_MIN", 1)
    expected = load_run(good)
    for processes in (1, 2):
        datasets, errors = load_runs(paths, processes=processes)
        assert datasets[1] is None and errors[1] and [errors[i] for i in (0, 2, 3)] == ["", "", ""], processes
        for i in (0, 2, 3):
            xr.testing.assert_identical(datasets[i], expected)


def test_rerun_skips_finished_runs_and_retries_failed(tiny_sweep, tiny_model_dir, capsys):
    _, out, _ = tiny_sweep
    finished_nc = out / "runs" / GOOD / "run.nc"
    before = finished_nc.stat().st_mtime_ns
    args = [
        "--out",
        str(out),
        *_tiny_args(tiny_model_dir),
        "--vary",
        "max_prompt_length=1,64",
        "--quiet",
        "--no-analysis",
    ]
    args += ["--ranks", "1", "--credits", "uniform", "--seeds", "0", "--arms", "all", "--alpha-rules", "2r"]
    args += [
        "--executor",
        "slurm",
        "--submitit-cluster",
        "debug",
    ]  # the retry goes through submitit (in process)
    assert main(args) == 1  # exit status: one failed run
    text = capsys.readouterr().out
    assert "0 runs finished now, 1 before, 1 failed" in text
    assert finished_nc.stat().st_mtime_ns == before  # untouched
    assert (
        "ValueError" in (out / "failed" / BAD / "error.txt").read_text()
    )  # recorded again by the submitit job
    assert (out / ".work" / "submitit").is_dir()
    first, retry = json.loads((out / "sweep.json").read_text())["sessions"]  # the first session is kept
    assert (first["to_run"], retry["to_run"], retry["failed"], retry["executor"]) == (2, 1, 1, "slurm")


def test_a_different_grid_is_refused_and_nothing_is_lost(tiny_sweep, tiny_model_dir):
    _, out, _ = tiny_sweep
    other = make_grid(
        "default", ONE_POINT | {"max_prompt_length": [64, 128]}, {"model": str(tiny_model_dir), **TINY}
    )
    with pytest.raises(ValueError, match=r"different grid.*--extend"):
        run_sweep(other, out, progress=False, log=lambda *a: None)
    changed = make_grid(
        "default",
        ONE_POINT | {"max_prompt_length": [1, 64]},
        {"model": str(tiny_model_dir), **TINY, "lr": 1e-3},
    )
    with pytest.raises(ValueError, match=r"different shared settings.*'lr': \(0.002, 0.001\)"):
        run_sweep(changed, out, progress=False, log=lambda *a: None)
    assert sweep_exec.is_finished(out, GOOD)
    plan = run_sweep(
        other, out, extend=True, dry_run=True, log=lambda *a: None
    )  # --extend would add one point
    assert plan.skipped == [GOOD]


def test_killed_writes_leave_no_readable_partial_file(tiny_sweep, tmp_path):
    _, out, _ = tiny_sweep
    sweep_nc = out / "sweep.nc"
    old = load_sweep(out)
    # A process killed (os._exit, no clean-up) after writing half of the new sweep.nc, before the rename.
    code = textwrap.dedent(f"""
        import os, xarray as xr
        from pathlib import Path
        from arca_lab.sweep import combine_sweep
        original = xr.Dataset.to_netcdf
        def half_then_die(self, path, *args, **kwargs):
            original(self, path, *args, **kwargs)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            os._exit(9)
        xr.Dataset.to_netcdf = half_then_die
        combine_sweep(Path({str(out)!r}))
    """)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 9
    np.testing.assert_array_equal(load_sweep(out)["reward"].values, old["reward"].values)  # the old cube
    leftovers = [p.name for p in out.glob("*.nc*") if p != sweep_nc]
    assert leftovers and all(
        name.startswith(".sweep.nc.") and name.endswith(".partial") for name in leftovers
    )
    # A run killed inside train() leaves its hidden staging directory; one killed after train() but before its
    # notebook was moved in has run.nc without run.ipynb: neither counts as finished, neither is combined.
    staging = out / "runs" / f".{BAD}.partial-x"
    staging.mkdir()
    (staging / "run.nc").write_bytes(b"\x89HDF\r\n half a file")
    half = out / "runs" / BAD
    half.mkdir()
    (half / "run.nc").write_bytes(b"\x89HDF\r\n half a file")
    assert not sweep_exec.is_finished(out, BAD)
    _, rows = combine_sweep(out)
    assert [r["max_prompt_length"] for r in rows] == [64]
    sweep_exec._clear_attempt(sweep_exec.sweep_paths(out, BAD))  # what a retry does first
    assert not staging.exists() and not half.exists()


def test_report_executes_the_analysis_notebook(tiny_sweep, tmp_path, monkeypatch, capsys):
    _, out, _ = tiny_sweep
    (out / "analysis.ipynb").unlink(missing_ok=True)
    monkeypatch.setattr(sweep_exec, "ANALYSIS_NOTEBOOK", tmp_path / "missing.ipynb")
    assert report_main([str(out)]) == 0
    assert "analysis notebook" in capsys.readouterr().err and not (out / "analysis.ipynb").exists()
    stub = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                'sweep_dir: str = ""  # sweep\nfigures_dir: str = ""  # figures',
                metadata={"tags": ["parameters"]},
            ),
            nbformat.v4.new_code_cell(
                "from pathlib import Path\nfrom arca_lab.sweep import load_sweep\n"
                "n = int(load_sweep(sweep_dir)['has_run'].sum())\n"
                "Path(figures_dir).mkdir(parents=True, exist_ok=True)\n"
                "(Path(figures_dir) / 'n.txt').write_text(str(n))"
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}},
    )
    nbformat.write(stub, tmp_path / "analysis.ipynb")
    monkeypatch.setattr(sweep_exec, "ANALYSIS_NOTEBOOK", tmp_path / "analysis.ipynb")
    assert report_main([str(out)]) == 0
    assert (out / "analysis.ipynb").is_file() and (out / "figures" / "n.txt").read_text() == "1"
    assert report_main([str(tmp_path)]) == EX_USAGE  # not a sweep directory
    # the real analysis notebook, as `arca-lab sweep` and `report` run it: one run, so the figures that need
    # two ranks or a beta > 0 arm are skipped with a note, the others are written
    monkeypatch.undo()
    assert report_main([str(out)]) == 0
    executed = nbformat.read(out / "analysis.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "0 violated: all hold" in printed and "KL-vs-rank figure skipped" in printed
    assert "bound checks (ball, a-priori, credit link)" in printed and "lemma checks" in printed
    assert {p.name for p in (out / "figures").glob("*.png")} >= {
        "credit_concentration.png",
        "reward_accuracy.png",
    }


@pytest.mark.slow  # ~11 s; the default suite exercises submitit through the retry in the re-run test
def test_submitit_debug_executor_runs_a_tiny_sweep(tiny_model_dir, tmp_path):
    grid = make_grid("default", ONE_POINT, {"model": str(tiny_model_dir), **TINY})
    outcome = run_sweep(
        grid,
        tmp_path / "s",
        executor="slurm",
        submitit_cluster="debug",
        progress=False,
        analysis=False,
        log=lambda *a: None,
    )
    assert outcome.finished == ["r1-uniform-s0-all-a2r"] and not outcome.failed
    assert sweep_exec.is_finished(tmp_path / "s", "r1-uniform-s0-all-a2r")
    assert math.isfinite(outcome.rows[0]["reward"])
