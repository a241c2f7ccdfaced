"""`arca-lab` command line: train, eval, theory, sweep, verify-bound, report.

    arca-lab train --credit arca --rank 4 --out runs/arca-r4        # embedded default, CPU, about a minute
    arca-lab train --preset arca-paper --out runs/paper            # the ARCA paper's setup, on a GPU
    arca-lab eval runs/arca-r4                                     # greedy accuracy and pass@k of a trained run
    arca-lab theory [check]                                        # KL bounds; check them on a softmax layer
    arca-lab sweep --out sweeps/default                            # papermill sweep over rank x credit
    arca-lab verify-bound RUN_OR_SWEEP_DIR                         # KL bounds vs trained adapters
    arca-lab report SWEEP_DIR                                      # re-execute the analysis notebook

`train --help` lists every RunConfig field with its docstring. Exit statuses are the same for every command
(`arca_lab.exit_codes`): 0 success, 1 a check failed, 64 bad input (before anything runs), and for `sweep` the
number of failed runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from arca_lab.config import PRESETS, RunConfig, field_docs, make_config
from arca_lab.exit_codes import EX_USAGE, UsageParser


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per RunConfig field, help from the field docstrings; unset flags stay unset (presets apply)."""
    docs = field_docs(RunConfig)
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        kind = {"int": int, "float": float, "float | None": _parse_optional_float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text, dest=f.name)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="arca-lab", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one GRPO + LoRA fine-tune with token credit")
    train.add_argument(
        "--preset", choices=sorted(PRESETS), help="start from a named setup (flags still override)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(train)

    ev = sub.add_parser("eval", help="greedy accuracy and pass@k of a finished run's adapter")
    ev.add_argument("run_dir", type=Path, help="a directory written by `arca-lab train`")
    ev.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (default: the run's)")
    ev.add_argument(
        "--checkpoints",
        action="store_true",
        help="a table over the run's --save-every checkpoints: greedy accuracy and exact held-out KL per step",
    )

    for name, text in [
        ("theory", "print the KL bounds, or `theory check` them on a softmax layer"),
        ("sweep", "run the papermill sweep over rank x credit x seed x arm x alpha rule"),
        ("verify-bound", "check the KL bounds against a trained run (or every run of a sweep)"),
        ("report", "re-execute a sweep's analysis notebook"),
    ]:
        sub.add_parser(name, help=text, add_help=False)  # listed here; `arca-lab NAME --help` for its options
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    delegated = {  # subcommands whose own module parses their arguments
        "theory": "theory.cli:main",
        "sweep": "arca_lab.sweep.cli:main",
        "report": "arca_lab.sweep.cli:report_main",
        "verify-bound": "arca_lab.analysis.verify:main",
    }
    if argv and argv[0] in delegated:
        module, func = delegated[argv[0]].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as err:
        print(f"arca-lab {args.command}: error: {err}", file=sys.stderr)
        return EX_USAGE
    return 0


def _train(args: argparse.Namespace) -> int:
    from arca_lab.results import load_run
    from arca_lab.run import train

    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    cfg = make_config(args.preset, **overrides)
    out = train(cfg, progress=not args.quiet)
    ds = load_run(out)
    last = ds.isel(step=-1)
    print(f"\nrun written to {out}")
    print(
        f"  greedy accuracy  {float(ds.greedy_accuracy_before):.3f} -> {float(ds.greedy_accuracy_after):.3f}"
    )
    print(
        f"  pass@{cfg.pass_k}           {float(ds.pass_at_k_before):.3f} -> {float(ds.pass_at_k_after):.3f}"
    )
    for name in ("reward", "credit_gini", "credit_etr", "kl_ref_policy_mean", "kl_policy_ref_max"):
        if name in ds:
            print(f"  {name:<24}{float(last[name]):.4g}  (final step)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from arca_lab.evaluate import evaluate
    from arca_lab.models import load_policy
    from arca_lab.run import EVAL_SEED, load_task

    config_path = args.run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a directory written by `arca-lab train`")
    cfg = RunConfig.from_json(config_path.read_text())
    model, tokenizer = load_policy(cfg)
    task = load_task(cfg)
    rows = task.eval_rows(args.eval_prompts or cfg.eval_prompts, seed=EVAL_SEED)
    kw = dict(
        k=cfg.pass_k, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p
    )
    if args.checkpoints:
        return _eval_checkpoints(args.run_dir, cfg, task, rows, kw)
    base = evaluate(model, tokenizer, task, rows, **kw)
    adapted = evaluate(
        PeftModel.from_pretrained(model, args.run_dir / "adapter"), tokenizer, task, rows, **kw
    )
    print(
        f"{args.run_dir}: model {cfg.model}, task {cfg.task}, credit {cfg.credit}, rank {cfg.rank}, "
        f"seed {cfg.seed}; {len(rows)} held-out prompts (full config: {config_path})"
    )
    print(f"{'':14}{'base':>8}{'adapter':>9}")
    print(f"{'greedy acc':14}{base.greedy_accuracy:8.3f}{adapted.greedy_accuracy:9.3f}")
    print(f"{f'pass@{cfg.pass_k}':14}{base.pass_at_k:8.3f}{adapted.pass_at_k:9.3f}")
    return 0


def _eval_checkpoints(run_dir: Path, cfg: RunConfig, task, rows, kw) -> int:
    """Greedy accuracy and held-out KL (exact per token, float64, both directions, temperature 1, on completions
    sampled from each checkpoint at the run's temperature; mean over valid tokens) at every saved step."""
    from peft import PeftModel

    from arca_lab.analysis.heldout_kl import measure_tokens
    from arca_lab.evaluate import evaluate
    from arca_lab.models import load_policy
    from arca_lab.run import EVAL_SEED, checkpoints

    prompts = [r["prompt"] for r in rows]
    print(f"{run_dir}: {len(rows)} held-out prompts; KL over completions sampled from each checkpoint")
    print(f"{'step':>6}{'greedy acc':>12}{'KL(pi||base)':>14}{'KL(base||pi)':>14}{'tokens':>8}")
    for step, path in checkpoints(run_dir):
        model, tokenizer = load_policy(cfg)  # a fresh base: peft injects its layers in place
        policy = PeftModel.from_pretrained(model, path)
        acc = evaluate(policy, tokenizer, task, rows, **{**kw, "k": 1}).greedy_accuracy
        m = measure_tokens(
            policy,
            tokenizer,
            prompts,
            temperatures=[1.0],
            max_new_tokens=cfg.max_completion_length,
            sample_temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=EVAL_SEED,
        )
        kl = m.per_tau[1.0]
        n = kl["kl_policy_ref"].size
        print(
            f"{step:>6}{acc:>12.3f}{kl['kl_policy_ref'].mean():>14.5f}{kl['kl_ref_policy'].mean():>14.5f}{n:>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
