"""MATH-style task: competition problems whose solutions end in ``\\boxed{answer}``, scored with math-verify.

The ARCA paper (arXiv 2606.00257, Sec. "Setup") trains Qwen3-1.7B-Base on MATH with a binary boxed-answer
reward and evaluates on 200 held-out test problems; its code loads ``DigitalLearningGmbH/MATH-lighteval``
and compares normalised strings. We score with math-verify instead, so ``\\frac{3}{4}`` and ``0.75`` agree.

Sources: a local ``.jsonl`` file (one object per line with ``problem`` and ``solution``, optionally
``answer``, ``level``, ``type``), or a Hugging Face datasets id (default ``EleutherAI/hendrycks_math``, whose
seven subject configs are concatenated). Hub loading is meant for GPU machines; offline, pass a JSONL path.

Splits. A local file is split by a hash of the whitespace-normalised problem text (``eval_fraction`` of the
problems, ~20 %, go to eval), so the split does not depend on file order, seed or machine, and a problem
listed twice lands on one side only. A hub dataset uses its ``split_train``/``split_eval`` splits; train
problems whose text also occurs in eval are dropped. If both split names are equal, the hash split is used.

Sampling. ``train_rows(n, seed)`` / ``eval_rows(n, seed)`` draw ``n`` distinct rows with
``random.Random(seed)``; if ``n`` exceeds the pool, all rows are returned (shuffled) and a warning is issued,
so small local files still run end to end.

Token roles (one per completion token; ids from ``arca_lab.tasks.base``):
- ANSWER: the token's characters overlap the *content* of the last complete ``\\boxed{...}``.
- FORMAT: special tokens (EOS, padding); tokens made only of whitespace, separators/delimiters
  (ASCII ``. , ; : ? ' " ` ( ) [ ] { } $ \\ & ~`` and non-ASCII Unicode punctuation) and boxed markers
  (``\\boxed{`` / ``\\fbox{`` and the matching ``}`` of every boxed expression); a token with no text of
  its own at the very end of the text.
- WORK: everything else (words, digits, LaTeX command names, operators such as ``+ - * / = < > ^ _ !``).
A token's characters come from decoding, token k covering ``decode(ids[:k+1])`` minus ``decode(ids[:k])``
(see ``token_char_spans``): decoding tokens one at a time is wrong for byte-level BPE (a multi-byte
character split over tokens) and SentencePiece (leading spaces dropped). A token that ends inside a
multi-byte character contributes no text of its own and takes the role of the character it begins.
So a token that straddles the boxed content and a marker, like ``{\\`` in ``\\boxed{\\frac``, is ANSWER.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from arca_lab.tasks.base import ANSWER, FORMAT, WORK

DEFAULT_SOURCE = "EleutherAI/hendrycks_math"
HENDRYCKS_MATH_CONFIGS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
# Base-model prompt: the problem, the boxed-answer instruction of the Qwen math prompts (the ARCA code says
# "Solve this math problem step by step. Put your final answer in \boxed{}."), then a completion cue.
DEFAULT_TEMPLATE = (
    "Problem: {problem}\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nSolution:"
)
_PLACEHOLDER = "{problem}"
_SPLIT_SALT = b"arca-lab/math-split/v1:"
_MATH_INSTALL_HINT = "math-verify is needed to score MATH answers: pip install 'arca-lab[math]'"

# Characters that separate or delimit rather than compute. Operators (+ - * / = < > ^ _ | !) are WORK.
_FORMAT_ASCII = frozenset(".,;:?'\"`()[]{}$\\&~")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


# ----------------------------------------------------------------------------------------- boxed answers
@dataclass(frozen=True)
class BoxedSpan:
    """Character offsets of one boxed expression: ``text[start:content_start]`` is the opening marker,
    ``text[content_start:content_end]`` the content, ``text[content_end:end]`` the closing brace (empty for
    the brace-less ``\\boxed 5`` form of some MATH solutions)."""

    start: int
    content_start: int
    content_end: int
    end: int


def _matching_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at `open_idx`; escaped braces (``\\{``, ``\\}``) do not count."""
    depth = 0
    i = open_idx
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character, e.g. the brace in "\{"
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_boxed(text: str) -> list[BoxedSpan]:
    """All complete ``\\boxed{...}`` / ``\\boxed {...}`` / ``\\fbox{...}`` / ``\\boxed 5`` spans, in order of
    their start. Unbalanced ones (e.g. cut off by the token limit) are skipped."""
    spans = []
    for m in _BOXED_RE.finditer(text):
        j = m.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            close = _matching_brace(text, j)
            if close is not None:
                spans.append(BoxedSpan(m.start(), j + 1, close, close + 1))
        elif j > m.end() and j < len(text):
            # "\boxed 5$" (a few Hendrycks MATH solutions): the content runs to the next whitespace or "$".
            k = j
            while k < len(text) and not text[k].isspace() and text[k] != "$":
                k += 1
            spans.append(BoxedSpan(m.start(), j, k, k))
    return spans


def last_boxed_span(text: str) -> BoxedSpan | None:
    """The complete boxed expression that starts last (for nested boxes: the innermost), or None."""
    spans = find_boxed(text)
    return spans[-1] if spans else None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete boxed expression, stripped; None if there is none."""
    span = last_boxed_span(text)
    return None if span is None else text[span.content_start : span.content_end].strip()


# ------------------------------------------------------------------------------------------------ data
def _norm_problem(problem: str) -> str:
    return " ".join(problem.split())


def hash_unit(text: str, salt: bytes) -> float:
    """The first 8 bytes of sha256(salt + whitespace-normalised text) as a uniform number in [0, 1): a split that
    depends on the text only (not on file order, seed or machine). Shared with the gsm8k task."""
    digest = hashlib.sha256(salt + _norm_problem(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _is_eval_problem(problem: str, eval_fraction: float) -> bool:
    """Deterministic hash split (`hash_unit` with this task's salt)."""
    return hash_unit(problem, _SPLIT_SALT) < eval_fraction


def read_jsonl(path: Path, check: Callable[[dict[str, Any]], str | None]) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped); `check(row)` returns what is wrong with a row (the error
    names the file, the line and that text) or None. Shared with the gsm8k task."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            problem = "each line must be a JSON object" if not isinstance(row, dict) else check(row)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows


def _check_math_row(row: dict[str, Any]) -> str | None:
    if not isinstance(row.get("problem"), str):
        return "each line must be an object with a string 'problem'"
    if "answer" not in row and not isinstance(row.get("solution"), str):
        return "a row needs 'solution' (ending in \\boxed{}) or 'answer'"
    return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, _check_math_row)


def _load_hub(source: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading a MATH dataset from the hub needs `datasets`: pip install datasets") from e
    configs: list[str | None]
    configs = [subset] if subset else (list(HENDRYCKS_MATH_CONFIGS) if source == DEFAULT_SOURCE else [None])
    rows: list[dict[str, Any]] = []
    try:
        for config in configs:
            rows.extend(dict(r) for r in datasets.load_dataset(source, config, split=split))
    except Exception as e:
        raise RuntimeError(
            f"could not load {source!r} (config {configs}, split {split!r}) with datasets.load_dataset: {e}. "
            "Without network access, pass a local JSONL path instead, e.g. MathTask('problems.jsonl') "
            "with one {'problem': ..., 'solution': ...} object per line."
        ) from e
    return rows


def _subset_key(name: str) -> str:
    """'Counting & Probability' and 'counting_and_probability' (the hub config name) give the same key."""
    return re.sub(r"[^a-z]+", "_", name.lower().replace("&", " and ")).strip("_")


class MathTask:
    """MATH-style boxed-answer task (see the module docstring for splits, sampling and token roles)."""

    name = "math"

    def __init__(
        self,
        source: str = DEFAULT_SOURCE,
        *,
        split_train: str = "train",
        split_eval: str = "test",
        prompt_template: str = DEFAULT_TEMPLATE,
        subset: str | None = None,
        eval_fraction: float = 0.2,
        timeout_seconds: int = 5,
    ) -> None:
        if _PLACEHOLDER not in prompt_template:
            raise ValueError(f"prompt_template must contain {_PLACEHOLDER!r}; got {prompt_template!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
        self.source = source
        self.split_train, self.split_eval = split_train, split_eval
        self.prompt_template = prompt_template
        self.subset = subset
        self.eval_fraction = eval_fraction
        self.timeout_seconds = timeout_seconds
        self._pools: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None
        self.is_local = source.endswith(".jsonl") or Path(source).is_file()
        if self.is_local:
            if not Path(source).is_file():
                raise ValueError(f"MATH source {source!r} looks like a local JSONL file but does not exist")
            self._pools = self._build_pools()  # local files are cheap: fail on bad rows now, not mid-run

    # -- rows
    def _to_row(self, raw: dict[str, Any]) -> dict[str, str] | None:
        answer = raw.get("answer")
        answer = str(answer).strip() if answer is not None else extract_boxed(raw.get("solution") or "")
        if not answer:
            return None
        row = {"prompt": self.prompt_template.replace(_PLACEHOLDER, raw["problem"]), "answer": answer}
        row["problem"] = raw["problem"]
        for key in ("level", "type"):
            if raw.get(key) is not None:
                row[key] = str(raw[key])
        return row

    def _build_pools(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        if self.is_local:
            raw_train = raw_eval = _read_jsonl(Path(self.source))
        else:
            raw_train = _load_hub(self.source, self.subset, self.split_train)
            if self.split_eval == self.split_train:
                raw_eval = raw_train
            else:
                raw_eval = _load_hub(self.source, self.subset, self.split_eval)
        if self.subset is not None and self.is_local:
            key = _subset_key(self.subset)
            kept = [r for r in raw_train if _subset_key(str(r.get("type", ""))) == key]
            if not kept:
                types = sorted({str(r.get("type")) for r in raw_train})
                raise ValueError(
                    f"subset {self.subset!r} matches no row 'type' in {self.source}; types: {types}"
                )
            raw_train = raw_eval = kept
        if raw_train is raw_eval:  # one pool: hash split
            raw_eval = [r for r in raw_train if _is_eval_problem(r["problem"], self.eval_fraction)]
            raw_train = [r for r in raw_train if not _is_eval_problem(r["problem"], self.eval_fraction)]
        else:  # separate hub splits: still never train on a problem that is also in eval
            eval_problems = {_norm_problem(r["problem"]) for r in raw_eval}
            raw_train = [r for r in raw_train if _norm_problem(r["problem"]) not in eval_problems]
        train = [row for r in raw_train if (row := self._to_row(r)) is not None]
        evals = [row for r in raw_eval if (row := self._to_row(r)) is not None]
        dropped = len(raw_train) + len(raw_eval) - len(train) - len(evals)
        if dropped:
            warnings.warn(f"{self.source}: {dropped} rows without a boxed answer were dropped", stacklevel=3)
        if not train or not evals:
            raise ValueError(
                f"{self.source}: the split left {len(train)} train and {len(evals)} eval rows; "
                "add problems or change eval_fraction"
            )
        return train, evals

    @property
    def pools(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(train rows, eval rows), loaded on first use."""
        if self._pools is None:
            self._pools = self._build_pools()
        return self._pools

    @staticmethod
    def _sample(pool: list[dict[str, str]], n: int, seed: int, what: str) -> list[dict[str, str]]:
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        if n > len(pool):
            warnings.warn(f"asked for {n} {what} rows, only {len(pool)} exist: returning all", stacklevel=3)
            n = len(pool)
        return [dict(pool[i]) for i in random.Random(seed).sample(range(len(pool)), n)]

    def train_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct training rows, deterministic for `seed` (all rows, shuffled, if `n` is larger)."""
        return self._sample(self.pools[0], n, seed, "train")

    def eval_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """`n` distinct held-out rows, deterministic for `seed` (all rows, shuffled, if `n` is larger)."""
        return self._sample(self.pools[1], n, seed, "eval")

    # -- reward
    def reward(self, completion: str, answer: str) -> float:
        """1.0 iff math-verify finds the last boxed answer of `completion` equivalent to `answer`.

        math-verify guards parsing and comparison with a SIGALRM timeout (`timeout_seconds`), which only
        works in the main thread; elsewhere the guard is off. Never raises on model output.
        """
        parse, verify, timeout_exc = _math_verify()
        if not answer or not str(answer).strip():
            raise ValueError("reward needs a non-empty reference answer")
        pred = extract_boxed(completion) if isinstance(completion, str) else None
        if not pred:
            return 0.0
        timeout = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        try:
            gold = _parse_gold(str(answer), timeout)
            target = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
            if not gold or not target:
                return 0.0
            return 1.0 if verify(list(gold), target, timeout_seconds=timeout) else 0.0
        except (Exception, timeout_exc):
            return 0.0

    # -- roles
    def token_roles(self, completion_ids: list[int], tokenizer) -> list[int]:
        """Role id per token of one unpadded completion (rule in the module docstring)."""
        return token_roles(completion_ids, tokenizer)


# ------------------------------------------------------------------------------------------ math-verify
def _math_verify():
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError as e:
        raise ImportError(_MATH_INSTALL_HINT) from e
    return parse, verify, TimeoutException


@lru_cache(maxsize=8192)
def _parse_gold(answer: str, timeout: int | None) -> tuple:
    """Parsed reference answer; cached because every completion of a prompt is checked against it."""
    parse, _, _ = _math_verify()
    content = extract_boxed(answer) or answer
    return tuple(parse(f"\\boxed{{{content}}}", parsing_timeout=timeout))


# ---------------------------------------------------------------------------------------- token roles
def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_char_spans(ids: list[int], tokenizer, window: int | None = 8) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's [start, end) character span in it.

    Exact rule (``window=None``, O(T²) decoding): end_k = max(end_{k-1}, longest common prefix of
    ``decode(ids[:k+1])`` and ``decode(ids)``); an incomplete UTF-8 character at the end of a prefix decodes
    to U+FFFD, which is not a prefix of the full text, so its bytes count only once the character completes.
    Fast rule (default, O(T · window)): token k's text is ``decode(ids[s:k+1])`` minus ``decode(ids[s:k])``,
    s = max(0, k - window), both with trailing U+FFFD held back; decoding from the same start s twice keeps
    SentencePiece's leading-space handling consistent. If the fast pieces do not concatenate to
    ``decode(ids)`` (e.g. a window made only of partial characters), the exact rule is used.
    """
    text = _decode(tokenizer, ids)
    pieces: list[str] = []
    for k in range(len(ids) if window is not None else 0):
        s = max(0, k - window)
        before = _decode(tokenizer, ids[s:k]).rstrip("\ufffd") if k > s else ""
        after = _decode(tokenizer, ids[s : k + 1]).rstrip("\ufffd")
        if not after.startswith(before):
            break
        pieces.append(after[len(before) :])
    ends, pos = [], 0
    if window is not None and len(pieces) == len(ids) and "".join(pieces) == text:
        for piece in pieces:
            pos += len(piece)
            ends.append(pos)
    else:
        for k in range(len(ids)):
            prefix = _decode(tokenizer, ids[: k + 1])
            lcp = len(prefix) if text.startswith(prefix) else _common_prefix_len(prefix, text)
            pos = max(pos, lcp)
            ends.append(pos)
    starts = [0, *ends[:-1]]
    return text, list(zip(starts, ends, strict=True))


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _is_format_char(c: str) -> bool:
    return c.isspace() or c in _FORMAT_ASCII or (ord(c) > 127 and unicodedata.category(c).startswith("P"))


def token_roles(completion_ids: list[int], tokenizer) -> list[int]:
    """FORMAT / WORK / ANSWER per token of one unpadded completion (rule in the module docstring)."""
    ids = [int(i) for i in completion_ids]
    special = set(tokenizer.all_special_ids)
    kept = [i for i in ids if i not in special]  # what TRL decodes (skip_special_tokens=True) and rewards
    text, spans = token_char_spans(kept, tokenizer)
    boxes = find_boxed(text)
    marker = [False] * len(text)  # "\boxed{" and the closing "}" of every boxed expression
    for b in boxes:
        for p in [*range(b.start, b.content_start), *range(b.content_end, b.end)]:
            marker[p] = True
    answer = (boxes[-1].content_start, boxes[-1].content_end) if boxes else (0, 0)
    roles, j = [], 0
    for tok in ids:
        if tok in special:
            roles.append(FORMAT)
            continue
        a, b = spans[j]
        j += 1
        if a == b:  # no text of its own: part of the next character (or nothing, at the very end)
            b = min(a + 1, len(text))
        if a < answer[1] and b > answer[0]:
            roles.append(ANSWER)
        elif all(marker[p] or _is_format_char(text[p]) for p in range(a, b)):
            roles.append(FORMAT)
        else:
            roles.append(WORK)
    return roles
