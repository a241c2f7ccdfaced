"""What token credit and the KL probe cost per GRPO step, on the embedded default model (a script, not a test).

    python benchmarks/bench_credit.py            # full run: ~3 min on 2 idle cores (est.), ~7 min on a busy one
    python benchmarks/bench_credit.py --quick    # smoke run, well under a minute

Setup: `arca_lab.embedded.embedded_model_dir()` with the `arith` task, LoRA rank 8 on all linear layers, 16 prompts x
8 completions, max_completion_length 40, fp32 on CPU, torch pinned to 2 threads, seed 0 everywhere.

Measured, for every credit in `arca_lab.credit.CREDITS` with the KL probe off and on:
- loss step: (shared base pass `trainer._base_pass` when the trainer needs the base model) + `compute_loss` +
  `backward` + zero grads, on ONE generated batch shared by every configuration (generated once, untimed; the same
  inputs make the ratios pure compute cost). Median of the timed repetitions after the warm-up ones.
- whole step: one full optimiser step, i.e. `trainer.training_step` on raw dataset rows (generation, rewards, base
  pass, loss, backward) + grad clipping + `optimizer.step()` + zero grads: what `Trainer.train` does between
  `on_step_begin` and `on_step_end`. The sampling RNG is re-seeded identically for every configuration at each step.
  Median over the timed steps after a warm-up step.
- peak MB: peak RSS increase during a loss step, RSS sampled every 1 ms by a psutil thread, after `gc.collect()` and
  glibc `malloc_trim(0)` (so freed heap pages of earlier steps do not hide the step's working set); measured on the
  last warm-up repetition, which is not timed.
Each repetition records wall-clock time and process CPU time (`time.process_time`, all threads). Repetitions are
interleaved (every round runs each configuration once, in a fresh random order) and ratios are paired: the median over
rounds of config / uniform-off timed in the same round, which cancels slow drifts of outside load. On a machine
shared with other processes wall-clock time mostly measures the neighbours; CPU time is the cost of our own work and
stays comparable, so both are printed. Whole steps are few and noisy, so each whole-step ratio also gets an estimate
from the precise loss-step CPU ratio ("est"): configurations differ only in the loss step and the base pass, so
whole(config) = whole(uniform) + loss(config) - loss(uniform). Targets are MET / MISSED when all measures agree.

Also: reference rows with the ARCA authors' cost structure (uniform loss step + two extra no-grad forwards, one
adapted and one under `model.disable_adapter()`, vs their reported 1.72 x uniform; and + one base forward, which is
what their later code does), beta = 0.05 vs beta = 0 whole step (MERL: KL-free GRPO saves the reference pass), the
Spearman rank correlation of `arca_branch` and exact `arca` raw scores, and where the ARCA loss step spends its time.

`OMP_WAIT_POLICY=PASSIVE` is set before torch is imported: with OpenMP's default busy-waiting, two torch threads on a
2-core machine shared with other processes run ~10x slower (a waiting thread spins on the core the other one needs).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (see the docstring)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
import transformers
from datasets import Dataset
from scipy.stats import spearmanr

import arca_lab.trainer as trainer_module
from arca_lab.config import make_config
from arca_lab.credit import CREDITS
from arca_lab.embedded import embedded_model_dir
from arca_lab.models import decoder_layers, load_policy, lora_config
from arca_lab.run import grpo_args, make_reward_fn
from arca_lab.tasks import get_task
from arca_lab.trainer import ArcaGRPOTrainer

SEED = 0
THREADS = 2
REPORTED_REFERENCE = 1.72  # the ARCA authors' implementation: cost relative to uniform, as reported
PERTURB_B = 0.05  # std of the random LoRA B for the correlation (peft starts at B = 0: zero residuals)
Sample = tuple[float, float]  # (wall ms, CPU ms)


@dataclass(frozen=True)
class Sizes:
    prompts: int
    generations: int
    max_completion_length: int
    loss_warmup: int
    loss_reps: int
    whole_warmup: int
    whole_steps: int
    breakdown_reps: int


FULL = Sizes(16, 8, 40, loss_warmup=2, loss_reps=10, whole_warmup=1, whole_steps=5, breakdown_reps=5)
QUICK = Sizes(4, 4, 32, loss_warmup=1, loss_reps=3, whole_warmup=1, whole_steps=2, breakdown_reps=2)


@dataclass
class Job:
    name: str
    credit: str
    kl_probe: bool
    trainer: ArcaGRPOTrainer
    rows: list[dict[str, str]]
    extra_forwards: int = 0  # reference rows: the authors' no-grad forwards before the uniform loss step
    inputs: dict[str, Any] | None = None  # this job's copy of the shared generated batch
    optimizer: Any = None

    def loss_op(self) -> None:
        if self.extra_forwards:
            authors_forwards(self.trainer, self.inputs, adapted=self.extra_forwards == 2)
        loss_step(self.trainer, self.inputs)


def log(msg: str) -> None:
    print(f"[bench_credit] {msg}", file=sys.stderr, flush=True)


# --- building ---------------------------------------------------------------------------------------------------
def build_job(model_dir: str, sizes: Sizes, credit: str, kl_probe: bool, beta: float, tmp: str) -> Job:
    steps = sizes.whole_warmup + sizes.whole_steps
    cfg = make_config(
        model=model_dir,
        task="arith",
        rank=8,
        target_modules="all-linear",
        prompts_per_step=sizes.prompts,
        num_generations=sizes.generations,
        max_completion_length=sizes.max_completion_length,
        credit=credit,
        kl_probe=kl_probe,
        beta=beta,
        steps=steps,
        seed=SEED,
        threads=THREADS,
        out=f"{tmp}/run",
    )
    transformers.set_seed(SEED)  # identical LoRA init (A) for every configuration
    model, tokenizer = load_policy(cfg)
    task = get_task("arith")
    rows = task.train_rows(steps * sizes.prompts, seed=SEED)
    trainer = ArcaGRPOTrainer(
        model=model,
        reward_funcs=make_reward_fn(task),
        args=grpo_args(cfg, f"{tmp}/trainer-{credit}-{kl_probe}-{beta}", progress=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg, model),
        token_roles=lambda ids: task.token_roles(ids, tokenizer),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; compute_loss divides by it
    name = f"{credit}/{'on' if kl_probe else 'off'}" + (f"/beta={beta}" if beta else "")
    return Job(name, credit, kl_probe, trainer, rows)


def generation_rows(rows: list[dict[str, str]], step: int, sizes: Sizes) -> list[dict[str, str]]:
    """One generation batch as TRL's sampler yields it: each prompt repeated num_generations times."""
    prompts = rows[step * sizes.prompts : (step + 1) * sizes.prompts]
    return [r for r in prompts for _ in range(sizes.generations)]


# --- the measured operations ------------------------------------------------------------------------------------
def loss_step(trainer: ArcaGRPOTrainer, inputs: dict[str, Any]) -> None:
    if trainer._needs_base:  # the shared base pass is part of the cost of anything that needs the base model
        inputs["probe_rows"] = trainer._probe_rows(
            inputs["completion_ids"].size(0)
        )  # all rows, or 1 per prompt
        inputs["base_hidden"], layers = trainer._base_pass(inputs)
        if layers is not None:
            inputs["base_layer_states"] = layers
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)


def authors_forwards(trainer: ArcaGRPOTrainer, inputs: dict[str, Any], adapted: bool) -> None:
    """The ARCA authors' extra no-grad full-model forwards (logits and all hidden states): one under
    `disable_adapter()`, and optionally one adapted (their later code takes the adapted states from the loss
    forward instead, github.com/rodlaf/tokenweighting experiment/hf/run_experiment.py)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    model = trainer.model
    with torch.no_grad():
        if adapted:
            model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        with model.disable_adapter():
            model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)


def whole_step(job: Job, step: int, sizes: Sizes) -> None:
    trainer = job.trainer
    trainer.training_step(trainer.model, generation_rows(job.rows, step, sizes), None)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
    job.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


# --- measurement helpers -----------------------------------------------------------------------------------------
_LIBC_NAME = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None


@contextlib.contextmanager
def rss_peak() -> Iterator[list[float]]:
    """Yields a one-element list holding, on exit, the peak RSS increase in MB (sampled every 1 ms)."""
    proc = psutil.Process()
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)  # give freed heap pages back, so the step's own allocations show up in RSS
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = [float("nan")]
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out[0] = (max(peak[0], proc.memory_info().rss) - base) / 2**20


def clocked(fn: Callable[[], Any]) -> Sample:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def interleaved(jobs: list[Job], rounds: int, run: Callable[[Job, int], Any], rng: random.Random) -> None:
    """Run `run(job, round)` for every job in every round, in a new random order each round."""
    for r in range(rounds):
        order = list(jobs)
        rng.shuffle(order)
        for job in order:
            run(job, r)
        log(f"  round {r + 1}/{rounds}")


@dataclass
class Stat:
    """Timed samples of one configuration, sample i taken in round i (the same round for every configuration)."""

    samples: list[Sample]

    @property
    def wall(self) -> float:  # median ms
        return float(np.median([s[0] for s in self.samples]))

    @property
    def cpu(self) -> float:
        return float(np.median([s[1] for s in self.samples]))

    def over(self, other: Stat) -> tuple[float, float]:
        """Paired ratio: median over rounds of self / other within a round (cancels drifts of the outside load)."""
        pairs = list(zip(self.samples, other.samples, strict=True))
        return tuple(float(np.median([a[i] / b[i] for a, b in pairs])) for i in (0, 1))  # type: ignore[return-value]

    def spread(self, other: Stat) -> float:
        """Relative IQR of the paired wall-clock ratios."""
        r = np.array([a[0] / b[0] for a, b in zip(self.samples, other.samples, strict=True)])
        q1, q3 = np.percentile(r, [25, 75])
        return float((q3 - q1) / np.median(r))


# --- the sections -------------------------------------------------------------------------------------------------
def measure_loss_steps(jobs: list[Job], shared: dict[str, Any], sizes: Sizes, rng: random.Random):
    samples: dict[str, list[Sample]] = defaultdict(list)
    mem: dict[str, float] = {}
    for job in jobs:
        job.inputs = dict(shared)

    def run(job: Job, r: int) -> None:
        if r < sizes.loss_warmup:
            with rss_peak() as peak:
                job.loss_op()
            mem[job.name] = peak[0]  # the last warm-up round wins
        else:
            samples[job.name].append(clocked(job.loss_op))

    interleaved(jobs, sizes.loss_warmup + sizes.loss_reps, run, rng)
    return {k: Stat(v) for k, v in samples.items()}, mem


def measure_whole_steps(jobs: list[Job], sizes: Sizes, rng: random.Random):
    samples: dict[str, list[Sample]] = defaultdict(list)
    lengths: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        job.optimizer = job.trainer.create_optimizer()

    def run(job: Job, r: int) -> None:
        torch.manual_seed(SEED + 1000 + r)  # the same sampling stream for every configuration at step r
        sample = clocked(lambda: whole_step(job, r, sizes))
        if r >= sizes.whole_warmup:
            samples[job.name].append(sample)
            lengths[job.name].append(job.trainer._metrics["train"]["completions/mean_length"][-1])

    interleaved(jobs, sizes.whole_warmup + sizes.whole_steps, run, rng)
    return {k: Stat(v) for k, v in samples.items()}, {k: statistics.mean(v) for k, v in lengths.items()}


def branch_vs_exact(arca: Job, branch: Job, shared: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean over completions of the Spearman correlation of raw arca_branch and arca scores (same batch and
    adapter), for arca_branch over all LoRA modules, over the last decoder layer's modules only, and over all
    modules divided by the RMS of the final norm's input (exact ARCA reads the states after that norm, which
    rescales every token by 1 / rms(x_t): a per-token factor the branch norms do not see)."""
    branch.trainer.model.load_state_dict(arca.trainer.model.state_dict())
    inputs = dict(shared)
    inputs["base_hidden"], _ = arca.trainer._base_pass(inputs)
    all_branches = branch.trainer._branches
    last = set(decoder_layers(branch.trainer.model)[-1].modules())
    # The trainer already divides branch norms by rms(final-norm input) (first-order match to exact ARCA).
    variants = {"all modules": all_branches, "last layer": [b for b in all_branches if b in last]}
    final_norm = branch.trainer._backbone.norm  # Qwen3's final RMSNorm: its output is the input of lm_head
    rms: list[torch.Tensor] = []
    hook = final_norm.register_forward_hook(
        lambda m, a, o: rms.append(a[0].detach().float().square().mean(-1).sqrt())
    )
    scores = {}
    with torch.no_grad():
        arca.trainer.compute_loss(arca.trainer.model, dict(inputs))
        exact = arca.trainer.last_batch["scores"]
        mask = arca.trainer.last_batch["completion_mask"].bool()
        for label, branches in variants.items():
            branch.trainer._branches = branches  # runtime selection only; restored below
            rms.clear()
            branch.trainer.compute_loss(branch.trainer.model, dict(inputs))
            scores[label] = branch.trainer.last_batch["scores"]
        branch.trainer._branches = all_branches
    hook.remove()
    out = {}
    for label, approx in scores.items():
        rhos = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant rows give NaN (excluded and counted), scipy warns
            for a, b, m in zip(exact, approx, mask, strict=True):
                if int(m.sum()) >= 3:
                    rhos.append(spearmanr(a[m].numpy(), b[m].numpy()).statistic)
        ok = np.array(rhos, dtype=float)
        ok = ok[np.isfinite(ok)]
        nan = float("nan")
        out[label] = {
            "mean": float(ok.mean()) if ok.size else nan,
            "median": float(np.median(ok)) if ok.size else nan,
            "n": int(ok.size),
            "rows": int(mask.size(0)),
            "residual": float(exact[mask].mean()),
        }
    return out


def perturb_b(trainer: ArcaGRPOTrainer, std: float) -> None:
    g = torch.Generator().manual_seed(SEED + 1)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data = std * torch.randn(p.shape, generator=g)


@contextlib.contextmanager
def piece_timers(trainer: ArcaGRPOTrainer) -> Iterator[dict[str, list[Sample]]]:
    """Time the credit/probe pieces by wrapping trainer methods and `arca_lab.trainer` globals (restored on exit)."""
    spent: dict[str, list[Sample]] = defaultdict(list)

    def wrap(name: str, fn: Callable) -> Callable:
        def inner(*a: Any, **k: Any) -> Any:
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name].append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))

        return inner

    methods = ("_base_pass", "_token_advantages", "_head_stats", "_log_step")
    globals_ = ("kl_probe", "compute_credit_weights")
    saved = {g: getattr(trainer_module, g) for g in globals_}
    for m in methods:
        setattr(trainer, m, wrap(m, getattr(trainer, m)))
    for g in globals_:
        setattr(trainer_module, g, wrap(g, saved[g]))
    try:
        yield spent
    finally:
        for m in methods:
            delattr(trainer, m)  # back to the class's methods
        for g in globals_:
            setattr(trainer_module, g, saved[g])


def breakdown(job: Job, shared: dict[str, Any], reps: int) -> dict[str, Stat]:
    """Per-piece medians of a loss step (the first repetition is a warm-up)."""
    trainer, inputs = job.trainer, dict(shared)
    with piece_timers(trainer) as spent:
        for _ in range(reps + 1):
            if trainer._needs_base:
                inputs["base_hidden"], _ = trainer._base_pass(inputs)
            out: list[torch.Tensor] = []
            spent["compute_loss (whole)"].append(
                clocked(lambda out=out: out.append(trainer.compute_loss(trainer.model, inputs)))
            )
            spent["backward"].append(clocked(out[0].backward))
            spent["zero_grad"].append(clocked(lambda: trainer.model.zero_grad(set_to_none=True)))
    return {k: Stat(v[1:]) for k, v in spent.items()}


# --- report -------------------------------------------------------------------------------------------------------
def print_report(
    sizes, quick, model_dir, shared, jobs, refs, by, beta_job, loss, mem, whole, lengths, corr, bd
):
    u = by[("uniform", False)].name

    def est(name: str) -> float:
        """Whole-step ratio predicted from the (more precise) loss-step CPU ratio: the configurations differ only
        in the loss step and the base pass, so whole = uniform whole + (loss step - uniform loss step)."""
        return 1 + (loss[name].over(loss[u])[1] - 1) * loss[u].cpu / whole[u].cpu

    n_tokens = shared["completion_mask"].sum(1).float().mean()
    print(f"\nbench_credit{' --quick' if quick else ''}: embedded model {model_dir}")
    print(
        f"arith, LoRA r=8 all-linear, {sizes.prompts} prompts x {sizes.generations} completions, max_completion_length "
        f"{sizes.max_completion_length}, fp32 CPU, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, seed {SEED}"
    )
    print(
        f"loss step: one shared batch ({shared['completion_ids'].shape[0]} completions, padded T = "
        f"{shared['completion_ids'].shape[1]}, {n_tokens:.1f} valid tokens each on average), median of "
        f"{sizes.loss_reps} after {sizes.loss_warmup} warm-up; whole step: training_step on raw rows + clip + "
        f"optimizer.step, median of {sizes.whole_steps} after {sizes.whole_warmup} warm-up"
    )
    print(
        "ms = wall-clock median; ×uniform = paired ratio (median over rounds of config / uniform-off timed in the "
        "same round), wall-clock; cpu× = the same on process CPU time; est× whole = whole-step ratio predicted "
        "from cpu× loss (see targets); peak MB = RSS increase in a loss step\n"
    )
    head = (
        f"{'credit':<30}{'probe':>6}{'loss step ms':>14}{'×uniform':>10}{'whole step ms':>15}{'×uniform':>10}"
        f"{'peak MB':>9}{'cpu× loss':>11}{'cpu× whole':>12}{'est× whole':>12}{'gen len':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for job in [*jobs, *refs]:
        lw, lc = loss[job.name].over(loss[u])
        cells = [
            f"{job.credit if not job.extra_forwards else job.name:<30}{'on' if job.kl_probe else 'off':>6}"
        ]
        cells.append(f"{loss[job.name].wall:>14.1f}{lw:>10.3f}")
        if job.name in whole:
            ww, wc = whole[job.name].over(whole[u])
            cells.append(
                f"{whole[job.name].wall:>15.1f}{ww:>10.3f}{mem[job.name]:>9.1f}{lc:>11.3f}{wc:>12.3f}"
                f"{est(job.name):>12.3f}"
            )
            cells.append(f"{lengths[job.name]:>9.1f}")
        else:
            cells.append(
                f"{'—':>15}{'—':>10}{mem[job.name]:>9.1f}{lc:>11.3f}{'—':>12}{est(job.name):>12.3f}{'—':>9}"
            )
        print("".join(cells))
    sl = statistics.median(s.spread(loss[u]) for k, s in loss.items() if k != u)
    sw = statistics.median(s.spread(whole[u]) for k, s in whole.items() if k != u)
    print(
        f"(denominator: uniform, probe off; gen len = mean completion length in the timed whole steps; wall-clock "
        f"noise: median relative IQR {100 * sl:.1f}% loss step, {100 * sw:.1f}% whole step)"
    )

    b0, b1 = whole[u], whole[beta_job.name]
    bw, bc = b1.over(b0)
    print("\nbeta, uniform credit, probe off, whole step:")
    print(f"  beta = 0     {b0.wall:8.1f} ms wall {b0.cpu:8.1f} ms CPU   (no reference pass)")
    print(
        f"  beta = 0.05  {b1.wall:8.1f} ms wall {b1.cpu:8.1f} ms CPU   (shared base pass as reference + k3 term)"
    )
    print(
        f"  beta=0.05 / beta=0: {bw:.3f} wall, {bc:.3f} CPU -> KL-free saves {100 * (1 - 1 / bc):.1f}% (CPU)"
    )

    print(
        "\narca_branch vs exact arca: Spearman rho of raw per-token scores per completion, same batch and adapter"
    )
    for adapter, per_variant in corr.items():
        for variant, c in per_variant.items():
            print(
                f"  {adapter}; arca_branch over {variant}: mean rho {c['mean']:.3f}, median {c['median']:.3f} "
                f"({c['n']} of {c['rows']} completions); mean exact residual {c['residual']:.3g}"
            )

    print(
        "\nwhere a loss step goes (median ms, wall / CPU; pieces nest inside compute_loss except _base_pass):"
    )
    for label, pieces in bd.items():
        print(f"  {label}: " + ", ".join(f"{k} {s.wall:.1f}/{s.cpu:.1f}" for k, s in pieces.items()))
    base_cpu = bd["arca, probe on"]["_base_pass"].cpu
    print(
        f"  uniform whole step {whole[u].cpu:.0f} ms CPU, of which loss step {loss[u].cpu:.0f} ms "
        f"({100 * loss[u].cpu / whole[u].cpu:.0f}%); one base pass = {100 * base_cpu / loss[u].cpu:.0f}% of the "
        f"loss step, {100 * base_cpu / whole[u].cpu:.0f}% of the whole step"
    )

    def ratio(table: dict[str, Stat], a: tuple[str, bool], b: tuple[str, bool] = ("uniform", False)) -> list:
        values = list(table[by[a].name].over(table[by[b].name]))
        if table is whole:  # + the estimate from the loss step
            values.append(est(by[a].name) / est(by[b].name))
        return values

    rw, rc = loss[refs[0].name].over(loss[u])
    checks = [
        (
            f"exact ARCA loss step <= 1.5 x uniform, probe {'on' if p else 'off'} (reference +2 fwd here "
            f"{rw:.2f} wall / {rc:.2f} CPU; authors reported {REPORTED_REFERENCE})",
            ratio(loss, ("arca", p)),
            1.5,
        )
        for p in (False, True)
    ]
    checks += [
        (f"ARCA whole step <= 1.15 x uniform, probe {'on' if p else 'off'}", ratio(whole, ("arca", p)), 1.15)
        for p in (False, True)
    ]
    for c in ("arca", "divergence"):
        checks.append((f"KL probe free with {c}: loss step on/off", ratio(loss, (c, True), (c, False)), 1.02))
        checks.append(
            (f"KL probe free with {c}: whole step on/off", ratio(whole, (c, True), (c, False)), 1.02)
        )
    for c in ("uniform", "surprisal", "entropy_reduction", "arca_branch"):
        checks.append((f"KL probe with {c}: whole step on/off", ratio(whole, (c, True), (c, False)), 1.10))
    checks.append(
        ("arca_branch whole step <= 1.05 x uniform, probe off", ratio(whole, ("arca_branch", False)), 1.05)
    )
    print(
        "\ntargets (MET / MISSED when every measure agrees, else MIXED; est = predicted from the loss step):"
    )
    for text, values, bound in checks:
        tag = "MET   " if max(values) <= bound else ("MISSED" if min(values) > bound else "MIXED ")
        shown = ", ".join(f"{v:.3f} {k}" for v, k in zip(values, ("wall", "CPU", "est"), strict=False))
        print(f"  [{tag}] {text}: {shown} (target <= {bound})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch and few repetitions (smoke run)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    rng = random.Random(SEED)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]

    model_dir = str(embedded_model_dir())
    tmp = tempfile.mkdtemp(prefix="bench_credit-")
    log("building trainers")
    jobs = [build_job(model_dir, sizes, c, p, 0.0, tmp) for c in CREDITS for p in (False, True)]
    by = {(j.credit, j.kl_probe): j for j in jobs}
    beta_job = build_job(model_dir, sizes, "uniform", False, 0.05, tmp)
    uniform = by[("uniform", False)]
    refs = [
        Job("reference: +2 fwd (authors)", "uniform", False, uniform.trainer, uniform.rows, extra_forwards=2),
        Job("reference: +1 base fwd", "uniform", False, uniform.trainer, uniform.rows, extra_forwards=1),
    ]

    # One generated batch for every loss-step measurement (untimed; sampled from the base policy, B = 0).
    torch.manual_seed(SEED)
    shared = uniform.trainer._generate_and_score_completions(generation_rows(uniform.rows, 0, sizes))
    log("loss steps")
    loss, mem = measure_loss_steps([*jobs, *refs], shared, sizes, rng)
    log("whole steps")
    whole, lengths = measure_whole_steps([*jobs, beta_job], sizes, rng)
    log("breakdown and correlation")
    bd = {
        "uniform, probe off": breakdown(uniform, shared, sizes.breakdown_reps),
        "arca, probe on": breakdown(by[("arca", True)], shared, sizes.breakdown_reps),
    }
    arca, branch = by[("arca", False)], by[("arca_branch", False)]
    steps = sizes.whole_warmup + sizes.whole_steps
    trained = f"adapter trained {steps} steps (arca, lr {arca.trainer.args.learning_rate:g})"
    corr = {trained: branch_vs_exact(arca, branch, shared)}
    perturb_b(arca.trainer, PERTURB_B)
    corr[f"random LoRA B ~ N(0, {PERTURB_B}^2)"] = branch_vs_exact(arca, branch, shared)

    print_report(
        sizes, args.quick, model_dir, shared, jobs, refs, by, beta_job, loss, mem, whole, lengths, corr, bd
    )
    print(
        f"\ntotal {time.perf_counter() - t0:.0f} s; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} "
        f"at end (above {THREADS}: other processes shared the cores, trust the CPU-time ratios)"
    )


if __name__ == "__main__":
    main()
