"""Tiny hub-format stand-ins: offline loading, generation, finding the output layer, LoRA on each layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from arca_lab.tasks.math import DEFAULT_TEMPLATE
from arca_lab.testing import ARCHITECTURES, lm_head_module_name, lm_head_of, make_tiny_causal_lm

# name of the output layer and whether it shares its weight with the input embedding, per architecture
HEADS = {
    "qwen3": ("lm_head", False),
    "llama": ("lm_head", True),
    "gpt2": ("lm_head", True),
    "biogpt": ("output_projection", True),
    "bert": ("cls.predictions.decoder", True),
}
# Linear (or Conv1D) layers that peft's "all-linear" wraps, counted by hand from each model's code, 2 layers:
#   qwen3/llama: q,k,v,o_proj + gate,up,down_proj = 7 per layer;  gpt2: attn.c_attn, attn.c_proj, mlp.c_fc,
#   mlp.c_proj = 4;  biogpt: q,k,v,out_proj + fc1, fc2 = 6;  bert: query, key, value, attention.output.dense,
#   intermediate.dense, output.dense = 6, plus the head's transform `cls.predictions.transform.dense` once.
ALL_LINEAR = {"qwen3": 14, "llama": 14, "gpt2": 8, "biogpt": 12, "bert": 13}
PROMPT = DEFAULT_TEMPLATE.replace("{problem}", "What is $\\frac{1}{2} + \\frac{1}{4}$?")


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("standins")
    return {arch: make_tiny_causal_lm(root / arch, arch, seed=0) for arch in ARCHITECTURES}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_all_load_offline_in_a_fresh_process(standins):
    # HF_HUB_OFFLINE must be set before huggingface_hub is imported, hence a subprocess.
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "out = {}\n"
        "for arch, path in json.loads(sys.argv[1]).items():\n"
        "    m = AutoModelForCausalLM.from_pretrained(path); t = AutoTokenizer.from_pretrained(path)\n"
        "    ids = t('Solution: $\\\\boxed{5}$', return_tensors='pt').input_ids\n"
        "    g = m.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)\n"
        "    out[arch] = [type(m).__name__, g.shape[1] - ids.shape[1]]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    paths = json.dumps({a: str(p) for a, p in standins.items()})
    proc = subprocess.run(
        [sys.executable, "-c", code, paths], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "qwen3": ["Qwen3ForCausalLM", 3],
        "llama": ["LlamaForCausalLM", 3],
        "gpt2": ["GPT2LMHeadModel", 3],
        "biogpt": ["BioGptForCausalLM", 3],
        "bert": ["BertLMHeadModel", 3],
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokenizer_and_generation(standins, arch):
    model, tok = _load(standins[arch])
    enc = tok(PROMPT, return_tensors="pt")
    ids = enc.input_ids
    assert tok.decode(ids[0]) == PROMPT  # lossless round trip of a MATH prompt
    assert ids.shape[1] < len(PROMPT) / 2  # merges learned: well under one token per character
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert model.config.vocab_size == len(tok) == 512
    out = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5) and torch.equal(out[0, : ids.shape[1]], ids[0])
    # greedy decoding is a function of the weights: the same directory gives the same continuation
    again = AutoModelForCausalLM.from_pretrained(standins[arch]).generate(
        **enc, max_new_tokens=5, min_new_tokens=5, do_sample=False
    )
    assert torch.equal(out, again)


def test_seeded_init_and_caller_rng_untouched(tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = make_tiny_causal_lm(tmp_path / "a", "qwen3", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = make_tiny_causal_lm(tmp_path / "b", "qwen3", seed=7)
    c = make_tiny_causal_lm(tmp_path / "c", "qwen3", seed=8)
    sa, sb, sc = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_layer_found_by_identity(standins, arch):
    model, tok = _load(standins[arch])
    name, tied = HEADS[arch]
    head = lm_head_of(model)
    assert lm_head_module_name(model) == name
    assert model.get_submodule(name) is head
    assert isinstance(head, torch.nn.Linear) and head.out_features == len(tok)
    assert (head.weight is model.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_only_lora_wraps_only_the_head(standins, arch):
    model, _ = _load(standins[arch])
    name, _ = HEADS[arch]
    hidden, vocab = model.get_output_embeddings().in_features, model.get_output_embeddings().out_features
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=[lm_head_module_name(model)])
    )
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == [
        f"base_model.model.{name}.lora_A.default.weight",
        f"base_model.model.{name}.lora_B.default.weight",
    ]
    assert sum(p.numel() for p in trainable.values()) == 2 * (hidden + vocab)  # A: r x hidden, B: vocab x r
    assert lm_head_module_name(peft_model) == f"base_model.model.{name}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_linear_lora_trains_on_each_layout(standins, arch):
    model, tok = _load(standins[arch])
    head_name, _ = HEADS[arch]
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == ALL_LINEAR[arch]
    assert not any(n.endswith(head_name) for n in wrapped)  # peft leaves the output layer out
    ids = tok(PROMPT, return_tensors="pt").input_ids
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    # B starts at 0, so only B gets a gradient at step 0 (dL/dA = 0 when B = 0); it must reach every B
    assert len(grads) == ALL_LINEAR[arch] and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_vocab_from_copies_a_tokenizer(tmp_path):
    src = make_tiny_causal_lm(tmp_path / "src", "llama", tokenizer_kind="metaspace")
    dst = make_tiny_causal_lm(tmp_path / "dst", "qwen3", vocab_from=str(src))
    t_src, t_dst = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(dst)
    assert t_src(PROMPT).input_ids == t_dst(PROMPT).input_ids
    assert AutoModelForCausalLM.from_pretrained(dst).config.vocab_size == len(t_src)


def test_bad_arguments():
    with pytest.raises(ValueError, match="qwen3"):
        make_tiny_causal_lm("/nonexistent/never-written", "mamba")
    with pytest.raises(ValueError, match="get_output_embeddings"):
        lm_head_of(torch.nn.Linear(2, 2))
