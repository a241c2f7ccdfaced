"""Executing notebooks for a sweep: the run notebook's parameters and the executors.

- `parameter_lines()` is the source of the run notebook's `parameters` cell, generated from RunConfig and its
  field docstrings (papermill skips a line with a second "=", so "=" in help text is rewritten).
- The sweep-local kernel and the warm kernel live in `arca_lab.sweep.kernel` (`install_kernel` writes a kernelspec
  whose argv[0] is this interpreter, so every notebook of a sweep runs in the runner's environment).
- `execute_point(task, kernel)` runs one grid point: papermill writes the executed notebook under `.work/` while it
  runs; on success it is moved to `runs/<id>/run.ipynb` (its presence marks the run finished); on failure the
  notebook and the error go to `failed/<id>/`. It never raises, so one failed run does not stop the others.
- `run_local` (a process pool whose every worker keeps one warm kernel for all its runs) and `run_submitit` (Slurm,
  or submitit's "local"/"debug" executors; a new kernel per job) yield results as runs finish.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import MISSING, dataclass, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from arca_lab.config import RunConfig, field_docs
from arca_lab.results import write_text_atomic
from arca_lab.sweep.kernel import KERNEL_NAME, WarmKernel, install_kernel, jupyter_path

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
RUN_NOTEBOOK = NOTEBOOK_DIR / "grpo_run.ipynb"
ANALYSIS_NOTEBOOK = NOTEBOOK_DIR / "rank_sweep_analysis.ipynb"
EXTRA_PARAMETERS: dict[str, tuple[str, Any, str]] = {
    "figures_dir": ("str", "", 'directory for the figures; "" means OUT/figures'),
    "progress": ("bool", False, "show the training progress bar"),
}
"""Run-notebook parameters besides the RunConfig fields: name -> (annotation, default, help)."""


# ------------------------------------------------------------------------------------- notebook parameters
def _help(text: str) -> str:
    """Help text papermill can parse: no "=" (a line with a second "=" is skipped)."""
    for old, new in (("<=", "≤"), (">=", "≥"), ("!=", "≠"), ("==", " is "), ("=", " is ")):
        text = text.replace(old, new)
    return " ".join(text.split())


def _annotation(kind: str) -> str:
    """RunConfig annotations as papermill reads them (its pattern does not allow "|")."""
    return f"Optional[{kind.split('|')[0].strip()}]" if "None" in kind else kind


def parameter_lines() -> list[str]:
    """The run notebook's `parameters` cell: one `name: type = value  # help` line per RunConfig field + extras."""
    docs = field_docs(RunConfig)
    # papermill's annotation pattern has no "|": Optional[X], and ruff's pyupgrade rule is off for this cell;
    # the formatter would wrap long lines into parentheses, which papermill cannot read.
    lines = ["# ruff: noqa: UP045", "# fmt: off", "from typing import Optional", ""]
    for f in fields(RunConfig):
        default = f.default if f.default is not MISSING else None
        lines.append(f"{f.name}: {_annotation(str(f.type))} = {_literal(default)}  # {_help(docs[f.name])}")
    for name, (kind, default, text) in EXTRA_PARAMETERS.items():
        lines.append(f"{name}: {kind} = {_literal(default)}  # {_help(text)}")
    return [*lines, "# fmt: on"]


def _literal(value: Any) -> str:
    """Python source of a default, with double quotes as the formatter writes them."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_parameters_cell(notebook: Path = RUN_NOTEBOOK) -> bool:
    """Regenerate the run notebook's `parameters` cell from RunConfig (after a field was added); True if changed.

    Command line: `python -m arca_lab.sweep.execute` (then commit the notebook; tests/test_run_notebook.py checks it).
    """
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(parameter_lines())
    if cell.source == source:
        return False
    cell.source = source
    nbformat.write(nb, notebook)
    return True


def notebook_parameters(cfg: RunConfig, **extra: Any) -> dict[str, Any]:
    """Papermill parameters that make the run notebook build exactly `cfg` (every field is passed)."""
    unknown = sorted(set(extra) - set(EXTRA_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown run-notebook parameters {unknown}; accepted: {sorted(EXTRA_PARAMETERS)}")
    return {f.name: getattr(cfg, f.name) for f in fields(RunConfig)} | extra


def config_from_parameters(namespace: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of the run notebook's parameter values (its globals)."""
    return RunConfig(**{f.name: namespace[f.name] for f in fields(RunConfig)})


def check_parameters(parameters: Mapping[str, Any], notebook: Path) -> None:
    """Refuse parameters the notebook does not declare (papermill itself only warns)."""
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    unknown = sorted(set(parameters) - declared)
    if unknown:
        raise ValueError(
            f"{notebook.name} does not declare the parameters {unknown}; it declares {sorted(declared)}"
        )


# ------------------------------------------------------------------------------------------------- kernel
def execute_notebook(
    notebook: Path, output: Path, parameters: Mapping[str, Any], jupyter_dir: Path, cwd: Path
) -> None:
    """papermill with the sweep-local kernel; the output notebook is saved after every cell."""
    import papermill

    with jupyter_path(jupyter_dir):
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=dict(parameters),
            kernel_name=KERNEL_NAME,
            cwd=str(cwd),
            progress_bar=False,
            log_output=False,
            start_timeout=300,
        )


# ----------------------------------------------------------------------------------------------- one point
@dataclass(frozen=True)
class PointTask:
    """Everything a worker (a process or a Slurm job) needs to run one grid point."""

    sweep_dir: str
    run_id: str
    parameters: dict[str, Any]
    notebook: str = str(RUN_NOTEBOOK)


@dataclass(frozen=True)
class PointResult:
    run_id: str
    ok: bool
    seconds: float
    error: str = ""


def sweep_paths(sweep_dir: str | Path, run_id: str) -> dict[str, Path]:
    root = Path(sweep_dir)
    return {
        "run": root / "runs" / run_id,
        "failed": root / "failed" / run_id,
        "work": root / ".work" / f"{run_id}.ipynb",
        "jupyter": root / ".work" / "jupyter",
    }


def is_finished(sweep_dir: str | Path, run_id: str) -> bool:
    """A run is finished when its executed notebook sits beside its run.nc (the notebook is moved in last)."""
    run = sweep_paths(sweep_dir, run_id)["run"]
    return (run / "run.ipynb").is_file() and (run / "run.nc").is_file()


def execute_point(task: PointTask, kernel: WarmKernel | None = None) -> PointResult:
    """Run one grid point's notebook (in `kernel`, or a new kernel of its own); record success in runs/<id>/ or
    the failure in failed/<id>/."""
    start = time.perf_counter()
    paths = sweep_paths(task.sweep_dir, task.run_id)
    _clear_attempt(paths)
    paths["work"].parent.mkdir(parents=True, exist_ok=True)
    try:
        notebook, cwd = Path(task.notebook), paths["run"].parent
        if kernel is None:
            execute_notebook(notebook, paths["work"], task.parameters, paths["jupyter"], cwd)
        else:
            kernel.execute(notebook, paths["work"], task.parameters, cwd)
        if not (paths["run"] / "run.nc").is_file():
            raise RuntimeError(f"the run notebook finished without writing {paths['run'] / 'run.nc'}")
        os.replace(paths["work"], paths["run"] / "run.ipynb")
        return PointResult(task.run_id, True, time.perf_counter() - start)
    except Exception as err:  # recorded, never raised: the other runs go on
        error = _error_text(err)
        _record_failure(paths, error)
        return PointResult(task.run_id, False, time.perf_counter() - start, error.splitlines()[0])


def _clear_attempt(paths: Mapping[str, Path]) -> None:
    """Remove what an earlier failed or killed attempt left (never a finished run: the caller skips those)."""
    shutil.rmtree(paths["failed"], ignore_errors=True)
    shutil.rmtree(paths["run"], ignore_errors=True)
    paths["work"].unlink(missing_ok=True)
    for stale in paths["run"].parent.glob(f".{paths['run'].name}.partial-*"):  # train()'s staging if killed
        shutil.rmtree(stale, ignore_errors=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(err: BaseException) -> str:
    """First line "Type: message", then the (kernel) traceback without terminal colours."""
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    tb = getattr(err, "traceback", None)
    body = "\n".join(tb) if isinstance(tb, list) else "".join(traceback.format_exception(err))
    return _ANSI.sub("", f"{ename}: {evalue}".replace("\n", " ") + "\n\n" + body)


def _record_failure(paths: Mapping[str, Path], error: str) -> None:
    failed = paths["failed"]
    failed.mkdir(parents=True, exist_ok=True)
    if paths["work"].exists():
        os.replace(paths["work"], failed / "run.ipynb")
    if paths["run"].exists():  # train() finished but a later cell failed: keep its output with the failure
        os.replace(paths["run"], failed / "run")
    write_text_atomic(failed / "error.txt", error)


# ------------------------------------------------------------------------------------------------ executors
def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the runner dies (even by SIGKILL), so no orphaned worker keeps going;
    its kernel then exits too (ipykernel polls its parent). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


_WORKER_KERNEL: WarmKernel | None = None
"""The local worker's warm kernel (one per worker process, started with its first run)."""


def _worker_init(log_dir: str, jupyter_dir: str) -> None:
    """Worker process set-up: die with the runner; kernels inherit its stderr, so their chatter goes to a log;
    one warm kernel for every run the worker is given, shut down when the worker exits."""
    global _WORKER_KERNEL
    from multiprocessing.util import Finalize

    _die_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    log = os.open(Path(log_dir) / f"worker-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    _WORKER_KERNEL = WarmKernel(Path(jupyter_dir))
    Finalize(_WORKER_KERNEL, _WORKER_KERNEL.shutdown, exitpriority=10)  # runs when the pool ends the worker


def _execute_in_worker(task: PointTask) -> PointResult:
    return execute_point(task, _WORKER_KERNEL)


def run_local(tasks: Sequence[PointTask], workers: int) -> Iterator[PointResult]:
    """Execute `tasks` on `workers` local processes, each with one warm kernel; yield results as runs finish."""
    if not tasks:
        return
    ctx = get_context("spawn")  # the runner has imported torch; forking a threaded process is unsafe
    work = Path(tasks[0].sweep_dir) / ".work"
    init_args = (str(work / "logs"), str(work / "jupyter"))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=init_args) as pool:
        futures = {pool.submit(_execute_in_worker, t): t for t in tasks}
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except Exception as err:  # a worker process died (e.g. killed by the OOM killer)
                    yield PointResult(futures[fut].run_id, False, 0.0, _error_text(err).splitlines()[0])
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def run_submitit(
    tasks: Sequence[PointTask],
    folder: Path,
    cluster: str = "slurm",
    parameters: Mapping[str, Any] | None = None,
    poll_seconds: float = 2.0,
) -> Iterator[PointResult]:
    """Submit one job per task with submitit (cluster "slurm", or "local" / "debug" to test without Slurm)."""
    try:
        import submitit
    except ImportError:
        raise ValueError('--executor slurm needs submitit: pip install "arca-lab[slurm]"') from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(name="arca-lab-sweep", **dict(parameters or {}))
    jobs = {}
    for task in tasks:
        jobs[executor.submit(execute_point, task)] = task
    pending = dict(jobs)
    while pending:
        for job in [j for j in pending if j.done()]:
            task = pending.pop(job)
            try:
                yield job.result()
            except Exception as err:  # the job itself died (time limit, node failure, ...)
                yield PointResult(task.run_id, False, 0.0, _error_text(err).splitlines()[0])
        if pending:
            time.sleep(poll_seconds)


# ------------------------------------------------------------------------------------------ analysis notebook
@contextmanager
def _stderr_to(path: Path):
    """Point file descriptor 2 at `path` for a block: the kernel started inside inherits it, so its chatter (and
    anything else written to stderr meanwhile) goes to the log; errors still reach the caller as exceptions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def analysis_notebook(sweep_dir: Path) -> Path:
    """The analysis notebook of the sweep's preset (`SweepPreset.analysis`, recorded preset in sweep.json);
    `ANALYSIS_NOTEBOOK` for a sweep without a known preset."""
    from arca_lab.sweep.grid import get_preset, preset_names

    try:
        preset = json.loads((sweep_dir / "sweep.json").read_text()).get("preset", "")
    except (OSError, ValueError):
        preset = ""
    own = get_preset(preset).analysis if preset in preset_names() else ""
    return NOTEBOOK_DIR / own if own else ANALYSIS_NOTEBOOK


SUMMARY = "summary.txt"
"""Written by an analysis notebook that has verdicts to print (prediction_analysis.ipynb); `arca-lab report` and
`arca-lab sweep` print it after the notebook ran."""


def analysis_summary(sweep_dir: Path) -> str:
    """The summary the analysis notebook wrote (SWEEP_DIR/summary.txt), or "" when it writes none."""
    path = Path(sweep_dir) / SUMMARY
    return path.read_text() if path.is_file() else ""


def execute_analysis(sweep_dir: Path, notebook: Path | None = None) -> tuple[Path | None, str]:
    """Execute the analysis notebook into `sweep_dir/analysis.ipynb` (figures in `sweep_dir/figures`).

    Returns (executed notebook or None, error text or ""). A missing notebook is skipped with a message.
    """
    notebook = notebook or analysis_notebook(sweep_dir)
    if not notebook.is_file():
        print(
            f"warning: analysis notebook {notebook} not found: skipped (run `arca-lab report` once it exists)",
            file=sys.stderr,
        )
        return None, ""
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    params: dict[str, Any] = {"sweep_dir": str(sweep_dir.resolve())}
    if "figures_dir" in declared:
        params["figures_dir"] = str(sweep_dir.resolve() / "figures")
    check_parameters(params, notebook)
    jupyter = sweep_dir / ".work" / "jupyter"
    install_kernel(jupyter)  # (re)written: the report may run from another interpreter than the sweep did
    work = sweep_dir / ".work" / "analysis.ipynb"
    final = sweep_dir / "analysis.ipynb"
    (sweep_dir / SUMMARY).unlink(missing_ok=True)  # a summary printed afterwards is this execution's
    try:
        with _stderr_to(sweep_dir / ".work" / "logs" / "analysis-kernel.log"):
            execute_notebook(notebook, work, params, jupyter, sweep_dir)
        os.replace(work, final)
        return final, ""
    except Exception as err:
        if work.exists():
            os.replace(work, final)  # the executed-up-to-the-error notebook is the report of the failure
        return final, _error_text(err)


if __name__ == "__main__":
    changed = write_parameters_cell()
    print(f"{RUN_NOTEBOOK}: parameters cell {'regenerated' if changed else 'already up to date'}")
