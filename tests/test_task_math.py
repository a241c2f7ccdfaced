"""MATH task: boxed extraction, math-verify reward, JSONL loading and split, token roles."""

from __future__ import annotations

import json
import sys
import threading
import types
from pathlib import Path

import pytest

from arca_lab.tasks.base import ANSWER, FORMAT, WORK, Task
from arca_lab.tasks.math import (
    DEFAULT_SOURCE,
    HENDRYCKS_MATH_CONFIGS,
    BoxedSpan,
    MathTask,
    extract_boxed,
    find_boxed,
    token_char_spans,
    token_roles,
)
from arca_lab.testing import make_tiny_tokenizer

DATA = Path(__file__).parent / "data" / "math_tiny.jsonl"


@pytest.fixture(scope="module")
def task() -> MathTask:
    return MathTask(str(DATA))


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request, tmp_path_factory):
    """A stand-in tokenizer as the lab sees it: saved, then loaded back with AutoTokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp(f"tok_{request.param}")
    make_tiny_tokenizer(request.param).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


# ------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $x = \\boxed{5}$.", "5"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),  # nested braces
        ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),  # two levels of nesting
        ("$\\boxed {x}$", "x"),  # space before the brace
        ("the answer is $\\fbox{12}$", "12"),
        ("first \\boxed{1}, then \\boxed{2}.", "2"),  # the last one counts
        ("$\\boxed{\\{2, 3\\}}$", "\\{2, 3\\}"),  # escaped braces do not close the box
        ("\\boxed{3} and then \\boxed{\\frac{1", "3"),  # a truncated last box is skipped
        ("$\\boxed 5$", "5"),  # Hendrycks' brace-less form
        ("$\\boxed{ 7 }$", "7"),
        ("\\boxedx{3}", None),  # a different command
        ("no answer here", None),
        ("\\boxed{", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_find_boxed_offsets():
    # "x=\boxed{12}.": "\" at 2, "\boxed{" is 7 chars -> content at 9..11, "}" at 11, end 12.
    assert find_boxed("x=\\boxed{12}.") == [BoxedSpan(start=2, content_start=9, content_end=11, end=12)]


# ----------------------------------------------------------------------------------------------- reward
@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("We get $\\boxed{0.75}$.", "\\frac{3}{4}", 1.0),
        ("So it is $\\boxed{5\\sqrt{2}}$.", "\\sqrt{50}", 1.0),
        ("$\\boxed{3}$", "-3", 0.0),
        ("The answer is 3.", "3", 0.0),  # unboxed answers do not count
        ("$\\boxed{(3,\\infty)}$", "(3, \\infty)", 1.0),
        ("$\\boxed{3, -3}$", "-3, 3", 1.0),  # a set of solutions in another order
        ("$\\fbox{12}$", "12", 1.0),
        ("$\\boxed{3}$ no wait $\\boxed{4}$", "4", 1.0),
        ("$\\boxed{3}$ no wait $\\boxed{4}$", "3", 0.0),
        ("$\\boxed{\\dfrac{1}{2}}$", "\\boxed{0.5}", 1.0),  # a boxed reference is unwrapped
    ],
)
def test_reward_equivalent_forms(task, completion, answer, expected):
    assert task.reward(completion, answer) == expected


@pytest.mark.parametrize(
    "garbage",
    [
        "\\boxed{}",
        "\\boxed{}}}{{\\frac{",
        "\\boxed{\\frac{}{}}",
        "\\boxed{" + "(" * 300 + "}",
        "\\boxed{\x00\x01\ufffd}",
        "\\boxed{!!@#$%^&*}",
        "".join(chr(33 + (i * 7919) % 90) for i in range(2000)),
    ],
)
def test_reward_never_raises_on_garbage(task, garbage):
    assert task.reward(garbage, "3") == 0.0


def test_reward_non_string_and_empty_reference(task):
    assert task.reward([{"role": "assistant", "content": "\\boxed{3}"}], "3") == 0.0
    with pytest.raises(ValueError, match="reference answer"):
        task.reward("\\boxed{3}", "  ")


def test_reward_in_worker_thread(task):
    # math-verify's SIGALRM timeout only works in the main thread; elsewhere the guard must be switched off.
    out = []
    worker = threading.Thread(target=lambda: out.append(task.reward("$\\boxed{0.75}$", "\\frac{3}{4}")))
    worker.start()
    worker.join()
    assert out == [1.0]


def test_reward_names_the_fix_when_math_verify_is_missing(task, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'arca-lab\[math\]'"):
        task.reward("\\boxed{3}", "3")


# -------------------------------------------------------------------------------------- rows and split
def test_rows_from_jsonl(task):
    raw = [json.loads(line) for line in DATA.read_text().splitlines()]
    train, evals = task.pools
    assert isinstance(task, Task)
    assert len(train) + len(evals) == len(raw) == 24
    assert {r["problem"] for r in train}.isdisjoint({r["problem"] for r in evals})
    by_problem = {r["problem"]: r for r in train + evals}
    # the `answer` field wins; otherwise the last boxed content of the solution (incl. \fbox and "\boxed {")
    assert by_problem["Simplify $\\frac{6}{8}$."]["answer"] == "\\frac{3}{4}"
    assert by_problem["What is $15\\%$ of 80?"]["answer"] == "12"
    assert by_problem["If $f(x) = x^2 + 1$, what is $f(f(1))$?"]["answer"] == "5"
    assert (
        by_problem["Let $A = \\{1, 2, 3\\}$ and $B = \\{2, 3, 4\\}$. Find $A \\cap B$."]["answer"]
        == "\\{2, 3\\}"
    )
    row = by_problem["Evaluate $\\log_2 64$."]
    assert row["prompt"] == (
        "Problem: Evaluate $\\log_2 64$.\n"
        "Please reason step by step, and put your final answer within \\boxed{}.\n\nSolution:"
    )
    assert (row["level"], row["type"]) == ("Level 1", "Algebra")


def test_every_reference_solution_earns_reward(task):
    # The reference solutions are correct, so each must score 1 against its own extracted answer.
    raw = {
        json.loads(line)["problem"]: json.loads(line)["solution"] for line in DATA.read_text().splitlines()
    }
    train, evals = task.pools
    assert [task.reward(raw[r["problem"]], r["answer"]) for r in train + evals] == [1.0] * 24


def test_split_depends_on_problem_text_only(tmp_path, task):
    lines = DATA.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join([*reversed(lines), lines[0], ""]))  # reordered, one duplicate, blank line
    other = MathTask(str(shuffled))
    assert {r["problem"] for r in other.pools[1]} == {r["problem"] for r in task.pools[1]}
    dup = json.loads(lines[0])["problem"]
    sides = [sum(r["problem"] == dup for r in pool) for pool in other.pools]
    assert sorted(sides) == [0, 2]  # both copies on the same side


def test_split_fraction_on_many_problems(tmp_path):
    # 2000 distinct problems, eval_fraction 0.2: Binomial(2000, 0.2) has mean 400, sd 17.9; allow 4 sd.
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(2000)
        )
    )
    train, evals = MathTask(str(path)).pools
    assert 400 - 72 <= len(evals) <= 400 + 72
    assert len(train) + len(evals) == 2000


def test_sampling_is_deterministic_and_warns_when_short(task):
    a, b = task.train_rows(5, seed=1), task.train_rows(5, seed=1)
    assert a == b and len({r["problem"] for r in a}) == 5
    assert [r["problem"] for r in task.train_rows(5, seed=2)] != [r["problem"] for r in a]
    n_eval = len(task.pools[1])
    with pytest.warns(UserWarning, match="only"):
        rows = task.eval_rows(n_eval + 10, seed=0)
    assert sorted(r["problem"] for r in rows) == sorted(r["problem"] for r in task.pools[1])
    assert task.eval_rows(0, seed=0) == []
    with pytest.raises(ValueError, match="n must be"):
        task.train_rows(-1, seed=0)


def test_local_subset_filters_by_type(tmp_path):
    path = tmp_path / "typed.jsonl"
    kinds = ["Number Theory", "Counting & Probability"]
    path.write_text(
        "".join(
            json.dumps({"problem": f"Problem {i}?", "answer": str(i), "type": kinds[i % 2]}) + "\n"
            for i in range(60)
        )
    )
    t = MathTask(str(path), subset="counting_and_probability")
    assert {r["type"] for pool in t.pools for r in pool} == {"Counting & Probability"}
    assert sum(len(pool) for pool in t.pools) == 30
    with pytest.raises(ValueError, match="types"):
        MathTask(str(path), subset="geometry")


def test_bad_inputs_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MathTask(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"\{problem\}"):
        MathTask(str(DATA), prompt_template="no placeholder")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        MathTask(str(bad))


def _fake_datasets(monkeypatch, load_dataset):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_source_without_network_says_to_pass_a_jsonl(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, offline)
    t = MathTask(DEFAULT_SOURCE)  # the hub is only touched when rows are needed
    with pytest.raises(RuntimeError, match="local JSONL path"):
        t.train_rows(1, seed=0)


def test_hub_source_loads_all_configs_and_drops_train_problems_seen_in_eval(monkeypatch):
    calls = []

    def load_dataset(source, config, split):
        calls.append((source, config, split))
        shared = {"problem": "Shared problem?", "solution": "$\\boxed{1}$"}
        own = {"problem": f"{config} {split} problem?", "solution": "$\\boxed{2}$"}
        return [shared, own]

    _fake_datasets(monkeypatch, load_dataset)
    train, evals = MathTask(DEFAULT_SOURCE).pools
    assert calls == [(DEFAULT_SOURCE, c, s) for s in ("train", "test") for c in HENDRYCKS_MATH_CONFIGS]
    assert "Shared problem?" not in {r["problem"] for r in train}
    assert len(train) == 7 and len(evals) == 14


# ---------------------------------------------------------------------------------------------- roles
def _roles_with_offsets(tok, text: str):
    """ids, roles and the encoder's own character offsets (an independent source of token spans)."""
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    roles = token_roles([*ids, tok.eos_token_id], tok)
    return ids, roles, enc["offset_mapping"]


def test_roles_of_a_completion(tokenizer):
    text = (
        "We add the fractions: $\\frac{1}{2} + \\frac{1}{4} = \\frac{3}{4}$.\n"
        "The answer is $\\boxed{\\frac{3}{4}}$."
    )
    ids, roles, offsets = _roles_with_offsets(tokenizer, text)
    assert len(roles) == len(ids) + 1  # one label per token, EOS included
    assert roles[-1] == FORMAT  # EOS
    content = (text.rindex("\\boxed{") + len("\\boxed{"), len(text) - len("}$."))  # "\frac{3}{4}"
    assert text[content[0] : content[1]] == "\\frac{3}{4}"
    for (a, b), role in zip(offsets, roles, strict=False):
        piece = text[a:b]
        overlaps_content = a < content[1] and b > content[0]
        assert (role == ANSWER) == overlaps_content, (piece, role)
        if piece.strip() == "" or piece.strip() in {":", ".", "$", "}$."}:
            assert role == FORMAT, piece
        if piece.strip() in {"We", "add", "answer", "fractions"}:
            assert role == WORK, piece
    # ANSWER tokens are contiguous and cover the content; a token straddling "{" or "}" of the box counts
    where = [k for k, r in enumerate(roles) if r == ANSWER]
    assert where == list(range(where[0], where[-1] + 1))
    answer_text = "".join(text[a:b] for a, b in offsets[where[0] : where[-1] + 1])
    assert "\\frac{3}{4}" in answer_text and answer_text in text[text.rindex("\\boxed") :]
    # the same fraction in the working is WORK/FORMAT, never ANSWER: only the last boxed content is
    assert sum(r == ANSWER for r in roles) < sum(r != FORMAT for r in roles)


def test_roles_multibyte_and_no_box(tokenizer):
    text = "The area is $\\boxed{9π}$"
    _, roles, offsets = _roles_with_offsets(tokenizer, text)
    pi = text.index("π")
    pi_roles = [r for (a, b), r in zip(offsets, roles, strict=False) if a <= pi < b]
    assert pi_roles and all(r == ANSWER for r in pi_roles)  # both byte-pieces of π, if it is split
    for completion in ("The answer is 3.", "so $\\boxed{3"):  # no box / a truncated box: no ANSWER tokens
        ids = tokenizer(completion)["input_ids"]
        assert ANSWER not in token_roles(ids, tokenizer)


def test_fast_char_spans_match_exact(tokenizer):
    # Multi-byte characters split over byte-level tokens, and characters outside the metaspace alphabet.
    text = "Let $x = 9π$ and y ≤ 3. 测试 🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂 so \\boxed{5}.\n" * 3
    ids = tokenizer(text)["input_ids"]
    decoded, fast = token_char_spans(ids, tokenizer)
    decoded_exact, exact = token_char_spans(ids, tokenizer, window=None)
    assert decoded == decoded_exact and fast == exact
    assert fast[0][0] == 0 and fast[-1][1] == len(decoded)
    assert all(fast[k][1] == fast[k + 1][0] for k in range(len(fast) - 1))  # spans tile the text
