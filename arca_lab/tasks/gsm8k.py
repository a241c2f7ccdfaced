"""GSM8K: grade-school math word problems with a numeric answer after ``####``, in a chat model's template.

The task of the `merl` preset, which follows MERL's published sweep code (`antoninrottman/simple-grpo`,
``qwen/train_grpo.py`` at commit 6fe2c44): the prompt is their system turn (answer in ``<reasoning>`` /
``<answer>`` tags), their one-shot example, then the question, rendered with the tokenizer's chat template and
its generation prompt.

Reward: 1.0 iff the completion's final answer equals the reference as a number, with the free-text parser of
`chat_arith` (`arca_lab.tasks.chat_arith.free_text_reward`: the number after the last "answer is", else the last
number; in the tagged format that is the number inside ``<answer>``). MERL sums four shaped rewards instead
(XML tag counts, format, "is a number", and exact match worth 2 with partial credit for numbers within 50 %);
we keep one binary correctness reward so that every task's reward means the same thing (README).
Token roles: `chat_arith`'s (`free_text_roles`: ANSWER on the final answer's characters, WORK on digits and
operators, FORMAT on the rest, tags and special tokens included).

Sources: a local ``.jsonl`` file (one object per line with ``question`` and ``answer``, the answer ending in
``#### <number>`` as in the GSM8K release), or a datasets hub id (default ``openai/gsm8k``, config ``main``,
splits ``train`` / ``test``; for GPU machines with network access). A local file is split by a hash of the
whitespace-normalised question (`eval_fraction` to eval), so the split depends on neither file order nor seed.
Sampling: `train_rows(n, seed)` / `eval_rows(n, seed)` draw `n` distinct rows with `random.Random(seed)`; asking
for more rows than a split holds raises.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from arca_lab.tasks.chat_arith import canonical_number, free_text_reward, free_text_roles
from arca_lab.tasks.math import hash_unit, read_jsonl

DEFAULT_SOURCE = "openai/gsm8k"
SYSTEM_PROMPT = """
Respond in the following format:

<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""
"""MERL's system turn, verbatim (simple-grpo qwen/train_grpo.py, `SYSTEM_PROMPT`)."""
ONE_SHOT = (
    "What is the largest single-digit prime number?",
    "<reasoning>\n9 is divisible by 3 and 8 is divisible by 2, but 7 is prime.\n</reasoning>\n<answer>\n7\n</answer>\n",
)
"""MERL's one-shot example (user, assistant), verbatim (simple-grpo `get_gsm8k_questions(use_one_shot=True)`)."""
_SPLIT_SALT = b"arca-lab/gsm8k-split/v1:"


def reference_answer(solution: str) -> str | None:
    """The canonical number after the last ``####`` of a GSM8K solution ("... #### 1,037" -> "1037"); None if
    there is no ``####`` or what follows is not a number."""
    if "####" not in solution:
        return None
    return canonical_number(solution.rsplit("####", 1)[1].strip())


def _is_eval_question(question: str, eval_fraction: float) -> bool:
    """Hash split on the whitespace-normalised question (`arca_lab.tasks.math.hash_unit`, this task's salt)."""
    return hash_unit(question, _SPLIT_SALT) < eval_fraction


def _check_row(row: dict[str, Any]) -> str | None:
    if not isinstance(row.get("question"), str):
        return "each line must be an object with a string 'question'"
    if not isinstance(row.get("answer"), str) or reference_answer(row["answer"]) is None:
        return "'answer' must be a string ending in '#### <number>' (the GSM8K format)"
    return None


def _load_hub(source: str, config: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading GSM8K from the hub needs `datasets`: pip install datasets") from e
    try:
        return [dict(r) for r in datasets.load_dataset(source, config, split=split)]
    except Exception as e:
        raise RuntimeError(
            f"could not load {source!r} (config {config!r}, split {split!r}) with datasets.load_dataset: {e}. "
            "Without network access, pass a local JSONL path (--data file.jsonl) with one "
            "{'question': ..., 'answer': '... #### N'} object per line."
        ) from e


class GSM8KTask:
    """GSM8K in a chat model's template (module docstring for prompt, reward, roles, splits).

    Args:
        source: a local JSONL path or a datasets hub id.
        tokenizer: a tokenizer with a chat template; None renders plain text (system, example, question).
        config, split_train, split_eval: the hub dataset's config and splits (ignored for a local file).
        eval_fraction: share of a local file's questions held out.
        one_shot: include MERL's one-shot example in the prompt.
    """

    name = "gsm8k"

    def __init__(
        self,
        source: str = DEFAULT_SOURCE,
        tokenizer=None,
        *,
        config: str = "main",
        split_train: str = "train",
        split_eval: str = "test",
        eval_fraction: float = 0.2,
        one_shot: bool = True,
    ) -> None:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "task gsm8k renders prompts with the model's chat template, and this tokenizer has none: use an "
                "instruct model (e.g. Qwen/Qwen2.5-1.5B-Instruct) or --task math for base models"
            )
        self.source, self.tokenizer, self.one_shot = source, tokenizer, one_shot
        self.config, self.split_train, self.split_eval = config, split_train, split_eval
        self.eval_fraction = eval_fraction
        self.is_local = source.endswith(".jsonl") or Path(source).is_file()
        if self.is_local and not Path(source).is_file():
            raise ValueError(f"GSM8K source {source!r} looks like a local JSONL file but does not exist")
        self._pools: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None
        if self.is_local:
            self._pools = self._build_pools()  # fail on bad rows now, not mid-run

    def __repr__(self) -> str:
        return f"GSM8KTask({self.source!r})"

    # ----------------------------------------------------------------- rows
    def render(self, question: str) -> str:
        """The prompt text: system turn, one-shot example, question, in the chat template with generation prompt."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        if self.one_shot:
            messages += [
                {"role": "user", "content": ONE_SHOT[0]},
                {"role": "assistant", "content": ONE_SHOT[1]},
            ]
        messages.append({"role": "user", "content": question})
        if self.tokenizer is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _to_row(self, raw: dict[str, Any]) -> dict[str, str] | None:
        answer = reference_answer(str(raw.get("answer", "")))
        if answer is None:
            return None
        return {"prompt": self.render(raw["question"]), "answer": answer, "question": raw["question"]}

    def _build_pools(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        if self.is_local:
            raw = read_jsonl(Path(self.source), _check_row)
            raw_eval = [r for r in raw if _is_eval_question(r["question"], self.eval_fraction)]
            raw_train = [r for r in raw if not _is_eval_question(r["question"], self.eval_fraction)]
        else:
            raw_train = _load_hub(self.source, self.config, self.split_train)
            raw_eval = _load_hub(self.source, self.config, self.split_eval)
            # never train on a question that is also in eval
            held = {" ".join(r["question"].split()) for r in raw_eval}
            raw_train = [r for r in raw_train if " ".join(r["question"].split()) not in held]
        train = [row for r in raw_train if (row := self._to_row(r)) is not None]
        evals = [row for r in raw_eval if (row := self._to_row(r)) is not None]
        if not train or not evals:
            raise ValueError(
                f"{self.source}: the split left {len(train)} train and {len(evals)} eval questions; "
                "add questions or change eval_fraction"
            )
        return train, evals

    @property
    def pools(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(train rows, eval rows), loaded on first use."""
        if self._pools is None:
            self._pools = self._build_pools()
        return self._pools

    def _sample(self, pool: list[dict[str, str]], n: int, seed: int, what: str) -> list[dict[str, str]]:
        if not 0 <= n <= len(pool):
            raise ValueError(
                f"{self!r} holds {len(pool)} {what} questions, {n} asked for: ask for fewer "
                f"({'--eval-prompts' if what == 'eval' else '--steps x --prompts-per-step'}) or add questions"
            )
        return [dict(pool[i]) for i in random.Random(seed).sample(range(len(pool)), n)]

    def train_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct training rows, deterministic for `seed`."""
        return self._sample(self.pools[0], n, seed, "train")

    def eval_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct held-out rows, deterministic for `seed`."""
        return self._sample(self.pools[1], n, seed, "eval")

    # ------------------------------------------------------- reward, roles
    def reward(self, completion: str, answer: str) -> float:
        """1.0 iff the completion's final answer equals `answer` as a number (module docstring); never raises."""
        return free_text_reward(completion, answer)

    def token_roles(self, completion_ids: list[int], tokenizer) -> list[int]:
        """Role per completion token, as chat_arith's (`free_text_roles`)."""
        return free_text_roles(completion_ids, tokenizer)
