"""Cost of the train–inference mismatch bookkeeping (arca_lab.rollout.correction) on a (128, 40) batch.

Run: ``python benchmarks/bench_correction.py [--rounds N] [--skip-model] [--quick]``.

What is timed, per call: `per_token_delta`, `mismatch_metrics` (alone and with a correction's result),
`correction_weights` for every kind and option, `dc_advantages`, `dc_update`, `is_identity`, and the whole
per-step bookkeeping the trainer would add (δ, one correction, the metrics, DC-GRPO's shaping and λ step).
"nothing" is an empty Python call: the floor of the measurement. For scale, the last row is one loss step
(forward, per-token log-probs, backward) of the embedded-size Qwen3 (`EmbeddedSpec()` shape, random weights,
LoRA r = 8 on all linear layers) on the same 128 completions of 40 tokens after 12 prompt tokens; the
"% of loss step" column divides by it.

How: inputs are seeded (log-probs of a random 64-token softmax, rollout log-probs = training log-probs + a
N(0, 0.05²) engine error, completion lengths uniform in [5, 40], NaN at padding as an engine may send).
Every round runs each case K times back to back and records wall-clock (`perf_counter`) and process CPU
time (`process_time`, all threads) per call; rounds are interleaved across cases so that load changes on
the shared 2-core machine hit all cases alike. The table shows medians over rounds and the wall-clock
interquartile range; the load average is printed. `OMP_WAIT_POLICY=PASSIVE` is set before torch is
imported (see benchmarks/README.md). torch runs with 2 threads, as the trainer does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (see the docstring)

import torch

from arca_lab.rollout.correction import (
    correction_weights,
    dc_advantages,
    dc_update,
    is_identity,
    mismatch_metrics,
    per_token_delta,
)

SEED = 0
B, T, P, VOCAB = 128, 40, 12, 64
THREADS = 2


def make_batch(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per_token_logps, rollout_logps, completion_mask), each (B, T); NaN at padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, VOCAB, generator=g) * 2.0  # (B, T, V)
    tokens = torch.randint(0, VOCAB, (B, T, 1), generator=g)  # (B, T, 1)
    per_token_logps = torch.log_softmax(logits, dim=-1).gather(-1, tokens).squeeze(-1)  # (B, T)
    rollout_logps = per_token_logps + 0.05 * torch.randn(B, T, generator=g)  # (B, T)
    lengths = torch.randint(5, T + 1, (B, 1), generator=g)  # (B, 1)
    mask = torch.arange(T)[None, :] < lengths  # (B, T)
    per_token_logps[~mask] = float("nan")
    rollout_logps[~mask] = float("nan")
    return per_token_logps, rollout_logps, mask


def bookkeeping_cases() -> dict[str, Callable[[], object]]:
    a, b, mask = make_batch()
    adv = torch.randn(B, generator=torch.Generator().manual_seed(SEED + 1))  # (B,)
    delta = per_token_delta(a, b, mask)
    tis = correction_weights("token_truncate", a, b, mask)

    def step() -> None:
        # what one training step adds: δ, one correction, the logged metrics, DC-GRPO's shaping and λ step
        d = per_token_delta(a, b, mask)
        res = correction_weights("token_truncate", a, b, mask)
        m = mismatch_metrics(a, b, mask, correction=res)
        dc_advantages(adv, d, 0.1, mask)
        dc_update(0.1, m["mismatch_delta_mean"], target=0.0037, lr=1.0, lam_max=1.0)

    cases: dict[str, Callable[[], object]] = {
        "nothing (empty call)": lambda: None,
        "per_token_delta": lambda: per_token_delta(a, b, mask),
        "mismatch_metrics": lambda: mismatch_metrics(a, b, mask),
        "mismatch_metrics(correction=...)": lambda: mismatch_metrics(a, b, mask, correction=tis),
    }
    options: list[tuple[str, dict[str, str]]] = [
        ("none", {}),
        ("token_truncate", {}),
        ("token_mask", {}),
        ("sequence_truncate", {"is_seq_agg": "sum"}),
        ("sequence_truncate", {"is_seq_agg": "mean"}),
        ("sequence_mask", {"is_seq_agg": "sum"}),
        ("sequence_mask", {"is_seq_agg": "mean"}),
        ("rejection", {"rs_estimator": "k1", "rs_level": "token"}),
        ("rejection", {"rs_estimator": "k3", "rs_level": "token"}),
        ("rejection", {"rs_estimator": "k3", "rs_level": "sequence"}),
        ("dc_grpo", {}),
    ]
    for kind, kw in options:
        label = f"correction_weights {kind}" + "".join(f" {v}" for v in kw.values())
        cases[label] = lambda kind=kind, kw=kw: correction_weights(kind, a, b, mask, **kw)
    cases["dc_advantages"] = lambda: dc_advantages(adv, delta, 0.1, mask)
    cases["dc_update"] = lambda: dc_update(0.1, 0.004, target=0.0037, lr=1.0, lam_max=1.0)
    cases["is_identity"] = lambda: is_identity(a, b, mask)
    cases["per-step total (δ + TIS + metrics + DC)"] = step
    return cases


def loss_step_case() -> Callable[[], object]:
    """One forward + backward of the embedded-size Qwen3 with LoRA r = 8 on (B, P + T) tokens."""
    from peft import LoraConfig, get_peft_model

    from arca_lab.embedded import EmbeddedSpec, build_model, build_tokenizer

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    model = build_model(EmbeddedSpec(), tokenizer)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, bias="none")
    )
    g = torch.Generator().manual_seed(SEED + 2)
    ids = torch.randint(3, len(tokenizer), (B, P + T), generator=g)  # (B, P + T)
    attention = torch.ones_like(ids)
    completion = ids[:, P:]  # (B, T)

    def step() -> None:
        logits = model(input_ids=ids, attention_mask=attention).logits[:, P - 1 : -1]  # (B, T, V)
        per_token_logps = (
            torch.log_softmax(logits.float(), dim=-1).gather(-1, completion[..., None]).squeeze(-1)
        )
        (-per_token_logps.mean()).backward()
        model.zero_grad(set_to_none=True)

    return step


def measure(
    cases: dict[str, tuple[Callable[[], object], int]], rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """Per case, `rounds` samples of (wall µs, CPU µs) per call; rounds interleaved across cases."""
    for fn, _ in cases.values():  # warm-up: first-call allocations and lazy imports
        fn()
    spent: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (fn, k) in cases.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(k):
                fn()
            spent[name].append(((time.perf_counter() - w0) / k * 1e6, (time.process_time() - c0) / k * 1e6))
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per case (default 30)")
    parser.add_argument("--calls", type=int, default=20, help="back-to-back calls per round (default 20)")
    parser.add_argument("--skip-model", action="store_true", help="skip the reference loss step")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 3 calls")
    args = parser.parse_args()
    rounds, calls = (3, 3) if args.quick else (args.rounds, args.calls)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation noise
    load0 = os.getloadavg()[0]

    cases = {name: (fn, calls) for name, fn in bookkeeping_cases().items()}
    loss_name = "reference: embedded Qwen3 + LoRA r8, loss step (fwd + bwd)"
    if not args.skip_model:
        cases[loss_name] = (loss_step_case(), 1)
    spent = measure(cases, rounds)

    loss_us = statistics.median(w for w, _ in spent[loss_name]) if loss_name in spent else None
    print(
        f"batch (B, T) = ({B}, {T}), {rounds} rounds × {calls} calls, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, seed {SEED}"
    )
    header = f"{'case':58s} {'wall µs':>10s} {'IQR µs':>15s} {'CPU µs':>10s} {'% of loss step':>15s}"
    print(header)
    print("-" * len(header))
    for name, samples in spent.items():
        walls = sorted(w for w, _ in samples)
        q1, q3 = statistics.quantiles(walls, n=4)[0::2] if len(walls) > 1 else (walls[0], walls[0])
        wall = statistics.median(walls)
        cpu = statistics.median(c for _, c in samples)
        share = f"{100 * wall / loss_us:14.2f}%" if loss_us else f"{'-':>15s}"
        print(f"{name:58s} {wall:10.1f} {f'{q1:.0f}–{q3:.0f}':>15s} {cpu:10.1f} {share}")
    print(f"load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
