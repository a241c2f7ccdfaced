"""The pre-registered test of theory.kl_law.predict_kl on the embedded transformer's head-only arm.

Order of work (the registration exists before any run, in a commit of its own):
    1. `python -m arca_lab.analysis.prediction register` builds the fixed context set (heldout_contexts), reads
       R and π_ref's logit spread off it, evaluates predict_kl at every grid point and writes
       theory/preregistered/kl_law_prediction.json (refusing to overwrite it).
    2. `arca-lab sweep --preset prediction` trains the grid (arca_lab.sweep.studies reads it from that file).
    3. `measure_sweep` measures the exact float64 held-out KL of every final adapter and checkpoint on the same
       context rows; `arca_lab.analysis.prediction_criteria` applies the registered pass rules.

Why these choices (all fixed here, before the runs):
    - Regimes are reached through lr at fixed T = 12 (the embedded sweeps' step count); ranks 1..16, α = 2r.
    - R of the law (contexts with ‖x‖ = R) is the RMS norm of the context rows, not the bound's √d·max|g|.
    - N (contexts_per_step) is the number of GRPO groups per step, prompts_per_step = 16.
    - ‖A₀‖ is left to peft's init (a0_op = None, σ = 1/√(3d)): the prediction is the same for every seed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from arca_lab.analysis.heldout_contexts import FP64_FLOOR, ContextSet, build_context_set, measure_adapter
from theory.kl_law import CONSTANTS, predict_kl

NAME = "kl_law_prediction"
RANKS = (1, 2, 4, 8, 16)
"""LoRA ranks of the head-only grid (α = 2r, scaling α/r, so s = 2 at every rank)."""
LRS = (3e-4, 3e-3, 1e-2, 3e-2, 1e-1)
"""Learning rates: they move the points through small_step → coherent → saturated at T = 12."""
STEPS = 12
"""T: the step count every point is predicted and measured at (the final update)."""
SAVE_EVERY = 3
"""Checkpoints at steps 3, 6, 9 give the step axis of the figures (no criterion uses them)."""
SEEDS = tuple(range(200, 210))
"""10 seeds per point, disjoint from the law's calibration (bandit seeds 100-115) and the exploratory runs (1)."""
CONTEXT_PROMPTS = 64
"""Held-out prompts (task.eval_rows(64, seed=0)) whose base greedy completions give the context rows."""
CARRY_OVER = dict(arm="all", ranks=(1, 4, 16), lrs=(3e-4, 3e-3, 3e-2), seeds=SEEDS[:3])
"""All-linear runs measured against the head-only law at the same (r, lr): a measurement, no claim."""
SHARED = dict(
    task="arith",
    model="embedded",
    credit="uniform",
    alpha_rule="2r",
    scaling="alpha/r",
    optimizer="adamw",
    lr_schedule="constant",
    steps=STEPS,
    save_every=SAVE_EVERY,
    prompts_per_step=16,
    num_generations=8,
    temperature=1.0,
    grad_clip=1.0,
    eval_prompts=0,
    pass_k=0,
)
"""Run settings shared by every point (RunConfig fields; the rest are RunConfig defaults)."""
CRITERIA = {
    "direction": "kl_ref_theta",
    "measured": "mean over the 10 seeds of the exact float64 held-out KL(π_ref‖π_θ) after update T = 12",
    "exclude": "points whose predicted kl_ref_theta < 10 × floor (floor = FP64_FLOOR = 1e-13) are left out",
    "median_abs_log10_max": 0.3,
    "baseline": "rank-blind: at each lr, the geometric mean over ranks of the measured point values",
    "baseline_margin_dex": 0.1,
    "gamma": (
        "per regime, per seed: at each lr holding >= 2 ranks of that predicted regime, the OLS slope of "
        "log10 KL_seed against log10 r minus the OLS slope of log10 predicted against log10 r; d_seed = mean of "
        "these over the lrs; 90% Student-t interval of d over the seeds (t_0.95 with n - 1 dof)"
    ),
    "gamma_halfwidth": 0.25,
    "gamma_verdict": "pass if the interval lies inside ±0.25; inconclusive if it is wider than 0.5; else miss",
    "per_point": "|log10(measured/predicted)| <= 0.3 (shown per point; the study's verdict is the median rule)",
    "nan": "a NaN measurement is a failure of its point",
}
"""The pass rules, as committed (theory/preregistered/kl_law_prediction.json `criteria`)."""


# ---------------------------------------------------------------------------------------------- registration
def context_set(model: str = "embedded") -> ContextSet:
    """The study's fixed rows: base greedy completions of the first CONTEXT_PROMPTS held-out arith prompts."""
    from arca_lab.config import RunConfig
    from arca_lab.models import load_policy
    from arca_lab.run import EVAL_SEED, load_task

    cfg = RunConfig(model=model, task=SHARED["task"])
    policy, tokenizer = load_policy(cfg)
    prompts = [r["prompt"] for r in load_task(cfg).eval_rows(CONTEXT_PROMPTS, seed=EVAL_SEED)]
    return build_context_set(policy, tokenizer, prompts, cfg.max_completion_length)


def context_stats(ctx: ContextSet) -> dict[str, float]:
    """What the registration records of the context set (and `measure_sweep` re-checks)."""
    ev = np.linalg.eigvalsh(ctx.x.T @ ctx.x / len(ctx.x))
    return {
        "rows": len(ctx.x),
        "rms_radius": ctx.rms_radius,
        "ref_logit_std": ctx.ref_logit_std(),
        "participation_ratio": float(
            ev.sum() ** 2 / np.sum(ev**2)
        ),  # effective dimension of the rows (d = 128)
        "vocab_size": int(ctx.w0.shape[0]),
        "in_features": int(ctx.w0.shape[1]),
    }


def point_inputs(rank: int, lr: float, stats: dict[str, float], steps: int = STEPS) -> dict[str, Any]:
    """predict_kl's keyword arguments for one grid point (JSON-ready: BoundInputs as a mapping)."""
    bound = dict(
        vocab_size=stats["vocab_size"],
        in_features=stats["in_features"],
        rank=int(rank),
        alpha=2.0 * rank,
        lr=float(lr),
        steps=int(steps),
        input_radius=round(stats["rms_radius"], 6),
        scaling=SHARED["scaling"],
        optimizer=SHARED["optimizer"],
        schedule="constant_with_warmup",  # RunConfig's "constant" is HF's constant_with_warmup (0 warm-up)
        grad_clip=SHARED["grad_clip"],
        temperature=SHARED["temperature"],
    )
    return dict(
        inputs=bound,
        contexts_per_step=SHARED["prompts_per_step"],
        ref_logit_std=round(stats["ref_logit_std"], 6),
        with_crossovers=False,
    )


def build_registration(stats: dict[str, float]) -> dict[str, Any]:
    """The registration document: setup, context set, constants, points with predictions, criteria."""
    points = []
    for lr in LRS:
        for r in RANKS:
            inputs = point_inputs(r, lr, stats)
            pred = predict_kl(**inputs)
            points.append(
                {"rank": r, "lr": lr, "inputs": inputs, "regime": pred["regime"], "predicted": pred}
            )
    return {
        "name": NAME,
        "question": "Does theory.kl_law.predict_kl give the held-out KL(π_ref‖π_θ) of trained head-only adapters "
        "within 2x, better than a rank-blind baseline, with the right rank exponent per regime?",
        "setup": dict(SHARED, arm="head", ranks=list(RANKS), lrs=list(LRS), seeds=list(SEEDS)),
        "contexts": dict(context_stats_note(), **stats),
        "constants": dict(CONSTANTS),
        "floor": FP64_FLOOR,
        "points": points,
        "criteria": CRITERIA,
        "secondary": {
            "best_lr": "per rank, the lr of the highest mean training reward over steps 7-12 (mean over seeds); "
            "KL and reward compared across ranks each at its own best lr (measurement, no criterion)",
            "carry_over": {k: list(v) if isinstance(v, tuple) else v for k, v in CARRY_OVER.items()},
            "other_direction": "kl_theta_ref is reported beside kl_ref_theta, no criterion",
            "steps": "checkpoints at 3, 6, 9 are compared with predict_kl at those T (figures only)",
        },
        "disclosures": [
            "Before registering, 3 exploratory head-only runs (seed 1: r=4 lr=2e-3, r=16 lr=0.1, r=1 lr=3e-4) were "
            "measured on this context set to check the pipeline and the lr range; the law, its constants and the "
            "choices of R, N and ref_logit_std were fixed before those runs and were not changed after them.",
        ],
    }


def context_stats_note() -> dict[str, str]:
    return {
        "rows_are": f"completion-predicting positions of the base model's greedy completions of the first "
        f"{CONTEXT_PROMPTS} held-out arith prompts (eval seed), up to and including the first EOS",
        "R": "rms_radius = sqrt(mean ||x||^2) over the rows (predict_kl's input_radius)",
    }


def registration_path() -> Path:
    from arca_lab.sweep.studies import PREREGISTERED

    return PREREGISTERED / f"{NAME}.json"


def registration_mismatches(reg: dict[str, Any], rtol: float = 1e-9) -> list[str]:
    """Where the registration's committed predictions differ from predict_kl(**inputs) now ([] = none)."""
    out = []
    for i, pt in enumerate(reg["points"]):
        now = predict_kl(**pt["inputs"])
        for key, committed in pt["predicted"].items():
            value = now.get(key)
            same = (
                math.isclose(value, committed, rel_tol=rtol)
                if isinstance(committed, float) and isinstance(value, float)
                else value == committed
            )
            if not same:
                out.append(
                    f"point {i} (r={pt['rank']}, lr={pt['lr']}): {key} committed {committed!r}, now {value!r}"
                )
        if pt["regime"] != now["regime"]:
            out.append(f"point {i}: regime committed {pt['regime']!r}, now {now['regime']!r}")
    return out


# ---------------------------------------------------------------------------------------------- measurement
def _run_key(cfg: dict[str, Any]) -> tuple[str, int, float, int]:
    arm = "head" if cfg["target_modules"] == "lm_head" else "all"
    return arm, int(cfg["rank"]), float(cfg["lr"]), int(cfg["seed"])


def measure_sweep(sweep_dir: str | Path, reg: dict[str, Any], ctx: ContextSet | None = None) -> xr.Dataset:
    """prediction.nc's content: exact float64 held-out KL of every run (arm, rank, lr, seed) at every saved step,
    its late training reward, and predict_kl at every (rank, lr, step); NaN where a run is missing."""
    from arca_lab.analysis.verify import find_runs

    ctx = ctx or context_set()
    stats = context_stats(ctx)
    for key in ("rows", "rms_radius", "ref_logit_std"):
        if not math.isclose(stats[key], reg["contexts"][key], rel_tol=1e-6):
            raise ValueError(
                f"the context set's {key} is {stats[key]!r} but the registration recorded "
                f"{reg['contexts'][key]!r}: the embedded model or task differs from the registered one; rebuild "
                "the embedded model with this arca-lab version (`arca-lab train --steps 0`) or re-register"
            )
    runs = [(p, json.loads((p / "config.json").read_text())) for p in find_runs(sweep_dir)]
    ranks = sorted({c["rank"] for _, c in runs} | set(reg["setup"]["ranks"]))
    lrs = sorted({float(c["lr"]) for _, c in runs} | set(reg["setup"]["lrs"]))
    seeds = sorted({int(c["seed"]) for _, c in runs})
    steps = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    shape = (2, len(ranks), len(lrs), len(seeds), len(steps))
    fwd, bwd = np.full(shape, np.nan), np.full(shape, np.nan)
    reward = np.full(shape[:4], np.nan)
    base = None
    for path, cfg in runs:
        arm, r, lr, seed = _run_key(cfg)
        if int(cfg["steps"]) != STEPS:
            continue
        i = (("head", "all").index(arm), ranks.index(r), lrs.index(lr), seeds.index(seed))
        for j, step in enumerate(steps):
            ckpt = path / "adapter" if step == STEPS else path / "checkpoints" / f"step-{step:05d}"
            if not ckpt.is_dir():
                continue
            if arm == "all" and base is None:
                base = _base_model()
            model = base if arm == "all" else None  # head-only: float64 algebra on the factors, no forward
            fwd[(*i, j)], bwd[(*i, j)] = measure_adapter(ctx, ckpt, float(cfg["temperature"]), model)
        reward[i] = _late_reward(path / "run.nc")
    pred = np.full((2, len(ranks), len(lrs), len(steps)), np.nan)
    for a, r in enumerate(ranks):
        for b, lr in enumerate(lrs):
            for j, step in enumerate(steps):
                p = predict_kl(**point_inputs(r, lr, reg["contexts"], steps=step))
                pred[:, a, b, j] = p["kl_ref_theta"], p["kl_theta_ref"]
    dims = ("arm", "rank", "lr", "seed", "step")
    ds = xr.Dataset(
        {
            "kl_ref_theta": (
                dims,
                fwd,
                {"long_name": "exact held-out KL(π_ref‖π_θ), float64, mean over rows"},
            ),
            "kl_theta_ref": (
                dims,
                bwd,
                {"long_name": "exact held-out KL(π_θ‖π_ref), float64, mean over rows"},
            ),
            "reward_late": (dims[:4], reward, {"long_name": "mean training reward over steps 7-12 (run.nc)"}),
            "predicted_kl_ref_theta": (
                ("rank", "lr", "step"),
                pred[0],
                {"long_name": "predict_kl at (r, lr, T)"},
            ),
            "predicted_kl_theta_ref": (
                ("rank", "lr", "step"),
                pred[1],
                {"long_name": "predict_kl at (r, lr, T)"},
            ),
        },
        coords={"arm": ["head", "all"], "rank": ranks, "lr": lrs, "seed": seeds, "step": steps},
        attrs={
            "registration": json.dumps(reg),
            "context_rows": stats["rows"],
            "dtype": "float64 KL from float32-trained adapters; eval mode (no dropout)",
        },
    )
    return ds


def _late_reward(run_nc: Path) -> float:
    """Mean of run.nc's `reward` over steps 7..12; read with h5netcdf alone (xarray would decode ~150 coordinates)."""
    import h5netcdf

    with h5netcdf.File(run_nc, "r") as f:
        step, reward = f.variables["step"][:], f.variables["reward"][:]
    return float(np.mean(reward[(step > STEPS // 2) & (step <= STEPS)]))


def _base_model() -> Any:
    from arca_lab.config import RunConfig
    from arca_lab.models import load_policy

    return load_policy(RunConfig())[0].eval()


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m arca_lab.analysis.prediction", description=__doc__.split("\n")[0]
    )
    ap.add_argument("command", choices=["register", "show"], help="register: write the registration file")
    ap.add_argument(
        "--out", default=None, help="registration path (default theory/preregistered/<name>.json)"
    )
    args = ap.parse_args(argv)
    path = Path(args.out) if args.out else registration_path()
    stats = context_stats(context_set())
    reg = build_registration(stats)
    if args.command == "show":
        print(json.dumps({k: reg[k] for k in ("contexts", "constants")}, indent=1))
        for p in reg["points"]:
            print(f"r={p['rank']:>2} lr={p['lr']:.0e} {p['regime']:<10} {p['predicted']['kl_ref_theta']:.3e}")
        return 0
    if path.exists():
        raise SystemExit(
            f"{path} exists: a registration is never overwritten (pass --out to write elsewhere)"
        )
    path.write_text(json.dumps(reg, indent=1) + "\n")
    print(f"wrote {path}: {len(reg['points'])} points; commit it alone before running the sweep")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
