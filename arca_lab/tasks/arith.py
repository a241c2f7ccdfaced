"""Multi-step addition with a worked trace: the default verifiable task of the embedded model.

A problem adds ``n_terms`` numbers of ``digits`` digits each. The prompt is the sum, the gold completion folds it
left to right, one partial sum per step, then writes the answer after the marker ``>``::

    prompt      47+85+19=
    completion  47+85=132,132+19=151>151<eos>

With the defaults (3 terms of 2 digits) a gold completion is 20-24 characters plus the end-of-sequence token.
Steps are separated by ``,``; every step restates its two operands so the model never needs to look back more
than one step.

Train/eval split: a problem (its operand tuple) is held out iff a keyed BLAKE2b hash of its operands falls in
the first ``1 / EVAL_MODULUS`` of the hash range, so no eval problem can appear in any training draw, for any
seed.
"""

from __future__ import annotations

import hashlib
import random
import re

from arca_lab.tasks.base import ANSWER, FORMAT, WORK

ANSWER_MARKER = ">"
"""Separates the worked trace from the final answer."""
STEP_SEPARATOR = ","
ALPHABET = "0123456789+=,>"
"""Every character a prompt or gold completion can contain (the embedded tokenizer's vocabulary)."""
EVAL_MODULUS = 8
"""One problem in `EVAL_MODULUS` (by operand hash) is held out for evaluation."""

_DIGITS_RE = re.compile(r"[0-9]+")


def _is_eval_problem(operands: tuple[int, ...]) -> bool:
    """True iff `operands` belong to the held-out split (hash of the operands, independent of any seed)."""
    key = "+".join(map(str, operands)).encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"arca-arith").digest()
    return int.from_bytes(digest, "big") % EVAL_MODULUS == 0


class ArithTask:
    """Left-to-right addition of `n_terms` numbers with `digits` digits each (see the module docstring).

    Args:
        n_terms: how many numbers are added (2-4); the trace has ``n_terms - 1`` steps.
        digits: digits per operand (1-3); operands are drawn uniformly from ``[10**(digits-1), 10**digits - 1]``.
    """

    name = "arith"

    def __init__(self, n_terms: int = 3, digits: int = 2) -> None:
        if not 2 <= n_terms <= 4:
            raise ValueError(f"n_terms must be 2, 3 or 4, got {n_terms!r}")
        if not 1 <= digits <= 3:
            raise ValueError(f"digits must be 1, 2 or 3, got {digits!r}")
        self.n_terms = n_terms
        self.digits = digits
        self._low = 10 ** (digits - 1)
        self._high = 10**digits - 1

    def __repr__(self) -> str:
        return f"ArithTask(n_terms={self.n_terms}, digits={self.digits})"

    # ----------------------------------------------------------------- rows
    def train_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct training problems (none of them in the eval split), deterministic for `seed`."""
        return self._draw(n, seed, held_out=False)

    def eval_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct held-out problems, disjoint from every `train_rows` draw, deterministic for `seed`."""
        return self._draw(n, seed, held_out=True)

    def _draw(self, n: int, seed: int, held_out: bool) -> list[dict[str, str]]:
        space = (self._high - self._low + 1) ** self.n_terms
        # Each split holds about 1/EVAL_MODULUS resp. the rest of the space; ask for at most half of that so
        # rejection sampling of distinct problems stays fast.
        limit = space // (2 * EVAL_MODULUS) if held_out else space // 2
        if not 0 <= n <= limit:
            raise ValueError(
                f"n must be between 0 and {limit} for {self!r} ({'eval' if held_out else 'train'})"
            )
        # A str seed goes through SHA-512 in `random.seed`, so the stream is fixed across Python versions.
        rng = random.Random(f"arith-{'eval' if held_out else 'train'}-{self.n_terms}-{self.digits}-{seed}")
        seen: set[tuple[int, ...]] = set()
        rows: list[dict[str, str]] = []
        while len(rows) < n:
            operands = tuple(rng.randint(self._low, self._high) for _ in range(self.n_terms))
            if operands in seen or _is_eval_problem(operands) != held_out:
                continue
            seen.add(operands)
            rows.append({"prompt": "+".join(map(str, operands)) + "=", "answer": str(sum(operands))})
        return rows

    # ------------------------------------------------------------ gold text
    @staticmethod
    def operands(prompt: str) -> list[int]:
        """The operands of a prompt such as ``"47+85+19="``; ValueError if it is not one."""
        if not re.fullmatch(r"[0-9]+(\+[0-9]+)+=", prompt):
            raise ValueError(f"expected a prompt like '47+85+19=', got {prompt!r}")
        return [int(x) for x in prompt[:-1].split("+")]

    def sft_text(self, row: dict[str, str]) -> str:
        """The gold completion of `row` without the end-of-sequence token (the SFT build appends it).

        ``{"prompt": "47+85+19="}`` gives ``"47+85=132,132+19=151>151"``.
        """
        terms = self.operands(row["prompt"])
        steps = []
        total = terms[0]
        for term in terms[1:]:
            steps.append(f"{total}+{term}={total + term}")
            total += term
        return STEP_SEPARATOR.join(steps) + ANSWER_MARKER + str(total)

    # --------------------------------------------------------------- reward
    def reward(self, completion: str, answer: str) -> float:
        """1.0 iff the text after the first ``>`` is exactly a number equal to `answer`, else 0.0.

        Text from a literal ``<eos>`` on is ignored (completions decoded with special tokens kept); leading
        zeros are tolerated; anything else after the number (another step, a second marker) scores 0.0.
        Never raises on model output: non-str completions score 0.0.
        """
        if not isinstance(completion, str) or not isinstance(answer, str):
            return 0.0
        completion = completion.split("<eos>", 1)[0]
        _, marker, final = completion.partition(ANSWER_MARKER)
        final = final.strip()
        if not marker or not _DIGITS_RE.fullmatch(final):
            return 0.0
        # Compare digit strings, not ints: int() of a very long digit string raises in Python >= 3.11.
        return float((final.lstrip("0") or "0") == (answer.strip().lstrip("0") or "0"))

    # ---------------------------------------------------------------- roles
    def token_roles(self, completion_ids: list[int], tokenizer) -> list[int]:
        """Role per completion token, read from the token strings left to right.

        Rule: special tokens (EOS, pad, ...) are FORMAT. Otherwise a token holding a digit that comes after the
        first ``>`` of the completion is ANSWER; else a token holding any digit is WORK (operands and partial
        sums of the trace); else it is FORMAT (``+ = , >`` and anything unknown). Token strings are scanned
        character by character, so the rule also holds for tokenizers whose tokens span several characters
        (a token holding ``>`` and digits counts as ANSWER).
        """
        ids = [int(i) for i in completion_ids]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        special = set(tokenizer.all_special_ids)
        roles: list[int] = []
        after_marker = False
        for token_id, token in zip(ids, tokens, strict=True):
            role = FORMAT
            if token_id not in special and token is not None:
                for ch in token:
                    if ch == ANSWER_MARKER:
                        after_marker = True
                    elif ch.isdigit():
                        role = ANSWER if after_marker else max(role, WORK)
            roles.append(role)
        return roles
