"""Benchmark `arca-lab theory check` (= ``python -m theory.cli check``): wall time of the whole command.

Run: ``python benchmarks/bench_theory.py [--repeat N]``. Each command runs in a fresh process (imports
included), as a user would run it; the table also shows the grid / random-instance split the command
prints, the exit code, and the machine's load average (timings on a shared 2-core machine depend on it).
Target: the full check ≤ 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS = "import sys, torch; from theory.cli import main; sys.exit(main({argv!r}))"
# (name, argv of `theory.cli`, extra environment, run in a process that imported torch/numpy first)
CASES = [
    ("check (full)", ["check"], {}, False),
    ("check (full), torch imported first", ["check"], {}, True),
    ("check --quick", ["check", "--quick"], {}, False),
    ("check (full), OPENBLAS_NUM_THREADS=2", ["check"], {"OPENBLAS_NUM_THREADS": "2"}, False),
    ("theory (print bounds)", [], {}, False),
]


def run(args: list[str], env_extra: dict[str, str], in_process: bool) -> tuple[float, int, str]:
    """Wall time, exit code and stdout of one fresh interpreter running the command."""
    env = {**os.environ, **env_extra}
    cmd = ["-c", IN_PROCESS.format(argv=args)] if in_process else ["-m", "theory.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (the table shows min and max)")
    args = parser.parse_args()
    print(f"{'case':40s} {'wall min [s]':>12s} {'wall max [s]':>12s} {'grid [s]':>9s} {'random [s]':>10s} "
          f"{'exit':>4s} {'load avg':>8s}")  # fmt: skip
    for name, argv, env, in_process in CASES:
        walls, rc, grid, rand = [], 0, "-", "-"
        for _ in range(args.repeat):
            wall, rc, out = run(argv, env, in_process)
            walls.append(wall)
            m = re.search(r"grid ([\d.]+)s, random ([\d.]+)s", out)
            if m:
                grid, rand = m.group(1), m.group(2)
        load = os.getloadavg()[0]
        print(f"{name:40s} {min(walls):12.1f} {max(walls):12.1f} {grid:>9s} {rand:>10s} {rc:4d} {load:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
