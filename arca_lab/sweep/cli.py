"""`arca-lab sweep` and `arca-lab report` (the sweep package's command line; layout and API in its docstring).

Exit status (`arca_lab.exit_codes`): the number of failed runs (+1 if the analysis notebook failed); 64 for bad
input, before anything runs; 75 when another sweep or report holds the directory's lock.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arca_lab.exit_codes import EX_TEMPFAIL, EX_USAGE, UsageParser
from arca_lab.sweep.cube import (
    SUMMARY_LAST_STEPS,
    format_table,
)
from arca_lab.sweep.grid import (
    AXES,
    COST,
    Grid,
    get_preset,
    make_grid,
    parse_assignments,
    parse_field_value,
    preset_names,
)
from arca_lab.sweep.runner import SweepLocked, SweepOutcome, combine_sweep, run_sweep, sweep_lock

# ---------------------------------------------------------------------------------------------------- CLI
_Parser = UsageParser


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


def _describe(name: str) -> str:
    """A preset's one-line description; a pre-registered study that cannot run yet says why."""
    try:
        return get_preset(name).description
    except ValueError as e:
        return f"(not runnable yet) {e}"


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {k:<11}{_describe(k)}" for k in preset_names())
    p = _Parser(
        prog="arca-lab sweep",
        description="Run the GRPO run notebook once per grid point (papermill), combine the runs into sweep.nc "
        "and execute the analysis notebook. Re-running the same command resumes (finished runs are skipped).",
        epilog=f"sweep presets (--preset):\n{presets}\n\nexit status: the number of failed runs (+1 if the "
        f"analysis notebook failed), {EX_USAGE} for bad input (nothing was run).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="sweep directory (created; resumed if it exists)")
    p.add_argument("--preset", default="default", choices=preset_names(), help="grid to start from")
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
    except SweepLocked as err:
        print(f"arca-lab sweep: error: {err}", file=sys.stderr)
        return EX_TEMPFAIL
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"arca-lab sweep: error: {err}", file=sys.stderr)
        return EX_USAGE
    if not args.dry_run:
        _print_outcome(outcome, grid.describe())
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
    from arca_lab.sweep.execute import analysis_summary, execute_analysis

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
        with sweep_lock(out):
            print(f"arca-lab report: combining the finished runs of {out} ...", file=sys.stderr, flush=True)
            cube, rows = combine_sweep(out)
            if cube is None:
                print(f"arca-lab report: error: {out} has no finished runs yet", file=sys.stderr)
                return EX_USAGE
            n = int(cube["has_run"].sum())
            seconds = COST["analysis"] + COST["analysis_per_run"] * n  # the cost model's analysis term
            print(
                f"arca-lab report: {n} runs combined; executing the analysis notebook (verify-bound on every "
                f"run; estimated {seconds:.0f} s) ...",
                file=sys.stderr,
                flush=True,
            )
            path, error = execute_analysis(out)
    except SweepLocked as err:
        print(f"arca-lab report: error: {err}", file=sys.stderr)
        return EX_TEMPFAIL
    except (ValueError, OSError) as err:  # e.g. a run.nc from another grid or format, an unwritable directory
        print(f"arca-lab report: error: cannot combine the runs of {out}: {err}", file=sys.stderr)
        return EX_USAGE
    print(format_table(rows))
    if error:
        print(f"analysis notebook failed: {error.splitlines()[0]} (see {path})", file=sys.stderr)
        return 1
    print(f"\nanalysis: {path}" if path else "\nanalysis notebook not found: skipped")
    summary = analysis_summary(out)
    if summary:
        print("\n" + summary, end="")
    return 0
