"""`arca-lab sweep` and `arca-lab report`: a papermill grid of GRPO + LoRA runs combined into one xarray cube.

A sweep executes `notebooks/grpo_run.ipynb` once per grid point (each execution calls `arca_lab.run.train`),
keeps every executed notebook beside its `run.nc`, combines the runs into `sweep.nc`, then executes
`notebooks/rank_sweep_analysis.ipynb` (parameters `sweep_dir: str`, `figures_dir: str`) into the sweep directory.

Grid
----
A grid is the UNION of Cartesian sub-grids over the sweep axes (`arca_lab.sweep.grid`):
    rank        LoRA rank r (int)
    credit      token credit (uniform, surprisal, entropy_reduction, divergence, arca, arca_branch)
    seed        run seed (int)
    arm         "all" -> target_modules "all-linear";  "head" -> target_modules "lm_head" (head-only LoRA)
    alpha_rule  "2r" -> alpha "2r";  "r" -> alpha "r";  "fixed" -> alpha "16" (the same number for every rank);
                also "<k>r" (alpha = k r) and "fixed<N>" (alpha = N)
plus optional extra axes over any other RunConfig field (e.g. `beta` in the "merl" presets), and one set of
shared config values (`--set key=value`) applied to every run. Every run of a sweep sees the same number of
prompts and completions (matched rollout budgets, as in the ARCA paper's comparison); a grid that varies
steps x prompts_per_step x num_generations is refused unless `--allow-unmatched-budget`.

The default sweep (`arca-lab sweep --out DIR`, embedded model, sharpening 2 everywhere) is the union of
    (a) rank {1, 4, 16} x alpha_rule {2r, fixed} at credit uniform: arm all at seeds {0, 1}, arm head at seed 0
        -- does KL grow or fall with rank under alpha = 2r vs alpha fixed, all-layer and head-only?
    (b) at rank 4, arm all, alpha 2r: credit {uniform, arca} x seed {0, 1} and {surprisal, entropy_reduction,
        divergence} x seed {0}  -- do the output-distribution credits concentrate with sharpening 2, ARCA not?
23 runs (the two uniform runs of (b) are points of (a)), every run 12 steps of 16 prompts x 8 completions,
64 held-out prompts with pass@4; the values live in `grid.SWEEP_PRESETS`, the cost model that sized them
(about 6 minutes on 2 idle cores, base-model build included) in `grid.estimate_seconds`.

Sweep directory layout
----------------------
    SWEEP_DIR/
      sweep.json                the grid (sub-grids, extra axes, shared config values, preset) and the run ids;
                                a re-run with a different grid is refused (`--extend` adds points instead)
      sweep.nc                  the combined cube (below); written atomically, rewritten after every sweep
      summary.txt               the summary table printed at the end (one line per finished grid point)
      analysis.ipynb            the executed analysis notebook (absent if the notebook does not exist yet)
      figures/                  the analysis notebook's figures
      runs/<run_id>/            FINISHED runs only:
        config.json, adapter/, run.nc    written by `arca_lab.run.train` (atomic staging)
        figures/*.png                    the run notebook's figures
        run.ipynb                        the executed run notebook, moved in last: its presence marks "finished"
      failed/<run_id>/          the last failed attempt: run.ipynb (executed up to the error), error.txt, and
                                run/ if train() had finished before a later cell failed
      .work/                    notebooks being executed, jupyter/kernels/arca-lab-sweep (kernelspec whose argv[0]
                                is the runner's interpreter), logs/ (kernel stderr), submitit/ (job files)
    run_id = "r{rank}-{credit}-s{seed}-{arm}-a{alpha_rule}" (+ "-{axis}{value}" per extra axis), e.g.
    "r4-arca-s1-all-a2r". Re-running the same command skips finished runs and retries failed ones.

`sweep.nc` (h5netcdf; `load_sweep(dir)`; `combine_runs(run_dirs)` builds it)
------------------------------------------------------------------------------
dims      rank, credit, seed, arm, alpha_rule (always, in this order, length 1 when not swept), then any
          extra axes (e.g. beta), then the per-run dims of run.nc: step, sample, token, layer, eval_prompt.
coords    rank (int), credit (str), seed (int), arm (str), alpha_rule (str), extra axes; step (1..steps);
          sample, token, eval_prompt (0..n-1 integer ranges); layer (union of adapted module names).
          `run_id` (str, "" where the union of sub-grids has no run) and `has_run` (int8 0/1) over the axis dims.
          Config values (the scalar coordinates of run.nc: lr, steps, sharpening, lora_alpha, adapter_scale,
          target_modules, ...): a scalar coordinate when equal in every run, else a coordinate over the axis dims.
variables every variable of run.nc with the axis dims in front, e.g. reward(rank, credit, seed, arm, alpha_rule,
          step), weights(..., sample, token), a0_fro(..., layer), greedy_accuracy_after(...). NaN where a grid
          point has no run, a run is shorter, or a module is not adapted in that arm; integer arrays
          (completion_ids, completion_mask, token_roles) become float with NaN for "missing".
attrs     title, sweep_json (the grid), run_configs_json ({run_id: config_json}), git_sha (distinct values of
          the runs, comma-joined), versions_json, base_models_json (distinct base models of the runs), created
          (ISO time), failed_json ({run_id: error line}).

Summary (`summary_table`): one row per finished grid point with the axis values and reward, KL(pi_base||pi)
(`kl_ref_policy_mean`, MERL's direction), KL(pi||pi_base), credit Gini and ETR, each the mean over the last
`SUMMARY_LAST_STEPS` steps of the run, and greedy accuracy before -> after.

Public API (re-exported here). Modules, one concern each, imports one way (theory <- lab <- sweep <- CLI):
    grid      axes, sub-grids, presets, matched budgets (re-exports the cost model)
    studies   presets of pre-registered studies, read from theory/preregistered/<name>.json (credit-pilot,
              credit-study, credit-study-quick)
    cost      the cost model, calibrated on recorded sweeps, printed as a range
    execute   the run notebook's parameters, the sweep-local kernel, the local and submitit executors
    kernel    warm kernels: one Jupyter kernel per local worker, reset between runs
    clock     per-step timing recorded by the run notebook; progress: the first-step estimate
    runner    run_sweep: checks, lock, execution, combine, analysis
    cube      combine_runs -> sweep.nc, load_sweep, summary table
    cli       `arca-lab sweep` and `arca-lab report`
----------
    combine_runs(run_dirs: Iterable[str | Path], extra_axes: Sequence[str] = (), attrs=None) -> xr.Dataset
    load_sweep(sweep_dir: str | Path) -> xr.Dataset
    run_summary(ds: xr.Dataset) -> dict[str, float]     one run's (or one grid point's) summary metrics
    summary_table(ds: xr.Dataset) -> list[dict]         rows of the summary above
    run_sweep(grid, out, workers=None, executor="local", ...) -> SweepOutcome
    main(argv: list[str]) -> int                        `arca-lab sweep ...`; exit status = number of failed runs
                                                        (+1 if the analysis notebook failed), 64 for bad input
    report_main(argv: list[str]) -> int                 `arca-lab report SWEEP_DIR`: re-combine, re-run analysis
"""

from __future__ import annotations

from arca_lab.sweep.cli import EX_USAGE, main, report_main
from arca_lab.sweep.cube import (
    SUMMARY_LAST_STEPS,
    SUMMARY_METRICS,
    combine_runs,
    format_table,
    load_sweep,
    run_summary,
    summary_table,
)
from arca_lab.sweep.runner import SweepOutcome, combine_sweep, run_sweep

__all__ = [
    "EX_USAGE",
    "SUMMARY_LAST_STEPS",
    "SUMMARY_METRICS",
    "SweepOutcome",
    "combine_runs",
    "combine_sweep",
    "format_table",
    "load_sweep",
    "main",
    "report_main",
    "run_summary",
    "run_sweep",
    "summary_table",
]
