"""ArithTask: gold format, rows, train/eval disjointness, reward, token roles, registry."""

from __future__ import annotations

import random

import pytest

from arca_lab.embedded import build_tokenizer
from arca_lab.tasks import TASK_NAMES, get_task
from arca_lab.tasks.arith import ALPHABET, ArithTask, _is_eval_problem
from arca_lab.tasks.base import ANSWER, FORMAT, WORK, Task

F, W, A = FORMAT, WORK, ANSWER


@pytest.fixture(scope="module")
def task() -> ArithTask:
    return ArithTask()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_gold_completion_is_the_left_to_right_trace(task):
    # 47 + 85 = 132, then 132 + 19 = 151.
    assert task.sft_text({"prompt": "47+85+19="}) == "47+85=132,132+19=151>151"
    # 10 + 10 = 20, 20 + 10 = 30.
    assert task.sft_text({"prompt": "10+10+10="}) == "10+10=20,20+10=30>30"
    # Two terms: one step.
    assert ArithTask(n_terms=2).sft_text({"prompt": "99+99="}) == "99+99=198>198"
    with pytest.raises(ValueError, match="47\\+85\\+19="):
        task.sft_text({"prompt": "47+85+19"})


def test_rows_are_deterministic_distinct_and_correct(task):
    rows = task.train_rows(300, seed=3)
    assert rows == task.train_rows(300, seed=3)
    assert rows != task.train_rows(300, seed=4)
    assert task.eval_rows(50, seed=3) == task.eval_rows(50, seed=3)
    assert len({r["prompt"] for r in rows}) == 300
    for row in rows:
        terms = row["prompt"].rstrip("=").split("+")
        assert len(terms) == 3 and all(len(t) == 2 and t[0] != "0" for t in terms)
        assert row["answer"] == str(int(terms[0]) + int(terms[1]) + int(terms[2]))
        assert set(row["prompt"]) <= set(ALPHABET)


def test_eval_rows_never_appear_in_training(task):
    train = {r["prompt"] for seed in (0, 1, 2) for r in task.train_rows(20_000, seed)}
    held_out = {r["prompt"] for seed in (0, 1) for r in task.eval_rows(2_000, seed)}
    assert len(held_out) > 2_000  # two seeds draw different held-out problems
    assert not train & held_out
    # The split is a property of the problem, not of the draw: every problem is on exactly one side.
    assert all(_is_eval_problem(tuple(map(int, p[:-1].split("+")))) for p in held_out)
    assert not any(_is_eval_problem(tuple(map(int, p[:-1].split("+")))) for p in train)


def test_about_one_problem_in_eight_is_held_out():
    problems = [(a, b, c) for a in range(10, 100) for b in range(10, 100) for c in range(10, 20)]  # 81 000
    share = sum(map(_is_eval_problem, problems)) / len(problems)
    # Binomial sd of the share is sqrt(1/8 * 7/8 / 81000) ~ 0.0012: a 0.005 band is > 4 sd.
    assert abs(share - 1 / 8) < 0.005


def test_rows_reject_impossible_requests(task):
    with pytest.raises(ValueError, match="n must be between 0 and"):
        ArithTask(n_terms=2, digits=1).eval_rows(100, seed=0)  # only 81 problems exist
    with pytest.raises(ValueError, match="n_terms must be 2, 3 or 4"):
        ArithTask(n_terms=7)
    with pytest.raises(ValueError, match="digits must be 1, 2 or 3"):
        ArithTask(digits=0)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("47+85=132,132+19=151>151", 1.0),
        ("47+85=132,132+19=151>151<eos><pad>", 1.0),  # decoded with special tokens kept
        ("47+85=999,1+1=2>151", 1.0),  # the reward checks the answer only, not the trace
        (">0151", 1.0),  # leading zeros parse to the same number
        ("47+85=132,132+19=151>150", 0.0),
        ("47+85=132,132+19=151>1510", 0.0),
        ("47+85=132,132+19=151", 0.0),  # no answer marker
        ("47+85=132>132,132+19=151>151", 0.0),  # the answer is what follows the first marker
        ("47+85=132,132+19=151>151,7", 0.0),  # trailing text after the answer
        ("47+85=132,132+19=151>", 0.0),
        ("", 0.0),
        (">", 0.0),
        ("<eos>", 0.0),
        ("garbage >151x", 0.0),
        (">" + "9" * 5000, 0.0),  # int() of this would raise in Python >= 3.11
    ],
)
def test_reward(task, completion, expected):
    assert task.reward(completion, "151") == expected


def test_reward_never_raises_on_garbage(task):
    rng = random.Random(0)
    chars = ALPHABET + " <>eos\n-x"
    for _ in range(2_000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))
        assert task.reward(text, "151") in (0.0, 1.0)
    assert task.reward(None, "151") == 0.0  # type: ignore[arg-type]
    assert task.reward(["151"], "151") == 0.0  # type: ignore[arg-type]


def test_token_roles_of_a_gold_completion(task, tokenizer):
    text = "47+85=132,132+19=151>151"
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    roles = task.token_roles(ids, tokenizer)
    # Written out by hand: operands and partial sums are WORK, + = , > and EOS are FORMAT, after > is ANSWER.
    expected = [W, W, F, W, W, F, W, W, W, F, W, W, W, F, W, W, F, W, W, W, F, A, A, A, F]
    assert len(roles) == len(ids) == 25
    assert roles == expected
    assert set(roles) == {F, W, A}


def test_token_roles_on_model_garbage(task, tokenizer):
    # Unknown characters, pads, a second marker: one label per token, no errors.
    ids = [tokenizer.unk_token_id, *tokenizer("1>2>3")["input_ids"], tokenizer.pad_token_id]
    assert task.token_roles(ids, tokenizer) == [F, W, F, A, F, A, F]
    assert task.token_roles([], tokenizer) == []


class _MultiCharTokenizer:
    """Stand-in for a subword tokenizer whose tokens span several characters."""

    vocab = ("<eos>", "47", "+85", "=132", ">1", "51", "=")
    all_special_ids = (0,)

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]


def test_token_roles_with_multi_character_tokens(task):
    # "47" WORK, "+85" WORK (holds digits), "=" FORMAT, ">1" ANSWER (digit after the marker), "51" ANSWER.
    roles = task.token_roles([1, 2, 6, 3, 4, 5, 0], _MultiCharTokenizer())
    assert roles == [W, W, F, W, A, A, F]


def test_gold_completion_lengths_are_12_to_32_tokens(task, tokenizer):
    # Shortest gold completion: "10+10=20,20+10=30>30" is 20 chars, plus EOS = 21 tokens.
    # Longest: "99+99=198,198+99=297>297" is 24 chars, plus EOS = 25 tokens.
    for prompt, n_tokens in (("10+10+10=", 21), ("99+99+99=", 25)):
        assert len(tokenizer(task.sft_text({"prompt": prompt}))["input_ids"]) + 1 == n_tokens
    rows = task.train_rows(500, seed=0) + task.eval_rows(500, seed=0)
    lengths = {len(tokenizer(task.sft_text(r))["input_ids"]) + 1 for r in rows}
    assert min(lengths) >= 21 and max(lengths) <= 25


def test_registry():
    assert isinstance(get_task("arith"), ArithTask)
    assert isinstance(get_task("arith"), Task)
    assert get_task("arith", n_terms=2).n_terms == 2
    with pytest.raises(ValueError, match="arith, math, chat_arith, gsm8k"):
        get_task("aime")
    assert TASK_NAMES == ("arith", "math", "chat_arith", "gsm8k")
