"""Held-out evaluation: greedy accuracy and pass@k of a (possibly adapted) policy on a task's eval rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from arca_lab.tasks.base import Task


@dataclass
class EvalResult:
    greedy_correct: np.ndarray
    """(n_prompts,) 1.0 where the greedy completion is correct."""
    pass_correct: np.ndarray
    """(n_prompts,) 1.0 where at least one of k sampled completions is correct."""
    k: int
    """Samples per prompt behind `pass_correct`."""

    @property
    def greedy_accuracy(self) -> float:
        """Mean of greedy_correct; NaN when no prompt was scored (eval_prompts = 0)."""
        return float(self.greedy_correct.mean()) if self.greedy_correct.size else float("nan")

    @property
    def pass_at_k(self) -> float:
        """Mean of pass_correct; NaN when no prompt was scored or pass_k = 0."""
        return float(self.pass_correct.mean()) if self.pass_correct.size else float("nan")


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
) -> list[str]:
    """Completions (prompt removed, special tokens dropped), `num_return_sequences` per prompt, prompt-major."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # generation appends on the right
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        # Same prompt tokenisation as TRL's GRPOTrainer (`processing_class(text=prompts)`).
        enc = tokenizer(text=prompts[s : s + batch_size], return_tensors="pt", padding=True).to(device)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        )
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
    return out


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    rows: list[dict[str, str]],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> EvalResult:
    """Greedy accuracy and pass@k (k samples at the sampling temperature: 1 if any is correct; k = 0: greedy
    only, pass@k NaN)."""
    was_training = model.training
    model.eval()
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    if k < 1:  # greedy only (pass@k not measured: NaN, never a 0 that reads as "never solved")
        model.train(was_training)
        greedy_correct = np.array([task.reward(c, a) for c, a in zip(greedy, answers, strict=True)])
        return EvalResult(greedy_correct, np.full(len(prompts), np.nan), 0)
    torch.manual_seed(seed)  # sampled completions are reproducible for a seed
    sampled = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_return_sequences=k,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
    )
    model.train(was_training)
    greedy_correct = np.array([task.reward(c, a) for c, a in zip(greedy, answers, strict=True)])
    sampled_correct = np.array([task.reward(c, answers[i // k]) for i, c in enumerate(sampled)]).reshape(
        -1, k
    )
    return EvalResult(greedy_correct, sampled_correct.max(axis=1), k)
