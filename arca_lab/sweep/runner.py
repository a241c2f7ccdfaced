"""Running a sweep: check everything, record the grid, build the base model once, execute, combine, analyse.

`run_sweep(grid, out, ...)` is what `arca-lab sweep` calls; the directory layout it writes is described in the
`arca_lab.sweep` module docstring. Every check (grid values, unknown config keys and notebook parameters, matched
budgets, a directory made with a different grid, an unwritable directory) happens before the first run starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import xarray as xr
from filelock import FileLock, Timeout

from arca_lab.results import write_netcdf, write_text_atomic
from arca_lab.sweep.cost import available_cpus, default_threads
from arca_lab.sweep.cube import combine_runs, format_table, load_runs, summary_table
from arca_lab.sweep.grid import NOT_COMPARED, Grid, check_matched_budgets, run_id
from arca_lab.sweep.progress import FirstStepWatch, Plan, load_average

SWEEP_FORMAT = 1


# ------------------------------------------------------------------------------------------------- runner
@dataclasses.dataclass
class SweepOutcome:
    sweep_dir: Path
    finished: list[str]
    """Runs finished by this invocation."""
    skipped: list[str]
    """Runs already finished before (resumed sweep)."""
    failed: dict[str, str]
    """run_id -> first line of its error."""
    rows: list[dict[str, Any]]
    analysis_error: str = ""
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """Number of failed runs (+1 if the analysis notebook failed), capped at 63 (64 means bad input)."""
        return min(63, len(self.failed) + bool(self.analysis_error))


def _comparable(grid: Grid) -> dict[str, Any]:
    shared = {k: v for k, v in grid.shared_config().items() if k not in NOT_COMPARED}
    return json.loads(json.dumps({"shared": shared, "extra_axes": list(grid.extra_axes)}))


def _reconcile(grid: Grid, out: Path, extend: bool) -> Grid:
    """The grid to run in `out`: refuse a directory made with a different grid (or add to it with `extend`)."""
    path = out / "sweep.json"
    if not path.is_file():
        if out.is_dir() and any(p.name in ("runs", "sweep.nc") for p in out.iterdir()):
            raise ValueError(f"{out} holds sweep output but no sweep.json: choose another --out")
        return grid
    stored = json.loads(path.read_text())
    old = Grid.from_json(stored["grid"])
    a, b = _comparable(old), _comparable(grid)
    if a != b:
        diff = {k: (a["shared"].get(k), b["shared"].get(k)) for k in a["shared"] | b["shared"]}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        if a["extra_axes"] != b["extra_axes"]:
            diff["extra_axes"] = (a["extra_axes"], b["extra_axes"])
        raise ValueError(
            f"{out} was made with different shared settings (old, new): {diff}; its runs would not be "
            "comparable: re-run with the arguments it was made with, or choose another --out"
        )
    old_ids, new_ids = [run_id(p) for p in old.points()], [run_id(p) for p in grid.points()]
    if set(old_ids) == set(new_ids):
        return old
    if not extend:
        raise ValueError(
            f"{out} was made with a different grid: only in the existing sweep {sorted(set(old_ids) - set(new_ids))}, "
            f"only in this command {sorted(set(new_ids) - set(old_ids))}; re-run with the arguments it was made "
            "with, add --extend to add this command's points to it, or choose another --out"
        )
    extra = tuple(s for s in grid.subgrids if s not in old.subgrids)
    return dataclasses.replace(old, subgrids=old.subgrids + extra)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"cannot write the sweep directory {out} ({err.strerror or err}): choose another --out"
        ) from None


def _failures(out: Path, ids: Iterable[str]) -> dict[str, str]:
    failed = {}
    for rid in ids:
        err = out / "failed" / rid / "error.txt"
        if err.is_file():
            failed[rid] = (err.read_text().splitlines() or ["unknown error"])[0]
    return failed


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _previous_sessions(out: Path) -> list[dict[str, Any]]:
    """The `sessions` list of an existing sweep.json (empty for a new sweep or one written before sessions)."""
    path = out / "sweep.json"
    return json.loads(path.read_text()).get("sessions", []) if path.is_file() else []


class SweepLocked(RuntimeError):
    """Another process holds the sweep directory's lock."""


@contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold `out/.sweep.lock` for a whole sweep or report; a second one on the same directory is refused at once.

    An OS file lock (`filelock.FileLock`, flock): released when its process exits, even if killed, so a crashed
    sweep never leaves the directory locked. With `--executor slurm` the submitting process holds it while its
    jobs run, so two submissions of one sweep cannot start the same run twice.
    """
    lock = FileLock(str(out / ".sweep.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SweepLocked(
            f"another arca-lab sweep or report is running in {out} (it holds {out / '.sweep.lock'}): wait for it "
            "to finish (re-running the same command afterwards resumes), or choose another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _load_finished(out: Path, ids: Iterable[str]) -> tuple[dict[str, xr.Dataset], dict[str, str]]:
    """The finished runs among `ids`, loaded once (on every core): ({run_id: dataset}, {run_id: error})."""
    from arca_lab.sweep.execute import is_finished

    done = [rid for rid in ids if is_finished(out, rid)]
    datasets, errors = load_runs([out / "runs" / rid for rid in done], processes=available_cpus())
    loaded = {rid: ds for rid, ds in zip(done, datasets, strict=True) if ds is not None}
    return loaded, {rid: err for rid, err in zip(done, errors, strict=True) if err}


def unreadable_runs(out: Path, ids: Iterable[str]) -> dict[str, str]:
    """Finished-looking runs whose run.nc cannot be read (e.g. truncated by a full disk): run_id -> error."""
    return _load_finished(out, ids)[1]


def _set_aside(out: Path, rid: str, error: str) -> Path:
    """Move an unreadable finished run to failed/<id>/ with error.txt, so the runner re-runs it."""
    failed = out / "failed" / rid
    shutil.rmtree(failed, ignore_errors=True)
    failed.parent.mkdir(parents=True, exist_ok=True)
    (out / "runs" / rid).rename(failed)
    write_text_atomic(failed / "error.txt", f"run.nc unreadable, run set aside to re-run: {error}\n")
    return failed


def combine_sweep(out: Path) -> tuple[xr.Dataset | None, list[dict[str, Any]]]:
    """Combine a sweep directory's finished runs into `sweep.nc` (atomic) and `summary.txt`.

    Runs whose run.nc cannot be read are left out and raise a ValueError naming them and the fix.
    """
    from arca_lab.sweep.execute import is_finished

    stored = json.loads((out / "sweep.json").read_text())
    grid = Grid.from_json(stored["grid"])
    ids = [run_id(p) for p in grid.points()]
    loaded, bad = _load_finished(out, ids)  # each run.nc read once: the check and the cube
    if bad:
        raise ValueError(
            f"unreadable run.nc in {len(bad)} run(s): {bad}; re-run the sweep command to set them aside and "
            "re-run them"
        )
    if not loaded:
        return None, []
    failed = _failures(out, [i for i in ids if not is_finished(out, i)])
    cube = combine_runs(
        loaded.values(),
        grid.extra_axes,
        attrs={"sweep_json": json.dumps(stored), "failed_json": json.dumps(failed)},
    )
    write_netcdf(cube, out / "sweep.nc")
    rows = summary_table(cube)
    write_text_atomic(out / "summary.txt", format_table(rows) + "\n")
    return cube, rows


def run_sweep(
    grid: Grid,
    out: str | Path,
    workers: int | None = None,
    executor: str = "local",
    *,
    extend: bool = False,
    allow_unmatched_budget: bool = False,
    analysis: bool = True,
    progress: bool = True,
    dry_run: bool = False,
    submitit_cluster: str = "slurm",
    submitit_parameters: Mapping[str, Any] | None = None,
    preset: str = "",
    log=print,
) -> SweepOutcome:
    """Run (or resume) a sweep into `out`; every check happens before the first run starts."""
    from arca_lab.sweep import execute as ex

    start = time.perf_counter()
    out = Path(out).resolve()
    if executor not in ("local", "slurm"):
        raise ValueError(f"executor={executor!r} is not valid: choose local or slurm")
    grid = _reconcile(grid, out, extend) if out.is_dir() else grid
    points = grid.points()
    if not points:
        raise ValueError("empty grid: every sub-grid needs at least one value per axis")
    cpus = available_cpus()
    if workers is None:  # one run per core on CPU; a real model's run uses the whole device, so one at a time
        embedded = all(grid.config(p, "x").model == "embedded" for p in points)
        workers = min(cpus, len(points)) if embedded else 1
    if workers < 1:
        raise ValueError(f"workers={workers} is not valid: use >= 1")
    params = dict(submitit_parameters or {})
    threads = grid.shared.get("threads") or (
        default_threads(workers, cpus) if executor == "local" else int(params.get("cpus_per_task", 0))
    )
    configs = {
        run_id(p): dataclasses.replace(grid.config(p, str(out / "runs" / run_id(p))), threads=threads)
        for p in points
    }
    prompts, completions = check_matched_budgets(list(configs.values()), allow_unmatched_budget)
    if not ex.RUN_NOTEBOOK.is_file():
        raise FileNotFoundError(
            f"run notebook {ex.RUN_NOTEBOOK} not found: install arca-lab from its repository (-e)"
        )
    first = next(iter(configs.values()))
    ex.check_parameters(ex.notebook_parameters(first, figures_dir="", progress=False), ex.RUN_NOTEBOOK)
    # Everything below reads or writes the sweep directory: under its lock (a dry run only reads).
    with ExitStack() as held:
        if not dry_run:
            _check_writable(out)
            held.enter_context(sweep_lock(out))
            for rid, error in unreadable_runs(out, configs).items():
                where = _set_aside(out, rid, error)
                log(f"run {rid}: run.nc is unreadable ({error}); set aside in {where} and re-run")
        pending = [i for i in configs if not ex.is_finished(out, i)]
        skipped = [i for i in configs if i not in pending]
        needs_build = any(configs[i].model == "embedded" for i in pending)
        if needs_build:
            from arca_lab.embedded import BUILD_INFO, EmbeddedSpec, cache_root

            spec_dir = cache_root() / "embedded" / f"s0-{EmbeddedSpec().build_hash(0)}"
            cached = (spec_dir / BUILD_INFO).is_file()
        plan = Plan(
            {i: configs[i] for i in pending},
            len(configs),
            workers,
            threads,
            cpus,
            warm=executor == "local",  # a local worker keeps its kernel; a Slurm job starts one per run
            build_cached=not needs_build or cached,
        )
        log(
            f"sweep {out}: {len(configs)} runs ({len(skipped)} finished before, {len(pending)} to run) over "
            f"{', '.join(grid.axes)}; {workers} {executor} worker(s) x {threads or 'all'} thread(s); every run "
            f"sees {prompts} prompts / {completions} completions" + (f"; {plan.text()}" if pending else "")
        )
        if dry_run:
            for i in configs:
                log(f"  {'done ' if i in skipped else 'to do'}  {i}")
            return SweepOutcome(out, [], skipped, {}, [], seconds=time.perf_counter() - start)

        (out / "runs").mkdir(exist_ok=True)
        session = dict(
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            to_run=len(pending),
            workers=workers,
            threads=threads,
            executor=executor,
            **plan.record(),
        )
        record = {
            "format": SWEEP_FORMAT,
            "preset": preset,
            "grid": grid.to_json(),
            "shared_config": grid.shared_config(),
            "runs": list(configs),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            # each invocation's plan and, once it ends, its measured wall time (the cost model's check)
            "sessions": [*_previous_sessions(out), session],
        }
        _write_json(out / "sweep.json", record)
        if needs_build:
            from arca_lab.embedded import embedded_model_dir

            if not cached:
                log(
                    "building the embedded base model once (about a minute on 2 idle cores; cached afterwards) ..."
                )
            embedded_model_dir()
        clock_dir = out / ".work" / "clock"
        shutil.rmtree(clock_dir, ignore_errors=True)  # an earlier session's clocks would pass for this one's
        ex.install_kernel(out / ".work" / "jupyter", threads=threads, clock_dir=clock_dir)
        tasks = [
            ex.PointTask(str(out), i, ex.notebook_parameters(configs[i], figures_dir="", progress=False))
            for i in pending
        ]
        results = (
            ex.run_local(tasks, workers)
            if executor == "local"
            else ex.run_submitit(tasks, out / ".work" / "submitit", submitit_cluster, params)
        )
        finished, failed = [], {}
        from tqdm.auto import tqdm

        def first_step(first) -> None:  # called once, from the watch thread
            text, session["first_step"] = plan.first_step(first)
            if progress:
                tqdm.write(text)  # above the progress bar
            else:
                log(text)

        run_seconds: dict[str, float] = {}
        session["run_seconds"] = run_seconds  # per run, what the cost model is calibrated on
        with (
            FirstStepWatch(clock_dir, first_step),
            tqdm(total=len(tasks), unit="run", desc="sweep", disable=not progress or not tasks) as bar,
        ):
            for res in results:
                run_seconds[res.run_id] = round(res.seconds, 1)
                if res.ok:
                    finished.append(res.run_id)
                else:
                    failed[res.run_id] = res.error
                    bar.write(f"FAILED {res.run_id}: {res.error} (see {out / 'failed' / res.run_id})")
                bar.set_postfix(failed=len(failed), last=f"{res.run_id} {res.seconds:.0f}s")
                bar.update()
        cube, rows = combine_sweep(out)
        analysis_error = ""
        if analysis and cube is not None:
            path, analysis_error = ex.execute_analysis(out)
            if analysis_error:
                log(f"analysis notebook failed: {analysis_error.splitlines()[0]} (see {path})")
            elif ex.analysis_summary(out):
                log(ex.analysis_summary(out).rstrip())
        seconds = time.perf_counter() - start
        session.update(
            seconds=round(seconds, 1),
            finished=len(finished),
            failed=len(failed),
            load_average_end=list(load_average()),
        )
        _write_json(out / "sweep.json", record)
        log(plan.verdict(seconds, session.get("first_step")))
        return SweepOutcome(out, finished, skipped, failed, rows, analysis_error, seconds)
