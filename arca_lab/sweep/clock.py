"""The step clock: a run notebook records when its optimiser steps end; the runner reads the first one.

Models without a cost model (anything but the embedded default) get their sweep estimate from the first measured
step (`arca_lab.sweep.grid.estimate_from_first_step`). The run notebook wraps `train()` in `step_clock(out)`; in a
sweep kernel (`ARCA_LAB_SWEEP_CLOCK` set by its kernelspec) that writes `<clock dir>/<run_id>.json`:
    {"run_id", "started": time the train cell began, "train_begin", "steps": [end time of each step, ...],
     "max_steps", "train_end"}                        (seconds since the epoch; rewritten atomically at each event)
Outside a sweep kernel `step_clock` does nothing. The clock reaches the trainer through transformers'
`DEFAULT_CALLBACKS` (every Trainer built inside the block gets it), because `train()` takes no callbacks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOCK_ENV = "ARCA_LAB_SWEEP_CLOCK"
"""Environment variable (set in the sweep kernelspec) naming the directory of the clock files."""


# ----------------------------------------------------------------------------------------- kernel side
def _write(path: Path, record: dict[str, Any]) -> None:
    from arca_lab.results import write_text_atomic

    write_text_atomic(path, json.dumps(record) + "\n")


@contextmanager
def step_clock(out: str | Path) -> Iterator[None]:
    """Record the step times of the Trainer built inside the block (a sweep kernel only; else a no-op)."""
    clock_dir = os.environ.get(CLOCK_ENV)
    if not clock_dir:
        yield
        return
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback

    run_id = Path(out).name
    path = Path(clock_dir) / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"run_id": run_id, "started": time.time(), "steps": []}
    _write(path, record)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record.update(train_begin=time.time(), max_steps=state.max_steps)
            _write(path, record)

        def on_step_end(self, args, state, control, **kwargs):
            record["steps"].append(time.time())
            _write(path, record)

        def on_train_end(self, args, state, control, **kwargs):
            record["train_end"] = time.time()
            _write(path, record)

    clock = StepClock()
    hf_trainer.DEFAULT_CALLBACKS.append(clock)
    try:
        yield
    finally:
        hf_trainer.DEFAULT_CALLBACKS.remove(clock)


# ----------------------------------------------------------------------------------------- runner side
@dataclass(frozen=True)
class FirstStep:
    """What the first finished step of a run says about its cost."""

    run_id: str
    setup: float
    """Seconds from the train cell's start to the first step's start: model load, eval before, trainer set-up."""
    step: float
    """Seconds of the first optimiser step."""


def read_first_step(clock_dir: Path) -> FirstStep | None:
    """The earliest-started run in `clock_dir` with a finished step, or None (no step finished yet)."""
    best = None
    for path in Path(clock_dir).glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # being replaced right now: read it on the next poll
            continue
        finished_a_step = record.get("steps") and "train_begin" in record
        if finished_a_step and (best is None or record["started"] < best["started"]):
            best = record
    if best is None:
        return None
    return FirstStep(
        best["run_id"], best["train_begin"] - best["started"], best["steps"][0] - best["train_begin"]
    )
