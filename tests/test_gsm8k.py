"""The gsm8k task (`arca_lab.tasks.gsm8k`) on a small GSM8K-format JSONL written here, and the `merl` preset that
follows MERL's published sweep: references after ####, a question-hash split, the free-text reward, MERL's prompt
in the chat template, and a training run on a tiny local chat model in the hub format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf_tiny import write_tiny_gguf
from transformers import AutoTokenizer

from arca_lab.config import make_config
from arca_lab.pretrained import convert_gguf
from arca_lab.results import load_run
from arca_lab.run import grpo_args, load_task, train
from arca_lab.sweep.grid import make_grid
from arca_lab.tasks import get_task
from arca_lab.tasks.gsm8k import ONE_SHOT, GSM8KTask, reference_answer


def write_gsm8k(path: Path, n: int = 40) -> Path:
    """n GSM8K-format rows: question i has answer 3 i + 1, the worked solution ending in '#### <answer>'."""
    with path.open("w") as f:
        for i in range(n):
            q = f"Tom has {i} boxes with 3 pens each and 1 loose pen. How many pens does Tom have?"
            a = f"Tom has {i}*3 = <<{i}*3={3 * i}>>{3 * i} pens in boxes.\n{3 * i}+1 = {3 * i + 1}\n#### {3 * i + 1}"
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny Llama with a ChatML template, saved in the hub format (converted from a GGUF written here)."""
    d = tmp_path_factory.mktemp("tinychat")
    return convert_gguf(write_tiny_gguf(d / "tiny.Q4_1.gguf"), d / "hub", {})


def test_reference_is_the_number_after_the_last_hashes():
    assert reference_answer("5 + 3 = 8\n#### 8") == "8"
    assert reference_answer("... #### 1,037") == "1037"  # thousands separator, as in GSM8K
    assert reference_answer("#### 2.50") == "2.5" and reference_answer("#### -4") == "-4"
    assert reference_answer("no marker 8") is None and reference_answer("#### eight") is None


def test_split_is_disjoint_deterministic_and_sampling_refuses_too_many(tmp_path):
    path = write_gsm8k(tmp_path / "g.jsonl")
    task = GSM8KTask(str(path))
    train_pool, eval_pool = task.pools
    assert len(train_pool) + len(eval_pool) == 40 and eval_pool  # every row lands on one side
    assert not {r["question"] for r in train_pool} & {r["question"] for r in eval_pool}
    # the split follows the question text, not the file order
    rows = path.read_text().splitlines()
    (tmp_path / "r.jsonl").write_text("\n".join(reversed(rows)) + "\n")
    assert {r["question"] for r in GSM8KTask(str(tmp_path / "r.jsonl")).pools[1]} == {
        r["question"] for r in eval_pool
    }
    assert task.train_rows(5, seed=3) == task.train_rows(5, seed=3) != task.train_rows(5, seed=4)
    q = task.eval_rows(1, 0)[0]
    i = int(q["question"].split()[2])
    assert q["answer"] == str(3 * i + 1)
    with pytest.raises(ValueError, match="--eval-prompts"):
        task.eval_rows(len(eval_pool) + 1, 0)


def test_bad_rows_and_missing_files_say_what_to_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no hashes"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'answer' must be a string ending in '#### <number>'"):
        GSM8KTask(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        GSM8KTask(str(tmp_path / "missing.jsonl"))


def test_reward_reads_merls_answer_tags_and_free_text(tmp_path):
    task = get_task("gsm8k", source=str(write_gsm8k(tmp_path / "g.jsonl")))
    tagged = "<reasoning>\n4*3 = 12, 12+1 = 13\n</reasoning>\n<answer>\n13\n</answer>\n"
    assert task.reward(tagged, "13") == 1.0
    assert (
        task.reward(tagged.replace("\n13\n</answer>", "\n12\n</answer>"), "13") == 0.0
    )  # the tag, not "13" above
    assert task.reward("So the answer is 1,037.", "1037") == 1.0 and task.reward("13.0", "13") == 1.0
    assert task.reward("no number", "13") == 0.0 and task.reward(None, "13") == 0.0


def test_prompt_is_merls_system_turn_and_example_in_the_chat_template(tmp_path, chat_model):
    tok = AutoTokenizer.from_pretrained(chat_model)
    task = GSM8KTask(str(write_gsm8k(tmp_path / "g.jsonl")), tokenizer=tok)
    row = task.train_rows(1, 0)[0]
    want = tok.apply_chat_template(
        [
            {"role": "system", "content": "\nRespond in the following format:\n\n<reasoning>\n...\n</reasoning>\n"
             "<answer>\n...\n</answer>\n"},
            {"role": "user", "content": ONE_SHOT[0]},
            {"role": "assistant", "content": ONE_SHOT[1]},
            {"role": "user", "content": row["question"]},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    assert row["prompt"] == want and row["prompt"].endswith("<|im_start|>assistant\n")
    assert "largest single-digit prime" in row["prompt"]
    with pytest.raises(ValueError, match="chat template"):
        GSM8KTask(str(tmp_path / "g.jsonl"), tokenizer=type("T", (), {"chat_template": None})())


def test_merl_preset_follows_the_published_setup():
    cfg = make_config("merl")
    assert (cfg.model, cfg.task, cfg.data) == ("Qwen/Qwen2.5-1.5B-Instruct", "gsm8k", "openai/gsm8k")
    assert (cfg.alpha, cfg.lora_dropout, cfg.train_dropout, cfg.lr, cfg.steps) == ("r", 0.05, True, 5e-6, 300)
    assert (cfg.max_prompt_length, cfg.max_completion_length) == (256, 768)
    args = grpo_args(cfg, "x", progress=False)
    # simple-grpo: per_device_train_batch_size 4, gradient_accumulation_steps 8, num_generations 16
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_generations) == (
        4,
        8,
        16,
    )
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty) == (0.6, 0.85, 20, 1.05)
    assert (args.adam_beta2, args.weight_decay, args.warmup_steps) == (0.99, 0.1, 30)
    grid = make_grid("merl")
    assert sorted({(p["rank"], p["beta"]) for p in grid.points()}) == [
        (r, b) for r in (1, 2, 4, 8, 16, 32, 64) for b in (0.0, 0.05)
    ]


def test_a_run_on_a_local_gsm8k_file_trains_and_scores_it(tmp_path, chat_model):
    data = str(write_gsm8k(tmp_path / "g.jsonl"))
    cfg = make_config(
        model=str(chat_model), task="gsm8k", data=data, rank=2, steps=1, prompts_per_step=2, num_generations=2,
        eval_prompts=2, pass_k=0, max_completion_length=8, max_prompt_length=512, top_k=5, threads=1,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    task = load_task(cfg)
    assert (
        isinstance(task, GSM8KTask) and task.source == data and task.tokenizer is not None
    )  # the file, not the hub
    ds = load_run(train(cfg, progress=False))
    assert ds["task"].item() == "gsm8k" and ds.sizes["step"] == 1
    assert json.loads(ds.attrs["config_json"])["data"] == data
    # sampling with top-k is not pi_theta: the sequence-level KL estimates are NaN, as documented
    assert bool(ds["kl_ref_policy_seq_mean"].isnull().all())
