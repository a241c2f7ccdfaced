"""What a sweep says about its time: the plan's estimate, the estimate from the first measured step, the verdict.

`Plan` is one invocation's estimate: the cost model (`arca_lab.sweep.cost`) for embedded runs, printed as a
range (recorded spread, widened by the load average of other processes if it lasts), or nothing yet for other
models. `FirstStepWatch` polls the step clocks (`arca_lab.sweep.clock`) in a thread and reports the estimate
from the first finished step once, for every model (for the embedded one it checks the cost model under the
machine's actual load). Everything shown is also recorded in the session of `sweep.json`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arca_lab.config import RunConfig
from arca_lab.sweep.clock import FirstStep, read_first_step
from arca_lab.sweep.cost import (
    estimate_from_first_step,
    estimate_range,
    estimate_seconds,
    load_slowdown,
)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return (0.0, 0.0, 0.0)
    return (round(one, 2), round(five, 2), round(fifteen, 2))


@dataclass
class Plan:
    """The time estimate of one sweep invocation (runs to do `configs` of `total_runs`)."""

    configs: Mapping[str, RunConfig]
    total_runs: int
    workers: int
    threads: int
    cpus: int
    warm: bool = True
    build_cached: bool = True
    load: tuple[float, float, float] | None = None
    """Load averages when planned (default: now)."""

    def __post_init__(self) -> None:
        self.load = self.load or load_average()
        runs = list(self.configs.values())
        self.seconds = estimate_seconds(runs, self.workers, self.build_cached, self.total_runs, self.warm)
        # The sweep's own workers have not started yet: the load average is other processes' (and this one's).
        self.slowdown = load_slowdown(self.workers, self.threads, self.cpus, self.load[0])
        self.range = estimate_range(self.seconds, self.slowdown) if self.seconds is not None else None

    def text(self) -> str:
        """The estimate for the sweep's header line."""
        if not self.configs:
            return "nothing to run"
        load = f"load average {self.load[0]:g} on {self.cpus} cores"
        if self.seconds is None or self.range is None:
            models = sorted({c.model for c in self.configs.values() if c.model != "embedded"})
            return (
                f"no cost model for {', '.join(models)}: estimated once the first step is measured ({load})"
            )
        low, high = self.range
        return (
            f"estimated {minutes(self.seconds)} on idle cores, {minutes(low)}-{minutes(high)} here ({load})"
        )

    def record(self) -> dict[str, Any]:
        """The plan's fields of the sweep.json session."""
        return dict(
            estimated_seconds=None if self.seconds is None else round(self.seconds, 1),
            estimated_range=None if self.range is None else [round(s, 1) for s in self.range],
            load_average_start=list(self.load),
            cpus=self.cpus,
            warm_kernels=self.warm,
        )

    def first_step(self, first: FirstStep) -> tuple[str, dict[str, Any]]:
        """(line to print, session record) of the estimate from the first measured step."""
        measured = self.configs[first.run_id]
        seconds, low, high = estimate_from_first_step(
            list(self.configs.values()), measured, first, self.workers, self.total_runs, self.warm
        )
        text = (
            f"first step measured ({first.run_id}: set-up {first.setup:.1f} s, step {first.step:.2f} s): "
            f"estimated {minutes(seconds)} in all, {minutes(low)}-{minutes(high)}"
        )
        if self.seconds is not None:
            text += f" (cost model: {minutes(self.seconds)})"
        record = dict(
            run_id=first.run_id,
            setup_seconds=round(first.setup, 2),
            step_seconds=round(first.step, 3),
            estimated_seconds=round(seconds, 1),
            estimated_range=[round(low, 1), round(high, 1)],
        )
        return text, record

    def verdict(self, seconds: float, first_step: Mapping[str, Any] | None) -> str:
        """Measured wall time next to what was estimated."""
        parts = []
        if self.seconds is not None and self.range is not None:
            low, high = self.range
            parts.append(f"estimated {minutes(self.seconds)} ({minutes(low)}-{minutes(high)})")
        if first_step:
            parts.append(f"{minutes(first_step['estimated_seconds'])} from the first step")
        said = f"; {', '.join(parts)}" if parts else ""
        return f"wall time {minutes(seconds)}{said}; load average now {load_average()[0]:g}"


class FirstStepWatch:
    """A thread that waits for the first finished step in `clock_dir` and calls `report(first)` once (at the
    latest when the block ends: runs shorter than a poll are reported too)."""

    def __init__(
        self, clock_dir: Path, report: Callable[[FirstStep], None], poll_seconds: float = 1.0
    ) -> None:
        self.clock_dir = clock_dir
        self.report = report
        self.poll_seconds = poll_seconds
        self.reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="first-step-watch", daemon=True)

    def _check(self) -> bool:
        first = read_first_step(self.clock_dir)
        if first is not None:
            self.reported = True
            self.report(first)
        return self.reported

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if self._check():
                return

    def __enter__(self) -> FirstStepWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if not self.reported:
            self._check()
