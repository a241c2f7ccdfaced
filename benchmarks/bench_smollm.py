"""SmolLM2-135M-Instruct on CPU: what one GRPO step of the `smollm-cpu` preset costs, phase by phase, and ARCA's
step cost relative to uniform credit (a script, not a test; needs the `smollm` extra, README).

    python benchmarks/bench_smollm.py            # ~6 min on 2 idle cores
    python benchmarks/bench_smollm.py --steps 2  # fewer trainer steps per credit

Part 1, phases (the preset's shapes: 4 prompts x 8 completions, up to 96 new tokens, LoRA r 8 on all linear
layers, fp32, torch threads = cores, seed 0), each timed once after a warm-up:
- generate: `model.generate` of the 32 completions (temperature 1, top-p 1), the adapter unmerged, as TRL does;
- loss step: forward + backward of the 32 prompt+completion sequences through the adapted model, with and
  without gradient checkpointing (TRL's `gradient_checkpointing`);
- base pass: the no-grad forward with the adapter disabled (what ARCA's credit adds), hidden states only;
- logits of one probe row-set: the full-vocabulary (49k) head on 4 rows, as the KL probe computes them.
Peak memory: the process's maximum resident set size after each phase (ru_maxrss, monotone).

Part 2: `arca_lab.run.train` with the preset for uniform and arca credit, `--steps` steps each, one after the other
in this process; the median of `step_time` (run.nc: wall seconds per optimiser step, sampling included) over the
steps after the first.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import resource
import statistics
import tempfile
import time

import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def phases(threads: int) -> list[tuple[str, float, float]]:
    from peft import get_peft_model

    from arca_lab.config import make_config
    from arca_lab.models import load_policy, lora_config
    from arca_lab.run import load_task

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = make_config("smollm-cpu")
    task = load_task(cfg)
    model, tok = load_policy(cfg)
    model = get_peft_model(model, lora_config(cfg, model))
    rows = task.train_rows(cfg.prompts_per_step, seed=0)
    prompts = [r["prompt"] for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out: list[tuple[str, float, float]] = []

    def generate():
        with torch.no_grad():
            return model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=cfg.max_completion_length,
                num_return_sequences=cfg.num_generations,
                pad_token_id=tok.pad_token_id,
            )

    model.eval()
    ids = generate()  # warm-up, and the batch the other phases use
    out.append((f"(batch: sequences {tuple(ids.shape)}, threads {threads})", float("nan"), rss_mb()))
    out.append(("generate 32 completions", timed(generate), rss_mb()))
    mask = (ids != tok.pad_token_id).long()
    model.train()

    def loss_step():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    loss_step()
    out.append(("loss forward + backward", timed(loss_step), rss_mb()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    out.append(("loss forward + backward, checkpointing", timed(loss_step), rss_mb()))
    model.gradient_checkpointing_disable()

    def base_pass():
        with torch.no_grad(), model.disable_adapter():
            model.base_model.model.model(input_ids=ids, attention_mask=mask)  # hidden states only

    out.append(("base pass (ARCA), no grad", timed(base_pass), rss_mb()))

    def probe_logits():
        with torch.no_grad():
            model(input_ids=ids[:4], attention_mask=mask[:4])

    out.append(("probe rows' full-vocabulary logits (4 rows)", timed(probe_logits), rss_mb()))
    return out


def credit_steps(steps: int, threads: int) -> dict[str, float]:
    from arca_lab.config import make_config
    from arca_lab.results import load_run
    from arca_lab.run import train

    medians = {}
    for credit in ("uniform", "arca"):
        with tempfile.TemporaryDirectory() as d:
            cfg = make_config(
                "smollm-cpu", credit=credit, steps=steps, eval_prompts=4, threads=threads, out=f"{d}/run"
            )
            ds = load_run(train(cfg, progress=False))
            times = [float(t) for t in ds["step_time"].values]
            medians[credit] = statistics.median(times[1:] if len(times) > 1 else times)
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="trainer steps per credit in part 2")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| phase | seconds | peak RSS (MB) |\n|---|---:|---:|")
    for name, seconds, mb in phases(args.threads):
        print(f"| {name} | {seconds:.2f} | {mb:.0f} |")
    medians = credit_steps(args.steps, args.threads)
    print("\n| credit | median step (s) | relative to uniform |\n|---|---:|---:|")
    for credit, s in medians.items():
        print(f"| {credit} | {s:.1f} | {s / medians['uniform']:.2f} |")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
