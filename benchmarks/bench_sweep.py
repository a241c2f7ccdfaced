"""Where a sweep's time goes, and the cost model against measured wall times.

    python benchmarks/bench_sweep.py breakdown [--runs 4] [--arm lm_head]
        The same default-sized runs (rank 4, 12 steps of 16 x 8, 64 held-out prompts with pass@4, 1 thread)
        executed one after another through the run notebook, each in a new kernel (what every run paid before
        the warm kernel) and all in one warm kernel; prints the median seconds of each phase.
    python benchmarks/bench_sweep.py table SWEEP_DIR [SWEEP_DIR ...]
        Recorded sweeps: wall time measured vs estimated (at the time, and by today's cost model), load
        averages, and the median per-run breakdown from the executed run notebooks (papermill cell times) and
        run.nc step times.
    python benchmarks/bench_sweep.py estimate
        Today's cost-model estimates of the embedded presets (2 workers x 1 thread, base model cached).

Phases of a run notebook: "kernel" is from papermill's start to the first cell (kernel start and client), "imports"
the set-up cell (torch, transformers, trl, peft: slow in a kernel's first notebook only), "train" the `train()`
cell split into its optimiser steps (run.nc step_time) and the rest (model load, the two evals, saving), "figures"
the figure cell, "papermill" what is left of papermill's duration (kernel shutdown for a new kernel, resets and
notebook writes), "outside" the worker's time around papermill (cleaning up, moving the notebook). The machine is
shared: the load averages are printed beside every number; compare runs taken at similar loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

PHASES = ("kernel", "imports", "steps", "train_other", "figures", "papermill", "total")


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def notebook_phases(notebook: Path, run_nc: Path) -> dict[str, float]:
    """Seconds per phase of one executed run notebook (papermill metadata) and its run.nc."""
    import xarray as xr

    nb = json.loads(notebook.read_text())
    meta = nb["metadata"]["papermill"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    body = [c for c in code if not {"parameters", "injected-parameters"} & set(c["metadata"].get("tags", []))]
    imports, train, figures = (c["metadata"]["papermill"]["duration"] for c in body)
    kernel = _t(code[0]["metadata"]["papermill"]["start_time"]) - _t(meta["start_time"])
    cells = sum(c["metadata"]["papermill"]["duration"] or 0.0 for c in code)
    with xr.open_dataset(run_nc, engine="h5netcdf") as ds:
        steps = float(ds["step_time"].sum())
    return dict(
        kernel=kernel,
        imports=imports,
        steps=steps,
        train_other=train - steps,
        figures=figures,
        papermill=meta["duration"] - kernel - cells,
        total=meta["duration"],
    )


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _print_phases(title: str, rows: list[dict[str, float]], note: str = "") -> None:
    med = _medians(rows)
    print(f"{title:<34}" + "".join(f"{med[k]:>12.2f}" for k in PHASES) + f"  {note}")


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


# -------------------------------------------------------------------------------------------- breakdown
def breakdown(runs: int, arm: str) -> None:
    from arca_lab.config import make_config
    from arca_lab.sweep.execute import RUN_NOTEBOOK, execute_notebook, notebook_parameters
    from arca_lab.sweep.kernel import WarmKernel, install_kernel

    root = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    jupyter = root / "jupyter"
    install_kernel(jupyter, threads=1)
    cfg = dict(rank=4, target_modules=arm, sharpening=2.0, steps=12, prompts_per_step=16, num_generations=8)
    cfg |= dict(eval_prompts=64, pass_k=4, threads=1)
    rows: dict[str, list[dict[str, float]]] = {"new kernel per run": [], "one warm kernel": []}
    loads: dict[str, list[str]] = {k: [] for k in rows}
    with WarmKernel(jupyter) as warm:
        for i in range(runs):  # interleaved, so both see the same machine load
            for mode in rows:
                out = root / mode.replace(" ", "-") / f"r{i}"
                out.parent.mkdir(parents=True, exist_ok=True)
                params = notebook_parameters(make_config(**cfg, seed=i, out=str(out)))
                notebook = out.parent / f"r{i}.ipynb"
                loads[mode].append(_load())
                start = time.perf_counter()
                if mode == "one warm kernel":
                    warm.execute(RUN_NOTEBOOK, notebook, params, out.parent)
                else:
                    execute_notebook(RUN_NOTEBOOK, notebook, params, jupyter, out.parent)
                wall = time.perf_counter() - start
                phases = notebook_phases(notebook, out / "run.nc")
                rows[mode].append(phases | {"outside": wall - phases["total"], "wall": wall})
                print(f"  {mode:<20} run {i}: {wall:6.2f} s (load {loads[mode][-1]})", file=sys.stderr)
    print(f"\nmedian seconds per phase, {runs} runs each, arm {arm} (run 0 of the warm kernel starts it)")
    print(f"{'':<34}" + "".join(f"{k:>12}" for k in PHASES) + "  load averages")
    for mode, mode_rows in rows.items():
        _print_phases(mode, mode_rows, " ".join(loads[mode]))
        _print_phases(f"{mode} (runs 1..)", mode_rows[1:] or mode_rows)
    for mode, mode_rows in rows.items():
        print(f"{mode}: wall per run {[round(r['wall'], 1) for r in mode_rows]}")


# ------------------------------------------------------------------------------------------------ table
def table(dirs: list[Path]) -> None:
    from arca_lab.sweep.cost import estimate_seconds
    from arca_lab.sweep.grid import Grid, run_id

    print(
        f"{'sweep':<28}{'runs':>5}{'kern':>6}{'load start/end':>16}{'estimated then':>16}{'range then':>18}"
        f"{'model now':>11}{'measured':>10}{'meas/now':>10}"
    )
    breakdowns = []
    for d in dirs:
        record = json.loads((d / "sweep.json").read_text())
        grid = Grid.from_json(record["grid"])
        points = {run_id(p): p for p in grid.points()}
        for s in record["sessions"]:
            ids = list(s.get("run_seconds") or points)[: s["to_run"]]  # older sessions: a first session
            configs = [dataclasses.replace(grid.config(points[i], "x"), threads=s["threads"]) for i in ids]
            warm = s.get("warm_kernels", False)
            now = estimate_seconds(configs, s["workers"], True, len(record["runs"]), warm)
            loads = f"{s.get('load_average_start', ['?'])[0]}/{s.get('load_average_end', ['?'])[0]}"
            rng = s.get("estimated_range")
            then = s.get("estimated_seconds")
            print(
                f"{d.name:<28}{s['to_run']:>5}{'warm' if warm else 'new':>6}{loads:>16}"
                f"{_min(then):>16}{(_min(rng[0]) + '-' + _min(rng[1])) if rng else '-':>18}"
                f"{_min(now):>11}{_min(s.get('seconds')):>10}"
                f"{(s['seconds'] / now) if now and s.get('seconds') else float('nan'):>10.2f}"
            )
        rows = []
        for rid in points:
            nb, nc = d / "runs" / rid / "run.ipynb", d / "runs" / rid / "run.nc"
            if nb.is_file() and nc.is_file():
                rows.append(notebook_phases(nb, nc))
        if rows:
            breakdowns.append((d.name, rows))
    print("\nmedian seconds per run and phase (executed run notebooks; sum over runs in brackets)")
    print(f"{'sweep':<34}" + "".join(f"{k:>12}" for k in PHASES))
    for name, rows in breakdowns:
        _print_phases(name, rows)
        print(f"{'  (sum)':<34}" + "".join(f"{sum(r[k] for r in rows):>12.1f}" for k in PHASES))


def _min(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------------------- estimate
def estimate() -> None:
    from arca_lab.sweep.cost import estimate_range, estimate_seconds
    from arca_lab.sweep.grid import SWEEP_PRESETS, make_grid

    print(
        f"{'preset':<10}{'runs':>6}{'idle cores':>12}{'range (no other load)':>24}{'new kernel per run':>20}"
    )
    for name in SWEEP_PRESETS:
        grid = make_grid(name)
        configs = [dataclasses.replace(grid.config(p, "x"), threads=1) for p in grid.points()]
        seconds = estimate_seconds(configs, 2)
        if seconds is None:
            print(f"{name:<10}{len(configs):>6}{'(GPU: from the first step)':>36}")
            continue
        low, high = estimate_range(seconds)
        cold = estimate_seconds(configs, 2, warm=False)  # what every run paid before the warm kernels
        print(
            f"{name:<10}{len(configs):>6}{_min(seconds):>12}{_min(low) + ' - ' + _min(high):>24}{_min(cold):>20}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("breakdown")
    b.add_argument("--runs", type=int, default=4)
    b.add_argument("--arm", default="lm_head", choices=("lm_head", "all-linear"))
    t = sub.add_parser("table")
    t.add_argument("dirs", nargs="+", type=Path)
    sub.add_parser("estimate")
    args = p.parse_args()
    if args.command == "breakdown":
        breakdown(args.runs, args.arm)
    elif args.command == "table":
        table(args.dirs)
    else:
        estimate()


if __name__ == "__main__":
    main()
