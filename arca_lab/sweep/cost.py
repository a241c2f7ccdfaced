"""How long a sweep takes: the cost model of the embedded default, its range, and estimates from a first step.

Cost model (`estimate_seconds`), for the embedded default on CPU; constants measured on this project's 2-core
machine (`COST`, `benchmarks/bench_sweep.py`), in seconds:
    run      = notebook + set-up + evals * eval + steps * step
    evals    = 1 (after; a warm kernel evaluates the base model once, `arca_lab.run._BEFORE`), + 2 with a rollout
               engine (its accuracy before and after), each greedy + pass_k samples; + one greedy eval per
               `eval_at` step
    step     = per_completion * prompts_per_step * num_generations * credit, arm, beta factors / speed-up(threads)
    eval     = per_eval_sequence * eval_prompts * (1 + pass_k)          (greedy + pass_k samples, before and after)
    worker   = kernel (once: a local worker keeps its kernel warm) + its runs; with Slurm every run pays a kernel
    sweep    = start-up + base-model build (0 when cached) + makespan(workers, runs in order)
               + combine + analysis + (combine + analysis) per finished run
The model is calibrated on idle cores. `estimate_range` widens it to what recorded sweeps measured on the shared
machine, and to the slow-down the current load average implies if it lasts.

Other models (the GPU presets, a local checkpoint) have no cost model: `estimate_from_first_step` scales the
first measured step and set-up of a run (`arca_lab.sweep.clock`) to every run of the sweep with the step factors
below (ratios of step costs, measured on the embedded model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from arca_lab.config import RunConfig
from arca_lab.sweep.clock import FirstStep

COST = dict(
    # Measured with benchmarks/bench_sweep.py on the 2-core project machine (torch 2.13 CPU, 2 workers x 1 thread,
    # warm kernels; per-run medians of the executed notebooks and run.nc step times), recalibrated on the full
    # preset of 1 Dec 2026 (300 runs, 24.9 min, idle cores: benchmarks/sweep_timing.md).
    kernel=9.0,  # once per kernel: its start 2 s + imports of torch/transformers/trl/peft 5-6 s, two at once
    notebook=0.55,  # per run in a warm kernel: namespace reset (0.03 s: imports frozen), figures 0.45, papermill
    setup=0.6,  # model load, trainer construction, writing adapter + run.nc
    # step seconds per sampled completion: 0.74 s per step of 16 x 8 (arm all, uniform; median of steps 2-12 over
    # the 60 such runs). The 30 Nov full sweep measured 0.84 s at ranks 4-32 (0.0067): the machine's own spread.
    per_completion=0.0058,
    per_eval_sequence=0.0018,  # one greedy or sampled held-out completion
    build=60.0,  # the embedded base-model build when not cached (61.5 s on idle cores; it stops at an accuracy)
    startup=5.0,  # runner imports, kernelspec, worker processes
    combine=5.0,  # ending the workers and their kernels, starting the processes that read the runs ...
    combine_per_run=0.2,  # ... reading run.nc files into sweep.nc on 2 processes (0.36 s per file on one)
    analysis=30.0,  # the analysis notebook's fixed part (76 s for the 300-run full sweep, 43 s of it verify) ...
    analysis_per_run=0.15,  # ... plus verify-bound on 8 held-out prompts per run, on 2 processes (0.3 s on one)
)
CREDIT_FACTOR = {"divergence": 1.16, "arca": 1.14, "entropy_reduction": 1.02}
"""Step-time multiplier per credit relative to uniform, all-linear LoRA (divergence and arca: one extra no-grad
base forward over every row); medians of the full preset's steps 2-12, 1 Dec 2026 (surprisal 0.98: 1)."""
HEAD_CREDIT_FACTOR = {"entropy_reduction": 1.04}
"""The same for head-only LoRA, which needs no base pass (its backbone is the base model's): 1.0-1.04 measured."""
ARM_FACTOR = {"lm_head": 0.49}
"""Step-time multiplier for head-only LoRA (0.36 s vs 0.74 s per step, uniform: no adapter in the layers)."""
BETA_FACTOR = 1.15
"""Step-time multiplier when beta > 0 (TRL's reference forward with the adapter disabled): 1.14x CPU time
measured by benchmarks/bench_credit.py."""
ESTIMATE_RANGE = (0.9, 1.3)
"""measured / estimated wall time of recorded default sweeps at load averages below the cores (quiet to
moderately shared machine; benchmarks/bench_sweep.py): the range printed around the estimate."""
FIRST_STEP_SPREAD = (0.45, 1.5)
"""A run's median step / its first step: 0.68-2.2 x measured in the default sweep under load 2-5, so the steps of
an estimate from a first step lie in 0.45-1.5 x the first."""


MODEL_COST: dict[str, dict[str, float]] = {
    # SmolLM2-135M-Instruct on chat_arith, smollm-cpu shapes (96 new tokens), 2 threads, 30 Nov 2026: median step
    # 62.4 s with 32 completions (benchmarks/bench_smollm.py; 62.9 s in a 16-step run) and 54.7 s with 24 (a 12-step
    # run of the sweep preset): step = per_step + per_completion x completions, with most of a step in sequential
    # decoding. Eval: 0.8 s per greedy held-out prompt; set-up (load of the converted model, trainer, saving) 30 s
    # (a run took 764 s: 682 s of steps + 82 s). Other thread counts scale as compute-bound (x 2/threads): an
    # assumption, not measured.
    "smollm2-135m": dict(
        threads=2,
        setup=30.0,
        per_step=30.6,
        per_completion=0.99,
        per_eval_sequence=0.8,
        verify=30.0,  # verify-bound per run in the analysis notebook: a model load and 8 held-out prompts
    ),
}
"""Cost constants of named pretrained models (seconds, at `threads` threads)."""
MODEL_CREDIT_FACTOR = {"smollm2-135m": {"arca": 1.23, "divergence": 1.23}}
"""Step-time multiplier per credit for a named model: 76.7 s / 62.4 s measured for ARCA (its no-grad base forward
over all rows); divergence needs the same forward (assumed equal, not measured); other credits ~1."""


def thread_speedup(threads: int) -> float:
    """Step speed-up of `threads` torch threads over one (tiny matrices: far from linear)."""
    return max(1, threads) ** 0.6


def step_factor(cfg: RunConfig) -> float:
    """Relative cost of one optimiser step of `cfg` (completions x credit, arm, beta factors / thread speed-up)."""
    return (
        cfg.batch_completions
        * (HEAD_CREDIT_FACTOR if cfg.target_modules == "lm_head" else CREDIT_FACTOR).get(cfg.credit, 1.0)
        * ARM_FACTOR.get(cfg.target_modules, 1.0)
        * (BETA_FACTOR if cfg.beta > 0 else 1.0)
        / thread_speedup(cfg.threads or 2)
    )


def eval_sequences(cfg: RunConfig) -> int:
    """Held-out completions one run generates after its base-model eval: the eval after training (greedy +
    pass_k samples per prompt), the engine's before and after with a rollout engine, one greedy pass per `eval_at`
    step."""
    evals = (1 + 2 * (cfg.rollout_engine != "same")) * (1 + cfg.pass_k) + len(cfg.eval_steps())
    return evals * cfg.eval_prompts


def model_run_seconds(cfg: RunConfig) -> float | None:
    """Seconds one run of a named model in `MODEL_COST` takes in a warm kernel; None for other models."""
    c = MODEL_COST.get(cfg.model)
    if c is None:
        return None
    scale = c["threads"] / (cfg.threads or c["threads"])  # compute-bound assumption (MODEL_COST)
    evals = eval_sequences(cfg)
    factor = MODEL_CREDIT_FACTOR.get(cfg.model, {}).get(cfg.credit, 1.0) * (
        BETA_FACTOR if cfg.beta > 0 else 1.0
    )
    step = (c["per_step"] + c["per_completion"] * cfg.batch_completions) * factor
    return COST["notebook"] + c["setup"] + scale * (evals * c["per_eval_sequence"] + cfg.steps * step)


def first_run_extra(cfg: RunConfig) -> float:
    """Seconds a worker's first run adds for a named model: the base model's eval, once per warm kernel
    (`arca_lab.run._BEFORE`). 0 for the embedded model (inside its calibrated constants). verify-bound of each
    run in the analysis is added by `estimate_seconds`."""
    c = MODEL_COST.get(cfg.model)
    if c is None:
        return 0.0
    scale = c["threads"] / (cfg.threads or c["threads"])
    return scale * cfg.eval_prompts * (1 + cfg.pass_k) * c["per_eval_sequence"]


def estimate_run_seconds(cfg: RunConfig) -> float | None:
    """Seconds one run takes in a warm kernel: the embedded cost model, or `MODEL_COST` for a named model; None
    for other models (no calibration)."""
    if cfg.model != "embedded":
        return model_run_seconds(cfg)
    evals = COST["per_eval_sequence"] * eval_sequences(cfg)
    return COST["notebook"] + COST["setup"] + evals + cfg.steps * COST["per_completion"] * step_factor(cfg)


def sweep_seconds(
    runs: Sequence[float],
    workers: int,
    build_cached: bool = True,
    total_runs: int | None = None,
    warm: bool = True,
) -> float:
    """Wall seconds of a sweep whose runs to do take `runs` seconds each: base build + makespan over `workers`
    (in order, each worker's first run after its kernel start; every run's with `warm=False`) + combining and
    analysing all `total_runs` finished runs (default: as many as `runs`)."""
    free = [0.0] * max(1, workers)
    started = [False] * len(free)
    for r in runs:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += r + (COST["kernel"] if not (warm and started[i]) else 0.0)
        started[i] = True
    build = 0.0 if build_cached else COST["build"]
    n = len(runs) if total_runs is None else total_runs
    per_run = COST["combine_per_run"] + COST["analysis_per_run"]
    return build + COST["startup"] + max(free) + COST["combine"] + COST["analysis"] + per_run * n


def estimate_seconds(
    configs: Sequence[RunConfig],
    workers: int,
    build_cached: bool = True,
    total_runs: int | None = None,
    warm: bool = True,
) -> float | None:
    """Wall seconds of a sweep of embedded runs `configs` (the runs to do), see `sweep_seconds`; None if any run
    is of another model."""
    runs = [estimate_run_seconds(c) for c in configs]
    if any(r is None for r in runs):
        return None
    # named models: each worker evaluates the base model once, and the analysis verifies every run
    extra = (
        min(len(configs), max(1, workers)) * first_run_extra(configs[0])
        + (total_runs if total_runs is not None else len(configs))
        * MODEL_COST.get(configs[0].model, {}).get("verify", 0.0)
        if configs
        else 0.0
    )
    return extra + sweep_seconds(runs, workers, build_cached, total_runs, warm)  # type: ignore[arg-type]


def load_slowdown(workers: int, threads: int, cpus: int, load: float) -> float:
    """How much slower the sweep runs if the load average `load` of other processes lasts: its workers want
    workers x threads of the `cpus` cores, and share them with that load (1 when both fit)."""
    demand = workers * max(1, threads) + max(0.0, load)
    return max(1.0, demand / max(1, cpus))


def estimate_range(seconds: float, slowdown: float = 1.0) -> tuple[float, float]:
    """(low, high) around a cost-model estimate: the spread of recorded sweeps, or the load's slow-down if larger."""
    low, high = ESTIMATE_RANGE
    return seconds * low, seconds * max(high, slowdown)


def estimate_from_first_step(
    configs: Sequence[RunConfig],
    measured: RunConfig,
    first: FirstStep,
    workers: int,
    total_runs: int | None = None,
    warm: bool = True,
) -> tuple[float, float, float]:
    """(estimate, low, high) wall seconds of a sweep from `first`, the first step of the run `measured`.

    A run takes notebook + set-up before its first step (model load, eval before), about as long again after its
    last (eval after, saving; low end: nothing), and steps x the first step scaled by `step_factor`
    (`FIRST_STEP_SPREAD` for the spread of later steps). The base model is taken as built (it was, to measure).
    """
    base = step_factor(measured)

    def runs(after: float, spread: float) -> list[float]:
        return [
            COST["notebook"]
            + first.setup * (1 + after)
            + c.steps * first.step * spread * step_factor(c) / base
            for c in configs
        ]

    low, high = FIRST_STEP_SPREAD
    return (
        sweep_seconds(runs(1.0, 1.0), workers, True, total_runs, warm),
        sweep_seconds(runs(0.0, low), workers, True, total_runs, warm),
        sweep_seconds(runs(1.0, high), workers, True, total_runs, warm),
    )


def default_threads(workers: int, cpus: int | None = None) -> int:
    """torch threads per run: the cores divided among the workers, at least 1 (2 cores, 2 workers -> 1)."""
    return max(1, math.floor((cpus or available_cpus()) / max(1, workers)))


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
