"""Verifiable tasks: `get_task(name, **kwargs)` builds a registered `Task` (protocol in `arca_lab.tasks.base`)."""

from __future__ import annotations

from arca_lab.tasks.arith import ArithTask
from arca_lab.tasks.base import ANSWER, FORMAT, ROLES, WORK, Task

TASK_NAMES: tuple[str, ...] = ("arith", "math", "chat_arith", "gsm8k")
"""Names `get_task` accepts."""


def get_task(name: str, **kwargs) -> Task:
    """The task registered as `name`, built with `kwargs`.

    ``"arith"`` → `ArithTask(**kwargs)` (the embedded model's task); ``"math"`` →
    `arca_lab.tasks.math.MathTask(**kwargs)`, imported only when asked for (it needs the ``math`` extra);
    ``"chat_arith"`` → `arca_lab.tasks.chat_arith.ChatArithTask(**kwargs)` (pass the model's `tokenizer`);
    ``"gsm8k"`` → `arca_lab.tasks.gsm8k.GSM8KTask(**kwargs)` (a `source` and the model's `tokenizer`).
    """
    if name == "arith":
        return ArithTask(**kwargs)
    if name == "math":
        from arca_lab.tasks.math import MathTask

        return MathTask(**kwargs)
    if name == "chat_arith":
        from arca_lab.tasks.chat_arith import ChatArithTask

        return ChatArithTask(**kwargs)
    if name == "gsm8k":
        from arca_lab.tasks.gsm8k import GSM8KTask

        return GSM8KTask(**kwargs)
    raise ValueError(f"unknown task {name!r}; accepted names: {', '.join(TASK_NAMES)}")


__all__ = ["ANSWER", "FORMAT", "ROLES", "TASK_NAMES", "WORK", "ArithTask", "Task", "get_task"]
