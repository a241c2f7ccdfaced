"""`arca-lab sweep` and `arca-lab report`: a papermill grid of GRPO + LoRA runs combined into one xarray cube.

A sweep executes `notebooks/grpo_run.ipynb` once per grid point (each execution calls `arca_lab.run.train`),
keeps every executed notebook beside its `run.nc`, combines the runs into `sweep.nc`, then executes
`notebooks/rank_sweep_analysis.ipynb` (parameters `sweep_dir: str`, `figures_dir: str`) into the sweep directory.

Grid
----
A grid is the UNION of Cartesian sub-grids over the sweep axes (`arca_lab.sweep_grid`):
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
64 held-out prompts with pass@4; the values live in `sweep_grid.SWEEP_PRESETS`, the cost model that sized them
(about 6 minutes on 2 idle cores, base-model build included) in `sweep_grid.estimate_seconds`.

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

Public API (re-exported here; modules: sweep_grid = grids, presets, cost model; sweep_exec = notebooks, kernel,
executors; sweep_run = the runner; sweep_cube = combine and summary)
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

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arca_lab.sweep_cube import (
    SUMMARY_LAST_STEPS,
    SUMMARY_METRICS,
    combine_runs,
    format_table,
    load_sweep,
    run_summary,
    summary_table,
)
from arca_lab.sweep_grid import AXES, SWEEP_PRESETS, Grid, make_grid, parse_assignments, parse_field_value
from arca_lab.sweep_run import SweepOutcome, combine_sweep, run_sweep

__all__ = [
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


# ---------------------------------------------------------------------------------------------------- CLI
EX_USAGE = 64
"""Exit status for bad input (nothing was run); 0..63 count failed runs."""


class _Parser(argparse.ArgumentParser):
    def error(
        self, message: str
    ):  # bad arguments exit with EX_USAGE, not 2 (which would mean "2 runs failed")
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for text in values for v in text.replace(",", " ").split()]


def _typed_axis(axis: str, values: list[str]) -> list[Any]:
    if axis in ("rank", "seed"):
        try:
            return [int(v) for v in values]
        except ValueError:
            raise ValueError(f"--{axis}s takes integers, e.g. --{axis}s 1,4,16 (got {values})") from None
    if axis in AXES:
        return values
    return [parse_field_value(axis, v) for v in values]


def _submitit_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {k:<11}{p.description}" for k, p in SWEEP_PRESETS.items())
    p = _Parser(
        prog="arca-lab sweep",
        description="Run the GRPO run notebook once per grid point (papermill), combine the runs into sweep.nc "
        "and execute the analysis notebook. Re-running the same command resumes (finished runs are skipped).",
        epilog=f"sweep presets (--preset):\n{presets}\n\nexit status: the number of failed runs (+1 if the "
        f"analysis notebook failed), {EX_USAGE} for bad input (nothing was run).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="sweep directory (created; resumed if it exists)")
    p.add_argument("--preset", default="default", choices=sorted(SWEEP_PRESETS), help="grid to start from")
    for axis, flag, example in (
        ("rank", "--ranks", "1,4,16"),
        ("credit", "--credits", "uniform,arca"),
        ("seed", "--seeds", "0,1"),
        ("arm", "--arms", "all,head"),
        ("alpha_rule", "--alpha-rules", "2r,fixed"),
    ):
        p.add_argument(
            flag, nargs="+", dest=axis, metavar="V", help=f"replace the preset's values, e.g. {example}"
        )
    p.add_argument(
        "--vary", action="append", default=[], metavar="KEY=V1,V2", help="sweep another RunConfig field too"
    )
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="RunConfig value for every run",
    )
    p.add_argument("--workers", type=int, help="parallel local runs (default: the number of cores)")
    p.add_argument(
        "--executor", choices=("local", "slurm"), default="local", help="local processes or Slurm (submitit)"
    )
    p.add_argument(
        "--slurm",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="submitit parameters, e.g. timeout_min=120 gpus_per_node=1 slurm_partition=gpu",
    )
    p.add_argument(
        "--submitit-cluster",
        choices=("slurm", "local", "debug"),
        default="slurm",
        help="submitit backend for --executor slurm (local/debug run the jobs here, for testing)",
    )
    p.add_argument(
        "--extend", action="store_true", help="add this command's grid points to an existing sweep"
    )
    p.add_argument(
        "--allow-unmatched-budget", action="store_true", help="allow runs with different rollout budgets"
    )
    p.add_argument("--no-analysis", action="store_true", help="do not execute the analysis notebook")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def grid_from_args(args: argparse.Namespace) -> Grid:
    axes: dict[str, list[Any]] = {}
    for axis in AXES:
        values = _split(getattr(args, axis))
        if values is not None:
            axes[axis] = _typed_axis(axis, values)
    for item in args.vary:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--vary {item!r} is not valid: write key=v1,v2, e.g. --vary beta=0,0.05")
        axes[key] = _typed_axis(key, _split([text]) or [])
    return make_grid(args.preset, axes, parse_assignments(args.set))


def main(argv: list[str] | None = None) -> int:
    """`arca-lab sweep`: exit status = number of failed runs; EX_USAGE for bad input."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        grid = grid_from_args(args)
        params = {}
        for item in args.slurm:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(
                    f"--slurm {item!r} is not valid: write key=value, e.g. --slurm timeout_min=60"
                )
            params[key] = _submitit_value(text)
        outcome = run_sweep(
            grid,
            args.out,
            args.workers,
            args.executor,
            extend=args.extend,
            allow_unmatched_budget=args.allow_unmatched_budget,
            analysis=not args.no_analysis,
            progress=not args.quiet,
            dry_run=args.dry_run,
            submitit_cluster=args.submitit_cluster,
            submitit_parameters=params,
            preset=args.preset,
        )
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"arca-lab sweep: error: {err}", file=sys.stderr)
        return EX_USAGE
    if not args.dry_run:
        _print_outcome(outcome, SWEEP_PRESETS[args.preset].description)
    return outcome.exit_code


def _print_outcome(outcome: SweepOutcome, description: str) -> None:
    print(f"\nsweep {outcome.sweep_dir} ({description})")
    print(
        f"summary: mean over each run's last {SUMMARY_LAST_STEPS} steps; kl_base_pi = KL(pi_base||pi_theta)"
    )
    print(format_table(outcome.rows))
    print(
        f"\n{len(outcome.finished)} runs finished now, {len(outcome.skipped)} before, {len(outcome.failed)} failed"
        f"; wall time {outcome.seconds / 60:.1f} min; cube: {outcome.sweep_dir / 'sweep.nc'}"
    )
    for rid, err in outcome.failed.items():
        print(f"  failed {rid}: {err}")


def report_main(argv: list[str] | None = None) -> int:
    """`arca-lab report SWEEP_DIR`: re-combine the finished runs and re-execute the analysis notebook."""
    from arca_lab.sweep_exec import execute_analysis

    p = _Parser(prog="arca-lab report", description=report_main.__doc__)
    p.add_argument("sweep_dir", type=Path, help="a directory written by `arca-lab sweep`")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.sweep_dir.resolve()
    if not (out / "sweep.json").is_file():
        print(
            f"arca-lab report: error: {out} has no sweep.json: pass a directory written by `arca-lab sweep`",
            file=sys.stderr,
        )
        return EX_USAGE
    try:
        cube, rows = combine_sweep(out)
    except (ValueError, OSError) as err:  # e.g. a run.nc from another grid or format, an unwritable directory
        print(f"arca-lab report: error: cannot combine the runs of {out}: {err}", file=sys.stderr)
        return EX_USAGE
    if cube is None:
        print(f"arca-lab report: error: {out} has no finished runs yet", file=sys.stderr)
        return EX_USAGE
    path, error = execute_analysis(out)
    print(format_table(rows))
    if error:
        print(f"analysis notebook failed: {error.splitlines()[0]} (see {path})", file=sys.stderr)
        return 1
    print(f"\nanalysis: {path}" if path else "\nanalysis notebook not found: skipped")
    return 0
