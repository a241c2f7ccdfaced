"""The embedded default model: a tiny Qwen3 causal LM that the lab builds itself, on CPU, with no model hub.

``--model embedded`` means `embedded_model_dir(seed)`: a directory in the Hugging Face hub format
(`AutoModelForCausalLM` / `AutoTokenizer` load it) holding a character-level tokenizer and a small
`Qwen3ForCausalLM` trained by supervised fine-tuning on the gold completions of `ArithTask`. Training stops as
soon as greedy held-out accuracy first reaches `EmbeddedSpec.stop_accuracy` (40 %), so RL has room to
improve it. The build takes about a minute on 2 CPU cores and is cached per (spec, seed); a `FileLock` makes
concurrent requests build once, and the build is written to a temporary directory moved into place with
`os.replace`, so a killed build never leaves a model that later loads.

Determinism: with the same spec and seed, two builds give bit-identical weights on the same machine and library
versions (seeded init, fixed data order, no dropout, `torch` threads pinned to `EmbeddedSpec.threads`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import tokenizers
import torch
import transformers
from filelock import FileLock
from tokenizers import Regex, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from arca_lab.tasks.arith import ALPHABET, ArithTask
from arca_lab.tasks.base import Task

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
"""What ``--model embedded`` means."""
BUILD_INFO = "build_info.json"
"""File written last into a build directory: its presence marks a complete build."""
BUILD_FORMAT = 1
"""Bumped when the build procedure changes, so cached builds of an older procedure are not reused."""
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


@dataclass(frozen=True)
class EmbeddedSpec:
    """Everything that determines an embedded build besides the seed (its hash names the cache entry)."""

    n_terms: int = 3
    """`ArithTask` terms per problem."""
    digits: int = 2
    """`ArithTask` digits per operand."""
    hidden_size: int = 128
    """Qwen3 hidden size."""
    intermediate_size: int = 256
    """Qwen3 MLP inner size (2x hidden; 3x learnt no faster per step and costs 20 % more time)."""
    num_hidden_layers: int = 4
    """Transformer blocks."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 4
    """Key/value heads (equal to query heads: no grouped-query sharing at this size)."""
    head_dim: int = 32
    """Per-head width (hidden / heads)."""
    max_position_embeddings: int = 128
    """Longest sequence the config advertises (prompt + completion is about 35 tokens)."""
    lr: float = 3e-3
    """AdamW peak learning rate of the supervised fine-tuning."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up steps, constant afterwards."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    batch_size: int = 64
    """Gold completions per SFT step."""
    train_pool: int = 40_000
    """Distinct training problems, cycled in a fixed order (a build uses 20-35 thousand)."""
    max_steps: int = 800
    """SFT step cap, keeping the build within about 90 s on 2 cores; seeds 0-2 stopped after 320-500 steps."""
    eval_every: int = 20
    """SFT steps between greedy evaluations on the stopping rows."""
    fine_eval_every: int = 2
    """Evaluation interval when re-walking from the last checkpoint after an overshoot above `rewalk_above`."""
    eval_rows: int = 256
    """Held-out rows of the stopping evaluation (128 rows proved too noisy: sd 0.04 near the threshold)."""
    final_eval_rows: int = 512
    """Further held-out rows (disjoint from the stopping rows) for the reported final accuracy."""
    min_accuracy: float = 0.30
    """Lower end of the wanted final accuracy window (reported as ``in_window`` in the build info)."""
    stop_accuracy: float = 0.40
    """Stop SFT at the first evaluation whose greedy accuracy reaches this. The first noisy crossing of a
    threshold overestimates the accuracy, so this sits above the window's lower end."""
    rewalk_above: float = 0.50
    """A first crossing of `stop_accuracy` that lands above this triggers a finer re-walk (the accuracy can
    jump by 0.2 between two evaluations; this keeps the result off the window's upper end)."""
    max_accuracy: float = 0.60
    """Upper end of the wanted final accuracy window (reported as ``in_window``)."""
    threads: int = 2
    """`torch.set_num_threads` during the build (restored afterwards)."""

    def __post_init__(self) -> None:
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError("hidden_size must equal num_attention_heads * head_dim")
        if (
            not 0.0
            <= self.min_accuracy
            <= self.stop_accuracy
            <= self.rewalk_above
            <= self.max_accuracy
            <= 1.0
        ):
            raise ValueError("need 0 <= min_accuracy <= stop_accuracy <= rewalk_above <= max_accuracy <= 1")
        if min(self.batch_size, self.train_pool, self.eval_every, self.fine_eval_every, self.eval_rows) < 1:
            raise ValueError("batch_size, train_pool, eval_every, fine_eval_every, eval_rows must be >= 1")

    def build_hash(self, seed: int) -> str:
        """Short hash of (spec, seed, `BUILD_FORMAT`): the cache key of this build."""
        payload = json.dumps(
            {"spec": dataclasses.asdict(self), "seed": seed, "format": BUILD_FORMAT}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ tokenizer, model
def build_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character of `alphabet`, plus ``<pad>``, ``<eos>``, ``<unk>``.

    No BOS and no special tokens are added on encoding; decoding concatenates tokens without spaces.
    """
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *dict.fromkeys(alphabet)])}
    core = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"[\s\S]"), behavior="isolated"
    )  # every char its own word
    core.decoder = decoders.Fuse()
    core.add_special_tokens([PAD, EOS, UNK])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # decoder-only generation pads prompts on the left
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def build_model(spec: EmbeddedSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    """Freshly initialised fp32 `Qwen3ForCausalLM` of `spec`'s size (seed torch before calling)."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,  # an adapter on lm_head must touch nothing else
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=True,
        dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=48,  # gold completions are <= 32 tokens; the library default max_length=20 would cut
    )
    return model


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def generation_accuracy(
    model, tokenizer, task: Task, rows: list[dict[str, str]], batch_size: int = 256, do_sample: bool = False
) -> float:
    """Fraction of `rows` whose generated completion `task.reward` scores 1.0.

    Greedy decoding unless `do_sample` (then temperature 1, no top-k: the policy's own distribution).
    """
    was_training = model.training
    model.eval()
    hits = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **enc, max_new_tokens=48, do_sample=do_sample, temperature=1.0 if do_sample else None, top_k=None
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(task.reward(t, r["answer"]) for t, r in zip(texts, chunk, strict=True))
    model.train(was_training)
    return hits / max(len(rows), 1)


# --------------------------------------------------------------------------------------------------- build
def _sft_tensors(task: ArithTask, tokenizer, rows: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` (N, L) of prompt + gold completion + EOS, and ``labels`` (N, L) that are -100
    on prompt and padding positions, so the loss is on completion tokens (EOS included) only.

    Characters map to ids by a vocabulary look-up, which is what the character-level tokenizer does (tested)
    without the cost of its regex pre-tokenizer.
    """
    prompts = [tokenizer.convert_tokens_to_ids(list(r["prompt"])) for r in rows]
    completions = [tokenizer.convert_tokens_to_ids(list(task.sft_text(r))) for r in rows]
    length = max(len(p) + len(c) + 1 for p, c in zip(prompts, completions, strict=True))
    input_ids, labels = [], []
    for p, c in zip(prompts, completions, strict=True):
        pad = length - len(p) - len(c) - 1
        input_ids.append([*p, *c, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        labels.append([-100] * len(p) + [*c, tokenizer.eos_token_id] + [-100] * pad)
    return torch.tensor(input_ids), torch.tensor(labels)  # one conversion: per-row tensor ops cost 10x more


@contextmanager
def _isolated(threads: int):
    """Pin torch threads and restore them and the global RNG states (python, numpy, torch) on exit.

    Without this a run that happened to build the model would continue with different random streams than a
    run that found it cached.
    """
    previous = torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(previous)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_embedded(out_dir: str | Path, seed: int = 0, spec: EmbeddedSpec | None = None) -> dict:
    """Build the embedded model into `out_dir` (created; must be empty or absent) and return its build info.

    SFT with AdamW on gold completions; greedy accuracy on `spec.eval_rows` held-out rows every
    `spec.eval_every` steps; stop at the first evaluation reaching `spec.stop_accuracy`. If that first
    crossing is above `spec.rewalk_above`, restore the previous checkpoint (weights and optimizer) and re-walk
    the same batches evaluating every `spec.fine_eval_every` steps. The final accuracy is measured on
    `spec.final_eval_rows` further held-out rows.
    """
    spec = spec or EmbeddedSpec()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    task = ArithTask(n_terms=spec.n_terms, digits=spec.digits)
    with _isolated(spec.threads):
        _seed_everything(seed)
        tokenizer = build_tokenizer()
        model = build_model(spec, tokenizer)
        pool = task.train_rows(spec.train_pool, seed)
        held_out = task.eval_rows(spec.eval_rows + spec.final_eval_rows, seed)
        stop_rows, final_rows = held_out[: spec.eval_rows], held_out[spec.eval_rows :]
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        model.train()

        def snapshot(step: int, acc: float | None) -> dict:
            return {
                "step": step,
                "acc": acc,
                "model": copy.deepcopy(model.state_dict()),
                "optim": copy.deepcopy(optimizer.state_dict()),
            }

        history: list[list] = []  # [step, accuracy] pairs, JSON-friendly
        last = snapshot(0, None)
        step, every, rewalks, stop_acc = 0, spec.eval_every, 0, float("nan")
        while step < spec.max_steps:
            # The batch is a function of the step alone, so a re-walk from a checkpoint repeats the same data.
            batch = [pool[(step * spec.batch_size + i) % len(pool)] for i in range(spec.batch_size)]
            input_ids, labels = _sft_tensors(task, tokenizer, batch)  # (B, L) each
            for group in optimizer.param_groups:  # linear warm-up, then constant
                group["lr"] = spec.lr * min(1.0, (step + 1) / spec.warmup_steps)
            loss = model(input_ids=input_ids, labels=labels).loss  # mean over completion tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % every and step != spec.max_steps:
                continue
            stop_acc = generation_accuracy(model, tokenizer, task, stop_rows)
            history.append([step, stop_acc])
            _say(f"  SFT step {step:4d}: loss {loss.item():.4f}, greedy held-out accuracy {stop_acc:.3f}")
            if stop_acc >= spec.stop_accuracy:
                if stop_acc <= spec.rewalk_above or every == spec.fine_eval_every:
                    break
                # Overshoot: accuracy jumps fast; go back and look at the same stretch more closely.
                model.load_state_dict(last["model"])
                optimizer.load_state_dict(last["optim"])
                step, every, rewalks = last["step"], spec.fine_eval_every, rewalks + 1
                continue
            last = snapshot(step, stop_acc)
        model.eval()
        final_acc = generation_accuracy(model, tokenizer, task, final_rows)
        torch.manual_seed(seed)
        sampled_acc = generation_accuracy(model, tokenizer, task, final_rows, do_sample=True)

        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)  # also writes generation_config.json
        tokenizer.save_pretrained(out_dir)
    completion_lengths = [len(task.sft_text(row)) + 1 for row in pool]  # characters + EOS = tokens
    info = {
        "name": EMBEDDED_NAME,
        "seed": seed,
        "build_hash": spec.build_hash(seed),
        "build_format": BUILD_FORMAT,
        "spec": dataclasses.asdict(spec),
        "task": {"name": task.name, "n_terms": task.n_terms, "digits": task.digits},
        "final_accuracy": final_acc,
        "final_eval_rows": len(final_rows),
        "sampled_accuracy_t1": sampled_acc,
        "stop_accuracy": stop_acc,
        "sft_steps": step,
        "eval_history": history,
        "overshoot_rewalks": rewalks,
        "in_window": spec.min_accuracy <= final_acc <= spec.max_accuracy,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "completion_tokens_min_max": [min(completion_lengths), max(completion_lengths)],
        "build_seconds": round(time.perf_counter() - t0, 2),
        "versions": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "build_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _say(line: str) -> None:
    """Build progress on stderr (a minute of silence reads as a hang); also to the module logger."""
    logger.info(line)
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- cache
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given, else ``$ARCA_LAB_CACHE``, else `platformdirs.user_cache_dir("arca-lab")`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ARCA_LAB_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("arca-lab"))


def embedded_model_dir(
    seed: int = 0, cache_dir: str | Path | None = None, spec: EmbeddedSpec | None = None
) -> Path:
    """Directory of the embedded model for `seed` (loadable by `AutoModelForCausalLM.from_pretrained`),
    building it first if the cache does not hold it yet.

    Cache layout: ``<cache_root>/embedded/s<seed>-<build hash>/``. Concurrent callers (threads or processes)
    build once: the build runs under a file lock, into a temporary directory renamed into place when done.
    """
    spec = spec or EmbeddedSpec()
    root = cache_root(cache_dir) / EMBEDDED_NAME
    name = f"s{seed}-{spec.build_hash(seed)}"
    final = root / name
    if (final / BUILD_INFO).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if (final / BUILD_INFO).is_file():  # another process built it while we waited
            return final
        # Holding the lock, any temporary directory of this build is a leftover of a killed build.
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete (no build info): never load it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry should read like any other directory
        _say(f"arca-lab: building the embedded default model once (about a minute; cached in {final})")
        try:
            info = build_embedded(tmp, seed=seed, spec=spec)
            os.replace(tmp, final)
            _say(
                f"arca-lab: embedded model built in {info['build_seconds']:.0f} s, greedy accuracy "
                f"{info['final_accuracy']:.3f} on {info['final_eval_rows']} held-out prompts"
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
