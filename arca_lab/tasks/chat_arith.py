"""Arithmetic word problems for a chat model: verifiable, rendered in the model's chat template, answers parsed
from free text. The task of ``--model smollm2-135m``.

A problem is one of a few story templates over small integers, e.g.

    user       Mia has 13 marbles. Mia gets 14 more. How many marbles does Mia have now?
    assistant  Mia has 13 + 14 = 27 marbles. The answer is 27.

The prompt is the conversation (system instruction + the question) rendered with the tokenizer's own chat
template and its generation prompt, so TRL and `arca_lab.evaluate` feed the model exactly what it was tuned on.

Reward: 1.0 iff the final answer equals the reference. The final answer is the number after the last "answer is"
(case-insensitive) if the completion has one, else the last number in the completion, compared as a number
(`canonical_number`: thousands separators, leading zeros and trailing decimal zeros tolerated). Never raises on
model output. The gsm8k task shares this parser (`free_text_reward`, `free_text_roles`).

Difficulty (`level`): the operand range and the number of operations. Level 1 (default) is one addition or
subtraction with operands 2-19; level 2 has operands 10-50, multiplication by 2-9 and two-operation stories.
SmolLM2-135M-Instruct (Q4_1 dequantised), greedy, 96 new tokens: level 1 15.6 % (10 of 64 held-out problems, the
smollm-cpu sweep; 16 %, 5 of 32, on an earlier 1-in-8 split); with a system turn asking for "The answer is N.": 9 %
(level 1, 32 problems), 11 % (operands 10-50) and 6 % (level 2), 64 each (README, "A real pretrained model on CPU").

Train/eval split: a keyed BLAKE2b hash of (template, operands) holds out one problem in `EVAL_MODULUS`, so no
eval problem appears in any training draw, for any seed.

Token roles (ids from `arca_lab.tasks.base`), from each token's character span (`token_char_spans`):
- ANSWER: the token overlaps the characters of the parsed final answer;
- WORK: otherwise, the token holds a digit or an arithmetic operator (+ - × * / =);
- FORMAT: everything else: words, whitespace, punctuation, special tokens (EOS, end of turn).
"""

from __future__ import annotations

import hashlib
import random
import re
from decimal import Decimal

from arca_lab.tasks.base import ANSWER, FORMAT, WORK
from arca_lab.tasks.math import token_char_spans

EVAL_MODULUS = 4
"""One problem in `EVAL_MODULUS` (by hash) is held out for evaluation: level 1 has 495 distinct problems, so 116
held out and 379 for training (with 8, the 51 held out could not serve the smollm-cpu preset's 64 eval prompts)."""
SYSTEM = "You are a helpful assistant."
"""System turn of every prompt (SmolLM2's own default). Asking for "The answer is N." or "one short calculation"
lowered SmolLM2-135M's greedy accuracy (9 % and 6 % against 16 %, 32-64 held-out problems), so it is not asked."""
NAMES = ("Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Ivy", "Ben", "Lily", "Tom", "Emma", "Noah")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "cards", "pencils", "shells")

# (id, text, answer(a, b, c), level, ranges of a, b, c): every answer is a non-negative integer by construction
TEMPLATES = (
    ("add", "{n} has {a} {i}. {n} gets {b} more. How many {i} does {n} have now?", lambda a, b, c: a + b, 1),
    (
        "sub",
        "{n} has {a} {i} and gives {b} of them away. How many {i} does {n} have left?",
        lambda a, b, c: a - b,
        1,
    ),
    (
        "mul",
        "{n} buys {b} bags with {a} {i} in each bag. How many {i} does {n} buy?",
        lambda a, b, c: a * b,
        2,
    ),
    (
        "add_sub",
        "{n} has {a} {i}, gets {b} more, then gives {c} away. How many {i} does {n} have now?",
        lambda a, b, c: a + b - c,
        2,
    ),
)
_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
_ANSWER_RE = re.compile(r"answer\s+is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_NUMBER_RE = re.compile(_NUMBER)
_WORK_CHARS = set("0123456789+-×*/=")


def _is_eval_problem(key: str) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"arca-chat-arith").digest()
    return int.from_bytes(digest, "big") % EVAL_MODULUS == 0


def final_answer_span(completion: str) -> tuple[int, int] | None:
    """[start, end) of the final answer's number in `completion` (after the last "answer is", else the last
    number); None if there is no number."""
    marked = list(_ANSWER_RE.finditer(completion))
    if marked:
        return marked[-1].span(1)
    numbers = list(_NUMBER_RE.finditer(completion))
    return numbers[-1].span() if numbers else None


def canonical_number(number: str) -> str | None:
    """A number's text in one spelling (thousands separators, leading zeros, trailing decimal zeros and "-0"
    removed: "1,037" -> "1037", "37.50" -> "37.5", "037" -> "37"); None if it is not a finite decimal number."""
    text = number.replace(",", "").strip()
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return None
    value = Decimal(text)
    value = value.to_integral_value() if value == value.to_integral_value() else value.normalize()
    out = format(value, "f")
    return "0" if out in ("-0", "0") else out


def free_text_reward(completion: str, answer: str) -> float:
    """1.0 iff the final answer of `completion` (`final_answer_span`) equals `answer` as a number; 0.0 otherwise
    (no number, not a string), never raises. Shared by chat_arith and gsm8k."""
    if not isinstance(completion, str) or not isinstance(answer, str):
        return 0.0
    span = final_answer_span(completion)
    if span is None:
        return 0.0
    got, want = canonical_number(completion[span[0] : span[1]]), canonical_number(answer)
    return float(got is not None and got == want)


def free_text_roles(completion_ids: list[int], tokenizer) -> list[int]:
    """Role per completion token (module docstring: ANSWER on the final answer's characters, WORK on digits and
    operators, FORMAT otherwise and on special tokens), from each token's character span. Shared with gsm8k."""
    ids = [int(i) for i in completion_ids]
    special = set(tokenizer.all_special_ids)
    text, spans = token_char_spans(ids, tokenizer)
    answer = final_answer_span(text)
    roles = []
    for token_id, (start, end) in zip(ids, spans, strict=True):
        piece = text[start:end]
        if token_id in special:
            roles.append(FORMAT)
        elif answer is not None and start < answer[1] and end > answer[0]:
            roles.append(ANSWER)
        elif any(ch in _WORK_CHARS for ch in piece):
            roles.append(WORK)
        else:
            roles.append(FORMAT)
    return roles


class ChatArithTask:
    """Arithmetic word problems in a chat model's template (module docstring).

    Args:
        tokenizer: a tokenizer with a chat template (prompts are rendered with it); None renders plain text
            "question\\n" (for tests and for base models without a template).
        level: 1 (one addition or subtraction, operands 2-19) or 2 (operands 10-50, multiplication, two steps).
    """

    name = "chat_arith"

    def __init__(self, tokenizer=None, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "task chat_arith needs a tokenizer with a chat template (an instruct model such as "
                "smollm2-135m): use --task arith or --task math for base models"
            )
        self.tokenizer, self.level = tokenizer, level
        self.templates = [t for t in TEMPLATES if t[3] <= level]

    def __repr__(self) -> str:
        return f"ChatArithTask(level={self.level})"

    # ----------------------------------------------------------------- rows
    def train_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct training problems (none in the eval split), deterministic for `seed`."""
        return self._draw(n, seed, held_out=False)

    def eval_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct held-out problems, disjoint from every `train_rows` draw, deterministic for `seed`."""
        return self._draw(n, seed, held_out=True)

    def _operands(self, rng: random.Random, kind: str) -> tuple[int, int, int]:
        if kind == "mul":
            return rng.randint(3, 12), rng.randint(2, 9), 0
        low, high = (2, 19) if self.level == 1 else (10, 50)
        a, b = rng.randint(low, high), rng.randint(low, high)
        if kind == "sub":
            a, b = max(a, b) + 3, min(a, b)
        c = rng.randint(1, a + b) if kind == "add_sub" else 0
        return a, b, c

    def _draw(self, n: int, seed: int, held_out: bool) -> list[dict[str, str]]:
        if not 0 <= n <= 2000:
            raise ValueError(f"n must be between 0 and 2000 for {self!r}, got {n}")
        rng = random.Random(f"chat-arith-{'eval' if held_out else 'train'}-{self.level}-{seed}")
        seen: set[str] = set()
        rows: list[dict[str, str]] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 200 * (n + 10):  # the split holds fewer distinct problems than asked for
                raise ValueError(
                    f"{self!r} found only {len(rows)} distinct {'eval' if held_out else 'train'} problems of {n}: "
                    "ask for fewer (--eval-prompts, --steps x --prompts-per-step)"
                )
            kind, text, answer, _ = rng.choice(self.templates)
            a, b, c = self._operands(rng, kind)
            key = f"{kind}:{a}:{b}:{c}"
            if key in seen or _is_eval_problem(key) != held_out:
                continue
            seen.add(key)
            question = text.format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b, c=c)
            rows.append(
                {"prompt": self.render(question), "answer": str(answer(a, b, c)), "question": question}
            )
        return rows

    def render(self, question: str) -> str:
        """The prompt text: system + user turn in the tokenizer's chat template, with the generation prompt."""
        if self.tokenizer is None:
            return question + "\n"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # --------------------------------------------------------------- reward
    def reward(self, completion: str, answer: str) -> float:
        """1.0 iff the final answer (module docstring) equals `answer`; 0.0 otherwise, never raises."""
        return free_text_reward(completion, answer)

    # ---------------------------------------------------------------- roles
    def token_roles(self, completion_ids: list[int], tokenizer) -> list[int]:
        """Role per completion token (module docstring), from each token's character span."""
        return free_text_roles(completion_ids, tokenizer)
