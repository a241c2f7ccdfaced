"""Build an ArcaGRPOTrainer around a small model for tests, with a reward that varies within groups."""

from __future__ import annotations

import torch
import transformers
from datasets import Dataset

from arca_lab.config import make_config
from arca_lab.models import load_policy, lora_config
from arca_lab.run import grpo_args
from arca_lab.tasks import get_task


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """Varies with the sampled completion, so group advantages are non-zero even for a random model."""
    return [float(len(c) % 3) for c in completions]


def make_trainer(model_dir, tmp_path, seed: int = 0, perturb_b: float = 0.0, **overrides):
    from arca_lab.trainer import ArcaGRPOTrainer

    values = dict(
        model=str(model_dir),
        steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_completion_length=12,
        rank=4,
        seed=seed,
        out=str(tmp_path / "run"),
    )
    values.update(overrides)
    cfg = make_config(**values)
    transformers.set_seed(seed)
    model, tokenizer = load_policy(cfg)
    task = get_task("arith")
    rows = task.train_rows(cfg.steps * cfg.prompts_per_step, seed=seed)
    trainer = ArcaGRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=grpo_args(cfg, str(tmp_path / "trainer"), progress=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg, model),
        token_roles=lambda ids: task.token_roles(ids, tokenizer),
    )
    if perturb_b:  # peft starts at B = 0 (adapter = identity); give it a random non-zero B
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.data = perturb_b * torch.randn(p.shape, generator=g)
    return trainer, rows


def one_batch(trainer, rows):
    """Generate and score one generation batch, as TRL does at the start of a step."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; compute_loss divides by it
    batch = [
        r
        for r in rows[: trainer.args.per_device_train_batch_size // trainer.num_generations]
        for _ in range(trainer.num_generations)
    ]
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(batch)
