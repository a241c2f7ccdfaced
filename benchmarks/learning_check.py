"""Is learning shown? Paired held-out accuracy gain of `arca-lab train` over the base model, across seeds.

    python benchmarks/learning_check.py --credit arca --rank 4 --seeds 0 1 2 --out runs/learning

Every run scores the same held-out prompts before and after training (arca_lab.run.EVAL_SEED), so the gain is
paired per prompt. Reported: per-seed greedy accuracy before/after, the mean gain with its standard error over
seeds, and the per-prompt paired standard error of the seed-averaged gain; "shown" = mean gain > 2 SE (both).
Runs already present under --out are reused (delete them to re-run).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np

from arca_lab.config import make_config
from arca_lab.results import load_run
from arca_lab.run import train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--credit", default="arca")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/learning"))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    for key in list(extra):  # numbers as numbers
        with contextlib.suppress(ValueError):
            extra[key] = float(extra[key]) if "." in extra[key] or "e" in extra[key] else int(extra[key])

    before, after, gains = [], [], []
    print(f"{'seed':>4} {'before':>7} {'after':>7} {'gain':>7} {'minutes':>8}")
    for seed in args.seeds:
        out = args.out / f"{args.credit}-r{args.rank}-s{seed}"
        t0 = time.time()
        if not (out / "run.nc").exists():
            train(
                make_config(credit=args.credit, rank=args.rank, seed=seed, out=str(out), **extra),
                progress=False,
            )
        ds = load_run(out)
        b, a = ds["greedy_correct_before"].values, ds["greedy_correct_after"].values
        before.append(b)
        after.append(a)
        gains.append(a.mean() - b.mean())
        print(
            f"{seed:>4} {b.mean():7.3f} {a.mean():7.3f} {a.mean() - b.mean():+7.3f} {(time.time() - t0) / 60:8.1f}"
        )

    gains = np.array(gains)
    se_seed = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else float("nan")
    paired = (np.array(after) - np.array(before)).mean(axis=0)  # (prompts,) seed-averaged paired difference
    se_prompt = paired.std(ddof=1) / np.sqrt(paired.size)
    print(
        f"\nmean gain {gains.mean():+.4f}  SE over seeds {se_seed:.4f}  paired SE over prompts {se_prompt:.4f}"
    )
    shown = gains.mean() > 2 * se_seed and gains.mean() > 2 * se_prompt
    print(f"learning shown (gain > 2 SE on both): {'yes' if shown else 'no'}")


if __name__ == "__main__":
    main()
