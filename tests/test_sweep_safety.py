"""A sweep directory is safe to run twice: one sweep or report at a time (lock), and a corrupt finished run is
detected, set aside and re-run instead of crashing the resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from arca_lab.exit_codes import EX_TEMPFAIL
from arca_lab.sweep import combine_sweep, load_sweep, main, report_main, run_sweep
from arca_lab.sweep import execute as sweep_exec
from arca_lab.sweep.grid import make_grid

TINY = dict(
    steps=2, prompts_per_step=2, num_generations=2, max_completion_length=12, eval_prompts=4, pass_k=2
)
ONE_POINT = dict(rank=[1], credit=["uniform"], seed=[0], arm=["all"], alpha_rule=["2r"])
RUN = "r1-uniform-s0-all-a2r"


@pytest.fixture
def one_run_sweep(tiny_model_dir, tmp_path):
    grid = make_grid("default", ONE_POINT, {"model": str(tiny_model_dir), **TINY})
    out = tmp_path / "s"
    outcome = run_sweep(grid, out, progress=False, analysis=False, log=lambda *a: None)
    assert outcome.finished == [RUN]
    return grid, out


def test_a_second_sweep_on_a_locked_directory_is_refused_and_loses_nothing(one_run_sweep, tiny_model_dir):
    grid, out = one_run_sweep
    before = (out / "runs" / RUN / "run.nc").read_bytes()
    holder = subprocess.Popen(  # another sweep in progress: a process holding the directory's lock
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from filelock import FileLock
                lock = FileLock({str(out / ".sweep.lock")!r})
                lock.acquire()
                print("locked", flush=True)
                time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["--out", str(out), "--rank", "1", "--credit", "uniform", "--seed", "0", "--arm", "all"]
        args += ["--alpha-rule", "2r", "--no-analysis", "--quiet", "--set", f"model={tiny_model_dir}"]
        args += [f"{k}={v}" for k, v in TINY.items()]
        assert main(args) == EX_TEMPFAIL
        assert report_main([str(out)]) == EX_TEMPFAIL
        with pytest.raises(RuntimeError, match=r"another arca-lab sweep or report is running.*\.sweep\.lock"):
            run_sweep(grid, out, progress=False, analysis=False, log=lambda *a: None)
    finally:
        holder.kill()
        holder.wait()
    assert sweep_exec.is_finished(out, RUN) and (out / "runs" / RUN / "run.nc").read_bytes() == before
    assert not (out / "failed").exists()
    # the holder died: its OS lock went with it, so the same command resumes (nothing left to run)
    outcome = run_sweep(grid, out, progress=False, analysis=False, log=lambda *a: None)
    assert outcome.skipped == [RUN] and not outcome.finished


def test_a_corrupt_finished_run_is_set_aside_and_rerun(one_run_sweep):
    grid, out = one_run_sweep
    nc = out / "runs" / RUN / "run.nc"
    nc.write_bytes(nc.read_bytes()[: nc.stat().st_size // 2])  # truncated, e.g. by a full disk
    with pytest.raises(ValueError, match=rf"unreadable run.nc.*{RUN}.*re-run the sweep command"):
        combine_sweep(out)  # what report does: a clear error, not an h5py traceback
    lines = []
    outcome = run_sweep(grid, out, progress=False, analysis=False, log=lines.append)
    assert any(f"run {RUN}: run.nc is unreadable" in line and "re-run" in line for line in lines)
    assert outcome.finished == [RUN] and not outcome.failed
    assert float(load_sweep(out)["has_run"].sum()) == 1  # the re-run is readable and combined
