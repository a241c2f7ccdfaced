"""arca-lab: LoRA, token credit (ARCA and baselines) and KL in GRPO fine-tuning of language models."""

import os

# OpenMP threads that spin while they wait make 2 torch threads ~10x slower as soon as another process shares the
# cores (sweep workers, a notebook kernel, a test run): measured in benchmarks/bench_credit.py. Let them sleep.
# Takes effect only if arca_lab is imported before torch; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
