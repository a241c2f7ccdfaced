"""Rollout engines (arca_lab.rollout): what a sync and a generation batch cost, and how far each engine's token
probabilities sit from the trainer's (a script, not a test).

    python benchmarks/bench_rollout.py                 # ~1 min on 2 idle cores
    python benchmarks/bench_rollout.py --quick         # smoke run (a few seconds)
    python benchmarks/bench_rollout.py --adapter DIR   # a trained adapter instead of the random one

Model: `arca_lab.embedded.embedded_model_dir()` (tiny Qwen3, 4 layers, d = 128, character vocabulary), fp32 on
CPU, torch pinned to 2 threads, seed 0 everywhere. Adapter: rank 4 on all linear layers from
`arca_lab.models.lora_config` (alpha 2r, as `arca-lab train` builds it), B drawn N(0, 0.02²) (peft's B = 0
would make the adapter the identity and leave nothing to merge), or `--adapter DIR`.

Engine / sync part. Per engine kind ("same" = the trainer's own peft model samples, LoRA unmerged; then fp32,
bf16, int8 and noise at each σ of `--sigmas`):
- build: constructing the engine (deep copy, unwrap, first full write / quantisation / perturbation);
- sync: median wall time of `--syncs` calls to `RolloutEngine.sync` (what runs once per optimiser step);
- generate: one `generate` call for 16 held-out `arith` prompts × 8 completions, at most 40 new tokens,
  temperature 1, top-p 1 (`RunConfig` defaults), wall and CPU time; the mean completion length (EOS included,
  completions stop at EOS) and the mean rollout entropy H(p_t) are printed beside it;
- δ_t = |π_train(y_t) − π_engine(y_t)| (arXiv 2606.08779) at every sampled token, π_train from one fp32
  teacher-forced forward of the trainer's peft model (`arca_lab.rollout.completion_logprobs`, positions as in
  generate), π_engine the probability the engine returned: mean, median, q99 and max over tokens.
The "same" row's δ is the floor of the trainer itself (KV-cached generation vs the full forward).
Times on a shared machine include the neighbours' load (printed); CPU time is our own work.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads starve 2 cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from arca_lab.config import make_config
from arca_lab.embedded import embedded_model_dir
from arca_lab.models import lora_config
from arca_lab.rollout import completion_logprobs, make_engine, sample
from arca_lab.tasks import get_task

SEED = 0
THREADS = 2
B_STD = 0.02


@dataclass(frozen=True)
class Sizes:
    prompts: int
    completions: int
    max_new_tokens: int
    syncs: int


FULL = Sizes(prompts=16, completions=8, max_new_tokens=40, syncs=5)
QUICK = Sizes(prompts=4, completions=4, max_new_tokens=16, syncs=2)


def log(msg: str) -> None:
    print(f"[bench_rollout] {msg}", file=sys.stderr, flush=True)


def load_policy(adapter: str | None) -> tuple[torch.nn.Module, AutoTokenizer]:
    path = str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(SEED)  # peft draws lora_A from the global generator
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter).eval(), tokenizer
    cfg = make_config(model=path, rank=4, seed=SEED)
    policy = get_peft_model(model, lora_config(cfg, model))
    g = torch.Generator().manual_seed(SEED)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data = B_STD * torch.randn(p.shape, generator=g)
    return policy.eval(), tokenizer


def prompt_ids(tokenizer, sizes: Sizes) -> list[list[int]]:
    rows = get_task("arith").eval_rows(sizes.prompts, seed=SEED + 1)
    ids = [tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    return [p for p in ids for _ in range(sizes.completions)]  # each prompt repeated, as TRL's sampler does


def quantile(xs: torch.Tensor, q: float) -> float:
    return float(torch.quantile(xs, q)) if xs.numel() else float("nan")


def measure(kind: str, sigma: float, policy, tokenizer, prompts, sizes: Sizes) -> dict[str, float]:
    gen_kwargs = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=[tokenizer.eos_token_id],
        max_new_tokens=sizes.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        seed=SEED,
    )
    row: dict[str, float] = {}
    if kind == "same":
        row["build_ms"] = row["sync_ms"] = float("nan")
        wall, cpu = time.perf_counter(), time.process_time()
        comps, logps, ents = sample(policy, prompts, **gen_kwargs)
    else:
        start = time.perf_counter()
        engine = make_engine(kind, policy, noise=sigma, seed=SEED)
        row["build_ms"] = 1e3 * (time.perf_counter() - start)
        times = []
        for _ in range(sizes.syncs):
            before = engine.sync_seconds
            engine.sync(policy)
            times.append(engine.sync_seconds - before)
        row["sync_ms"] = 1e3 * statistics.median(times)
        wall, cpu = time.perf_counter(), time.process_time()
        comps, logps = engine.generate(prompts, **gen_kwargs)
        ents = engine.last_entropies
    row["gen_s"] = time.perf_counter() - wall
    row["gen_cpu_s"] = time.process_time() - cpu
    train = completion_logprobs(policy, prompts, comps, pad_token_id=tokenizer.pad_token_id, temperature=1.0)
    a = torch.tensor([x for r in train for x in r], dtype=torch.float64)
    b = torch.tensor([x for r in logps for x in r], dtype=torch.float64)
    delta = (a.exp() - b.exp()).abs()
    row.update(
        tokens=float(delta.numel()),
        mean_len=delta.numel() / len(comps),
        entropy=statistics.fmean(x for r in ents for x in r),
        d_mean=float(delta.mean()),
        d_median=quantile(delta, 0.5),
        d_q99=quantile(delta, 0.99),
        d_max=float(delta.max()),
    )
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 prompts × 4 completions × 16 tokens")
    ap.add_argument("--adapter", default=None, help="a saved peft adapter of the embedded model")
    ap.add_argument(
        "--sigmas", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="noise engine σ values"
    )
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    policy, tokenizer = load_policy(args.adapter)
    prompts = prompt_ids(tokenizer, sizes)
    n_params = sum(p.numel() for p in policy.get_base_model().parameters() if not p.requires_grad)
    log(f"{len(prompts)} sequences × ≤ {sizes.max_new_tokens} tokens; base {n_params / 1e6:.2f} M parameters")
    configs = [
        ("same", 0.0),
        ("fp32", 0.0),
        ("bf16", 0.0),
        ("int8", 0.0),
        *(("noise", s) for s in args.sigmas),
    ]
    rows = []
    for kind, sigma in configs:
        log(f"{kind} {sigma or ''}")
        rows.append(
            (
                kind if kind != "noise" else f"noise σ={sigma:g}",
                measure(kind, sigma, policy, tokenizer, prompts, sizes),
            )
        )

    print(
        f"\nRollout engines, embedded model, {sizes.prompts} prompts × {sizes.completions} completions × "
        f"≤ {sizes.max_new_tokens} tokens, τ = 1, top-p = 1; torch {torch.__version__}, {THREADS} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    head = (
        f"{'engine':<14} {'build ms':>9} {'sync ms':>8} {'gen s':>6} {'gen cpu s':>9} {'len':>5} {'H nats':>7} "
        f"{'δ mean':>9} {'δ median':>9} {'δ q99':>9} {'δ max':>9}"
    )
    print(head)
    print("-" * len(head))
    for name, r in rows:
        print(
            f"{name:<14} {r['build_ms']:>9.1f} {r['sync_ms']:>8.2f} {r['gen_s']:>6.2f} {r['gen_cpu_s']:>9.2f} "
            f"{r['mean_len']:>5.1f} {r['entropy']:>7.3f} {r['d_mean']:>9.2e} {r['d_median']:>9.2e} "
            f"{r['d_q99']:>9.2e} {r['d_max']:>9.2e}"
        )
    print(
        "\nδ = |π_train(y) − π_engine(y)| at sampled tokens vs the trainer's fp32 forward (arXiv 2606.08779); "
        "'same' = the trainer samples itself (its δ is the KV-cache floor); sync = median of "
        f"{sizes.syncs} RolloutEngine.sync calls; len = mean completion tokens (EOS included)."
    )


if __name__ == "__main__":
    main()
