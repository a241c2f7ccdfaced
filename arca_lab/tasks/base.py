"""What a verifiable task gives the lab: prompts with reference answers, a reward, and token roles.

A task is anything with this interface; `arca_lab.tasks.get_task(name, ...)` builds the registered ones.
Roles label every completion token as task-agnostic (`format`: separators, markers, end of sequence),
intermediate reasoning (`work`) or the final answer (`answer`), so the lab can measure how much credit lands on
task-agnostic positions (ARCA paper, arXiv 2606.00257, Sec. "degenerate credit").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

ROLES: tuple[str, ...] = ("format", "work", "answer")
"""Role names; a role id is the index into this tuple."""
FORMAT, WORK, ANSWER = 0, 1, 2


@runtime_checkable
class Task(Protocol):
    """A verifiable task: rows are dicts with at least ``prompt`` (str) and ``answer`` (str)."""

    name: str

    def train_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` training rows, deterministic for `seed`."""
        ...

    def eval_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` held-out rows, disjoint from every `train_rows` draw, deterministic for `seed`."""
        ...

    def reward(self, completion: str, answer: str) -> float:
        """1.0 if the completion's final answer equals `answer`, else 0.0."""
        ...

    def token_roles(self, completion_ids: list[int], tokenizer) -> list[int]:
        """Role id (index into `ROLES`) for each token of one completion (no padding)."""
        ...
