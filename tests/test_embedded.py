"""Embedded model: tokenizer, a reduced build (determinism, stopping rule, saved format), the cache and its lock.

The full default build (about a minute on 2 cores) is the one `slow` test at the end.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from arca_lab import embedded
from arca_lab.embedded import (
    BUILD_INFO,
    EMBEDDED_NAME,
    EmbeddedSpec,
    _sft_tensors,
    build_embedded,
    build_tokenizer,
    embedded_model_dir,
    generation_accuracy,
)
from arca_lab.tasks.arith import ArithTask

# A few seconds to build: 1 small layer, 6 SFT steps, 8-row evaluations.
TINY = EmbeddedSpec(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    batch_size=16,
    train_pool=256,
    max_steps=6,
    eval_every=3,
    fine_eval_every=1,
    eval_rows=8,
    final_eval_rows=8,
)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    build_embedded(out, seed=0, spec=TINY)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ARCA_LAB_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def build_counter(monkeypatch) -> list[int]:
    """Counts calls of the real `build_embedded` made by `embedded_model_dir` (and makes each take >= 0.3 s
    so concurrent callers really overlap)."""
    calls: list[int] = []
    real = embedded.build_embedded

    def counting(out_dir, seed=0, spec=None):
        calls.append(seed)
        time.sleep(0.3)
        return real(out_dir, seed=seed, spec=spec)

    monkeypatch.setattr(embedded, "build_embedded", counting)
    return calls


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    prompt, completion = "47+85+19=", "47+85=132,132+19=151>151"
    text = prompt + completion + tok.eos_token
    ids = tok(text)["input_ids"]
    assert len(ids) == len(prompt) + len(completion) + 1  # one token per character, EOS as one token
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == prompt + completion
    prompt_ids = tok(prompt)["input_ids"]  # no BOS or EOS added
    assert len(prompt_ids) == len(prompt) and not set(prompt_ids) & set(tok.all_special_ids)
    assert tok.decode(tok("4?7")["input_ids"]) == "4<unk>7"

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == ("<pad>", "<eos>", None)
    assert len(loaded) == 3 + len("0123456789+=,>")


def test_sft_tensors_match_the_tokenizer_and_mask_the_prompt():
    tok, task = build_tokenizer(), ArithTask()
    rows = [{"prompt": "47+85+19=", "answer": "151"}, {"prompt": "10+10+10=", "answer": "30"}]
    input_ids, labels = _sft_tensors(task, tok, rows)
    # Longest row: 9 prompt + 24 completion + EOS = 34; the other has 9 + 20 + 1 = 30 and 4 pads.
    assert input_ids.shape == labels.shape == (2, 34)
    for i, (row, n_pad) in enumerate(zip(rows, (0, 4), strict=True)):
        full = tok(row["prompt"] + task.sft_text(row))["input_ids"] + [tok.eos_token_id]
        assert input_ids[i].tolist() == full + [tok.pad_token_id] * n_pad
        assert labels[i].tolist() == [-100] * 9 + full[9:] + [-100] * n_pad


def test_spec_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="num_attention_heads \\* head_dim"):
        EmbeddedSpec(hidden_size=100)
    with pytest.raises(ValueError, match="min_accuracy <= stop_accuracy <= rewalk_above"):
        EmbeddedSpec(stop_accuracy=0.9)


# ------------------------------------------------------------------------------------------ reduced build
def test_build_writes_a_loadable_hub_directory(tiny_dir):
    info = json.loads((tiny_dir / BUILD_INFO).read_text())
    assert info["name"] == EMBEDDED_NAME and info["seed"] == 0
    assert info["sft_steps"] == TINY.max_steps  # a tiny model never reaches the stop accuracy in 6 steps
    assert [step for step, _ in info["eval_history"]] == [3, 6]
    assert info["completion_tokens_min_max"][0] >= 12 and info["completion_tokens_min_max"][1] <= 32

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_loaded_model_generates_a_scorable_completion(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    task = ArithTask()
    rows = task.eval_rows(4, seed=0)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=32)
    assert out.shape[1] > enc["input_ids"].shape[1]  # generated something, not cut by max_length=20
    for ids, row in zip(out[:, enc["input_ids"].shape[1] :].tolist(), rows, strict=True):
        text = tok.decode(ids, skip_special_tokens=True)
        assert task.reward(text, row["answer"]) in (0.0, 1.0)
        assert len(task.token_roles(ids, tok)) == len(ids)
    # What the build reported is what the saved weights do (same rows: the held-out draw after the stop rows).
    info = json.loads((tiny_dir / BUILD_INFO).read_text())
    final_rows = task.eval_rows(TINY.eval_rows + TINY.final_eval_rows, seed=0)[TINY.eval_rows :]
    assert generation_accuracy(model, tok, task, final_rows) == info["final_accuracy"]


def test_build_leaves_the_callers_random_state_and_threads_alone(tmp_path):
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # differs from TINY.threads = 2
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    build_embedded(tmp_path / "m", seed=3, spec=TINY)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)


def test_same_seed_gives_identical_weights(tiny_dir, tmp_path):
    again = build_embedded(tmp_path / "again", seed=0, spec=TINY)
    other = build_embedded(tmp_path / "other", seed=1, spec=TINY)
    first, second, third = _weights(tiny_dir), _weights(tmp_path / "again"), _weights(tmp_path / "other")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)
    assert again["build_hash"] != other["build_hash"]


def test_overshoot_rewalks_the_same_batches_with_finer_evaluation(tmp_path, monkeypatch):
    # Scripted accuracies, eval_every=3 and fine_eval_every=1 (TINY):
    #   step 3 -> 0.10 (below stop 0.40: checkpoint), step 6 -> 0.90 (above rewalk 0.50: back to step 3),
    #   step 4 -> 0.20 (checkpoint), step 5 -> 0.42 (between stop and rewalk: stop at step 5);
    #   then the final and the sampled accuracy.
    script = iter([0.10, 0.90, 0.20, 0.42, 0.45, 0.30])
    monkeypatch.setattr(embedded, "generation_accuracy", lambda *a, **k: next(script))
    info = build_embedded(tmp_path / "rewalk", seed=0, spec=TINY)
    assert info["eval_history"] == [[3, 0.10], [6, 0.90], [4, 0.20], [5, 0.42]]
    assert (info["sft_steps"], info["overshoot_rewalks"], info["stop_accuracy"]) == (5, 1, 0.42)
    assert (info["final_accuracy"], info["sampled_accuracy_t1"], info["in_window"]) == (0.45, 0.30, True)
    # Restoring weights and optimizer state at step 3 and re-walking gives exactly a straight 5-step run.
    monkeypatch.setattr(embedded, "generation_accuracy", lambda *a, **k: 0.0)
    build_embedded(tmp_path / "straight", seed=0, spec=dataclasses.replace(TINY, max_steps=5))
    rewalked, straight = _weights(tmp_path / "rewalk"), _weights(tmp_path / "straight")
    assert all(torch.equal(rewalked[k], straight[k]) for k in straight)


# -------------------------------------------------------------------------------------------------- cache
def test_cache_is_reused(cache, build_counter):
    first = embedded_model_dir(seed=0, spec=TINY)
    mtime = (first / BUILD_INFO).stat().st_mtime_ns
    second = embedded_model_dir(seed=0, spec=TINY)
    assert first == second and build_counter == [0]
    assert (second / BUILD_INFO).stat().st_mtime_ns == mtime
    assert first.parent == cache / EMBEDDED_NAME
    assert first.name == f"s0-{TINY.build_hash(0)}"
    assert embedded_model_dir(seed=1, spec=TINY) != first and build_counter == [0, 1]


def test_explicit_cache_dir_wins_over_the_environment(cache, tmp_path_factory, build_counter):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    assert embedded_model_dir(seed=0, cache_dir=elsewhere, spec=TINY).parent == elsewhere / EMBEDDED_NAME
    assert not (cache / EMBEDDED_NAME).exists()


def test_concurrent_requests_build_once(cache, build_counter):
    results: list[Path] = []
    start = threading.Barrier(2)

    def request():
        start.wait()
        results.append(embedded_model_dir(seed=0, spec=TINY))

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build_counter == [0]
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0] / BUILD_INFO).is_file()


def test_a_failed_build_leaves_nothing_that_loads(cache, monkeypatch):
    def dies_half_way(out_dir, seed=0, spec=None):
        Path(out_dir, "config.json").write_text("{}")  # a partial build
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "build_embedded", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir(seed=0, spec=TINY)
    root = cache / EMBEDDED_NAME
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []

    # A build killed outright (no cleanup ran) leaves its temporary directory; the next build removes it.
    name = f"s0-{TINY.build_hash(0)}"
    (root / f".{name}.tmp-killed").mkdir()
    monkeypatch.setattr(embedded, "build_embedded", build_embedded)
    path = embedded_model_dir(seed=0, spec=TINY)
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [name]
    assert (path / BUILD_INFO).is_file()


# ------------------------------------------------------------------------------------------------- full
@pytest.mark.slow
def test_full_default_build(cache):
    path = embedded_model_dir(seed=0)
    info = json.loads((path / BUILD_INFO).read_text())
    assert 0.30 <= info["final_accuracy"] <= 0.60 and info["in_window"]
    assert info["completion_tokens_min_max"][0] >= 12 and info["completion_tokens_min_max"][1] <= 32
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    task = ArithTask()
    spec = EmbeddedSpec()
    final_rows = task.eval_rows(spec.eval_rows + spec.final_eval_rows, seed=0)[spec.eval_rows :]
    assert generation_accuracy(model, tok, task, final_rows) == info["final_accuracy"]
