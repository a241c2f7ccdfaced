"""Shared fixtures: a tiny random Qwen3 in the hub format (no download) and a trainer factory around it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see arca_lab/__init__.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 random Qwen3 with the embedded character tokenizer (untied head)."""
    from arca_lab.embedded import EmbeddedSpec, build_model, build_tokenizer

    out = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    spec = EmbeddedSpec(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    )
    build_model(spec, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's cache (an embedded build there would be reused across sessions)."""
    monkeypatch.setenv("ARCA_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "arca-cache"))
