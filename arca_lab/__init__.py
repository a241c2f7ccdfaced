"""arca-lab: LoRA, token credit (ARCA and baselines) and KL in GRPO fine-tuning of language models."""

__version__ = "0.1.0"
