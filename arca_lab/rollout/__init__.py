"""Rollouts from an engine other than the trainer, for the train–inference discrepancy (arXiv 2606.08779).

- `arca_lab.rollout.engines` (re-exported here): a separate fp32 / bf16 / int8 / weight-noise copy of the policy
  that samples completions, synced to the trainer's merged LoRA weights: `ENGINES`, `check_engine`,
  `make_engine`, `RolloutEngine` (`sync`, `generate`, `model`, `last_entropies`, `sync_seconds`,
  `generate_seconds`), and the helpers `sample` (HF sampling with per-token log-probs and entropies),
  `completion_logprobs` (teacher-forced log-probs) and `merged_weight` (a LoRA layer's W0 + Σ s B A).
- `arca_lab.rollout.correction`: mismatch metrics, importance corrections and DC-GRPO shaping on the two
  log-prob tensors (import it by its module path).
"""

from arca_lab.rollout.engines import (
    ENGINES,
    INT8_BACKENDS,
    RolloutEngine,
    check_engine,
    completion_logprobs,
    make_engine,
    merged_weight,
    sample,
)

__all__ = [
    "ENGINES",
    "INT8_BACKENDS",
    "RolloutEngine",
    "check_engine",
    "completion_logprobs",
    "make_engine",
    "merged_weight",
    "sample",
]
