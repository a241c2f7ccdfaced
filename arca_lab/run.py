"""One fine-tune, start to finish: load, evaluate, GRPO with LoRA and token credit, evaluate, save.

Output directory (written to a staging directory first and moved into place only when complete, so a crash or an
`--overwrite` never destroys a finished run):
    config.json   the RunConfig
    adapter/      the LoRA adapter (`save_pretrained`; load with `PeftModel.from_pretrained(base, dir)`)
    checkpoints/  with --save-every K: the adapter after every K-th step, step-<k>/ (`checkpoints(run_dir)`)
    run.nc        curves, final-batch token arrays, eval results, bound inputs (see arca_lab/results.py)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from arca_lab.config import HF_LR_SCHEDULERS, RunConfig
from arca_lab.evaluate import EvalResult, evaluate
from arca_lab.models import base_head, load_policy, lora_config, resolve_device_dtype
from arca_lab.results import base_model_info, build_dataset, remember_written, write_netcdf
from arca_lab.tasks import get_task
from arca_lab.tasks.base import Task
from arca_lab.trainer import ArcaGRPOConfig, ArcaGRPOTrainer

# transformers 5.23 deprecates `is_gradient_checkpointing`, which its own Trainer still calls on every run.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

EVAL_SEED = 0
"""Held-out rows are the same for every run seed, so before/after accuracies pair across runs."""

_BEFORE: dict[tuple, EvalResult] = {}
"""The base model's held-out evaluation, per `_before_key`: the same for every run of a sweep on one base model,
so a warm sweep kernel evaluates it once (≈ 0.5 s of a 9 s head-only run). Its key holds everything the result
depends on (weight files, dtype, device, threads, task, eval settings); a hit returns copies of the arrays."""


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {out} exists: pass --overwrite to replace it, or choose another --out"
        )
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write in {parent}: choose another --out")


def load_task(cfg: RunConfig) -> Task:
    """The run's task; chat_arith renders its prompts with the model's own tokenizer (loaded alone, no weights)."""
    source = {"source": cfg.data} if cfg.task in ("math", "gsm8k") and cfg.data else {}
    if cfg.task in ("chat_arith", "gsm8k"):
        from transformers import AutoTokenizer

        from arca_lab.models import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
        return get_task(cfg.task, tokenizer=tokenizer, **source)
    return get_task(cfg.task, **source)


def make_reward_fn(task: Task):
    """TRL reward function: dataset column `answer` arrives as a keyword argument."""

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        values = [float(task.reward(c, a)) for c, a in zip(completions, answer, strict=True)]
        if any(math.isnan(v) for v in values):
            raise ValueError(
                f"task {task.name!r} returned a NaN reward: make Task.reward return 0.0 for unscorable completions"
            )
        return values

    reward.__name__ = f"{task.name}_correct"
    return reward


def grpo_args(cfg: RunConfig, output_dir: str, progress: bool) -> ArcaGRPOConfig:
    device, dtype = resolve_device_dtype(cfg)
    on_cpu = device.type == "cpu"
    schedule = HF_LR_SCHEDULERS[cfg.lr_schedule]
    return ArcaGRPOConfig(
        output_dir=output_dir,
        credit=cfg.credit,
        sharpening=cfg.sharpening,
        credit_eps=cfg.credit_eps,
        arca_layers=cfg.arca_layers,
        layer_aggregate=cfg.layer_aggregate,
        kl_probe=cfg.kl_probe,
        kl_probe_every=cfg.kl_probe_every,
        rollout_engine=cfg.rollout_engine,
        rollout_noise=cfg.rollout_noise,
        correction=cfg.correction,
        is_clip=cfg.is_clip,
        is_band=cfg.band(),
        is_seq_agg=cfg.is_seq_agg,
        rs_estimator=cfg.rs_estimator,
        rs_level=cfg.rs_level,
        dc_lambda0=cfg.dc_lambda0,
        dc_lr=cfg.dc_lr,
        dc_lambda_max=cfg.dc_lambda_max,
        dc_target=cfg.dc_target,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_completions // cfg.grad_accum,
        gradient_accumulation_steps=cfg.grad_accum,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,  # TRL: 0 = no top-k filter
        repetition_penalty=cfg.repetition_penalty,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        num_iterations=1,
        use_bias_correction_kl=True,  # TRL's default changed across versions: explicit
        learning_rate=cfg.lr,
        lr_scheduler_type=schedule,
        warmup_steps=cfg.warmup_steps,
        optim="adamw_torch" if cfg.optimizer == "adamw" else "sgd",
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        # No clipping still logs the pre-clip norm: clip_grad_norm_ with a huge bound scales by 1.
        max_grad_norm=cfg.grad_clip if cfg.grad_clip is not None else 1e30,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=on_cpu,
        bf16=dtype == torch.bfloat16,
        activation_checkpointing=not on_cpu,  # TRL's default; on CPU it only costs time
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        # Dropout in the loss forward only with train_dropout (TRL's switch zeroes every nn.Dropout otherwise);
        # sampling, the base pass, credit and the KL probe run without dropout either way (trainer item 7).
        disable_dropout=not cfg.train_dropout,
    )


class QuietProgress(ProgressCallback):
    """HF's progress bar without its per-step dump of every logged metric (they go to run.nc instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class AdapterCheckpoints(TrainerCallback):
    """Saves the adapter after every K-th optimiser step to `<dir>/step-<k>/` (peft `save_pretrained`; the final
    adapter goes to adapter/ as always), so KL and accuracy against steps can be measured after the run."""

    def __init__(self, every: int, directory: Path) -> None:
        self.every, self.directory = every, directory

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 and step < state.max_steps:
            model.save_pretrained(self.directory / checkpoint_name(step))


class GreedyEvalAt(TrainerCallback):
    """Greedy accuracy on the run's held-out rows after the optimiser steps `steps` (RunConfig.eval_at), with the
    adapter as it is then; under a forked RNG (greedy decoding draws nothing, but generate may), so adding it
    changes nothing else of the run. `results[step]` = per-prompt correctness (1/0)."""

    def __init__(self, steps: tuple[int, ...], score) -> None:
        self.steps, self.score = set(steps), score
        self.results: dict[int, np.ndarray] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            with torch.random.fork_rng(devices=[]):
                self.results[state.global_step] = self.score(model)


def checkpoint_name(step: int) -> str:
    return f"step-{step:05d}"


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, adapter directory) of a finished run: every `--save-every` checkpoint, then the final adapter."""
    run_dir = Path(run_dir)
    cfg = RunConfig.from_json((run_dir / "config.json").read_text())
    found = [(int(p.name.split("-")[1]), p) for p in sorted((run_dir / "checkpoints").glob("step-*"))]
    return [*found, (cfg.steps, run_dir / "adapter")]


class StepRecorder(TrainerCallback):
    """Keeps every per-step log dict (TRL logs its metrics and ours once per optimiser step)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" not in logs:
            # TRL logs a metric with nothing to average (all NaN) as None: keep it as NaN.
            values = {k: math.nan if v is None else float(v) for k, v in logs.items()}
            self.logs.append({"step": state.global_step, **values})


def adapter_init_stats(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """||A0||_F and ||A0||_op per adapted module (what the a-priori bound needs), with its dims."""
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            A = next(iter(module.lora_A.values())).weight.detach().float()  # (r, d_in)
            B = next(iter(module.lora_B.values())).weight  # (d_out, r)
            stats[name.removeprefix("base_model.model.")] = {
                "a0_fro": A.norm().item(),
                "a0_op": torch.linalg.matrix_norm(A, ord=2).item(),
                "d_in": float(A.size(1)),
                "d_out": float(B.size(0)),
            }
    return stats


def train(cfg: RunConfig, progress: bool = True) -> Path:
    """Run one fine-tune and return its output directory."""
    out = Path(cfg.out)
    check_output_dir(out, cfg.overwrite)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    transformers.set_seed(cfg.seed)
    task = load_task(cfg)  # first: a missing data file is reported before the model loads
    model, tokenizer = load_policy(cfg)
    base_model = base_model_info(model.config._name_or_path)  # before peft wraps the model
    train_rows = _fit_prompts(
        task.train_rows(cfg.steps * cfg.prompts_per_step, seed=cfg.seed), tokenizer, cfg
    )
    eval_rows = task.eval_rows(cfg.eval_prompts, seed=EVAL_SEED)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    try:
        before = _evaluate_base(model, tokenizer, task, eval_rows, cfg)
        recorder = StepRecorder()
        greedy = dataclasses.replace(cfg, pass_k=0)
        evals_at = GreedyEvalAt(
            cfg.eval_steps(), lambda m: _evaluate(m, tokenizer, task, eval_rows, greedy).greedy_correct
        )
        transformers.set_seed(cfg.seed)  # the LoRA init draws from the global generator
        trainer = ArcaGRPOTrainer(
            model=model,
            reward_funcs=make_reward_fn(task),
            args=grpo_args(cfg, str(staging / "trainer"), progress),
            train_dataset=Dataset.from_list(train_rows),
            processing_class=tokenizer,
            peft_config=lora_config(cfg, model),
            token_roles=lambda ids: task.token_roles(ids, tokenizer),
            callbacks=[recorder, evals_at]
            + ([AdapterCheckpoints(cfg.save_every, staging / "checkpoints")] if cfg.save_every else []),
        )
        trainer.remove_callback(PrinterCallback)  # per-step metric dicts belong in run.nc, not on stdout
        if progress:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(QuietProgress)
        layers = adapter_init_stats(trainer.model)
        w_lm_op = torch.linalg.matrix_norm(base_head(trainer.model).weight.detach().float(), ord=2).item()
        evals = {}
        if trainer.rollout_engine is not None:  # held-out accuracy under the engine too (its own precision)
            evals |= _engine_eval(trainer, tokenizer, task, eval_rows, cfg, "before")
        trainer.train()
        after = _evaluate(trainer.model, tokenizer, task, eval_rows, cfg)
        if trainer.rollout_engine is not None:
            evals |= _engine_eval(trainer, tokenizer, task, eval_rows, cfg, "after")

        shutil.rmtree(staging / "trainer", ignore_errors=True)
        trainer.model.save_pretrained(staging / "adapter")
        (staging / "config.json").write_text(cfg.to_json() + "\n")
        head_norms = [log["head_input/max_norm"] for log in recorder.logs if "head_input/max_norm" in log]
        scalars = {
            "w_lm_op_norm": w_lm_op,
            "max_head_input_norm": max(head_norms) if head_norms else math.nan,
            "d_model": float(base_head(trainer.model).weight.size(1)),
            "vocab_size": float(base_head(trainer.model).weight.size(0)),
        }
        ds = build_dataset(
            cfg,
            recorder.logs,
            trainer.last_batch,
            layers,
            _eval_vars(before, after) | evals,
            scalars,
            base_model,
            evals_at.results,
        )
        ds.attrs["measurement_json"] = json.dumps(trainer.measurement_info())
        write_netcdf(ds, staging / "run.nc")
        _move_into_place(staging, out)
        remember_written(ds, out / "run.nc")  # the run notebook's `load_run(out)` needs no second read
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _evaluate(model, tokenizer, task: Task, rows, cfg: RunConfig) -> EvalResult:
    return evaluate(
        model,
        tokenizer,
        task,
        rows,
        k=cfg.pass_k,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=EVAL_SEED,
    )


def _before_key(model, cfg: RunConfig) -> tuple | None:
    """What the base model's evaluation depends on; None (never cached) for a model that is not a local
    directory of weight files (a hub id resolved by transformers' own cache)."""
    path = Path(model.config._name_or_path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    if not files:
        return None
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    settings = (
        cfg.task,
        cfg.data,
        cfg.eval_prompts,
        cfg.pass_k,
        cfg.max_completion_length,
        cfg.temperature,
        cfg.top_p,
    )
    where = (str(model.dtype), str(next(model.parameters()).device), torch.get_num_threads())
    return (str(path.resolve()), stats, *where, *settings)


def _evaluate_base(model, tokenizer, task: Task, rows, cfg: RunConfig) -> EvalResult:
    """`_evaluate` of the unadapted base model, from `_BEFORE` when this process has evaluated it already.
    `evaluate` seeds its own sampling and `train` re-seeds before the trainer, so a hit changes nothing else."""
    key = _before_key(model, cfg)
    if key is None:
        return _evaluate(model, tokenizer, task, rows, cfg)
    if key not in _BEFORE:
        _BEFORE.clear()  # one base model at a time: a sweep's runs share it
        _BEFORE[key] = _evaluate(model, tokenizer, task, rows, cfg)
    hit = _BEFORE[key]
    return EvalResult(hit.greedy_correct.copy(), hit.pass_correct.copy(), hit.k)


def _engine_eval(trainer, tokenizer, task: Task, rows, cfg: RunConfig, when: str) -> dict[str, Any]:
    """Greedy accuracy and pass@k of the rollout engine synced to the current policy, `when` = before / after.
    Under a forked RNG, so adding an engine changes nothing else of the run."""
    engine = trainer.rollout_engine
    policy = trainer.accelerator.unwrap_model(trainer.model)
    blank, engine.model.generation_config = (
        engine.model.generation_config,
        policy.generation_config,
    )  # EOS, pad
    try:
        with torch.random.fork_rng(devices=[]):
            engine.sync(policy)
            res = _evaluate(engine.model, tokenizer, task, rows, cfg)
    finally:
        engine.model.generation_config = blank
    return {
        f"greedy_accuracy_{when}_engine": res.greedy_accuracy,
        f"pass_at_k_{when}_engine": res.pass_at_k,
        f"greedy_correct_{when}_engine": res.greedy_correct,
    }


def _eval_vars(before: EvalResult, after: EvalResult) -> dict[str, Any]:
    return {
        "greedy_accuracy_before": before.greedy_accuracy,
        "greedy_accuracy_after": after.greedy_accuracy,
        "pass_at_k_before": before.pass_at_k,
        "pass_at_k_after": after.pass_at_k,
        "greedy_correct_before": before.greedy_correct,
        "greedy_correct_after": after.greedy_correct,
        "pass_correct_before": before.pass_correct,
        "pass_correct_after": after.pass_correct,
    }


def _fit_prompts(rows: list[dict[str, str]], tokenizer, cfg: RunConfig) -> list[dict[str, str]]:
    lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows])["input_ids"]]
    kept = [r for r, n in zip(rows, lengths, strict=True) if n <= cfg.max_prompt_length]
    if len(kept) < len(rows):
        raise ValueError(
            f"{len(rows) - len(kept)} of {len(rows)} prompts are longer than max_prompt_length="
            f"{cfg.max_prompt_length} tokens (longest {max(lengths)}): raise --max-prompt-length"
        )
    return kept


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished staging directory in; an old directory (overwrite) is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)
