"""arca_branch vs exact ARCA: how well it ranks tokens on a trained adapter, and what it costs per step
(a script, not a test).

    python benchmarks/bench_branch.py                     # trains the adapter first; ~2 min on 2 idle cores
    python benchmarks/bench_branch.py --adapter /tmp/branch-run/adapter [--adapter DIR ...] [--skip-timing]
    python benchmarks/bench_branch.py --quick             # smoke run (< 1 min)

Model: `arca_lab.embedded.embedded_model_dir()` (tiny Qwen3, 4 layers, d = 128), fp32 on CPU, torch pinned
to 2 threads, seed 0 everywhere.

1. Rank agreement. Adapter: each `--adapter` directory, else one trained here exactly like
   `arca-lab train --credit uniform --rank 4 --steps 12 --eval-prompts 8` (all-linear LoRA). Completions:
   freshly sampled by the adapted policy (temperature 1) on held-out `arith` prompts. On these tokens one
   adapted forward gives
     old   the trainer's arca_branch (f32e174): mean over ALL LoRA modules of ‖s·B A x_t‖ / sqrt(mean(u_t²))
     new   `arca_lab.branch.first_order_residual`: ‖J_N(u_t) D_t‖, D = vector sum over the residual writers
   and one base forward (adapter disabled) gives exact ARCA ‖h_t^adapted − h_t^base‖ (ARCA paper, arXiv
   2606.00257, definition of the ARCA score). Two diagnostic rows use the base model as an oracle to locate
   the error (theory/arca_branch.md §4): "true Δu" = ‖J_N(u_t)(u_t^adapted − u_t^base)‖ (only the norm is
   linearised); "blocks, no propagation" = ‖J_N(u_t) Σ_ℓ [block_ℓ(r_ℓ−1) − block_ℓ^base(r_ℓ−1)]‖, every
   block fed its adapted input (each block's exact change, none propagated through later blocks).
   Spearman ρ per completion over its valid tokens (≥ 3, non-constant), then mean and median over
   completions; and pooled over all valid tokens.
2. Step cost, KL probe off: uniform; uniform + only the new hooks and estimate; arca_branch old (the trainer
   as it is); arca_branch new (the trainer with `arca_lab.branch` wired in, `ProposedBranchTrainer`); arca
   (exact, one shared base pass). Loss step = (base pass if needed) + compute_loss + backward on one shared
   generated batch; whole step = training_step on raw rows (generation included) + clip + optimizer step.
   Rounds run every configuration once in a random order; ratios are paired (median over rounds of config /
   uniform in the same round). CPU time (`time.process_time`) is the cost of our own work on a shared
   machine, wall-clock mostly measures the neighbours. Whole steps sample different lengths once the
   policies diverge, so "est× whole" predicts the whole-step ratio from the precise loss-step CPU ratio
   (configurations differ only in the loss step and the base pass).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads starve 2 cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import math
import random
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM, AutoTokenizer

import arca_lab.trainer as trainer_module
from arca_lab.branch import branch_capture, find_residual_writers, first_order_residual, norm_jvp
from arca_lab.config import make_config
from arca_lab.embedded import embedded_model_dir
from arca_lab.models import backbone_of, decoder_layers, load_policy, lora_config
from arca_lab.run import grpo_args, make_reward_fn, train
from arca_lab.tasks import get_task
from arca_lab.trainer import ArcaGRPOTrainer

SEED = 0
THREADS = 2
RHO_TARGET = 0.8
COST_TARGET = 1.05
NEW = "new: writers' vector sum through J_N"
Samples = dict[str, list[tuple[float, float]]]  # config -> [(wall ms, CPU ms) per timed round]


@dataclass(frozen=True)
class Sizes:
    corr_prompts: int  # held-out prompts for the rank agreement, each with corr_samples completions
    corr_samples: int
    prompts: int  # per generation batch in the step timing
    generations: int
    max_completion_length: int
    loss_warmup: int
    loss_reps: int
    whole_warmup: int
    whole_steps: int


FULL = Sizes(32, 4, 8, 8, 40, loss_warmup=2, loss_reps=24, whole_warmup=1, whole_steps=6)
QUICK = Sizes(8, 2, 4, 4, 24, loss_warmup=1, loss_reps=2, whole_warmup=1, whole_steps=1)


def log(msg: str) -> None:
    print(f"[bench_branch] {msg}", file=sys.stderr, flush=True)


# --- 1. rank agreement ------------------------------------------------------------------------------------
def train_adapter(model_dir: str, out: str) -> str:
    """The adapter of `arca-lab train --credit uniform --rank 4 --steps 12 --eval-prompts 8` (all-linear)."""
    cfg = make_config(model=model_dir, credit="uniform", rank=4, steps=12, eval_prompts=8, seed=SEED, out=out)
    return str(train(cfg, progress=False) / "adapter")


@torch.no_grad()
def sample(policy, tokenizer, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fresh completions of held-out prompts: ids (B, P + T), attention mask (B, P + T), T. Valid completion
    tokens run up to and including the first EOS (TRL's completion mask)."""
    rows = get_task("arith").eval_rows(sizes.corr_prompts, seed=SEED + 1)
    prompts = [r["prompt"] for r in rows for _ in range(sizes.corr_samples)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(SEED)
    out = policy.generate(
        **enc,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    completion = out[:, enc.input_ids.size(1) :]  # (B, T)
    T = completion.size(1)
    is_eos = completion == tokenizer.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), T)  # (B,)
    valid = torch.arange(T)[None] <= first_eos[:, None]  # (B, T)
    return out, torch.cat([enc.attention_mask, valid.long()], dim=1), T


@contextmanager
def old_branch_hooks(backbone, norm) -> Iterator[dict[str, Any]]:
    """The trainer's arca_branch at f32e174 (`_register_branch_hook` and its norm_rms hook): ‖s·B A x‖ of
    every LoRA module, and sqrt(mean(u²)) of the final norm's input."""
    store: dict[str, Any] = {"norms": []}

    def branch_norm(scale: float) -> Callable:
        return lambda m, a, o: store["norms"].append((o.float() * scale).norm(dim=-1))  # (B, S)

    def rms(m: Any, a: tuple) -> None:
        store["rms"] = a[0].float().pow(2).mean(-1).sqrt()  # (B, S)

    handles = [
        m.lora_B["default"].register_forward_hook(branch_norm(m.scaling["default"]))
        for m in backbone.modules()
        if isinstance(m, LoraLayer)
    ]
    handles.append(norm.register_forward_pre_hook(rms))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def block_calls(layers) -> Iterator[list[tuple[Any, tuple, dict, Any]]]:
    """Records each decoder block's call and output (module, args, kwargs, output), to re-run it as base."""
    calls: list[tuple[Any, tuple, dict, Any]] = []
    handles = [
        layer.register_forward_hook(lambda m, a, k, o: calls.append((m, a, dict(k), o)), with_kwargs=True)
        for layer in layers
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def scores_on(adapter_dir: str, model_dir: str, sizes: Sizes) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-token scores (B, T) of every variant on fresh completions, and the valid-token mask (B, T)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids, attention_mask, T = sample(policy, tokenizer, sizes)
    backbone, layers = backbone_of(policy), list(decoder_layers(policy))
    writers = find_residual_writers(policy)
    norm = writers.norm
    positions = slice(-T - 1, -1)  # the states that predict the completion tokens
    u_of: dict[str, torch.Tensor] = {}
    grab = norm.register_forward_pre_hook(lambda m, a: u_of.__setitem__("u", a[0]))

    def forward() -> torch.Tensor:
        return backbone(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    with branch_capture(policy, writers) as store, old_branch_hooks(backbone, norm) as old:
        with block_calls(layers) as calls:
            h = forward()  # (B, S, d)
        new = first_order_residual(store, T)  # (B, T)
    u = u_of["u"]  # (B, S, d)
    old_scores = torch.stack(old["norms"]).mean(0) / old["rms"].clamp_min(1e-12)  # (B, S), as the trainer
    with policy.disable_adapter():
        h_base, u_base = forward(), u_of["u"]
        # each block's exact change at its adapted input, summed without propagating it: (B, S, d)
        local = sum(_first(out) - _first(m(*a, **k)) for m, a, k, out in calls)
    grab.remove()

    def through_norm(v: torch.Tensor) -> torch.Tensor:  # ‖J_N(u_t) v_t‖ at the completion positions, (B, T)
        return norm_jvp(u[:, positions], v[:, positions], norm.weight, writers.eps, writers.centered).norm(
            dim=-1
        )

    scores = {
        "exact ARCA": (h - h_base)[:, positions].float().norm(dim=-1),
        "old: all modules, mean of norms, / rms": old_scores[:, positions],
        NEW: new,
        "oracle: true Δu, norm linearised": through_norm(u - u_base),
        "oracle: blocks, no propagation": through_norm(local),
    }
    return scores, attention_mask[:, -T:].bool()


def agreement(scores: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, dict[str, float]]:
    """Spearman ρ of each score with exact ARCA: per completion (mean, median) and pooled; median scale."""
    exact = scores["exact ARCA"]
    out = {}
    for name, s in scores.items():
        if name == "exact ARCA":
            continue
        rhos = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant rows give NaN (skipped); scipy warns
            for a, b, m in zip(exact, s, mask, strict=True):
                if int(m.sum()) >= 3:
                    rhos.append(spearmanr(a[m].numpy(), b[m].numpy()).statistic)
        r = np.array(rhos, dtype=float)
        r = r[np.isfinite(r)]
        out[name] = {
            "mean": float(r.mean()) if r.size else math.nan,
            "median": float(np.median(r)) if r.size else math.nan,
            "pooled": float(spearmanr(exact[mask].numpy(), s[mask].numpy()).statistic),
            "n": int(r.size),
            "scale": float((s[mask] / exact[mask]).median()),
        }
    return out


# --- 2. step cost -------------------------------------------------------------------------------------------
class ProposedBranchTrainer(ArcaGRPOTrainer):
    """The trainer at f32e174 with arca_branch scores from `arca_lab.branch`, as the proposed trainer.py diff
    does, for timing without editing trainer.py: `branch_capture` replaces the per-module hooks, and the
    estimate reaches `_token_advantages` as one (B, P + T) "branch" row (it slices [:, -T-1:-1]; the layer
    aggregate of one row is that row)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._writers = find_residual_writers(self.accelerator.unwrap_model(self.model))
        self._branches = list(self._writers.lora)  # non-empty, so `_token_advantages` reads store["branches"]

    @contextmanager
    def _capture(self, policy, on_done=None, branches=False):
        if not branches:
            with super()._capture(policy, on_done) as store:
                yield store
            return
        with branch_capture(policy, self._writers) as bstore:

            def done(store: dict[str, Any]) -> None:
                S = bstore.u.size(1)
                estimate = first_order_residual(bstore, S - 1)  # (B, S - 1): positions 0 .. S - 2
                store["branches"] = [torch.nn.functional.pad(estimate, (0, 1))]  # (B, S)
                if on_done is not None:
                    on_done(store)

            with super()._capture(policy, done, branches=False) as store:
                yield store


class UniformWithBranchHooks(ArcaGRPOTrainer):
    """Uniform credit plus only `branch_capture` and `first_order_residual` in the loss forward (no credit
    path: no head statistics, no weights): the hooks' own cost."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not hasattr(self, "_writers"):
            self._writers = find_residual_writers(self.accelerator.unwrap_model(self.model))
        T = inputs["completion_ids"].size(1)
        scores: list[torch.Tensor] = []  # (a forward hook that returns a value would replace the output)
        with branch_capture(model, self._writers) as store:
            done = self._backbone.register_forward_hook(
                lambda m, a, o: scores.append(first_order_residual(store, T))
            )
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                done.remove()


@dataclass
class Job:
    name: str
    trainer: ArcaGRPOTrainer
    rows: list[dict[str, str]]
    inputs: dict[str, Any] | None = None
    optimizer: Any = None


def build_job(name: str, cls: type, credit: str, model_dir: str, sizes: Sizes, tmp: str) -> Job:
    steps = sizes.whole_warmup + sizes.whole_steps
    cfg = make_config(
        model=model_dir,
        task="arith",
        rank=4,
        target_modules="all-linear",
        prompts_per_step=sizes.prompts,
        num_generations=sizes.generations,
        max_completion_length=sizes.max_completion_length,
        credit=credit,
        kl_probe=False,
        steps=steps,
        seed=SEED,
        threads=THREADS,
        out=f"{tmp}/run",
    )
    transformers.set_seed(SEED)  # identical LoRA init for every configuration
    model, tokenizer = load_policy(cfg)
    task = get_task("arith")
    rows = task.train_rows(steps * sizes.prompts, seed=SEED)
    trainer = cls(
        model=model,
        reward_funcs=make_reward_fn(task),
        args=grpo_args(cfg, f"{tmp}/trainer-{len(os.listdir(tmp))}", progress=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg, model),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; compute_loss divides by it
    return Job(name, trainer, rows)


def generation_rows(rows: list[dict[str, str]], step: int, sizes: Sizes) -> list[dict[str, str]]:
    """One generation batch as TRL's sampler yields it: each prompt repeated num_generations times."""
    prompts = rows[step * sizes.prompts : (step + 1) * sizes.prompts]
    return [r for r in prompts for _ in range(sizes.generations)]


def loss_step(job: Job) -> None:
    trainer, inputs = job.trainer, job.inputs
    if trainer._needs_base:  # the shared base pass is part of exact ARCA's cost
        inputs["probe_rows"], inputs["base_rows"] = trainer._probe_rows(inputs["completion_ids"].size(0))
        inputs["base_hidden"], _ = trainer._base_pass(inputs)
    trainer.compute_loss(trainer.model, inputs).backward()
    trainer.model.zero_grad(set_to_none=True)


def whole_step(job: Job, step: int, sizes: Sizes) -> None:
    trainer = job.trainer
    trainer.training_step(trainer.model, generation_rows(job.rows, step, sizes), None)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
    job.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


def clocked(fn: Callable[[], Any]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def rounds(
    jobs: list[Job], n: int, warmup: int, run: Callable[[Job, int], None], rng: random.Random
) -> Samples:
    """Every job once per round, in a fresh random order; the rounds after `warmup` are recorded."""
    samples: Samples = defaultdict(list)
    for r in range(warmup + n):
        order = list(jobs)
        rng.shuffle(order)
        for job in order:
            t = clocked(lambda job=job, r=r: run(job, r))
            if r >= warmup:
                samples[job.name].append(t)
        log(f"  round {r + 1}/{warmup + n}")
    return samples


def paired(samples: Samples, name: str, ref: str) -> tuple[float, float, float]:
    """(wall, CPU) median over rounds of name / ref timed in the same round, and the relative IQR of the
    CPU ratios (their noise)."""
    pairs = list(zip(samples[name], samples[ref], strict=True))
    wall, cpu = (np.array([a[i] / b[i] for a, b in pairs]) for i in (0, 1))
    q1, q3 = np.percentile(cpu, [25, 75])
    return float(np.median(wall)), float(np.median(cpu)), float((q3 - q1) / np.median(cpu))


def step_costs(model_dir: str, sizes: Sizes, rng: random.Random):
    tmp = tempfile.mkdtemp(prefix="bench_branch-")
    specs = [
        ("uniform", ArcaGRPOTrainer, "uniform"),
        ("uniform + branch hooks only", UniformWithBranchHooks, "uniform"),
        ("arca (exact, base pass)", ArcaGRPOTrainer, "arca"),
    ]
    if "first_order_residual" in vars(trainer_module):  # the trainer already uses arca_lab.branch
        specs.insert(2, ("arca_branch (trainer)", ArcaGRPOTrainer, "arca_branch"))
    else:
        specs.insert(2, ("arca_branch old (trainer)", ArcaGRPOTrainer, "arca_branch"))
        specs.insert(3, ("arca_branch new (arca_lab.branch)", ProposedBranchTrainer, "arca_branch"))
    jobs = [build_job(name, cls, credit, model_dir, sizes, tmp) for name, cls, credit in specs]
    torch.manual_seed(SEED)
    shared = jobs[0].trainer._generate_and_score_completions(generation_rows(jobs[0].rows, 0, sizes))
    for job in jobs:
        job.inputs = dict(shared)
        job.optimizer = job.trainer.create_optimizer()
    log("loss steps")
    loss = rounds(jobs, sizes.loss_reps, sizes.loss_warmup, lambda job, r: loss_step(job), rng)
    lengths: dict[str, list[float]] = defaultdict(list)

    def whole(job: Job, r: int) -> None:
        torch.manual_seed(SEED + 1000 + r)  # the same sampling stream for every configuration at round r
        whole_step(job, r, sizes)
        lengths[job.name] += job.trainer._metrics["train"].get("completions/mean_length", [math.nan])[-1:]

    log("whole steps")
    steps = rounds(jobs, sizes.whole_steps, sizes.whole_warmup, whole, rng)
    return jobs, shared, loss, steps, {k: float(np.mean(v[sizes.whole_warmup :])) for k, v in lengths.items()}


# --- report -------------------------------------------------------------------------------------------------
def report_agreement(adapters: list[str], model_dir: str, sizes: Sizes) -> None:
    print(
        f"\n1. Spearman rho with exact ARCA, {sizes.corr_prompts} held-out prompts x {sizes.corr_samples} "
        "fresh completions: per completion (mean / median over completions) and pooled over tokens; "
        f"scale = median of score / exact ARCA. Target for arca_branch: rho >= {RHO_TARGET}"
    )
    for adapter in adapters:
        scores, mask = scores_on(adapter, model_dir, sizes)
        print(
            f"\nadapter {adapter}: {mask.size(0)} completions, {mask.sum(1).float().mean():.1f} valid "
            f"tokens on average, mean exact ARCA {scores['exact ARCA'][mask].mean():.3g}"
        )
        head = f"{'score':<42}{'mean rho':>10}{'median':>9}{'pooled':>9}{'n':>5}{'scale':>8}"
        print(head + "\n" + "-" * len(head))
        found = agreement(scores, mask)
        for name, a in found.items():
            cells = f"{a['mean']:>10.3f}{a['median']:>9.3f}{a['pooled']:>9.3f}{a['n']:>5}{a['scale']:>8.3f}"
            print(f"{name:<42}{cells}")
        rho = (found[NEW]["mean"], found[NEW]["median"], found[NEW]["pooled"])
        tag = "MET" if min(rho) >= RHO_TARGET else ("MISSED" if max(rho) < RHO_TARGET else "MIXED")
        print(
            f"[{tag}] new arca_branch rho >= {RHO_TARGET}: mean {rho[0]:.3f}, median {rho[1]:.3f}, "
            f"pooled {rho[2]:.3f}"
        )


def report_costs(model_dir: str, sizes: Sizes, rng: random.Random) -> None:
    jobs, shared, loss, steps, lengths = step_costs(model_dir, sizes, rng)
    u = jobs[0].name
    mask = shared["completion_mask"]
    print(
        f"\n2. Step cost, KL probe off, LoRA r = 4 all-linear, {sizes.prompts} prompts x {sizes.generations} "
        f"completions, max_completion_length {sizes.max_completion_length}; loss-step batch: padded T = "
        f"{mask.size(1)}, {mask.sum(1).float().mean():.1f} valid tokens on average. Medians of "
        f"{sizes.loss_reps} loss steps / {sizes.whole_steps} whole steps after warm-up; ×uniform = paired "
        "ratio (wall), cpu× = on CPU time, ±iqr = relative IQR of the paired CPU ratios"
    )
    head = (
        f"{'credit':<34}{'loss ms':>9}{'×uniform':>9}{'cpu×':>7}{'±iqr':>6}{'whole ms':>10}{'×uniform':>9}"
        f"{'cpu×':>7}{'±iqr':>6}{'est×':>7}{'gen len':>8}"
    )
    print(head + "\n" + "-" * len(head))
    loss_u = float(np.median([s[1] for s in loss[u]]))
    whole_u = float(np.median([s[1] for s in steps[u]]))
    verdicts = []
    for job in jobs:
        lw, lc, li = paired(loss, job.name, u)
        ww, wc, wi = paired(steps, job.name, u)
        est = 1 + (lc - 1) * loss_u / whole_u  # whole(config) = whole(uniform) + loss(config) - loss(uniform)
        loss_ms, whole_ms = (float(np.median([s[0] for s in t[job.name]])) for t in (loss, steps))
        print(
            f"{job.name:<34}{loss_ms:>9.1f}{lw:>9.3f}{lc:>7.3f}{li:>6.2f}"
            f"{whole_ms:>10.1f}{ww:>9.3f}{wc:>7.3f}{wi:>6.2f}{est:>7.3f}{lengths[job.name]:>8.1f}"
        )
        if job.name.startswith("arca_branch"):
            tag = (
                "MET"
                if max(ww, wc, est) <= COST_TARGET
                else "MISSED"
                if min(ww, wc, est) > COST_TARGET
                else "MIXED"
            )
            verdicts.append(
                f"[{tag}] {job.name}: whole step <= {COST_TARGET} x uniform: wall {ww:.3f}, CPU {wc:.3f}, "
                f"est {est:.3f}"
            )
    print(
        f"(uniform: loss step {loss_u:.0f} ms CPU = {100 * loss_u / whole_u:.0f}% of its whole step "
        f"{whole_u:.0f} ms CPU; est× = whole-step ratio predicted from the loss-step CPU ratio)"
    )
    print("\n".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--adapter", action="append", help="peft adapter directory (repeatable); default: train"
    )
    parser.add_argument("--quick", action="store_true", help="small batches, few repetitions (smoke run)")
    parser.add_argument("--skip-timing", action="store_true", help="rank agreement only")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    model_dir = str(embedded_model_dir())
    adapters = args.adapter or []
    if not adapters:
        log("training the adapter (arca-lab train --credit uniform --rank 4 --steps 12 --eval-prompts 8)")
        adapters = [train_adapter(model_dir, tempfile.mkdtemp(prefix="bench_branch-adapter-") + "/run")]
        torch.set_num_threads(THREADS)  # train() sets its own thread count
    print(
        f"\nbench_branch{' --quick' if args.quick else ''}: embedded model {model_dir}, fp32 CPU, seed {SEED}"
    )
    report_agreement(adapters, model_dir, sizes)
    if not args.skip_timing:
        report_costs(model_dir, sizes, random.Random(SEED))
    print(
        f"\ntotal {time.perf_counter() - t0:.0f} s, torch threads {torch.get_num_threads()}; load average "
        f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end (above {THREADS}: other processes shared the "
        "cores, trust the CPU ratios)"
    )


if __name__ == "__main__":
    main()
